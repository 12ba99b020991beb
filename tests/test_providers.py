"""Tests for the provider health state machine (voxgate.agents.providers)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Sequence

import pytest

from voxgate.agents.providers import (
    HEALTHY,
    MAX_PENDING_CHANGES,
    RAMPING,
    UNHEALTHY,
    HealthSettings,
    ProviderSet,
    StateChange,
)

S = HealthSettings()  # 3 errors, probe every 5 s, ramp 0.1/0.5/1.0 with 30 s steps


def make(
    names: Sequence[str] = ("a", "b", "c"), settings: HealthSettings = S, now: float = 0.0
) -> ProviderSet:
    return ProviderSet(list(names), settings, now)


def break_(ps: ProviderSet, name: str, now: float, kind: str = "connect") -> None:
    for _ in range(ps.settings.unhealthy_after_errors):
        ps.failure(name, kind, now)
    assert ps.state(name) == UNHEALTHY


def ramping(ps: ProviderSet, name: str, now: float) -> float:
    """Make ``name`` unhealthy at ``now`` and start its ramp at ``now`` + probe interval."""
    break_(ps, name, now)
    t = now + ps.settings.probe_interval_s
    assert ps.probes_due(t) == [name]
    ps.probe_result(name, True, t)
    assert ps.state(name) == RAMPING
    return t


# -- construction -----------------------------------------------------------

def test_all_start_healthy_in_order():
    ps = make()
    assert ps.names == ["a", "b", "c"]
    assert all(ps.state(n) == HEALTHY and ps.share(n) == 1.0 for n in ps.names)
    assert not ps.all_unhealthy
    assert ps.next_deadline() is None
    assert ps.take_changes() == []


@pytest.mark.parametrize("names", [[], ["a", "b", "a"]])
def test_bad_names(names):
    with pytest.raises(ValueError):
        ProviderSet(names, S, 0.0)


@pytest.mark.parametrize("kwargs", [
    {"unhealthy_after_errors": 0},
    {"probe_interval_s": 0.0},
    {"ramp_step_s": -1.0},
    {"early_close_s": 0.0},
    {"ramp_shares": (0.0, 1.0)},
    {"ramp_shares": (0.5, 1.5)},
    {"ramp_shares": (0.5, 0.1, 1.0)},
])
def test_bad_settings(kwargs):
    with pytest.raises(ValueError):
        HealthSettings(**kwargs)


def test_unknown_name():
    ps = make()
    with pytest.raises(KeyError):
        ps.failure("zz", "connect", 1.0)
    with pytest.raises(KeyError):
        ps.success("zz", 1.0)


@pytest.mark.parametrize("draw", [-0.1, 1.0, 2.0])
def test_bad_draw(draw):
    with pytest.raises(ValueError):
        make().candidates(0.0, draw)


# -- errors -----------------------------------------------------------------

def test_threshold_errors_make_unhealthy():
    ps = make()
    ps.failure("a", "connect", 1.0)
    ps.failure("a", "handshake", 2.0, detail="403")
    assert ps.state("a") == HEALTHY
    ps.failure("a", "early-close", 3.0)
    assert ps.state("a") == UNHEALTHY
    assert ps.share("a") == 0.0
    assert ps.take_changes() == [StateChange("a", HEALTHY, UNHEALTHY, 3.0)]
    assert ps.next_deadline() == 3.0 + S.probe_interval_s


def test_success_resets_consecutive_errors():
    ps = make()
    ps.failure("a", "connect", 1.0)
    ps.failure("a", "connect", 2.0)
    ps.success("a", 3.0, connect_s=0.25)
    ps.failure("a", "connect", 4.0)
    ps.failure("a", "connect", 5.0)
    assert ps.state("a") == HEALTHY
    row = ps.snapshot(5.0)[0]
    assert row["consecutive_errors"] == 2
    assert row["errors"] == {"connect": 4}
    assert row["last_connect_s"] == 0.25


def test_unhealthy_skipped_and_order_preserved():
    ps = make()
    assert ps.candidates(0.0, 0.5) == ["a", "b", "c"]
    break_(ps, "b", 1.0)
    assert ps.candidates(1.0, 0.5) == ["a", "c"]
    break_(ps, "a", 1.0)
    assert ps.candidates(1.0, 0.5) == ["c"]


def test_all_unhealthy():
    ps = make(("a", "b"))
    break_(ps, "a", 1.0)
    assert not ps.all_unhealthy
    break_(ps, "b", 2.0)
    assert ps.all_unhealthy
    assert ps.candidates(2.0, 0.0) == []


def test_failures_while_unhealthy_are_counted_only():
    ps = make()
    break_(ps, "a", 1.0)
    ps.take_changes()
    ps.failure("a", "connect", 2.0, detail="refused")
    assert ps.state("a") == UNHEALTHY
    assert ps.next_deadline() == 1.0 + S.probe_interval_s  # probe schedule untouched
    assert ps.take_changes() == []
    assert ps.snapshot(2.0)[0]["consecutive_errors"] == 4


# -- probes -----------------------------------------------------------------

def test_probe_schedule():
    ps = make()
    break_(ps, "a", 10.0)
    assert ps.probes_due(14.9) == []
    assert ps.probes_due(15.0) == ["a"]
    assert ps.probes_due(16.0) == []  # handed out once
    assert ps.next_deadline() is None  # the probe in flight does not count
    ps.probe_result("a", False, 17.0, detail="timeout")
    assert ps.state("a") == UNHEALTHY
    assert ps.next_deadline() == 22.0
    assert ps.probes_due(21.0) == []
    assert ps.probes_due(22.0) == ["a"]
    row = ps.snapshot(22.0)[0]
    assert row["errors"] == {"connect": 3, "probe": 1}
    assert row["last_error"] == {"kind": "probe", "detail": "timeout", "age_s": 5.0}


def test_probes_due_in_configured_order():
    ps = make()
    break_(ps, "c", 0.0)
    break_(ps, "a", 1.0)
    assert ps.probes_due(10.0) == ["a", "c"]


def test_probe_ok_starts_ramp_at_first_share():
    ps = make()
    break_(ps, "a", 0.0)
    ps.take_changes()
    assert ps.probes_due(5.0) == ["a"]
    ps.probe_result("a", True, 5.5)
    assert ps.state("a") == RAMPING
    assert ps.share("a") == 0.1
    assert ps.take_changes() == [StateChange("a", UNHEALTHY, RAMPING, 5.5)]
    assert ps.next_deadline() == 5.5 + S.ramp_step_s
    assert ps.snapshot(5.5)[0]["consecutive_errors"] == 0


def test_stale_probe_result_ignored():
    ps = make()
    break_(ps, "a", 0.0)
    assert ps.probes_due(5.0) == ["a"]
    ps.success("a", 6.0)  # a session got through meanwhile
    assert ps.state("a") == RAMPING
    ps.probe_result("a", False, 7.0)
    assert ps.state("a") == RAMPING
    assert ps.snapshot(7.0)[0]["errors"] == {"connect": 3}


def test_success_while_unhealthy_starts_ramp():
    ps = make()
    break_(ps, "a", 0.0)
    ps.success("a", 2.0, connect_s=0.1)
    assert ps.state("a") == RAMPING
    assert ps.share("a") == 0.1
    assert ps.probes_due(100.0) == []


# -- ramp -------------------------------------------------------------------

def test_draw_below_share_takes_session():
    ps = make()
    ramping(ps, "a", 0.0)  # ramp starts at 5.0, share 0.1
    assert ps.candidates(6.0, 0.05) == ["a", "b", "c"]
    assert ps.candidates(6.0, 0.1) == ["b", "c", "a"]  # not first, still a fallback
    assert ps.candidates(6.0, 0.9) == ["b", "c", "a"]


def test_ramping_providers_serve_when_none_is_healthy():
    ps = make()
    ramping(ps, "a", 0.0)
    ramping(ps, "b", 0.0)
    break_(ps, "c", 0.0)
    assert ps.candidates(6.0, 0.5) == ["a", "b"]  # no healthy one: ramping ones still serve
    assert ps.candidates(6.0, 0.05) == ["a", "b"]
    assert not ps.all_unhealthy


def test_ramp_advances_after_error_free_steps_and_ends_healthy():
    ps = make()
    t0 = ramping(ps, "a", 0.0)
    ps.take_changes()
    ps.tick(t0 + 29.9)
    assert ps.share("a") == 0.1
    assert ps.candidates(t0 + 30.0, 0.3) == ["a", "b", "c"]
    assert ps.share("a") == 0.5
    assert ps.next_deadline() == t0 + 60.0
    ps.tick(t0 + 60.0)
    assert ps.state("a") == HEALTHY
    assert ps.share("a") == 1.0
    assert ps.next_deadline() is None
    assert ps.take_changes() == [StateChange("a", RAMPING, HEALTHY, t0 + 60.0)]


def test_missed_steps_are_caught_up_exactly():
    ps = make()
    t0 = ramping(ps, "a", 0.0)
    ps.take_changes()
    rows = ps.snapshot(t0 + 75.0)
    assert rows[0]["state"] == HEALTHY
    assert rows[0]["state_since_s"] == 15.0  # healthy since t0 + 60, not since the call
    assert ps.take_changes() == [StateChange("a", RAMPING, HEALTHY, t0 + 60.0)]


def test_failure_during_ramp_restarts_step_timer():
    ps = make()
    t0 = ramping(ps, "a", 0.0)
    ps.tick(t0 + 40.0)
    assert ps.share("a") == 0.5  # second step began at t0 + 30
    ps.failure("a", "early-close", t0 + 50.0)
    assert ps.state("a") == RAMPING
    assert ps.next_deadline() == t0 + 80.0
    ps.tick(t0 + 79.0)
    assert ps.share("a") == 0.5
    ps.success("a", t0 + 79.5)
    ps.tick(t0 + 80.0)
    assert ps.state("a") == HEALTHY


def test_threshold_during_ramp_makes_unhealthy_again():
    ps = make()
    t0 = ramping(ps, "a", 0.0)
    ps.take_changes()
    ps.failure("a", "connect", t0 + 1.0)
    ps.failure("a", "connect", t0 + 2.0)
    assert ps.state("a") == RAMPING
    ps.failure("a", "connect", t0 + 3.0)
    assert ps.state("a") == UNHEALTHY
    assert ps.take_changes() == [StateChange("a", RAMPING, UNHEALTHY, t0 + 3.0)]
    assert ps.next_deadline() == t0 + 3.0 + S.probe_interval_s
    assert ps.probes_due(t0 + 8.0) == ["a"]
    ps.probe_result("a", True, t0 + 8.0)
    assert ps.share("a") == 0.1  # the ramp starts over


def test_ramp_without_full_share_ends_after_last_step():
    ps = make(settings=HealthSettings(ramp_shares=(0.25,), ramp_step_s=10.0))
    t0 = ramping(ps, "a", 0.0)
    assert ps.share("a") == 0.25
    ps.tick(t0 + 9.0)
    assert ps.state("a") == RAMPING
    ps.tick(t0 + 10.0)
    assert ps.state("a") == HEALTHY


@pytest.mark.parametrize("shares", [(), (1.0,)])
def test_no_ramp_recovers_straight_to_healthy(shares):
    ps = make(settings=HealthSettings(ramp_shares=shares))
    break_(ps, "a", 0.0)
    assert ps.probes_due(5.0) == ["a"]
    ps.probe_result("a", True, 5.0)
    assert ps.state("a") == HEALTHY


# -- deadlines, snapshot, changes -------------------------------------------

def test_next_deadline_is_earliest_of_probes_and_steps():
    ps = make()
    t0 = ramping(ps, "a", 0.0)  # step ends at t0 + 30 = 35
    break_(ps, "b", 20.0)  # probe due at 25
    assert ps.next_deadline() == 25.0
    assert ps.probes_due(25.0) == ["b"]
    assert ps.next_deadline() == t0 + 30.0


def test_snapshot_fields():
    ps = make(("a", "b"))
    ps.failure("a", "handshake", 1.0, detail="bad subprotocol")
    ps.record_session("a", "failover")
    ps.success("b", 1.5, connect_s=0.3)
    ps.record_session("b", "ok")
    ps.record_session("b", "ok")
    ps.record_session("b", "lost")
    rows = ps.snapshot(4.0)
    json.dumps(rows)  # JSON-ready
    assert rows == [
        {
            "name": "a", "state": HEALTHY, "share": 1.0, "consecutive_errors": 1,
            "last_error": {"kind": "handshake", "detail": "bad subprotocol", "age_s": 3.0},
            "state_since_s": 4.0, "last_connect_s": None,
            "sessions": {"failover": 1}, "errors": {"handshake": 1},
        },
        {
            "name": "b", "state": HEALTHY, "share": 1.0, "consecutive_errors": 0,
            "last_error": None, "state_since_s": 4.0, "last_connect_s": 0.3,
            "sessions": {"ok": 2, "lost": 1}, "errors": {},
        },
    ]
    sessions = rows[1]["sessions"]
    assert isinstance(sessions, dict)
    sessions["ok"] = 99  # a copy: the set's counters are not changed
    assert ps.snapshot(4.0)[1]["sessions"] == {"ok": 2, "lost": 1}


def test_snapshot_ramping_row():
    ps = make()
    t0 = ramping(ps, "a", 0.0)
    row = ps.snapshot(t0 + 31.0)[0]
    assert row["state"] == RAMPING
    assert row["share"] == 0.5
    assert row["state_since_s"] == 31.0


def test_changes_are_drained_and_bounded():
    ps = make(settings=HealthSettings(unhealthy_after_errors=1, ramp_shares=()))
    now = 0.0
    for _ in range(MAX_PENDING_CHANGES):  # two changes per round
        now += 1.0
        ps.failure("a", "connect", now)
        ps.success("a", now)
    changes = ps.take_changes()
    assert len(changes) == MAX_PENDING_CHANGES
    assert ps.changes_dropped == MAX_PENDING_CHANGES
    assert changes[-1] == StateChange("a", UNHEALTHY, HEALTHY, now)
    assert ps.take_changes() == []


def test_module_imports_no_event_loop():
    code = (
        "import sys, voxgate.agents.providers\n"
        "print(','.join(m for m in ('trio', 'asyncio') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True)
    assert out.stdout.strip() == ""
