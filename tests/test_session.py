"""Session life cycle with a fake transport and trio's MockClock."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Awaitable, Callable, Sequence

import pytest
import trio
import trio.testing

from voxgate.agents.base import Agent
from voxgate.agents.transfer import TransferFailure
from voxgate.budget import BufferCaps, SessionBudget
from voxgate.deadman import DeadmanConfig, SessionTimers
from voxgate.end_reasons import EndReason
from voxgate.errors import LocalProtocolError
from voxgate.pipeline.clock import MediaClock
from voxgate.pipeline.pipeline import Pipeline
from voxgate.pipeline.playback import PlaybackTracker
from voxgate.pipeline.playout import Playout
from voxgate.pipeline.vad import VoiceActivityDetector
from voxgate.session import Session, SessionCore

FRAME = bytes(320)


class FakeSignaling:
    def __init__(self) -> None:
        self.calls: list[str] = []

    def ring(self) -> None:
        self.calls.append("ring")

    def answer(self) -> None:
        self.calls.append("answer")

    def refuse(self, reason: str) -> None:
        self.calls.append(f"refuse:{reason}")

    def hangup(self, reason: str) -> None:
        self.calls.append(f"hangup:{reason}")

    def release(self) -> None:
        self.calls.append("release")


class FakeMedia:
    """Media arrives on every tick except those listed in ``silent_ticks``."""

    def __init__(self, *, fail_after: int | None = None, silent_ticks: range = range(0)):
        self.ticks = 0
        self.closed = 0
        self.fail_after = fail_after
        self.silent_ticks = silent_ticks
        self.packets_in = 0
        self.packets_out = 0
        self.sent: list[bytes | None] = []

    def receive(self, now: float, frames_elapsed: int) -> tuple[bool, list[bytes]]:
        self.ticks += 1
        if self.fail_after is not None and self.ticks >= self.fail_after:
            raise RuntimeError("boom")
        return self.ticks not in self.silent_ticks, []

    def send(self, pcm: bytes | None, finished: Sequence[int], now: float) -> None:
        self.sent.append(pcm)

    def clear(self) -> None:
        pass

    def close(self) -> None:
        self.closed += 1


class SlowAgent(Agent):
    cancelled = False

    async def run(self) -> None:
        try:
            await trio.sleep_forever()
        finally:
            SlowAgent.cancelled = True


class FloodAgent(Agent):
    def flood(self) -> None:
        for _ in range(5):
            self.playout.push(FRAME)


class TransferAgent(Agent):
    def __init__(self, playout: Playout) -> None:
        super().__init__(playout)
        self.failures: list[TransferFailure] = []

    def transfer_failed(self, failure: TransferFailure) -> None:
        self.failures.append(failure)


TIMERS = DeadmanConfig(first_media_s=2, media_inactivity_s=1, recovery_window_s=2,
                       agent_response_s=1, playback_deadman_s=0.5, max_duration_s=60,
                       ring_timeout_s=30)


def make(clock: MediaClock, media: FakeMedia, *, delay_s: float = 0, max_s: float = 60,
         agent_cls: type[Agent] = Agent, session_bytes: int = 1 << 20,
         prompt: tuple[bytes, ...] = (),
         connect: Callable[[], Awaitable[EndReason | None]] | None = None,
         transfer_to: Callable[[str], None] | None = None,
         ) -> tuple[Session, FakeSignaling]:
    signaling = FakeSignaling()
    budget = SessionBudget(BufferCaps.from_ms({"playout": 1000}, session_bytes, 500))
    playout = Playout(budget)
    timers = SessionTimers(_with_max(max_s), trio.current_time())
    agent = agent_cls(playout)
    tracker = PlaybackTracker(timers, lambda uid, signal: None)
    core = SessionCore(budget, timers, playout, agent,
                       Pipeline(VoiceActivityDetector(), agent, playout, timers, tracker))
    session = Session(
        session_id="s1", call_id="c1", transport="test", codec="PCMU", signaling=signaling,
        media=media, core=core, clock=clock, answer_delay_s=delay_s, fallback_prompt=prompt,
        connect=connect,
        transfer_to=transfer_to,
    )
    return session, signaling


def _with_max(max_s: float) -> DeadmanConfig:
    t = TIMERS
    return DeadmanConfig(t.first_media_s, t.media_inactivity_s, t.recovery_window_s,
                         t.agent_response_s, t.playback_deadman_s, max_s, t.ring_timeout_s)


@pytest.fixture
def autojump_clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


async def run_with_clock(session: Session, clock: MediaClock) -> None:
    async with trio.open_nursery() as nursery:
        await nursery.start(clock.run)
        await session.run()
        nursery.cancel_scope.cancel()


async def test_max_duration_hangs_up_and_cleans_up(autojump_clock):
    clock = MediaClock()
    media = FakeMedia()
    session, signaling = make(clock, media, max_s=2.0, agent_cls=SlowAgent)
    await run_with_clock(session, clock)
    assert session.end_reason == "max-duration"
    assert signaling.calls == ["answer", "hangup:max-duration", "release"]
    assert media.closed == 1
    assert len(clock) == 0
    assert SlowAgent.cancelled
    assert 95 <= media.ticks <= 101  # 2 s of 20 ms ticks


async def test_an_ended_session_is_freed_without_the_cycle_collector(autojump_clock):
    clock = MediaClock()
    session, _ = make(clock, FakeMedia(), max_s=1.0)
    ref = weakref.ref(session)
    gc.disable()
    try:
        await run_with_clock(session, clock)
        assert session.end_reason == "max-duration"
        del session
        assert ref() is None
    finally:
        gc.enable()


async def test_peer_bye_sends_no_bye(autojump_clock):
    clock = MediaClock()
    session, signaling = make(clock, FakeMedia())
    async with trio.open_nursery() as nursery:
        await nursery.start(clock.run)
        nursery.start_soon(session.run)
        await trio.sleep(1)
        session.end("bye")
        session.end("shutdown")  # the first reason wins
        await trio.sleep(1)
        nursery.cancel_scope.cancel()
    assert session.end_reason == "bye"
    assert signaling.calls == ["answer", "release"]
    assert session.state == "ended"


async def test_cancel_while_ringing(autojump_clock):
    clock = MediaClock()
    session, signaling = make(clock, FakeMedia(), delay_s=5)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(session.run)
        await trio.sleep(1)
        session.end("cancel")
    assert signaling.calls == ["ring", "release"]
    assert session.answered_at is None


async def test_ring_timeout_refuses(autojump_clock):
    clock = MediaClock()
    session, signaling = make(clock, FakeMedia(), delay_s=100)
    await run_with_clock(session, clock)
    assert session.end_reason == "ring-timeout"
    assert signaling.calls == ["ring", "refuse:ring-timeout", "release"]


async def test_shutdown_while_ringing_refuses(autojump_clock):
    clock = MediaClock()
    session, signaling = make(clock, FakeMedia(), delay_s=5)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(session.run)
        await trio.sleep(1)
        session.end("shutdown")
    assert signaling.calls == ["ring", "refuse:shutdown", "release"]


async def test_media_failure_is_contained(autojump_clock):
    clock = MediaClock()
    bad, bad_sig = make(clock, FakeMedia(fail_after=3))
    good, _ = make(clock, FakeMedia(), max_s=5)
    async with trio.open_nursery() as nursery:
        await nursery.start(clock.run)
        nursery.start_soon(bad.run)
        nursery.start_soon(good.run)
        await trio.sleep(1)
        assert bad.end_reason == "error"
        assert good.end_reason is None
        good.end("bye")
        await trio.sleep(0.1)
        nursery.cancel_scope.cancel()
    assert bad_sig.calls == ["answer", "hangup:error", "release"]


async def test_pause_shorter_than_window_recovers(autojump_clock):
    clock = MediaClock()
    media = FakeMedia(silent_ticks=range(10, 110))  # 2 s gap: > 1 s inactivity, < 1 + 2 s
    session, signaling = make(clock, media, max_s=4)
    await run_with_clock(session, clock)
    assert session.end_reason == "max-duration"
    assert session.timers.stats.pauses == 1
    assert session.timers.stats.recoveries == 1


async def test_media_gone_for_good_ends_after_inactivity_plus_window(autojump_clock):
    clock = MediaClock()
    media = FakeMedia(silent_ticks=range(10, 10_000))
    session, signaling = make(clock, media)
    await run_with_clock(session, clock)
    assert session.end_reason == "media-timeout"
    # last media at 0.2 s; paused at 1.2 s; ended at 3.2 s
    assert 155 <= media.ticks <= 165
    assert signaling.calls[-2:] == ["hangup:media-timeout", "release"]


async def test_agent_fallback_plays_the_prompt(autojump_clock):
    clock = MediaClock()
    media = FakeMedia()
    prompt = (b"\x01" * 320, b"\x02" * 320)
    session, _ = make(clock, media, max_s=3, prompt=prompt)
    async with trio.open_nursery() as nursery:
        await nursery.start(clock.run)
        nursery.start_soon(session.run)
        await trio.sleep(0.5)
        session.timers.caller_turn_ended(trio.current_time())
        await trio.sleep(1.5)
        assert prompt[0] in media.sent and prompt[1] in media.sent
        assert session.timers.stats.agent_fallbacks == 1
        session.end("bye")
        await trio.sleep(0.1)
        nursery.cancel_scope.cancel()


async def test_runaway_agent_is_dropped_then_ended_for_budget(autojump_clock):
    clock = MediaClock()
    media = FakeMedia()
    session, signaling = make(clock, media, agent_cls=FloodAgent, session_bytes=8000)
    agent = session.agent
    assert isinstance(agent, FloodAgent)
    async with trio.open_nursery() as nursery:
        await nursery.start(clock.run)
        nursery.start_soon(session.run)
        while session.end_reason is None:
            agent.flood()
            await trio.sleep(0.02)
        nursery.cancel_scope.cancel()
    assert session.end_reason == "budget"
    assert session.budget.drops_frames["playout"] > 0
    # the playout cap (1000 ms of PCM16) plus the one frame pushed before the drop
    assert session.budget.peak_bytes <= 16000 + 320
    assert signaling.calls[-2:] == ["hangup:budget", "release"]


def dialling(after_s: float, outcome: EndReason | None,
             log: list[str]) -> Callable[[], Awaitable[EndReason | None]]:
    """An outbound call's ``connect``: ``outcome`` after ``after_s`` (or cancelled)."""
    async def connect() -> EndReason | None:
        try:
            await trio.sleep(after_s)
        except trio.Cancelled:
            log.append("dial cancelled")
            raise
        log.append("dialled")
        return outcome
    return connect


async def test_outbound_answers_when_connect_returns(autojump_clock):
    clock = MediaClock()
    log: list[str] = []
    session, signaling = make(clock, FakeMedia(), max_s=10,
                              connect=dialling(3, None, log))
    await run_with_clock(session, clock)
    assert log == ["dialled"]
    assert session.answered_at is not None
    assert session.answered_at - session.started_at == pytest.approx(3)
    assert signaling.calls == ["answer", "hangup:max-duration", "release"]


async def test_outbound_not_answered_ends_with_connects_reason(autojump_clock):
    clock = MediaClock()
    log: list[str] = []
    session, signaling = make(clock, FakeMedia(), connect=dialling(1, "callee-busy", log))
    await run_with_clock(session, clock)
    assert session.end_reason == "callee-busy"
    assert session.answered_at is None
    assert signaling.calls == ["release"]  # the callee said no: nothing to cancel


async def test_outbound_ended_while_dialling_cancels_the_dial(autojump_clock):
    clock = MediaClock()
    log: list[str] = []
    session, signaling = make(clock, FakeMedia(), connect=dialling(100, None, log))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(session.run)
        await trio.sleep(1)
        session.end("operator")
    assert log == ["dial cancelled"]
    assert signaling.calls == ["refuse:operator", "release"]


async def test_a_transfer_is_checked_and_every_failure_told_to_the_agent():
    sent: list[str] = []

    def transfer_to(target: str) -> None:
        if "busy" in target:
            raise LocalProtocolError("already being transferred")
        sent.append(target)

    session, _ = make(MediaClock(), FakeMedia(), agent_cls=TransferAgent,
                      transfer_to=transfer_to)
    agent = session.agent
    assert isinstance(agent, TransferAgent)
    for target in "tel:+15551234", "<sip:human@192.0.2.1>", "sip:" + "h" * 600 + "@x":
        session.transfer(target)
    session.transfer("sip:human@192.0.2.1")
    session.transfer("sip:busy@192.0.2.1")
    assert sent == ["sip:human@192.0.2.1"]
    assert [(f.status, f.reason) for f in agent.failures] == [
        (400, "bad-target"), (400, "bad-target"), (400, "bad-target"), (None, "refused")]
    assert agent.failures[-1].target == "sip:busy@192.0.2.1"


async def test_a_transport_without_transfer_fails_with_501():
    session, _ = make(MediaClock(), FakeMedia(), agent_cls=TransferAgent)
    session.transfer("sip:human@192.0.2.1")
    assert isinstance(session.agent, TransferAgent)
    assert session.agent.failures == [
        TransferFailure("sip:human@192.0.2.1", 501, "not-supported")]
