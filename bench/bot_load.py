"""Bridged-call load benchmark: N concurrent SIP calls through voxgate's stream agent to
Pipecat echo bots.

Run as root from the repository root as ``python -m bench.bot_load`` (tcpdump captures
on ``lo``; ``.venv-bot`` must exist: ``make bot-venv``). For each N in ``--steps``:

1. ``ceil(N / --calls-per-bot)`` real Pipecat echo bots (``tests/bots/pipecat_bot.py``,
   Twilio protocol, via :class:`tests.harness.bot.PipecatBot`) run on CPU 1 beside SIPp,
   tcpdump and this process; a fresh ``voxgated`` is pinned to CPU 0 with the stream agent,
   one provider per bot, and one tenant per SIPp instance (matched on its ``Contact``
   header) that uses its own bot, so the calls are spread evenly over the bots;
2. one SIPp per bot ramps its share of the N calls up over ``--ramp`` seconds, each
   streaming the looped speech clip for ``--duration`` seconds after the ramp; over the
   steady window (every call up, 1 s trimmed off both ends) it measures, as
   ``bench/sip_load.py`` does (its capture analysis is reused): the outbound (voxgate →
   caller) RTP gap p99/max and loss, the caller→voxgate→bot→voxgate→caller echo latency
   p50/p99 (:func:`echo_latencies_s` on the wire), voxgate's CPU
   (``/proc/PID/stat``) and RSS; and the CPU of the bots, of SIPp and of CPU 1 as a whole
   (``/proc/stat``), which show whether the load generator and the bots kept up; at the
   window's end, how much bot audio each call's playout queue holds (``voxgatectl show``:
   the standing queue is latency the call keeps);
3. voxgate is stopped and this process opens N Twilio Media Streams connections straight
   to the same bots (the same split), each opened at its start on the ramp as voxgate
   opens one when a call is answered, streams the same clip as ``media`` every 20 ms on an
   absolute schedule for ``--direct-duration`` seconds after a ``--ramp`` ramp, and
   matches the echo the same way: the bot's own echo latency at the same load.

Echo matching is by content, not by packet: the bot answers in 40 ms chunks and, under
load, its output is not always cut on the caller's 20 ms boundaries (then voxgate's 20
ms frames carry parts of two caller frames and no echoed packet equals a sent one, which
defeats ``bench/sip_load.py``'s payload matching). µ-law passes the bot and voxgate byte
for byte (after :func:`~tests.harness.phone.canonical_ulaw`), so each 20 ms of echo is
found as a byte string in what the caller sent in the 2 s before it arrived (where it
occurs exactly once there), and its latency is its arrival minus the sending of the
packet it starts in.

Derived figures: voxgate's CPU milliseconds per session-second (CPU time over the window
divided by N x window length), sessions per core (N / the fraction of CPU 0 used,
a linear extrapolation), RSS per session ((RSS at N - idle RSS) / N), and the *added*
echo latency: through voxgate minus direct, at p50 and p99 (a difference of percentiles,
not the percentile of a difference). Besides voxgate's own processing the added latency
holds the jitter buffer (``[rtp] jitter_buffer_ms``), the wait for the next 20 ms media
tick in each direction, the loopback TCP hop and the re-framing of the bot's 40 ms chunks
into 20 ms RTP frames, and any standing queue of bot audio in voxgate's playout (a burst
from the bot is played at 20 ms a frame, so what it queued stays as latency: ``queue50``
and ``queuemax`` show it); the direct figure is taken by a Python client (its own send
and receive handling included; a warning says when it sent late), the voxgate figure on
the wire.

It prints one row per N and the largest N whose calls all succeeded with gap p99 <= 30
ms, gap max <= 100 ms, loss <= 0.1 % and *added* echo p99 <= 60 ms
(:func:`bench.table.within_limits`) up to the first N that fails; every step runs
(``--stop-at-failure`` stops at the first failing one), because the CPU figures of the
larger N are wanted even when the latency limit is passed. It never asserts.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import math
import os
import sys
import tempfile
import time
from bisect import bisect_left, bisect_right
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import accumulate
from pathlib import Path

import trio
from tests.harness.audio import SpeechClip, encode_ulaw, make_speech_clip
from tests.harness.bot import PipecatBot
from tests.harness.daemon import (
    ConfigOverrides,
    TomlTable,
    free_udp_port,
    reserve_port_range,
    running_daemon,
)
from tests.harness.pcap import Address, Capture, RtpPacket, percentile, read_udp, rtp_packets
from tests.harness.phone import FRAME_BYTES, canonical_ulaw
from tests.harness.sipp import Sipp
from trio_websocket import ConnectionClosed, WebSocketConnection, open_websocket_url

from bench.sip_load import (
    DAEMON_CPU,
    PEER_CPU,
    analyse,
    clock_counters,
    core_ticks,
    cpu_ticks,
    lag_p99_ms,
    rss_kib,
)
from bench.table import GAP_P99_LIMIT_MS, Table, within_limits
from voxgate.control.cli import ControlClient
from voxgate.transports.media_stream import Connected, Media, Start, serialize

FRAME_S = 0.020
PCM_BYTES_PER_MS = 16
"""The playout queue holds 8 kHz PCM16."""
JITTER_BUFFER_MS = 20
"""``[rtp] jitter_buffer_ms`` of the benchmarked daemon (the test harness's default)."""
_EDGE_S = 1.0  # trimmed off both ends of each steady window
_CLK_TCK = os.sysconf("SC_CLK_TCK")
_MEDIA_PORTS_PER_SIPP = 32  # spare RTP ports between two SIPp instances' ranges
_DIRECT_DRAIN_S = 1.0  # after the last frame sent, for the last echoes
NEEDLE_BYTES = FRAME_BYTES
"""Bytes of echo looked up in what was sent (20 ms of µ-law: shorter strings of the
synthetic voice repeat from one pitch period to the next)."""
SEARCH_BACK_S = 2.0
"""How far back before its arrival the echo of a byte string is looked for."""


@dataclass(frozen=True, slots=True)
class StepResult:
    """Figures for one N (times in ms, CPU in % of one core)."""

    sessions: int
    bots: int
    calls_ok: int
    out_gap_p99_ms: float
    out_gap_max_ms: float
    out_loss_pct: float
    echo_p50_ms: float
    echo_p99_ms: float
    direct_p50_ms: float
    direct_p99_ms: float
    direct_streams_ok: int
    direct_late_p99_ms: float
    cpu_pct: float
    rss_kib: int
    idle_rss_kib: int
    bots_cpu_pct: float
    sipp_cpu_pct: float
    peer_core_busy_pct: float
    loop_lag_p99_ms: float
    tcpdump_dropped: int
    queue_p50_ms: float
    queue_max_ms: float

    @property
    def cpu_ms_per_session_s(self) -> float:
        """voxgate's CPU milliseconds per second of one call."""
        return 10.0 * self.cpu_pct / self.sessions

    @property
    def sessions_per_core(self) -> float:
        """N scaled to a whole core (linear extrapolation)."""
        return self.sessions * 100.0 / self.cpu_pct if self.cpu_pct > 0 else math.inf

    @property
    def rss_per_session_kib(self) -> float:
        """(RSS at N - idle RSS) / N."""
        return (self.rss_kib - self.idle_rss_kib) / self.sessions

    @property
    def added_p50_ms(self) -> float:
        """Echo p50 through voxgate minus the bot's own."""
        return self.echo_p50_ms - self.direct_p50_ms

    @property
    def added_p99_ms(self) -> float:
        """Echo p99 through voxgate minus the bot's own."""
        return self.echo_p99_ms - self.direct_p99_ms

    @property
    def passed(self) -> bool:
        """Every call succeeded and the limits of the module docstring hold."""
        return self.calls_ok == self.sessions and within_limits(
            self.out_gap_p99_ms, self.out_gap_max_ms, self.out_loss_pct, self.added_p99_ms)


@dataclass(frozen=True, slots=True)
class Options:
    """What every step of one run shares."""

    duration_s: float
    ramp_s: float
    direct_duration_s: float
    calls_per_bot: int


def split(total: int, parts: int) -> list[int]:
    """``total`` in ``parts`` shares differing by at most one, larger first."""
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def process_ticks(pids: list[int]) -> int:
    """utime + stime of every process of ``pids`` (0 for one that is gone)."""
    total = 0
    for pid in pids:
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            total += cpu_ticks(pid)
    return total


def children_named(name: str) -> list[int]:
    """The PIDs of this process's children whose command name (``comm``) is ``name``."""
    me = os.getpid()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            stat = (entry / "stat").read_text()
            comm = stat[stat.index("(") + 1 : stat.rindex(")")]
            ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
            if comm == name and ppid == me:
                found.append(int(entry.name))
    return found


class CpuMeter:
    """CPU used over a window by voxgate, the bots, SIPp and the peer core as a whole."""

    def __init__(self, daemon_pid: int, bot_pids: list[int], sipp_pids: list[int]) -> None:
        self._pids = (daemon_pid, bot_pids, sipp_pids)
        self._start = self._sample()
        self._at = time.monotonic()

    def _sample(self) -> tuple[int, int, int, int, int]:
        """Ticks of voxgate, the bots, SIPp; busy and total ticks of the peer core."""
        daemon, bots, sipp = self._pids
        peer = core_ticks(PEER_CPU)
        return cpu_ticks(daemon), process_ticks(bots), process_ticks(sipp), peer.busy, peer.total

    def stop(self) -> tuple[float, float, float, float]:
        """voxgate, bots and SIPp CPU in % of one core, and the peer core's busy %, since
        the meter was made."""
        end, wall = self._sample(), time.monotonic() - self._at
        daemon, bots, sipp, busy, total = (b - a for a, b in zip(self._start, end, strict=True))
        return (100.0 * daemon / _CLK_TCK / wall, 100.0 * bots / _CLK_TCK / wall,
                100.0 * sipp / _CLK_TCK / wall, 100.0 * busy / total if total else math.nan)


def daemon_overrides(bots: list[PipecatBot], sipp_ports: list[int],
                     sessions: int) -> ConfigOverrides:
    """The stream agent with one provider per bot and one tenant per SIPp instance."""
    providers: list[TomlTable] = [{"name": f"bot-{i + 1}", "url": bot.url}
                                  for i, bot in enumerate(bots)]
    tenants: list[TomlTable] = [
        {"name": f"sipp-{i + 1}", "header_name": "Contact",
         "header_value": f"<sip:sipp@127.0.0.1:{port}>", "providers": [f"bot-{i + 1}"]}
        for i, port in enumerate(sipp_ports)]
    return {
        "limits": {"max_sessions": sessions + 50, "drain_timeout_s": 5},
        "log": {"level": "warning"},
        "rtp": {"jitter_buffer_ms": JITTER_BUFFER_MS},
        "agent": {"kind": "stream"},
        "agent.stream": {"connect_timeout_s": 5.0},
        "agent.providers": providers,
        "tenants": tenants,
        "timers": {"agent_response_s": 60, "media_inactivity_s": 30},
    }


def echo_latencies_s(sent: Sequence[tuple[float, bytes]],
                     received: Sequence[tuple[float, bytes]]) -> list[tuple[float, float]]:
    """(arrival, latency) in seconds of echoed µ-law found in what was sent.

    ``sent`` and ``received`` are (time, µ-law payload) in time order, on one clock.
    Every whole 20 ms of each received payload is looked up in the bytes sent in the
    :data:`SEARCH_BACK_S` before it arrived (canonical µ-law); the latency runs from the
    sending of the packet where the match starts. Echo not found there, or found more
    than once (silence, repeated sound), is skipped.
    """
    times = [at for at, _ in sent]
    offsets = list(accumulate((len(payload) for _, payload in sent), initial=0))
    stream = b"".join(canonical_ulaw(payload) for _, payload in sent)
    found: list[tuple[float, float]] = []
    for at, payload in received:
        echo = canonical_ulaw(payload)
        lo = offsets[bisect_left(times, at - SEARCH_BACK_S)]
        hi = offsets[bisect_right(times, at)]
        for i in range(0, len(echo) - NEEDLE_BYTES + 1, FRAME_BYTES):
            needle = echo[i:i + NEEDLE_BYTES]
            position = stream.find(needle, lo, hi)
            if position >= 0 and stream.rfind(needle, lo, hi) == position:
                found.append((at, at - times[bisect_right(offsets, position) - 1]))
    return found


def rtp_echo_ms(packets: Sequence[RtpPacket], callers: range,
                window: tuple[float, float]) -> list[float]:
    """Echo latencies (ms) of every call (caller's port in ``callers``) whose echo arrived
    in ``window`` (capture times).

    A call is told by voxgate's end of it, its own RTP port: SIPp sends every call of
    one instance from a single port.
    """
    calls: dict[Address, tuple[list[tuple[float, bytes]], list[tuple[float, bytes]]]] = (
        defaultdict(lambda: ([], [])))
    for packet in packets:
        if packet.src[1] in callers:
            calls[packet.dst][0].append((packet.ts, packet.payload))
        elif packet.dst[1] in callers and window[0] <= packet.ts <= window[1]:
            calls[packet.src][1].append((packet.ts, packet.payload))
    return [latency * 1000 for sent, received in calls.values()
            for _, latency in echo_latencies_s(sent, received)]


@dataclass
class Bridged:
    """The through-voxgate half of one step."""

    calls_ok: int
    out_gaps_ms: list[float]
    out_loss_pct: float
    echo_ms: list[float]
    cpu_pct: float
    rss_kib: int
    idle_rss_kib: int
    bots_cpu_pct: float
    sipp_cpu_pct: float
    peer_core_busy_pct: float
    loop_lag_p99_ms: float
    tcpdump_dropped: int
    queue_ms: list[float]


def playout_queues_ms(control_socket: str) -> list[float]:
    """Milliseconds of audio in each session's playout queue now (``voxgatectl show``)."""
    with ControlClient(control_socket) as client:
        ids = [session["id"] for session in client.call("sessions")]
        return [client.call("show", {"id": sid})["budget"]["buffers"]["playout"]["held_bytes"]
                / PCM_BYTES_PER_MS for sid in ids]


def run_bridged(sessions: int, bots: list[PipecatBot], clip: SpeechClip, workdir: Path,
                options: Options) -> Bridged:
    """N SIPp calls through a fresh pinned voxgate to ``bots``; figures over the window."""
    duration_s, ramp_s = options.duration_s, options.ramp_s
    shares = split(sessions, len(bots))
    sipp_ports = [free_udp_port() for _ in bots]
    media = reserve_port_range(2 * sessions + _MEDIA_PORTS_PER_SIPP * len(bots) + 64)
    media_firsts = [media.first + 2 * sum(shares[:i]) + _MEDIA_PORTS_PER_SIPP * i
                    for i in range(len(bots))]
    try:
        with running_daemon(workdir / "daemon", daemon_overrides(bots, sipp_ports, sessions),
                            rtp_ports=2 * sessions + 100, cpu=DAEMON_CPU) as daemon, \
                contextlib.ExitStack() as stack:
            time.sleep(1.0)
            idle_rss = rss_kib(daemon.pid)
            pcap_path = workdir / "rtp.pcap"
            capture = stack.enter_context(
                Capture(pcap_path, daemon.rtp.first, daemon.rtp.last, cpu=PEER_CPU))
            sipps = [stack.enter_context(Sipp(
                "uac_echo", daemon.sip_address, workdir=workdir / f"sipp{i + 1}",
                local_port=port, media_port=first, clip=clip, calls=share, limit=share,
                rate=share / ramp_s, duration_ms=round((duration_s + ramp_s) * 1000),
                timeout_s=duration_s + 2 * ramp_s + 60, cpu=PEER_CPU))
                for i, (port, first, share) in enumerate(
                    zip(sipp_ports, media_firsts, shares, strict=True))]
            t0 = time.time()
            time.sleep(ramp_s + _EDGE_S)
            lag_start, _ = clock_counters(daemon.control_socket)
            meter = CpuMeter(daemon.pid, [bot.pid for bot in bots], children_named("sipp"))
            window_start = time.time()
            time.sleep(duration_s / 2 - _EDGE_S)
            rss = rss_kib(daemon.pid)
            time.sleep(max(0.0, t0 + ramp_s + duration_s - _EDGE_S - time.time()))
            window_stop = time.time()
            cpu_pct, bots_pct, sipp_pct, peer_pct = meter.stop()
            lag_stop, _ = clock_counters(daemon.control_socket)
            queue_ms = playout_queues_ms(daemon.control_socket)
            results = [sipp.wait() for sipp in sipps]
            capture_stats = capture.stop()
            daemon_ports = range(daemon.rtp.first, daemon.rtp.last + 1)
    finally:
        media.release()
    packets = rtp_packets(read_udp(pcap_path))
    callers = range(media.first, media.first + media.count)
    window = (window_start, window_stop)
    out_gaps, out_loss, _, _, _ = analyse(packets, daemon_ports, window, callers)
    echo_ms = rtp_echo_ms(packets, callers, window)
    pcap_path.unlink()
    return Bridged(
        calls_ok=sum(r.successful_calls for r in results), out_gaps_ms=out_gaps,
        out_loss_pct=out_loss, echo_ms=echo_ms, cpu_pct=cpu_pct, rss_kib=rss,
        idle_rss_kib=idle_rss, bots_cpu_pct=bots_pct, sipp_cpu_pct=sipp_pct,
        peer_core_busy_pct=peer_pct, loop_lag_p99_ms=lag_p99_ms(lag_start, lag_stop),
        tcpdump_dropped=capture_stats.dropped_by_kernel, queue_ms=queue_ms)


# -- the direct client: Twilio Media Streams straight to a bot ------------------------------


@dataclass
class DirectStream:
    """One direct connection's media both ways: (trio time, µ-law payload)."""

    index: int
    frames: list[bytes]
    sent: list[tuple[float, bytes]] = field(default_factory=list)
    received: list[tuple[float, bytes]] = field(default_factory=list)
    up: bool = False

    @property
    def stream_sid(self) -> str:
        return f"MZ{self.index:032d}"


async def _receive(ws: WebSocketConnection, stream: DirectStream) -> None:
    with contextlib.suppress(ConnectionClosed):
        while True:
            message = json.loads(await ws.get_message())
            if message.get("event") == "media":
                stream.received.append((trio.current_time(),
                                        base64.b64decode(message["media"]["payload"])))


async def direct_stream(url: str, stream: DirectStream, start_at: float, stop_at: float,
                        lateness: list[float]) -> None:
    """At ``start_at`` open, send ``connected`` + ``start`` and at once one ``media`` per
    20 ms until ``stop_at`` (absolute trio times), as voxgate does when a call is
    answered (audio from the first moment, while the bot still sets its pipeline up);
    then wait for the last echoes and close."""
    await trio.sleep_until(start_at)
    async with open_websocket_url(url) as ws:
        await ws.send_message(serialize(Connected()))
        await ws.send_message(serialize(Start(stream.stream_sid, f"CA{stream.index}",
                                              "AC" + "0" * 32)))
        stream.up = True
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_receive, ws, stream)
            chunk, tick = 0, trio.current_time()
            while tick < stop_at and not ws.closed:
                await trio.sleep_until(tick)
                now = trio.current_time()
                lateness.append(now - tick)
                frame = stream.frames[chunk % len(stream.frames)]
                stream.sent.append((now, frame))
                with contextlib.suppress(ConnectionClosed):
                    await ws.send_message(serialize(Media(stream.stream_sid, frame, "inbound",
                                                          chunk + 1, chunk * 20)))
                chunk += 1
                tick += FRAME_S
            await trio.sleep(_DIRECT_DRAIN_S)
            stream.up = stream.up and ws.closed is None
            nursery.cancel_scope.cancel()


async def drive_direct(urls: list[str], frames: list[bytes], ramp_s: float,
                       duration_s: float) -> tuple[list[DirectStream], float, float,
                                                   list[float]]:
    """One direct stream per entry of ``urls``, starts spread over ``ramp_s``; returns
    the streams, the steady window (trio times) and the send lateness samples."""
    count = len(urls)
    t0 = trio.current_time() + 0.5
    window = (t0 + ramp_s + _EDGE_S, t0 + ramp_s + duration_s - _EDGE_S)
    stop_at = t0 + ramp_s + duration_s
    lateness: list[float] = []
    streams = []
    async with trio.open_nursery() as nursery:
        for index, url in enumerate(urls):
            offset = (index * 997) % len(frames)  # each stream its own part of the clip
            stream = DirectStream(index, frames[offset:] + frames[:offset])
            streams.append(stream)
            nursery.start_soon(direct_stream, url, stream, t0 + ramp_s * index / count,
                               stop_at, lateness)
    return streams, window[0], window[1], lateness


@dataclass
class Direct:
    """The direct half of one step."""

    echo_ms: list[float]
    streams_ok: int
    late_p99_ms: float


def run_direct(sessions: int, bots: list[PipecatBot], frames: list[bytes],
               options: Options) -> Direct:
    """N direct streams to ``bots`` (the same split as the calls); the bots' own echo."""
    urls = [bot.url for bot, share in zip(bots, split(sessions, len(bots)), strict=True)
            for _ in range(share)]
    streams, start, stop, lateness = trio.run(
        drive_direct, urls, frames, options.ramp_s, options.direct_duration_s)
    echo_ms = [latency * 1000 for stream in streams
               for at, latency in echo_latencies_s(stream.sent, stream.received)
               if start <= at <= stop]
    return Direct(echo_ms, sum(stream.up for stream in streams),
                  percentile([x * 1000 for x in lateness], 99))


def run_step(sessions: int, clip: SpeechClip, frames: list[bytes], workdir: Path,
             options: Options) -> StepResult:
    """One N: fresh bots, the bridged calls through voxgate, then the direct streams."""
    count = math.ceil(sessions / options.calls_per_bot)
    with contextlib.ExitStack() as stack:
        bots = [stack.enter_context(PipecatBot("twilio", workdir=workdir / f"bot{i + 1}",
                                               log_level="WARNING"))
                for i in range(count)]
        bridged = run_bridged(sessions, bots, clip, workdir, options)
        direct = run_direct(sessions, bots, frames, options)
    return StepResult(
        sessions=sessions, bots=count, calls_ok=bridged.calls_ok,
        out_gap_p99_ms=percentile(bridged.out_gaps_ms, 99),
        out_gap_max_ms=max(bridged.out_gaps_ms, default=math.nan),
        out_loss_pct=bridged.out_loss_pct,
        echo_p50_ms=percentile(bridged.echo_ms, 50), echo_p99_ms=percentile(bridged.echo_ms, 99),
        direct_p50_ms=percentile(direct.echo_ms, 50),
        direct_p99_ms=percentile(direct.echo_ms, 99),
        direct_streams_ok=direct.streams_ok, direct_late_p99_ms=direct.late_p99_ms,
        cpu_pct=bridged.cpu_pct, rss_kib=bridged.rss_kib, idle_rss_kib=bridged.idle_rss_kib,
        bots_cpu_pct=bridged.bots_cpu_pct, sipp_cpu_pct=bridged.sipp_cpu_pct,
        peer_core_busy_pct=bridged.peer_core_busy_pct,
        loop_lag_p99_ms=bridged.loop_lag_p99_ms, tcpdump_dropped=bridged.tcpdump_dropped,
        queue_p50_ms=percentile(bridged.queue_ms, 50),
        queue_max_ms=max(bridged.queue_ms, default=math.nan))


_TABLE: Table[StepResult] = Table((
    ("N", "d", lambda r: r.sessions),
    ("bots", "d", lambda r: r.bots),
    ("ok", "d", lambda r: r.calls_ok),
    ("gap99", ".1f", lambda r: r.out_gap_p99_ms),
    ("gapmax", ".1f", lambda r: r.out_gap_max_ms),
    ("loss%", ".3f", lambda r: r.out_loss_pct),
    ("echo50", ".1f", lambda r: r.echo_p50_ms),
    ("echo99", ".1f", lambda r: r.echo_p99_ms),
    ("bot50", ".1f", lambda r: r.direct_p50_ms),
    ("bot99", ".1f", lambda r: r.direct_p99_ms),
    ("added50", ".1f", lambda r: r.added_p50_ms),
    ("added99", ".1f", lambda r: r.added_p99_ms),
    ("queue50", ".0f", lambda r: r.queue_p50_ms),
    ("queuemax", ".0f", lambda r: r.queue_max_ms),
    ("cpu%", ".1f", lambda r: r.cpu_pct),
    ("ms/sess-s", ".2f", lambda r: r.cpu_ms_per_session_s),
    ("sess/core", ".0f", lambda r: r.sessions_per_core),
    ("rssMiB", ".1f", lambda r: r.rss_kib / 1024),
    ("KiB/sess", ".1f", lambda r: r.rss_per_session_kib),
    ("lag99", ".0f", lambda r: r.loop_lag_p99_ms),
    ("bots%", ".1f", lambda r: r.bots_cpu_pct),
    ("sipp%", ".1f", lambda r: r.sipp_cpu_pct),
    ("cpu1busy%", ".1f", lambda r: r.peer_core_busy_pct),
    ("pass", "s", lambda r: "yes" if r.passed else "NO"),
))

PEER_BUSY_WARN_PCT = 90.0
"""CPU 1 busier than this: the bots, SIPp and tcpdump may not have kept up."""


def _warnings(result: StepResult) -> list[str]:
    warnings = []
    if result.tcpdump_dropped:
        warnings.append(f"tcpdump dropped {result.tcpdump_dropped} packets: figures for this "
                        "step are not trustworthy")
    if result.peer_core_busy_pct > PEER_BUSY_WARN_PCT:
        warnings.append(f"CPU {PEER_CPU} was {result.peer_core_busy_pct:.0f} % busy: the bots "
                        "or SIPp may be the limit, not voxgate")
    if result.direct_streams_ok < result.sessions:
        warnings.append(f"only {result.direct_streams_ok} of {result.sessions} direct streams "
                        "stayed up")
    if result.direct_late_p99_ms > GAP_P99_LIMIT_MS - 20:
        warnings.append(f"the direct client sent late (p99 {result.direct_late_p99_ms:.1f} ms): "
                        "the bot's own latency is overstated")
    return warnings


def main(argv: list[str] | None = None) -> int:
    """Parse options, step through N, print the table and the verdict."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.bot_load", description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--steps", default="10,20,30,40,60",
                        help="comma-separated call counts (default: %(default)s)")
    parser.add_argument("--duration", type=float, default=30.0,
                        help="steady streaming seconds per step, all calls up (default: 30)")
    parser.add_argument("--ramp", type=float, default=10.0,
                        help="seconds over which the calls (and direct streams) start "
                             "(default: 10)")
    parser.add_argument("--direct-duration", type=float, default=15.0,
                        help="steady seconds of the direct streams (default: 15)")
    parser.add_argument("--calls-per-bot", type=int, default=25,
                        help="calls per Pipecat bot process (default: 25)")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where to keep configs, logs and captures (default: a temp dir)")
    parser.add_argument("--stop-at-failure", action="store_true",
                        help="stop stepping at the first N that fails the limits")
    args = parser.parse_args(argv)
    steps = [int(s) for s in args.steps.split(",") if s.strip()]
    if os.geteuid() != 0:
        print("tcpdump needs root: run as root", file=sys.stderr)
        return 2
    if not {DAEMON_CPU, PEER_CPU} <= os.sched_getaffinity(0):
        print(f"needs CPUs {DAEMON_CPU} and {PEER_CPU}", file=sys.stderr)
        return 2
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="voxgate-botbench-"))
    clip = make_speech_clip(workdir / "clip")
    ulaw = encode_ulaw(clip.pcm16) * 2  # twice: the 1-sample tail makes the second pass unique
    frames = [ulaw[i:i + FRAME_BYTES] for i in range(0, len(ulaw) - FRAME_BYTES + 1, FRAME_BYTES)]
    os.sched_setaffinity(0, {PEER_CPU})  # this process and the bots it starts stay on CPU 1
    options = Options(args.duration, args.ramp, args.direct_duration, args.calls_per_bot)
    print(f"workdir {workdir}; clip {clip.duration_s:.2f} s; voxgate on CPU {DAEMON_CPU}; "
          f"Pipecat bots ({args.calls_per_bot} calls each), SIPp, tcpdump and the direct "
          f"client on CPU {PEER_CPU}; jitter buffer {JITTER_BUFFER_MS} ms; times in ms, "
          "CPU in % of one core; added = echo through voxgate - the bot's own (bot50/99); "
          "pass reads the limits' echo p99 as added99")
    _TABLE.step_through(
        steps, lambda n: run_step(n, clip, frames, workdir / f"n{n}", options),
        _warnings, "session", stop_at_failure=args.stop_at_failure)
    return 0


if __name__ == "__main__":
    sys.exit(main())
