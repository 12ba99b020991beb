"""A fixed-capacity jitter buffer for one RTP audio stream (RFC 3550 §A.8 context).

Packets come in out of order, duplicated, late or not at all; audio goes out
one 20 ms frame per tick. A packet may carry any whole number of samples
(RFC 3551 §4.5: a G.711 packet of 10, 20, 30 ms...), so audio is placed by
RTP *timestamp*, not by sequence number: sample ``n`` of a packet with
timestamp ``ts`` belongs at timestamp ``ts + n`` on a grid of frames of
``samples_per_frame`` samples anchored at the first packet. A 30 ms packet is
split across two frames, two 10 ms packets are joined into one. Timestamps
are compared with the wrap-aware helpers of :mod:`voxgate.rtp.seqnum`.
Payload bytes are samples (G.711: one byte per sample at 8 kHz).

The buffer never holds more than ``capacity_frames`` frames, all within the
``capacity_frames`` frames after the next one to play; whatever it throws
away is counted in :class:`JitterStats`.

Playout states, as :meth:`JitterBuffer.pop` reports them::

    IDLE --(prefetch_frames of samples buffered)--> playing: PLAYED / LOST per pop
    playing --(max_gap_frames LOST in a row: the stream stopped)--> IDLE
    any --(timestamp jump > max_gap_frames: the stream restarted)--> IDLE

A frame only partly received is played with its missing samples set to
``silence_byte`` (counted ``partial``), except once per frame when it is the
newest audio held: its remainder is probably still in flight (the packets
are longer than a frame or straddle frames), so that tick is concealed and
playout slips back one frame (counted ``grown``).
"""

from __future__ import annotations

import enum
from typing import Final

from voxgate.errors import LocalProtocolError
from voxgate.pipeline.frames import SAMPLES_PER_FRAME
from voxgate.rtp.packet import RtpPacket
from voxgate.rtp.seqnum import uint32_add, uint32_diff

SHRINK_AFTER_FRAMES: Final = 50
"""Pops in a row with a surplus frame before the buffer gives back one frame (1 s),
unless the last frame it gave back was needed again soon (:data:`SHRINK_AFTER_MAX_FRAMES`)."""

SHRINK_AFTER_MAX_FRAMES: Final = 800
"""The longest calm (16 s) the buffer waits for before giving back a frame. Each time
delay it gave back is needed again within twice the calm it had waited for (a sender
late every few seconds), it waits twice as long the next time, up to this: each
give-back and re-grow costs the caller a dropped and a concealed frame."""

ULAW_SILENCE_BYTE: Final = 0xFF
"""G.711 µ-law code of digital silence, the default ``silence_byte`` (A-law: 0xD5)."""


class FrameState(enum.Enum):
    """What :meth:`JitterBuffer.pop` returns for one playout tick."""

    PLAYED = "played"
    """The expected frame was there: its payload comes with it."""
    LOST = "lost"
    """The expected frame is missing: the caller conceals it."""
    IDLE = "idle"
    """Not playing: still prefetching, or the stream stopped. Nothing to conceal."""


# The media path reads enum members through these module globals: on Python 3.11
# ``FrameState.PLAYED`` goes through ``EnumType.__getattr__`` (about 130 ns, 14 times
# a global), and it is read several times per call every 20 ms.
PLAYED: Final = FrameState.PLAYED
LOST: Final = FrameState.LOST
IDLE: Final = FrameState.IDLE


class JitterStats:
    """Counters of one jitter buffer: ``received``, ``late``, ``duplicates`` in
    packets; ``played``, ``lost``, ``partial``, ``grown``, ``shrunk``,
    ``overflow`` in frames; ``resets`` in timestamp jumps."""

    __slots__ = ("duplicates", "grown", "late", "lost", "overflow", "partial", "played",
                 "received", "resets", "shrunk")

    def __init__(self) -> None:
        self.grown = 0
        """Times playout slipped back one frame for audio that came just too late."""
        self.shrunk = 0
        """Times a frame was skipped because the buffer held surplus for a while."""
        self.received = 0
        self.played = 0
        self.lost = 0
        self.partial = 0
        """Frames played with some samples missing (set to silence); also in ``played``."""
        self.late = 0
        """Packets (or their heads) dropped because their frames were already played."""
        self.duplicates = 0
        """Packets dropped because they overlap samples already held."""
        self.overflow = 0
        """Frames (or packet heads) dropped to keep within ``capacity_frames``."""
        self.resets = 0


class _PartialFrame:
    """A frame some of whose samples arrived: the samples (silence elsewhere)
    and a bit mask of those present (bit ``i``: sample ``i``)."""

    __slots__ = ("mask", "samples")

    def __init__(self, samples: bytearray) -> None:
        self.samples = samples
        self.mask = 0


class JitterBuffer:
    """Reorders and re-frames one RTP stream's audio into 20 ms frames; sans-IO.

    Args:
        capacity_frames: most frames held at once (>= 1); audio further
            ahead than this skips playout forward, dropping the oldest.
        prefetch_frames: frames' worth of samples buffered before playout
            starts (1..capacity).
        max_gap_frames: a timestamp jump larger than this (either way) resets
            the buffer, and this many LOST frames in a row stop playout (>= 1).
        samples_per_frame: RTP timestamp units (= payload bytes) per frame.
        silence_byte: the codec's code for a silent sample, filling the
            missing part of a partly received frame.

    Raises:
        LocalProtocolError: the sizes are inconsistent.
    """

    __slots__ = (
        "_anchored",
        "_calm_frames",
        "_capacity",
        "_frames",
        "_lost_run",
        "_max_gap",
        "_next_index",
        "_next_timestamp",
        "_playing",
        "_prefetch",
        "_prefetch_bytes",
        "_samples_per_frame",
        "_shrunk_at",
        "_silence",
        "_stalled",
        "_surplus_run",
        "buffered_bytes",
        "stats",
    )

    def __init__(
        self,
        capacity_frames: int,
        prefetch_frames: int,
        max_gap_frames: int,
        *,
        samples_per_frame: int = SAMPLES_PER_FRAME,
        silence_byte: int = ULAW_SILENCE_BYTE,
    ) -> None:
        if capacity_frames < 1 or not 1 <= prefetch_frames <= capacity_frames:
            raise LocalProtocolError(
                f"jitter buffer needs 1 <= prefetch_frames ({prefetch_frames})"
                f" <= capacity_frames ({capacity_frames})"
            )
        if max_gap_frames < 1:
            raise LocalProtocolError(f"max_gap_frames must be >= 1, got {max_gap_frames}")
        if samples_per_frame < 1 or not 0 <= silence_byte <= 0xFF:
            raise LocalProtocolError(
                f"bad samples_per_frame {samples_per_frame} or silence_byte {silence_byte}"
            )
        self._capacity = capacity_frames
        self._prefetch = prefetch_frames
        self._prefetch_bytes = prefetch_frames * samples_per_frame
        self._max_gap = max_gap_frames
        self._samples_per_frame = samples_per_frame
        self._silence = bytes((silence_byte,)) * samples_per_frame
        # Frame index -> its samples; keys stay in [_next_index, _next_index + capacity).
        self._frames: dict[int, bytes | _PartialFrame] = {}
        self._anchored = False  # _next_timestamp is meaningful
        self._next_index = 0  # the frame the next pop() plays
        self._next_timestamp = 0  # RTP timestamp of that frame's first sample
        self._playing = False
        self._lost_run = 0
        self._stalled = False  # the last pop held back a partial frame
        self._surplus_run = 0
        self._calm_frames = SHRINK_AFTER_FRAMES  # surplus pops in a row before a shrink
        self._shrunk_at: int | None = None  # _next_index after the last shrink
        self.buffered_bytes = 0
        """Payload bytes held, for the memory budget (read every tick; do not set it)."""
        self.stats = JitterStats()

    @property
    def buffered_frames(self) -> int:
        """Frames held, whole or partial (at most ``capacity_frames``)."""
        return len(self._frames)

    def reset(self) -> None:
        """Drop everything and wait for a new first packet (e.g. after an SSRC change).

        Not counted in ``stats.resets``, which counts timestamp jumps.
        """
        self._frames.clear()
        self.buffered_bytes = 0
        self._anchored = False
        self._playing = False
        self._lost_run = 0
        self._stalled = False

    def push(self, packet: RtpPacket) -> None:
        """Store one received packet's payload (any length; none stores nothing).

        Drops are counted, never raised: audio for frames already played
        (``late``), overlapping samples already held (``duplicates``), or
        beyond the capacity (``overflow``, dropping the oldest frames).
        """
        self.stats.received += 1
        payload = packet.payload
        if not payload:
            return
        spf = self._samples_per_frame
        if not self._anchored:
            self._anchor(packet.timestamp)
        start = uint32_diff(packet.timestamp, self._next_timestamp)  # samples ahead
        first = start // spf
        if first > self._max_gap or -first > self._max_gap:
            self.stats.resets += 1
            self.reset()
            self._anchor(packet.timestamp)
            start = first = 0
        if start < 0:
            grow = first == -1 and self._playing and self._lost_run > 0
            if (grow or not self._playing) and self._rewind(start, payload):
                # grow: the frame just concealed arrived a moment too late (the
                # sender's phase moved); play it next, one frame more delay, instead
                # of dropping every packet from now on. Else: still prefetching.
                if grow:
                    self._grew()
                start = uint32_diff(packet.timestamp, self._next_timestamp)
            else:
                self.stats.late += 1
                if start + len(payload) <= 0:
                    return
                payload, start = payload[-start:], 0  # keep the part still to be played
        last = (start + len(payload) - 1) // spf
        if last >= self._capacity:
            self._skip(last - self._capacity + 1)
            start -= (last - self._capacity + 1) * spf
            if start < 0:  # the packet itself is longer than the buffer
                self.stats.overflow += 1
                payload = payload[-start:]
                start = 0
        self._store(start, payload)

    def _store(self, start: int, payload: bytes) -> None:
        """Write ``payload`` from ``start`` samples after the next frame, unless
        any of it overlaps samples already held (then a duplicate)."""
        spf = self._samples_per_frame
        frames = self._frames
        if start % spf == 0 and len(payload) == spf:  # the common case: one whole frame
            index = self._next_index + start // spf
            if index in frames:
                self.stats.duplicates += 1
                return
            frames[index] = payload
        else:
            chunks = []
            offset, end = start, start + len(payload)
            while offset < end:
                index, within = divmod(offset, spf)
                count = min(spf - within, end - offset)
                chunks.append((self._next_index + index, within, count, offset - start))
                offset += count
            for index, within, count, _ in chunks:
                held = frames.get(index)
                if isinstance(held, bytes) or (
                    held is not None and held.mask & (((1 << count) - 1) << within)
                ):
                    self.stats.duplicates += 1
                    return
            for index, within, count, at in chunks:
                self._write(index, within, payload[at:at + count])
        self.buffered_bytes += len(payload)
        if not self._playing and self.buffered_bytes >= self._prefetch_bytes:
            self._playing = True

    def _write(self, index: int, within: int, samples: bytes) -> None:
        """Put ``samples`` at sample ``within`` of frame ``index`` (known free)."""
        spf = self._samples_per_frame
        count = len(samples)
        if count == spf:
            self._frames[index] = samples
            return
        held = self._frames.get(index)
        if not isinstance(held, _PartialFrame):
            held = self._frames[index] = _PartialFrame(bytearray(self._silence))
        held.samples[within:within + count] = samples
        held.mask |= ((1 << count) - 1) << within
        if held.mask == (1 << spf) - 1:
            self._frames[index] = bytes(held.samples)

    def pop(self) -> tuple[FrameState, bytes | None]:
        """Return the next 20 ms frame.

        ``(PLAYED, payload)`` with exactly ``samples_per_frame`` bytes,
        ``(LOST, None)`` or ``(IDLE, None)``; see :class:`FrameState`.
        """
        if not self._playing:
            return IDLE, None
        index = self._next_index
        held = self._frames.get(index)
        if isinstance(held, _PartialFrame) and len(self._frames) == 1 and not self._stalled:
            # Nothing newer has come: the rest of this frame is likely in flight.
            self._stalled = True
            self._grew()
            self.stats.lost += 1
            return LOST, None
        self._stalled = False
        # _advance(1) in line (this runs every 20 ms for every call): the 32-bit wrap
        self._next_index = index + 1
        self._next_timestamp = (self._next_timestamp + self._samples_per_frame) & 0xFFFFFFFF
        if held is not None:
            del self._frames[index]
            self.stats.played += 1
            self._lost_run = 0
            if isinstance(held, _PartialFrame):
                self.buffered_bytes -= held.mask.bit_count()
                self.stats.partial += 1
                payload = bytes(held.samples)
            else:
                self.buffered_bytes -= len(held)
                payload = held
            self._shrink_if_surplus()
            return PLAYED, payload
        self.stats.lost += 1
        self._lost_run += 1
        if self._lost_run >= self._max_gap:
            # The stream stopped (hold, silence suppression): re-anchor on the next packet.
            self.reset()
        return LOST, None

    def _shrink_if_surplus(self) -> None:
        """Give back delay: after ``_calm_frames`` pops in a row that each left at
        least ``prefetch_frames`` held (in steady state a pop leaves one fewer: the
        frame it played was part of the prefetch), skip the oldest frame. One frame
        grown for a late packet is so given back after a calm second (longer when
        it was needed again soon after the last time: :meth:`_grew`)."""
        if len(self._frames) < self._prefetch:
            self._surplus_run = 0
            return
        self._surplus_run += 1
        if self._surplus_run >= self._calm_frames:
            self._surplus_run = 0
            self._drop(self._next_index)
            self._advance(1)
            self._shrunk_at = self._next_index
            self.stats.shrunk += 1

    def _grew(self) -> None:
        """Playout slipped back a frame (counted ``grown``). When that comes within
        twice the calm the last shrink waited for, the shrink gave back delay the
        network still needed: the next one waits twice as long (at most
        :data:`SHRINK_AFTER_MAX_FRAMES`). Later than that, one calm second again."""
        self.stats.grown += 1
        shrunk_at = self._shrunk_at
        if shrunk_at is not None and self._next_index - shrunk_at < 2 * self._calm_frames:
            self._calm_frames = min(2 * self._calm_frames, SHRINK_AFTER_MAX_FRAMES)
        else:
            self._calm_frames = SHRINK_AFTER_FRAMES

    def _anchor(self, timestamp: int) -> None:
        self._anchored = True
        self._next_timestamp = timestamp
        self._lost_run = 0

    def _advance(self, frames: int) -> None:
        """Move playout ``frames`` frames on (back when negative)."""
        self._next_index += frames
        self._next_timestamp = uint32_add(self._next_timestamp, frames * self._samples_per_frame)

    def _rewind(self, start: int, payload: bytes) -> bool:
        """Move the next frame back to the one holding sample ``start`` (< 0) if
        everything held and ``payload`` still fits the capacity."""
        spf = self._samples_per_frame
        new_next = self._next_index + start // spf
        newest = max(self._frames, default=new_next)
        newest = max(newest, self._next_index + (start + len(payload) - 1) // spf)
        if newest - new_next >= self._capacity:
            return False
        self._advance(new_next - self._next_index)
        return True

    def _skip(self, frames: int) -> None:
        """Move playout ``frames`` (> 0) frames on, dropping what they held as overflow."""
        for index in [i for i in self._frames if i < self._next_index + frames]:
            self._drop(index)
            self.stats.overflow += 1
        self._advance(frames)

    def _drop(self, index: int) -> None:
        """Forget frame ``index`` if held."""
        held = self._frames.pop(index, None)
        if held is not None:
            self.buffered_bytes -= (
                held.mask.bit_count() if isinstance(held, _PartialFrame) else len(held)
            )
