"""Refuse to test stale compiled media cores.

``make setup`` compiles setup.py's ``NATIVE_MODULES`` with mypyc, and its
``C_EXTENSIONS``, into extension modules beside their sources, and Python
imports those first: after an edit to one of the sources, tests run by hand
would test the old code until the next ``make setup``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

DAEMON = Path(__file__).resolve().parent.parent / "daemon"


def pytest_sessionstart(session: pytest.Session) -> None:
    stale = [str(source.relative_to(DAEMON))
             for compiled in DAEMON.glob("voxgate/**/*.so")
             for suffix in (".py", ".c")
             if (source := compiled.with_name(compiled.name.split(".", 1)[0] + suffix)).exists()
             and source.stat().st_mtime > compiled.stat().st_mtime]
    if stale:
        pytest.exit(f"compiled modules older than their sources: {', '.join(sorted(stale))}; "
                    "run `make setup` (it rebuilds them)", returncode=3)
