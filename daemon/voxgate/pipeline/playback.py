"""Playback completion: when has an utterance *really* been played? Sans-IO.

Each transport knows it differently (ARCHITECTURE.md, "Playback completion"):

- SIP/RTP (``paced``): the last packet was sent, plus the far end's jitter
  allowance (``[rtp] playback_allowance_ms``);
- WebSocket media streams (``mark``): the far end echoes the ``mark`` sent
  after the utterance's last chunk;
- ALSA (``drained``): the device's buffer has drained.

The :class:`PlaybackTracker` is the one interface: the pipeline reports when
an utterance starts and when its last frame left the playout queue; the
transport reports its signal; the deadman (``[timers]
playback_deadman_ms``) bounds the wait. Whatever resolves an utterance
first wins, once, and is counted by signal.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

from voxgate.deadman import SessionTimers

DRAINED: Final = "drained"
MARK: Final = "mark"
PACED: Final = "paced"
DEADMAN: Final = "deadman"
CLEARED: Final = "cleared"
"""Barge-in cut the utterance short."""

MAX_PENDING: Final = 64


class PlaybackTracker:
    """Utterances from start to completion for one session.

    ``on_done(utterance_id, signal)`` is called once per utterance.
    """

    def __init__(self, timers: SessionTimers, on_done: Callable[[int, str], None]) -> None:
        self._timers = timers
        self._on_done = on_done
        self._playing: set[int] = set()
        self._paced_due: dict[int, float] = {}
        self.completed: dict[str, int] = {}

    def started(self, utterance_id: int, duration_s: float, now: float) -> None:
        """An utterance of ``duration_s`` began playing: arm its deadman."""
        if len(self._playing) >= MAX_PENDING:
            self.complete(min(self._playing), DEADMAN, now)
        self._playing.add(utterance_id)
        self._timers.playback_started(utterance_id, duration_s, now)

    def sent_paced(self, utterance_id: int, now: float, allowance_s: float) -> None:
        """SIP/RTP: the last frame was sent; complete after the far end's allowance."""
        if utterance_id in self._playing:
            self._paced_due[utterance_id] = now + allowance_s

    def tick(self, now: float) -> None:
        """Complete the paced utterances that are due."""
        if self._paced_due:
            for utterance_id, due in list(self._paced_due.items()):
                if now >= due:
                    self.complete(utterance_id, PACED, now)

    def complete(self, utterance_id: int, signal: str, now: float) -> bool:
        """Resolve ``utterance_id`` by ``signal``; False when it was not playing."""
        if utterance_id not in self._playing:
            return False
        self._playing.discard(utterance_id)
        self._paced_due.pop(utterance_id, None)
        if signal != DEADMAN:
            self._timers.playback_completed(utterance_id, now)
        self.completed[signal] = self.completed.get(signal, 0) + 1
        self._on_done(utterance_id, signal)
        return True

    @property
    def playing(self) -> frozenset[int]:
        return frozenset(self._playing)
