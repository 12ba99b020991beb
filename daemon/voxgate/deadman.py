"""The deadman timers of one session: everything a call waits for is bounded; sans-IO.

A :class:`SessionTimers` holds deadlines only, no task per timer. The driver
asks :meth:`SessionTimers.next_deadline` (monotonic seconds, or None), sleeps
until then or until it is woken, and calls :meth:`SessionTimers.handle_timer`
with the current time (the aioquic ``get_timer()`` / ``handle_timer(now)``
shape). Inputs are plain method calls; :meth:`SessionTimers.on_media` runs on
the media path for every call every 20 ms, so it only stores the time: the
inactivity deadline is computed lazily from the last media time, and the
driver's wake-up at a deadline that media has since moved finds nothing due
(``handle_timer`` returns ``[]``; ask ``next_deadline`` again).

Timers (``[timers]`` in the config, see :class:`DeadmanConfig`)::

    ring-timeout   arrival + ring_timeout_s, while ringing       -> End("ring-timeout")
    max-duration   answer + max_duration_s                       -> End("max-duration")
    first media    answer (or resume) + first_media_s, no media  -> End("no-media")
    inactivity     last media + media_inactivity_s               -> Paused, state "paused"
    recovery       pause + recovery_window_s, media still absent -> End("media-timeout")
    agent response caller turn end + agent_response_s            -> AgentFallback
    playback       start + expected duration + playback_deadman_s -> PlaybackDeadman(id)

The media checks (first media, inactivity, recovery) run only while media is
expected: a hold (the peer's SDP says ``sendonly`` or ``inactive``, RFC 3264
§8.4) suspends them, a resume or a new media address re-bases them at that
time. Media that returns while paused (same or new SSRC, old or new address:
the RTP stream sorts that out; here any valid packet counts) puts the session
back to "active" with its pipeline and agent untouched; so does a hold or a
new media address while paused (:meth:`SessionTimers.media_expected`).

Session states, as the one transition table below has them::

    ringing --answered()--> active --inactivity--> paused --media back--> active
    ringing | active | paused --any End--> ended   (then every call is a no-op)

Deadlines fire at ``deadline <= now``, never before. When several are due in
one :meth:`SessionTimers.handle_timer` call they come out in deadline order; at
equal deadlines ending timers come first (max-duration, ring-timeout,
no-media, media-timeout), then the pause, agent fallback and playback deadmans
(by utterance id), and nothing after an End. A timer event's ``at`` is its
deadline, not the (possibly later) ``now`` it was handled at. An input that arrives after a
deadline passed but before ``handle_timer`` ran for it wins: the deadline is
only acted upon by ``handle_timer``.

Wake the driver after every input except an :meth:`~SessionTimers.on_media`
that returned None: such inputs may move the next deadline earlier.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Final

from voxgate.end_reasons import EndReason
from voxgate.errors import LocalProtocolError

# Session states.
RINGING: Final = "ringing"
ACTIVE: Final = "active"
PAUSED: Final = "paused"
ENDED: Final = "ended"

# End reasons (the call record's reason).
RING_TIMEOUT: Final = "ring-timeout"
MAX_DURATION: Final = "max-duration"
NO_MEDIA: Final = "no-media"
MEDIA_TIMEOUT: Final = "media-timeout"

MAX_PLAYBACKS: Final = 16
"""Default bound on utterances whose completion is awaited at once."""

_TRANSITIONS: Final = {
    # (state, what happened): next state. Ends are not listed: any live state ends.
    (RINGING, "answered"): ACTIVE,
    (ACTIVE, "media-lost"): PAUSED,
    (PAUSED, "media-back"): ACTIVE,
}


class _Timer(enum.IntEnum):
    """The kinds of deadline; the value orders deadlines that fall due together."""

    MAX_DURATION = 0
    RING = 1
    NO_MEDIA = 2
    RECOVERY = 3
    INACTIVITY = 4
    AGENT = 5
    PLAYBACK = 6


_END_REASONS: Final[dict[_Timer, EndReason]] = {
    _Timer.MAX_DURATION: MAX_DURATION,
    _Timer.RING: RING_TIMEOUT,
    _Timer.NO_MEDIA: NO_MEDIA,
    _Timer.RECOVERY: MEDIA_TIMEOUT,
    _Timer.INACTIVITY: MEDIA_TIMEOUT,  # only with recovery_window_s = 0: no pause
}


def _check_s(name: str, value: float, *, zero_ok: bool) -> None:
    if not math.isfinite(value) or value < 0 or (value == 0 and not zero_ok):
        bound = ">= 0" if zero_ok else "> 0"
        raise LocalProtocolError(f"{name} must be finite and {bound}, not {value!r}")


@dataclass(frozen=True, slots=True)
class DeadmanConfig:
    """A session's timer settings, all in seconds (``[timers]``).

    ``first_media_s``, ``media_inactivity_s`` and ``max_duration_s`` must be
    > 0. Zero is allowed and means:

    - ``agent_response_s = 0``: no agent fallback;
    - ``ring_timeout_s = 0``: an unanswered call waits without limit;
    - ``recovery_window_s = 0``: no pause; inactivity ends the call at once;
    - ``playback_deadman_s = 0``: no margin after the expected duration.

    Raises:
        LocalProtocolError: a value negative, not finite, or 0 where not allowed.
    """

    first_media_s: float
    media_inactivity_s: float
    recovery_window_s: float
    agent_response_s: float
    playback_deadman_s: float
    max_duration_s: float
    ring_timeout_s: float

    def __post_init__(self) -> None:
        _check_s("first_media_s", self.first_media_s, zero_ok=False)
        _check_s("media_inactivity_s", self.media_inactivity_s, zero_ok=False)
        _check_s("recovery_window_s", self.recovery_window_s, zero_ok=True)
        _check_s("agent_response_s", self.agent_response_s, zero_ok=True)
        _check_s("playback_deadman_s", self.playback_deadman_s, zero_ok=True)
        _check_s("max_duration_s", self.max_duration_s, zero_ok=False)
        _check_s("ring_timeout_s", self.ring_timeout_s, zero_ok=True)


@dataclass(frozen=True, slots=True)
class Paused:
    """Media stopped for ``media_inactivity_s``; ``at`` is that deadline (seconds)."""

    at: float


@dataclass(frozen=True, slots=True)
class Recovered:
    """The pause ended at ``at`` after ``paused_s`` seconds; the session is active again."""

    at: float
    paused_s: float


@dataclass(frozen=True, slots=True)
class AgentFallback:
    """The agent had not started answering by ``at``: play the fallback prompt."""

    at: float


@dataclass(frozen=True, slots=True)
class PlaybackDeadman:
    """Utterance ``utterance_id`` was due complete at ``at`` and no signal came."""

    at: float
    utterance_id: int


@dataclass(frozen=True, slots=True)
class End:
    """End the session with ``reason`` (one of the module's end reasons) at ``at``."""

    reason: EndReason
    at: float


TimerEvent = Paused | Recovered | AgentFallback | PlaybackDeadman | End


class DeadmanStats:
    """Counters of one session's timers (events, not seconds)."""

    __slots__ = (
        "agent_fallbacks", "pauses", "playback_deadmans", "playbacks_forgotten", "recoveries",
    )

    def __init__(self) -> None:
        self.pauses = 0
        self.recoveries = 0
        self.agent_fallbacks = 0
        self.playback_deadmans = 0
        self.playbacks_forgotten = 0


class SessionTimers:
    """The deadman timers of one session (see the module docstring).

    Created when the call arrives (``now``): state "ringing", ring timer
    armed. At most ``max_playbacks`` utterances are awaited at once; starting
    one more forgets the oldest, counted in ``stats.playbacks_forgotten``.

    Raises:
        LocalProtocolError: ``max_playbacks`` < 1.
    """

    __slots__ = (
        "_agent_at", "_max_at", "_max_playbacks", "_media_at", "_media_expected",
        "_media_seen", "_others_due", "_others_stale", "_paused_at", "_playbacks", "_ring_at",
        "config", "end_reason", "state", "stats",
    )

    def __init__(
        self, config: DeadmanConfig, now: float, *, max_playbacks: int = MAX_PLAYBACKS
    ) -> None:
        if max_playbacks < 1:
            raise LocalProtocolError(f"max_playbacks must be >= 1, not {max_playbacks}")
        self.config = config
        self.state: str = RINGING
        self.end_reason: str | None = None
        self.stats = DeadmanStats()
        self._max_playbacks = max_playbacks
        self._ring_at = now + config.ring_timeout_s if config.ring_timeout_s > 0 else None
        self._max_at: float | None = None
        # Media: the last media time, or the time the first-media wait started.
        self._media_at = now
        self._media_seen = False
        self._media_expected = True
        self._paused_at = now
        self._agent_at: float | None = None
        self._playbacks: dict[int, float] = {}  # utterance id -> due, oldest first
        # The earliest ring, max-duration, agent or playback deadline (math.inf: none),
        # recomputed by next_deadline() after an input changed one of them.
        self._others_due = math.inf
        self._others_stale = True

    def _move(self, what: str) -> None:
        try:
            self.state = _TRANSITIONS[self.state, what]
        except KeyError:
            raise LocalProtocolError(f"{what!r} in state {self.state!r}") from None

    # -- inputs ---------------------------------------------------------------

    def answered(self, now: float) -> None:
        """The call was answered: state "active", first-media and max-duration armed.

        Raises:
            LocalProtocolError: not ringing (answered twice).
        """
        if self.state == ENDED:
            return
        self._move("answered")
        self._ring_at = None
        self._max_at = now + self.config.max_duration_s
        self._others_stale = True
        self._media_at = now
        self._media_seen = False

    def on_media(self, now: float) -> Recovered | None:
        """Valid inbound media arrived at ``now``; O(1), allocates nothing but a Recovered.

        Returns :class:`Recovered` when this packet ended a pause (wake the
        driver: the next deadline moved), else None. Ignored while ringing.
        """
        state = self.state
        if state == ACTIVE:
            self._media_at = now
            self._media_seen = True
            return None
        if state == PAUSED:
            return self._recover(now)
        return None

    def media_expected(self, expected: bool, now: float) -> Recovered | None:
        """Whether the peer sends media (RFC 3264 §8.4 hold: ``inactive``/``recvonly``).

        False suspends the first-media, inactivity and recovery checks; True
        (resume, or a re-INVITE with a new media address) re-bases them at
        ``now``. Either ends a pause: returns :class:`Recovered` then, else None.
        """
        if self.state == ENDED:
            return None
        self._media_expected = expected
        if self.state == PAUSED:
            return self._recover(now)
        self._media_at = now
        return None

    def caller_turn_ended(self, now: float) -> None:
        """The caller stopped speaking: (re-)arm the agent-response timer."""
        if self.state != ENDED and self.config.agent_response_s > 0:
            self._agent_at = now + self.config.agent_response_s
            self._others_stale = True

    def caller_speaking(self, now: float) -> None:
        """The caller speaks again: disarm the agent-response timer."""
        self._agent_at = None
        self._others_stale = True

    def agent_started(self, now: float) -> None:
        """The agent's first audio of its answer went out: disarm the agent-response timer."""
        self._agent_at = None
        self._others_stale = True

    def playback_started(self, utterance_id: int, expected_s: float, now: float) -> None:
        """Utterance ``utterance_id`` started playing; expect completion after ``expected_s``.

        The deadman is due at ``now + expected_s + playback_deadman_s``. A
        known id is restarted; a new id beyond ``max_playbacks`` forgets the
        oldest awaited one (counted in ``stats.playbacks_forgotten``).

        Raises:
            LocalProtocolError: ``expected_s`` negative or not finite.
        """
        if self.state == ENDED:
            return
        _check_s("expected_s", expected_s, zero_ok=True)
        playbacks = self._playbacks
        if playbacks.pop(utterance_id, None) is None and len(playbacks) >= self._max_playbacks:
            del playbacks[next(iter(playbacks))]
            self.stats.playbacks_forgotten += 1
        playbacks[utterance_id] = now + expected_s + self.config.playback_deadman_s
        self._others_stale = True

    def playback_completed(self, utterance_id: int, now: float) -> None:
        """The transport's completion signal for ``utterance_id`` came (unknown ids: ignored)."""
        if self._playbacks.pop(utterance_id, None) is not None:
            self._others_stale = True

    # -- timers ---------------------------------------------------------------

    def next_deadline(self) -> float | None:
        """The earliest armed deadline (monotonic seconds), or None when none is.

        Asked every tick for every call, so it is cheap: the media deadline
        (moved by every packet) is computed from the last media time, the
        others are remembered until an input changes them.
        """
        if self._others_stale:
            self._others_due = min((at for at, _, _ in self._other_deadlines()), default=math.inf)
            self._others_stale = False
        due = self._others_due
        media_due = self._media_due()
        if media_due < due:
            return media_due
        return None if due == math.inf else due

    def handle_timer(self, now: float) -> list[TimerEvent]:
        """Fire every deadline ``<= now``, in order (see the module docstring).

        Returns the events, possibly none; after an :class:`End`, always none.
        """
        events: list[TimerEvent] = []
        while self.state != ENDED:
            due = min(self._deadlines(), default=None)
            if due is None or due[0] > now:
                break
            events.append(self._fire(*due))
        return events

    def _other_deadlines(self) -> Iterator[tuple[float, _Timer, int]]:
        """(deadline, kind, utterance id or 0) of every armed timer but the media ones."""
        if self._ring_at is not None:
            yield self._ring_at, _Timer.RING, 0
        if self._max_at is not None:
            yield self._max_at, _Timer.MAX_DURATION, 0
        if self._agent_at is not None:
            yield self._agent_at, _Timer.AGENT, 0
        for utterance_id, at in self._playbacks.items():
            yield at, _Timer.PLAYBACK, utterance_id

    def _media_due(self) -> float:
        """When the media check armed now (first media, inactivity or recovery) is
        due; math.inf while media is not expected. Every tick: no allocation."""
        state = self.state
        if state == ACTIVE and self._media_expected:
            config = self.config
            return self._media_at + (
                config.media_inactivity_s if self._media_seen else config.first_media_s)
        if state == PAUSED:
            return self._paused_at + self.config.recovery_window_s
        return math.inf

    def _deadlines(self) -> Iterator[tuple[float, _Timer, int]]:
        """(deadline, kind, utterance id or 0) of every armed timer."""
        yield from self._other_deadlines()
        media_due = self._media_due()
        if media_due != math.inf:
            kind = (_Timer.RECOVERY if self.state == PAUSED
                    else _Timer.INACTIVITY if self._media_seen else _Timer.NO_MEDIA)
            yield media_due, kind, 0

    def _fire(self, at: float, kind: _Timer, utterance_id: int) -> TimerEvent:
        self._others_stale = True
        if kind is _Timer.AGENT:
            self._agent_at = None
            self.stats.agent_fallbacks += 1
            return AgentFallback(at)
        if kind is _Timer.PLAYBACK:
            del self._playbacks[utterance_id]
            self.stats.playback_deadmans += 1
            return PlaybackDeadman(at, utterance_id)
        if kind is _Timer.INACTIVITY and self.config.recovery_window_s > 0:
            self._move("media-lost")
            self._paused_at = at
            self.stats.pauses += 1
            return Paused(at)
        return self._end(_END_REASONS[kind], at)

    def _recover(self, now: float) -> Recovered:
        self._move("media-back")
        self._media_at = now
        self.stats.recoveries += 1
        return Recovered(now, now - self._paused_at)

    def _end(self, reason: EndReason, at: float) -> End:
        self.state = ENDED
        self.end_reason = reason
        self._ring_at = self._max_at = self._agent_at = None
        self._playbacks.clear()
        self._others_stale = True
        return End(reason, at)
