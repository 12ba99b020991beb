"""A fixed-capacity jitter buffer for one RTP audio stream (RFC 3550 §A.8 context).

Packets come in out of order, duplicated, late or not at all; audio goes out
one 20 ms frame per tick. One packet carries one frame, so frames are keyed
by RTP sequence number and compared with the wrap-aware helpers of
:mod:`voxgate.rtp.seqnum`. The buffer never holds more than
``capacity_frames`` payloads; whatever it throws away is counted in
:class:`JitterStats`.

Playout states, as :meth:`JitterBuffer.pop` reports them::

    IDLE --(prefetch_frames buffered)--> playing: PLAYED / LOST per pop
    playing --(max_gap_frames LOST in a row: the stream stopped)--> IDLE
    any --(sequence jump > max_gap_frames: the stream restarted)--> IDLE
"""

from __future__ import annotations

import enum

from voxgate.errors import LocalProtocolError
from voxgate.rtp.packet import RtpPacket
from voxgate.rtp.seqnum import uint16_add, uint16_diff

SHRINK_AFTER_FRAMES = 50
"""Pops in a row with surplus frames before the buffer gives back one frame (1 s)."""


class FrameState(enum.Enum):
    """What :meth:`JitterBuffer.pop` returns for one playout tick."""

    PLAYED = "played"
    """The expected frame was there: its payload comes with it."""
    LOST = "lost"
    """The expected frame is missing: the caller conceals it."""
    IDLE = "idle"
    """Not playing: still prefetching, or the stream stopped. Nothing to conceal."""


class JitterStats:
    """Counters of one jitter buffer, in packets (``played``, ``lost``: frames popped)."""

    __slots__ = ("duplicates", "grown", "late", "lost", "overflow", "played", "received",
                 "resets", "shrunk")

    def __init__(self) -> None:
        self.grown = 0
        """Times playout slipped back one frame for a frame that came just too late."""
        self.shrunk = 0
        """Times a frame was skipped because the buffer held surplus for a while."""
        self.received = 0
        self.played = 0
        self.lost = 0
        self.late = 0
        self.duplicates = 0
        self.overflow = 0
        self.resets = 0


class JitterBuffer:
    """Reorders one RTP stream's packets into 20 ms frames; sans-IO.

    Args:
        capacity_frames: most frames held at once (>= 1); a packet further
            ahead than this skips playout forward, dropping the oldest.
        prefetch_frames: frames buffered before playout starts (1..capacity).
        max_gap_frames: a sequence jump larger than this (either way) resets
            the buffer, and this many LOST frames in a row stop playout (>= 1).

    Raises:
        LocalProtocolError: the sizes are inconsistent.
    """

    __slots__ = (
        "_anchored",
        "_buffered_bytes",
        "_capacity",
        "_frames",
        "_lost_run",
        "_max_gap",
        "_next_sequence",
        "_playing",
        "_prefetch",
        "_surplus_run",
        "stats",
    )

    def __init__(self, capacity_frames: int, prefetch_frames: int, max_gap_frames: int) -> None:
        if capacity_frames < 1 or not 1 <= prefetch_frames <= capacity_frames:
            raise LocalProtocolError(
                f"jitter buffer needs 1 <= prefetch_frames ({prefetch_frames})"
                f" <= capacity_frames ({capacity_frames})"
            )
        if max_gap_frames < 1:
            raise LocalProtocolError(f"max_gap_frames must be >= 1, got {max_gap_frames}")
        self._capacity = capacity_frames
        self._prefetch = prefetch_frames
        self._max_gap = max_gap_frames
        self._frames: dict[int, bytes] = {}
        self._anchored = False  # _next_sequence is meaningful
        self._next_sequence = 0  # the frame the next pop() plays
        self._playing = False
        self._lost_run = 0
        self._surplus_run = 0
        self._buffered_bytes = 0
        self.stats = JitterStats()

    @property
    def buffered_frames(self) -> int:
        """Frames held (at most ``capacity_frames``)."""
        return len(self._frames)

    @property
    def buffered_bytes(self) -> int:
        """Payload bytes held, for the memory budget."""
        return self._buffered_bytes

    def reset(self) -> None:
        """Drop everything and wait for a new first packet (e.g. after an SSRC change).

        Not counted in ``stats.resets``, which counts sequence jumps.
        """
        self._frames.clear()
        self._buffered_bytes = 0
        self._anchored = False
        self._playing = False
        self._lost_run = 0

    def push(self, packet: RtpPacket) -> None:
        """Store one received packet; drops are counted, never raised."""
        self.stats.received += 1
        sequence = packet.sequence
        if not self._anchored:
            self._anchor(sequence)
            ahead = 0
        else:
            ahead = uint16_diff(sequence, self._next_sequence)
        if ahead > self._max_gap or -ahead > self._max_gap:
            self.stats.resets += 1
            self.reset()
            self._anchor(sequence)
        elif ahead < 0:
            if ahead == -1 and self._playing and self._lost_run and self._rewind(sequence):
                # The frame just concealed arrived a moment too late: the sender's
                # phase moved. Play it next (one frame more delay) instead of
                # dropping every packet from now on.
                self.stats.grown += 1
            elif self._playing or not self._rewind(sequence):
                self.stats.late += 1
                return
        elif ahead >= self._capacity:
            self._skip_to(uint16_add(sequence, 1 - self._capacity))
        if sequence in self._frames:
            self.stats.duplicates += 1
            return
        payload = packet.payload
        self._frames[sequence] = payload
        self._buffered_bytes += len(payload)
        if not self._playing and len(self._frames) >= self._prefetch:
            self._playing = True

    def pop(self) -> tuple[FrameState, bytes | None]:
        """Return the next 20 ms frame.

        ``(PLAYED, payload)``, ``(LOST, None)`` or ``(IDLE, None)``; see :class:`FrameState`.
        """
        if not self._playing:
            return FrameState.IDLE, None
        sequence = self._next_sequence
        self._next_sequence = (sequence + 1) & 0xFFFF
        payload = self._frames.pop(sequence, None)
        if payload is not None:
            self._buffered_bytes -= len(payload)
            self.stats.played += 1
            self._lost_run = 0
            self._shrink_if_surplus()
            return FrameState.PLAYED, payload
        self.stats.lost += 1
        self._lost_run += 1
        if self._lost_run >= self._max_gap:
            # The stream stopped (hold, silence suppression): re-anchor on the next packet.
            self.reset()
        return FrameState.LOST, None

    def _shrink_if_surplus(self) -> None:
        """Give back delay: after SHRINK_AFTER_FRAMES pops that each left more than
        one frame beyond the prefetch, skip the oldest frame."""
        if len(self._frames) <= self._prefetch:
            self._surplus_run = 0
            return
        self._surplus_run += 1
        if self._surplus_run >= SHRINK_AFTER_FRAMES:
            self._surplus_run = 0
            sequence = self._next_sequence
            dropped = self._frames.pop(sequence, None)
            if dropped is not None:
                self._buffered_bytes -= len(dropped)
            self._next_sequence = (sequence + 1) & 0xFFFF
            self.stats.shrunk += 1

    def _anchor(self, sequence: int) -> None:
        self._anchored = True
        self._next_sequence = sequence
        self._lost_run = 0

    def _rewind(self, sequence: int) -> bool:
        """While prefetching, move the start back to an earlier (reordered) packet if it fits."""
        if any(uint16_diff(held, sequence) >= self._capacity for held in self._frames):
            return False
        self._next_sequence = sequence
        return True

    def _skip_to(self, sequence: int) -> None:
        """Make ``sequence`` the next frame to play, dropping older frames as overflow."""
        for held in [s for s in self._frames if uint16_diff(s, sequence) < 0]:
            self._buffered_bytes -= len(self._frames.pop(held))
            self.stats.overflow += 1
        self._next_sequence = sequence
