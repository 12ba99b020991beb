"""Playback completion: transport signal, paced, deadman, barge-in — once each."""

from __future__ import annotations

from voxgate.deadman import DeadmanConfig, PlaybackDeadman, SessionTimers
from voxgate.pipeline.playback import CLEARED, DEADMAN, MARK, PACED, PlaybackTracker

CONFIG = DeadmanConfig(first_media_s=10, media_inactivity_s=10, recovery_window_s=10,
                       agent_response_s=0, playback_deadman_s=0.5, max_duration_s=100,
                       ring_timeout_s=0)


def tracker() -> tuple[PlaybackTracker, SessionTimers, list[tuple[int, str]]]:
    timers = SessionTimers(CONFIG, 0.0)
    timers.answered(0.0)
    done: list[tuple[int, str]] = []
    return PlaybackTracker(timers, lambda uid, sig: done.append((uid, sig))), timers, done


def test_paced_completion_after_allowance():
    t, _, done = tracker()
    t.started(1, 1.0, 0.0)
    t.sent_paced(1, 1.0, 0.1)
    t.tick(1.05)
    assert done == []
    t.tick(1.1)
    assert done == [(1, PACED)]
    assert t.completed == {PACED: 1}


def test_transport_signal_wins_once_and_disarms_the_deadman():
    t, timers, done = tracker()
    t.started(7, 1.0, 0.0)
    assert t.complete(7, MARK, 0.9)
    assert not t.complete(7, DEADMAN, 2.0)
    assert done == [(7, MARK)]
    events = timers.handle_timer(5.0)
    assert not any(isinstance(e, PlaybackDeadman) for e in events)


def test_deadman_fires_when_no_signal_comes():
    t, timers, done = tracker()
    t.started(3, 1.0, 0.0)
    events = timers.handle_timer(1.5)
    assert [e.utterance_id for e in events if isinstance(e, PlaybackDeadman)] == [3]
    t.complete(3, DEADMAN, 1.5)
    assert done == [(3, DEADMAN)]


def test_cleared_by_barge_in():
    t, _, done = tracker()
    t.started(4, 2.0, 0.0)
    t.complete(4, CLEARED, 0.3)
    assert done == [(4, CLEARED)]
    assert t.playing == frozenset()
