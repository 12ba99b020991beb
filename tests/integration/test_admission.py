"""Admission against the real daemon: burst, tenants, queue, OPTIONS, reload under load.

Calls are placed by :class:`Phone`, a raw-SIP UAC on one UDP socket of
127.0.0.1: it sends INVITEs built by the harness, and a thread reads every
answer, ACKs final responses (RFC 3261 §17.1.1.3 for non-2xx, §13.2.2.4 for
2xx, again for each retransmission) and answers the daemon's BYEs with 200.
No RTP is sent; ``[timers] media_inactivity_s`` is left long enough.
"""

from __future__ import annotations

import itertools
import re
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from types import TracebackType

from tests.harness.daemon import (
    Daemon,
    free_udp_port,
    invite_request,
    options_request,
    status_code,
)
from tests.integration.conftest import StartDaemon
from tests.integration.test_control import control_socket, ctl_json, voxgatectl

ANSWER_TIMEOUT_S = 5.0
RECEIVE_BUFFER_BYTES = 1 << 20
RETRY_AFTER_S = 7
_HEADER = re.compile(rb"^([A-Za-z-]+)[ \t]*:[ \t]*(.*)$", re.M)
_CALL_NUMBERS = itertools.count(1)


def _headers(message: bytes) -> dict[str, list[str]]:
    """Lower-case header name → values, in order, from the message's head."""
    head = message.split(b"\r\n\r\n", 1)[0]
    found: dict[str, list[str]] = {}
    for name, value in _HEADER.findall(head):
        found.setdefault(name.decode().lower(), []).append(value.decode().strip())
    return found


@dataclass
class Call:
    """One INVITE placed by a :class:`Phone` and what came back for it."""

    call_id: str
    user: str
    request_uri: str
    statuses: list[int] = field(default_factory=list)
    """Every response status to the INVITE, retransmissions included, in order."""
    final: bytes | None = None
    final_at: float | None = None
    to: str | None = None
    """The To header of the final response (with the daemon's tag)."""
    remote_target: str | None = None
    bye_status: int | None = None
    cancel_status: int | None = None
    byes_received: int = 0

    @property
    def final_status(self) -> int | None:
        """Status of the first final response, or None while unanswered."""
        return None if self.final is None else status_code(self.final)

    def header(self, name: str) -> str | None:
        """The first value of ``name`` in the final response."""
        values = _headers(self.final or b"").get(name.lower())
        return values[0] if values else None


class Phone:
    """A raw SIP UAC on 127.0.0.1 calling ``daemon``; use as a context manager."""

    def __init__(self, daemon: Daemon) -> None:
        self._daemon = daemon
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER_BYTES)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.settimeout(0.1)
        self.port: int = self._sock.getsockname()[1]
        # Offered as our RTP address; bound so that the daemon's RTP, if any, is absorbed.
        self._media = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._media.bind(("127.0.0.1", 0))
        self._calls: dict[str, Call] = {}
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._receive, daemon=True)
        self._thread.start()

    def __enter__(self) -> Phone:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._closed = True
        self._thread.join(timeout=5)
        self._sock.close()
        self._media.close()

    # -- requests --------------------------------------------------------------------------

    def prepare(self, user: str = "echo", headers: Sequence[tuple[str, str]] = ()) -> tuple[
            Call, bytes]:
        """A new call to ``sip:user@…`` and its INVITE (with ``headers`` added), not sent."""
        call_id = f"adm-{self.port}-{next(_CALL_NUMBERS)}"
        invite = invite_request(self._daemon.sip_port, self.port, call_id,
                                self._media.getsockname()[1])
        invite = invite.replace(b"INVITE sip:echo@", f"INVITE sip:{user}@".encode(), 1)
        extra = "".join(f"{name}: {value}\r\n" for name, value in headers).encode()
        invite = invite.replace(b"Content-Type:", extra + b"Content-Type:", 1)
        call = Call(call_id, user, f"sip:{user}@127.0.0.1:{self._daemon.sip_port}")
        with self._cond:
            self._calls[call_id] = call
        return call, invite

    def send(self, message: bytes) -> None:
        """One datagram to the daemon's SIP port."""
        self._sock.sendto(message, self._daemon.sip_address)

    def place(self, user: str = "echo", headers: Sequence[tuple[str, str]] = ()) -> Call:
        """Send an INVITE to ``sip:user@…``; the answers arrive in the background."""
        call, invite = self.prepare(user, headers)
        self.send(invite)
        return call

    def call(self, user: str = "echo", headers: Sequence[tuple[str, str]] = ()) -> Call:
        """Place a call and wait for its final response."""
        call = self.place(user, headers)
        self.wait_final([call])
        return call

    def hang_up(self, call: Call) -> None:
        """Send BYE in the call's dialog, wait for its 200 (RFC 3261 §15.1.1) and ``call_end``.

        The daemon answers the BYE before the session has wound down and
        given its admission slot back; ``call_end`` is logged after that.
        """
        assert call.to is not None and call.remote_target is not None, call
        self.send(self._in_dialog("BYE", call, call.remote_target, call.to, cseq=2,
                                  branch=f"z9hG4bK-bye-{call.call_id}"))
        self.wait(lambda: call.bye_status is not None, f"the answer to BYE of {call.call_id}")
        assert call.bye_status == 200, call
        self._daemon.wait_log(rf"event=call_end\b.*\bcall_id={re.escape(call.call_id)}\s")

    def cancel(self, call: Call) -> None:
        """Send CANCEL for the call's INVITE (§9.1: same branch, R-URI, From, To, Call-ID)."""
        self.send(self._in_dialog(
            "CANCEL", call, call.request_uri,
            f"<sip:echo@127.0.0.1:{self._daemon.sip_port}>", cseq=1,
            branch=f"z9hG4bK-{call.call_id}"))

    def _in_dialog(self, method: str, call: Call, uri: str, to: str, *, cseq: int,
                   branch: str) -> bytes:
        return (
            f"{method} {uri} SIP/2.0\r\n"
            f"Via: SIP/2.0/UDP 127.0.0.1:{self.port};branch={branch};rport\r\n"
            "Max-Forwards: 70\r\n"
            f"From: <sip:probe@127.0.0.1:{self.port}>;tag=probe-{call.call_id}\r\n"
            f"To: {to}\r\n"
            f"Call-ID: {call.call_id}\r\n"
            f"CSeq: {cseq} {method}\r\n"
            "Content-Length: 0\r\n\r\n"
        ).encode()

    # -- waiting ----------------------------------------------------------------------------

    def wait(self, done: Callable[[], bool], what: str,
             timeout_s: float = ANSWER_TIMEOUT_S) -> None:
        """Wait until ``done()`` (checked under the lock at each datagram).

        Raises:
            AssertionError: naming ``what``, after ``timeout_s``.
        """
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while not done():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"no {what} within {timeout_s} s")
                self._cond.wait(remaining)

    def wait_final(self, calls: Iterable[Call], timeout_s: float = ANSWER_TIMEOUT_S) -> None:
        """Wait until every call in ``calls`` has its final response."""
        pending = list(calls)
        self.wait(lambda: all(c.final is not None for c in pending),
                  f"final response to {len(pending)} INVITEs", timeout_s)

    def wait_status(self, call: Call, status: int) -> None:
        """Wait until the INVITE of ``call`` got a ``status`` response."""
        self.wait(lambda: status in call.statuses, f"{status} to {call.call_id}")

    # -- the receiving thread ------------------------------------------------------------------

    def _receive(self) -> None:
        while not self._closed:
            try:
                data, source = self._sock.recvfrom(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            with self._cond:
                self._handle(data, source)
                self._cond.notify_all()

    def _handle(self, data: bytes, source: tuple[str, int]) -> None:
        headers = _headers(data)
        call = self._calls.get((headers.get("call-id") or [""])[0])
        if call is None:
            return
        status = status_code(data)
        if status < 0:
            if data.startswith(b"BYE "):
                call.byes_received += 1
                self._sock.sendto(_ok_to(data, headers), source)
            return
        method = (headers.get("cseq") or ["0 ?"])[0].split()[-1]
        if method == "BYE":
            call.bye_status = status
        elif method == "CANCEL":
            call.cancel_status = status
        elif method == "INVITE":
            call.statuses.append(status)
            if status >= 200:
                self._final(call, data, headers, status)

    def _final(self, call: Call, data: bytes, headers: dict[str, list[str]],
               status: int) -> None:
        if call.final is None:
            call.final, call.final_at = data, time.monotonic()
            call.to = headers["to"][0]
            contact = headers.get("contact", [f"<{call.request_uri}>"])[0]
            call.remote_target = contact.strip("<>")
        assert call.to is not None and call.remote_target is not None
        if 200 <= status < 300:  # §13.2.2.4: a new transaction to the remote target
            ack = self._in_dialog("ACK", call, call.remote_target, call.to, cseq=1,
                                  branch=f"z9hG4bK-ack-{call.call_id}")
        else:  # §17.1.1.3: part of the INVITE transaction
            ack = self._in_dialog("ACK", call, call.request_uri, call.to, cseq=1,
                                  branch=f"z9hG4bK-{call.call_id}")
        self.send(ack)


def _ok_to(request: bytes, headers: dict[str, list[str]]) -> bytes:
    """200 OK to a request (§8.2.6.2): its Vias, From, To, Call-ID and CSeq copied."""
    lines = ["SIP/2.0 200 OK"]
    lines += [f"Via: {via}" for via in headers.get("via", [])]
    lines += [f"{name}: {headers[name.lower()][0]}" for name in ("From", "To", "Call-ID", "CSeq")]
    return ("\r\n".join([*lines, "Content-Length: 0", "", ""])).encode()


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
                                             f"opt-{next(_CALL_NUMBERS)}"))
    assert answer, "no answer to OPTIONS"
    return status_code(answer[0]), _headers(answer[0])


def _assert_options(daemon: Daemon, status: int, warning: str | None = None) -> None:
    got, headers = _options(daemon)
    assert got == status, (got, headers)
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
    return {"retry_after_s": RETRY_AFTER_S, **keys}


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
