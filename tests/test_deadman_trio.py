"""The deadman timers end to end under a small Trio driver, in virtual time.

The driver is the lead's lifecycle loop in miniature: sleep until
``next_deadline()`` or a wake-up, then ``handle_timer(trio.current_time())``.
A fake media clock calls ``on_media`` every 20 ms while "the peer sends".
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable

import pytest
import trio
import trio.testing

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

CONFIG = DeadmanConfig(
    first_media_s=2.0,
    media_inactivity_s=1.0,
    recovery_window_s=3.0,
    agent_response_s=3.0,
    playback_deadman_s=0.5,
    max_duration_s=20.0,
    ring_timeout_s=30.0,
)
FRAME_S = 0.02


@pytest.fixture
def autojump_clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


class Driver:
    """Runs one session's timers; ``wake()`` after an input that may move a deadline earlier."""

    def __init__(self, timers: SessionTimers) -> None:
        self.timers = timers
        self.events: list[tuple[float, TimerEvent]] = []
        self._wake = trio.Event()

    def wake(self) -> None:
        self._wake.set()

    def note(self, event: TimerEvent) -> None:
        self.events.append((trio.current_time(), event))

    async def run(self) -> None:
        while self.timers.state != "ended":
            deadline = self.timers.next_deadline()
            with trio.move_on_at(math.inf if deadline is None else deadline):
                await self._wake.wait()
            self._wake = trio.Event()
            for event in self.timers.handle_timer(trio.current_time()):
                self.note(event)


class PeerMedia:
    """The shared media clock's view of one call: a packet every 20 ms while ``sending``."""

    def __init__(self, *, sending: bool = True) -> None:
        self.sending = sending

    async def run(self, driver: Driver) -> None:
        timers = driver.timers
        next_tick = trio.current_time()
        while timers.state != "ended":
            next_tick += FRAME_S
            await trio.sleep_until(next_tick)
            if self.sending:
                recovered = timers.on_media(trio.current_time())
                if recovered is not None:
                    driver.note(recovered)
                    driver.wake()


Script = Callable[[Driver], Awaitable[None]]


async def run_call(script: Script, media: PeerMedia | None = None) -> Driver:
    """Run a call from its arrival at virtual time 0 until its End."""
    assert trio.current_time() == 0.0
    driver = Driver(SessionTimers(CONFIG, 0.0))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(driver.run)
        if media is not None:
            nursery.start_soon(media.run, driver)
        await script(driver)
    assert driver.timers.state == "ended"
    return driver


async def answer_at(driver: Driver, at: float) -> None:
    await trio.sleep_until(at)
    driver.timers.answered(at)
    driver.wake()


async def test_ring_timeout(autojump_clock):
    async def never_answered(driver: Driver) -> None:
        pass

    assert (await run_call(never_answered)).events == [(30.0, End("ring-timeout", 30.0))]


async def test_no_media(autojump_clock):
    async def script(driver: Driver) -> None:
        await answer_at(driver, 1.0)

    driver = await run_call(script, PeerMedia(sending=False))
    assert driver.events == [(3.0, End("no-media", 3.0))]


async def test_max_duration_with_media_flowing(autojump_clock):
    async def script(driver: Driver) -> None:
        await answer_at(driver, 1.0)

    assert (await run_call(script, PeerMedia())).events == [(21.0, End("max-duration", 21.0))]


async def test_pause_recovery_then_media_timeout(autojump_clock):
    media = PeerMedia()
    states: list[str] = []

    async def script(driver: Driver) -> None:
        await answer_at(driver, 0.0)
        await trio.sleep_until(2.01)  # last packet at 2.00
        media.sending = False
        await trio.sleep_until(3.51)  # paused at 3.00
        states.append(driver.timers.state)
        media.sending = True  # back at 3.52
        await trio.sleep_until(5.01)
        states.append(driver.timers.state)
        media.sending = False  # last packet at 5.00: paused at 6.00, ended at 9.00

    driver = await run_call(script, media)
    events = driver.events
    assert states == ["paused", "active"]
    assert [type(e) for _, e in events] == [Paused, Recovered, Paused, End]
    (t_pause, pause), (t_back, back), (t_pause2, _), (t_end, end) = events
    assert isinstance(back, Recovered)
    assert isinstance(end, End)
    assert t_pause == pause.at == pytest.approx(3.0)
    assert t_back == back.at == pytest.approx(3.52)
    assert back.paused_s == pytest.approx(0.52)
    assert t_pause2 == pytest.approx(6.0)
    assert end.reason == "media-timeout"
    assert t_end == end.at == pytest.approx(9.0)
    stats = driver.timers.stats
    assert (stats.pauses, stats.recoveries) == (2, 1)


async def test_hold_suspends_media_timers(autojump_clock):
    media = PeerMedia()

    async def script(driver: Driver) -> None:
        await answer_at(driver, 0.0)
        await trio.sleep_until(1.01)
        media.sending = False
        driver.timers.media_expected(False, trio.current_time())
        driver.wake()

    driver = await run_call(script, media)
    assert driver.events == [(20.0, End("max-duration", 20.0))]


async def test_agent_fallback_and_a_turn_answered_in_time(autojump_clock):
    async def script(driver: Driver) -> None:
        timers = driver.timers
        await answer_at(driver, 0.0)
        await trio.sleep_until(4.0)
        timers.caller_turn_ended(4.0)  # fallback at 7.0
        driver.wake()
        await trio.sleep_until(10.0)
        timers.caller_turn_ended(10.0)
        driver.wake()
        await trio.sleep_until(12.0)
        timers.agent_started(12.0)  # in time: no fallback at 13.0

    driver = await run_call(script, PeerMedia())
    assert driver.events == [(7.0, AgentFallback(7.0)), (20.0, End("max-duration", 20.0))]
    assert driver.timers.stats.agent_fallbacks == 1


async def test_playback_deadman_names_the_utterance(autojump_clock):
    async def script(driver: Driver) -> None:
        timers = driver.timers
        await answer_at(driver, 0.0)
        await trio.sleep_until(2.0)
        timers.playback_started(1, 1.5, 2.0)  # due 4.0
        timers.playback_started(2, 3.0, 2.0)  # due 5.5
        driver.wake()
        await trio.sleep_until(3.5)
        timers.playback_completed(1, 3.5)

    driver = await run_call(script, PeerMedia())
    assert driver.events == [(5.5, PlaybackDeadman(5.5, 2)), (20.0, End("max-duration", 20.0))]
    assert driver.timers.stats.playback_deadmans == 1
