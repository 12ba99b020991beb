"""A session's audio pipeline: VAD, then the agent; the playout queue out.

Sans-IO: the transport's tick hands in one inbound 20 ms PCM16 frame and
takes out one outbound frame. The stages are called in-line because at 20 ms
per frame a channel hop per stage would cost more than the work itself;
stages that need time (recognition, synthesis) live in the agent's own task.
The pipeline tells the session's deadman timers when the caller starts and
ends a turn and when the agent starts answering.
"""

from __future__ import annotations

from voxgate.agents.base import Agent
from voxgate.deadman import SessionTimers
from voxgate.pipeline.playback import CLEARED, PlaybackTracker
from voxgate.pipeline.playout import Playout
from voxgate.pipeline.vad import SpeechStarted, VoiceActivityDetector
from voxgate.rtp.dtmf import DtmfEvent


class Pipeline:
    """VAD → agent → playout for one session."""

    __slots__ = ("_awaiting_agent", "agent", "barge_in", "barge_ins", "cleared", "dtmf_events",
                 "playback", "playout", "speech_turns", "timers", "vad")

    def __init__(self, vad: VoiceActivityDetector, agent: Agent, playout: Playout,
                 timers: SessionTimers, playback: PlaybackTracker) -> None:
        self.vad = vad
        self.agent = agent
        self.playout = playout
        self.timers = timers
        self.playback = playback
        self.barge_in = True
        """Caller speech during agent speech stops it (agents may switch it off)."""
        self.cleared = False
        """Set on barge-in; the transport reads and resets it (WebSocket sends ``clear``)."""
        self.speech_turns = 0
        self.barge_ins = 0
        self.dtmf_events = 0
        self._awaiting_agent = False

    def inbound(self, pcm: bytes, now: float) -> None:
        """One inbound frame (320 bytes: 20 ms of 8 kHz 16-bit mono PCM)."""
        event = self.vad.process(pcm, now)
        if event is not None:
            if isinstance(event, SpeechStarted):
                self.speech_turns += 1
                self._awaiting_agent = False
                self.timers.caller_speaking(now)
                if self.barge_in and self.playout.speaking:
                    self._barge_in(now)
            else:
                self._awaiting_agent = True
                self.timers.caller_turn_ended(now)
            self.agent.on_speech(event)
        self.agent.on_frame(pcm, now)

    def _barge_in(self, now: float) -> None:
        """The caller talks over the agent: its speech stops at the current frame."""
        self.barge_ins += 1
        self.cleared = True
        for utterance_id in self.playout.clear():
            self.playback.complete(utterance_id, CLEARED, now)
        self.agent.on_barge_in()

    def outbound(self, now: float) -> bytes | None:
        """The next frame to send, or None (the transport sends silence).

        Utterances queued since the last tick start their playback deadman here.
        """
        playout = self.playout
        for utterance_id, duration_s in playout.take_queued():
            self.playback.started(utterance_id, duration_s, now)
        frame = playout.pop()
        if frame is not None and self._awaiting_agent:
            self._awaiting_agent = False
            self.timers.agent_started(now)
        return frame

    def dtmf(self, event: DtmfEvent) -> None:
        """A key press from the caller."""
        self.dtmf_events += 1
        self.agent.on_dtmf(event)
