"""The sans-IO deadman timers, driven with plain ``now`` values."""

from __future__ import annotations

import dataclasses
import math
import random

import pytest

from voxgate.deadman import (
    AgentFallback,
    DeadmanConfig,
    End,
    Paused,
    PlaybackDeadman,
    Recovered,
    SessionTimers,
)
from voxgate.errors import LocalProtocolError

BASE = DeadmanConfig(
    first_media_s=2.0,
    media_inactivity_s=5.0,
    recovery_window_s=10.0,
    agent_response_s=3.0,
    playback_deadman_s=0.5,
    max_duration_s=100.0,
    ring_timeout_s=30.0,
)


def just_before(t: float) -> float:
    return math.nextafter(t, -math.inf)


def timers(now: float = 0.0, *, max_playbacks: int = 16, **changes: float) -> SessionTimers:
    return SessionTimers(dataclasses.replace(BASE, **changes), now, max_playbacks=max_playbacks)


def answered(
    at: float = 0.0, *, hold: bool = False, max_playbacks: int = 16, **changes: float
) -> SessionTimers:
    """Answered at ``at``; with ``hold`` no media is expected and only non-media timers run."""
    t = timers(at, max_playbacks=max_playbacks, **changes)
    t.answered(at)
    if hold:
        t.media_expected(False, at)
    return t


def fires_at(t: SessionTimers, deadline: float) -> list[object]:
    """Assert nothing fires just before ``deadline``; return what fires at it."""
    assert t.next_deadline() == deadline
    assert t.handle_timer(just_before(deadline)) == []
    return list(t.handle_timer(deadline))


# -- config ------------------------------------------------------------------

@pytest.mark.parametrize("field", ["first_media_s", "media_inactivity_s", "max_duration_s"])
def test_config_rejects_zero_where_it_would_not_mean_anything(field):
    with pytest.raises(LocalProtocolError, match=field):
        dataclasses.replace(BASE, **{field: 0.0})


@pytest.mark.parametrize("field", [f.name for f in dataclasses.fields(DeadmanConfig)])
@pytest.mark.parametrize("value", [-1.0, math.nan, math.inf])
def test_config_rejects_negative_and_non_finite(field, value):
    with pytest.raises(LocalProtocolError, match=field):
        dataclasses.replace(BASE, **{field: value})


@pytest.mark.parametrize(
    "field", ["recovery_window_s", "agent_response_s", "playback_deadman_s", "ring_timeout_s"]
)
def test_config_allows_zero(field):
    assert getattr(dataclasses.replace(BASE, **{field: 0.0}), field) == 0.0


def test_max_playbacks_must_be_positive():
    with pytest.raises(LocalProtocolError, match="max_playbacks"):
        timers(max_playbacks=0)


# -- ringing -------------------------------------------------------------------

def test_ring_timeout_fires_exactly_at_arrival_plus_timeout():
    t = timers(4.0)
    assert t.state == "ringing"
    assert fires_at(t, 34.0) == [End("ring-timeout", 34.0)]
    assert t.state == "ended"
    assert t.end_reason == "ring-timeout"
    assert t.next_deadline() is None


def test_ring_timeout_zero_waits_without_limit():
    t = timers(ring_timeout_s=0.0)
    assert t.next_deadline() is None
    assert t.handle_timer(1e9) == []
    assert t.state == "ringing"


def test_answer_disarms_ring_and_arms_first_media_and_max_duration():
    t = timers(0.0)
    t.answered(29.0)
    assert t.state == "active"
    assert t.handle_timer(30.0) == []
    assert t.next_deadline() == 31.0  # first media: 29 + 2
    t.media_expected(False, 29.0)
    assert t.next_deadline() == 129.0  # max duration: 29 + 100


def test_answer_twice_is_our_bug():
    t = answered()
    with pytest.raises(LocalProtocolError, match="answered"):
        t.answered(1.0)


def test_media_before_the_answer_is_ignored():
    t = timers(0.0)
    assert t.on_media(1.0) is None
    t.answered(2.0)
    assert fires_at(t, 4.0) == [End("no-media", 4.0)]


# -- media ---------------------------------------------------------------------

def test_no_media_after_answer():
    t = answered(1.0)
    assert fires_at(t, 3.0) == [End("no-media", 3.0)]
    assert t.end_reason == "no-media"


def test_media_moves_the_inactivity_deadline_lazily():
    t = answered()
    assert t.on_media(1.0) is None
    assert t.next_deadline() == 6.0
    t.on_media(4.0)
    # A driver that slept until the old deadline finds nothing due and asks again.
    assert t.handle_timer(6.0) == []
    assert t.next_deadline() == 9.0


def test_pause_then_recovery_within_the_window():
    t = answered()
    t.on_media(4.0)
    assert fires_at(t, 9.0) == [Paused(9.0)]
    assert t.state == "paused"
    assert t.stats.pauses == 1
    assert t.next_deadline() == 19.0
    assert t.on_media(12.0) == Recovered(12.0, 3.0)
    assert t.state == "active"
    assert t.stats.recoveries == 1
    assert t.on_media(12.5) is None  # Recovered once, then back to cheap
    assert t.next_deadline() == 17.5
    # A second blink is counted too.
    assert fires_at(t, 17.5) == [Paused(17.5)]
    assert t.on_media(18.25) == Recovered(18.25, 0.75)
    assert (t.stats.pauses, t.stats.recoveries) == (2, 2)


def test_pause_past_the_window_ends_media_timeout():
    t = answered()
    t.on_media(4.0)
    assert t.handle_timer(9.0) == [Paused(9.0)]
    assert fires_at(t, 19.0) == [End("media-timeout", 19.0)]
    assert t.on_media(20.0) is None
    assert t.state == "ended"
    assert t.stats.recoveries == 0


def test_late_driver_gets_pause_and_end_in_order():
    t = answered()
    t.on_media(1.0)
    assert t.handle_timer(50.0) == [Paused(6.0), End("media-timeout", 16.0)]


def test_zero_recovery_window_ends_at_inactivity_without_pause():
    t = answered(recovery_window_s=0.0)
    t.on_media(1.0)
    assert fires_at(t, 6.0) == [End("media-timeout", 6.0)]
    assert t.stats.pauses == 0


def test_hold_suspends_media_checks_and_resume_rebases_first_media():
    t = answered()
    t.media_expected(False, 1.0)
    assert t.next_deadline() == 100.0  # only max duration left
    assert t.handle_timer(50.0) == []
    t.media_expected(True, 60.0)
    assert fires_at(t, 62.0) == [End("no-media", 62.0)]


def test_hold_after_media_resume_rebases_inactivity():
    t = answered()
    t.on_media(1.0)
    t.media_expected(False, 2.0)
    assert t.handle_timer(40.0) == []
    t.media_expected(True, 50.0)
    assert fires_at(t, 55.0) == [Paused(55.0)]


def test_hold_while_paused_ends_the_pause():
    t = answered()
    t.on_media(1.0)
    t.handle_timer(6.0)
    assert t.media_expected(False, 8.0) == Recovered(8.0, 2.0)
    assert t.state == "active"
    assert t.stats.recoveries == 1
    assert t.next_deadline() == 100.0


def test_new_media_address_while_paused_rebases_at_now():
    t = answered()
    t.on_media(1.0)
    t.handle_timer(6.0)
    assert t.media_expected(True, 10.0) == Recovered(10.0, 4.0)
    assert fires_at(t, 15.0) == [Paused(15.0)]


def test_media_expected_outside_a_pause_returns_nothing():
    t = answered()
    assert t.media_expected(True, 1.0) is None
    assert t.next_deadline() == 3.0


# -- agent response ----------------------------------------------------------

def test_agent_fallback_fires_once_per_turn():
    t = answered(hold=True)
    t.caller_turn_ended(10.0)
    assert fires_at(t, 13.0) == [AgentFallback(13.0)]
    assert t.stats.agent_fallbacks == 1
    assert t.state == "active"
    assert t.next_deadline() == 100.0  # not re-armed until the next turn ends


def test_agent_timer_rearms_at_each_turn_end():
    t = answered(hold=True)
    t.caller_turn_ended(20.0)
    t.caller_turn_ended(22.0)
    assert fires_at(t, 25.0) == [AgentFallback(25.0)]


@pytest.mark.parametrize("disarm", ["agent_started", "caller_speaking"])
def test_agent_timer_disarmed(disarm):
    t = answered(hold=True)
    t.caller_turn_ended(20.0)
    getattr(t, disarm)(22.0)
    assert t.handle_timer(23.0) == []
    assert t.stats.agent_fallbacks == 0


def test_agent_response_zero_disables_fallback():
    t = answered(hold=True, agent_response_s=0.0)
    t.caller_turn_ended(20.0)
    assert t.next_deadline() == 100.0


# -- playback ------------------------------------------------------------------

def test_playback_deadman_per_utterance():
    t = answered(hold=True)
    t.playback_started(1, 2.0, 10.0)  # due 12.5
    t.playback_started(2, 3.0, 10.0)  # due 13.5
    t.playback_completed(1, 12.0)
    assert fires_at(t, 13.5) == [PlaybackDeadman(13.5, 2)]
    assert t.stats.playback_deadmans == 1
    t.playback_completed(2, 14.0)  # late signal: ignored
    assert t.next_deadline() == 100.0


def test_playback_completion_before_the_driver_wakes_wins():
    t = answered(hold=True)
    t.playback_started(7, 1.0, 10.0)
    t.playback_completed(7, 12.0)
    assert t.handle_timer(12.0) == []


def test_playback_restart_moves_its_deadline():
    t = answered(hold=True)
    t.playback_started(1, 1.0, 10.0)
    t.playback_started(1, 1.0, 20.0)
    assert fires_at(t, 21.5) == [PlaybackDeadman(21.5, 1)]


def test_playbacks_are_bounded_oldest_forgotten():
    t = answered(hold=True, max_playbacks=2)
    t.playback_started(1, 1.0, 10.0)
    t.playback_started(2, 1.0, 11.0)
    t.playback_started(3, 1.0, 12.0)
    assert t.stats.playbacks_forgotten == 1
    assert t.handle_timer(20.0) == [PlaybackDeadman(12.5, 2), PlaybackDeadman(13.5, 3)]


@pytest.mark.parametrize("expected_s", [-0.1, math.nan])
def test_playback_bad_duration_is_our_bug(expected_s):
    t = answered(hold=True)
    with pytest.raises(LocalProtocolError, match="expected_s"):
        t.playback_started(1, expected_s, 10.0)


# -- max duration and ordering ---------------------------------------------------

def test_max_duration_from_the_answer():
    t = timers(0.0)
    t.answered(5.0)
    t.on_media(5.0)
    for second in range(6, 105):
        t.on_media(float(second))
        assert t.handle_timer(float(second)) == []
    assert fires_at(t, 105.0) == [End("max-duration", 105.0)]


def test_due_together_end_wins_over_everything_else():
    t = answered(hold=True, max_duration_s=10.0)
    t.caller_turn_ended(7.0)
    t.playback_started(1, 9.5, 0.0)
    assert t.handle_timer(10.0) == [End("max-duration", 10.0)]
    assert t.stats.agent_fallbacks == t.stats.playback_deadmans == 0


def test_max_duration_wins_a_tie_with_no_media():
    t = answered(first_media_s=100.0)
    assert t.handle_timer(100.0) == [End("max-duration", 100.0)]


def test_due_events_come_in_deadline_order_then_kind_then_id():
    t = answered()
    t.on_media(1.0)  # pause due at 6
    t.caller_turn_ended(3.0)  # fallback due at 6
    t.playback_started(9, 5.5, 0.0)  # due 6
    t.playback_started(4, 5.5, 0.0)  # due 6
    t.playback_started(5, 3.0, 0.0)  # due 3.5
    assert t.handle_timer(6.0) == [
        PlaybackDeadman(3.5, 5), Paused(6.0), AgentFallback(6.0),
        PlaybackDeadman(6.0, 4), PlaybackDeadman(6.0, 9),
    ]


def test_late_driver_gets_everything_up_to_the_end_and_nothing_after():
    t = answered(hold=True, max_duration_s=10.0)
    t.caller_turn_ended(5.0)  # 8
    t.playback_started(1, 8.5, 0.0)  # 9
    t.playback_started(2, 20.0, 0.0)  # 20.5: after the end
    assert t.handle_timer(50.0) == [
        AgentFallback(8.0), PlaybackDeadman(9.0, 1), End("max-duration", 10.0),
    ]
    assert t.stats.playback_deadmans == 1


# -- after the end ---------------------------------------------------------------

STATS_COUNTERS = ("agent_fallbacks", "pauses", "playback_deadmans", "playbacks_forgotten",
                  "recoveries")
"""DeadmanStats' counters (compiled with mypyc, it has no ``__slots__`` to list them)."""


def test_every_call_is_a_no_op_after_end():
    t = answered()
    assert t.handle_timer(2.0) == [End("no-media", 2.0)]
    before = {name: getattr(t.stats, name) for name in STATS_COUNTERS}
    t.answered(3.0)
    assert t.on_media(3.0) is None
    assert t.media_expected(False, 3.0) is None
    assert t.media_expected(True, 3.0) is None
    t.caller_turn_ended(3.0)
    t.caller_speaking(3.0)
    t.agent_started(3.0)
    t.playback_started(1, -1.0, 3.0)
    t.playback_completed(1, 3.0)
    assert t.next_deadline() is None
    assert t.handle_timer(1e9) == []
    assert t.state == "ended"
    assert t.end_reason == "no-media"
    assert {name: getattr(t.stats, name) for name in STATS_COUNTERS} == before


def test_next_deadline_is_always_the_earliest_armed_deadline() -> None:
    """The cached next_deadline agrees with every armed timer after any input."""
    rng = random.Random(15)
    for _ in range(200):
        t = timers(0.0, max_playbacks=3)
        now = 0.0
        for _ in range(40):
            now += rng.choice((0.02, 0.5, 3.0))
            step = rng.randrange(10)
            if step == 0 and t.state == "ringing":
                t.answered(now)
            elif step == 1:
                t.on_media(now)
            elif step == 2:
                t.media_expected(rng.random() < 0.5, now)
            elif step == 3:
                t.caller_turn_ended(now)
            elif step == 4:
                t.caller_speaking(now)
            elif step == 5:
                t.agent_started(now)
            elif step == 6:
                t.playback_started(rng.randrange(5), rng.random(), now)
            elif step == 7:
                t.playback_completed(rng.randrange(5), now)
            else:
                t.handle_timer(now)
            expected = min(t._deadlines(), default=None)
            assert t.next_deadline() == (None if expected is None else expected[0])
