"""Admission against the real daemon: burst, tenants, queue, OPTIONS, reload under load.

Calls are placed by :class:`~tests.harness.phone.Phone`, a raw-SIP UAC on one
UDP socket of 127.0.0.1 (ACKs, BYE answers and the rest in the background).
No RTP is sent; ``[timers] media_inactivity_s`` is left long enough.
"""

from __future__ import annotations

import itertools
import re
import signal
import time

from tests.harness.daemon import Daemon, free_udp_port, options_request, status_code
from tests.harness.phone import Call, Phone, headers_of
from tests.integration.conftest import StartDaemon
from tests.integration.test_control import control_socket, ctl_json, health_json, voxgatectl

RETRY_AFTER_S = 7
GATE_OFF = {"media_utilisation_max": 1.0, "media_lag_max_ms": 10_000}
"""The media clock's load gate off: a slow spell of a shared machine must not answer 503
"unhealthy" where these tests count "full" (the gate's own test sets its limits)."""
_PROBE_NUMBERS = itertools.count(1)


# --- helpers -------------------------------------------------------------------------------------

def _counters(daemon: Daemon) -> dict[tuple[str, str, str], int]:
    rows = ctl_json(daemon, "status")["admission"]["counters"]
    return {(r["result"], r["reason"], r["tenant"]): r["count"] for r in rows}


def _tenant_of(daemon: Daemon, call: Call) -> str:
    sessions = ctl_json(daemon, "sessions")
    tenant: str = next(s["tenant"] for s in sessions if s["call_id"] == call.call_id)
    return tenant


def _options(daemon: Daemon) -> tuple[int, dict[str, list[str]]]:
    answer = daemon.exchange(options_request(daemon.sip_port, free_udp_port(),
                                             f"opt-{next(_PROBE_NUMBERS)}"))
    assert answer, "no answer to OPTIONS"
    return status_code(answer[0]), headers_of(answer[0])


def _assert_options(daemon: Daemon, status: int, warning: str | None = None) -> None:
    got, headers = _options(daemon)
    assert got == status, (got, headers.get("warning"), headers)
    if warning is None:
        assert "warning" not in headers, headers
    else:
        assert headers["warning"] == [f'399 voxgate "{warning}"'], headers
        assert headers["retry-after"] == [str(RETRY_AFTER_S)], headers


def _assert_refused(call: Call, status: int, warning: str) -> None:
    assert call.final_status == status, (call.call_id, call.final)
    assert call.header("Warning") == f'399 voxgate "{warning}"', call.final
    expected_retry = str(RETRY_AFTER_S) if status == 503 else None
    assert call.header("Retry-After") == expected_retry, call.final


def _limits(**keys: int | float) -> dict[str, int | float]:
    return {"retry_after_s": RETRY_AFTER_S, **GATE_OFF, **keys}


# --- tests -------------------------------------------------------------------------------------

def test_burst_admits_exactly_max_sessions(start_daemon: StartDaemon) -> None:
    daemon = start_daemon({"limits": _limits(max_sessions=10)})
    with Phone(daemon) as phone:
        prepared = [phone.prepare() for _ in range(50)]
        for _, invite in prepared:  # back to back, nothing read in between
            phone.send(invite)
        calls = [call for call, _ in prepared]
        phone.wait_final(calls, timeout_s=15)

        answered = [c for c in calls if c.final_status == 200]
        refused = [c for c in calls if c.final_status != 200]
        assert len(answered) == 10, sorted(str(c.final_status) for c in calls)
        assert len(refused) == 40
        for call in refused:
            _assert_refused(call, 503, "full")

        status = ctl_json(daemon, "status")
        assert status["sessions"]["active"] == 10, status
        assert status["admitting"] is False and status["not_admitting_because"] == "full"
        session_ids = {s["call_id"]: s["id"] for s in ctl_json(daemon, "sessions")}
        assert sorted(session_ids) == sorted(c.call_id for c in answered)

        # Half end with our BYE, half with the daemon's (operator hang-up), answered by us.
        for call in answered[:5]:
            phone.hang_up(call)
        for call in answered[5:]:
            assert voxgatectl(control_socket(daemon), "hangup",
                              session_ids[call.call_id]).returncode == 0
        phone.wait(lambda: all(c.byes_received for c in answered[5:]), "BYE from the daemon")
    daemon.wait_log(r"event=call_end\b.*\breason=bye\b", count=5)
    daemon.wait_log(r"event=call_end\b.*\breason=operator\b", count=5)
    assert ctl_json(daemon, "status")["sessions"]["active"] == 0
    assert _counters(daemon) == {("admitted", "ok", "default"): 10,
                                 ("refused", "full", "default"): 40}
    assert len(daemon.events("call_refused")) == 40
    assert daemon.alive()


TENANTS = [
    {"name": "acme", "ruri_user": "acme", "max_sessions": 2},
    {"name": "globex", "ruri_user": "globex", "max_sessions": 3},
    {"name": "initech", "header_name": "X-Tenant", "header_value": "initech"},
    {"name": "offsite", "ruri_user": "lab", "source_cidrs": ["10.0.0.0/8", "::1/128"]},
    {"name": "lab", "ruri_user": "lab", "source_cidrs": ["127.0.0.0/8"]},
    {"name": "vpn", "ruri_user": "vpn", "source_cidrs": ["10.0.0.0/8"]},
]


def test_tenant_caps_under_the_global_cap(start_daemon: StartDaemon) -> None:
    daemon = start_daemon({"limits": _limits(max_sessions=4), "tenants": TENANTS})
    with Phone(daemon) as phone:
        acme = [phone.call("acme") for _ in range(3)]
        assert [c.final_status for c in acme] == [200, 200, 486]
        _assert_refused(acme[2], 486, "tenant-full")  # Busy Here: no Retry-After
        globex = [phone.call("globex") for _ in range(3)]
        assert [c.final_status for c in globex] == [200, 200, 503]  # global cap 4 reached
        _assert_refused(globex[2], 503, "full")
        assert {_tenant_of(daemon, c) for c in acme[:2]} == {"acme"}
        assert {_tenant_of(daemon, c) for c in globex[:2]} == {"globex"}
        for call in acme[:2] + globex[:2]:
            phone.hang_up(call)

        globex = [phone.call("globex") for _ in range(4)]
        assert [c.final_status for c in globex] == [200, 200, 200, 486]
        assert phone.call("acme").final_status == 200  # 4 of 4
        other = phone.call("someone")
        _assert_refused(other, 503, "full")
        by_tenant = ctl_json(daemon, "status")["sessions"]["by_tenant"]
        assert by_tenant["globex"] == {"active": 3, "queued": 0, "max_sessions": 3}
        assert by_tenant["acme"]["active"] == 1 and by_tenant["default"]["active"] == 0
    counters = _counters(daemon)
    assert counters[("refused", "tenant-full", "acme")] == 1
    assert counters[("refused", "tenant-full", "globex")] == 1
    assert counters[("refused", "full", "globex")] == 1
    assert counters[("refused", "full", "default")] == 1
    assert counters[("admitted", "ok", "globex")] == 5


def test_tenant_rules_header_and_source(start_daemon: StartDaemon) -> None:
    daemon = start_daemon({"limits": _limits(max_sessions=10), "tenants": TENANTS})
    with Phone(daemon) as phone:
        cases = {
            "initech": phone.call("sales", headers=[("X-Tenant", "initech")]),
            "default": phone.call("sales", headers=[("X-Tenant", "Initech")]),  # exact value
            "lab": phone.call("lab"),   # 127.0.0.1 is in 127.0.0.0/8, not in offsite's CIDRs
            "vpn?": phone.call("vpn"),  # vpn needs 10.0.0.0/8: no match, so default
            "nobody": phone.call("nobody"),
        }
        assert all(c.final_status == 200 for c in cases.values()), cases
        tenants = {name: _tenant_of(daemon, call) for name, call in cases.items()}
        assert tenants == {"initech": "initech", "default": "default", "lab": "lab",
                           "vpn?": "default", "nobody": "default"}
        start = daemon.wait_log(r"event=call_start\b.*\btenant=lab\b")
        assert cases["lab"].call_id in start.string
        for call in cases.values():
            phone.hang_up(call)
    assert ctl_json(daemon, "status")["sessions"]["by_tenant"]["offsite"]["active"] == 0


def test_queue_rings_then_answers_times_out_and_cancels(start_daemon: StartDaemon) -> None:
    daemon = start_daemon({"limits": _limits(max_sessions=1, queue_size=2, queue_timeout_s=3)})
    with Phone(daemon) as phone:
        first = phone.call()
        assert first.final_status == 200
        second = phone.place()
        phone.wait_status(second, 180)
        assert second.final is None and ctl_json(daemon, "status")["sessions"] == {
            "active": 1, "queued": 1,
            "by_tenant": {"default": {"active": 1, "queued": 1, "max_sessions": None}}}
        _assert_options(daemon, 200)  # the queue has room: still admitting
        phone.hang_up(first)
        phone.wait_final([second])
        assert second.final_status == 200, second.final
        daemon.wait_log(rf"event=admission\b.*\bmsg=dequeued\b.*\bcall_id={second.call_id}\s")

        # Queue two more (now full), the next one is refused at once.
        queued_at = time.monotonic()
        waiting = [phone.place(), phone.place()]
        for call in waiting:
            phone.wait_status(call, 180)
        _assert_options(daemon, 503, "full")
        overflow = phone.call()
        _assert_refused(overflow, 503, "full")
        phone.wait_final(waiting, timeout_s=10)
        for call in waiting:
            _assert_refused(call, 503, "queue-timeout")
            assert call.final_at is not None and call.final_at - queued_at >= 2.5, call

        # CANCEL while queued: 200 for the CANCEL, 487 for the INVITE (§9.2).
        cancelled = phone.place()
        phone.wait_status(cancelled, 180)
        phone.cancel(cancelled)
        phone.wait_final([cancelled])
        phone.wait(lambda: cancelled.cancel_status is not None, "answer to CANCEL")
        assert cancelled.cancel_status == 200 and cancelled.final_status == 487, cancelled
        assert ctl_json(daemon, "status")["sessions"] == {
            "active": 1, "queued": 0,
            "by_tenant": {"default": {"active": 1, "queued": 0, "max_sessions": None}}}

        # Draining closes the queue: a queued call is refused at once, not at its timeout.
        drained = phone.place()
        phone.wait_status(drained, 180)
        assert voxgatectl(control_socket(daemon), "drain").returncode == 0
        phone.wait_final([drained], timeout_s=1.5)
        _assert_refused(drained, 503, "draining")
        assert voxgatectl(control_socket(daemon), "resume").returncode == 0
        phone.hang_up(second)
    counters = _counters(daemon)
    assert counters[("refused", "draining", "default")] == 1
    assert counters[("queued", "full", "default")] == 5
    assert counters[("dequeued", "ok", "default")] == 1
    assert counters[("refused", "queue-timeout", "default")] == 2
    assert counters[("refused", "full", "default")] == 1
    assert counters[("cancelled", "cancel", "default")] == 1
    metrics = ctl_json(daemon, "metrics")["text"]
    wait_count = re.search(r"^voxgate_queue_wait_seconds_count (\S+)$", metrics, re.M)
    assert wait_count is not None and float(wait_count.group(1)) >= 1.0, metrics
    assert daemon.events("call_cancelled")


def test_queued_call_waits_on_its_tenant_cap(start_daemon: StartDaemon) -> None:
    daemon = start_daemon({
        "limits": _limits(max_sessions=2, queue_size=4, queue_timeout_s=1.5),
        "tenants": [{"name": "acme", "ruri_user": "acme", "max_sessions": 1}],
    })
    with Phone(daemon) as phone:
        first = phone.call("acme")
        assert first.final_status == 200
        blocked = phone.place("acme")  # queued on acme's cap, the box has room
        phone.wait_status(blocked, 180)
        phone.wait_final([blocked], timeout_s=5)
        _assert_refused(blocked, 486, "tenant-full")  # timed out at its tenant cap

        other = phone.call("someone")  # default tenant: the box is full now (2 of 2)
        assert other.final_status == 200
        acme_next, default_next = phone.place("acme"), phone.place("someone")
        for call in (acme_next, default_next):
            phone.wait_status(call, 180)
        phone.hang_up(first)  # frees acme's slot and a global one: acme's waiter goes in
        phone.wait_final([acme_next])
        assert acme_next.final_status == 200 and default_next.final is None
        assert _tenant_of(daemon, acme_next) == "acme"
        phone.wait_final([default_next], timeout_s=5)
        _assert_refused(default_next, 503, "queue-timeout")
        for call in (other, acme_next):
            phone.hang_up(call)
    counters = _counters(daemon)
    assert counters[("queued", "tenant-full", "acme")] == 2
    assert counters[("queued", "full", "default")] == 1
    assert counters[("refused", "tenant-full", "acme")] == 1
    assert counters[("refused", "queue-timeout", "default")] == 1


def test_options_follows_admission(start_daemon: StartDaemon) -> None:
    daemon = start_daemon({"limits": _limits(max_sessions=1)})
    path = control_socket(daemon)
    _assert_options(daemon, 200)
    with Phone(daemon) as phone:
        call = phone.call()
        assert call.final_status == 200
        _assert_options(daemon, 503, "full")
        phone.hang_up(call)
        _assert_options(daemon, 200)

        assert voxgatectl(path, "drain").returncode == 0
        _assert_options(daemon, 503, "draining")
        _assert_refused(phone.call(), 503, "draining")
        assert voxgatectl(path, "resume").returncode == 0
        _assert_options(daemon, 200)
        again = phone.call()
        assert again.final_status == 200
        phone.hang_up(again)


def test_reload_under_live_calls(start_daemon: StartDaemon) -> None:
    daemon = start_daemon({"limits": _limits(max_sessions=3)})
    text = daemon.config_path.read_text()
    assert "max_sessions = 3\n" in text
    with Phone(daemon) as phone:
        live = [phone.call() for _ in range(3)]
        assert [c.final_status for c in live] == [200, 200, 200]

        daemon.config_path.write_text(text.replace("max_sessions = 3\n", "max_sessions = 1\n"))
        daemon.proc.send_signal(signal.SIGHUP)
        daemon.wait_log(r"event=reloaded\b.*\bmax_sessions=1\b")
        assert "RELOADING=1" in daemon.notifications
        sessions = ctl_json(daemon, "sessions")
        assert sorted(s["call_id"] for s in sessions) == sorted(c.call_id for c in live)
        assert ctl_json(daemon, "status")["limits"]["max_sessions"] == 1

        _assert_refused(phone.call(), 503, "full")
        phone.hang_up(live[0])
        _assert_refused(phone.call(), 503, "full")  # 2 active, cap 1
        phone.hang_up(live[1])
        _assert_refused(phone.call(), 503, "full")  # 1 active, cap 1: still at the cap
        phone.hang_up(live[2])
        fresh = phone.call()
        assert fresh.final_status == 200

        daemon.config_path.write_text(text.replace("max_sessions = 3\n", "max_sessions = -1\n"))
        done = voxgatectl(control_socket(daemon), "reload")
        assert done.returncode == 1, done
        assert "max_sessions" in done.stderr and "(reload-failed)" in done.stderr, done.stderr
        assert daemon.events("reload_failed")
        assert daemon.alive()
        status = ctl_json(daemon, "status")
        assert status["limits"]["max_sessions"] == 1 and status["sessions"]["active"] == 1
        _assert_refused(phone.call(), 503, "full")  # the old cap of 1 still holds
        phone.hang_up(fresh)
        _assert_options(daemon, 200)


# The SIP endpoint sizes the UAS dialog table once, at start, from [limits]
# (transports/sip_endpoint.py: ``max_dialogs=4 * config.limits.max_sessions + 64``);
# neither a reload nor queue_size changes it, so the UAS core answers 503 "full"
# before admission is asked.

def test_reload_raising_max_sessions_admits_up_to_the_new_cap(
    start_daemon: StartDaemon,
) -> None:
    daemon = start_daemon({"limits": _limits(max_sessions=1)}, rtp_ports=200)
    text = daemon.config_path.read_text()
    daemon.config_path.write_text(text.replace("max_sessions = 1\n", "max_sessions = 90\n"))
    assert voxgatectl(control_socket(daemon), "reload").returncode == 0
    assert ctl_json(daemon, "status")["limits"]["max_sessions"] == 90
    with Phone(daemon) as phone:
        prepared = [phone.prepare() for _ in range(80)]
        for _, invite in prepared:
            phone.send(invite)
        calls = [call for call, _ in prepared]
        phone.wait_final(calls, timeout_s=15)
        refused = [(c.final_status, c.header("Warning")) for c in calls if c.final_status != 200]
        assert refused == [], f"{len(refused)} of 80 refused under a cap of 90: {refused[:3]}"
        for call in calls:
            phone.hang_up(call)


def test_queue_holds_queue_size_calls(start_daemon: StartDaemon) -> None:
    daemon = start_daemon({"limits": _limits(max_sessions=1, queue_size=100,
                                             queue_timeout_s=20)})
    with Phone(daemon) as phone:
        first = phone.call()
        assert first.final_status == 200
        prepared = [phone.prepare() for _ in range(79)]
        for _, invite in prepared:
            phone.send(invite)
        waiting = [call for call, _ in prepared]
        phone.wait(lambda: all(180 in c.statuses or c.final for c in waiting),
                   "180 or a final response to 79 INVITEs", timeout_s=15)
        refused = [(c.final_status, c.header("Warning")) for c in waiting if c.final]
        assert refused == [], f"{len(refused)} of 79 refused with room in the queue"
        assert ctl_json(daemon, "status")["sessions"]["queued"] == 79
        for call in waiting:
            phone.cancel(call)
        phone.wait_final(waiting)
        assert {c.final_status for c in waiting} == {487}
        phone.hang_up(first)


def test_a_busy_media_clock_refuses_new_calls_and_admits_again_under_its_limit(
    start_daemon: StartDaemon,
) -> None:
    # 0.1 % of the core: ten calls use more. So does an idle daemon's loop (its
    # housekeeping), so once the calls are gone the operator raises the limit by reload.
    daemon = start_daemon({"limits": _limits(media_utilisation_max=0.001, media_lag_max_ms=40)})
    text = daemon.config_path.read_text()
    assert "media_utilisation_max = 0.001\n" in text
    path = control_socket(daemon)
    _assert_options(daemon, 200)

    def media_clock() -> dict[str, object]:
        component: dict[str, object] = health_json(daemon)["components"]["media_clock"]
        return component

    with Phone(daemon) as phone:
        calls = [phone.call() for _ in range(10)]
        assert [call.final_status for call in calls] == [200] * 10
        deadline = time.monotonic() + 15
        while media_clock()["healthy"] and time.monotonic() < deadline:
            time.sleep(0.2)
        clock = media_clock()
        assert not clock["healthy"], clock
        assert re.fullmatch(r"utilisation \d+%/0%, lag p90 [\d.]+/40 ms, headroom 0%",
                            str(clock["detail"])), clock
        _assert_options(daemon, 503, "unhealthy")
        _assert_refused(phone.call(), 503, "unhealthy")
        health = voxgatectl(path, "health")
        shown = health.stdout
        assert shown.startswith("UNHEALTHY") and "headroom 0%" in shown, shown
        assert health.returncode == 3, health  # a probe's `voxgatectl health || alert` fires
        assert daemon.events("media_clock_load"), daemon.log_text()
        for call in calls:
            phone.hang_up(call)
        daemon.config_path.write_text(
            text.replace("media_utilisation_max = 0.001\n", "media_utilisation_max = 0.9\n"))
        assert voxgatectl(path, "reload").returncode == 0
        deadline = time.monotonic() + 15
        while not media_clock()["healthy"] and time.monotonic() < deadline:
            time.sleep(0.2)
        assert media_clock()["healthy"], media_clock()
        _assert_options(daemon, 200)
        assert phone.call().final_status == 200
