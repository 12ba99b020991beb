"""The playout queue: agent speech waiting for the transport's 20 ms tick.

Sans-IO and bounded: at most ``capacity_frames`` frames (20 ms of 16-bit mono
PCM each) are held; pushing onto a full queue drops the oldest frame and
counts it in ``dropped_frames``. ``clear()`` is barge-in: queued speech is
discarded at once.
"""

from __future__ import annotations

from collections import deque


class Playout:
    """Bounded FIFO of PCM16 frames (320 bytes each at 8 kHz / 20 ms)."""

    __slots__ = ("_frames", "buffered_bytes", "dropped_frames", "played_frames")

    def __init__(self, capacity_frames: int) -> None:
        if capacity_frames < 1:
            raise ValueError("capacity_frames must be at least 1")
        self._frames: deque[bytes] = deque(maxlen=capacity_frames)
        self.buffered_bytes = 0
        self.dropped_frames = 0
        self.played_frames = 0

    def push(self, pcm: bytes) -> None:
        """Queue one frame; on a full queue the oldest frame is dropped and counted."""
        frames = self._frames
        if len(frames) == frames.maxlen:
            self.buffered_bytes -= len(frames[0])
            self.dropped_frames += 1
        frames.append(pcm)
        self.buffered_bytes += len(pcm)

    def pop(self) -> bytes | None:
        """The next frame to send, or None when nothing is queued."""
        if not self._frames:
            return None
        pcm = self._frames.popleft()
        self.buffered_bytes -= len(pcm)
        self.played_frames += 1
        return pcm

    def clear(self) -> int:
        """Discard everything queued (barge-in); returns how many frames went."""
        n = len(self._frames)
        self._frames.clear()
        self.buffered_bytes = 0
        return n

    def __len__(self) -> int:
        return len(self._frames)
