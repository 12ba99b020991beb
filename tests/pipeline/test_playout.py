"""Playout queue: budget-bounded frames, utterance tracking, barge-in."""

from __future__ import annotations

import pytest

from voxgate.budget import BufferCaps, SessionBudget
from voxgate.pipeline.playout import Playout

F = bytes(320)


def playout(cap_ms: int = 1000) -> Playout:
    return Playout(SessionBudget(BufferCaps.from_ms({"playout": cap_ms}, 1 << 20, 0)))


def test_utterance_is_sent_when_its_last_frame_leaves():
    p = playout()
    p.push(F)
    uid = p.say([F, F])
    [(queued_id, until_s)] = p.take_queued()
    assert queued_id == uid
    assert until_s == pytest.approx(0.06)
    assert p.speaking
    p.pop()
    p.pop()
    assert p.take_sent() == ()
    p.pop()
    assert p.take_sent() == [uid]
    assert not p.speaking
    assert p.played_frames == 3


def test_dropped_utterance_counts_as_sent_and_drop_is_counted():
    p = playout(cap_ms=40)  # two frames
    first = p.say([F, F])
    p.say([F, F])
    assert p.take_sent() == [first]
    assert p.dropped_frames == 2
    assert len(p) == 2


def test_barge_in_clear_returns_cut_utterances_and_is_not_a_drop():
    p = playout()
    a = p.say([F, F])
    b = p.say([F])
    assert p.clear() == [a, b]
    assert len(p) == 0 and p.buffered_bytes == 0
    assert p.dropped_frames == 0
    assert p.pop() is None


def test_empty_utterance_is_refused():
    with pytest.raises(ValueError):
        playout().say([])


def test_skip_discards_the_frames_of_missed_ticks_and_settles_utterances():
    p = playout()
    first = p.say([F, F])
    second = p.say([F, F, F])
    p.skip(3)
    assert p.take_sent() == [first]
    assert p.skipped_frames == 3 and p.played_frames == 0 and p.dropped_frames == 0
    assert len(p) == 2 and p.buffered_bytes == 2 * len(F)
    p.skip(5)  # more than is queued: skips what there is
    assert p.skipped_frames == 5 and len(p) == 0
    assert p.take_sent() == [second]
