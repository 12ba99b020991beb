"""voxgate.budget: per-session buffer accounting and the process RSS gate."""

from __future__ import annotations

import pytest

from voxgate.budget import (
    BYTES_PER_MS,
    MIB,
    BoundedAudioQueue,
    BufferCaps,
    RssGate,
    RssLimits,
    SessionBudget,
    choose_shed_victims,
    default_rss_limits,
    parse_statm_rss_bytes,
)
from voxgate.errors import LocalProtocolError

CAPS_MS = {"jitter": 200, "playout": 100, "utterance": 1000, "recording": 2000,
           "agent_in": 500, "agent_out": 500}
FRAME = bytes(320)  # 20 ms of PCM16 at 8 kHz


def make_budget(session_bytes: int = 100_000, grace_ms: int = 2000) -> SessionBudget:
    return SessionBudget(BufferCaps.from_ms(CAPS_MS, session_bytes, grace_ms))


# --- caps -------------------------------------------------------------------

def test_from_ms_converts_by_bytes_per_ms():
    caps = BufferCaps.from_ms(CAPS_MS, 50_000, 1500)
    assert caps.caps_bytes["jitter"] == 200 * 8
    assert caps.caps_bytes["playout"] == 100 * 16
    assert caps.caps_bytes["recording"] == 2000 * 16
    assert caps.grace_s == 1.5
    assert set(BYTES_PER_MS) == set(CAPS_MS)


@pytest.mark.parametrize(("caps_ms", "session_bytes", "grace_ms"), [
    ({"jitter": 200, "video": 10}, 1000, 0),
    ({"jitter": 0}, 1000, 0),
    ({"jitter": 20}, 0, 0),
    ({"jitter": 20}, 1000, -1),
])
def test_bad_caps_are_rejected(caps_ms, session_bytes, grace_ms):
    with pytest.raises(LocalProtocolError):
        BufferCaps.from_ms(caps_ms, session_bytes, grace_ms)


# --- accounting -------------------------------------------------------------

def test_add_and_release_track_held_total_and_peak():
    budget = make_budget()
    assert budget.add("playout", 320) == 0
    assert budget.add("jitter", 160) == 0
    assert budget.add("playout", 320) == 0
    assert budget.held_bytes["playout"] == 640
    assert budget.total_bytes == 800
    budget.release("playout", 320)
    budget.release("jitter", 160)
    assert budget.held_bytes == {**dict.fromkeys(CAPS_MS, 0), "playout": 320}
    assert budget.total_bytes == 320
    assert budget.peak_bytes == 800


def test_add_returns_excess_over_the_buffer_cap():
    budget = make_budget()
    cap = 100 * 16  # playout
    assert budget.add("playout", cap) == 0
    assert budget.add("playout", 320) == 320
    assert budget.add("playout", 10) == 330  # still over: the caller did not drop yet


def test_release_below_zero_is_a_bug():
    budget = make_budget()
    budget.add("jitter", 160)
    with pytest.raises(LocalProtocolError):
        budget.release("jitter", 161)
    assert budget.held_bytes["jitter"] == 160
    assert budget.total_bytes == 160


@pytest.mark.parametrize("call", [
    lambda b: b.add("video", 1),
    lambda b: b.release("video", 1),
    lambda b: b.add("jitter", -1),
    lambda b: b.release("jitter", -1),
])
def test_unknown_buffer_or_negative_bytes_is_a_bug(call):
    with pytest.raises(LocalProtocolError):
        call(make_budget())


def test_budget_without_a_cap_for_a_buffer_rejects_it():
    budget = SessionBudget(BufferCaps.from_ms({"jitter": 100}, 10_000, 0))
    with pytest.raises(LocalProtocolError):
        budget.add("playout", 320)
    assert list(budget.snapshot()) == ["jitter"]


def test_dropped_releases_and_counts_per_buffer():
    budget = make_budget()
    budget.add("agent_out", 960)
    budget.dropped("agent_out", 640, 2)
    budget.dropped("agent_out", 320, 1)
    assert budget.held_bytes["agent_out"] == 0
    assert budget.total_bytes == 0
    assert budget.drops_bytes["agent_out"] == 960
    assert budget.drops_frames["agent_out"] == 3
    assert budget.drops_frames["playout"] == 0


def test_snapshot_shape():
    budget = make_budget()
    budget.add("jitter", 160)
    snap = budget.snapshot()
    assert set(snap) == set(CAPS_MS)
    assert snap["jitter"] == {"held_bytes": 160, "cap_bytes": 1600,
                              "drops_bytes": 0, "drops_frames": 0}
    snap["jitter"]["held_bytes"] = 0  # a copy, not the live counters
    assert budget.held_bytes["jitter"] == 160


# --- grace timing -----------------------------------------------------------

def over_limit_budget() -> SessionBudget:
    budget = make_budget(session_bytes=1000, grace_ms=2000)
    budget.add("recording", 1001)
    return budget


def test_over_for_less_than_grace_is_tolerated():
    budget = over_limit_budget()
    assert budget.next_deadline() is None
    assert budget.check(10.0) is None
    assert budget.next_deadline() == 12.0
    assert budget.check(11.99) is None


def test_over_for_the_grace_period_ends_the_session():
    budget = over_limit_budget()
    assert budget.check(10.0) is None
    assert budget.check(12.0) == "budget"
    assert budget.check(13.0) == "budget"


def test_dipping_under_resets_the_grace_period():
    budget = over_limit_budget()
    assert budget.check(10.0) is None
    budget.release("recording", 1)  # exactly at the limit: within
    assert budget.check(11.0) is None
    assert budget.next_deadline() is None
    budget.add("recording", 1)
    assert budget.check(11.5) is None
    assert budget.check(13.0) is None  # 1.5 s since it went over again
    assert budget.check(13.5) == "budget"


def test_over_limit_says_when_check_is_needed():
    budget = make_budget(session_bytes=1000, grace_ms=2000)
    budget.add("recording", 1000)
    assert not budget.over_limit  # at the limit: within
    budget.add("recording", 1)
    assert budget.over_limit
    budget.release("recording", 1)
    assert budget.over_limit  # until a check sees it within
    assert budget.check(1.0) is None
    assert not budget.over_limit
    budget.add("recording", 1)  # over again, below the earlier peak
    assert budget.over_limit
    assert budget.check(2.0) is None and budget.over_limit


def test_zero_grace_ends_at_once():
    budget = SessionBudget(BufferCaps.from_ms(CAPS_MS, 1000, 0))
    budget.add("recording", 2000)
    assert budget.check(5.0) == "budget"


# --- BoundedAudioQueue ------------------------------------------------------

def test_queue_is_fifo_and_accounts_bytes():
    budget = make_budget()
    queue = BoundedAudioQueue(budget, "utterance")
    assert queue.pop() is None
    for i in range(3):
        assert queue.push(bytes([i]) * 320) == 0
    assert len(queue) == 3
    assert queue.held_bytes == budget.held_bytes["utterance"] == 960
    assert queue.pop() == bytes([0]) * 320
    assert queue.held_bytes == budget.total_bytes == 640


def test_queue_drops_oldest_first_and_counts_them():
    budget = make_budget()
    queue = BoundedAudioQueue(budget, "playout")  # cap 1600 bytes = 5 frames
    frames = [bytes([i]) * 320 for i in range(7)]
    dropped = [queue.push(f) for f in frames]
    assert dropped == [0, 0, 0, 0, 0, 1, 1]
    assert len(queue) == 5
    assert queue.pop() == frames[2]
    assert budget.drops_frames["playout"] == 2
    assert budget.drops_bytes["playout"] == 640
    assert budget.held_bytes["playout"] == queue.held_bytes == 4 * 320


def test_queue_drops_several_small_frames_for_one_big_one():
    budget = make_budget()
    queue = BoundedAudioQueue(budget, "jitter")  # cap 1600 bytes
    for _ in range(10):
        queue.push(bytes(160))
    assert queue.push(bytes(480)) == 3
    assert queue.held_bytes == 7 * 160 + 480
    assert budget.drops_frames["jitter"] == 3


def test_queue_drops_a_frame_larger_than_the_cap():
    budget = make_budget()
    queue = BoundedAudioQueue(budget, "jitter")
    queue.push(bytes(160))
    assert queue.push(bytes(2000)) == 2
    assert len(queue) == 0
    assert budget.held_bytes["jitter"] == 0
    assert budget.drops_bytes["jitter"] == 2160


def test_queue_clear_releases_without_counting_a_drop():
    budget = make_budget()
    queue = BoundedAudioQueue(budget, "agent_out")
    for _ in range(4):
        queue.push(FRAME)
    assert queue.clear() == 4
    assert len(queue) == 0
    assert queue.held_bytes == budget.total_bytes == 0
    assert budget.drops_frames["agent_out"] == 0


def test_queue_needs_a_budgeted_buffer():
    budget = SessionBudget(BufferCaps.from_ms({"jitter": 100}, 10_000, 0))
    with pytest.raises(LocalProtocolError):
        BoundedAudioQueue(budget, "playout")


# --- RSS limits and gate ----------------------------------------------------

@pytest.mark.parametrize(("soft", "hard"), [(0, 10), (10, 10), (20, 10), (-5, 10)])
def test_rss_limits_validation(soft, hard):
    with pytest.raises(LocalProtocolError):
        RssLimits(soft, hard)


def test_default_rss_limits_derivation():
    limits = default_rss_limits(300)
    assert limits.soft_bytes == 64 * MIB + 300 * 512 * 1024 == 214 * MIB
    assert limits.hard_bytes == 268 * MIB  # 267.5 MiB rounded up
    small = default_rss_limits(0, base_bytes=3 * MIB)
    assert (small.soft_bytes, small.hard_bytes) == (3 * MIB, 4 * MIB)
    custom = default_rss_limits(10, base_bytes=100 * MIB, per_session_bytes=MIB)
    assert (custom.soft_bytes, custom.hard_bytes) == (110 * MIB, 138 * MIB)


@pytest.mark.parametrize("kwargs", [
    {"max_sessions": -1},
    {"max_sessions": 1, "base_bytes": 0},
    {"max_sessions": 1, "per_session_bytes": -1},
])
def test_default_rss_limits_rejects_bad_inputs(kwargs):
    with pytest.raises(LocalProtocolError):
        default_rss_limits(**kwargs)


SOFT = 100 * MIB
HARD = 125 * MIB
RESUME = 95 * MIB  # soft - 5 %


def test_rss_gate_full_cycle():
    gate = RssGate(RssLimits(SOFT, HARD))
    assert gate.state == "ok"
    seen = [gate.sample(rss, float(t)) for t, rss in enumerate([
        50 * MIB,       # ok
        SOFT + 1,       # soft: admission closes
        HARD + 1,       # hard: shed
        HARD - 1,       # still above soft: keep shedding
        SOFT + 1,       # still above soft: keep shedding
        SOFT,           # at soft: shedding stops, admission still closed
        RESUME,         # inside the hysteresis band: still closed
        RESUME - 1,     # below resume: open again
    ])]
    assert [(v.state, v.admit, v.shed) for v in seen] == [
        ("ok", True, 0),
        ("soft", False, 0),
        ("hard", False, 1),
        ("hard", False, 1),
        ("hard", False, 1),
        ("soft", False, 0),
        ("soft", False, 0),
        ("ok", True, 0),
    ]
    assert gate.shed_total == 3
    assert "hard" in seen[2].detail and "MiB" in seen[2].detail


def test_rss_gate_soft_band_does_not_flap():
    gate = RssGate(RssLimits(SOFT, HARD))
    gate.sample(SOFT + 1, 0.0)
    for t in range(1, 5):
        verdict = gate.sample(SOFT - MIB if t % 2 else SOFT + MIB, float(t))
        assert (verdict.state, verdict.admit) == ("soft", False)


def test_rss_gate_hard_straight_to_ok_when_far_below():
    gate = RssGate(RssLimits(SOFT, HARD))
    assert gate.sample(HARD + 1, 0.0).shed == 1
    verdict = gate.sample(10 * MIB, 1.0)
    assert (verdict.state, verdict.admit, verdict.shed) == ("ok", True, 0)


def test_rss_gate_detail_says_how_long():
    gate = RssGate(RssLimits(SOFT, HARD))
    gate.sample(SOFT + 1, 100.0)
    assert gate.sample(SOFT + 1, 112.0).detail.startswith("soft for 12s")


def test_rss_gate_update_applies_new_limits():
    gate = RssGate(RssLimits(SOFT, HARD))
    assert gate.sample(HARD + 1, 0.0).state == "hard"
    gate.update(RssLimits(2 * SOFT, 2 * HARD))
    assert gate.limits.soft_bytes == 2 * SOFT
    verdict = gate.sample(HARD + 1, 1.0)
    assert (verdict.state, verdict.admit, verdict.shed) == ("ok", True, 0)


# --- statm and victims ------------------------------------------------------

def test_parse_statm():
    assert parse_statm_rss_bytes("10386 2457 1320 694 0 1520 0\n", 4096) == 2457 * 4096


@pytest.mark.parametrize("text", ["", "10386", "10386 abc 1", "1 -5 2", "1 +5 2", "1 ²3 4",
                                  "1 5_0 2"])
def test_parse_statm_rejects_garbage(text):
    with pytest.raises(ValueError):
        parse_statm_rss_bytes(text, 4096)


def test_parse_statm_rejects_bad_page_size():
    with pytest.raises(ValueError):
        parse_statm_rss_bytes("1 2 3", 0)


def test_choose_shed_victims_newest_first():
    sessions = [("a", 10.0), ("b", 30.0), ("c", 20.0), ("d", 30.0)]
    assert choose_shed_victims(sessions, 1) == ["b"]
    assert choose_shed_victims(sessions, 3) == ["b", "d", "c"]
    assert choose_shed_victims(sessions, 10) == ["b", "d", "c", "a"]
    assert choose_shed_victims(sessions, 0) == []
    assert choose_shed_victims([], 1) == []
    with pytest.raises(LocalProtocolError):
        choose_shed_victims(sessions, -1)


# --- config validation ------------------------------------------------------

