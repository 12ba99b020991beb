"""The shared media clock and the RTP port pool."""

from __future__ import annotations

import socket
import time

import trio

from voxgate.transports.rtp_media import MediaClock, PortPool


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


def test_port_pool_even_ports_exhaustion_and_release():
    pool = PortPool("127.0.0.1", 41001, 41006)  # even ports 41002, 41004, 41006
    assert pool.capacity == 3
    socks = [pool.open_socket() for _ in range(3)]
    assert all(s is not None for s in socks)
    ports = sorted(s.getsockname()[1] for s in socks if s is not None)
    assert ports == [41002, 41004, 41006]
    assert pool.open_socket() is None
    assert pool.exhausted == 1
    first = socks[0]
    assert first is not None
    pool.release(first)
    again = pool.open_socket()
    assert again is not None
    for s in [again, *socks[1:]]:
        assert s is not None
        pool.release(s)
    assert pool.available == 3


def test_port_pool_skips_ports_held_by_others():
    holder = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    holder.bind(("127.0.0.1", 41102))
    try:
        pool = PortPool("127.0.0.1", 41102, 41104)
        sock = pool.open_socket()
        assert sock is not None
        assert sock.getsockname()[1] == 41104
        pool.release(sock)
    finally:
        holder.close()
