"""SIP over TCP and TLS against the real daemon (RFC 3261 §18, RFC 5630).

SIPp calls over TCP (``-t t1``) and baresip over TLS with mandatory SRTP (Debian's
SIPp has no TLS), each hearing its echo; raw
sockets try the framing attacks (huge Content-Length, no Content-Length,
endless header section, slow-loris, idle, too many connections) and TLS
garbage: each is refused and counted in
``voxgate_sip_stream_closed_total{transport,reason}`` while the listener keeps
serving and an OPTIONS on a fresh connection still gets its 200.
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
import ssl
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from tests.harness import requires
from tests.harness.audio import SpeechClip
from tests.harness.baresip import assert_echoed, call_and_record
from tests.harness.certs import self_signed
from tests.harness.daemon import (
    Daemon,
    PortRange,
    free_tcp_port,
    free_udp_port,
    invite_request,
    status_code,
)
from tests.harness.sipp import Sipp
from tests.integration.conftest import StartDaemon
from tests.integration.test_control import ctl_json, ctl_ok
from tests.integration.test_metrics import scrape, value
from voxgate.sip.framing import StreamFramer
from voxgate.sip.message import Request, make_response
from voxgate.sip.parser import parse_message_untrusted

ReservePorts = Callable[[int], PortRange]
READ_TIMEOUT_S = 10.0
MESSAGE_TIMEOUT_S = 1.0
IDLE_TIMEOUT_S = 2.0
PER_SOURCE = 4


def options(port: int, call_id: str, transport: str = "TCP", content_length: str = "0",
            body: bytes = b"") -> bytes:
    """An OPTIONS to the daemon's stream port (``content_length`` verbatim, "" = none)."""
    length = f"Content-Length: {content_length}\r\n" if content_length else ""
    return (f"OPTIONS sip:echo@127.0.0.1:{port} SIP/2.0\r\n"
            f"Via: SIP/2.0/{transport} 127.0.0.1:5999;branch=z9hG4bK{call_id}\r\n"
            f"From: <sip:probe@127.0.0.1>;tag={call_id}\r\nTo: <sip:echo@127.0.0.1>\r\n"
            f"Call-ID: {call_id}\r\nCSeq: 1 OPTIONS\r\nMax-Forwards: 70\r\n"
            f"{length}\r\n").encode() + body


@contextlib.contextmanager
def connected(port: int) -> Iterator[socket.socket]:
    with socket.create_connection(("127.0.0.1", port), timeout=READ_TIMEOUT_S) as sock:
        yield sock


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the daemon sends until it closes the connection (bounded by the timeout)."""
    data = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := sock.recv(65_536):
            data += chunk
    return data


def read_message(sock: socket.socket) -> bytes:
    """One whole response (these carry no body)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65_536)
        assert chunk, f"closed after {data!r}"
        data += chunk
    return data


def closed_counts(metrics_port: int, transport: str) -> dict[str, float]:
    text = scrape(metrics_port)
    reasons = ("framing", "message-timeout", "idle-timeout", "limit-source", "tls-handshake",
               "peer-closed")
    return {r: value(text, "voxgate_sip_stream_closed_total", transport=transport,
                     reason=r) or 0.0 for r in reasons}


def wait_connections(metrics_port: int, transport: str, count: int) -> None:
    """Wait (bounded) until the daemon holds ``count`` connections of ``transport``."""
    deadline = time.monotonic() + READ_TIMEOUT_S
    while value(scrape(metrics_port), "voxgate_sip_stream_connections",
                transport=transport) != count:
        assert time.monotonic() < deadline, f"never {count} {transport} connections"
        time.sleep(0.05)


def stream_daemon(start_daemon: StartDaemon, extra: dict[str, str] | None = None,
                  rtp: dict[str, str] | None = None) -> tuple[Daemon, int, int]:
    """A daemon with ``[sip] listen_tcp`` (or what ``extra`` sets) and ``/metrics``:
    (daemon, stream port, metrics port)."""
    port, metrics_port = free_tcp_port(), free_tcp_port()
    sip: dict[str, str | int | float] = {
        "listen": f"127.0.0.1:{free_udp_port()}", "listen_tcp": f"127.0.0.1:{port}",
        "stream_message_timeout_s": MESSAGE_TIMEOUT_S, "stream_idle_timeout_s": IDLE_TIMEOUT_S,
        "stream_max_connections_per_source": PER_SOURCE, "answer_delay_ms": 0}
    sip.update(extra or {})
    overrides: dict[str, dict[str, str | int | float]] = {
        "sip": sip, "metrics": {"listen": f"127.0.0.1:{metrics_port}"}}
    if rtp:
        overrides["rtp"] = dict(rtp)
    daemon = start_daemon(overrides)
    return daemon, port, metrics_port


def sipp_over_tcp(daemon_port: int, workdir: Path, media: PortRange, clip: SpeechClip, *,
                  calls: int = 2, duration_ms: int | None = None) -> Sipp:
    """SIPp echo calls (all at once) over TCP (``-t t1``) to the daemon's stream port,
    each ``duration_ms`` long (default: the clip and a second)."""
    duration_ms = duration_ms or round(clip.duration_s * 1000) + 1000
    return Sipp("uac_echo", ("127.0.0.1", daemon_port), workdir=workdir,
                local_port=free_tcp_port(), media_port=media.first, clip=clip, calls=calls,
                limit=calls, rate=2.0, duration_ms=duration_ms, timeout_s=40.0,
                extra_args=("-t", "t1"))


@requires("sipp")
def test_sipp_echo_calls_over_tcp(start_daemon: StartDaemon, reserve_ports: ReservePorts,
                                  clip: SpeechClip, tmp_path: Path) -> None:
    daemon, port, metrics_port = stream_daemon(start_daemon)
    result = sipp_over_tcp(port, tmp_path / "sipp", reserve_ports(8), clip).run()
    assert result.returncode == 0, result.describe()
    assert (result.successful_calls, result.failed_calls) == (2, 0), result.describe()
    ended = daemon.events("call_end")
    assert len(ended) == 2, ended
    text = scrape(metrics_port)
    assert value(text, "voxgate_sip_stream_connections", transport="TCP") == 0.0


@requires("sipp")
def test_tcp_bad_input_is_refused_counted_and_harmless(
        start_daemon: StartDaemon, reserve_ports: ReservePorts, clip: SpeechClip,
        tmp_path: Path) -> None:
    """The attacks run while a SIPp call over TCP goes on; it ends normally."""
    daemon, port, metrics_port = stream_daemon(start_daemon)
    with sipp_over_tcp(port, tmp_path / "sipp", reserve_ports(4), clip, calls=1,
                       duration_ms=20_000) as sipp:
        daemon.wait_log(r"event=call_start\b", timeout_s=10)
        attack(port, metrics_port, held_already=1)  # SIPp's connection
        result = sipp.wait()
    assert (result.returncode, result.successful_calls) == (0, 1), result.describe()
    assert len(daemon.events("call_end")) == 1

    counts = closed_counts(metrics_port, "TCP")
    assert counts["framing"] >= 3, counts
    assert counts["message-timeout"] >= 1, counts
    assert counts["idle-timeout"] >= 1, counts
    assert counts["limit-source"] >= 1, counts
    assert daemon.alive()
    reasons = {e.get("msg", "") for e in daemon.events("sip_stream_framing")}
    assert any("Content-Length" in r for r in reasons), reasons


def attack(port: int, metrics_port: int, held_already: int) -> None:
    """Keep-alive, framing attacks, slow-loris, idle and too many connections (with
    ``held_already`` open from 127.0.0.1), each checked for its answer and the close;
    then a fresh OPTIONS gets its 200."""

    with connected(port) as sock:  # keep-alive ping → pong (RFC 5626 §4.4.1), then OPTIONS
        sock.sendall(b"\r\n\r\n" + options(port, "ok1"))
        reply = read_message(sock)
        assert reply.startswith(b"\r\n") and status_code(reply.lstrip(b"\r\n")) == 200, reply

    with connected(port) as sock:  # huge Content-Length: 413, closed, no body awaited
        sock.sendall(options(port, "huge", content_length="100000000"))
        assert status_code(read_until_closed(sock)) == 413

    with connected(port) as sock:  # no Content-Length on a stream: 400, closed
        sock.sendall(options(port, "nolen", content_length=""))
        assert status_code(read_until_closed(sock)) == 400

    with connected(port) as sock:  # an endless header section: closed
        sock.sendall(options(port, "endless")[:-2])
        with contextlib.suppress(ConnectionResetError, BrokenPipeError):
            for _ in range(10):
                sock.sendall(b"X-Filler: " + b"a" * 8000 + b"\r\n")
        assert read_until_closed(sock) == b""

    with connected(port) as sock:  # slow-loris: a byte a while, never a whole message
        data = options(port, "slow")
        started = time.monotonic()
        with contextlib.suppress(ConnectionResetError, BrokenPipeError):
            for byte in data[:40]:
                sock.sendall(bytes([byte]))
                time.sleep(0.1)
        assert read_until_closed(sock) == b""
        assert time.monotonic() - started < READ_TIMEOUT_S

    with connected(port) as sock:  # idle: closed after the idle timeout
        assert read_until_closed(sock) == b""

    with contextlib.ExitStack() as stack:  # one connection more than a source may hold
        held = [stack.enter_context(connected(port))
                for _ in range(PER_SOURCE - held_already)]
        time.sleep(0.3)
        with connected(port) as extra:
            assert read_until_closed(extra) == b""
        held[0].sendall(options(port, "held"))  # the held connections still work
        assert status_code(read_message(held[0])) == 200

    wait_connections(metrics_port, "TCP", held_already)
    with connected(port) as sock:  # after all that, the listener still answers
        sock.sendall(options(port, "ok2"))
        assert status_code(read_message(sock)) == 200


def tls_daemon(start_daemon: StartDaemon, tmp_path: Path,
               rtp: dict[str, str] | None = None) -> tuple[Daemon, int, int, Path]:
    """A daemon with ``[sip] listen_tls`` only (no TCP) and ``/metrics``:
    (daemon, TLS port, metrics port, certificate)."""
    cert, key = self_signed(tmp_path)
    port = free_tcp_port()
    daemon, _, metrics_port = stream_daemon(start_daemon, {
        "listen_tcp": "", "listen_tls": f"127.0.0.1:{port}",
        "tls_certificate": str(cert), "tls_private_key": str(key)}, rtp)
    return daemon, port, metrics_port, cert


@requires("openssl")
def test_tls_garbage_refused_and_counted_while_tls_peers_are_served(
        start_daemon: StartDaemon, tmp_path: Path) -> None:
    daemon, port, metrics_port, cert = tls_daemon(start_daemon, tmp_path)
    context = ssl.create_default_context(cafile=str(cert))

    with connected(port) as raw:  # not TLS at all: the handshake fails, closed
        raw.sendall(options(port, "plain", transport="TLS"))
        assert read_until_closed(raw) == b""
    with connected(port) as raw:  # a TLS record header, then junk
        raw.sendall(b"\x16\x03\x01\x02\x00" + os.urandom(512))
        assert read_until_closed(raw) == b""
    with connected(port) as raw:  # a handshake never started: cut after the timeout
        raw.sendall(b"\x16\x03")
        assert read_until_closed(raw) == b""

    with connected(port) as raw, context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        tls.sendall(options(port, "tls1", transport="TLS"))
        reply = read_message(tls)
        assert status_code(reply) == 200, reply
        assert b"SIP/2.0/TLS 127.0.0.1:5999" in reply
        tls.sendall(options(port, "tls2", transport="TLS", content_length=""))
        assert status_code(read_until_closed(tls)) == 400

    assert closed_counts(metrics_port, "TLS")["tls-handshake"] >= 3
    assert daemon.alive()


@requires("baresip", "openssl")
def test_baresip_over_tls_with_mandatory_srtp_hears_its_echo(
        start_daemon: StartDaemon, reserve_ports: ReservePorts, clip: SpeechClip,
        tmp_path: Path) -> None:
    daemon, port, _, cert = tls_daemon(start_daemon, tmp_path, {"srtp": "required"})
    rtp = reserve_ports(10)
    result = call_and_record(
        ("127.0.0.1", port), tmp_path / "baresip", clip=clip, sip_port=free_udp_port(),
        rtp_first=rtp.first, rtp_last=rtp.last, run_s=math.ceil(clip.duration_s) + 6,
        mediaenc="srtp-mand", transport="tls", cafile=cert)
    assert_echoed(result, clip)
    start = daemon.wait_log(r"event=call_start\b", timeout_s=5)
    assert "srtp=AES_CM_128_HMAC_SHA1_80" in start.string, start.string
    assert "sip_transport=TLS" in start.string, start.string
    daemon.wait_log(r"event=call_end\b.*\breason=bye\b", timeout_s=10)


@requires("openssl")
def test_tls_client_ca_requires_a_client_certificate(start_daemon: StartDaemon,
                                                     tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)  # self-signed: it is its own CA
    port = free_tcp_port()
    _, _, metrics_port = stream_daemon(start_daemon, {
        "listen_tcp": "", "listen_tls": f"127.0.0.1:{port}", "tls_certificate": str(cert),
        "tls_private_key": str(key), "tls_client_ca": str(cert)})
    anonymous = ssl.create_default_context(cafile=str(cert))
    # Refused in the handshake; with TLS 1.3 the client learns it at its first read.
    with (connected(port) as raw, contextlib.suppress(ssl.SSLError, ConnectionResetError),
          anonymous.wrap_socket(raw, server_hostname="127.0.0.1") as tls):
        tls.sendall(options(port, "anon", transport="TLS"))
        assert read_until_closed(tls) == b""
    wait_connections(metrics_port, "TLS", 0)
    assert closed_counts(metrics_port, "TLS")["tls-handshake"] == 1

    known = ssl.create_default_context(cafile=str(cert))
    known.load_cert_chain(str(cert), str(key))
    with connected(port) as raw, known.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        tls.sendall(options(port, "known", transport="TLS"))
        assert status_code(read_message(tls)) == 200


def read_sip(sock: socket.socket, framer: StreamFramer) -> bytes:
    """The next whole SIP message on ``sock`` (framed by Content-Length)."""
    while (message := framer.next_message()) is None:
        chunk = sock.recv(65_536)
        assert chunk, "closed"
        framer.receive_data(chunk)
    return message


def test_our_bye_opens_a_connection_when_the_callers_is_gone(
        start_daemon: StartDaemon, reserve_ports: ReservePorts) -> None:
    """The caller closes its connection after the ACK: the daemon's BYE goes to the
    caller's Contact on a connection the daemon opens (RFC 3261 §18.1.1)."""
    daemon, port, metrics_port = stream_daemon(start_daemon)
    media = reserve_ports(2)
    with socket.create_server(("127.0.0.1", 0)) as contact:
        contact.settimeout(READ_TIMEOUT_S)
        contact_port = contact.getsockname()[1]
        invite = invite_request(port, contact_port, "gone1", media.first)
        with connected(port) as caller:
            framer = StreamFramer(65_535)
            caller.sendall(invite.replace(b"SIP/2.0/UDP", b"SIP/2.0/TCP"))
            while status_code(ok := read_sip(caller, framer)) < 200:
                pass
            assert status_code(ok) == 200, ok
            answer = parse_message_untrusted(ok)
            to = answer.headers.get("To") or ""
            caller.sendall(
                f"ACK sip:echo@127.0.0.1:{port} SIP/2.0\r\n"
                f"Via: SIP/2.0/TCP 127.0.0.1:{contact_port};branch=z9hG4bK-ack-gone1\r\n"
                f"From: <sip:probe@127.0.0.1:{contact_port}>;tag=probe-gone1\r\nTo: {to}\r\n"
                "Call-ID: gone1\r\nCSeq: 1 ACK\r\nMax-Forwards: 70\r\n"
                "Content-Length: 0\r\n\r\n".encode())
            time.sleep(0.3)
        wait_connections(metrics_port, "TCP", 0)
        sessions = ctl_json(daemon, "sessions")
        (sid,) = [s["id"] for s in sessions if s["call_id"] == "gone1"]
        ctl_ok(daemon, "hangup", sid)
        opened, _ = contact.accept()
        with opened:
            opened.settimeout(READ_TIMEOUT_S)
            bye = parse_message_untrusted(read_sip(opened, StreamFramer(65_535)))
            assert isinstance(bye, Request) and bye.method == "BYE", bye
            assert (bye.headers.get("Via") or "").startswith(f"SIP/2.0/TCP 127.0.0.1:{port};")
            opened.sendall(make_response(bye, 200).serialize())
            daemon.wait_log(r"event=call_end\b.*\bcall_id=gone1\b", timeout_s=10)
    assert daemon.alive()
