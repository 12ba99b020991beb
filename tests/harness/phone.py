"""A raw-SIP test caller with RTP media: :class:`Phone`, its :class:`Call` and :class:`RtpPeer`.

:class:`Phone` is a UAC on one UDP socket of 127.0.0.1 calling a test daemon.
It builds its own requests (RFC 3261 §8.1.1) and a thread reads every answer:
it ACKs the final responses to INVITEs and re-INVITEs (§17.1.1.3 for non-2xx,
inside the transaction; §13.2.2.4 for 2xx, a new transaction to the remote
target, again for each retransmission) and answers the daemon's BYEs with 200
(§15.1.2).

A call's media is either the phone's shared sink (a bound socket nobody reads,
so the daemon's RTP, if any, is absorbed) or an :class:`RtpPeer` of its own.
One media thread per phone ticks every peer on an absolute 20 ms schedule:
it drains what the daemon sent (kept in a bounded history) and sends one
160-byte µ-law frame (PCMU, payload type 0, RFC 3551 §4.5.14) from the peer's
source, a clip played once (then silence) or looped. A peer can pause and
resume, change its SSRC and move to a new local port; :meth:`Phone.reinvite`
offers its current port with a direction (hold and resume, RFC 3264 §8.4).
"""

from __future__ import annotations

import itertools
import math
import random
import re
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from types import TracebackType

from tests.harness.audio import decode_g711
from tests.harness.daemon import Daemon, status_code

ANSWER_TIMEOUT_S = 5.0
RECEIVE_BUFFER_BYTES = 1 << 20
FRAME_S = 0.020
"""One RTP packet's worth of audio (ptime 20)."""
FRAME_BYTES = 160
"""µ-law bytes in one 20 ms frame at 8 kHz."""
PCMU_PAYLOAD_TYPE = 0
ULAW_SILENCE = b"\xff" * FRAME_BYTES
RTP_HISTORY_PACKETS = 3000
"""Packets a peer remembers each way by default: 60 s of one stream."""
MAX_RTP_DATAGRAM_BYTES = 2048
DIRECTIONS = ("sendrecv", "sendonly", "recvonly", "inactive")

# RTP fixed header (RFC 3550 §5.1): V=2 P X CC | M PT | sequence | timestamp | SSRC.
_RTP_HEADER = struct.Struct("!BBHII")
_RTP_VERSION_2 = 0x80
_MARKER_BIT = 0x80
_HEADER = re.compile(rb"^([A-Za-z-]+)[ \t]*:[ \t]*(.*)$", re.M)
_SDP_CONNECTION = re.compile(rb"^c=IN IP[46] (\S+)", re.M)
_SDP_AUDIO_PORT = re.compile(rb"^m=audio (\d+) ", re.M)
_CALL_NUMBERS = itertools.count(1)


def headers_of(message: bytes) -> dict[str, list[str]]:
    """Lower-case header name → values, in order, from a SIP message's head."""
    head = message.split(b"\r\n\r\n", 1)[0]
    found: dict[str, list[str]] = {}
    for name, value in _HEADER.findall(head):
        found.setdefault(name.decode().lower(), []).append(value.decode().strip())
    return found


def body_of(message: bytes) -> bytes:
    """A SIP message's body (after the blank line), empty when there is none."""
    parts = message.split(b"\r\n\r\n", 1)
    return parts[1] if len(parts) == 2 else b""


def sdp_offer(port: int, *, direction: str = "sendrecv", version: int = 1,
              crypto: str | None = None) -> bytes:
    """An SDP offer (RFC 4566, RFC 3264 §5) of PCMU on 127.0.0.1:``port`` with
    ``a=direction``; with ``crypto`` (an ``a=crypto`` value, RFC 4568) over
    RTP/SAVP instead of RTP/AVP (the phone's media stays plain RTP).

    Raises:
        ValueError: ``direction`` is not one of :data:`DIRECTIONS`.
    """
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, not {direction!r}")
    proto, keys = ("RTP/AVP", "") if crypto is None else ("RTP/SAVP", f"a=crypto:{crypto}\r\n")
    return (
        f"v=0\r\no=probe 1 {version} IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\n"
        f"t=0 0\r\nm=audio {port} {proto} 0\r\na=rtpmap:0 PCMU/8000\r\na={direction}\r\n"
        f"{keys}"
    ).encode()


def sdp_rtp_address(sdp: bytes) -> tuple[str, int] | None:
    """(``c=`` address, first ``m=audio`` port) of an SDP body, or None when either is missing."""
    connection = _SDP_CONNECTION.search(sdp)
    audio = _SDP_AUDIO_PORT.search(sdp)
    if connection is None or audio is None:
        return None
    return connection.group(1).decode(), int(audio.group(1))


def canonical_ulaw(payload: bytes) -> bytes:
    """µ-law with negative zero (0x7F) written as positive zero (0xFF).

    Decoding to PCM and encoding again (the daemon's echo) maps 0x7F to 0xFF
    and leaves every other byte as it was, so canonical payloads compare equal.
    """
    return payload.replace(b"\x7f", b"\xff")


def _bound_udp_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.setblocking(False)
    return sock


@dataclass(frozen=True, slots=True)
class RtpReceived:
    """One RTP packet the daemon sent to a peer.

    ``at`` is the media thread's tick that read it (monotonic seconds, up to
    20 ms late), ``port`` our local port it arrived on, ``source`` where it
    came from.
    """

    at: float
    port: int
    source: tuple[str, int]
    ssrc: int
    sequence: int
    timestamp: int
    payload: bytes


def parse_rtp(data: bytes) -> tuple[int, int, int, bytes] | None:
    """(SSRC, sequence, timestamp, payload) of an RTP datagram (RFC 3550 §5.1), None
    when it is not one."""
    if len(data) < _RTP_HEADER.size:
        return None
    first, _, sequence, timestamp, ssrc = _RTP_HEADER.unpack_from(data)
    if first & 0xC0 != _RTP_VERSION_2:
        return None
    offset = _RTP_HEADER.size + 4 * (first & 0x0F)
    if first & 0x10:  # header extension (§5.3.1): 16-bit profile, 16-bit length in words
        if len(data) < offset + 4:
            return None
        offset += 4 + 4 * struct.unpack_from("!H", data, offset + 2)[0]
    end = len(data) - (data[-1] if first & 0x20 else 0)  # padding (§5.1, P bit)
    if end < offset:
        return None
    return ssrc, sequence, timestamp, data[offset:end]


class RtpPeer:
    """One call's RTP endpoint on 127.0.0.1, ticked by its phone's media thread.

    Every method takes the phone's media lock, so tests call them from their
    own thread. Nothing is sent until :meth:`resume`; the source is silence
    until :meth:`play`. The RTP timestamp advances 160 per 20 ms whether or
    not a packet goes out (a pause shows as a timestamp jump, RFC 3550 §5.1);
    the sequence number advances per packet sent; the marker bit is set on
    the first packet after a start, resume or SSRC change (RFC 3551 §4.1).
    Both histories keep the last ``history_packets`` packets.
    """

    def __init__(self, lock: threading.Lock, *,
                 history_packets: int = RTP_HISTORY_PACKETS) -> None:
        self._lock = lock
        self._sock = _bound_udp_socket()
        self._port: int = self._sock.getsockname()[1]
        self._remote: tuple[str, int] | None = None
        self.ssrc = random.getrandbits(32)
        self._sequence = random.getrandbits(16)
        self._timestamp = random.getrandbits(32)
        self._marker = True
        self._sending = False
        self._source = b""
        self._position = 0
        self._loop = False
        self._received: deque[RtpReceived] = deque(maxlen=history_packets)
        self._sent: deque[tuple[float, int, bytes]] = deque(maxlen=history_packets)
        self.packets_sent = 0
        self.packets_received = 0
        self.send_errors = 0

    @property
    def port(self) -> int:
        """The local UDP port we send from and receive on."""
        return self._port

    @property
    def remote(self) -> tuple[str, int] | None:
        """Where our packets go: the daemon's RTP address from its SDP answer."""
        return self._remote

    @remote.setter
    def remote(self, address: tuple[str, int] | None) -> None:
        with self._lock:
            self._remote = address

    def play(self, ulaw: bytes, *, loop: bool = False) -> None:
        """Send ``ulaw`` (µ-law bytes) from its start: once then silence, or looped.

        Raises:
            ValueError: ``loop`` with fewer than 160 bytes.
        """
        if loop and len(ulaw) < FRAME_BYTES:
            raise ValueError(f"a looped source needs {FRAME_BYTES} bytes or more")
        with self._lock:
            self._source, self._position, self._loop = ulaw, 0, loop

    def resume(self) -> None:
        """Start (or restart) sending at the next tick, marker bit set."""
        with self._lock:
            self._sending = True
            self._marker = True

    def pause(self) -> None:
        """Stop sending from the next tick on (the source position is kept)."""
        with self._lock:
            self._sending = False

    def new_ssrc(self) -> int:
        """Send as a new stream from now on: new SSRC and random sequence; returns the SSRC."""
        with self._lock:
            ssrc = self.ssrc
            while ssrc == self.ssrc:
                ssrc = random.getrandbits(32)
            self.ssrc = ssrc
            self._sequence = random.getrandbits(16)
            self._marker = True
            return ssrc

    def move(self) -> int:
        """Close the socket and bind a new one on another port; returns the new port."""
        with self._lock:
            new = _bound_udp_socket()
            self._sock.close()
            self._sock = new
            self._port = new.getsockname()[1]
            return self._port

    def send_raw(self, datagram: bytes) -> None:
        """Send one datagram of our own making (e.g. RFC 4733 events) from this
        peer's socket, so it comes from the source the daemon latched to."""
        with self._lock:
            if self.remote is not None:
                self._sock.sendto(datagram, self.remote)

    def received(self, since: float = -math.inf) -> list[RtpReceived]:
        """The packets received at or after ``since`` (monotonic seconds), in arrival order."""
        with self._lock:
            return [packet for packet in self._received if packet.at >= since]

    def echoed(self, since: float = -math.inf) -> list[RtpReceived]:
        """Packets received since ``since`` that carry a non-silent frame we sent since then.

        Frames are compared after :func:`canonical_ulaw`; this is the daemon's
        echo of our audio (and nothing else, when the source never repeats a
        frame, see :mod:`tests.harness.audio`).
        """
        with self._lock:
            sent = {payload for at, _, payload in self._sent
                    if at >= since and payload != ULAW_SILENCE}
            return [packet for packet in self._received
                    if packet.at >= since and canonical_ulaw(packet.payload) in sent]

    def echo_delays_frames(self, since: float = -math.inf) -> list[int]:
        """For each echo received since ``since`` (see :meth:`echoed`): how many 20 ms
        frames later the daemon stamped it than we stamped the frame it echoes (RTP
        timestamps, so the figure is free of both sides' scheduling). The two
        timestamp bases differ by a constant: compare delays, not their values."""
        with self._lock:
            stamped = {payload: timestamp for _, timestamp, payload in self._sent
                       if payload != ULAW_SILENCE}
            return [((packet.timestamp - stamped[echo]) & 0xFFFFFFFF) // FRAME_BYTES
                    for packet in self._received
                    if packet.at >= since
                    and (echo := canonical_ulaw(packet.payload)) in stamped]

    def audio(self, since: float = -math.inf) -> bytes:
        """The PCMU payloads received since ``since``, decoded to 16-bit samples."""
        return decode_g711(b"".join(p.payload for p in self.received(since)), "PCMU")

    def close(self) -> None:
        """Stop sending and close the socket."""
        with self._lock:
            self._sending = False
            self._sock.close()

    def tick(self, now: float, frames_elapsed: int) -> None:
        """Drain the socket, then send one frame if sending. The media thread calls it
        with the lock held, once per tick; ``frames_elapsed`` is 1 unless ticks were late.
        """
        self._drain(now)
        self._timestamp = (self._timestamp + FRAME_BYTES * frames_elapsed) & 0xFFFFFFFF
        remote = self._remote
        if not self._sending or remote is None:
            return
        payload = self._next_frame()
        marker = _MARKER_BIT if self._marker else 0
        header = _RTP_HEADER.pack(_RTP_VERSION_2, marker | PCMU_PAYLOAD_TYPE, self._sequence,
                                  self._timestamp, self.ssrc)
        try:
            self._sock.sendto(header + payload, remote)
        except OSError:
            self.send_errors += 1
            return
        self._marker = False
        self._sequence = (self._sequence + 1) & 0xFFFF
        self._sent.append((now, self._timestamp, canonical_ulaw(payload)))
        self.packets_sent += 1

    def _drain(self, now: float) -> None:
        sock, port = self._sock, self._port
        while True:
            try:
                data, source = sock.recvfrom(MAX_RTP_DATAGRAM_BYTES)
            except OSError:  # BlockingIOError when drained; closed sockets likewise stop here
                return
            parsed = parse_rtp(data)
            if parsed is not None:
                ssrc, sequence, timestamp, payload = parsed
                self._received.append(
                    RtpReceived(now, port, source[:2], ssrc, sequence, timestamp, payload))
                self.packets_received += 1

    def _next_frame(self) -> bytes:
        source, start = self._source, self._position
        end = start + FRAME_BYTES
        if not self._loop:
            self._position = min(end, len(source))
            frame = source[start:end]
            return frame + ULAW_SILENCE[len(frame):]
        if end <= len(source):
            self._position = end % len(source)
            return source[start:end]
        self._position = end - len(source)
        return source[start:] + source[:self._position]


@dataclass
class Call:
    """One INVITE placed by a :class:`Phone` and what came back for it."""

    call_id: str
    user: str
    request_uri: str
    media: RtpPeer | None = None
    """The call's own RTP endpoint, or None for the phone's shared sink."""
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
    bye: bytes | None = None
    """The first BYE the daemon sent in this call."""
    bye_at: float | None = None
    cseq: int = 1
    """The last CSeq number we used in the dialog (RFC 3261 §12.2.1.1)."""
    sdp_version: int = 1
    crypto: str | None = None
    """The ``a=crypto`` value the INVITE offered and re-INVITEs offer (None: plain RTP/AVP)."""
    reinvite_finals: dict[int, bytes] = field(default_factory=dict)
    """CSeq number of each re-INVITE → its first final response."""

    @property
    def final_status(self) -> int | None:
        """Status of the first final response, or None while unanswered."""
        return None if self.final is None else status_code(self.final)

    def header(self, name: str) -> str | None:
        """The first value of ``name`` in the final response."""
        values = headers_of(self.final or b"").get(name.lower())
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
        # Offered by calls without an RtpPeer; bound so that the daemon's RTP is absorbed.
        self._sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sink.bind(("127.0.0.1", 0))
        self._calls: dict[str, Call] = {}
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._receive, daemon=True)
        self._thread.start()
        self._media_lock = threading.Lock()
        self._peers: list[RtpPeer] = []
        self._media_thread: threading.Thread | None = None
        self.media_frames_skipped = 0
        """20 ms ticks the media thread was too late for (a busy test machine)."""

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
        if self._media_thread is not None:
            self._media_thread.join(timeout=5)
        for peer in self._peers:
            peer.close()
        self._sock.close()
        self._sink.close()

    # -- media ------------------------------------------------------------------------------

    def rtp_peer(self, *, history_packets: int = RTP_HISTORY_PACKETS) -> RtpPeer:
        """A new RTP endpoint ticked by this phone's media thread (started on first use)."""
        peer = RtpPeer(self._media_lock, history_packets=history_packets)
        with self._media_lock:
            self._peers.append(peer)
            if self._media_thread is None:
                self._media_thread = threading.Thread(target=self._media_loop, daemon=True)
                self._media_thread.start()
        return peer

    def _media_loop(self) -> None:
        next_tick = time.monotonic()
        while not self._closed:
            next_tick += FRAME_S
            delay = next_tick - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            now = time.monotonic()
            late = max(0, int((now - next_tick) / FRAME_S))
            next_tick += FRAME_S * late
            self.media_frames_skipped += late
            with self._media_lock:
                for peer in self._peers:
                    peer.tick(now, 1 + late)

    # -- requests --------------------------------------------------------------------------

    def prepare(
        self,
        user: str = "echo",
        headers: Sequence[tuple[str, str]] = (),
        *,
        media: RtpPeer | None = None,
        direction: str = "sendrecv",
        crypto: str | None = None,
    ) -> tuple[Call, bytes]:
        """A new call to ``sip:user@…`` and its INVITE, not sent.

        The INVITE carries ``headers`` and offers ``media``'s port (the shared
        sink's without it) with ``a=direction`` (and ``crypto``, see :func:`sdp_offer`).
        """
        call_id = f"ph-{self.port}-{next(_CALL_NUMBERS)}"
        uri = f"sip:{user}@127.0.0.1:{self._daemon.sip_port}"
        call = Call(call_id, user, uri, media=media, crypto=crypto)
        media_port = self._sink.getsockname()[1] if media is None else media.port
        invite = self._request("INVITE", call, uri, f"<{uri}>", cseq=1,
                               branch=f"z9hG4bK-{call_id}", extra=headers,
                               body=sdp_offer(media_port, direction=direction, crypto=crypto))
        with self._cond:
            self._calls[call_id] = call
        return call, invite

    def send(self, message: bytes) -> None:
        """One datagram to the daemon's SIP port."""
        self._sock.sendto(message, self._daemon.sip_address)

    def place(self, user: str = "echo", headers: Sequence[tuple[str, str]] = (), *,
              media: RtpPeer | None = None, direction: str = "sendrecv",
              crypto: str | None = None) -> Call:
        """Send an INVITE (see :meth:`prepare`); the answers arrive in the background."""
        call, invite = self.prepare(user, headers, media=media, direction=direction,
                                    crypto=crypto)
        self.send(invite)
        return call

    def call(self, user: str = "echo", headers: Sequence[tuple[str, str]] = (), *,
             media: RtpPeer | None = None, direction: str = "sendrecv",
             crypto: str | None = None) -> Call:
        """Place a call and wait for its final response."""
        call = self.place(user, headers, media=media, direction=direction, crypto=crypto)
        self.wait_final([call])
        return call

    def reinvite(self, call: Call, *, direction: str = "sendrecv",
                 timeout_s: float = ANSWER_TIMEOUT_S) -> bytes:
        """Send a re-INVITE offering the call's current media port with ``a=direction``
        and :attr:`Call.crypto` (RFC 3261 §14.1, RFC 3264 §8); wait for its final
        response and return it.

        The receiving thread ACKs it and, for a 2xx, points the call's
        :class:`RtpPeer` at the address of the SDP answer.
        """
        assert call.to is not None and call.remote_target is not None, call
        with self._cond:
            call.cseq += 1
            call.sdp_version += 1
            cseq, version = call.cseq, call.sdp_version
        port = self._sink.getsockname()[1] if call.media is None else call.media.port
        self.send(self._request("INVITE", call, call.remote_target, call.to, cseq=cseq,
                                branch=_reinvite_branch(call, cseq),
                                body=sdp_offer(port, direction=direction, version=version,
                                               crypto=call.crypto)))
        self.wait(lambda: cseq in call.reinvite_finals,
                  f"final response to re-INVITE {cseq} of {call.call_id}", timeout_s)
        return call.reinvite_finals[cseq]

    def hang_up(self, call: Call) -> None:
        """Send BYE in the call's dialog, wait for its 200 (RFC 3261 §15.1.1) and ``call_end``.

        The daemon answers the BYE before the session has wound down and
        given its admission slot back; ``call_end`` is logged after that.
        """
        assert call.to is not None and call.remote_target is not None, call
        with self._cond:
            call.cseq += 1
            cseq = call.cseq
        self.send(self._request("BYE", call, call.remote_target, call.to, cseq=cseq,
                                branch=f"z9hG4bK-bye-{call.call_id}"))
        self.wait(lambda: call.bye_status is not None, f"the answer to BYE of {call.call_id}")
        assert call.bye_status == 200, call
        self._daemon.wait_log(rf"event=call_end\b.*\bcall_id={re.escape(call.call_id)}\s")

    def cancel(self, call: Call) -> None:
        """Send CANCEL for the call's INVITE (§9.1: same branch, R-URI, From, To, Call-ID)."""
        self.send(self._request("CANCEL", call, call.request_uri, f"<{call.request_uri}>",
                                cseq=1, branch=f"z9hG4bK-{call.call_id}"))

    def _request(self, method: str, call: Call, uri: str, to: str, *, cseq: int, branch: str,
                 extra: Iterable[tuple[str, str]] = (), body: bytes = b"") -> bytes:
        lines = [
            f"{method} {uri} SIP/2.0",
            f"Via: SIP/2.0/UDP 127.0.0.1:{self.port};branch={branch};rport",
            "Max-Forwards: 70",
            f"From: <sip:probe@127.0.0.1:{self.port}>;tag=probe-{call.call_id}",
            f"To: {to}",
            f"Call-ID: {call.call_id}",
            f"CSeq: {cseq} {method}",
        ]
        if method == "INVITE":
            lines.append(f"Contact: <sip:probe@127.0.0.1:{self.port}>")
        lines += [f"{name}: {value}" for name, value in extra]
        if body:
            lines.append("Content-Type: application/sdp")
        lines += [f"Content-Length: {len(body)}", "", ""]
        return "\r\n".join(lines).encode() + body

    # -- waiting ----------------------------------------------------------------------------

    def wait(self, done: Callable[[], bool], what: str,
             timeout_s: float = ANSWER_TIMEOUT_S) -> None:
        """Wait until ``done()`` (checked under the lock at each SIP datagram).

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

    def wait_bye(self, call: Call, timeout_s: float = ANSWER_TIMEOUT_S) -> bytes:
        """Wait for the daemon's BYE in ``call`` and return it."""
        self.wait(lambda: call.bye is not None, f"BYE from the daemon in {call.call_id}",
                  timeout_s)
        assert call.bye is not None
        return call.bye

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
        headers = headers_of(data)
        call = self._calls.get((headers.get("call-id") or [""])[0])
        if call is None:
            return
        status = status_code(data)
        if status < 0:
            if data.startswith(b"BYE "):
                call.byes_received += 1
                if call.bye is None:
                    call.bye, call.bye_at = data, time.monotonic()
                self._sock.sendto(_ok_to(headers), source)
            return
        number, method = _cseq(headers)
        if method == "BYE":
            call.bye_status = status
        elif method == "CANCEL":
            call.cancel_status = status
        elif method == "INVITE" and number == 1:
            call.statuses.append(status)
            if status >= 200:
                self._final(call, data, headers, status)
        elif method == "INVITE" and status >= 200:
            self._reinvite_final(call, number, data, status)

    def _final(self, call: Call, data: bytes, headers: dict[str, list[str]],
               status: int) -> None:
        if call.final is None:
            call.final, call.final_at = data, time.monotonic()
            call.to = headers["to"][0]
            contact = headers.get("contact", [f"<{call.request_uri}>"])[0]
            call.remote_target = contact.strip("<>")
            self._aim_media(call, data, status)
        assert call.to is not None and call.remote_target is not None
        if 200 <= status < 300:  # §13.2.2.4: a new transaction to the remote target
            ack = self._request("ACK", call, call.remote_target, call.to, cseq=1,
                                branch=f"z9hG4bK-ack1-{call.call_id}")
        else:  # §17.1.1.3: part of the INVITE transaction
            ack = self._request("ACK", call, call.request_uri, call.to, cseq=1,
                                branch=f"z9hG4bK-{call.call_id}")
        self.send(ack)

    def _reinvite_final(self, call: Call, cseq: int, data: bytes, status: int) -> None:
        if cseq not in call.reinvite_finals:
            call.reinvite_finals[cseq] = data
            self._aim_media(call, data, status)
        assert call.to is not None and call.remote_target is not None
        branch = (f"z9hG4bK-ack{cseq}-{call.call_id}" if 200 <= status < 300
                  else _reinvite_branch(call, cseq))
        self.send(self._request("ACK", call, call.remote_target, call.to, cseq=cseq,
                                branch=branch))

    @staticmethod
    def _aim_media(call: Call, response: bytes, status: int) -> None:
        if call.media is not None and 200 <= status < 300:
            address = sdp_rtp_address(body_of(response))
            if address is not None:
                call.media.remote = address


def _reinvite_branch(call: Call, cseq: int) -> str:
    return f"z9hG4bK-reinvite{cseq}-{call.call_id}"


def _cseq(headers: dict[str, list[str]]) -> tuple[int, str]:
    """(number, method) of the CSeq header; (0, "?") when it is missing or malformed."""
    parts = (headers.get("cseq") or [""])[0].split()
    if len(parts) != 2 or not parts[0].isdigit():
        return 0, "?"
    return int(parts[0]), parts[1]


def _ok_to(headers: dict[str, list[str]]) -> bytes:
    """200 OK to a request (§8.2.6.2): its Vias, From, To, Call-ID and CSeq copied."""
    lines = ["SIP/2.0 200 OK"]
    lines += [f"Via: {via}" for via in headers.get("via", [])]
    lines += [f"{name}: {headers[name.lower()][0]}" for name in ("From", "To", "Call-ID", "CSeq")]
    return ("\r\n".join([*lines, "Content-Length: 0", "", ""])).encode()


TELEPHONE_EVENT_PT = 101


def offer_telephone_event(invite: bytes) -> bytes:
    """``invite`` whose SDP offer adds RFC 4733 telephone-event (payload type 101)."""
    head, body = invite.split(b"\r\n\r\n", 1)
    body = re.sub(rb"(m=audio \d+ RTP/AVP 0)\r\n", rb"\1 101\r\n", body)
    body += (f"a=rtpmap:{TELEPHONE_EVENT_PT} telephone-event/8000\r\n"
             f"a=fmtp:{TELEPHONE_EVENT_PT} 0-15\r\n").encode()
    head = re.sub(rb"Content-Length: \d+", b"Content-Length: %d" % len(body), head)
    return head + b"\r\n\r\n" + body


def press_keys(peer: RtpPeer, keys: str) -> None:
    """RFC 4733 key presses in the peer's stream (its SSRC, its socket), 100 ms each,
    100 ms apart."""
    assert peer.remote is not None
    sequence = random.getrandbits(16)
    for key in keys:
        event = "0123456789*#".index(key)
        # Each press starts later than the last one (RFC 4733 §2.5.1.2): the clock's.
        timestamp = int(time.monotonic() * 8000) & 0xFFFFFFFF
        for n in range(7):
            end = n >= 4
            duration = min(n + 1, 5) * 160
            header = struct.pack("!BBHII", 0x80, (0x80 if n == 0 else 0) | TELEPHONE_EVENT_PT,
                                 sequence, timestamp, peer.ssrc)
            payload = struct.pack("!BBH", event, (0x80 if end else 0) | 10, duration)
            peer.send_raw(header + payload)
            sequence = (sequence + 1) & 0xFFFF
            time.sleep(0.02)
        time.sleep(0.1)
