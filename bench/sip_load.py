"""SIP/RTP load benchmark: N concurrent echo calls against one pinned daemon.

Run from the repository root as ``python -m bench.sip_load`` (root, because
tcpdump captures on ``lo``). For each N in ``--steps`` a fresh ``voxgated``
is pinned to CPU 0 (``taskset -c 0``) with ``max_sessions`` above N; SIPp
(pinned to the other core with tcpdump) ramps N calls up over ``--ramp``
seconds, each streaming the looped speech clip for ``--duration`` seconds
after the ramp. Over the steady window (every call up) it measures:

- outbound (daemon → caller) RTP inter-packet gap p50/p99/max and loss from
  sequence numbers; the same for inbound as a check that SIPp kept up;
- echo latency p50/p99 (echoed payload matched to the caller's packet);
- daemon CPU (utime+stime from /proc/PID/stat over the window) and RSS
  (VmRSS), RSS per session = (RSS at N - idle RSS) / N;
- tcpdump's "dropped by kernel" count (a non-zero count voids the figures);
- the daemon's own view of its media clock over the window: the event-loop
  lag p99 (``voxgate_loop_lag_seconds``, as the bucket bound) and the 20 ms
  ticks it was too late for (``voxgate_media_clock_frames_skipped``).

Call records (``[records]``) are on by default, as in production;
``--records off`` measures without them. ``--churn-cps X`` adds short calls
(2 s, X per second, a second SIPp) beside the measured ones, so records and
post-call jobs are written all through the window; ``--postcall`` sends every
``call.completed`` job to an HTTP sink in this process (on the peers' core).
``--transport tcp`` carries the SIP of every call over TCP (``[sip]
listen_tcp``, SIPp ``-t t1``: one connection for all calls); the Debian SIPp
is built without TLS, so there is no ``tls``.

It prints a table, the largest N meeting gap p99 ≤ 30 ms, gap max ≤ 100 ms,
loss ≤ 0.1 % and echo p99 ≤ 60 ms with every call successful, and stops
stepping at the first N that fails. It prints figures; it never asserts.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from tests.harness.audio import SpeechClip, make_speech_clip
from tests.harness.daemon import (
    ConfigOverrides,
    free_tcp_port,
    free_udp_port,
    reserve_port_range,
    running_daemon,
)
from tests.harness.pcap import (
    Capture,
    FlowStats,
    RtpPacket,
    all_echo_latencies_s,
    flow_stats,
    percentile,
    read_udp,
    rtp_packets,
)
from tests.harness.sipp import Sipp

from bench.table import GAP_P99_LIMIT_MS, Table, within_limits
from voxgate.control.cli import ControlClient

DAEMON_CPU = 0
PEER_CPU = 1
_EDGE_S = 1.0  # trimmed off both ends of the steady window
_CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True, slots=True)
class StepResult:
    """Figures for one N."""

    sessions: int
    calls_ok: int
    out_gap_p50_ms: float
    out_gap_p99_ms: float
    out_gap_max_ms: float
    out_loss_pct: float
    in_gap_p99_ms: float
    in_loss_pct: float
    echo_p50_ms: float
    echo_p99_ms: float
    cpu_pct: float
    rss_kib: int
    idle_rss_kib: int
    tcpdump_dropped: int
    loop_lag_p99_ms: float
    frames_skipped: int
    churn_calls: int

    @property
    def rss_per_session_kib(self) -> float:
        """(RSS at N - idle RSS) / N."""
        return (self.rss_kib - self.idle_rss_kib) / self.sessions

    @property
    def passed(self) -> bool:
        """Every call succeeded and every limit of the module docstring holds."""
        return self.calls_ok == self.sessions and within_limits(
            self.out_gap_p99_ms, self.out_gap_max_ms, self.out_loss_pct, self.echo_p99_ms)


def cpu_ticks(pid: int) -> int:
    """utime + stime of ``pid`` in clock ticks (/proc/PID/stat fields 14 and 15)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return int(fields[11]) + int(fields[12])


@dataclass(frozen=True, slots=True)
class CoreTicks:
    """Clock ticks of one CPU since boot (``/proc/stat``); differences over a window."""

    busy: int
    """All but idle, iowait and steal: less the daemon's own :func:`cpu_ticks` over a
    window, the foreign load on its core."""
    steal: int
    """The hypervisor ran something else while the core had work (0 on bare metal)."""
    total: int


def core_ticks(cpu: int) -> CoreTicks:
    """CPU ``cpu``'s :class:`CoreTicks` now."""
    for line in Path("/proc/stat").read_text().splitlines():
        fields = line.split()
        if fields[0] == f"cpu{cpu}":
            user, nice, system, idle, iowait, irq, softirq, *rest = map(int, fields[1:9])
            busy, steal = user + nice + system + irq + softirq, rest[0] if rest else 0
            return CoreTicks(busy, steal, busy + idle + iowait + steal)
    raise LookupError(f"no cpu{cpu} line in /proc/stat")


def rss_kib(pid: int) -> int:
    """VmRSS of ``pid`` in KiB (0 if the line is missing)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


@dataclass(frozen=True, slots=True)
class Options:
    """What every step of one run shares."""

    duration_s: float
    ramp_s: float
    records: bool
    churn_cps: float
    postcall_url: str
    transport: str = "udp"


def clock_counters(control_socket: str) -> tuple[dict[float, float], float]:
    """The daemon's loop-lag histogram (bucket bound s → cumulative count) and
    media-clock frames skipped, from ``voxgatectl metrics``."""
    with ControlClient(control_socket) as client:
        text = str(client.call("metrics")["text"])
    buckets: dict[float, float] = {}
    skipped = 0.0
    for line in text.splitlines():
        if line.startswith("voxgate_loop_lag_seconds_bucket{"):
            bound = line.split('le="', 1)[1].split('"', 1)[0]
            buckets[float(bound)] = float(line.rsplit(" ", 1)[1])
        elif line.startswith("voxgate_media_clock_frames_skipped_total "):
            skipped = float(line.rsplit(" ", 1)[1])
    return buckets, skipped


def lag_p99_ms(before: dict[float, float], after: dict[float, float]) -> float:
    """The p99 of the loop lag between two scrapes, as the bucket's upper bound (ms)."""
    bounds = sorted(after)
    deltas = [after[b] - before.get(b, 0.0) for b in bounds]
    if not deltas or deltas[-1] <= 0:
        return float("nan")
    for bound, cumulative in zip(bounds, deltas, strict=True):
        if cumulative >= 0.99 * deltas[-1]:
            return bound * 1000
    return float("inf")


class _Sink(BaseHTTPRequestHandler):
    """A post-call webhook that takes every job (204) and keeps nothing."""

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self.send_response(204)
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


@contextlib.contextmanager
def postcall_sink() -> Iterator[str]:
    """An HTTP sink on 127.0.0.1 for ``call.completed`` jobs; yields its URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Sink)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/calls"
    finally:
        server.shutdown()
        server.server_close()


def _flow_figures(flows: list[FlowStats]) -> tuple[list[float], float]:
    """All gaps (ms) and the loss percentage over a set of flows."""
    gaps_ms = [g * 1000 for f in flows for g in f.gaps_s]
    expected = sum(f.expected for f in flows)
    lost = sum(f.lost for f in flows)
    return gaps_ms, (100.0 * lost / expected if expected else 100.0)


def analyse(
    packets: list[RtpPacket], daemon_ports: range, window: tuple[float, float],
    caller_ports: range | None = None,
) -> tuple[list[float], float, list[float], float, list[float]]:
    """Outbound gaps and loss, inbound gaps and loss, echo latencies (ms), in ``window``;
    only the measured calls' packets (caller side on ``caller_ports``) when given."""
    start, stop = window
    steady = [p for p in packets if start <= p.ts <= stop and (
        caller_ports is None or p.src[1] in caller_ports or p.dst[1] in caller_ports)]
    flows = flow_stats(steady)

    def from_daemon(f: FlowStats) -> bool:
        return f.src[1] in daemon_ports

    out_gaps, out_loss = _flow_figures([f for f in flows.values() if from_daemon(f)])
    in_gaps, in_loss = _flow_figures([f for f in flows.values() if not from_daemon(f)])
    callers = {f.src for f in flows.values() if not from_daemon(f)}
    echo_ms = [s * 1000 for s in all_echo_latencies_s(steady, callers)]
    return out_gaps, out_loss, in_gaps, in_loss, echo_ms


CHURN_CALL_MS = 2000


def run_step(sessions: int, clip: SpeechClip, workdir: Path, options: Options) -> StepResult:
    """One N: fresh daemon, capture, SIPp ramp + steady streaming, figures."""
    duration_s, ramp_s = options.duration_s, options.ramp_s
    churn_total = round(options.churn_cps * (duration_s + 2 * ramp_s))
    churn_up = max(1, round(options.churn_cps * CHURN_CALL_MS / 1000))
    overrides: ConfigOverrides = {
        "limits": {"max_sessions": sessions + churn_up + 50, "drain_timeout_s": 5},
        "log": {"level": "warning"},
    }
    tcp_port = free_tcp_port()
    sipp_args: list[str] = []
    if options.transport == "tcp":
        overrides = {**overrides, "sip": {"listen_tcp": f"127.0.0.1:{tcp_port}"}}
        sipp_args = ["-t", "t1"]
    if not options.records:
        overrides = {**overrides, "records": {"path": ""}}
    elif options.postcall_url:
        overrides = {**overrides, "postcall": {"webhook": options.postcall_url}}
    media = reserve_port_range(2 * (sessions + churn_up) + 64)
    try:
        with running_daemon(
            workdir / "daemon", overrides, rtp_ports=2 * (sessions + churn_up) + 100,
            cpu=DAEMON_CPU,
        ) as daemon, contextlib.ExitStack() as churn:
            time.sleep(1.0)
            idle_rss = rss_kib(daemon.pid)
            pcap_path = workdir / "rtp.pcap"
            capture = Capture(pcap_path, daemon.rtp.first, daemon.rtp.last, cpu=PEER_CPU)
            target = ("127.0.0.1", tcp_port) if sipp_args else daemon.sip_address
            sipp = Sipp(
                "uac_echo", target, workdir=workdir / "sipp",
                local_port=free_udp_port(), media_port=media.first, clip=clip,
                calls=sessions, limit=sessions, rate=sessions / ramp_s,
                duration_ms=round((duration_s + ramp_s) * 1000),
                timeout_s=duration_s + 2 * ramp_s + 60, cpu=PEER_CPU, extra_args=sipp_args,
            )
            if churn_total:
                churn.enter_context(Sipp(
                    "uac_echo", target, workdir=workdir / "churn",
                    local_port=free_udp_port(), media_port=media.first + 2 * sessions + 32,
                    clip=clip, calls=churn_total, limit=2 * churn_up, rate=options.churn_cps,
                    duration_ms=CHURN_CALL_MS, timeout_s=duration_s + 2 * ramp_s + 60,
                    cpu=PEER_CPU, extra_args=sipp_args,
                ))
            with capture, sipp:
                t0 = time.time()
                time.sleep(ramp_s + _EDGE_S)
                lag_start, skipped_start = clock_counters(daemon.control_socket)
                window_start, ticks_start = time.time(), cpu_ticks(daemon.pid)
                time.sleep(duration_s / 2 - _EDGE_S)
                rss = rss_kib(daemon.pid)
                time.sleep(max(0.0, t0 + ramp_s + duration_s - _EDGE_S - time.time()))
                window_stop, ticks_stop = time.time(), cpu_ticks(daemon.pid)
                lag_stop, skipped_stop = clock_counters(daemon.control_socket)
                result = sipp.wait()
            capture_stats = capture.stats
            daemon_ports = range(daemon.rtp.first, daemon.rtp.last + 1)
    finally:
        media.release()
    cpu_pct = 100.0 * (ticks_stop - ticks_start) / _CLK_TCK / (window_stop - window_start)
    packets = rtp_packets(read_udp(pcap_path))
    out_gaps, out_loss, in_gaps, in_loss, echo_ms = analyse(
        packets, daemon_ports, (window_start, window_stop),
        range(media.first, media.first + 2 * sessions + 32),
    )
    pcap_path.unlink()
    return StepResult(
        sessions=sessions,
        calls_ok=result.successful_calls,
        out_gap_p50_ms=percentile(out_gaps, 50),
        out_gap_p99_ms=percentile(out_gaps, 99),
        out_gap_max_ms=max(out_gaps, default=float("nan")),
        out_loss_pct=out_loss,
        in_gap_p99_ms=percentile(in_gaps, 99),
        in_loss_pct=in_loss,
        echo_p50_ms=percentile(echo_ms, 50),
        echo_p99_ms=percentile(echo_ms, 99),
        cpu_pct=cpu_pct,
        rss_kib=rss,
        idle_rss_kib=idle_rss,
        tcpdump_dropped=capture_stats.dropped_by_kernel if capture_stats else -1,
        loop_lag_p99_ms=lag_p99_ms(lag_start, lag_stop),
        frames_skipped=round(skipped_stop - skipped_start),
        churn_calls=churn_total,
    )


_TABLE: Table[StepResult] = Table((
    ("N", "d", lambda r: r.sessions),
    ("ok", "d", lambda r: r.calls_ok),
    ("gap50", ".1f", lambda r: r.out_gap_p50_ms),
    ("gap99", ".1f", lambda r: r.out_gap_p99_ms),
    ("gapmax", ".1f", lambda r: r.out_gap_max_ms),
    ("loss%", ".3f", lambda r: r.out_loss_pct),
    ("echo50", ".1f", lambda r: r.echo_p50_ms),
    ("echo99", ".1f", lambda r: r.echo_p99_ms),
    ("cpu%", ".1f", lambda r: r.cpu_pct),
    ("rssMiB", ".1f", lambda r: r.rss_kib / 1024),
    ("KiB/sess", ".1f", lambda r: r.rss_per_session_kib),
    ("in_gap99", ".1f", lambda r: r.in_gap_p99_ms),
    ("in_loss%", ".3f", lambda r: r.in_loss_pct),
    ("tcpdrop", "d", lambda r: r.tcpdump_dropped),
    ("lag99", ".0f", lambda r: r.loop_lag_p99_ms),
    ("skipped", "d", lambda r: r.frames_skipped),
    ("pass", "s", lambda r: "yes" if r.passed else "NO"),
))


def _warnings(result: StepResult) -> list[str]:
    warnings = []
    if result.tcpdump_dropped:
        warnings.append(f"tcpdump dropped {result.tcpdump_dropped} packets: figures for this "
                        "step are not trustworthy")
    if result.in_gap_p99_ms > GAP_P99_LIMIT_MS:
        warnings.append("SIPp's own sending gaps exceed the limit: the load generator did not "
                        "keep up")
    return warnings


def main(argv: list[str] | None = None) -> int:
    """Parse options, step through N, print the table and the verdict."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.sip_load", description=(__doc__ or "").split("\n")[0]
    )
    parser.add_argument("--steps", default="50,100,200,300,400,500",
                        help="comma-separated session counts (default: %(default)s)")
    parser.add_argument("--duration", type=float, default=30.0,
                        help="steady streaming seconds per step, all calls up (default: 30)")
    parser.add_argument("--ramp", type=float, default=10.0,
                        help="seconds over which the calls are started (default: 10)")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where to keep configs, logs and captures (default: a temp dir)")
    parser.add_argument("--records", choices=("on", "off"), default="on",
                        help="call records in SQLite (default: on)")
    parser.add_argument("--churn-cps", type=float, default=0.0, metavar="X",
                        help="extra 2 s calls per second beside the measured ones (default: 0)")
    parser.add_argument("--transport", choices=("udp", "tcp"), default="udp",
                        help="SIP transport of the calls (default: udp)")
    parser.add_argument("--postcall", action="store_true",
                        help="post every call.completed job to an HTTP sink in this process")
    args = parser.parse_args(argv)
    steps = [int(s) for s in args.steps.split(",") if s.strip()]
    if os.geteuid() != 0:
        print("tcpdump needs root: run as root", file=sys.stderr)
        return 2
    if len(os.sched_getaffinity(0)) < 2:
        print("needs two CPUs (daemon on 0, SIPp and tcpdump on 1)", file=sys.stderr)
        return 2
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="voxgate-bench-"))
    clip = make_speech_clip(workdir / "clip")
    os.sched_setaffinity(0, {PEER_CPU})  # this process (analysis, sink) stays off the daemon's
    print(f"workdir {workdir}; clip {clip.duration_s:.2f} s; daemon on CPU {DAEMON_CPU}, "
          f"SIPp, tcpdump and this process on CPU {PEER_CPU}; records {args.records}, "
          f"churn {args.churn_cps:g} calls/s, post-call sink {'on' if args.postcall else 'off'}, "
          f"SIP over {args.transport.upper()}")
    with contextlib.ExitStack() as stack:
        url = stack.enter_context(postcall_sink()) if args.postcall else ""
        options = Options(args.duration, args.ramp, args.records == "on", args.churn_cps, url,
                          args.transport)
        _TABLE.step_through(
            steps, lambda n: run_step(n, clip, workdir / f"n{n}", options),
            _warnings, "session")
    return 0


if __name__ == "__main__":
    sys.exit(main())
