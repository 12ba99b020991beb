"""Pipeline: VAD events drive the deadman timers, barge-in and agent start."""

from __future__ import annotations

from collections.abc import Sequence

from voxgate.agents.base import Agent
from voxgate.budget import BufferCaps, SessionBudget
from voxgate.deadman import AgentFallback, DeadmanConfig, SessionTimers
from voxgate.pipeline.pipeline import Pipeline
from voxgate.pipeline.playback import CLEARED, PlaybackTracker
from voxgate.pipeline.playout import Playout
from voxgate.pipeline.vad import SpeechStarted, SpeechStopped, VadEvent, VoiceActivityDetector

F = bytes(320)
CONFIG = DeadmanConfig(first_media_s=10, media_inactivity_s=10, recovery_window_s=10,
                       agent_response_s=1, playback_deadman_s=0.5, max_duration_s=100,
                       ring_timeout_s=0)


class ScriptedVad:
    pause_at: float | None = None

    def __init__(self) -> None:
        self.next: VadEvent | None = None

    def process(self, pcm: bytes, now: float) -> VadEvent | None:
        event, self.next = self.next, None
        return event

    def end_pause_after(self, stop_ms: int) -> SpeechStopped | None:
        return None


class RecordingAgent(Agent):
    def __init__(self, playout: Playout) -> None:
        super().__init__(playout)
        self.events: list[str] = []

    def on_barge_in(self) -> None:
        self.events.append("barge-in")


def make() -> tuple[Pipeline, ScriptedVad, RecordingAgent, SessionTimers, list[tuple[int, str]]]:
    timers = SessionTimers(CONFIG, 0.0)
    timers.answered(0.0)
    playout = Playout(SessionBudget(BufferCaps.from_ms({"playout": 1000}, 1 << 20, 0)))
    agent = RecordingAgent(playout)
    done: list[tuple[int, str]] = []
    vad = ScriptedVad()
    pipeline = Pipeline(vad, agent, playout, timers,
                        PlaybackTracker(timers, lambda u, s: done.append((u, s))))
    return pipeline, vad, agent, timers, done


def test_caller_speech_over_the_agent_cuts_it_off():
    pipeline, vad, agent, _, done = make()
    uid = pipeline.playout.say([F] * 10)
    pipeline.outbound(0.0)
    vad.next = SpeechStarted(at=0.1)
    pipeline.inbound(F, 0.1)
    assert agent.events == ["barge-in"]
    assert done == [(uid, CLEARED)]
    assert pipeline.cleared
    assert pipeline.outbound(0.12) is None


def test_barge_in_can_be_switched_off():
    pipeline, vad, agent, _, done = make()
    pipeline.barge_in = False
    pipeline.playout.say([F] * 10)
    vad.next = SpeechStarted(at=0.1)
    pipeline.inbound(F, 0.1)
    assert agent.events == []
    assert len(pipeline.playout) == 10


def test_agent_silence_after_turn_trips_fallback_and_speech_disarms_it():
    pipeline, vad, _, timers, _ = make()
    vad.next = SpeechStopped(at=1.0, duration_ms=800)
    pipeline.inbound(F, 1.0)
    assert any(isinstance(e, AgentFallback) for e in timers.handle_timer(2.0))
    vad.next = SpeechStopped(at=3.0, duration_ms=800)
    pipeline.inbound(F, 3.0)
    pipeline.playout.push(F)
    pipeline.outbound(3.2)  # the agent started answering
    assert not any(isinstance(e, AgentFallback) for e in timers.handle_timer(4.5))


def test_keys_end_a_turn_and_an_older_answer_still_playing_does_not_count():
    pipeline, _, _, timers, _ = make()
    pipeline.playout.say([F] * 20)  # the answer to the previous turn, still playing
    pipeline.outbound(1.0)
    pipeline.caller_turn_ended(1.0)  # keys complete (the agent reports it)
    for tick in range(10):
        pipeline.outbound(1.02 + tick * 0.02)  # more of the old answer
    assert any(isinstance(e, AgentFallback) for e in timers.handle_timer(2.0))
    pipeline.caller_turn_ended(3.0)
    while pipeline.playout.speaking:
        pipeline.outbound(3.0)  # the rest of the old answer
    pipeline.playout.say([F])  # the new answer
    pipeline.outbound(3.1)
    assert not any(isinstance(e, AgentFallback) for e in timers.handle_timer(4.5))


class EndpointingAgent(Agent):
    """Ends the caller's turn after ``stop_ms`` of each pause; records what it sees."""

    def __init__(self, playout: Playout, stop_ms: int) -> None:
        super().__init__(playout)
        self.stop_ms = stop_ms
        self.asked: list[tuple[float, float]] = []
        self.stopped: list[SpeechStopped] = []

    def endpoint(self, paused_at: float, now: float) -> int | None:
        self.asked.append((paused_at, now))
        return self.stop_ms

    def on_speech(self, event: SpeechStarted | SpeechStopped) -> None:
        if isinstance(event, SpeechStopped):
            self.stopped.append(event)


def test_the_agent_ends_a_pause_early_and_the_turn_ends_as_after_stop_ms(monkeypatch):
    monkeypatch.setattr("voxgate.pipeline.vad.webrtcvad.Vad",
                        lambda mode: type("Loud", (), {"is_speech": lambda s, f, r: f[0] != 0})())
    timers = SessionTimers(CONFIG, 0.0)
    timers.answered(0.0)
    playout = Playout(SessionBudget(BufferCaps.from_ms({"playout": 1000}, 1 << 20, 0)))
    agent = EndpointingAgent(playout, stop_ms=60)
    pipeline = Pipeline(VoiceActivityDetector(start_ms=40, stop_ms=600), agent, playout, timers,
                        PlaybackTracker(timers, lambda u, s: None))
    voiced = b"\x01" + bytes(319)
    frames = [voiced] * 10 + [F] * 5
    for i, pcm in enumerate(frames):
        pipeline.inbound(pcm, i * 0.02)
    assert [(round(at, 2), round(now, 2)) for at, now in agent.asked] == [(0.2, 0.2), (0.2, 0.22)]
    assert agent.stopped == [SpeechStopped(at=0.2, duration_ms=200)]  # at 0.24, not 0.78
    assert any(isinstance(e, AgentFallback) for e in timers.handle_timer(1.25))


class EchoAgent(Agent):
    """Every caller frame straight back, as the echo agent does."""

    def on_frame(self, pcm: bytes, now: float) -> None:
        self.playout.push(pcm)


class OneFrameLeg:
    """A leg delivering ``frames_elapsed`` numbered caller frames a tick; records what is sent."""

    packets_in = packets_out = 0

    def __init__(self) -> None:
        self.sent: list[bytes | None] = []
        self.next_frame = 0

    def receive(self, now: float, frames_elapsed: int) -> tuple[bool, list[bytes]]:
        first = self.next_frame
        self.next_frame += frames_elapsed
        return True, [n.to_bytes(2, "big") * 160 for n in range(first, self.next_frame)]

    def last_sent(self) -> int:
        """The number of the caller frame sent last."""
        frame = self.sent[-1]
        assert frame is not None
        return int.from_bytes(frame[:2], "big")

    def send(self, pcm: bytes | None, finished: Sequence[int], now: float) -> None:
        self.sent.append(pcm)

    def clear(self) -> None: ...

    def close(self) -> None: ...


def test_a_late_tick_costs_the_echo_its_missed_frames_once_not_lasting_latency():
    pipeline, *_ = make()
    playout = pipeline.playout
    pipeline.agent = EchoAgent(playout)
    leg = OneFrameLeg()
    for tick in range(5):
        pipeline.step(leg, tick * 0.02, 1)
    assert leg.last_sent() == 4
    pipeline.step(leg, 0.3, 10)  # the loop was 180 ms late: frames 5..14 arrive at once
    assert leg.last_sent() == 14  # the newest, not frame 5
    assert len(playout) == 0 and playout.skipped_frames == 9
    pipeline.step(leg, 0.32, 1)
    assert leg.last_sent() == 15  # the same latency as before the late tick
