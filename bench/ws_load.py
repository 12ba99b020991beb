"""WebSocket media-stream load benchmark: N concurrent echo streams against one pinned daemon.

Run from the repository root as ``python -m bench.ws_load``. For each N in
``--steps`` a fresh ``voxgated`` (echo agent, ``[websocket] listen`` on a free
port) is pinned to CPU 0 (``taskset -c 0``); this process pins itself to
CPU 1 and runs N media-server clients in one trio run: each connects, sends
``connected`` and ``start``, then streams the looped speech clip as 20 ms
µ-law ``media`` messages on an absolute schedule (the streams start spread
over ``--ramp`` seconds, in four 5 ms phases). The clients are lean: plain
non-blocking sockets and wsproto, one receive task per stream and one sender
task for all. Over the steady window (every stream up, ``--duration`` s) it
measures:

- outbound (daemon → client) message gap p50/p99/max, from client receive times;
- loss: frames sent in the window whose echo never came back;
- echo latency p50/p99: a received payload matched to the frame sent with it;
- daemon CPU (utime+stime over the window) and RSS, RSS per stream;
- the clients' own send lateness p99 (a late client voids the figures).

It prints a table and the largest N meeting gap p99 ≤ 30 ms, gap max ≤ 100 ms,
loss ≤ 0.1 % and echo p99 ≤ 60 ms (``bench/sip_load.py``'s limits) with every
stream up, and stops at the first N that fails. It never asserts.
"""

from __future__ import annotations

import argparse
import base64
import itertools
import json
import os
import socket
import sys
import tempfile
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import trio
import wsproto
from tests.harness.audio import encode_ulaw, make_speech_clip
from tests.harness.daemon import ConfigOverrides, running_daemon
from tests.harness.pcap import percentile
from wsproto.events import AcceptConnection, CloseConnection, Request, TextMessage

from bench.sip_load import DAEMON_CPU, PEER_CPU, cpu_ticks, rss_kib
from bench.table import GAP_P99_LIMIT_MS, Table, within_limits
from voxgate.transports.media_stream import FRAME_BYTES, Connected, Media, Start, serialize

FRAME_S = 0.020
PHASES = 4
"""Streams are split into this many send phases, 5 ms apart."""
_EDGE_S = 1.0
_CLK_TCK = os.sysconf("SC_CLK_TCK")
_RECV_BYTES = 65_536


@dataclass(frozen=True, slots=True)
class StepResult:
    """Figures for one N."""

    sessions: int
    streams_up: int
    gap_p50_ms: float
    gap_p99_ms: float
    gap_max_ms: float
    loss_pct: float
    echo_p50_ms: float
    echo_p99_ms: float
    cpu_pct: float
    rss_kib: int
    idle_rss_kib: int
    client_late_p99_ms: float

    @property
    def rss_per_session_kib(self) -> float:
        return (self.rss_kib - self.idle_rss_kib) / self.sessions

    @property
    def passed(self) -> bool:
        """Every stream up and every limit of the module docstring holds."""
        return self.streams_up == self.sessions and within_limits(
            self.gap_p99_ms, self.gap_max_ms, self.loss_pct, self.echo_p99_ms)


@dataclass
class StreamClient:
    """One media-server connection: a non-blocking socket and its wsproto state."""

    index: int
    sock: socket.socket
    ws: wsproto.WSConnection
    frames: list[bytes]
    next_frame: int = 0
    pending: bytearray = field(default_factory=bytearray)
    sent_at: dict[str, deque[float]] = field(default_factory=dict)
    """Base64 payload → send times not yet matched by an echo."""
    sent: list[tuple[float, str]] = field(default_factory=list)
    received: list[float] = field(default_factory=list)
    echo_s: list[tuple[float, float]] = field(default_factory=list)
    """(send time, latency) of every echoed frame."""
    up: bool = False

    def send_text(self, text: str) -> None:
        """Queue a text message and write what the socket takes now."""
        self.pending += self.ws.send(TextMessage(data=text))
        self.flush()

    def flush(self) -> None:
        try:
            sent = self.sock.send(self.pending)
        except BlockingIOError:
            return
        del self.pending[:sent]


async def open_stream(index: int, port: int, frames: list[bytes]) -> StreamClient:
    """Connect, handshake and send ``connected`` + ``start``."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setblocking(False)
    try:
        sock.connect(("127.0.0.1", port))
    except BlockingIOError:
        await trio.lowlevel.wait_writable(sock)
    ws = wsproto.WSConnection(wsproto.ConnectionType.CLIENT)
    client = StreamClient(index, sock, ws, frames)
    client.pending += ws.send(Request(host="127.0.0.1", target="/media"))
    client.flush()
    while not client.up:
        await trio.lowlevel.wait_readable(sock)
        ws.receive_data(sock.recv(_RECV_BYTES) or None)
        for event in ws.events():
            if not isinstance(event, AcceptConnection):
                raise RuntimeError(f"stream {index}: handshake refused: {event!r}")
            client.up = True
    client.send_text(serialize(Connected()))
    client.send_text(serialize(Start(_sid(index), f"CA{index}", "ACbench")))
    return client


def _sid(index: int) -> str:
    return f"MZ{index:032d}"


async def receive_loop(client: StreamClient) -> None:
    """Time-stamp every media message; match echoes to what was sent."""
    sock, ws = client.sock, client.ws
    while True:
        await trio.lowlevel.wait_readable(sock)
        now = trio.current_time()
        try:
            data = sock.recv(_RECV_BYTES)
        except BlockingIOError:
            continue
        ws.receive_data(data or None)
        for event in ws.events():
            if isinstance(event, TextMessage):
                message = json.loads(event.data)
                if message.get("event") != "media":
                    continue
                client.received.append(now)
                times = client.sent_at.get(message["media"]["payload"])
                if times:
                    sent = times.popleft()
                    client.echo_s.append((sent, now - sent))
            elif isinstance(event, CloseConnection):
                client.up = False
                return
        if not data:
            client.up = False
            return


async def send_loop(clients: list[StreamClient], starts: list[float], stop_at: float,
                    lateness: list[float]) -> None:
    """Every 5 ms send the next frame of the streams in that phase whose start has come."""
    phase_s = FRAME_S / PHASES
    tick = min(starts)
    phase = 0
    while tick < stop_at:
        await trio.sleep_until(tick)
        lateness.append(trio.current_time() - tick)
        for client, start in zip(clients[phase::PHASES], starts[phase::PHASES], strict=True):
            if start > tick or not client.up:
                continue
            chunk = client.next_frame
            frame = client.frames[chunk % len(client.frames)]
            client.next_frame += 1
            text = serialize(Media(_sid(client.index), frame, "inbound", chunk, chunk * 20))
            payload = base64.b64encode(frame).decode()
            now = trio.current_time()
            client.sent_at.setdefault(payload, deque()).append(now)
            client.sent.append((now, payload))
            client.send_text(text)
        tick += phase_s
        phase = (phase + 1) % PHASES


async def drive(sessions: int, port: int, frames: list[bytes], ramp_s: float, duration_s: float,
                pid: int) -> tuple[list[StreamClient], tuple[float, float], float, float, int,
                                   list[float]]:
    """Run the clients; returns them, the steady window, its CPU seconds and wall
    seconds, the RSS mid-window and the send lateness samples."""
    clients: list[StreamClient] = []
    for index in range(sessions):
        offset = (index * 997) % len(frames)  # each stream its own part of the clip
        clients.append(await open_stream(index, port, frames[offset:] + frames[:offset]))
    t0 = trio.current_time() + 0.5
    starts = [t0 + ramp_s * i / sessions for i in range(sessions)]
    stop_at = t0 + ramp_s + duration_s
    lateness: list[float] = []
    async with trio.open_nursery() as nursery:
        for client in clients:
            nursery.start_soon(receive_loop, client)
        nursery.start_soon(send_loop, clients, starts, stop_at, lateness)
        await trio.sleep_until(t0 + ramp_s + _EDGE_S)
        window_start, ticks_start = trio.current_time(), cpu_ticks(pid)
        await trio.sleep(duration_s / 2 - _EDGE_S)
        rss = rss_kib(pid)
        await trio.sleep_until(stop_at - _EDGE_S)
        window_stop, ticks_stop = trio.current_time(), cpu_ticks(pid)
        await trio.sleep_until(stop_at + 1.0)  # the last echoes
        nursery.cancel_scope.cancel()
    for client in clients:
        client.sock.close()
    cpu_s = (ticks_stop - ticks_start) / _CLK_TCK
    return clients, (window_start, window_stop), cpu_s, window_stop - window_start, rss, lateness


def run_step(sessions: int, frames: list[bytes], workdir: Path, duration_s: float,
             ramp_s: float) -> StepResult:
    """One N: fresh pinned daemon, N streams, figures over the steady window."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    overrides: ConfigOverrides = {
        "websocket": {"listen": f"127.0.0.1:{port}"},
        "limits": {"max_sessions": sessions + 50, "drain_timeout_s": 5},
        "log": {"level": "warning"},
    }
    with running_daemon(workdir / "daemon", overrides, cpu=DAEMON_CPU) as daemon:
        time.sleep(1.0)
        idle_rss = rss_kib(daemon.pid)
        clients, window, cpu_s, wall_s, rss, lateness = trio.run(
            drive, sessions, port, frames, ramp_s, duration_s, daemon.pid)
    start, stop = window
    gaps_ms: list[float] = []
    echo_ms: list[float] = []
    sent = lost = 0
    for client in clients:
        times = [t for t in client.received if start <= t <= stop]
        gaps_ms += [(b - a) * 1000 for a, b in itertools.pairwise(times)]
        echo_ms += [lat * 1000 for at, lat in client.echo_s if start <= at <= stop]
        in_window = sum(1 for at, _ in client.sent if start <= at <= stop)
        sent += in_window
        lost += in_window - sum(1 for at, _ in client.echo_s if start <= at <= stop)
    return StepResult(
        sessions=sessions,
        streams_up=sum(client.up for client in clients),
        gap_p50_ms=percentile(gaps_ms, 50),
        gap_p99_ms=percentile(gaps_ms, 99),
        gap_max_ms=max(gaps_ms, default=float("nan")),
        loss_pct=100.0 * lost / sent if sent else 100.0,
        echo_p50_ms=percentile(echo_ms, 50),
        echo_p99_ms=percentile(echo_ms, 99),
        cpu_pct=100.0 * cpu_s / wall_s,
        rss_kib=rss,
        idle_rss_kib=idle_rss,
        client_late_p99_ms=percentile([x * 1000 for x in lateness], 99),
    )


_TABLE: Table[StepResult] = Table((
    ("N", "d", lambda r: r.sessions),
    ("up", "d", lambda r: r.streams_up),
    ("gap50", ".1f", lambda r: r.gap_p50_ms),
    ("gap99", ".1f", lambda r: r.gap_p99_ms),
    ("gapmax", ".1f", lambda r: r.gap_max_ms),
    ("loss%", ".3f", lambda r: r.loss_pct),
    ("echo50", ".1f", lambda r: r.echo_p50_ms),
    ("echo99", ".1f", lambda r: r.echo_p99_ms),
    ("cpu%", ".1f", lambda r: r.cpu_pct),
    ("rssMiB", ".1f", lambda r: r.rss_kib / 1024),
    ("KiB/sess", ".1f", lambda r: r.rss_per_session_kib),
    ("clilate99", ".1f", lambda r: r.client_late_p99_ms),
    ("pass", "s", lambda r: "yes" if r.passed else "NO"),
))


def _warnings(result: StepResult) -> list[str]:
    if result.client_late_p99_ms > GAP_P99_LIMIT_MS - 20:
        return ["the clients sent late: the load generator did not keep up"]
    return []


def main(argv: list[str] | None = None) -> int:
    """Parse options, step through N, print the table and the verdict."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.ws_load", description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--steps", default="25,50,100,150,200,300",
                        help="comma-separated stream counts (default: %(default)s)")
    parser.add_argument("--duration", type=float, default=30.0,
                        help="steady streaming seconds per step, all streams up (default: 30)")
    parser.add_argument("--ramp", type=float, default=5.0,
                        help="seconds over which the streams start (default: 5)")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where to keep configs and logs (default: a temp dir)")
    args = parser.parse_args(argv)
    steps = [int(s) for s in args.steps.split(",") if s.strip()]
    if not {DAEMON_CPU, PEER_CPU} <= os.sched_getaffinity(0):
        print(f"needs CPUs {DAEMON_CPU} and {PEER_CPU}", file=sys.stderr)
        return 2
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="voxgate-wsbench-"))
    clip = make_speech_clip(workdir / "clip")
    ulaw = encode_ulaw(clip.pcm16) * 2  # twice: the 1-sample tail makes the second pass unique
    frames = [ulaw[i:i + FRAME_BYTES] for i in range(0, len(ulaw) - FRAME_BYTES + 1, FRAME_BYTES)]
    os.sched_setaffinity(0, {PEER_CPU})
    print(f"workdir {workdir}; clip {clip.duration_s:.2f} s; daemon on CPU {DAEMON_CPU}, "
          f"clients on CPU {PEER_CPU}")
    _TABLE.step_through(
        steps, lambda n: run_step(n, frames, workdir / f"n{n}", args.duration, args.ramp),
        _warnings, "stream")
    return 0


if __name__ == "__main__":
    sys.exit(main())
