"""A session: one call, living in its own Trio nursery.

The session owns its state (:data:`TRANSITIONS`), its deadman timers
(:class:`~voxgate.deadman.SessionTimers`), its memory budget
(:class:`~voxgate.budget.SessionBudget`), its agent's task and its media
tasks. The transport plugs in through two small interfaces:
:class:`CallSignaling` (answer, refuse, hang up) and a
:class:`~voxgate.pipeline.pipeline.MediaLeg` that only does I/O; the session
drives the pipeline on every 20 ms tick of the shared media clock.

One timer mechanism: while the call is answered, the media clock's 20 ms
tick checks the timers' next deadline (no task per timer, none per packet);
before the answer, the session's own task waits for the ring deadline.

An outbound call (``connect`` given) answers when its dialling task returns
that the callee answered, instead of after ``answer_delay_s``; when the
callee does not answer, the session ends with the reason it returns.

Whatever ends the call (BYE from either side, CANCEL, a deadman, the budget,
a drain deadline, an error in its own code) ends only this session:
:meth:`Session.run` is the error boundary, correct for Trio's exception
groups (a failure is logged even when it happens during cancellation, and
``Cancelled`` still propagates). It always detaches the media, releases the
port, tells the signaling layer and writes exactly one ``call_end`` log line
with the reason. Admission, registry and the call record are the lifecycle's
(:mod:`voxgate.calls`).
"""

from __future__ import annotations

import logging
import math
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Protocol, cast

import trio

from voxgate.agents.base import Agent, AgentControls
from voxgate.agents.factory import make_agent
from voxgate.agents.transfer import TransferFailure, target_problem
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
from voxgate.end_reasons import EndReason
from voxgate.errors import LocalProtocolError
from voxgate.logging import log_event
from voxgate.metrics import (
    AGENT_TRANSFER_FAILURES,
    PLAYBACK_COMPLETION,
    SESSION_DURATION,
    SESSIONS_ENDED,
)
from voxgate.pipeline.clock import MediaClock
from voxgate.pipeline.pipeline import MediaLeg, Pipeline
from voxgate.pipeline.playback import DEADMAN, PlaybackTracker
from voxgate.pipeline.playout import Playout
from voxgate.pipeline.vad import VoiceActivityDetector

if TYPE_CHECKING:
    from voxgate.agents.stream import ProviderPool

# End reasons after which the peer is already gone: no BYE from us.
_PEER_ENDED: frozenset[EndReason] = frozenset(
    {"bye", "cancel", "callee-busy", "callee-rejected", "callee-unreachable"})


class SessionState(str, Enum):
    """Where a session is in its life (shown by ``voxgatectl sessions``)."""

    ADMITTING = "admitting"
    RINGING = "ringing"
    ACTIVE = "active"
    PAUSED = "paused"
    ENDING = "ending"
    ENDED = "ended"


TRANSITIONS: dict[SessionState, frozenset[SessionState]] = {
    SessionState.ADMITTING: frozenset({SessionState.RINGING, SessionState.ENDING}),
    SessionState.RINGING: frozenset({SessionState.ACTIVE, SessionState.ENDING}),
    SessionState.ACTIVE: frozenset({SessionState.PAUSED, SessionState.ENDING}),
    SessionState.PAUSED: frozenset({SessionState.ACTIVE, SessionState.ENDING}),
    SessionState.ENDING: frozenset({SessionState.ENDED}),
    SessionState.ENDED: frozenset(),
}
"""Every state change a session may make, in one table (anything else is a bug)."""


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


@dataclass
class SessionCore:
    """The transport-independent parts of a session: budget, timers, pipeline."""

    budget: SessionBudget
    timers: SessionTimers
    playout: Playout
    agent: Agent
    pipeline: Pipeline

    @classmethod
    def build(cls, config: Config, transport: str, now: float, *, tenant: str = "default",
              providers: ProviderPool | None = None, kind: str | None = None) -> SessionCore:
        """A new core from ``config`` (``[budget]``, ``[timers]``, ``[vad]``, ``[agent]``)
        for a call of ``tenant``; ``providers`` serves stream agents; ``kind`` names
        the agent kind when not the tenant's (see :func:`~voxgate.agents.factory.make_agent`).

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
        agent = make_agent(config, playout, budget, tenant=tenant, providers=providers,
                           kind=kind)

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
        media: MediaLeg,
        core: SessionCore,
        clock: MediaClock,
        answer_delay_s: float,
        fallback_prompt: tuple[bytes, ...] = (),
        tenant: str = "default",
        from_uri: str = "",
        to_uri: str = "",
        peer: str = "",
        tasks: tuple[Callable[[], Awaitable[None]], ...] = (),
        stop_reason: Callable[[], EndReason] = lambda: "shutdown",
        connect: Callable[[], Awaitable[EndReason | None]] | None = None,
        transfer_to: Callable[[str], None] | None = None,
    ) -> None:
        """``peer`` is where the call comes from, for its log records (the SIP
        peer's address, the WebSocket client's, the ALSA device); ``tasks`` run in
        the session's nursery beside its agent (media readers); ``stop_reason()``
        names the end reason when the session is cancelled from outside (a drain
        deadline, a stop); ``connect()`` dials an outbound call: it returns
        ``None`` once the callee answered, else the end reason (it is cancelled
        when the session ends first); ``transfer_to(target)`` sends the call's
        blind transfer (None: the transport cannot transfer) and raises
        LocalProtocolError when the transport refuses it."""
        self.session_id = session_id
        self.tenant = tenant
        self.peer = peer
        self.from_uri = from_uri
        self.to_uri = to_uri
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
        self._tasks = tasks
        self._stop_reason = stop_reason
        self._connect = connect
        self._answer_at = math.inf
        self._ring_wakeup = trio.Event()  # the call ended or was answered while ringing
        self._transfer_to = transfer_to
        self.state = SessionState.ADMITTING
        self.end_reason: EndReason | None = None
        self.started_at = math.nan
        self.answered_at: float | None = None
        self._end_requested = trio.Event()
        # A weak reference: a strong one would make session ⇄ agent a cycle that keeps
        # every ended call's objects until a full garbage collection (RSS creeps).
        self.agent.controls = cast(AgentControls, weakref.proxy(self))

    def hangup(self, reason: EndReason) -> None:
        """The agent ends the call (:class:`~voxgate.agents.base.AgentControls`)."""
        self.end(reason)

    def set_barge_in(self, enabled: bool) -> None:
        """The agent allows or forbids barge-in for its next utterances."""
        self.pipeline.barge_in = enabled

    def fallback(self) -> None:
        """The agent asks for the fallback prompt (its bot is reconnecting)."""
        if self._fallback_prompt:
            self.playout.say(self._fallback_prompt)

    def clear_playout(self) -> None:
        """The agent (its bot) flushes its own speech."""
        self.pipeline.clear(trio.current_time())

    def caller_turn_ended(self) -> None:
        """The agent took the caller's keys as a turn: its answer is due now."""
        self.pipeline.caller_turn_ended(trio.current_time())

    def transfer(self, target: str) -> None:
        """The agent transfers the caller to ``target`` (see
        :meth:`~voxgate.agents.base.AgentControls.transfer`); a target that is not a
        SIP URI, a transport that cannot transfer (status 501) and a refusal by the
        SIP layer are told to the agent at once."""
        problem = target_problem(target)
        if problem is not None:
            self.transfer_failed(TransferFailure(target, 400, "bad-target"), problem)
        elif self._transfer_to is None:
            self.transfer_failed(TransferFailure(target, 501, "not-supported"),
                                 f"a {self.transport} call cannot be transferred")
        else:
            try:
                self._transfer_to(target)
            except LocalProtocolError as exc:
                self.transfer_failed(TransferFailure(target, None, "refused"), str(exc))

    def transfer_failed(self, failure: TransferFailure, why: str) -> None:
        """A transfer of this call failed (``why``, for the log): count it and tell the
        agent; the call goes on."""
        AGENT_TRANSFER_FAILURES.labels(self.transport, failure.reason).inc()
        self._log(logging.WARNING, "transfer_failed", f"transfer failed: {why}",
                  target=failure.target, reason=failure.reason,
                  status="" if failure.status is None else failure.status)
        self.agent.transfer_failed(failure)

    def end(self, reason: EndReason) -> None:
        """Ask the session to end with ``reason``; the first reason given wins."""
        if self.end_reason is None:
            self.end_reason = reason
        self._end_requested.set()
        self._ring_wakeup.set()

    def media_changed(self, expected: bool, now: float) -> None:
        """The peer moved or held its media (re-INVITE): re-base the media timers."""
        recovered = self.timers.media_expected(expected, now)
        if recovered is not None:
            self._on_timer(recovered)

    def tick(self, now: float, frames_elapsed: int) -> None:
        """The media clock's 20 ms tick: the pipeline's step, the timers, the budget."""
        self.pipeline.tick(self.media, now, frames_elapsed, self._on_timer)
        budget = self.budget
        if budget.over_limit and (reason := budget.check(now)) is not None:
            self.end(reason)

    def fail(self, exc: BaseException) -> None:
        """The media path raised: log it with the Call-ID and end the session."""
        log_event(logging.ERROR, "session_error", f"session failed: {exc!r}", call=self,
                  exc_info=exc)
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
            "dtmf_events": self.pipeline.dtmf_events,
            "speech_turns": self.pipeline.speech_turns,
            "playout_skipped": self.pipeline.playout.skipped_frames,
        }
        for buffer, frames in self.budget.drops_frames.items():
            counters[f"budget_drop_{buffer}"] = frames
        return counters

    def set_state(self, state: SessionState) -> None:
        """Move to ``state``; raises LocalProtocolError if :data:`TRANSITIONS` forbids it."""
        if state not in TRANSITIONS[self.state]:
            raise LocalProtocolError(f"session {self.session_id}: {self.state.value} → "
                                     f"{state.value} is not a session transition")
        self.state = state

    async def run(self) -> None:
        """Run the call to its end; always cleans up.

        Raises nothing but ``Cancelled`` (then the end reason is
        ``stop_reason()``); any other exception, alone or in a group, is logged
        with the Call-ID and ends this session with reason ``error``.
        """
        self.started_at = trio.current_time()
        self.set_state(SessionState.RINGING)
        try:
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._lifecycle, nursery.cancel_scope)
                    if self._connect is not None:
                        nursery.start_soon(self._dial, self._connect)
                    nursery.start_soon(self.agent.run)
                    for task in self._tasks:
                        nursery.start_soon(task)
            except* trio.Cancelled:
                self.end(self._stop_reason())
                raise
            except* Exception as group:
                self.fail(group.exceptions[0] if len(group.exceptions) == 1 else group)
        finally:
            self._finish()

    async def _dial(self, connect: Callable[[], Awaitable[EndReason | None]]) -> None:
        """Dial the outbound call: answer when the callee has, else end."""
        reason = await connect()
        if reason is not None:
            self.end(reason)
        else:
            self._answer_at = trio.current_time()
            self._ring_wakeup.set()

    async def _lifecycle(self, scope: trio.CancelScope) -> None:
        if self._connect is None:
            self._answer_at = self.started_at + self._answer_delay_s
            if self._answer_delay_s > 0:
                self.signaling.ring()
        while self.end_reason is None and trio.current_time() < self._answer_at:
            deadline = self.timers.next_deadline()
            wake_at = min(self._answer_at, math.inf if deadline is None else deadline)
            with trio.move_on_at(wake_at):
                await self._ring_wakeup.wait()
            self._ring_wakeup = trio.Event()
            for event in self.timers.handle_timer(trio.current_time()):
                self._on_timer(event)
        if self.end_reason is None:
            self.signaling.answer()
            self.answered_at = trio.current_time()
            self.timers.answered(self.answered_at)
            self.set_state(SessionState.ACTIVE)
            self._clock.attach(self)
            await self._end_requested.wait()
        scope.cancel()

    def _on_timer(self, event: TimerEvent) -> None:
        if isinstance(event, End):
            self.end(event.reason)
        elif isinstance(event, Paused):
            self.set_state(SessionState.PAUSED)
            self._log(logging.INFO, "session_paused", "media stopped: waiting for it to return")
        elif isinstance(event, Recovered):
            self.set_state(SessionState.ACTIVE)
            self._log(logging.INFO, "session_recovered", "media is back",
                      paused_s=event.paused_s)
        elif isinstance(event, AgentFallback):
            self._log(logging.INFO, "agent_fallback", "agent did not answer: fallback prompt",
                      prompt_frames=len(self._fallback_prompt))
            self.fallback()
        elif isinstance(event, PlaybackDeadman):
            self._log(logging.WARNING, "playback_deadman",
                      f"no {self.transport} playback-completion signal: ending the turn anyway",
                      utterance_id=event.utterance_id)
            self.pipeline.playback.complete(event.utterance_id, DEADMAN, event.at)

    def _log(self, level: int, event: str, message: str, **fields: float | str) -> None:
        log_event(level, event, message, call=self, exc_info=None, **fields)

    def _finish(self) -> None:
        self.set_state(SessionState.ENDING)
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
            self.set_state(SessionState.ENDED)
            now = trio.current_time()
            SESSIONS_ENDED.labels(self.transport, reason).inc()
            SESSION_DURATION.labels(self.transport).observe(now - self.started_at)
            log_event(
                logging.INFO, "call_end", "call ended", call=self, transport=self.transport,
                reason=reason, duration_s=now - self.started_at, peer=self.peer or None,
                talk_s=None if self.answered_at is None else now - self.answered_at,
                packets_in=self.media.packets_in, packets_out=self.media.packets_out,
                codec=self.codec, peak_bytes=self.budget.peak_bytes,
            )
