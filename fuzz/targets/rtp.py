"""Fuzz targets for RTP (RFC 3550), telephone events (RFC 4733) and the media step.

The error type of every RTP parser is :class:`~voxgate.errors.BadPacket`;
:meth:`~voxgate.rtp.stream.RtpStream.receive_datagram_untrusted` and the media
step behind it document that they never raise on the peer's bytes.
"""

from __future__ import annotations

import os
import socket
from collections import deque
from typing import cast

from fuzz.targets.framing import split_datagrams
from voxgate.codec.g711 import codec_for
from voxgate.config import Config
from voxgate.errors import BadPacket
from voxgate.pipeline.frames import FRAME_MS, FRAME_S
from voxgate.rtp.dtmf import parse_telephone_event_untrusted
from voxgate.rtp.packet import RtpPacket, is_rtcp_untrusted
from voxgate.rtp.stream import RtpStream
from voxgate.session import SessionCore
from voxgate.sip.sdp import negotiate, parse_sdp_untrusted
from voxgate.transports.datagram import SocketDatagrams
from voxgate.transports.rtp_leg import MAX_DATAGRAM_BYTES, RtpLeg, RtpReadiness
from voxgate.transports.rtp_ports import PortPool

Address = tuple[str, int]

_PADDING_OR_EXTENSION_BITS = 0x30
"""P and X of an RTP packet's first byte (RFC 3550 §5.1): without them it round-trips."""

RTP_ADDRESS = "192.0.2.1"
RTP_PORT = 30000
OFFER = (
    b"v=0\r\no=fuzz 1 1 IN IP4 192.0.2.2\r\ns=-\r\nc=IN IP4 192.0.2.2\r\nt=0 0\r\n"
    b"m=audio 40000 RTP/AVP 0 8 101\r\na=rtpmap:101 telephone-event/8000\r\n"
    b"a=fmtp:101 0-16\r\na=ptime:20\r\n"
)
"""The caller's offer: PCMU, PCMA and telephone-event 101 from 192.0.2.2:40000."""
SOURCES: tuple[Address, ...] = (
    ("192.0.2.2", 40000),  # the offer's address
    ("192.0.2.2", 40002),  # same host, other port (a NAT rebinding)
    ("198.51.100.7", 40000),  # a stranger
    ("203.0.113.5", 5004),  # another stranger
)
"""Datagram sources, picked by each datagram's source number."""
FLUSH_TICKS = 16
"""Ticks run after the last datagram: more than the jitter buffer holds."""
LATE_TICKS_FROM = 5
"""A datagram ticks value of 5-7 runs one late step of 2-4 frames (clock overrun)."""


def rtp_packet(data: bytes) -> None:
    """One datagram through ``is_rtcp_untrusted``, ``RtpPacket.parse_untrusted`` and, on
    its payload, ``parse_telephone_event_untrusted``.

    Crash: anything but ``BadPacket``; a packet without padding or extension whose
    ``serialize()`` is not the datagram (RFC 3550 §5.1 round trip).
    """
    is_rtcp_untrusted(data)
    try:
        packet = RtpPacket.parse_untrusted(data)
    except BadPacket:
        return
    repr(packet)
    if not data[0] & _PADDING_OR_EXTENSION_BITS:
        assert packet.serialize() == data, packet
    try:
        parse_telephone_event_untrusted(packet.payload)
    except BadPacket:
        return


class _LoopbackSocket:
    """The socket methods :class:`RtpLeg` and its
    :class:`~voxgate.transports.datagram.SocketDatagrams` call, over an in-memory queue.

    The queue holds at most one input's datagrams
    (:data:`~fuzz.targets.framing.MAX_RECORDS`); the leg drains it every tick.
    Its descriptor is a semaphore eventfd counting the queued datagrams, so the
    leg's :class:`RtpReadiness` sees it readable exactly while one is queued.
    """

    def __init__(self) -> None:
        self.inbound: deque[tuple[bytes, Address]] = deque()
        self.sent = 0
        self._fd = os.eventfd(0, os.EFD_SEMAPHORE | os.EFD_NONBLOCK | os.EFD_CLOEXEC)

    def push(self, data: bytes, source: Address) -> None:
        self.inbound.append((data, source))
        os.eventfd_write(self._fd, 1)

    def fileno(self) -> int:
        return self._fd

    def close(self) -> None:
        os.close(self._fd)

    def getsockname(self) -> Address:
        return RTP_ADDRESS, RTP_PORT

    def recvfrom(self, max_bytes: int) -> tuple[bytes, Address]:
        if not self.inbound:
            raise BlockingIOError
        os.eventfd_read(self._fd)
        data, source = self.inbound.popleft()
        return data[:max_bytes], source

    def sendto(self, data: bytes, address: Address) -> int:
        self.sent += 1
        return len(data)


def rtp_pipeline(data: bytes) -> None:
    """Datagrams into one SIP call's media path: :class:`RtpStream` (latching, SSRC,
    jitter buffer, DTMF) inside the real :class:`RtpLeg` over a loopback socket,
    then ``Pipeline.step`` (G.711 decode, VAD, echo agent, playout, encode) on
    every 20 ms tick, built as ``transports/sip_endpoint.py`` builds a call.

    The first byte's low bit picks PCMA over PCMU; the rest is cut by
    :func:`~fuzz.targets.framing.split_datagrams`. A datagram's ticks run
    before it arrives: 1-4 ticks of one frame, or one late step of 2-4 frames.

    Crash: any exception; a jitter buffer holding more frames than its capacity.
    """
    config = Config()
    preference = ("PCMA",) if data[:1] and data[0] & 1 else ("PCMU",)
    negotiated = negotiate(parse_sdp_untrusted(OFFER), preference=preference)
    codec = codec_for(negotiated.codec.name)
    now = 0.0
    core = SessionCore.build(config, "sip", now)
    capacity_frames = max(2, config.rtp.jitter_buffer_max_ms // FRAME_MS)
    stream = RtpStream(
        payload_type=negotiated.codec.payload_type,
        telephone_event_pt=negotiated.telephone_event_pt,
        ssrc=0x5EED,
        initial_sequence=0,
        initial_timestamp=0,
        jitter_capacity_frames=capacity_frames,
        jitter_prefetch_frames=max(1, config.rtp.jitter_buffer_ms // FRAME_MS),
        remote_addr=negotiated.remote_rtp,
        silence_byte=codec.silence(1)[0],
    )
    sock = _LoopbackSocket()
    as_socket = cast(socket.socket, sock)
    leg = RtpLeg(pool=PortPool(RTP_ADDRESS, RTP_PORT, RTP_PORT), readiness=RtpReadiness(),
                 sock=as_socket, stream=stream, codec=codec,
                 datagrams=SocketDatagrams(as_socket, MAX_DATAGRAM_BYTES),
                 playback=core.pipeline.playback,
                 on_dtmf=core.pipeline.dtmf, budget=core.budget,
                 playback_allowance_s=config.rtp.playback_allowance_ms / 1000)
    for record in split_datagrams(data[1:]):
        if record.ticks >= LATE_TICKS_FROM:
            frames = record.ticks - LATE_TICKS_FROM + 2
            now += frames * FRAME_S
            core.pipeline.step(leg, now, frames)
        else:
            for _ in range(record.ticks):
                now += FRAME_S
                core.pipeline.step(leg, now, 1)
        sock.push(record.payload, SOURCES[record.source])
        assert stream.jitter_buffer.buffered_frames <= capacity_frames
    for _ in range(FLUSH_TICKS):
        now += FRAME_S
        core.pipeline.step(leg, now, 1)
        assert stream.jitter_buffer.buffered_frames <= capacity_frames
    leg.close()  # leaves the readiness check and closes the eventfd
