"""voxgate.end_reasons: the README lists exactly the reasons the code can end a call with.

mypy makes every ``Session.end``/``AgentControls.hangup``/``Calls.end`` name an
:data:`~voxgate.end_reasons.EndReason`; this test keeps the README's list the same
set, so an operator's ``journalctl REASON=…`` or ``voxgatectl calls --reason``
never meets an undocumented reason.
"""

from __future__ import annotations

import re
from pathlib import Path

from voxgate.end_reasons import END_REASONS

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_end_reasons() -> list[str]:
    """The reasons of the README's ``End reasons`` list (``- `reason`: …`` lines)."""
    text = README.read_text()
    start = text.index("\nEnd reasons (")
    block = text[start:text.index("\n\n", text.index("\n- ", start))]
    return re.findall(r"^- `([a-z-]+)`:", block, flags=re.MULTILINE)


def test_readme_lists_every_end_reason_once() -> None:
    listed = readme_end_reasons()
    assert sorted(listed) == sorted(END_REASONS)
    assert len(listed) == len(set(listed))


def test_reasons_are_distinct_words() -> None:
    assert len(set(END_REASONS)) == len(END_REASONS)
    assert all(re.fullmatch(r"[a-z]+(-[a-z]+)*", reason) for reason in END_REASONS)
