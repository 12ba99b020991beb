"""Trio driver for RTP media: the port pool and the shared 20 ms media clock.

Design (measured, see ``bench/sip_load.py``): a task switch costs tens of
microseconds in Trio, so there is no task per packet and no task per session
on the media path. One :class:`MediaClock` task wakes on an absolute 20 ms
schedule and *ticks* every attached media leg in turn: the leg drains its
non-blocking UDP socket into its jitter buffer, runs the pipeline on one
frame and sends one packet. At 300 calls that is one wake-up per 20 ms
instead of 30 000 task switches a second. The clock never bursts to catch up:
when the loop was late by whole frames it ticks once and tells the legs how
many frames elapsed, and the skip is counted.
"""

from __future__ import annotations

import errno
import logging
import socket
from collections import deque
from collections.abc import Callable
from typing import Protocol

import trio

from voxgate.logging import log_event

FRAME_S = 0.020
"""One media frame: 20 ms (ptime 20, RFC 3551 §4.5 default for G.711)."""


class MediaLeg(Protocol):
    """Something the media clock ticks: one session's media transport."""

    def tick(self, now: float, frames_elapsed: int) -> None:
        """Receive what arrived, process one frame, send one frame. Must not block."""

    def fail(self, exc: BaseException) -> None:
        """``tick`` raised: end this leg's session with reason ``error``."""


class MediaClock:
    """One task that ticks every attached :class:`MediaLeg` every 20 ms."""

    def __init__(
        self, frame_s: float = FRAME_S, check_in: Callable[[str], None] = lambda task: None
    ) -> None:
        self.frame_s = frame_s
        self._check_in = check_in
        self._legs: dict[int, MediaLeg] = {}
        self.ticks = 0
        self.frames_skipped = 0

    def attach(self, leg: MediaLeg) -> None:
        """Start ticking ``leg`` from the next tick on."""
        self._legs[id(leg)] = leg

    def detach(self, leg: MediaLeg) -> None:
        """Stop ticking ``leg`` (idempotent)."""
        self._legs.pop(id(leg), None)

    def __len__(self) -> int:
        return len(self._legs)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Tick forever on an absolute schedule; cancellation stops it between ticks."""
        frame = self.frame_s
        next_tick = trio.current_time() + frame
        task_status.started()
        while True:
            await trio.sleep_until(next_tick)
            now = trio.current_time()
            late_frames = int((now - next_tick) / frame)
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
            next_tick += frame * frames_elapsed


class PortPool:
    """RTP ports from ``[rtp] port_min..port_max``: even ports (RFC 3550 §11).

    :meth:`open_socket` binds a non-blocking UDP socket on a free port or
    returns None when every port is taken (the caller answers 503). Ports
    another process holds are skipped and tried again later.
    """

    def __init__(self, address: str, port_min: int, port_max: int) -> None:
        self.address = address
        self.family = socket.AF_INET6 if ":" in address else socket.AF_INET
        first = port_min + (port_min % 2)
        self._free: deque[int] = deque(range(first, port_max + 1, 2))
        self.capacity = len(self._free)
        self.exhausted = 0

    @property
    def available(self) -> int:
        return len(self._free)

    def open_socket(self) -> socket.socket | None:
        """A bound, non-blocking UDP socket, or None when the pool is exhausted."""
        for _ in range(len(self._free)):
            port = self._free.popleft()
            sock = socket.socket(self.family, socket.SOCK_DGRAM)
            try:
                sock.setblocking(False)
                sock.bind((self.address, port))
            except OSError as e:
                sock.close()
                self._free.append(port)
                if e.errno != errno.EADDRINUSE:
                    raise
                continue
            return sock
        self.exhausted += 1
        log_event(logging.WARNING, "rtp_ports_exhausted", "no free RTP port",
                  capacity=self.capacity)
        return None

    def release(self, sock: socket.socket) -> None:
        """Close ``sock`` and return its port to the pool (call once per socket)."""
        port = sock.getsockname()[1]
        sock.close()
        self._free.append(port)
