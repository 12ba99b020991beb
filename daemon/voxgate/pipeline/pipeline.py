"""A session's audio pipeline: VAD, then the agent; the playout queue out.

Sans-IO: the transport's tick hands in one inbound 20 ms PCM16 frame and
takes out one outbound frame. The stages are called in-line because at 20 ms
per frame a channel hop per stage would cost more than the work itself;
stages that need time (recognition, synthesis) live in the agent's own task.
"""

from __future__ import annotations

from voxgate.agents.base import Agent
from voxgate.pipeline.playout import Playout
from voxgate.pipeline.vad import SpeechStarted, VoiceActivityDetector
from voxgate.rtp.dtmf import DtmfEvent


class Pipeline:
    """VAD → agent → playout for one session."""

    __slots__ = ("agent", "dtmf_events", "playout", "speech_turns", "vad")

    def __init__(self, vad: VoiceActivityDetector, agent: Agent, playout: Playout) -> None:
        self.vad = vad
        self.agent = agent
        self.playout = playout
        self.speech_turns = 0
        self.dtmf_events = 0

    def inbound(self, pcm: bytes, now: float) -> None:
        """One inbound frame (320 bytes: 20 ms of 8 kHz 16-bit mono PCM)."""
        event = self.vad.process(pcm, now)
        if event is not None:
            if isinstance(event, SpeechStarted):
                self.speech_turns += 1
            self.agent.on_speech(event)
        self.agent.on_frame(pcm, now)

    def outbound(self) -> bytes | None:
        """The next frame to send, or None (the transport sends silence)."""
        return self.playout.pop()

    def dtmf(self, event: DtmfEvent) -> None:
        """A key press from the caller."""
        self.dtmf_events += 1
        self.agent.on_dtmf(event)
