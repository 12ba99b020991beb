"""Endpointing decisions: a check once per pause, verdicts ending or stretching the pause."""

from __future__ import annotations

import subprocess
import sys

from voxgate.agents.endpoint import Endpointer, PauseAction, Verdict


def frames(endpointer: Endpointer, paused_at: float, count: int) -> list[PauseAction]:
    """What the endpointer says on ``count`` frames of the pause from ``paused_at``."""
    return [endpointer.pause(paused_at, paused_at + i * 0.02) for i in range(count)]


def test_one_check_per_pause_once_check_ms_of_silence_passed():
    endpointer = Endpointer(check_ms=300, max_ms=1200)
    actions = frames(endpointer, 10.0, 20)
    assert [i for i, a in enumerate(actions) if a.check] == [15]
    assert all(a.stop_ms is None for a in actions)  # no verdict yet: [vad] stop_ms


def test_a_complete_match_ends_the_turn_now():
    endpointer = Endpointer(check_ms=300, max_ms=1200)
    frames(endpointer, 10.0, 16)
    endpointer.checked(10.0, Verdict.COMPLETE)
    assert endpointer.pause(10.0, 10.36) == PauseAction(stop_ms=0)
    assert (endpointer.early, endpointer.extended) == (1, 0)


def test_an_incomplete_match_waits_up_to_max_ms():
    endpointer = Endpointer(check_ms=300, max_ms=1200)
    frames(endpointer, 10.0, 16)
    endpointer.checked(10.0, Verdict.INCOMPLETE)
    assert [a.stop_ms for a in frames(endpointer, 10.0, 30)[16:]] == [1200] * 14
    assert (endpointer.early, endpointer.extended) == (0, 1)


def test_an_unsure_match_leaves_the_default():
    endpointer = Endpointer(check_ms=300, max_ms=1200)
    frames(endpointer, 10.0, 16)
    endpointer.checked(10.0, Verdict.UNSURE)
    assert endpointer.pause(10.0, 10.4) == PauseAction()


def test_a_late_verdict_of_an_earlier_pause_is_ignored():
    endpointer = Endpointer(check_ms=100, max_ms=1200)
    frames(endpointer, 10.0, 6)  # checked; then the caller spoke again
    frames(endpointer, 11.0, 6)  # a new pause, checked too
    endpointer.checked(10.0, Verdict.COMPLETE)
    assert endpointer.pause(11.0, 11.2) == PauseAction()
    endpointer.checked(11.0, Verdict.INCOMPLETE)
    endpointer.checked(11.0, Verdict.COMPLETE)  # one verdict per check
    assert endpointer.pause(11.0, 11.22).stop_ms == 1200


def test_check_ms_zero_turns_endpointing_off():
    endpointer = Endpointer(check_ms=0, max_ms=1200)
    assert all(a == PauseAction() for a in frames(endpointer, 10.0, 100))


def test_endpoint_imports_no_event_loop():
    code = "import sys, voxgate.agents.endpoint; print('trio' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60)
    assert out.stdout.strip() == "False"
