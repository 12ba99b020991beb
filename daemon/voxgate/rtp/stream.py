"""One session's RTP state: receive, latch, re-frame, DTMF, send; sans-IO.

RFC 3550 (RTP), RFC 3551 §4.5 (G.711 packetization), RFC 4733 (DTMF),
RFC 4961 (symmetric RTP).

The transport driver hands every datagram from the session's RTP port to
:meth:`RtpStream.receive_datagram_untrusted`, pops one frame per 20 ms tick
with :meth:`RtpStream.pop_frame`, and sends what :meth:`RtpStream.build_outbound`
returns to :attr:`RtpStream.remote_addr`. Payloads stay encoded (G.711 here);
codecs live in :mod:`voxgate.codec`.

Inbound audio of any packetization (RFC 3551 §4.5: a G.711 packet carries any
whole number of samples, ptime 10, 20, 30 ms...) is re-framed by RTP timestamp
in the :class:`~voxgate.rtp.jitter.JitterBuffer`, so :meth:`~RtpStream.pop_frame`
always gives whole frames. A header-only packet carries no audio but counts as
media (keep-alive, latching; counted ``empty_payloads``); one of more than
:data:`MAX_PACKET_FRAMES` frames is dropped (counted ``oversize``).

Where media comes from and goes to (symmetric RTP, RFC 4961, "strict RTP"):

- The stream is *latched* to one source address. When the SDP names a usable
  address (``remote_addr``, not 0.0.0.0/:: or port 0), it is latched there and
  sends there; otherwise it latches to the first valid packet's source.
- Packets from the latched source and from the SDP's address are always
  accepted (the latter moves the latch back to it at once). Packets from any
  other source are dropped (counted ``foreign_source``) and touch neither the
  jitter buffer nor the SSRC, until that source re-latches the stream: the
  latched source has been silent for ``relatch_after_silence_s`` (never heard:
  since the first packet from anyone), and the new source has sent
  :data:`PROBATION_PACKETS` packets in a row with one SSRC (counted
  ``relatches``). A re-INVITE (:meth:`RtpStream.set_remote_addr`) latches the
  new address at once.
- A new SSRC from the latched source (a PBX re-anchoring media, a peer
  restart) resets the jitter buffer and the DTMF receiver.

Trade-offs. While the latched source keeps sending, packets spoofed into the
call, bursts included, can neither redirect its audio nor disturb its buffer;
and a sender left over from a previous process on a reused port cannot keep a
new call from the caller its SDP names: that caller's first packet takes the
latch back. The costs: a NAT rebinding or a moved phone is followed only after
the old source has been silent for ``relatch_after_silence_s`` (that much
audio lost). A PBX behind NAT, which advertises one address and sends from
another, is followed the same way once its advertised address has been silent
that long, so the first 0.5 s of its call are lost (again after a re-INVITE
naming a new address), and it can be kept out by a sender that got in first
(a leftover one, an attacker) as long as that one keeps sending. A source
silent that long (no RTP during silence suppression or hold) can be replaced
by an attacker until the SDP's address sends again or a re-INVITE comes.
"""

from __future__ import annotations

import ipaddress
from typing import Final

from voxgate.errors import BadPacket, LocalProtocolError
from voxgate.pipeline.frames import SAMPLES_PER_FRAME
from voxgate.rtp.dtmf import DtmfEvent, DtmfReceiver, DtmfStats
from voxgate.rtp.jitter import ULAW_SILENCE_BYTE, FrameState, JitterBuffer, JitterStats
from voxgate.rtp.packet import MAX_PAYLOAD_TYPE, RtpPacket, is_rtcp_untrusted, pack_rtp_datagram

PROBATION_PACKETS: Final = 4
"""Consecutive packets with one SSRC a new source must send before media follows it."""

RELATCH_AFTER_SILENCE_S: Final = 0.5
"""Default silence of the latched source before another source may take over."""

MAX_PACKET_FRAMES: Final = 10
"""Longest audio payload accepted, in frames (200 ms); longer ones are dropped."""

Address = tuple[str, int]


_RTCP_CONFLICT_PT_MIN: Final = 64
_RTCP_CONFLICT_PT_MAX: Final = 95
"""RTP payload types that multiplexed RTCP reads as (RFC 5761 §4); never the audio one."""


def _usable(addr: Address | None) -> Address | None:
    """``addr`` with its IP in canonical text (as a socket reports sources), or
    None when media cannot go there: None, an unspecified IP or port 0.

    Raises:
        LocalProtocolError: the host is not an IP literal.
    """
    if addr is None:
        return None
    try:
        ip = ipaddress.ip_address(addr[0])
    except ValueError as exc:
        raise LocalProtocolError(f"RTP address {addr!r} is not an IP literal") from exc
    return None if ip.is_unspecified or addr[1] == 0 else (str(ip), addr[1])


class RtpStreamStats:
    """Counters of one :class:`RtpStream`; ``jitter`` and ``dtmf`` are its parts' counters.

    ``packets_in``/``bytes_in`` count accepted RTP datagrams (audio or
    telephone-event payload type, header-only ones too, also counted in
    ``empty_payloads``); the other inbound ones are counted only by the
    reason they were dropped. ``relatches`` counts moves of the latch to a
    new source by the silence rule.
    """

    __slots__ = (
        "bad_packets",
        "bytes_in",
        "bytes_out",
        "dtmf",
        "empty_payloads",
        "foreign_source",
        "jitter",
        "oversize",
        "packets_in",
        "packets_out",
        "relatches",
        "rtcp_ignored",
        "ssrc_changes",
        "unknown_payload_type",
    )

    def __init__(self, jitter: JitterStats, dtmf: DtmfStats) -> None:
        self.packets_in = 0
        self.packets_out = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.bad_packets = 0
        self.empty_payloads = 0
        self.oversize = 0
        self.foreign_source = 0
        self.relatches = 0
        self.rtcp_ignored = 0
        self.unknown_payload_type = 0
        self.ssrc_changes = 0
        self.jitter = jitter
        self.dtmf = dtmf


class RtpStream:
    """The RTP side of one session: one inbound and one outbound stream.

    Args:
        payload_type: the negotiated audio payload type (0 PCMU, 8 PCMA...),
            used both ways.
        telephone_event_pt: the negotiated RFC 4733 payload type, or None.
        ssrc: our outbound SSRC.
        initial_sequence, initial_timestamp: of our first packet (random, RFC 3550 §5.1).
        samples_per_frame: RTP timestamp units (= G.711 bytes) per 20 ms frame.
        jitter_capacity_frames, jitter_prefetch_frames, jitter_max_gap_frames:
            see :class:`~voxgate.rtp.jitter.JitterBuffer`.
        remote_addr: where to send and whose media to accept, from SDP; None
            (or an unspecified address) to learn it from the first packet.
        relatch_after_silence_s: how long the latched source must have been
            silent before another source may take over (see the module).
        silence_byte: the codec's silent sample, filling lost parts of frames
            (µ-law 0xFF; A-law 0xD5).

    Raises:
        LocalProtocolError: a payload type outside 0-127 (or an audio one in
            RTCP's 64-95), a bad jitter size,
            or a ``remote_addr`` host that is not an IP literal.
    """

    __slots__ = (
        "_advertised",
        "_candidate",
        "_candidate_count",
        "_dtmf",
        "_hold",
        "_jitter",
        "_mark_next",
        "_max_payload_bytes",
        "_out_sequence",
        "_out_started",
        "_out_timestamp",
        "_payload_type",
        "_relatch_after_silence_s",
        "_samples_per_frame",
        "_source",
        "_source_quiet_from",
        "_telephone_event_pt",
        "last_received_at",
        "remote_addr",
        "remote_ssrc",
        "ssrc",
        "stats",
    )

    def __init__(
        self,
        *,
        payload_type: int,
        telephone_event_pt: int | None,
        ssrc: int,
        initial_sequence: int,
        initial_timestamp: int,
        samples_per_frame: int = SAMPLES_PER_FRAME,
        jitter_capacity_frames: int = 10,
        jitter_prefetch_frames: int = 1,
        jitter_max_gap_frames: int = 50,
        remote_addr: Address | None = None,
        relatch_after_silence_s: float = RELATCH_AFTER_SILENCE_S,
        silence_byte: int = ULAW_SILENCE_BYTE,
    ) -> None:
        for pt in (payload_type, telephone_event_pt):
            if pt is not None and not 0 <= pt <= MAX_PAYLOAD_TYPE:
                raise LocalProtocolError(f"RTP payload type {pt} is outside 0-127")
        if _RTCP_CONFLICT_PT_MIN <= payload_type <= _RTCP_CONFLICT_PT_MAX:
            raise LocalProtocolError(f"RTP payload type {payload_type} conflicts with RTCP "
                                     "(RFC 5761 §4: 64-95)")
        self._payload_type = payload_type
        self._telephone_event_pt = telephone_event_pt
        self._samples_per_frame = samples_per_frame
        self._max_payload_bytes = MAX_PACKET_FRAMES * samples_per_frame
        self._jitter = JitterBuffer(
            jitter_capacity_frames, jitter_prefetch_frames, jitter_max_gap_frames,
            samples_per_frame=samples_per_frame, silence_byte=silence_byte,
        )
        self._dtmf = DtmfReceiver()
        self.stats = RtpStreamStats(self._jitter.stats, self._dtmf.stats)
        self.ssrc = ssrc
        """Our outbound SSRC."""
        self.remote_ssrc: int | None = None
        """The SSRC of the packets we accept, from the latest valid packet."""
        advertised = _usable(remote_addr)
        self.remote_addr = advertised
        """Where :meth:`build_outbound` datagrams go; None: do not send."""
        self.last_received_at: float | None = None
        """``now`` of the latest accepted packet, for the media-inactivity deadman."""
        self._relatch_after_silence_s = relatch_after_silence_s
        self._advertised = advertised  # the SDP's address: always accepted
        self._hold = False  # set_remote_addr(None): do not send
        self._source = advertised  # the source media is latched to
        self._source_quiet_from: float | None = None  # see _follows
        self._candidate: tuple[Address, int] | None = None  # (source, SSRC) on probation
        self._candidate_count = 0
        self._out_sequence = initial_sequence & 0xFFFF
        self._out_timestamp = initial_timestamp & 0xFFFFFFFF
        self._out_started = False
        self._mark_next = True

    @property
    def jitter_buffer(self) -> JitterBuffer:
        """The inbound jitter buffer (its ``buffered_bytes`` count against the session budget)."""
        return self._jitter

    def set_remote_addr(self, addr: Address | None) -> None:
        """Send to ``addr`` and latch to it from now on (re-INVITE, RFC 3264 §8).

        None or an unspecified address puts the call on hold: nothing is sent
        and the latch stays where it is, so packets still arriving from the
        latched source play but do not undo the hold. A usable address resumes
        sending; the same address as before keeps the latch (it may have
        followed a NAT), a new one is latched at once.

        Raises:
            LocalProtocolError: the host is not an IP literal.
        """
        usable = _usable(addr)
        self._hold = usable is None
        if usable is not None and usable != self._advertised:
            self._advertised = self._source = usable
            self._source_quiet_from = None
            self._candidate = None
        self.remote_addr = None if self._hold else self._source

    def receive_datagram_untrusted(
        self, data: bytes, source: Address, now: float
    ) -> DtmfEvent | None:
        """Take one datagram from the RTP port; return a DTMF press when one completes.

        ``source`` is the datagram's (host, port), ``now`` in seconds. Never
        raises: unparsable, oversize and foreign-source datagrams, RTCP and
        unknown payload types are counted in :attr:`stats` and dropped. Audio
        goes to the jitter buffer, telephone events to the DTMF receiver
        (RFC 4733).
        """
        stats = self.stats
        # RTCP (RFC 5761 §4) reads as RTP payload type 64-95, which never is the audio
        # one (G.711: 0 or 8): so the common audio packet skips the RTCP test.
        try:
            packet = RtpPacket.parse_untrusted(data)
        except BadPacket:
            if is_rtcp_untrusted(data):
                stats.rtcp_ignored += 1
            else:
                stats.bad_packets += 1
            return None
        payload_type = packet.payload_type
        if payload_type != self._payload_type:
            if is_rtcp_untrusted(data):
                stats.rtcp_ignored += 1
                return None
            if payload_type != self._telephone_event_pt:
                stats.unknown_payload_type += 1
                return None
        if len(packet.payload) > self._max_payload_bytes:
            stats.oversize += 1
            return None
        if source != self._source and not self._follows(source, packet.ssrc, now):
            stats.foreign_source += 1
            return None
        self._source_quiet_from = now
        self._candidate = None
        if packet.ssrc != self.remote_ssrc:
            if self.remote_ssrc is not None:
                stats.ssrc_changes += 1
                self._jitter.reset()
                self._dtmf.reset()
            self.remote_ssrc = packet.ssrc
        self.last_received_at = now
        stats.packets_in += 1
        stats.bytes_in += len(data)
        if payload_type == self._payload_type:
            if packet.payload:
                self._jitter.push(packet)
            else:
                stats.empty_payloads += 1
            return None
        try:
            return self._dtmf.receive(packet, now)
        except BadPacket:
            stats.bad_packets += 1
            return None

    def _follows(self, source: Address, ssrc: int, now: float) -> bool:
        """Whether a valid packet from ``source`` (not the latched one) moves the
        latch there; if so, move it. Counts probation packets."""
        if self._source is not None and source != self._advertised:
            if self._source_quiet_from is None:  # the latched source never spoke
                self._source_quiet_from = now
            if self._candidate == (source, ssrc):
                self._candidate_count += 1
            else:
                self._candidate = (source, ssrc)
                self._candidate_count = 1
            if (
                self._candidate_count < PROBATION_PACKETS
                or now - self._source_quiet_from < self._relatch_after_silence_s
            ):
                return False
            self.stats.relatches += 1
        self._source = source
        if not self._hold:
            self.remote_addr = source
        return True

    def pop_frame(self) -> tuple[FrameState, bytes | None]:
        """Return the next 20 ms of inbound audio (still encoded); see :meth:`JitterBuffer.pop`."""
        return self._jitter.pop()

    def mark_next(self) -> None:
        """Set the marker bit on the next outbound packet (a talkspurt starts, RFC 3551 §4.1)."""
        self._mark_next = True

    def build_outbound(self, payload: bytes, *, frames_elapsed: int = 1) -> bytes:
        """Return the next outbound RTP datagram carrying ``payload`` (one encoded frame).

        The sequence number goes up by one and the timestamp by
        ``samples_per_frame * frames_elapsed`` (more than one frame when the
        sender skipped ticks, RFC 3550 §5.1); the first packet uses the initial
        values. The marker is set on the first packet and after :meth:`mark_next`.

        Raises:
            LocalProtocolError: ``frames_elapsed`` < 1.
        """
        if frames_elapsed < 1:
            raise LocalProtocolError(f"frames_elapsed must be >= 1, got {frames_elapsed}")
        if self._out_started:
            self._out_sequence = (self._out_sequence + 1) & 0xFFFF
            self._out_timestamp = (
                self._out_timestamp + self._samples_per_frame * frames_elapsed
            ) & 0xFFFFFFFF
        else:
            self._out_started = True
        datagram = pack_rtp_datagram(
            self._payload_type,
            self._out_sequence,
            self._out_timestamp,
            self.ssrc,
            payload,
            self._mark_next,
        )
        self._mark_next = False
        stats = self.stats
        stats.packets_out += 1
        stats.bytes_out += len(datagram)
        return datagram
