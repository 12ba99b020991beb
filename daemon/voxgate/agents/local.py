"""The local agent: offline recognition and synthesis, a menu, the integrator's logic.

Per call::

    media tick (50 Hz, O(1))           the agent's task (session nursery)
    on_frame ─▶ pre-roll ring          greeting ─▶ synth ─▶ playout.say
    on_speech start ─▶ utterance ◀─┐   loop: input ─▶ recognise (recogniser workers)
    on_speech stop ─▶ send_nowait ─┼─▶       ─▶ menu answer / integrator (webhook, plugin)
    on_dtmf ─▶ send_nowait ────────┘         ─▶ synth (espeak-ng) ─▶ playout.say
    endpoint (a pause) ─▶ send_nowait ─▶ checks: grammar-only recognition ─▶ verdict

The caller's speech is collected from ``SpeechStarted`` (with the pre-roll:
the ``[vad] start_ms`` that made it start plus ``[agent] preroll_ms`` before)
to ``SpeechStopped`` in the session's ``utterance`` budget buffer (``[budget]
utterance_ms``: longer speech loses its start, counted), then handed to the
task through a bounded channel; a full channel drops the input (counted).
Speech that starts while the agent talks with barge-in off is ignored.

Endpointing (:mod:`voxgate.agents.endpoint`): after ``[agent]
endpoint_check_ms`` of a pause the speech so far is recognised against the
step's grammar alone; a confident, whole, non-digit choice ends the turn at
once; in a step that takes digits, a digit string or no match yet (a partial
string) lets the pause last up to ``[agent] endpoint_max_ms``; anything else
(an out-of-grammar sentence: a no-match is not answered later) leaves
``[vad] stop_ms``.

Each turn is logged as one ``event=agent_turn`` line and kept for
``voxgatectl show ID`` (and so in the call record): ``transcript`` (free-form,
what was said), ``intent`` (the choice taken, ``no-match``, ``yes``/``no`` to
a question: :func:`~voxgate.agents.dialogue.intent_of`), ``confidence``,
``matched`` (the grammar's words accepted), and recognition, logic, synthesis
and response timings in ms. Response latency runs from the end of the
caller's speech (``SpeechStopped.at``: the start of the silence that ended the
turn, so the endpointing wait counts, be it shorter or longer than ``[vad]
stop_ms``) to when the answer's first frame is due out of the playout queue;
time to first voice from the answer to the first agent frame played.

A menu choice (or an integrator's reply) with a transfer target hands the
caller to it once its ``say`` has been played
(:meth:`~voxgate.agents.base.AgentControls.transfer`); a failed transfer comes
back as an input of its own, answered with the menu's ``transfer_failed_say``
and the step's prompt (a turn with ``input=transfer``).

A slow integrator: the session's agent-response deadman plays the fallback
prompt at ``[timers] agent_response_s``; the integrator's reply is spoken
after it if it comes within its own ``agent_response_s`` plus
:data:`INTEGRATOR_GRACE_S` (so the fallback always comes first); later it is
dropped and the menu's own answer is spoken instead.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from typing import Any, Final

import trio

from voxgate.agents.base import Agent
from voxgate.agents.dialogue import (
    BUILTIN_MENU,
    Answer,
    Dialogue,
    Input,
    KeyInput,
    SpeechInput,
    Step,
    spoken_digits,
)
from voxgate.agents.endpoint import Endpointer, Verdict
from voxgate.agents.recognizer import Recognition, Recognizer, menu_grammars, shared_pool
from voxgate.agents.synth import SynthesisError, Synthesizer
from voxgate.agents.transfer import TransferFailure
from voxgate.agents.webhook import Ask, Integrator, integrator_for
from voxgate.budget import BoundedAudioQueue, SessionBudget
from voxgate.config import AgentConfig, Config
from voxgate.logging import log_event
from voxgate.metrics import RESPONSE_LATENCY, TIME_TO_FIRST_VOICE
from voxgate.pipeline.frames import FRAME_S
from voxgate.pipeline.playout import Playout
from voxgate.pipeline.vad import SpeechStarted, SpeechStopped
from voxgate.rtp.dtmf import DtmfEvent

INPUT_QUEUE = 4
"""Inputs (utterances, keys) waiting for the agent's task; more are dropped."""
CHECK_QUEUE = 1
"""Endpointing checks waiting for a recogniser; more are dropped (the VAD decides)."""
MAX_TURNS_KEPT = 32
"""Turns ``voxgatectl show`` lists (the most recent)."""
HANGUP_REASON: Final = "agent-hangup"
_LOGGED_TEXT_CHARS = 200
INTEGRATOR_GRACE_S = 0.5
"""The integrator waits this much longer than the agent-response deadman, so a
slow webhook always trips the fallback prompt before its answer is given up."""


@dataclass(frozen=True, slots=True)
class CallerUtterance:
    """The caller's speech from pre-roll to ``SpeechStopped`` (8 kHz PCM16), and when."""

    pcm: bytes
    started_at: float
    stopped_at: float
    speech_ms: int
    barged_in: bool
    """The caller cut the agent's speech to say this."""


@dataclass(frozen=True, slots=True)
class EndpointCheck:
    """The caller's speech so far, to check against ``grammar`` in the pause that began at
    ``paused_at``."""

    pcm: bytes
    grammar: str
    paused_at: float


@dataclass(frozen=True, slots=True)
class KeyPress:
    """One DTMF key and when its first packet arrived."""

    digit: str
    at: float


class LocalRuntime:
    """What every local agent of one configuration shares (one per process).

    Args:
        agent: the ``[agent]`` section.
        response_timeout_s: ``[timers] agent_response_s``, the integrator's time.

    Raises:
        ConfigError: ``[agent] plugin`` cannot be loaded.
    """

    def __init__(self, agent: AgentConfig, response_timeout_s: float) -> None:
        self.config = agent
        self.menu = agent.menu or BUILTIN_MENU
        self.recognizer = Recognizer(menu_grammars(self.menu), shared_pool(agent))
        self.synth = Synthesizer(agent.voice, agent.rate_wpm, processes=agent.synthesizers)
        self.integrator: Integrator | None = integrator_for(
            agent, response_timeout_s + INTEGRATOR_GRACE_S)


_runtime: tuple[tuple[AgentConfig, float], LocalRuntime] | None = None


def shared_runtime(config: Config) -> LocalRuntime:
    """The process's :class:`LocalRuntime` for ``config`` (rebuilt when a reload changed it)."""
    global _runtime
    key = (config.agent, config.timers.agent_response_s)
    if _runtime is None or _runtime[0] != key:
        _runtime = (key, LocalRuntime(*key))
    return _runtime[1]


class LocalAgentStats:
    """Counters of one local agent."""

    __slots__ = ("barge_ins", "dropped_checks", "dropped_inputs", "ignored_utterances",
                 "no_matches", "synthesis_errors", "transfer_failures", "transfers", "turns")

    def __init__(self) -> None:
        self.turns = 0
        self.no_matches = 0
        """Turns whose input the menu did not take (intent ``no-match``)."""
        self.dropped_inputs = 0
        """Utterances or keys dropped because the input channel was full."""
        self.dropped_checks = 0
        """Endpointing checks dropped because one was still running."""
        self.ignored_utterances = 0
        """Speech that started while the agent talked with barge-in off."""
        self.barge_ins = 0
        self.synthesis_errors = 0
        self.transfers = 0
        """Transfers the agent asked for."""
        self.transfer_failures = 0
        """Failed transfers it was told of."""


class LocalAgent(Agent):
    """One call's local agent (``[agent] kind = "local"``).

    Args:
        playout: where it speaks.
        budget: the session's budget, holding the ``utterance`` buffer.
        runtime: the shared recogniser, synthesiser and integrator.
        vad_start_ms: ``[vad] start_ms``: speech before ``SpeechStarted``, kept as pre-roll.
    """

    def __init__(self, playout: Playout, budget: SessionBudget, runtime: LocalRuntime, *,
                 vad_start_ms: int) -> None:
        super().__init__(playout)
        self._runtime = runtime
        self._dialogue = Dialogue(runtime.menu)
        self._utterance = BoundedAudioQueue(budget, "utterance")
        preroll_frames = math.ceil((vad_start_ms + runtime.config.preroll_ms) / 1000 / FRAME_S)
        self._preroll: deque[bytes] = deque(maxlen=preroll_frames)
        self._capturing = False
        self._speech_at = 0.0
        self._barged_in = False
        self._inputs_in, self._inputs = trio.open_memory_channel[
            CallerUtterance | KeyPress | TransferFailure](INPUT_QUEUE)
        self._checks_in, self._checks = trio.open_memory_channel[EndpointCheck](CHECK_QUEUE)
        config = runtime.config
        self._endpointer = Endpointer(check_ms=config.endpoint_check_ms,
                                      max_ms=config.endpoint_max_ms)
        self._turns: deque[dict[str, Any]] = deque(maxlen=MAX_TURNS_KEPT)
        self._hangup_after: int | None = None
        self._transfer_after: tuple[int, str] | None = None
        self._first_voice_s: float | None = None
        self.stats = LocalAgentStats()

    # -- the media tick's hooks: O(1), never block ---------------------------------------------

    def on_frame(self, pcm: bytes, now: float) -> None:
        if self._capturing:
            self._utterance.push(pcm)
        else:
            self._preroll.append(pcm)
        if self._first_voice_s is None and self.playout.played_frames:
            answered_at = self.controls.answered_at
            self._first_voice_s = 0.0 if answered_at is None else max(0.0, now - answered_at)
            TIME_TO_FIRST_VOICE.observe(self._first_voice_s)

    def on_speech(self, event: SpeechStarted | SpeechStopped) -> None:
        if isinstance(event, SpeechStarted):
            if self.playout.speaking:  # barge-in is off: the agent keeps the floor
                self.stats.ignored_utterances += 1
                return
            self._capturing = True
            self._speech_at = event.at
            for frame in self._preroll:
                self._utterance.push(frame)
            self._preroll.clear()
        elif self._capturing:
            self._capturing = False
            frames: list[bytes] = []
            while (popped := self._utterance.pop()) is not None:
                frames.append(popped)
            self._offer(CallerUtterance(b"".join(frames), self._speech_at, event.at,
                                        event.duration_ms, self._barged_in))
            self._barged_in = False

    def endpoint(self, paused_at: float, now: float) -> int | None:
        if not self._capturing:
            return None
        action = self._endpointer.pause(paused_at, now)
        if action.check:
            check = EndpointCheck(self._utterance.snapshot(), self._dialogue.grammar, paused_at)
            try:
                self._checks_in.send_nowait(check)
            except trio.WouldBlock:
                self.stats.dropped_checks += 1
        return action.stop_ms

    def on_dtmf(self, event: DtmfEvent) -> None:
        self._offer(KeyPress(event.digit, event.at))

    def on_barge_in(self) -> None:
        """Called just before the ``SpeechStarted`` of the speech that barged in."""
        self.stats.barge_ins += 1
        self._barged_in = True
        if self._turns:
            self._turns[-1]["cut_short"] = True

    def on_playback_done(self, utterance_id: int, signal: str) -> None:
        if utterance_id == self._hangup_after:
            self.controls.hangup(HANGUP_REASON)
        if self._transfer_after is not None and utterance_id == self._transfer_after[0]:
            target = self._transfer_after[1]
            self._transfer_after = None
            self._transfer(target)

    def transfer_failed(self, failure: TransferFailure) -> None:
        self.stats.transfer_failures += 1
        self._offer(failure)

    def _transfer(self, target: str) -> None:
        self.stats.transfers += 1
        self.controls.transfer(target)

    def _offer(self, item: CallerUtterance | KeyPress | TransferFailure) -> None:
        try:
            self._inputs_in.send_nowait(item)
        except trio.WouldBlock:
            self.stats.dropped_inputs += 1

    # -- the agent's task ------------------------------------------------------------------------

    async def run(self) -> None:
        async with self._connect() as ask, trio.open_nursery() as nursery:
            await self._speak(self._dialogue.greeting(), {"input": "greeting"}, None)
            nursery.start_soon(self._check_endpoints)
            while True:
                await self._take_turn(await self._next_input(), ask)

    async def _check_endpoints(self) -> None:
        """Endpointing checks: the speech so far against its grammar alone, each verdict
        handed to the endpointer (which the next frame of the pause asks)."""
        async for check in self._checks:
            recognition = await self._runtime.recognizer.recognize(
                check.pcm, check.grammar, free_form=False)
            self._endpointer.checked(check.paused_at, self._verdict(recognition, check.grammar))

    def _verdict(self, recognition: Recognition, grammar: str) -> Verdict:
        """What ``recognition`` of the speech so far says of the turn's end."""
        dialogue = self._dialogue
        if grammar != dialogue.grammar:  # the menu moved on meanwhile
            return Verdict.UNSURE
        matched = recognition.matched
        if dialogue.is_complete(matched, recognition.confidence):
            return Verdict.COMPLETE
        takes_digits = grammar == dialogue.step.name and dialogue.step.takes_digits
        if takes_digits and (not matched or spoken_digits(matched)):
            return Verdict.INCOMPLETE  # more digits may come (a partial string may be rejected)
        return Verdict.UNSURE

    def _connect(self) -> AbstractAsyncContextManager[Ask | None]:
        integrator = self._runtime.integrator
        return integrator.connect() if integrator is not None else _nothing()

    async def _next_input(self) -> CallerUtterance | KeyInput | TransferFailure:
        """The next utterance, key string the menu takes (keys are collected here) or
        failed transfer."""
        dialogue = self._dialogue
        while True:
            deadline = dialogue.next_deadline()
            with trio.move_on_at(math.inf if deadline is None else deadline):
                item = await self._inputs.receive()
                if not isinstance(item, KeyPress):
                    return item
                keys = dialogue.key(item.digit, item.at)
                if keys is not None:
                    self.controls.caller_turn_ended()
                    return keys
                continue
            timed_out = dialogue.handle_timer(trio.current_time())
            if timed_out is not None:
                self.controls.caller_turn_ended()
                return timed_out

    async def _take_turn(self, item: CallerUtterance | KeyInput | TransferFailure,
                         ask: Ask | None) -> None:
        dialogue = self._dialogue
        record: dict[str, Any] = {"step": dialogue.step.name}
        if isinstance(item, TransferFailure):
            answer = dialogue.transfer_failed()
            record.update(input="transfer", transfer=item.target, reason=item.reason,
                          status=item.status, source="menu", intent=answer.intent)
            await self._speak(answer, record, None)
            return
        heard: Input
        caller_done_at = None
        if isinstance(item, KeyInput):
            heard = item
            record.update(input="dtmf", dtmf=item.keys, transcript="", confidence=1.0)
        else:
            started = trio.current_time()
            grammar = dialogue.grammar
            recognition = await self._runtime.recognizer.recognize(item.pcm, grammar)
            heard = SpeechInput(recognition.transcript, recognition.matched,
                                recognition.confidence)
            caller_done_at = item.stopped_at
            record.update(input="speech", grammar=grammar, transcript=recognition.transcript,
                          matched=recognition.matched,
                          confidence=round(recognition.confidence, 3), speech_ms=item.speech_ms,
                          recognition_ms=_ms_since(started), barged_in=item.barged_in)
        answer = await self._decide(heard, ask, record)
        await self._speak(answer, record, caller_done_at)

    async def _decide(self, heard: Input, ask: Ask | None, record: dict[str, Any]) -> Answer:
        """The menu's answer, or the integrator's where it gives one (no-match turns
        included: the integrator handles what the menu does not know)."""
        dialogue = self._dialogue
        answer = dialogue.respond(heard)
        self.stats.no_matches += not answer.matched
        record.update(source="menu", intent=answer.intent)
        if answer.digits:
            record["digits"] = answer.digits
        if ask is None or not dialogue.step.webhook:
            return answer
        started = trio.current_time()
        outcome = await ask(self._request(heard, answer))
        record["logic_ms"] = _ms_since(started)
        if outcome.error:
            record["integrator_error"] = outcome.error[:_LOGGED_TEXT_CHARS]
        reply = outcome.reply
        if reply is None or reply.empty:
            return answer
        assert self._runtime.integrator is not None
        record["source"] = self._runtime.integrator.kind
        return dialogue.follow(reply.say, reply.next, reply.hangup, reply.transfer)

    def _request(self, heard: Input, answer: Answer) -> dict[str, object]:
        """The integrator's request for ``heard`` and the menu's ``answer`` to it (see
        :mod:`voxgate.agents.webhook`)."""
        speech = heard if isinstance(heard, SpeechInput) else None
        controls = self.controls
        step: Step = self._dialogue.step
        return {
            "session": controls.session_id, "tenant": controls.tenant, "call": controls.call_id,
            "step": step.name,
            "transcript": None if speech is None else speech.transcript,
            "intent": answer.intent,
            "confidence": None if speech is None else round(speech.confidence, 3),
            "dtmf": heard.keys if isinstance(heard, KeyInput) else None,
            "digits": answer.digits or None,
            "confirming": self._dialogue.grammar != step.name,
        }

    async def _speak(self, answer: Answer, record: dict[str, Any],
                     caller_done_at: float | None) -> None:
        """Synthesise and queue ``answer``; move the menu on; log and keep the turn."""
        started = trio.current_time()
        try:
            frames = await self._runtime.synth.frames(answer.say)
        except SynthesisError as e:
            self.stats.synthesis_errors += 1
            record["synthesis_error"] = str(e)[:_LOGGED_TEXT_CHARS]
            frames = ()
        now = trio.current_time()
        self._dialogue.go(answer)
        step = self._dialogue.step
        self.controls.set_barge_in(self._runtime.config.barge_in and step.barge_in)
        if frames:
            utterance_id = self.playout.say(frames)
            if answer.hangup:
                self._hangup_after = utterance_id
            if answer.transfer:
                self._transfer_after = (utterance_id, answer.transfer)
            if caller_done_at is not None:
                ahead = max(0, len(self.playout) - len(frames))
                response_s = now + ahead * FRAME_S - caller_done_at
                RESPONSE_LATENCY.labels("local").observe(response_s)
                record["response_ms"] = round(response_s * 1000)
        elif answer.hangup:
            self.controls.hangup(HANGUP_REASON)
        elif answer.transfer:
            self._transfer(answer.transfer)
        if answer.transfer:
            record["transfer"] = answer.transfer
        self.stats.turns += 1
        record.update(turn=self.stats.turns, say=answer.say[:_LOGGED_TEXT_CHARS],
                      next=step.name, hangup=answer.hangup, synthesis_ms=_ms_since(started),
                      frames=len(frames))
        self._turns.append(record)
        log_event(logging.INFO, "agent_turn", "agent answered", call=self.controls, **record)

    def describe(self) -> dict[str, object]:
        stats = self.stats
        return {
            "kind": "local",
            "step": self._dialogue.step.name,
            "time_to_first_voice_ms": None if self._first_voice_s is None
            else round(self._first_voice_s * 1000),
            "turns": [dict(turn) for turn in self._turns],
            "stats": {name: getattr(stats, name) for name in LocalAgentStats.__slots__},
            "endpointing": {"early": self._endpointer.early,
                            "extended": self._endpointer.extended},
        }


@asynccontextmanager
async def _nothing() -> AsyncIterator[None]:
    yield None


def _ms_since(started: float) -> int:
    return round((trio.current_time() - started) * 1000)
