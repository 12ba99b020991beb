"""When the caller's turn ends: endpointing beyond a fixed silence; sans-IO.

The VAD ends a turn after ``[vad] stop_ms`` of non-speech. The local agent
can do better because it knows what the current menu step expects::

    pause begins ─ check_ms ─▶ check: the speech so far against the step's grammar
                                 (grammar path only, in a recogniser worker)
       verdict COMPLETE (a confident, whole, non-digit choice) ─▶ the turn ends now
       verdict INCOMPLETE (in a step taking digits: a digit string,
                          or nothing matched yet: a partial one) ─▶ it waits up to max_ms
       verdict UNSURE (anything else), or none yet            ─▶ [vad] stop_ms

A pause mid-sentence cannot be told from the end of an out-of-grammar
sentence by the step's grammar alone; both keep ``[vad] stop_ms``, so a
no-match is not answered later than before.

An :class:`Endpointer` is asked on every frame of a pause
(:meth:`Endpointer.pause`) and told the check's verdict
(:meth:`Endpointer.checked`), which may come back after the pause is over
(then it is ignored: pauses are told apart by when they began). It never
reads a clock.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Verdict(enum.Enum):
    """What a check of the speech so far found."""

    COMPLETE = "complete"
    """A choice of the step, whole and confident: nothing more is expected."""
    INCOMPLETE = "incomplete"
    """A digit string, whole or not yet: more may come."""
    UNSURE = "unsure"
    """A doubtful match: the default silence decides."""


@dataclass(frozen=True, slots=True)
class PauseAction:
    """What to do in this frame of a pause.

    Attributes:
        check: start a check of the speech so far now (once per pause).
        stop_ms: the silence that ends the turn (None: ``[vad] stop_ms``).
    """

    check: bool = False
    stop_ms: int | None = None


_WAIT = PauseAction()


class Endpointer:
    """One call's endpointing decisions.

    Args:
        check_ms: silence before the speech so far is checked (0: never, the VAD decides).
        max_ms: the silence an incomplete turn waits for.
    """

    __slots__ = ("_applied", "_check_ms", "_checked_at", "_max_ms", "_verdict", "early",
                 "extended")

    def __init__(self, *, check_ms: int, max_ms: int) -> None:
        self._check_ms = check_ms
        self._max_ms = max_ms
        self._checked_at: float | None = None  # paused_at of the pause last checked
        self._verdict: Verdict | None = None
        self._applied = False  # the verdict has acted on its pause (and been counted)
        self.early = 0
        """Turns ended before ``[vad] stop_ms`` (a complete match)."""
        self.extended = 0
        """Pauses given up to ``max_ms`` (an incomplete match)."""

    def pause(self, paused_at: float, now: float) -> PauseAction:
        """The action for a frame at ``now`` of the pause that began at ``paused_at``."""
        if not self._check_ms:
            return _WAIT
        if self._checked_at != paused_at:
            if round((now - paused_at) * 1000) < self._check_ms:  # whole ms: frame times
                return _WAIT
            self._checked_at, self._verdict, self._applied = paused_at, None, False
            return PauseAction(check=True)
        verdict = self._verdict
        if verdict is None or verdict is Verdict.UNSURE:
            return _WAIT
        if not self._applied:
            self._applied = True
            if verdict is Verdict.COMPLETE:
                self.early += 1
            else:
                self.extended += 1
        return PauseAction(stop_ms=0 if verdict is Verdict.COMPLETE else self._max_ms)

    def checked(self, paused_at: float, verdict: Verdict) -> None:
        """The check started in the pause that began at ``paused_at`` found ``verdict``
        (ignored when a later pause has been checked since)."""
        if paused_at == self._checked_at and self._verdict is None:
            self._verdict = verdict
