"""The shared media clock."""

from __future__ import annotations

import time

import trio

from voxgate.pipeline.clock import MediaClock
from voxgate.pipeline.media_load import MediaLoad


class Leg:
    def __init__(self) -> None:
        self.elapsed: list[int] = []
        self.failed: BaseException | None = None

    def tick(self, now: float, frames_elapsed: int) -> None:
        self.elapsed.append(frames_elapsed)

    def fail(self, exc: BaseException) -> None:
        self.failed = exc


async def test_ticks_every_20ms_without_drift():
    clock = MediaClock()
    leg = Leg()
    async with trio.open_nursery() as nursery:
        await nursery.start(clock.run)
        clock.attach(leg)
        await trio.sleep(1.0)
        nursery.cancel_scope.cancel()
    assert 45 <= len(leg.elapsed) <= 51


async def test_late_loop_skips_frames_instead_of_bursting():
    clock = MediaClock()
    leg = Leg()
    async with trio.open_nursery() as nursery:
        await nursery.start(clock.run)
        clock.attach(leg)
        await trio.sleep(0.05)
        time.sleep(0.1)  # noqa: ASYNC251 - block the event loop for 5 frames on purpose
        await trio.sleep(0.05)
        nursery.cancel_scope.cancel()
    assert max(leg.elapsed) >= 4
    assert clock.frames_skipped >= 3


async def test_failing_leg_is_detached_and_told():
    clock = MediaClock()

    class Bad(Leg):
        def tick(self, now: float, frames_elapsed: int) -> None:
            raise ValueError("bad leg")

    bad, good = Bad(), Leg()
    async with trio.open_nursery() as nursery:
        await nursery.start(clock.run)
        clock.attach(bad)
        clock.attach(good)
        await trio.sleep(0.1)
        nursery.cancel_scope.cancel()
    assert isinstance(bad.failed, ValueError)
    assert len(clock) == 1
    assert len(good.elapsed) >= 3



async def _utilisation_beside(burn: bool) -> float:
    """The second window's utilisation while another task burns 5 ms of CPU every
    20 ms (``burn``) or only sleeps."""
    reports: list[float] = []
    two_windows = trio.Event()

    def report(load: MediaLoad) -> None:
        reports.append(load.utilisation)
        if len(reports) == 2:
            two_windows.set()

    async def busy() -> None:
        while True:
            started = time.thread_time()
            while burn and time.thread_time() - started < 0.005:
                pass
            await trio.sleep(0.015 if burn else 0.02)

    clock = MediaClock(on_load=report)
    async with trio.open_nursery() as nursery:
        await nursery.start(clock.run)
        nursery.start_soon(busy)
        await two_windows.wait()
        nursery.cancel_scope.cancel()
    return reports[1]


async def test_utilisation_counts_the_loops_cpu_between_ticks_not_only_ticking():
    """Work that is not a session's tick (SIP, control, GC) still takes the loop from
    the calls, so it counts: with empty ticks, a task burning a quarter of the time
    shows (a sleeping one does not)."""
    assert await _utilisation_beside(burn=False) < 0.1
    assert 0.1 < await _utilisation_beside(burn=True) < 0.6
