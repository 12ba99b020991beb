"""Network and integrator faults against the real daemon: each one ends or degrades one call
exactly as documented, and a second, clean call stays up through it.

- RTP impaired by :class:`~tests.harness.impair.ImpairProxy` (loss, jitter,
  reordering, duplication towards the daemon): the call stays up, its echo
  still correlates with the clip, the jitter buffer counts concealed frames
  and dropped duplicates (``voxgatectl show``, ``voxgate_rtp_frames_concealed``).
- A caller that never ACKs the 200 OK: the call ends ``ack-timeout`` after
  64·T1 (RFC 3261 §13.3.1.4, Timer H), not before.
- The local agent's webhook hangs, or answers HTML, truncated JSON or 10 MB:
  the menu answers (and, for the hang, the fallback prompt plays first), the
  call goes on (README "The embedded voice agent").
- The post-call webhook hangs: calls are answered meanwhile, and a SIGTERM
  with a call up exits 0 by ``drain_timeout_s`` plus the shutdown grace
  periods (README "Call records, post-call jobs and recordings").

All traffic stays on 127.0.0.1; every wait is bounded.
"""

from __future__ import annotations

import contextlib
import json
import random
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests.harness import requires
from tests.harness.audio import SpeechClip, compare_echo
from tests.harness.daemon import Daemon, invite_request, running_daemon, status_code
from tests.harness.impair import (
    MAX_DELAY_MS,
    Impairment,
    ImpairProxy,
    ImpairSchedule,
    impaired_call,
)
from tests.harness.phone import FRAME_BYTES, Call, Phone, headers_of, press_keys
from tests.integration.conftest import StartDaemon
from tests.integration.test_control import ctl_json, wait_until
from tests.integration.test_local_agent import (
    _call,
    _turns,
    _wait_reply,
    _wait_turns,
    _write_prompt,
)
from tests.integration.test_recovery import (
    ECHO_FRAMES,
    LATE_S,
    hang_up_with_bye,
    live_call,
    metric,
    session_id,
    ulaw_clip,
    wait_echo,
)
from voxgate.postcall import FINAL_FLUSH_S
from voxgate.records import FLUSH_GRACE_S
from voxgate.sip.transaction import TimerConfig
from voxgate.supervisor import SHUTDOWN_GRACE_S

SEED = 4733
RTP_FAULT = Impairment(loss_pct=5.0, jitter_ms=40.0, reorder_pct=5.0, reorder_hold_ms=40.0,
                       duplicate_pct=2.0)
"""Towards the daemon only: the way back is not the daemon's input, so impairing it would
test the test phone (which has no jitter buffer), not the daemon."""
ECHO_TAIL_S = 1.0
"""Waited after the clip was sent, for its echo to come back."""
ACK_TIMEOUT_S = TimerConfig().timeout_s
"""64·T1 with RFC 3261's T1 = 500 ms: 32 s."""
AGENT_RESPONSE_S = 1.5
DRAIN_TIMEOUT_S = 3
POSTCALL_TIMEOUT_S = 600.0
"""The post-call POST's own time: far beyond anything a drain may wait."""
EXIT_GRACE_S = 2 * SHUTDOWN_GRACE_S + FINAL_FLUSH_S + FLUSH_GRACE_S + 2 * LATE_S
"""After the drain deadline: the BYEs' answers, the SIP endpoint's idle wait, the post-call
and records flushes, and a busy machine's lateness."""
HANG_BOUND_S = 120.0
"""Longest a hanging HTTP handler waits before it gives up by itself."""
HUGE_BODY_BYTES = 10 * 1024 * 1024
CHUNK_BYTES = 64 * 1024
WEBHOOK_SAY = "Thank you."
FAULTS = ("hang", "html", "truncated", "huge")
FALLBACK_TEXT = "Please hold on."


# --- a misbehaving HTTP server ---------------------------------------------------------------

@dataclass
class FaultyHttp:
    """An HTTP server on 127.0.0.1 whose answer to each POST ``fault_for(request)`` picks:
    ``"ok"`` (:attr:`ok_reply`), ``"hang"``, ``"html"``, ``"truncated"`` or ``"huge"``."""

    fault_for: Callable[[dict[str, object]], str]
    ok_reply: dict[str, object] = field(default_factory=dict)
    requests: list[dict[str, object]] = field(default_factory=list)
    release: threading.Event = field(default_factory=threading.Event)
    url: str = ""


class _FaultyHandler(BaseHTTPRequestHandler):
    server_state: FaultyHttp

    def do_POST(self) -> None:
        state = self.server_state
        request = json.loads(self.rfile.read(int(self.headers.get("Content-Length", "0"))))
        state.requests.append(request)
        fault = state.fault_for(request)
        self.close_connection = True
        if fault == "hang":
            state.release.wait(HANG_BOUND_S)
            return
        if fault == "huge":
            self._send(200, "application/json", b"", length=HUGE_BODY_BYTES)
            with contextlib.suppress(OSError):  # the daemon stops reading at its bound
                for _ in range(HUGE_BODY_BYTES // CHUNK_BYTES):
                    self.wfile.write(b" " * CHUNK_BYTES)
            return
        bodies = {
            "ok": ("application/json", json.dumps(state.ok_reply).encode()),
            "html": ("text/html", b"<html><body><h1>502 Bad Gateway</h1></body></html>"),
            "truncated": ("application/json", b'{"say": "Your parcel ships tomor'),
        }
        content_type, body = bodies[fault]
        self._send(200, content_type, body)

    def _send(self, status: int, content_type: str, body: bytes, *,
              length: int | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        self.end_headers()
        with contextlib.suppress(OSError):
            self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@contextlib.contextmanager
def faulty_http(state: FaultyHttp) -> Iterator[FaultyHttp]:
    """Serve ``state`` in a thread; on exit release hanging handlers and stop."""
    handler = type("Handler", (_FaultyHandler,), {"server_state": state})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    state.url = f"http://127.0.0.1:{server.server_address[1]}/hook"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        state.release.set()
        server.shutdown()
        server.server_close()


# --- the proxy on its own --------------------------------------------------------------------

def test_impairment_schedule_is_seeded_and_bounded() -> None:
    def fates(seed: int) -> list[list[float]]:
        schedule = ImpairSchedule(RTP_FAULT, random.Random(seed))
        return [schedule.plan(100.0) for _ in range(2000)]

    first, again = fates(SEED), fates(SEED)
    assert first == again
    assert first != fates(SEED + 1)
    copies = [len(plan) for plan in first]
    assert 40 <= copies.count(0) <= 160  # 5 % of 2000 lost
    assert 10 <= copies.count(2) <= 80  # 2 % duplicated
    delays = [due - 100.0 for plan in first for due in plan]
    bound_s = (RTP_FAULT.jitter_ms + RTP_FAULT.reorder_hold_ms) / 1000
    assert all(0.0 <= d <= bound_s for d in delays)
    assert any(d > RTP_FAULT.jitter_ms / 1000 for d in delays)  # some were held to reorder
    with pytest.raises(ValueError, match="loss_pct"):
        Impairment(loss_pct=101)
    with pytest.raises(ValueError, match="jitter_ms"):
        Impairment(jitter_ms=MAX_DELAY_MS + 1)


# --- RTP impairment ----------------------------------------------------------------------------

def test_lossy_jittery_reordered_call_stays_up_and_echoes(
    start_daemon: StartDaemon, clip: SpeechClip
) -> None:
    daemon = start_daemon()
    source = ulaw_clip(clip)
    with Phone(daemon) as phone, ImpairProxy(RTP_FAULT, seed=SEED) as proxy:
        clean_call, clean_peer, clean_sid = live_call(phone, daemon, source)
        peer = phone.rtp_peer()
        peer.play(source)  # once, then silence
        call = impaired_call(phone, peer, proxy)
        assert call.final_status == 200, call.final
        fault_started = time.monotonic()
        peer.resume()
        sid = session_id(daemon, call)
        time.sleep(clip.duration_s + ECHO_TAIL_S)
        received = peer.audio(fault_started)
        echoed_frames = len(peer.echoed(fault_started))
        wait_echo(clean_peer, fault_started, frames=round(clip.duration_s / 0.02 / 2))
        stats = ctl_json(daemon, "show", sid)["stats"]
        clean_stats = ctl_json(daemon, "show", clean_sid)["stats"]
        assert {s["id"]: s["state"] for s in ctl_json(daemon, "sessions")} == {
            sid: "active", clean_sid: "active"}
        hang_up_with_bye(phone, daemon, call, sid)
        since = time.monotonic()
        wait_echo(clean_peer, since)
        hang_up_with_bye(phone, daemon, clean_call, clean_sid)
    sent = proxy.to_daemon_stats
    assert sent.lost > 0 and sent.duplicated > 0 and sent.reordered > 0, sent
    assert sent.overflow == 0 and sent.unrouted == 0, sent
    # Each clip frame the daemon received comes back once (duplicates dropped, lost ones
    # concealed as silence): about 100 - loss_pct % of them, byte for byte.
    clip_frames = len(source) // FRAME_BYTES
    assert 0.85 * clip_frames <= echoed_frames <= clip_frames, (echoed_frames, clip_frames)
    # Still the caller's speech (concealed frames and jitter-buffer growth cost correlation:
    # a clean call scores about 0.9).
    match = compare_echo(received, clip.pcm16)
    assert match.envelope_corr >= 0.5, match
    assert match.overlap_s >= clip.duration_s * 0.7, match
    assert stats["frames_concealed"] > 0, stats
    assert stats["drop_duplicate"] > 0, stats
    assert clean_stats["drop_duplicate"] == 0, clean_stats
    assert metric(daemon, "voxgate_rtp_frames_concealed_total") >= stats["frames_concealed"]


# --- a caller that never ACKs ------------------------------------------------------------------

def test_caller_that_never_acks_is_ended_after_64_t1(
    start_daemon: StartDaemon, clip: SpeechClip
) -> None:
    # This caller sends no RTP either: first_media_s (10 s by default, "no-media") must
    # not end the call before Timer H does.
    daemon = start_daemon({"timers": {"first_media_s": 2 * ACK_TIMEOUT_S}})
    with Phone(daemon) as phone, _udp_socket() as sip, _udp_socket() as media:
        clean_call, clean_peer, clean_sid = live_call(phone, daemon, ulaw_clip(clip))
        call_id = f"no-ack-{random.getrandbits(32):08x}"
        sip_port, media_port = sip.getsockname()[1], media.getsockname()[1]
        sip.sendto(invite_request(daemon.sip_port, sip_port, call_id, media_port),
                   daemon.sip_address)
        oks, byes, first_ok_at = _absorb_until_end(daemon, sip, call_id)
        ended_at = time.monotonic()
        end = next(e for e in daemon.events("call_end") if e["call_id"] == call_id)
        wait_echo(clean_peer, ended_at)
        hang_up_with_bye(phone, daemon, clean_call, clean_sid)
    assert end["reason"] == "ack-timeout", end
    assert ended_at - first_ok_at >= ACK_TIMEOUT_S - 1.0, "gave up before 64·T1"
    # Timer G: 200 OK again at T1, 2·T1, 4·T1 … capped at T2 (§13.3.1.4): 10 within 64·T1.
    assert oks >= 6, oks
    assert byes <= 1, byes


@contextlib.contextmanager
def _udp_socket() -> Iterator[socket.socket]:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.settimeout(0.2)
        yield sock


def _absorb_until_end(daemon: Daemon, sip: socket.socket,
                      call_id: str) -> tuple[int, int, float]:
    """Read what the daemon sends for ``call_id`` (never ACKing) until its ``call_end``;
    returns (200 OKs, BYEs, when the first 200 came)."""
    oks = byes = 0
    first_ok_at = 0.0
    deadline = time.monotonic() + ACK_TIMEOUT_S + 2 * LATE_S + 5.0
    while not any(e.get("call_id") == call_id for e in daemon.events("call_end")):
        assert time.monotonic() < deadline, "no call_end for the call that never ACKed"
        try:
            data = sip.recv(65536)
        except TimeoutError:
            continue
        if headers_of(data).get("call-id") != [call_id]:
            continue
        if status_code(data) == 200:
            oks += 1
            first_ok_at = first_ok_at or time.monotonic()
        elif data.startswith(b"BYE "):
            byes += 1
    return oks, byes, first_ok_at


# --- the local agent's webhook ---------------------------------------------------------------

@dataclass
class LocalAgent:
    daemon: Daemon
    hook: FaultyHttp
    faults: dict[str, str]
    """Call-ID → fault of the webhook for that call's requests; other calls get ``ok``."""


@pytest.fixture(scope="module")
def local_agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalAgent]:
    workdir = tmp_path_factory.mktemp("faulty-webhook")
    fallback = workdir / "hold.wav"
    _write_prompt(fallback, FALLBACK_TEXT)
    faults: dict[str, str] = {}
    state = FaultyHttp(lambda request: faults.get(str(request.get("call")), "ok"),
                       ok_reply={"say": WEBHOOK_SAY, "next": "main"})
    with faulty_http(state) as hook, running_daemon(workdir / "daemon", {
        "agent": {"kind": "local", "fallback_prompt": str(fallback)},
        "agent.webhook": {"url": hook.url},
        "timers": {"agent_response_s": AGENT_RESPONSE_S},
        "rtp": {"jitter_buffer_ms": 100},
    }) as daemon:
        yield LocalAgent(daemon, hook, faults)


@requires("espeak-ng")
@pytest.mark.parametrize("fault", FAULTS)
def test_faulty_agent_webhook_lets_the_menu_answer(local_agent: LocalAgent, fault: str) -> None:
    daemon = local_agent.daemon
    call, clean, sessions = _key_turns_with_a_faulty_webhook(local_agent, fault)
    turns, clean_turns = _turns(daemon, call), _turns(daemon, clean)
    assert [(t["source"], t["next"]) for t in turns[1:]] == [
        ("menu", "account"), ("menu", "more")], turns
    assert all(t.get("integrator_error") for t in turns[1:]), turns
    expected_error = {"hang": "no answer within", "huge": "reply over"}.get(fault, "")
    assert expected_error in turns[1]["integrator_error"], turns[1]
    assert (clean_turns[1]["source"], clean_turns[1]["next"]) == ("webhook", "main"), clean_turns
    assert "integrator_error" not in clean_turns[1], clean_turns
    assert not _fallbacks(daemon, clean.call_id)
    if fault != "hang":  # a garbage answer is refused at once: nothing to fall back from
        assert not _fallbacks(daemon, call.call_id)
    assert sessions == {call.call_id: "active", clean.call_id: "active"}, sessions
    ends = {e["call_id"]: e["reason"] for e in daemon.events("call_end")}
    assert (ends[call.call_id], ends[clean.call_id]) == ("bye", "bye"), ends


@requires("espeak-ng")
def test_hanging_webhook_after_keys_plays_the_fallback_prompt(local_agent: LocalAgent) -> None:
    call, _, _ = _key_turns_with_a_faulty_webhook(local_agent, "hang")
    assert len(_fallbacks(local_agent.daemon, call.call_id)) == 2


def _key_turns_with_a_faulty_webhook(local_agent: LocalAgent,
                                     fault: str) -> tuple[Call, Call, dict[str, str]]:
    """Two calls key "1" (then the faulty one "42#") while the webhook applies ``fault``
    to one of them; both are then hung up. Returns (faulty call, clean call, the
    sessions' states before the hang-up by Call-ID)."""
    daemon = local_agent.daemon
    with Phone(daemon) as phone:
        clean_peer, clean = _call(phone, dtmf=True)
        peer, call = _call(phone, dtmf=True)
        local_agent.faults[call.call_id] = fault
        _wait_reply(peer, call.final_at or 0.0)
        _wait_reply(clean_peer, clean.final_at or 0.0)
        press_keys(peer, "1")
        press_keys(clean_peer, "1")  # while the faulty request is still out, for "hang"
        _wait_turns(daemon, call, 2, timeout_s=AGENT_RESPONSE_S + 10)
        _wait_turns(daemon, clean, 2)
        press_keys(peer, "42#")  # the call goes on: the next step answers too
        _wait_turns(daemon, call, 3, timeout_s=AGENT_RESPONSE_S + 10)
        sessions = {s["call_id"]: s["state"] for s in ctl_json(daemon, "sessions")}
        phone.hang_up(call)
        phone.hang_up(clean)
    return call, clean, sessions


def _fallbacks(daemon: Daemon, call_id: str) -> list[dict[str, str]]:
    return [e for e in daemon.events("agent_fallback") if e["call_id"] == call_id]


# --- the post-call webhook ---------------------------------------------------------------------

def test_hanging_postcall_webhook_holds_up_neither_calls_nor_drain(
    start_daemon: StartDaemon, clip: SpeechClip
) -> None:
    with faulty_http(FaultyHttp(lambda request: "hang")) as hook:
        daemon = start_daemon({
            "postcall": {"webhook": hook.url, "timeout_s": POSTCALL_TIMEOUT_S, "workers": 1},
            "limits": {"drain_timeout_s": DRAIN_TIMEOUT_S},
        })
        with Phone(daemon) as phone:
            clean_call, clean_peer, clean_sid = live_call(phone, daemon, ulaw_clip(clip))
            first = phone.call()
            assert first.final_status == 200, first
            phone.hang_up(first)
            wait_until(lambda: hook.requests, "the post-call POST that hangs")
            since = time.monotonic()
            second = phone.call()  # answered while the delivery hangs
            assert second.final_status == 200, second
            phone.hang_up(second)
            wait_echo(clean_peer, since, ECHO_FRAMES)
            jobs = ctl_json(daemon, "jobs")
            daemon.proc.send_signal(signal.SIGTERM)
            code = daemon.wait_exit(DRAIN_TIMEOUT_S + EXIT_GRACE_S)
            phone.wait_bye(clean_call)
        ends = {e["call_id"]: e["reason"] for e in daemon.events("call_end")}
    assert code == 0
    assert ends == {first.call_id: "bye", second.call_id: "bye",
                    clean_call.call_id: "drain-timeout"}, ends
    assert len(hook.requests) == 1, "one worker: the second job waits behind the hung POST"
    assert jobs["pending"] >= 1, jobs
