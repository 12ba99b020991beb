"""The shared 20 ms media clock: one Trio task that ticks every session.

Design (measured, see ``bench/sip_load.py``): a task switch costs tens of
microseconds in Trio, so there is no task per packet and no task per session
on the media path. One :class:`MediaClock` task wakes on an absolute 20 ms
schedule and *ticks* every attached session in turn: the session's leg takes
what arrived (a non-blocking UDP socket, a capture buffer …), the session
runs its pipeline on the frames due and the leg sends one frame. At 300 calls
that is one wake-up per 20 ms instead of 30 000 task switches a second. The
clock never bursts to catch up: when the loop was late by whole frames it
ticks once and tells the sessions how many frames elapsed, and the skip is
counted. Each tick's wake-up lag and the CPU time the event loop's thread
used since the previous tick (ticking sessions, but also SIP, control,
records and garbage collection: all of it delays the next tick) go to a
:class:`~voxgate.pipeline.media_load.MediaLoad`, whose verdict admission
heeds.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol

import trio

from voxgate.pipeline.frames import FRAME_S
from voxgate.pipeline.media_load import MediaLoad


class Ticked(Protocol):
    """Something the media clock ticks: one session."""

    def tick(self, now: float, frames_elapsed: int) -> None:
        """One 20 ms step of the session's media. Must not block."""

    def fail(self, exc: BaseException) -> None:
        """``tick`` raised: end this session with reason ``error``."""


class MediaClock:
    """One task that ticks every attached session every 20 ms."""

    def __init__(
        self, frame_s: float = FRAME_S, check_in: Callable[[str], None] = lambda task: None,
        load: MediaLoad | None = None, on_load: Callable[[MediaLoad], None] = lambda load: None,
    ) -> None:
        self.frame_s = frame_s
        self._check_in = check_in
        self.load = MediaLoad(1.0, 1.0) if load is None else load
        """Utilisation and wake-up lag; ``on_load`` is called with it once a window."""
        self._on_load = on_load
        self._legs: dict[int, Ticked] = {}
        self.ticks = 0
        self.frames_skipped = 0

    def attach(self, leg: Ticked) -> None:
        """Start ticking ``leg`` from the next tick on."""
        self._legs[id(leg)] = leg

    def detach(self, leg: Ticked) -> None:
        """Stop ticking ``leg`` (idempotent)."""
        self._legs.pop(id(leg), None)

    def __len__(self) -> int:
        return len(self._legs)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Tick forever on an absolute schedule; cancellation stops it between ticks."""
        frame = self.frame_s
        next_tick = trio.current_time() + frame
        cpu_s = time.thread_time()
        task_status.started()
        while True:
            await trio.sleep_until(next_tick)
            now = trio.current_time()
            lag_s = now - next_tick
            late_frames = int(lag_s / frame)
            frames_elapsed = 1 + late_frames
            self.frames_skipped += late_frames
            self.ticks += 1
            self._check_in("media")
            for leg in list(self._legs.values()):
                try:
                    leg.tick(now, frames_elapsed)
                except Exception as exc:
                    self.detach(leg)
                    leg.fail(exc)
            cpu_before_s, cpu_s = cpu_s, time.thread_time()
            if self.load.tick(now, lag_s, cpu_s - cpu_before_s):
                self._on_load(self.load)
            next_tick += frame * frames_elapsed
