"""A session's audio pipeline: VAD, then the agent; the playout queue out.

Sans-IO: :meth:`Pipeline.step` is the one 20 ms media step of every
transport. It takes the frames due from the session's :class:`MediaLeg`
(which only does I/O), runs them through the stages, and hands the leg one
outbound frame. The stages are called in-line because at 20 ms
per frame a channel hop per stage would cost more than the work itself;
stages that need time (recognition, synthesis) live in the agent's own task.
The pipeline tells the session's deadman timers when the caller starts and
ends a turn and when the agent starts answering. While the caller pauses,
the agent may end their turn sooner or later than ``[vad] stop_ms``
(:meth:`~voxgate.agents.base.Agent.endpoint`, endpointing).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

from voxgate.agents.base import Agent
from voxgate.deadman import SessionTimers, TimerEvent
from voxgate.pipeline.playback import CLEARED, PlaybackTracker
from voxgate.pipeline.playout import Playout
from voxgate.pipeline.vad import SpeechStarted, SpeechStopped, VadEvent
from voxgate.rtp.dtmf import DtmfEvent


class MediaLeg(Protocol):
    """A session's media transport: I/O only, driven by :meth:`Pipeline.step`.

    Frames are 20 ms of 8 kHz PCM16 mono (320 bytes, :mod:`voxgate.pipeline.frames`);
    a leg converts from and to its wire (G.711 over RTP, µ-law over a WebSocket,
    a sound device's rate). It reports its transport's playback-completion
    signal to the session's :class:`~voxgate.pipeline.playback.PlaybackTracker`
    and key presses to :meth:`Pipeline.dtmf`. No method may block or await.
    """

    @property
    def packets_in(self) -> int: ...

    @property
    def packets_out(self) -> int: ...

    def receive(self, now: float, frames_elapsed: int) -> tuple[bool, list[bytes]]:
        """What arrived since the last tick: whether any caller media came, and the
        caller's frames due now (``frames_elapsed`` of them when the clock was late,
        concealed or fewer when audio is missing)."""

    def send(self, pcm: bytes | None, finished: Sequence[int], now: float) -> None:
        """Send one frame (None: silence); ``finished`` lists the utterances whose
        last frame left the playout queue this tick (their completion signal starts)."""

    def clear(self) -> None:
        """Barge-in: drop the agent audio already handed to the far end or device."""

    def close(self) -> None:
        """Release the leg's socket, stream or device (idempotent)."""


class VoiceActivity(Protocol):
    """The caller's turns from 20 ms PCM frames, as
    :class:`~voxgate.pipeline.vad.VoiceActivityDetector` gives them."""

    @property
    def pause_at(self) -> float | None:
        """While speech is stopping: when the caller paused (the agent may end the turn)."""

    def process(self, pcm: bytes, now: float) -> VadEvent | None:
        """One 320-byte frame at ``now``: the turn's start or end, if this frame makes it."""

    def end_pause_after(self, stop_ms: int) -> SpeechStopped | None:
        """End the paused turn once it has lasted ``stop_ms``."""


class FrameRecorder(Protocol):
    """Something that records both directions of a call, one frame per tick."""

    def frame(self, caller_pcm: bytes | None, agent_pcm: bytes | None) -> None: ...


class Pipeline:
    """VAD → agent → playout for one session."""

    __slots__ = ("_answer_from", "_awaiting_agent", "agent", "barge_in", "barge_ins", "cleared",
                 "dtmf_events", "playback", "playout", "recorder", "speech_turns", "timers", "vad")

    def __init__(self, vad: VoiceActivity, agent: Agent, playout: Playout,
                 timers: SessionTimers, playback: PlaybackTracker) -> None:
        self.vad = vad
        self.agent = agent
        self.playout = playout
        self.timers = timers
        self.playback = playback
        self.barge_in = True
        """Caller speech during agent speech stops it (agents may switch it off)."""
        self.cleared = False
        """Set on barge-in; :meth:`step` tells the leg to clear and resets it."""
        self.recorder: FrameRecorder | None = None
        """The call's recording, when ``[records] recordings_dir`` is set."""
        self.speech_turns = 0
        self.barge_ins = 0
        self.dtmf_events = 0
        self._awaiting_agent = False
        self._answer_from = 0  # playout position of the first frame that answers the turn

    def tick(self, leg: MediaLeg, now: float, frames_elapsed: int,
             on_timer: Callable[[TimerEvent], None]) -> None:
        """The session's 20 ms media tick: :meth:`step`, then the deadman timers
        that it feeds and the paced playback completions that are due.

        ``on_timer`` gets each timer event as it happens (media back after a
        pause, a deadman that fired), before the playback completions: the
        session acts on it. In compiled code, one call from the session per tick.
        """
        timers = self.timers
        if self.step(leg, now, frames_elapsed):
            recovered = timers.on_media(now)
            if recovered is not None:
                on_timer(recovered)
        deadline = timers.next_deadline()
        if deadline is not None and now >= deadline:
            for event in timers.handle_timer(now):
                on_timer(event)
        self.playback.tick(now)

    def step(self, leg: MediaLeg, now: float, frames_elapsed: int) -> bool:
        """The 20 ms media step: caller frames in, one agent frame out.

        Returns whether caller media arrived since the last step (the
        session's deadman timers watch it).
        """
        arrived, frames = leg.receive(now, frames_elapsed)
        for pcm in frames:
            self.inbound(pcm, now)
        if self.cleared:
            self.cleared = False
            leg.clear()
        out = self.outbound(now, frames_elapsed)
        leg.send(out, self.playout.take_sent(), now)
        recorder = self.recorder
        if recorder is not None:
            recorder.frame(b"".join(frames) or None, out)
        return arrived

    def inbound(self, pcm: bytes, now: float) -> None:
        """One inbound frame (320 bytes: 20 ms of 8 kHz 16-bit mono PCM)."""
        vad = self.vad
        event = vad.process(pcm, now)
        if event is None and (paused_at := vad.pause_at) is not None:
            stop_ms = self.agent.endpoint(paused_at, now)
            if stop_ms is not None:
                event = vad.end_pause_after(stop_ms)
        if event is not None:
            if isinstance(event, SpeechStarted):
                self.speech_turns += 1
                self._awaiting_agent = False
                self.timers.caller_speaking(now)
                if self.barge_in and self.playout.speaking:
                    self._barge_in(now)
            else:
                self.caller_turn_ended(now)
            self.agent.on_speech(event)
        self.agent.on_frame(pcm, now)

    def caller_turn_ended(self, now: float) -> None:
        """The caller's turn is over (speech stopped, keys complete): the agent's
        answer is due within ``[timers] agent_response_s``."""
        self._awaiting_agent = True
        self._answer_from = self.playout.end_position  # what is queued now answers nothing
        self.timers.caller_turn_ended(now)

    def _barge_in(self, now: float) -> None:
        """The caller talks over the agent: its speech stops at the current frame."""
        self.barge_ins += 1
        self.clear(now)
        self.agent.on_barge_in()

    def clear(self, now: float) -> None:
        """Drop the agent's queued speech and, on the next step, what the leg holds;
        the utterances cut complete with the ``cleared`` signal."""
        self.cleared = True
        for utterance_id in self.playout.clear():
            self.playback.complete(utterance_id, CLEARED, now)

    def outbound(self, now: float, frames_elapsed: int = 1) -> bytes | None:
        """The frame to send for this tick, or None (the transport sends silence).

        When the clock was late (``frames_elapsed`` > 1) the frames due on the
        ticks it missed are skipped (:meth:`Playout.skip`): a late tick costs
        the call those frames once instead of their length in latency for the
        rest of the call. Utterances queued since the last tick start their
        playback deadman here.
        """
        playout = self.playout
        for utterance_id, duration_s in playout.take_queued():
            self.playback.started(utterance_id, duration_s, now)
        if frames_elapsed > 1:
            playout.skip(frames_elapsed - 1)
        if not self._awaiting_agent:
            return playout.pop()
        position = playout.next_position
        frame = playout.pop()
        if frame is not None and position >= self._answer_from:
            self._awaiting_agent = False
            self.timers.agent_started(now)
        return frame

    def dtmf(self, event: DtmfEvent) -> None:
        """A key press from the caller."""
        self.dtmf_events += 1
        self.agent.on_dtmf(event)
