"""The playout queue: agent speech waiting for the transport's 20 ms tick.

Sans-IO and bounded by the session's memory budget (buffer ``playout``,
``[budget] playout_ms``): pushing past the cap drops the oldest frames and
counts them (``voxgate_budget_drops_total{buffer="playout"}``).

Speech comes as plain frames (:meth:`Playout.push`, e.g. the echo) or as an
*utterance* (:meth:`Playout.say`), whose last frame is tracked: when it has
left the queue (sent, or dropped) the utterance shows up in
:meth:`Playout.take_sent`, and the transport's playback-completion strategy
takes over. :meth:`Playout.clear` is barge-in: queued speech is discarded at
once (not a drop) and the utterances it cut are returned.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import Final

from voxgate.budget import BoundedAudioQueue, SessionBudget
from voxgate.pipeline.frames import FRAME_S

MAX_TRACKED_UTTERANCES: Final = 64


class Playout:
    """FIFO of PCM16 frames (320 bytes each at 8 kHz / 20 ms) held against a budget."""

    __slots__ = ("_budget", "_next_id", "_pushed", "_queue", "_queued", "_sent", "_tracked",
                 "played_frames", "skipped_frames")

    def __init__(self, budget: SessionBudget) -> None:
        self._budget = budget
        self._queue = BoundedAudioQueue(budget, "playout")
        self.played_frames = 0
        self.skipped_frames = 0
        self._pushed = 0  # frames ever queued: the position of the next one
        self._next_id = 1
        self._tracked: deque[tuple[int, int]] = deque()  # (utterance id, last frame position)
        self._sent: list[int] = []
        self._queued: list[tuple[int, float]] = []

    def push(self, pcm: bytes) -> None:
        """Queue one frame; over the cap the oldest frames are dropped and counted."""
        self._pushed += 1
        self._queue.push(pcm)
        if self._tracked:
            self._settle()

    def say(self, frames: tuple[bytes, ...] | list[bytes]) -> int:
        """Queue an utterance (at least one frame); returns its id."""
        if not frames:
            raise ValueError("an utterance needs at least one frame")
        for frame in frames:
            self.push(frame)
        utterance_id = self._track()
        self._settle()
        return utterance_id

    def mark(self) -> int | None:
        """Track the frames queued so far as one utterance (a bot's ``mark``): its id,
        or None when nothing is queued (everything before it has left)."""
        if not self._queue:
            return None
        if self._tracked and self._tracked[-1][1] == self._pushed - 1:
            return self._tracked[-1][0]
        return self._track()

    def _track(self) -> int:
        """A new utterance ending at the last frame queued."""
        utterance_id = self._next_id
        self._next_id += 1
        if len(self._tracked) == MAX_TRACKED_UTTERANCES:
            self._sent.append(self._tracked.popleft()[0])
        self._tracked.append((utterance_id, self._pushed - 1))
        self._queued.append((utterance_id, len(self._queue) * FRAME_S))
        return utterance_id

    def pop(self) -> bytes | None:
        """The next frame to send, or None when nothing is queued."""
        frame = self._queue.pop()
        if frame is not None:
            self.played_frames += 1
            if self._tracked:
                self._settle()
        return frame

    def skip(self, frames: int) -> None:
        """Discard up to ``frames`` frames from the head without sending them: their
        20 ms ticks passed while the loop was late, and sending them later would
        add their length to the call's latency for the rest of the call. Counted
        in ``skipped_frames`` (not a budget drop); utterances they end settle."""
        queue = self._queue
        for _ in range(frames):
            if queue.pop() is None:
                break
            self.skipped_frames += 1
        if self._tracked:
            self._settle()

    def take_queued(self) -> Sequence[tuple[int, float]]:
        """Utterances queued since the last call: (id, seconds until their last frame).

        Asked every tick: when there are none it allocates nothing."""
        queued = self._queued
        if not queued:
            return ()
        self._queued = []
        return queued

    def take_sent(self) -> Sequence[int]:
        """Utterances whose last frame has left the queue since the last call
        (every tick; allocates nothing when there are none)."""
        sent = self._sent
        if not sent:
            return ()
        self._sent = []
        return sent

    def clear(self) -> list[int]:
        """Barge-in: discard everything queued; returns the utterances cut short."""
        self._queue.clear()
        cut = [utterance_id for utterance_id, _ in self._tracked]
        self._tracked.clear()
        return cut

    def _settle(self) -> None:
        head = self._pushed - len(self._queue)  # position of the oldest frame still queued
        tracked = self._tracked
        while tracked and tracked[0][1] < head:
            self._sent.append(tracked.popleft()[0])

    @property
    def next_position(self) -> int:
        """The position of the next frame :meth:`pop` returns (frames are numbered in
        the order they were queued, from 0)."""
        return self._pushed - len(self._queue)

    @property
    def end_position(self) -> int:
        """The position the next frame queued will get."""
        return self._pushed

    @property
    def speaking(self) -> bool:
        """Whether an utterance is queued or being sent."""
        return bool(self._tracked)

    @property
    def buffered_bytes(self) -> int:
        return self._queue.held_bytes

    @property
    def dropped_frames(self) -> int:
        return self._budget.drops_frames["playout"]

    def __len__(self) -> int:
        return len(self._queue)
