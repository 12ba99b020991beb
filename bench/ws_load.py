"""WebSocket media-stream load benchmark: N concurrent echo streams against one pinned daemon.

Run from the repository root as ``python -m bench.ws_load``. For each N in
``--steps``, ``--runs`` times, a fresh ``voxgated`` (echo agent, ``[websocket]
listen`` on a free port) is pinned to CPU 0 (``taskset -c 0``); this process
pins itself to CPU 1 and runs N media-server clients: each connects, sends
``connected`` and ``start``, then streams the looped speech clip as 20 ms
µ-law ``media`` messages (Twilio's layout, filled into a template) on an
absolute schedule (the streams start spread over ``--ramp`` seconds, in four
5 ms phases); ``--no-load-gate`` lets admission ignore the media clock's load
(raw capacity). The daemon's main thread and the clients run SCHED_FIFO
(``--fifo``) so that other work on their cores (the machine is shared) cannot
delay them; CPU is still counted per process. The clients are lean so that they are not the
bottleneck: after the opening handshake (wsproto) one epoll loop without
tasks drives every stream, frames its own messages (masking key zero, which
RFC 6455 allows) and reads the daemon's by hand, finding the payload of a
``media`` message without a JSON parser. Over the steady window (every stream
up, ``--duration`` s) it measures:

- outbound (daemon → client) message gap p50/p99/max, from client receive times;
- loss: frames sent in the window whose echo never came back;
- echo latency p50/p99: a received payload matched to the frame sent with it;
- daemon CPU (utime+stime over the window): percent of its core, ms per
  session-second, and RSS, RSS per stream;
- the clients' own CPU (percent of their core) and send lateness p99 (a late
  or saturated client voids the figures);
- other processes' CPU on the daemon's core (``foreign%``), the hypervisor's
  steal time on it (``steal%``), how fast it ran (``probe50``/``probe90``,
  and its system calls ``sys50``, :mod:`bench.host_probe`) and the media
  clock's skipped ticks (``voxgatectl metrics``), as ``bench.rtp_load`` prints
  them. A skipped tick costs each stream the frames it missed
  (:meth:`~voxgate.pipeline.playout.Playout.skip`), whose echoes never come:
  one skipped tick is 1 / (50 x window s) loss, 0.067 % over the default 30 s
  window, 0.1 % over 20 s (``bench.rtp_load`` counts loss by the daemon's
  sequence numbers, which a skip leaves whole).

It prints a row per run and the largest N meeting gap p99 ≤ 30 ms, gap max ≤
100 ms, loss ≤ 0.1 % and echo p99 ≤ 60 ms (``bench/sip_load.py``'s limits)
with every stream up in all runs, and stops after an N that no run sustained.
It never asserts.
"""

from __future__ import annotations

import argparse
import base64
import gc
import itertools
import os
import select
import socket
import struct
import sys
import tempfile
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import wsproto
from tests.harness.audio import encode_ulaw, make_speech_clip
from tests.harness.daemon import ConfigOverrides, running_daemon
from tests.harness.pcap import percentile
from wsproto.events import AcceptConnection, Request

from bench.host_probe import HostProbe, ProbeFigures
from bench.rtp_load import NO_LOAD_GATE
from bench.sip_load import (
    DAEMON_CPU,
    PEER_CPU,
    CoreTicks,
    clock_counters,
    core_ticks,
    cpu_ticks,
    rss_kib,
)
from bench.table import GAP_P99_LIMIT_MS, Table, within_limits
from voxgate.transports.media_stream import FRAME_BYTES, Connected, Start, serialize

FRAME_S = 0.020
PHASES = 4
"""Streams are split into this many send phases, 5 ms apart."""
_EDGE_S = 1.0
_CLK_TCK = os.sysconf("SC_CLK_TCK")
_RECV_BYTES = 65_536
_MASK_ZERO = b"\x00\x00\x00\x00"
_HEADER_16 = struct.Struct("!BBH")
_MEDIA_PREFIX = b'{"event":"media"'
_MEDIA_TEMPLATE = (b'{"event":"media","sequenceNumber":"%d","media":{"track":"inbound",'
                   b'"chunk":"%d","timestamp":"%d","payload":"%s"},"streamSid":"%s"}')
"""A media server's ``media`` message as Twilio lays it out: sequence number, chunk,
timestamp (ms), base64 payload, stream sid."""
_PAYLOAD_KEY = b'"payload":"'
_POLL_BATCH = 32
"""Most sockets read between two looks at the send schedule."""
_CLIENT_LATE_LIMIT_MS = GAP_P99_LIMIT_MS - 20
_CLIENT_CPU_LIMIT_PCT = 80.0


@dataclass(frozen=True, slots=True)
class StepResult:
    """Figures for one run at one N."""

    sessions: int
    run: int
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
    client_cpu_pct: float
    client_late_p99_ms: float
    foreign_pct: float
    steal_pct: float
    probe: ProbeFigures
    frames_skipped: int

    @property
    def rss_per_session_kib(self) -> float:
        return (self.rss_kib - self.idle_rss_kib) / self.sessions

    @property
    def cpu_ms_per_session_s(self) -> float:
        """Daemon CPU milliseconds per second of one stream."""
        return 10.0 * self.cpu_pct / self.sessions

    @property
    def passed(self) -> bool:
        """Every stream up and every limit of the module docstring holds."""
        return self.streams_up == self.sessions and within_limits(
            self.gap_p99_ms, self.gap_max_ms, self.loss_pct, self.echo_p99_ms)


def client_frame(payload: bytes) -> bytes:
    """One text frame as a client sends it: masked, with the all-zero key (so the
    payload goes as it is; RFC 6455 §5.3 asks a client for a key, not a random one)."""
    size = len(payload)
    if size < 126:
        return bytes((0x81, 0x80 | size)) + _MASK_ZERO + payload
    if size < 1 << 16:
        return _HEADER_16.pack(0x81, 0x80 | 126, size) + _MASK_ZERO + payload
    raise ValueError(f"a {size}-byte message is larger than this client frames")


@dataclass
class StreamClient:
    """One media-server connection: a non-blocking socket, after its handshake."""

    index: int
    sock: socket.socket
    payloads: list[bytes]
    """The clip's 20 ms frames in base64, from this stream's start in the clip."""
    next_frame: int = 0
    pending: bytearray = field(default_factory=bytearray)
    """Framed bytes the socket has not taken yet."""
    inbound: bytearray = field(default_factory=bytearray)
    """Bytes from the daemon not parsed into frames yet."""
    sent_at: dict[bytes, deque[float]] = field(default_factory=dict)
    """Base64 payload → send times not yet matched by an echo."""
    sent: list[float] = field(default_factory=list)
    received: list[float] = field(default_factory=list)
    echo_s: list[tuple[float, float]] = field(default_factory=list)
    """(send time, latency) of every echoed frame."""
    up: bool = False
    sid: bytes = field(init=False)

    def __post_init__(self) -> None:
        self.sid = _sid(self.index).encode()

    def send_text(self, text: str | bytes) -> None:
        """Frame a text message and write what the socket takes now."""
        self.pending += client_frame(text if isinstance(text, bytes) else text.encode())
        self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        try:
            sent = self.sock.send(self.pending)
        except BlockingIOError:
            return
        except OSError:
            self.up = False
            return
        del self.pending[:sent]

    def on_readable(self, now: float) -> None:
        """Read what the socket holds; time-stamp media messages, match echoes."""
        try:
            data = self.sock.recv(_RECV_BYTES)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.up = False
            return
        buf = self.inbound
        buf += data
        end = len(buf)
        pos = 0
        while end - pos >= 2:
            size = buf[pos + 1] & 0x7F
            head = pos + 2
            if size == 126:
                if end - pos < 4:
                    break
                size, head = int.from_bytes(buf[head:head + 2], "big"), head + 2
            elif size == 127:
                if end - pos < 10:
                    break
                size, head = int.from_bytes(buf[head:head + 8], "big"), head + 8
            if end < head + size:
                break
            opcode = buf[pos] & 0x0F
            pos = head + size
            if opcode == 0x8:  # close
                self.up = False
                return
            if opcode == 0x1 and buf.startswith(_MEDIA_PREFIX, head):
                self.on_media(buf, head, pos, now)
        del buf[:pos]

    def on_media(self, buf: bytearray, start: int, end: int, now: float) -> None:
        """The media message in ``buf[start:end]`` arrived at ``now``."""
        self.received.append(now)
        at = buf.find(_PAYLOAD_KEY, start, end)
        if at < 0:
            return
        at += len(_PAYLOAD_KEY)
        times = self.sent_at.get(bytes(buf[at:buf.find(b'"', at, end)]))
        if times:
            sent = times.popleft()
            self.echo_s.append((sent, now - sent))

    def send_media(self, now: float) -> None:
        """The next frame of the clip as a ``media`` message."""
        chunk = self.next_frame
        payload = self.payloads[chunk % len(self.payloads)]
        self.next_frame += 1
        times = self.sent_at.get(payload)
        if times is None:
            times = self.sent_at[payload] = deque()
        times.append(now)
        self.sent.append(now)
        self.send_text(_MEDIA_TEMPLATE % (chunk + 1, chunk, chunk * 20, payload, self.sid))


def open_stream(index: int, port: int, payloads: list[bytes]) -> StreamClient:
    """Connect, handshake (blocking) and send ``connected`` + ``start``."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10.0)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    ws = wsproto.WSConnection(wsproto.ConnectionType.CLIENT)
    sock.sendall(ws.send(Request(host="127.0.0.1", target="/media")))
    while True:
        ws.receive_data(sock.recv(_RECV_BYTES) or None)
        events = list(ws.events())
        if events:
            break
    if not isinstance(events[0], AcceptConnection):
        raise RuntimeError(f"stream {index}: handshake refused: {events[0]!r}")
    sock.setblocking(False)
    client = StreamClient(index, sock, payloads, up=True)
    client.send_text(serialize(Connected()))
    client.send_text(serialize(Start(_sid(index), f"CA{index}", "ACbench")))
    return client


def _sid(index: int) -> str:
    return f"MZ{index:032d}"


@dataclass
class Run:
    """What :func:`drive` measured."""

    clients: list[StreamClient]
    window: tuple[float, float]
    cpu_s: float
    rss_kib: int
    client_cpu_s: float
    lateness_s: list[float]
    foreign_cpu_s: float
    steal_s: float
    frames_skipped: int


def drive(sessions: int, port: int, payloads: list[bytes], ramp_s: float, duration_s: float,
          pid: int, control_socket: str) -> Run:
    """Run the clients in one epoll loop: every 5 ms the streams of that phase whose
    start has come send their next frame; in between, read what arrives."""
    clients: list[StreamClient] = []
    for index in range(sessions):
        offset = (index * 997) % len(payloads)  # each stream its own part of the clip
        clients.append(open_stream(index, port, payloads[offset:] + payloads[:offset]))
    by_fd = {client.sock.fileno(): client for client in clients}
    poller = select.epoll()
    for fd in by_fd:
        poller.register(fd, select.EPOLLIN)
    t0 = time.monotonic() + 0.5
    starts = [t0 + ramp_s * i / sessions for i in range(sessions)]
    stop_at = t0 + ramp_s + duration_s
    planned_start, planned_stop = t0 + ramp_s + _EDGE_S, stop_at - _EDGE_S
    mid = (planned_start + planned_stop) / 2
    ticks_start = ticks_stop = rss = 0
    core_start = core_stop = CoreTicks(0, 0, 0)
    skipped_start = skipped_stop = 0.0
    cpu_start = cpu_stop = window_start = window_stop = 0.0
    lateness: list[float] = []
    phase_s = FRAME_S / PHASES
    tick, phase = t0, 0
    end = stop_at + 1.0  # the last echoes
    gc.disable()  # millions of time stamps: a full collection would make the clients late
    now = time.monotonic()
    while now < end:
        # A bounded batch, so that a burst of echoes delays the next send little.
        for fd, _ in poller.poll(max(0.0, min(tick, end) - now), _POLL_BATCH):
            by_fd[fd].on_readable(time.monotonic())
        now = time.monotonic()
        if not window_start and now >= planned_start:
            window_start, ticks_start, cpu_start = now, cpu_ticks(pid), time.process_time()
            core_start = core_ticks(DAEMON_CPU)
            skipped_start = clock_counters(control_socket)[1]
        if not rss and now >= mid:
            rss = rss_kib(pid)
        if not window_stop and now >= planned_stop:
            window_stop, ticks_stop, cpu_stop = now, cpu_ticks(pid), time.process_time()
            core_stop = core_ticks(DAEMON_CPU)
            skipped_stop = clock_counters(control_socket)[1]
        if now < tick or tick >= stop_at:
            if tick >= stop_at:
                tick = end
            continue
        lateness.append(now - tick)
        for client, start in zip(clients[phase::PHASES], starts[phase::PHASES], strict=True):
            if start <= tick and client.up:
                client.send_media(time.monotonic())
        tick += phase_s
        phase = (phase + 1) % PHASES
    gc.enable()
    poller.close()
    for client in clients:
        client.sock.close()
    daemon_ticks = ticks_stop - ticks_start
    return Run(clients, (window_start, window_stop), daemon_ticks / _CLK_TCK, rss,
               cpu_stop - cpu_start, lateness,
               foreign_cpu_s=max(0, core_stop.busy - core_start.busy - daemon_ticks) / _CLK_TCK,
               steal_s=(core_stop.steal - core_start.steal) / _CLK_TCK,
               frames_skipped=round(skipped_stop - skipped_start))


def run_step(sessions: int, run_index: int, payloads: list[bytes], workdir: Path,
             duration_s: float, ramp_s: float, load_gate: bool, fifo: int) -> StepResult:
    """One run at one N: fresh pinned daemon, N streams, figures over the steady window."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    limits: dict[str, int | float] = {"max_sessions": sessions + 50, "drain_timeout_s": 5}
    if not load_gate:
        limits |= NO_LOAD_GATE
    overrides: ConfigOverrides = {
        "websocket": {"listen": f"127.0.0.1:{port}"},
        "limits": limits,
        "log": {"level": "warning"},
    }
    with running_daemon(workdir / "daemon", overrides, cpu=DAEMON_CPU) as daemon:
        if fifo:  # the main thread only (the media clock and every socket), not its threads
            os.sched_setscheduler(daemon.pid, os.SCHED_FIFO | os.SCHED_RESET_ON_FORK,
                                  os.sched_param(fifo))
        time.sleep(1.0)
        idle_rss = rss_kib(daemon.pid)
        with HostProbe(DAEMON_CPU, workdir / "host_probe.txt") as probe:
            run = drive(sessions, port, payloads, ramp_s, duration_s, daemon.pid,
                        daemon.control_socket)
    clients = run.clients
    start, stop = run.window
    wall_s = stop - start
    gaps_ms: list[float] = []
    echo_ms: list[float] = []
    sent = lost = 0
    for client in clients:
        times = [t for t in client.received if start <= t <= stop]
        gaps_ms += [(b - a) * 1000 for a, b in itertools.pairwise(times)]
        echo_ms += [lat * 1000 for at, lat in client.echo_s if start <= at <= stop]
        in_window = sum(1 for at in client.sent if start <= at <= stop)
        sent += in_window
        lost += in_window - sum(1 for at, _ in client.echo_s if start <= at <= stop)
    return StepResult(
        sessions=sessions,
        run=run_index,
        streams_up=sum(client.up for client in clients),
        gap_p50_ms=percentile(gaps_ms, 50),
        gap_p99_ms=percentile(gaps_ms, 99),
        gap_max_ms=max(gaps_ms, default=float("nan")),
        loss_pct=100.0 * lost / sent if sent else 100.0,
        echo_p50_ms=percentile(echo_ms, 50),
        echo_p99_ms=percentile(echo_ms, 99),
        cpu_pct=100.0 * run.cpu_s / wall_s,
        rss_kib=run.rss_kib,
        idle_rss_kib=idle_rss,
        client_cpu_pct=100.0 * run.client_cpu_s / wall_s,
        foreign_pct=100.0 * run.foreign_cpu_s / wall_s,
        steal_pct=100.0 * run.steal_s / wall_s,
        probe=probe.figures(start, stop),
        frames_skipped=run.frames_skipped,
        client_late_p99_ms=percentile([x * 1000 for x in run.lateness_s], 99),
    )


_TABLE: Table[StepResult] = Table((
    ("N", "d", lambda r: r.sessions),
    ("run", "d", lambda r: r.run),
    ("up", "d", lambda r: r.streams_up),
    ("gap50", ".1f", lambda r: r.gap_p50_ms),
    ("gap99", ".1f", lambda r: r.gap_p99_ms),
    ("gapmax", ".1f", lambda r: r.gap_max_ms),
    ("loss%", ".3f", lambda r: r.loss_pct),
    ("echo50", ".1f", lambda r: r.echo_p50_ms),
    ("echo99", ".1f", lambda r: r.echo_p99_ms),
    ("cpu%", ".1f", lambda r: r.cpu_pct),
    ("foreign%", ".1f", lambda r: r.foreign_pct),
    ("steal%", ".1f", lambda r: r.steal_pct),
    ("probe50", ".0f", lambda r: r.probe.p50_us),
    ("probe90", ".0f", lambda r: r.probe.p90_us),
    ("sys50", ".0f", lambda r: r.probe.syscall_p50_us),
    ("ms/sess-s", ".2f", lambda r: r.cpu_ms_per_session_s),
    ("rssMiB", ".1f", lambda r: r.rss_kib / 1024),
    ("KiB/sess", ".1f", lambda r: r.rss_per_session_kib),
    ("clicpu%", ".1f", lambda r: r.client_cpu_pct),
    ("clilate99", ".1f", lambda r: r.client_late_p99_ms),
    ("skipped", "d", lambda r: r.frames_skipped),
    ("pass", "s", lambda r: "yes" if r.passed else "NO"),
))


def _warnings(result: StepResult) -> list[str]:
    warnings = []
    if result.client_late_p99_ms > _CLIENT_LATE_LIMIT_MS:
        warnings.append("the clients sent late: the load generator did not keep up")
    if result.client_cpu_pct > _CLIENT_CPU_LIMIT_PCT:
        warnings.append("the clients used most of their core: the figures may be theirs")
    return warnings


def main(argv: list[str] | None = None) -> int:
    """Parse options, run every N ``--runs`` times, print the rows and the verdict."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.ws_load", description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--steps", default="25,50,100,150,200,300",
                        help="comma-separated stream counts (default: %(default)s)")
    parser.add_argument("--runs", type=int, default=3, help="runs per N (default: 3)")
    parser.add_argument("--duration", type=float, default=30.0,
                        help="steady streaming seconds per step, all streams up (default: 30)")
    parser.add_argument("--ramp", type=float, default=5.0,
                        help="seconds over which the streams start (default: 5)")
    parser.add_argument("--no-load-gate", action="store_true",
                        help="admission ignores the media clock's load (raw capacity)")
    parser.add_argument("--fifo", type=int, default=1, metavar="PRIORITY",
                        help="run the daemon's main thread and the clients SCHED_FIFO at this "
                        "priority so other work on their cores cannot delay them (root; 0: "
                        "normal; default: 1)")
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
    payloads = [base64.b64encode(ulaw[i:i + FRAME_BYTES])
                for i in range(0, len(ulaw) - FRAME_BYTES + 1, FRAME_BYTES)]
    os.sched_setaffinity(0, {PEER_CPU})
    if args.fifo:  # reset on fork: the daemon and the host probe start SCHED_OTHER
        os.sched_setscheduler(0, os.SCHED_FIFO | os.SCHED_RESET_ON_FORK,
                              os.sched_param(args.fifo))
    print(f"workdir {workdir}; clip {clip.duration_s:.2f} s; daemon on CPU {DAEMON_CPU}, "
          f"clients on CPU {PEER_CPU}; admission load gate "
          f"{'off' if args.no_load_gate else 'on'}; SCHED_FIFO {args.fifo or 'off'}")
    _TABLE.runs_through(
        steps, args.runs,
        lambda n, i: run_step(n, i, payloads, workdir / f"n{n}-{i}", args.duration, args.ramp,
                              not args.no_load_gate, args.fifo),
        _warnings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
