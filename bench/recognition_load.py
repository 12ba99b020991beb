"""Recognition under load: N callers talking to the local agent at once, and the media clock.

Starts ``voxgated`` with ``[agent] kind = "local"`` pinned to CPU 0 (its
recogniser worker processes inherit the pinning unless the daemon moves them),
this process (the callers, :class:`tests.harness.phone.Phone`) and tcpdump on
CPU 1, places ``--callers`` calls (32) and, once every greeting has been
played, has all callers speak at the same moment, turn after turn
(``--turns``), each waiting for the agent's answer before the next: menu
phrases, digit strings and sentences the menu does not know, so every
utterance is decoded by the grammar and the free-form model. A call the agent
ended (a fallback after no-matches) is placed again.

Over the talking window it prints:

- the media clock's tick lag p50/p99/max, from the capture: every daemon → caller
  RTP packet's capture time against its 20 ms slot (RTP timestamp / 160), the
  slot taken from the flow's earliest packets in each 5 s stretch, so a late
  tick shows as that many ms on every packet it sent;
- the daemon's own view: the event-loop lag p50/p99 (``voxgate_loop_lag_seconds``,
  as bucket bounds) and the 20 ms ticks it skipped
  (``voxgate_media_clock_frames_skipped``);
- response latency p50/p95: the daemon's ``response_ms`` of each ``agent_turn``
  and the ``voxgate_response_latency_seconds`` histogram (bucket bounds);
- recognitions done (speech turns), the daemon's and the workers' CPU (one
  core = 100 %) and the load generator's (this process).

``--runs`` repeats the whole measurement with a fresh daemon. Figures only:
it never passes or fails.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import re
import sys
import tempfile
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from tests.harness import missing_tools
from tests.harness.daemon import Daemon, running_daemon
from tests.harness.pcap import Capture, RtpPacket, percentile, read_udp, rtp_packets
from tests.harness.phone import Call, Phone, RtpPeer

from bench.agent_latency import first_speech_after, speech_clip, wait_quiet
from bench.sip_load import clock_counters
from voxgate.control.cli import ControlClient

DAEMON_CPU = 0
LOAD_CPU = 1
PHRASES = (
    "can you call me back tomorrow morning",
    "balance",
    "I want to check my account balance please",
    "four five six",
    "yes",
)
"""What every caller says, in turn: main (no-match) → account → (no-match) → more → main."""
STOP_MS = 500
TURN_SYNC_TIMEOUT_S = 60.0
SLOT_WINDOW_S = 5.0
"""Stretch of a flow whose earliest packet defines its on-time slot (clock drift)."""
FRAME_S = 0.020
SAMPLES_PER_FRAME = 160
_CLK_TCK = os.sysconf("SC_CLK_TCK")
_RESTARTS = re.compile(r"^voxgate_recognizer_restarts_total (\S+)$", re.M)
_BUCKET = re.compile(r'^voxgate_response_latency_seconds_bucket\{agent="local",le="([^"]+)"\} '
                     r"(\S+)$", re.M)


@dataclass
class Load:
    """What the callers did: turns answered, caller-side latencies, failures, redials."""

    latencies_s: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    redials: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


def _place(phone: Phone) -> tuple[RtpPeer, Call] | None:
    peer = phone.rtp_peer()
    call = phone.call("agent", media=peer)
    if call.final_status != 200:
        return None
    peer.resume()
    wait_quiet(peer, call.final_at or time.monotonic())
    return peer, call


def _caller(phone: Phone, clips: dict[str, tuple[bytes, float]], turns: int,
            start: threading.Barrier, barrier: threading.Barrier, load: Load) -> None:
    placed = _place(phone)
    start.wait()
    for turn in range(turns):
        with contextlib.suppress(threading.BrokenBarrierError):  # a caller failed: the
            barrier.wait()  # rest go on unsynchronised
        if placed is None or placed[1].bye is not None:
            placed = _place(phone)
            with load.lock:
                load.redials += 1
            if placed is None:
                with load.lock:
                    load.failures.append("INVITE not answered 200")
                barrier.abort()
                return
        peer, _ = placed
        clip, speech_s = clips[PHRASES[turn % len(PHRASES)]]
        spoken_end = time.monotonic() + speech_s
        peer.play(clip)
        first = first_speech_after(peer, spoken_end)
        if first is None:
            with load.lock:
                load.failures.append(f"no answer to {PHRASES[turn % len(PHRASES)]!r}")
            continue
        with load.lock:
            load.latencies_s.append(first - spoken_end)
        wait_quiet(peer, first)
    if placed is not None and placed[1].bye is None:
        phone.hang_up(placed[1])


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (children of all its threads, recursively)."""
    found: list[int] = []
    pending = [pid]
    while pending:
        parent = pending.pop()
        try:
            tasks = os.listdir(f"/proc/{parent}/task")
        except FileNotFoundError:
            continue
        for tid in tasks:
            try:
                with open(f"/proc/{parent}/task/{tid}/children", encoding="ascii") as f:
                    children = [int(c) for c in f.read().split()]
            except FileNotFoundError:
                continue
            found += children
            pending += children
    return found


def cpu_ticks(pids: list[int], *, reaped: bool = False) -> dict[int, int]:
    """utime + stime (clock ticks) of each live pid; with ``reaped``, cutime + cstime
    instead (its children that have ended and been waited for)."""
    first = 13 if reaped else 11  # fields 14-15 or 16-17 of proc(5), after the name
    ticks = {}
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat", encoding="ascii") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        ticks[pid] = int(fields[first]) + int(fields[first + 1])
    return ticks


def cpus_allowed(pid: int) -> str:
    """The CPUs ``pid`` may run on (``Cpus_allowed_list``), "?" when it is gone."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            return next(line.split(":", 1)[1].strip() for line in f
                        if line.startswith("Cpus_allowed_list:"))
    except (FileNotFoundError, StopIteration):
        return "?"


def tick_lags_s(packets: list[RtpPacket], daemon_ports: range, window: tuple[float, float]
                ) -> list[float]:
    """Every daemon → caller packet's delay behind its 20 ms slot within ``window``."""
    flows: dict[tuple[object, ...], list[RtpPacket]] = defaultdict(list)
    for p in packets:
        if p.src[1] in daemon_ports and window[0] <= p.ts <= window[1]:
            flows[(p.src, p.dst, p.ssrc)].append(p)
    lags: list[float] = []
    for flow in flows.values():
        flow.sort(key=lambda p: p.ts)
        first_ts = flow[0].timestamp
        offsets = [(p.ts, p.ts - ((p.timestamp - first_ts) & 0xFFFFFFFF)
                    / SAMPLES_PER_FRAME * FRAME_S) for p in flow]
        for _, stretch in itertools.groupby(offsets, key=lambda o: int(
                (o[0] - offsets[0][0]) // SLOT_WINDOW_S)):
            values = [offset for _, offset in stretch]
            on_time = min(values)
            lags += [offset - on_time for offset in values]
    return lags


def _restarts(text: str) -> float:
    found = _RESTARTS.search(text)
    return float(found.group(1)) if found else 0.0


def _histogram(text: str) -> dict[float, float]:
    return {float(bound): float(count) for bound, count in _BUCKET.findall(text)}


def bucket_percentile_ms(before: dict[float, float], after: dict[float, float],
                         q: float) -> float:
    """The ``q`` percentile of a histogram between two scrapes, as a bucket bound (ms)."""
    bounds = sorted(after)
    deltas = [after[b] - before.get(b, 0.0) for b in bounds]
    if not deltas or deltas[-1] <= 0:
        return float("nan")
    return next(b * 1000 for b, c in zip(bounds, deltas, strict=True)
                if c >= q / 100 * deltas[-1])


def _metrics(daemon: Daemon) -> str:
    with ControlClient(daemon.control_socket) as client:
        return str(client.call("metrics")["text"])


def run(callers: int, turns: int, clips: dict[str, tuple[bytes, float]]) -> None:
    """One measurement with a fresh daemon; prints its figures."""
    with tempfile.TemporaryDirectory(prefix="voxgate-recognition-load-") as tmp, \
            running_daemon(Path(tmp) / "daemon", {
                "agent": {"kind": "local"}, "vad": {"stop_ms": STOP_MS},
                "rtp": {"jitter_buffer_ms": 100},
                "timers": {"media_inactivity_s": 60},
                "limits": {"max_sessions": 2 * callers + 16}},
                rtp_ports=4 * callers + 100, cpu=DAEMON_CPU) as daemon:
        load = Load()
        # Every caller and this thread meet once the greetings are over: the window opens.
        start = threading.Barrier(callers + 1)
        barrier = threading.Barrier(callers, timeout=TURN_SYNC_TIMEOUT_S)
        capture = Capture(Path(tmp) / "rtp.pcap", daemon.rtp.first, daemon.rtp.last,
                          cpu=LOAD_CPU)
        with Phone(daemon) as phone, capture:
            threads = [threading.Thread(target=_caller,
                                        args=(phone, clips, turns, start, barrier, load))
                       for _ in range(callers)]
            for thread in threads:
                thread.start()
            start.wait()
            workers = descendants(daemon.pid)
            turns_before = len(daemon.events("agent_turn"))
            metrics_before = _metrics(daemon)
            lag_before, skipped_before = clock_counters(daemon.control_socket)
            daemon_before, workers_before = cpu_ticks([daemon.pid]), cpu_ticks(workers)
            reaped_before = cpu_ticks([daemon.pid], reaped=True)
            load_before, started = os.times(), time.time()
            for thread in threads:
                thread.join()
            stopped, load_after = time.time(), os.times()
            workers_now = descendants(daemon.pid)
            daemon_after = cpu_ticks([daemon.pid])
            reaped_after = cpu_ticks([daemon.pid], reaped=True)
            workers_after = cpu_ticks(sorted(set(workers) | set(workers_now)))
            lag_after, skipped_after = clock_counters(daemon.control_socket)
            metrics_after = _metrics(daemon)
            turn_events = daemon.events("agent_turn")[turns_before:]
        daemon_ports = range(daemon.rtp.first, daemon.rtp.last + 1)
        lags_ms = [lag * 1000 for lag in tick_lags_s(
            rtp_packets(read_udp(capture.path)), daemon_ports, (started, stopped))]
        affinity = ",".join(sorted({cpus_allowed(pid) for pid in workers_now})) or "-"
        daemon.terminate()
    window = stopped - started
    speech_turns = [t for t in turn_events if t.get("input") == "speech"]
    response_ms = [float(t["response_ms"]) for t in speech_turns if "response_ms" in t]
    # Live workers' own time, plus what workers that ended meanwhile left to the daemon
    # (their whole life: less what they had used before the window).
    worker_ticks = (sum(workers_after.values()) - sum(workers_before.values())
                    + sum(reaped_after.values()) - sum(reaped_before.values()))
    daemon_ticks = daemon_after.get(daemon.pid, 0) - daemon_before.get(daemon.pid, 0)
    load_s = (load_after.user + load_after.system) - (load_before.user + load_before.system)
    before, after = _histogram(metrics_before), _histogram(metrics_after)
    print(f"{callers} callers x {turns} turns, talking window {window:.1f} s, "
          f"capture drops {capture.stats.dropped_by_kernel if capture.stats else '?'}")
    print(f"  media clock tick lag (capture, {len(lags_ms)} packets): "
          f"p50 {percentile(lags_ms, 50):.2f} ms  p99 {percentile(lags_ms, 99):.2f} ms  "
          f"max {max(lags_ms, default=float('nan')):.2f} ms")
    print(f"  daemon loop lag p50 <= {bucket_percentile_ms(lag_before, lag_after, 50):.0f} ms"
          f"  p99 <= {bucket_percentile_ms(lag_before, lag_after, 99):.0f} ms;"
          f"  media clock frames skipped {round(skipped_after - skipped_before)}")
    print(f"  response latency: daemon response_ms p50 {percentile(response_ms, 50):.0f} ms"
          f"  p95 {percentile(response_ms, 95):.0f} ms; histogram p50 <= "
          f"{bucket_percentile_ms(before, after, 50):.0f} ms  p95 <= "
          f"{bucket_percentile_ms(before, after, 95):.0f} ms; caller-side p50 "
          f"{percentile(load.latencies_s, 50) * 1000:.0f} ms  p95 "
          f"{percentile(load.latencies_s, 95) * 1000:.0f} ms")
    print(f"  recognitions {len(speech_turns)} ({len(speech_turns) / window:.1f}/s), "
          f"no-match {sum(t.get('intent') == 'no-match' for t in speech_turns)}; "
          f"answers {len(load.latencies_s)}, failures {len(load.failures)}"
          f"{' (' + load.failures[0] + ')' if load.failures else ''}, redials {load.redials}, "
          f"worker restarts {_restarts(metrics_after) - _restarts(metrics_before):.0f}")
    print(f"  CPU (one core = 100 %): daemon {100 * daemon_ticks / _CLK_TCK / window:.0f} %, "
          f"{len(workers_now)} worker processes {100 * worker_ticks / _CLK_TCK / window:.0f} %"
          f" (CPUs {affinity}), load generator {100 * load_s / window:.0f} %", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--callers", type=int, default=32)
    parser.add_argument("--turns", type=int, default=2 * len(PHRASES))
    parser.add_argument("--runs", type=int, default=1)
    options = parser.parse_args()
    missing = missing_tools("espeak-ng", "taskset", "tcpdump")
    if missing:
        print(f"recognition_load: missing {', '.join(missing)}", file=sys.stderr)
        return 1
    os.sched_setaffinity(0, {LOAD_CPU})
    clips = {phrase: speech_clip(phrase) for phrase in PHRASES}
    for number in range(1, options.runs + 1):
        print(f"run {number}/{options.runs}: voxgated on CPU {DAEMON_CPU}, callers and "
              f"tcpdump on CPU {LOAD_CPU}, [vad] stop_ms {STOP_MS}", flush=True)
        run(options.callers, options.turns, clips)
    return 0


if __name__ == "__main__":
    sys.exit(main())
