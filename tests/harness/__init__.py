"""Real-peer test harness: the daemon, SIPp, baresip, tcpdump, audio analysis.

:func:`requires` marks a test to be skipped, with the reason, when a peer
program is missing (the Makefile's apt list installs them, so CI runs them).
"""

from __future__ import annotations

import os
import shutil

import pytest

_PACKAGE_OF = {
    "sipp": "sip-tester",
    "kamcmd": "kamailio",
    "baresip": "baresip",
    "tcpdump": "tcpdump",
    "espeak-ng": "espeak-ng",
    "sox": "sox",
    "taskset": "util-linux",
    "promtool": "prometheus",
}


def missing_tools(*tools: str) -> list[str]:
    """The tools of ``tools`` not on PATH; tcpdump also counts as missing when not root."""
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if "tcpdump" in tools and "tcpdump" not in missing and os.geteuid() != 0:
        missing.append("tcpdump (needs root for capture)")
    return missing


def requires(*tools: str) -> pytest.MarkDecorator:
    """A ``skipif`` mark naming the missing tools and their Debian packages."""
    missing = missing_tools(*tools)
    packages = sorted({_PACKAGE_OF.get(t.split()[0], t) for t in missing})
    return pytest.mark.skipif(
        bool(missing),
        reason=f"missing {', '.join(missing)} (apt-get install {' '.join(packages)})",
    )
