"""A session: one call, living in its own Trio nursery.

The session owns its lifecycle (``ringing → active ⇄ paused → ending →
ended``), its deadman timers (:class:`~voxgate.deadman.SessionTimers`), its
memory budget (:class:`~voxgate.budget.SessionBudget`) and its agent's task.
The transport plugs in through two small interfaces: :class:`CallSignaling`
(answer, refuse, hang up) and a media leg that the shared media clock ticks.

One timer mechanism: while the call is answered, the media clock's 20 ms
tick checks the timers' next deadline (no task per timer, none per packet);
before the answer, the session's own task waits for the ring deadline.

Whatever ends the call (BYE from either side, CANCEL, a deadman, the budget,
shutdown, an error in its own code) ends only this session:
:meth:`Session.run` is the error boundary; it always detaches the media,
releases the port, tells the signaling layer and writes exactly one
``call_end`` log line with the reason.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Protocol

import trio

from voxgate.agents.base import Agent
from voxgate.agents.factory import make_agent
from voxgate.budget import BufferCaps, SessionBudget
from voxgate.config import Config
from voxgate.deadman import (
    AgentFallback,
    DeadmanConfig,
    End,
    Paused,
    PlaybackDeadman,
    Recovered,
    SessionTimers,
    TimerEvent,
)
from voxgate.logging import log_event
from voxgate.metrics import PLAYBACK_COMPLETION, SESSION_DURATION, SESSIONS_ENDED
from voxgate.pipeline.pipeline import Pipeline
from voxgate.pipeline.playback import DEADMAN, PlaybackTracker
from voxgate.pipeline.playout import Playout
from voxgate.pipeline.vad import VoiceActivityDetector
from voxgate.transports.rtp_media import MediaClock

# End reasons after which the peer is already gone: no BYE from us.
_PEER_ENDED = frozenset({"bye", "cancel"})


class CallSignaling(Protocol):
    """The session's view of its call's signaling (SIP dialog, WebSocket …)."""

    def ring(self) -> None:
        """Tell the caller we are alerting (SIP 180 Ringing)."""

    def answer(self) -> None:
        """Answer the call (SIP 200 OK with our SDP answer)."""

    def refuse(self, reason: str) -> None:
        """End an unanswered call (e.g. 503 on shutdown, 500 on error)."""

    def hangup(self, reason: str) -> None:
        """End an answered call from our side (SIP BYE)."""

    def release(self) -> None:
        """The session is gone: forget the call's state."""


class SessionMedia(Protocol):
    """A session's media transport, ticked every 20 ms by the media clock."""

    @property
    def packets_in(self) -> int: ...

    @property
    def packets_out(self) -> int: ...

    def tick(self, now: float, frames_elapsed: int) -> bool:
        """Receive, process one frame, send one frame; never blocks.

        Returns whether media arrived since the last tick.
        """

    def close(self) -> None:
        """Release the leg's socket/device (idempotent)."""


@dataclass
class SessionCore:
    """The transport-independent parts of a session: budget, timers, pipeline."""

    budget: SessionBudget
    timers: SessionTimers
    playout: Playout
    agent: Agent
    pipeline: Pipeline

    @classmethod
    def build(cls, config: Config, transport: str, now: float) -> SessionCore:
        """A new core from ``config`` (``[budget]``, ``[timers]``, ``[vad]``, ``[agent]``).

        The ``jitter`` budget buffer is capped by ``[rtp] jitter_buffer_max_ms``
        for every transport's inbound queue; ``utterance`` (the caller's speech
        an agent collects for recognition) by ``[budget] utterance_ms``.
        """
        budget = SessionBudget(BufferCaps.from_ms(
            {"jitter": config.rtp.jitter_buffer_max_ms, "playout": config.budget.playout_ms,
             "utterance": config.budget.utterance_ms},
            config.budget.session_bytes, config.budget.budget_grace_ms,
        ))
        t = config.timers
        timers = SessionTimers(DeadmanConfig(
            first_media_s=t.first_media_s, media_inactivity_s=t.media_inactivity_s,
            recovery_window_s=t.recovery_window_s, agent_response_s=t.agent_response_s,
            playback_deadman_s=t.playback_deadman_ms / 1000, max_duration_s=t.max_duration_s,
            ring_timeout_s=t.ring_timeout_s,
        ), now)
        playout = Playout(budget)
        vad = VoiceActivityDetector(aggressiveness=config.vad.aggressiveness,
                                    start_ms=config.vad.start_ms, stop_ms=config.vad.stop_ms)
        agent = make_agent(config, playout, budget)

        def done(utterance_id: int, signal: str) -> None:
            PLAYBACK_COMPLETION.labels(transport, signal).inc()
            agent.on_playback_done(utterance_id, signal)

        playback = PlaybackTracker(timers, done)
        return cls(budget, timers, playout, agent,
                   Pipeline(vad, agent, playout, timers, playback))


class Session:
    """One call. Create it, then ``nursery.start_soon(session.run)``."""

    def __init__(
        self,
        *,
        session_id: str,
        call_id: str,
        transport: str,
        codec: str,
        signaling: CallSignaling,
        media: SessionMedia,
        core: SessionCore,
        clock: MediaClock,
        answer_delay_s: float,
        fallback_prompt: tuple[bytes, ...] = (),
        tenant: str = "default",
    ) -> None:
        self.session_id = session_id
        self.tenant = tenant
        self.call_id = call_id
        self.transport = transport
        self.codec = codec
        self.signaling = signaling
        self.media = media
        self.agent = core.agent
        self.playout = core.playout
        self.timers = core.timers
        self.budget = core.budget
        self.pipeline = core.pipeline
        self._clock = clock
        self._answer_delay_s = answer_delay_s
        self._fallback_prompt = fallback_prompt
        self.state = "ringing"
        self.end_reason: str | None = None
        self.started_at = math.nan
        self.answered_at: float | None = None
        self._end_requested = trio.Event()
        self.agent.controls = self

    def hangup(self, reason: str) -> None:
        """The agent ends the call (:class:`~voxgate.agents.base.AgentControls`)."""
        self.end(reason)

    def set_barge_in(self, enabled: bool) -> None:
        """The agent allows or forbids barge-in for its next utterances."""
        self.pipeline.barge_in = enabled

    def end(self, reason: str) -> None:
        """Ask the session to end with ``reason``; the first reason given wins."""
        if self.end_reason is None:
            self.end_reason = reason
        self._end_requested.set()

    def media_changed(self, expected: bool, now: float) -> None:
        """The peer moved or held its media (re-INVITE): re-base the media timers."""
        recovered = self.timers.media_expected(expected, now)
        if recovered is not None:
            self._on_timer(recovered)

    def tick(self, now: float, frames_elapsed: int) -> None:
        """The media clock's 20 ms tick (see :class:`~voxgate.transports.rtp_media.MediaLeg`)."""
        timers = self.timers
        if self.media.tick(now, frames_elapsed):
            recovered = timers.on_media(now)
            if recovered is not None:
                self._on_timer(recovered)
        deadline = timers.next_deadline()
        if deadline is not None and now >= deadline:
            for event in timers.handle_timer(now):
                self._on_timer(event)
        self.pipeline.playback.tick(now)
        reason = self.budget.check(now)
        if reason is not None:
            self.end(reason)

    def fail(self, exc: BaseException) -> None:
        """The media path raised: log it with the Call-ID and end the session."""
        log_event(logging.ERROR, "session_error", f"session failed: {exc!r}",
                  session_id=self.session_id, call_id=self.call_id, exc_info=exc)
        self.end("error")

    def counters(self) -> dict[str, int]:
        """Deadman and budget counters of this session, by name."""
        stats = self.timers.stats
        counters = {
            "session_pauses": stats.pauses,
            "session_recoveries": stats.recoveries,
            "agent_fallbacks": stats.agent_fallbacks,
            "playback_deadmans": stats.playback_deadmans,
            "barge_ins": self.pipeline.barge_ins,
        }
        for buffer, frames in self.budget.drops_frames.items():
            counters[f"budget_drop_{buffer}"] = frames
        return counters

    async def run(self) -> None:
        """Run the call to its end. Never raises (but Cancelled); always cleans up."""
        self.started_at = trio.current_time()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._lifecycle, nursery.cancel_scope)
                nursery.start_soon(self.agent.run)
        except Exception as exc:
            self.fail(exc)
        finally:
            self._finish()

    async def _lifecycle(self, scope: trio.CancelScope) -> None:
        answer_at = self.started_at + self._answer_delay_s
        if self._answer_delay_s > 0:
            self.signaling.ring()
        while self.end_reason is None and trio.current_time() < answer_at:
            deadline = self.timers.next_deadline()
            with trio.move_on_at(min(answer_at, math.inf if deadline is None else deadline)):
                await self._end_requested.wait()
            for event in self.timers.handle_timer(trio.current_time()):
                self._on_timer(event)
        if self.end_reason is None:
            self.signaling.answer()
            self.answered_at = trio.current_time()
            self.timers.answered(self.answered_at)
            self.state = "active"
            self._clock.attach(self)
            await self._end_requested.wait()
        scope.cancel()

    def _on_timer(self, event: TimerEvent) -> None:
        if isinstance(event, End):
            self.end(event.reason)
        elif isinstance(event, Paused):
            self.state = "paused"
            self._log(logging.INFO, "session_paused", "media stopped: waiting for it to return")
        elif isinstance(event, Recovered):
            self.state = "active"
            self._log(logging.INFO, "session_recovered", "media is back",
                      paused_s=event.paused_s)
        elif isinstance(event, AgentFallback):
            self._log(logging.INFO, "agent_fallback", "agent did not answer: fallback prompt",
                      prompt_frames=len(self._fallback_prompt))
            if self._fallback_prompt:
                self.playout.say(self._fallback_prompt)
        elif isinstance(event, PlaybackDeadman):
            self._log(logging.WARNING, "playback_deadman",
                      f"no {self.transport} playback-completion signal: ending the turn anyway",
                      utterance_id=event.utterance_id)
            self.pipeline.playback.complete(event.utterance_id, DEADMAN, event.at)

    def _log(self, level: int, event: str, message: str, **fields: float | str) -> None:
        log_event(level, event, message, exc_info=None, session_id=self.session_id,
                  call_id=self.call_id, **fields)

    def _finish(self) -> None:
        self.state = "ending"
        self._clock.detach(self)
        self.media.close()
        reason = self.end_reason or "error"
        try:
            if reason not in _PEER_ENDED:
                if self.answered_at is not None:
                    self.signaling.hangup(reason)
                else:
                    self.signaling.refuse(reason)
        finally:
            self.signaling.release()
            self.state = "ended"
            now = trio.current_time()
            SESSIONS_ENDED.labels(self.transport, reason).inc()
            SESSION_DURATION.labels(self.transport).observe(now - self.started_at)
            log_event(
                logging.INFO, "call_end", "call ended",
                session_id=self.session_id, call_id=self.call_id, transport=self.transport,
                reason=reason, duration_s=now - self.started_at,
                talk_s=None if self.answered_at is None else now - self.answered_at,
                packets_in=self.media.packets_in, packets_out=self.media.packets_out,
                codec=self.codec, peak_bytes=self.budget.peak_bytes,
            )
