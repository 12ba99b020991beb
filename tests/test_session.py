"""Session life cycle with a fake transport and trio's MockClock."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from voxgate.agents.base import Agent
from voxgate.pipeline.playout import Playout
from voxgate.session import Session
from voxgate.transports.rtp_media import MediaClock


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
    def __init__(self, *, fail_after: int | None = None, timeout_after: int | None = None):
        self.ticks = 0
        self.closed = 0
        self.fail_after = fail_after
        self.timeout_after = timeout_after
        self.packets_in = 0
        self.packets_out = 0

    def tick(self, now: float, frames_elapsed: int) -> str | None:
        self.ticks += 1
        if self.fail_after is not None and self.ticks >= self.fail_after:
            raise RuntimeError("boom")
        if self.timeout_after is not None and self.ticks >= self.timeout_after:
            return "media-timeout"
        return None

    def close(self) -> None:
        self.closed += 1


class SlowAgent(Agent):
    cancelled = False

    async def run(self) -> None:
        try:
            await trio.sleep_forever()
        finally:
            SlowAgent.cancelled = True


def make(clock: MediaClock, media: FakeMedia, *, delay_s: float = 0, max_s: float = 60,
         agent: Agent | None = None) -> tuple[Session, FakeSignaling]:
    signaling = FakeSignaling()
    session = Session(
        session_id="s1", call_id="c1", transport="test", codec="PCMU", signaling=signaling,
        media=media, agent=agent or Agent(Playout(5)), clock=clock, answer_delay_s=delay_s,
        max_duration_s=max_s,
    )
    return session, signaling


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
    session, signaling = make(clock, media, max_s=2.0, agent=SlowAgent(Playout(5)))
    await run_with_clock(session, clock)
    assert session.end_reason == "max-duration"
    assert signaling.calls == ["answer", "hangup:max-duration", "release"]
    assert media.closed == 1
    assert len(clock) == 0
    assert SlowAgent.cancelled
    assert 95 <= media.ticks <= 101  # 2 s of 20 ms ticks


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
    good, good_sig = make(clock, FakeMedia(), max_s=5)
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


async def test_media_timeout_reason(autojump_clock):
    clock = MediaClock()
    session, signaling = make(clock, FakeMedia(timeout_after=10))
    await run_with_clock(session, clock)
    assert session.end_reason == "media-timeout"
    assert signaling.calls[-2:] == ["hangup:media-timeout", "release"]
