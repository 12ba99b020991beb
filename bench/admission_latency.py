"""Admission latency benchmark: INVITE → 200 OK with the daemon at 80 % of its cap.

Run from the repository root as ``python -m bench.admission_latency`` (as
root for the tcpdump figures). A fresh ``voxgated`` with ``max_sessions =
100`` is pinned to CPU 0; SIPp (``scenarios/adm_call.xml``, signalling only)
on CPU 1 places calls at ``--rate`` calls/s, at most ``--concurrent`` at
once, each held ``concurrent / rate`` seconds so the load stays near
``--concurrent``, for ``--duration`` seconds. It prints:

- INVITE → 100 Trying and INVITE → 200 OK latency p50/p90/p99/max, from a
  tcpdump capture of the SIP port (µs timestamps, first INVITE and first
  response of each Call-ID), when running as root;
- the same INVITE → 200 OK from SIPp's ``-trace_rtt`` (1 ms resolution);
- calls placed, answered and failed, the daemon's admission counters, the
  peak of ``sessions.active`` sampled from the control socket, daemon CPU.

It prints figures; it never asserts on time.
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import sys
import tempfile
import threading
import time
import tomllib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.harness.daemon import ConfigOverrides, Daemon, free_udp_port, running_daemon
from tests.harness.pcap import Capture, UdpDatagram, percentile, read_udp
from tests.harness.sipp import Sipp, SippResult

from bench.sip_load import cpu_ticks
from voxgate.control.cli import ControlClient, DaemonUnavailable

DAEMON_CPU = 0
PEER_CPU = 1
SAMPLE_S = 0.25
CLK_TCK = os.sysconf("SC_CLK_TCK")
_CALL_ID = re.compile(rb"^(?:Call-ID|i)[ \t]*:[ \t]*(\S+)", re.M | re.I)
_CSEQ_INVITE = re.compile(rb"^CSeq[ \t]*:[ \t]*\d+[ \t]+INVITE\b", re.M | re.I)
_STATUS = re.compile(rb"^SIP/2\.0 (\d{3}) ")


@dataclass(frozen=True, slots=True)
class Latencies:
    """Per-call latencies in ms, INVITE to the first 100 and to the first 200."""

    trying_ms: list[float]
    answer_ms: list[float]


def sip_latencies(datagrams: Iterable[UdpDatagram], sip_port: int) -> Latencies:
    """Match each Call-ID's first INVITE to its first 100 and first 200 (capture times)."""
    invited: dict[bytes, float] = {}
    trying: dict[bytes, float] = {}
    answered: dict[bytes, float] = {}
    for datagram in datagrams:
        payload = datagram.payload
        call_id = _CALL_ID.search(payload)
        if call_id is None:
            continue
        key = call_id.group(1)
        if datagram.dst[1] == sip_port and payload.startswith(b"INVITE "):
            invited.setdefault(key, datagram.ts)
            continue
        status = _STATUS.match(payload)
        if datagram.src[1] != sip_port or status is None or not _CSEQ_INVITE.search(payload):
            continue
        table = {b"100": trying, b"200": answered}.get(status.group(1))
        if table is not None:
            table.setdefault(key, datagram.ts)

    def since_invite(table: dict[bytes, float]) -> list[float]:
        return [(ts - invited[k]) * 1000 for k, ts in table.items() if k in invited]

    return Latencies(since_invite(trying), since_invite(answered))


def sipp_rtt_ms(workdir: Path) -> list[float]:
    """Response times (ms) from SIPp's ``-trace_rtt`` files in ``workdir``."""
    values: list[float] = []
    for path in workdir.glob("*_rtt.csv"):
        with path.open(newline="") as f:
            rows = list(csv.reader(f, delimiter=";"))
        values += [float(row[1]) for row in rows[1:] if len(row) >= 2]
    return values


class StatusSampler:
    """A thread polling ``status`` on the control socket; keeps the peak and the last one."""

    def __init__(self, socket_path: str) -> None:
        self._path = socket_path
        self.peak_active = 0
        self.last: dict[str, Any] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> StatusSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self._sample()

    def _sample(self) -> None:
        try:
            with ControlClient(self._path) as client:
                self.last = client.call("status")
        except DaemonUnavailable:
            return
        self.peak_active = max(self.peak_active, self.last["sessions"]["active"])

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_S):
            self._sample()


def _figures(values_ms: Sequence[float]) -> str:
    if not values_ms:
        return "no samples"
    p50, p90, p99 = (percentile(values_ms, q) for q in (50, 90, 99))
    return (f"p50 {p50:7.3f}  p90 {p90:7.3f}  p99 {p99:7.3f}  max {max(values_ms):7.3f} ms"
            f"  (n={len(values_ms)})")


def _counters(status: dict[str, Any]) -> str:
    rows = status.get("admission", {}).get("counters", [])
    return ", ".join(f"{r['result']}/{r['reason']}={r['count']}" for r in rows) or "none"


def _run_load(daemon: Daemon, args: argparse.Namespace, workdir: Path,
              pinned: bool) -> tuple[SippResult, StatusSampler, float]:
    """SIPp at ``args.rate`` up to ``args.concurrent``; returns its result, samples, CPU %."""
    hold_s = args.concurrent / args.rate
    sipp = Sipp(
        "adm_call", daemon.sip_address, workdir=workdir / "sipp",
        local_port=free_udp_port(), media_port=free_udp_port(),
        calls=round(args.rate * args.duration), limit=args.concurrent, rate=args.rate,
        duration_ms=round(hold_s * 1000), timeout_s=args.duration + hold_s + 60,
        cpu=PEER_CPU if pinned else None, extra_args=["-trace_rtt", "-rtt_freq", "1"],
    )
    control = tomllib.loads(daemon.config_path.read_text())["control"]["socket"]
    with StatusSampler(control) as sampler, sipp:
        started, ticks = time.monotonic(), cpu_ticks(daemon.pid)
        result = sipp.wait()
        cpu_pct = 100.0 * (cpu_ticks(daemon.pid) - ticks) / CLK_TCK / (
            time.monotonic() - started)
    return result, sampler, cpu_pct


def run(args: argparse.Namespace, workdir: Path) -> None:
    """One run: daemon, optional capture, SIPp load; prints the figures."""
    hold_s = args.concurrent / args.rate
    overrides: ConfigOverrides = {
        "limits": {"max_sessions": args.max_sessions},
        "timers": {"media_inactivity_s": hold_s + 30},
        "log": {"level": "warning"},
    }
    pinned = len(os.sched_getaffinity(0)) >= 2
    capture: Capture | None = None
    pcap_path = workdir / "sip.pcap"
    with running_daemon(workdir / "daemon", overrides, rtp_ports=2 * args.max_sessions + 2,
                        cpu=DAEMON_CPU if pinned else None) as daemon:
        if os.geteuid() == 0:
            capture = Capture(pcap_path, daemon.sip_port, daemon.sip_port,
                              cpu=PEER_CPU if pinned else None)
            capture.start()
        try:
            result, sampler, cpu_pct = _run_load(daemon, args, workdir, pinned)
        finally:
            if capture is not None:
                capture.stop()
    print(f"max_sessions={args.max_sessions}, {args.rate:g} calls/s, at most "
          f"{args.concurrent} at once, hold {hold_s:.2f} s, {args.duration:g} s; "
          f"daemon {'on CPU 0, SIPp on CPU 1' if pinned else 'not pinned (one CPU)'}")
    print(f"calls: {result.created_calls} placed, {result.successful_calls} answered, "
          f"{result.failed_calls} failed (sipp exit {result.returncode})")
    print(f"admission: {_counters(sampler.last)}; peak active {sampler.peak_active}")
    print(f"daemon CPU: {cpu_pct:.1f} % of one core")
    if capture is not None:
        latencies = sip_latencies(read_udp(pcap_path), daemon.sip_port)
        pcap_path.unlink()
        print(f"INVITE -> 100 Trying (tcpdump): {_figures(latencies.trying_ms)}")
        print(f"INVITE -> 200 OK     (tcpdump): {_figures(latencies.answer_ms)}")
        if capture.stats is None or capture.stats.dropped_by_kernel:
            print("  warning: tcpdump dropped packets: the figures are incomplete")
    else:
        print("INVITE -> 200 OK     (tcpdump): skipped, needs root")
    print(f"INVITE -> 200 OK     (SIPp rtt, 1 ms resolution): "
          f"{_figures(sipp_rtt_ms(workdir / 'sipp'))}")


def main(argv: list[str] | None = None) -> int:
    """Parse options, run once, print; exit 0 whatever the figures."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.admission_latency",
        description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--max-sessions", type=int, default=100,
                        help="[limits] max_sessions (default: %(default)s)")
    parser.add_argument("--concurrent", type=int, default=80,
                        help="SIPp's concurrent call limit, -l (default: %(default)s)")
    parser.add_argument("--rate", type=float, default=50.0,
                        help="calls per second, -r (default: %(default)s)")
    parser.add_argument("--duration", type=float, default=20.0,
                        help="seconds of calls placed at --rate (default: %(default)s)")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where to keep config, logs and SIPp files (default: a temp dir)")
    args = parser.parse_args(argv)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="voxgate-admission-bench-"))
    print(f"workdir {workdir}", flush=True)
    run(args, workdir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
