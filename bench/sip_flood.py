"""SIP flood benchmark: one source floods INVITEs while normal callers place echo calls.

Run from the repository root as root (tcpdump on ``lo``) with
``python -m bench.sip_flood``. A fresh ``voxgated`` (``max_sessions =
--max-sessions``) is pinned to CPU 0. SIPp on CPU 1, bound to 127.0.0.2
(``-i``), sends ``--flood-rate`` INVITE/s for ``--flood-seconds`` and never
answers anything (no retransmission, no ACK: an attacker or a broken peer);
``--normal-delay`` seconds in, a second SIPp from 127.0.0.1 places
``--normal-calls`` echo calls (``uac_echo``, RTP streamed for
``--call-seconds``). By default a ``[[tenants]]`` entry ``trunk`` matches
127.0.0.1/32 and calls from anywhere else (tenant ``default``) are capped at
``--flood-tenant-cap`` sessions, as an operator would configure it; ``0``
leaves the flood competing for every slot.

tcpdump captures the SIP port and the RTP range. It prints: normal calls
connected (x/N), their INVITE → 200 setup time p50/p99, their outbound RTP
gap, loss and echo latency (as ``bench.sip_load`` measures them); flood
INVITEs sent and the daemon's answers by kind (stateless 503 "rate-limited",
stateless 503 "full", transactional answers, none = dropped), bytes out/in
towards the flood source (amplification), the daemon's SIP counters (from
``/metrics``), daemon CPU and the flood generator's CPU. All traffic stays in
127.0.0.0/8, bounded by ``-m`` and ``-timeout``. It prints figures; it never
asserts.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import socket
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from tests.harness.audio import make_speech_clip
from tests.harness.daemon import (
    ConfigOverrides,
    Daemon,
    TomlTable,
    TomlValue,
    free_udp_port,
    reserve_port_range,
    running_daemon,
)
from tests.harness.pcap import Capture, UdpDatagram, percentile, read_udp, rtp_packets
from tests.harness.sipp import Sipp

from bench.admission_latency import CLK_TCK, sip_latencies
from bench.sip_load import analyse, cpu_ticks

DAEMON_CPU = 0
PEER_CPU = 1
FLOOD_HOST = "127.0.0.2"
NORMAL_HOST = "127.0.0.1"
_CALL_ID = re.compile(rb"^(?:Call-ID|i)[ \t]*:[ \t]*(\S+)", re.M | re.I)
_STATUS = re.compile(rb"^SIP/2\.0 (\d{3}) ")
_WARNING = re.compile(rb'^Warning[ \t]*:[ \t]*399 voxgate "([^"]*)"', re.M | re.I)
_SIP_SAMPLE = re.compile(r"^voxgate_sip_(\w+(?:\{[^}]*\})?) (\S+)$", re.M)

# An INVITE and nothing else: no retransmission (-nr), no ACK, no reaction to answers.
FLOOD_SCENARIO = """<?xml version="1.0" encoding="ISO-8859-1" ?>
<!DOCTYPE scenario SYSTEM "sipp.dtd">
<scenario name="voxgate flood">
  <send>
    <![CDATA[

      INVITE sip:echo@[remote_ip]:[remote_port] SIP/2.0
      Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]
      From: "flood" <sip:flood@[local_ip]:[local_port]>;tag=[pid]F[call_number]
      To: <sip:echo@[remote_ip]:[remote_port]>
      Call-ID: [call_id]
      CSeq: 1 INVITE
      Contact: <sip:flood@[local_ip]:[local_port]>
      Max-Forwards: 70
      Content-Type: application/sdp
      Content-Length: [len]

      v=0
      o=flood 1 1 IN IP4 [local_ip]
      s=-
      c=IN IP4 [local_ip]
      t=0 0
      m=audio 9 RTP/AVP 0
      a=rtpmap:0 PCMU/8000

    ]]>
  </send>
</scenario>
"""


@dataclass(frozen=True, slots=True)
class FloodFigures:
    """What the SIP capture says about the flood source."""

    invites: int
    answers: Counter[str]  # kind → answers sent
    unanswered: int  # flood INVITEs (Call-IDs) that got no answer at all
    bytes_in: int  # UDP payload bytes flood → daemon
    bytes_out: int  # UDP payload bytes daemon → flood


def free_tcp_port() -> int:
    """A TCP port of 127.0.0.1 the kernel says is free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _answer_kind(payload: bytes) -> str:
    status = _STATUS.match(payload)
    if status is None:
        return "request"
    warning = _WARNING.search(payload)
    code = status.group(1).decode()
    return f"{code} {warning.group(1).decode()}" if warning else code


def flood_figures(datagrams: Iterable[UdpDatagram], sip_port: int) -> FloodFigures:
    """Count the flood's INVITEs and the daemon's answers towards the flood host."""
    invited: set[bytes] = set()
    answered: set[bytes] = set()
    answers: Counter[str] = Counter()
    bytes_in = bytes_out = invites = 0
    for datagram in datagrams:
        call_id = _CALL_ID.search(datagram.payload)
        if datagram.src[0] == FLOOD_HOST and datagram.dst[1] == sip_port:
            bytes_in += len(datagram.payload)
            if datagram.payload.startswith(b"INVITE ") and call_id:
                invites += 1
                invited.add(call_id.group(1))
        elif datagram.dst[0] == FLOOD_HOST and datagram.src[1] == sip_port:
            bytes_out += len(datagram.payload)
            answers[_answer_kind(datagram.payload)] += 1
            if call_id:
                answered.add(call_id.group(1))
    return FloodFigures(invites, answers, len(invited - answered), bytes_in, bytes_out)


def sip_counters(metrics_port: int) -> dict[str, float]:
    """The daemon's ``voxgate_sip_*`` samples, named without that prefix."""
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    return {sample: float(value) for sample, value in _SIP_SAMPLE.findall(text)}


def children_cpu_s() -> float:
    """User + system CPU seconds of every child reaped so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _overrides(args: argparse.Namespace, metrics_port: int) -> ConfigOverrides:
    limits: dict[str, TomlValue] = {"max_sessions": args.max_sessions, "drain_timeout_s": 2}
    overrides: dict[str, TomlTable | list[TomlTable]] = {
        "limits": limits,
        "metrics": {"listen": f"127.0.0.1:{metrics_port}"},
        "log": {"level": "warning"},
    }
    if args.flood_tenant_cap:
        limits["default_tenant_max_sessions"] = args.flood_tenant_cap
        overrides["tenants"] = [{"name": "trunk", "source_cidrs": [f"{NORMAL_HOST}/32"]}]
    return overrides


def _print_figures(daemon: Daemon, sip_pcap: Path, rtp_pcap: Path, window: tuple[float, float]
                   ) -> FloodFigures:
    sip = list(read_udp(sip_pcap))
    normal = [d for d in sip if NORMAL_HOST in (d.src[0], d.dst[0])
              and FLOOD_HOST not in (d.src[0], d.dst[0])]
    setup_ms = sip_latencies(normal, daemon.sip_port).answer_ms
    print(f"normal INVITE -> 200 setup: p50 {percentile(setup_ms, 50):.1f} ms, "
          f"p99 {percentile(setup_ms, 99):.1f} ms (n={len(setup_ms)})")
    packets = [p for p in rtp_packets(read_udp(rtp_pcap))
               if FLOOD_HOST not in (p.src[0], p.dst[0])]
    ports = range(daemon.rtp.first, daemon.rtp.last + 1)
    out_gaps, out_loss, _, in_loss, echo_ms = analyse(packets, ports, window)
    print(f"normal echo: out gap p50 {percentile(out_gaps, 50):.1f} / p99 "
          f"{percentile(out_gaps, 99):.1f} / max {max(out_gaps, default=float('nan')):.1f} ms, "
          f"out loss {out_loss:.3f} %, in loss {in_loss:.3f} %, echo p50 "
          f"{percentile(echo_ms, 50):.1f} / p99 {percentile(echo_ms, 99):.1f} ms")
    return flood_figures(sip, daemon.sip_port)


def run(args: argparse.Namespace, workdir: Path) -> None:
    """One run: daemon, captures, flood SIPp, normal SIPp; prints the figures."""
    clip = make_speech_clip(workdir / "clip")
    scenario = workdir / "flood.xml"
    scenario.write_text(FLOOD_SCENARIO)
    metrics_port = free_tcp_port()
    media = reserve_port_range(2 * args.normal_calls + 8)
    flood_total = round(args.flood_rate * args.flood_seconds)
    try:
        with running_daemon(workdir / "daemon", _overrides(args, metrics_port),
                            rtp_ports=2 * args.max_sessions + 10, cpu=DAEMON_CPU) as daemon:
            sip_pcap, rtp_pcap = workdir / "sip.pcap", workdir / "rtp.pcap"
            flood = Sipp(
                str(scenario), daemon.sip_address, workdir=workdir / "flood",
                local_port=free_udp_port(FLOOD_HOST), media_port=free_udp_port(),
                calls=flood_total, limit=flood_total, rate=args.flood_rate,
                timeout_s=args.flood_seconds + 30, cpu=PEER_CPU,
                extra_args=["-i", FLOOD_HOST, "-nr"],
            )
            normal = Sipp(
                "uac_echo", daemon.sip_address, workdir=workdir / "normal",
                local_port=free_udp_port(), media_port=media.first, clip=clip,
                calls=args.normal_calls, limit=args.normal_calls, rate=args.normal_calls,
                duration_ms=round(args.call_seconds * 1000),
                timeout_s=args.call_seconds + 30, cpu=PEER_CPU,
            )
            with (Capture(sip_pcap, daemon.sip_port, daemon.sip_port, cpu=PEER_CPU),
                  Capture(rtp_pcap, daemon.rtp.first, daemon.rtp.last, cpu=PEER_CPU) as rtp):
                started, ticks = time.monotonic(), cpu_ticks(daemon.pid)
                with flood:
                    time.sleep(args.normal_delay)
                    window_start = time.time() + 2.0  # calls up (1 s ramp) plus an edge
                    normal_result = normal.run()
                    window_stop = time.time() - 1.0
                    cpu_before = children_cpu_s()
                    flood_result = flood.wait()
                    flood_cpu_s = children_cpu_s() - cpu_before
                wall_s = time.monotonic() - started
                daemon_cpu_pct = 100.0 * (cpu_ticks(daemon.pid) - ticks) / CLK_TCK / wall_s
                counters = sip_counters(metrics_port)
            print(f"max_sessions={args.max_sessions}, flood {args.flood_rate:g} INVITE/s x "
                  f"{args.flood_seconds:g} s from {FLOOD_HOST}, "
                  + (f"its tenant capped at {args.flood_tenant_cap}"
                     if args.flood_tenant_cap else "no tenant cap")
                  + f"; daemon on CPU {DAEMON_CPU}, SIPp and tcpdump on CPU {PEER_CPU}")
            print(f"normal calls connected: {normal_result.successful_calls}/{args.normal_calls} "
                  f"(sipp exit {normal_result.returncode}, failed {normal_result.failed_calls})")
            figures = _print_figures(daemon, sip_pcap, rtp_pcap, (window_start, window_stop))
            if rtp.stats is None or rtp.stats.dropped_by_kernel:
                print("  warning: tcpdump dropped RTP packets: media figures are incomplete")
    finally:
        media.release()
    answers = ", ".join(f"{kind}: {n}" for kind, n in figures.answers.most_common())
    print(f"flood: {flood_result.created_calls} INVITEs created by SIPp, {figures.invites} "
          f"captured; unanswered (dropped) {figures.unanswered}")
    print(f"flood answers by kind: {answers or 'none'}")
    ratio = figures.bytes_out / figures.bytes_in if figures.bytes_in else float("nan")
    print(f"towards the flood source: {figures.bytes_out} B out / {figures.bytes_in} B in "
          f"= {ratio:.2f}x")
    flood_counters = {k: int(v) for k, v in sorted(counters.items())
                      if v and k != "messages_received_total"}
    print(f"daemon SIP counters: {flood_counters}")
    print(f"daemon CPU {daemon_cpu_pct:.1f} % of one core over {wall_s:.1f} s; flood SIPp "
          f"CPU {100.0 * flood_cpu_s / wall_s:.1f} % of one core")


def main(argv: list[str] | None = None) -> int:
    """Parse options, run once, print; exit 0 whatever the figures."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.sip_flood", description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--flood-rate", type=float, default=2000.0,
                        help="flood INVITEs per second (default: %(default)s)")
    parser.add_argument("--flood-seconds", type=float, default=12.0,
                        help="how long the flood lasts (default: %(default)s)")
    parser.add_argument("--normal-delay", type=float, default=3.0,
                        help="seconds of flood before the normal calls (default: %(default)s)")
    parser.add_argument("--normal-calls", type=int, default=10,
                        help="echo calls from 127.0.0.1 (default: %(default)s)")
    parser.add_argument("--call-seconds", type=float, default=5.0,
                        help="RTP seconds per normal call (default: %(default)s)")
    parser.add_argument("--max-sessions", type=int, default=20,
                        help="[limits] max_sessions (default: %(default)s)")
    parser.add_argument("--flood-tenant-cap", type=int, default=5,
                        help="sessions for callers outside 127.0.0.1/32; 0 = no tenant rule "
                             "(default: %(default)s)")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where to keep configs, logs and captures (default: a temp dir)")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("tcpdump needs root: run as root", file=sys.stderr)
        return 2
    if len(os.sched_getaffinity(0)) < 2:
        print("needs two CPUs (daemon on 0, SIPp and tcpdump on 1)", file=sys.stderr)
        return 2
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="voxgate-flood-bench-"))
    print(f"workdir {workdir}", flush=True)
    run(args, workdir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
