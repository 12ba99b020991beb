"""One session's RTP state: receive, latch, reorder, DTMF, send (RFC 3550, 4733, 4961); sans-IO.

The transport driver hands every datagram from the session's RTP port to
:meth:`RtpStream.receive_datagram_untrusted`, pops one frame per 20 ms tick
with :meth:`RtpStream.pop_frame`, and sends what :meth:`RtpStream.build_outbound`
returns to :attr:`RtpStream.remote_addr`. Payloads stay encoded (G.711 here);
codecs live in :mod:`voxgate.codec`.

Symmetric RTP (RFC 4961, "latching"): the peer behind a NAT is reached at the
address its packets come from, so ``remote_addr`` follows their source. The
first packet's source is taken at once; after that a packet from another
source is dropped (counted ``foreign_source``) until that source has sent
:data:`PROBATION_PACKETS` valid packets in a row with one SSRC and none came
from the current source meanwhile ("strict RTP"): a NAT rebinding or a moved
phone is followed within 80 ms, while packets spoofed into a live call cannot
redirect its audio. A new SSRC (the peer restarted, a transfer) resets the
jitter buffer and the DTMF receiver.
"""

from __future__ import annotations

from voxgate.errors import BadPacket, LocalProtocolError
from voxgate.rtp.dtmf import DtmfEvent, DtmfReceiver, DtmfStats
from voxgate.rtp.jitter import FrameState, JitterBuffer, JitterStats
from voxgate.rtp.packet import MAX_PAYLOAD_TYPE, RtpPacket, is_rtcp_untrusted, pack_rtp_datagram

PROBATION_PACKETS = 4
"""Consecutive packets a new source must send before media follows it."""


class RtpStreamStats:
    """Counters of one :class:`RtpStream`; ``jitter`` and ``dtmf`` are its parts' counters.

    ``packets_in``/``bytes_in`` count accepted RTP datagrams (audio or
    telephone-event payload type); the other inbound ones are counted only
    by the reason they were dropped.
    """

    __slots__ = (
        "bad_packets",
        "bytes_in",
        "bytes_out",
        "dtmf",
        "foreign_source",
        "jitter",
        "packets_in",
        "packets_out",
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
        self.foreign_source = 0
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
        samples_per_frame: RTP timestamp units per 20 ms frame (160 at 8 kHz).
        jitter_capacity_frames, jitter_prefetch_frames, jitter_max_gap_frames:
            see :class:`~voxgate.rtp.jitter.JitterBuffer`.
        remote_addr: where to send, from SDP; None to learn it from the first packet.

    Raises:
        LocalProtocolError: a payload type outside 0-127 or a bad jitter size.
    """

    __slots__ = (
        "_candidate",
        "_candidate_count",
        "_dtmf",
        "_jitter",
        "_latching",
        "_mark_next",
        "_out_sequence",
        "_out_started",
        "_out_timestamp",
        "_payload_type",
        "_samples_per_frame",
        "_source",
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
        samples_per_frame: int = 160,
        jitter_capacity_frames: int = 10,
        jitter_prefetch_frames: int = 1,
        jitter_max_gap_frames: int = 50,
        remote_addr: tuple[str, int] | None = None,
    ) -> None:
        for pt in (payload_type, telephone_event_pt):
            if pt is not None and not 0 <= pt <= MAX_PAYLOAD_TYPE:
                raise LocalProtocolError(f"RTP payload type {pt} is outside 0-127")
        self._payload_type = payload_type
        self._telephone_event_pt = telephone_event_pt
        self._samples_per_frame = samples_per_frame
        self._jitter = JitterBuffer(
            jitter_capacity_frames, jitter_prefetch_frames, jitter_max_gap_frames
        )
        self._dtmf = DtmfReceiver()
        self.stats = RtpStreamStats(self._jitter.stats, self._dtmf.stats)
        self.ssrc = ssrc
        """Our outbound SSRC."""
        self.remote_ssrc: int | None = None
        """The SSRC of the packets we accept, from the latest valid packet."""
        self.remote_addr = remote_addr
        """Where :meth:`build_outbound` datagrams go; None: do not send."""
        self.last_received_at: float | None = None
        """``now`` of the latest accepted packet, for the media-inactivity deadman."""
        self._latching = True
        self._source: tuple[str, int] | None = None  # the source media is latched to
        self._candidate: tuple[tuple[str, int], int] | None = None  # (source, SSRC) on probation
        self._candidate_count = 0
        self._out_sequence = initial_sequence & 0xFFFF
        self._out_timestamp = initial_timestamp & 0xFFFFFFFF
        self._out_started = False
        self._mark_next = True

    @property
    def jitter_buffer(self) -> JitterBuffer:
        """The inbound jitter buffer (its ``buffered_bytes`` count against the session budget)."""
        return self._jitter

    def set_remote_addr(self, addr: tuple[str, int] | None) -> None:
        """Send to ``addr`` from now on (re-INVITE); None puts the call on hold.

        While on hold nothing is sent and latching is suspended, so packets
        still arriving do not undo the hold; a new address resumes both.
        """
        self.remote_addr = addr
        self._latching = addr is not None
        self._source = addr  # the announced address is trusted at once; others on probation
        self._candidate = None

    def receive_datagram_untrusted(
        self, data: bytes, source: tuple[str, int], now: float
    ) -> DtmfEvent | None:
        """Take one datagram from the RTP port; return a DTMF press when one completes.

        Never raises: unparsable datagrams, RTCP and unknown payload types
        are counted in :attr:`stats` and dropped. Audio goes to the jitter
        buffer, telephone events to the DTMF receiver (RFC 4733).
        """
        stats = self.stats
        if is_rtcp_untrusted(data):
            stats.rtcp_ignored += 1
            return None
        try:
            packet = RtpPacket.parse_untrusted(data)
        except BadPacket:
            stats.bad_packets += 1
            return None
        payload_type = packet.payload_type
        if payload_type != self._payload_type and payload_type != self._telephone_event_pt:
            stats.unknown_payload_type += 1
            return None
        if self._latching and self._source is not None and source != self._source \
                and not self._passes_probation(source, packet.ssrc):
            stats.foreign_source += 1
            return None
        if self._latching:
            self._source = self.remote_addr = source
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
            self._jitter.push(packet)
            return None
        try:
            return self._dtmf.receive(packet, now)
        except BadPacket:
            stats.bad_packets += 1
            return None

    def _passes_probation(self, source: tuple[str, int], ssrc: int) -> bool:
        """Count one more packet from a new ``source``; True once it has proven itself."""
        if self._candidate == (source, ssrc):
            self._candidate_count += 1
        else:
            self._candidate = (source, ssrc)
            self._candidate_count = 1
        return self._candidate_count >= PROBATION_PACKETS

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
