"""DTMF key presses from RFC 4733 telephone-event packets; sans-IO.

Payload of one named event (RFC 4733 §2.3)::

     0                   1                   2                   3
     0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
    |     event     |E|R| volume    |          duration             |
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+

One key press is one event: every packet of it carries the same RTP
timestamp (its start, §2.5.1.2); continuation packets grow ``duration``, and
the last one, with E set, is sent three times (§2.5.1.4). A press is reported
once, when its first E packet arrives, or when the next event starts if every
E packet was lost.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

from voxgate.errors import BadPacket, LocalProtocolError
from voxgate.rtp.packet import RtpPacket
from voxgate.rtp.seqnum import uint32_gt

# event (8), E|R|volume (8), duration in RTP timestamp units (16).
_TELEPHONE_EVENT: Final = struct.Struct("!BBH")
TELEPHONE_EVENT_LENGTH: Final = 4
_END_BIT: Final = 0x80
_VOLUME_MASK: Final = 0x3F

DTMF_DIGITS: Final = "0123456789*#ABCD"
"""The DTMF digit of events 0-15 (RFC 4733 §3.2); other events are not DTMF."""


@dataclass(frozen=True, slots=True)
class TelephoneEvent:
    """One decoded telephone-event payload (RFC 4733 §2.3).

    ``volume`` is the power level in -dBm0 (0-63), ``duration`` the length so
    far in RTP timestamp units.
    """

    event: int
    end: bool
    volume: int
    duration: int


@dataclass(frozen=True, slots=True)
class DtmfEvent:
    """One key press: ``digit`` from :data:`DTMF_DIGITS`, its length in ms and
    ``at``, the ``now`` (monotonic seconds) when its first packet arrived."""

    digit: str
    duration_ms: int
    at: float


class DtmfStats:
    """Counters of one :class:`DtmfReceiver`, in events (``stale``: packets)."""

    __slots__ = ("events", "ignored_events", "lost_ends", "stale")

    def __init__(self) -> None:
        self.events = 0
        """Key presses reported."""
        self.ignored_events = 0
        """Events other than DTMF 0-15 (flash, tones...), not reported."""
        self.lost_ends = 0
        """Events that ended without any of their E packets arriving."""
        self.stale = 0
        """Packets of an event older than the current one (reordered), dropped."""


def parse_telephone_event_untrusted(payload: bytes) -> TelephoneEvent:
    """Decode the first event block of a telephone-event payload (RFC 4733 §2.3).

    Raises:
        BadPacket: the payload is shorter than 4 bytes.
    """
    if len(payload) < TELEPHONE_EVENT_LENGTH:
        raise BadPacket(f"telephone-event payload of {len(payload)} bytes, expected 4")
    event, flags, duration = _TELEPHONE_EVENT.unpack_from(payload)
    return TelephoneEvent(event, bool(flags & _END_BIT), flags & _VOLUME_MASK, duration)


class DtmfReceiver:
    """Turns one stream's telephone-event packets into one :class:`DtmfEvent` per press.

    Args:
        clock_rate_hz: the telephone-event RTP clock (8000 for narrowband),
            to turn ``duration`` into milliseconds.
    """

    __slots__ = (
        "_at",
        "_clock_rate_hz",
        "_duration",
        "_event",
        "_reported",
        "_timestamp",
        "stats",
    )

    def __init__(self, clock_rate_hz: int = 8000) -> None:
        if clock_rate_hz <= 0:
            raise LocalProtocolError(f"clock_rate_hz must be positive, got {clock_rate_hz}")
        self._clock_rate_hz = clock_rate_hz
        self._timestamp: int | None = None  # RTP timestamp of the current event
        self._event = 0
        self._duration = 0
        self._at = 0.0
        self._reported = True  # nothing pending
        self.stats = DtmfStats()

    def reset(self) -> None:
        """Forget the current event without reporting it (e.g. the SSRC changed)."""
        self._timestamp = None
        self._reported = True

    def receive(self, packet: RtpPacket, now: float) -> DtmfEvent | None:
        """Take one telephone-event packet; return a press when one is complete.

        Raises:
            BadPacket: the payload is not a telephone event.
        """
        event = parse_telephone_event_untrusted(packet.payload)
        timestamp = packet.timestamp
        if timestamp == self._timestamp:
            if self._reported:
                return None  # a retransmitted E packet
            self._duration = max(self._duration, event.duration)
            return self._report() if event.end else None
        if self._timestamp is not None and not uint32_gt(timestamp, self._timestamp):
            self.stats.stale += 1
            return None
        unfinished = None
        if not self._reported:
            # Every E packet of the previous event was lost: it ends now.
            self.stats.lost_ends += 1
            unfinished = self._report()
        self._begin(timestamp, event, now)
        if unfinished is not None or not event.end:
            # One press per receive(): this packet's E bit is acted on by its retransmission.
            return unfinished
        return self._report()

    def _begin(self, timestamp: int, event: TelephoneEvent, now: float) -> None:
        self._timestamp = timestamp
        self._event = event.event
        self._duration = event.duration
        self._at = now
        self._reported = False

    def _report(self) -> DtmfEvent | None:
        self._reported = True
        if self._event >= len(DTMF_DIGITS):
            self.stats.ignored_events += 1
            return None
        self.stats.events += 1
        duration_ms = self._duration * 1000 // self._clock_rate_hz
        return DtmfEvent(DTMF_DIGITS[self._event], duration_ms, self._at)
