"""Run one fuzz target under libFuzzer (atheris); ``fuzz.run`` starts one per target.

Usage: ``python -m fuzz.worker TARGET [libFuzzer flags] [corpus dirs]``.

voxgate and the targets are imported with atheris' coverage instrumentation
(comparisons included). atheris' ``RegEx`` and ``str`` hooks stay off: in
2.3.0 they break the code under test (``Pattern.search(text, pos)`` raises
TypeError; ``str.startswith("[")`` is compiled as a regex and raises).
libFuzzer owns the process from :func:`atheris.Fuzz` on: it exits when its
time is up (0) or on the first crash (non-zero, input saved under
``-artifact_prefix``).
"""

from __future__ import annotations

import sys

import atheris  # type: ignore[import-untyped]

INSTRUMENTED_PACKAGES = ["voxgate", "fuzz.targets"]


def main() -> None:
    """Set up the target named by ``sys.argv[1]`` and hand over to libFuzzer."""
    if len(sys.argv) < 2:
        sys.exit("usage: python -m fuzz.worker TARGET [libFuzzer flags] [corpus dirs]")
    with atheris.instrument_imports(include=INSTRUMENTED_PACKAGES):
        from fuzz.targets import TARGETS
    target = TARGETS.get(sys.argv[1])
    if target is None:
        sys.exit(f"unknown target {sys.argv[1]!r}; targets: {', '.join(TARGETS)}")
    atheris.Setup([sys.argv[0], *sys.argv[2:]], target.run)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
