"""The playout queue: agent speech waiting for the transport's 20 ms tick.

Sans-IO and bounded by the session's memory budget (buffer ``playout``,
``[budget] playout_ms``): pushing past the cap drops the oldest frames and
counts them (``voxgate_budget_drops_total{buffer="playout"}``). ``clear()``
is barge-in: queued speech is discarded at once and is not a drop.
"""

from __future__ import annotations

from voxgate.budget import BoundedAudioQueue, SessionBudget


class Playout:
    """FIFO of PCM16 frames (320 bytes each at 8 kHz / 20 ms) held against a budget."""

    __slots__ = ("_budget", "_queue", "played_frames")

    def __init__(self, budget: SessionBudget) -> None:
        self._budget = budget
        self._queue = BoundedAudioQueue(budget, "playout")
        self.played_frames = 0

    def push(self, pcm: bytes) -> None:
        """Queue one frame; over the cap the oldest frames are dropped and counted."""
        self._queue.push(pcm)

    def pop(self) -> bytes | None:
        """The next frame to send, or None when nothing is queued."""
        frame = self._queue.pop()
        if frame is not None:
            self.played_frames += 1
        return frame

    def clear(self) -> int:
        """Discard everything queued (barge-in); returns how many frames went."""
        return self._queue.clear()

    @property
    def buffered_bytes(self) -> int:
        return self._queue.held_bytes

    @property
    def dropped_frames(self) -> int:
        return self._budget.drops_frames["playout"]

    def __len__(self) -> int:
        return len(self._queue)
