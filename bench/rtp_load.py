"""SIP/RTP echo load with a C load generator that is not the bottleneck.

Run from the repository root as ``python -m bench.rtp_load``. SIPp's
``rtp_stream`` stops keeping up at about 600 calls here, so the calls come from
``bench/rtpload.c`` (one epoll loop, timerfd pacing, kernel receive timestamps;
compiled with gcc into a cache directory on first use). For each N in
``--steps``, ``--runs`` times: a fresh ``voxgated`` pinned to CPU 0, the
generator pinned to CPU 1, N calls INVITEd at ``--rate`` calls/s, each
streaming the µ-law speech clip (20 ms frames, phases spread over the 20 ms
period, or all on one phase with ``--aligned``), then a steady window of
``--duration`` seconds, then BYE. The generator runs SCHED_FIFO (``--fifo``) so
other work on its core cannot make it send late. ``--transport tls`` carries
every call's SIP on one TLS connection to the daemon's ``[sip] listen_tls`` (a
self-signed certificate for 127.0.0.1, which the generator verifies), as a
trunk would (``--transport tcp``: one TCP connection to ``[sip] listen_tcp``);
``--srtp`` offers RTP/SAVP with SDES keys and runs the daemon with
``[rtp] srtp = "required"``, the generator protecting and unprotecting every
packet with libsrtp2. Over the window:

- from the generator: the daemon's outbound RTP inter-packet gaps (p50/p99/max)
  and loss from sequence numbers; echo latency p50/p99 (every echoed payload
  matched byte for byte to the frame sent) and its drift (echo p50 over the
  window's last 5 s minus its first 5 s); INVITE → 200 p50/p99; every call
  that failed and why (503s counted); its own CPU and send lateness p99;
- from the daemon: CPU (/proc/PID/stat) as ms per session-second and µs per
  call-tick (CPU s / (N * 50 * window s) * 1e6), RSS per session ((RSS in the
  window - idle RSS) / N), N being the calls answered (503s excluded), and
  the 20 ms ticks its media clock skipped;
- from the daemon's core: other processes' CPU on it, the hypervisor's steal
  time, and how fast it ran (:mod:`bench.host_probe`: on a virtual machine the
  same work takes up to twice as long in spells, which explains runs that fail
  at a load others sustain).

A run is sustained when every call was answered and up through the window and
gap p99 ≤ 30 ms, gap max ≤ 100 ms, loss ≤ 0.1 %, echo p99 ≤ 60 ms. It prints a
row per run (with the reasons a run failed), then the largest N sustained in
all runs. It stops stepping after an N that no run sustained (``--all-steps``
runs every N). It prints figures; it never asserts.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from tests.harness.audio import FRAME_SAMPLES, make_speech_clip, read_wav
from tests.harness.certs import self_signed
from tests.harness.daemon import (
    ConfigOverrides,
    TomlTable,
    free_tcp_port,
    reserve_port_range,
    running_daemon,
)

from bench.host_probe import HostProbe, ProbeFigures
from bench.sip_load import (
    DAEMON_CPU,
    PEER_CPU,
    clock_counters,
    core_ticks,
    cpu_ticks,
    rss_kib,
)
from bench.table import (
    ECHO_P99_LIMIT_MS,
    GAP_MAX_LIMIT_MS,
    GAP_P99_LIMIT_MS,
    LIMITS_TEXT,
    LOSS_LIMIT_PCT,
    Table,
    largest_sustained,
)

GENERATOR_SOURCE = Path(__file__).with_name("rtpload.c")
TICKS_PER_S = 50  # 20 ms media ticks
_CLK_TCK = os.sysconf("SC_CLK_TCK")
_IDLE_SETTLE_S = 1.0
_GENERATOR_SLACK_S = 60.0  # beyond ramp + window + hang-up before the generator is killed


GENERATOR_LIBRARIES = ("libsrtp2", "openssl")
"""pkg-config names of what the generator links (Debian libsrtp2-dev, libssl-dev)."""


def generator_link_flags() -> list[str]:
    """Compiler and linker flags for :data:`GENERATOR_LIBRARIES` from pkg-config, or
    plain ``-lsrtp2 -lssl -lcrypto`` when pkg-config is missing or does not know them."""
    try:
        flags = subprocess.run(["pkg-config", "--cflags", "--libs", *GENERATOR_LIBRARIES],
                               check=True, capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return ["-lsrtp2", "-lssl", "-lcrypto"]
    return flags.split()


def build_generator(cache_dir: Path) -> Path:
    """The compiled generator (``gcc -O2 -std=c11`` with :func:`generator_link_flags`),
    built once per source version.

    The binary is named after the source's SHA-256, so an edited ``rtpload.c`` is
    rebuilt; it is written to a temporary name and renamed into place.

    Raises:
        subprocess.CalledProcessError: gcc failed (its output is on stderr).
    """
    digest = hashlib.sha256(GENERATOR_SOURCE.read_bytes()).hexdigest()[:16]
    binary = cache_dir / f"rtpload-{digest}"
    if not binary.exists():
        cache_dir.mkdir(parents=True, exist_ok=True)
        partial = binary.with_suffix(f".{os.getpid()}.tmp")
        subprocess.run(["gcc", "-O2", "-std=c11", "-Wall", "-o", str(partial),
                        str(GENERATOR_SOURCE), *generator_link_flags()], check=True)
        partial.replace(binary)
    return binary


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/voxgate-bench`` (``~/.cache/voxgate-bench``)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "voxgate-bench"


def _num(report: dict[str, object], key: str) -> float:
    """A number of the generator's report; JSON null (no samples) is NaN."""
    value = report.get(key)
    return float(value) if isinstance(value, int | float) else math.nan


@dataclass(frozen=True, slots=True)
class GeneratorReport:
    """The generator's ``result`` line: times in ms, CPU in % of one core."""

    calls_ok: int
    calls_answered: int
    invite_responses: dict[str, int]
    refusal_warning: str
    failures: dict[str, int]
    invite_200_p50_ms: float
    invite_200_p99_ms: float
    gap_p50_ms: float
    gap_p99_ms: float
    gap_max_ms: float
    loss_pct: float
    echo_p50_ms: float
    echo_p99_ms: float
    echo_drift_ms: float
    echo_count: int
    echo_unmatched: int
    send_late_p99_ms: float
    gen_cpu_pct: float
    srtp_errors: int
    sip_connection_error: str

    @classmethod
    def from_json(cls, report: dict[str, object]) -> GeneratorReport:
        """Parse the ``{"event": "result", ...}`` object.

        Raises:
            ValueError: a count or table field is missing or not a number.
        """
        def count(key: str) -> int:
            value = report.get(key)
            if not isinstance(value, int):
                raise ValueError(f"generator report: {key} = {value!r}")
            return value

        def counts(key: str) -> dict[str, int]:
            value = report.get(key)
            if not isinstance(value, dict):
                raise ValueError(f"generator report: {key} = {value!r}")
            return {str(k): int(v) for k, v in value.items()}

        return cls(
            calls_ok=count("calls_ok"),
            calls_answered=count("calls_answered"),
            invite_responses=counts("invite_responses"),
            refusal_warning=str(report.get("refusal_warning", "")),
            failures=counts("failures"),
            invite_200_p50_ms=_num(report, "invite_200_p50_ms"),
            invite_200_p99_ms=_num(report, "invite_200_p99_ms"),
            gap_p50_ms=_num(report, "gap_p50_ms"),
            gap_p99_ms=_num(report, "gap_p99_ms"),
            gap_max_ms=_num(report, "gap_max_ms"),
            loss_pct=_num(report, "loss_pct"),
            echo_p50_ms=_num(report, "echo_p50_ms"),
            echo_p99_ms=_num(report, "echo_p99_ms"),
            echo_drift_ms=_num(report, "echo_drift_ms"),
            echo_count=count("echo_count"),
            echo_unmatched=count("echo_unmatched"),
            send_late_p99_ms=_num(report, "send_late_p99_ms"),
            gen_cpu_pct=_num(report, "gen_cpu_pct"),
            srtp_errors=count("srtp_errors"),
            sip_connection_error=str(report.get("sip_connection_error", "")),
        )


@dataclass(frozen=True, slots=True)
class RunResult:
    """One run at one N: the generator's report and the daemon's figures."""

    sessions: int
    run: int
    gen: GeneratorReport
    window_s: float
    daemon_cpu_s: float
    foreign_cpu_s: float
    """CPU time others used on the daemon's core over the window."""
    steal_s: float
    """Time the hypervisor took the daemon's core over the window."""
    probe: ProbeFigures
    """How fast the daemon's core ran (:mod:`bench.host_probe`)."""
    rss_kib: int
    idle_rss_kib: int
    frames_skipped: int
    daemon_exited: bool

    @property
    def cpu_pct(self) -> float:
        """Daemon CPU over the window, % of its core."""
        return 100.0 * self.daemon_cpu_s / self.window_s

    @property
    def foreign_pct(self) -> float:
        """Other processes' CPU on the daemon's core over the window, % of it."""
        return 100.0 * self.foreign_cpu_s / self.window_s

    @property
    def steal_pct(self) -> float:
        """Steal time on the daemon's core over the window, % of it."""
        return 100.0 * self.steal_s / self.window_s

    @property
    def calls_up(self) -> int:
        """Calls answered (N less the refused): what the per-session figures divide by."""
        return max(1, self.gen.calls_answered)

    @property
    def cpu_ms_per_session_s(self) -> float:
        """Daemon CPU ms per session-second."""
        return 1000.0 * self.daemon_cpu_s / (self.calls_up * self.window_s)

    @property
    def us_per_call_tick(self) -> float:
        """Daemon CPU µs per call per 20 ms tick."""
        return 1e6 * self.daemon_cpu_s / (self.calls_up * TICKS_PER_S * self.window_s)

    @property
    def rss_per_session_kib(self) -> float:
        """(RSS in the window - idle RSS) / calls answered."""
        return (self.rss_kib - self.idle_rss_kib) / self.calls_up

    @property
    def refused(self) -> int:
        """INVITEs answered 503."""
        return self.gen.invite_responses.get("503", 0)

    @property
    def why_not(self) -> list[str]:
        """Every criterion this run missed (empty: sustained)."""
        return failure_reasons(self)

    @property
    def passed(self) -> bool:
        """Sustained: every call up through the window and every limit met."""
        return not self.why_not


def failure_reasons(r: RunResult) -> list[str]:
    """Why a run is not sustained, one phrase per missed criterion (NaN misses)."""
    reasons = [f"{n} call(s) {why}" for why, n in sorted(r.gen.failures.items())]
    if r.gen.refusal_warning:
        reasons.append(f"first refusal's Warning: {r.gen.refusal_warning}")
    if r.daemon_exited:
        reasons.append("the daemon exited")
    if r.gen.sip_connection_error:
        reasons.append(f"the SIP TLS connection ended: {r.gen.sip_connection_error}")
    checks = (("gap p99", r.gen.gap_p99_ms, GAP_P99_LIMIT_MS, "ms"),
              ("gap max", r.gen.gap_max_ms, GAP_MAX_LIMIT_MS, "ms"),
              ("loss", r.gen.loss_pct, LOSS_LIMIT_PCT, "%"),
              ("echo p99", r.gen.echo_p99_ms, ECHO_P99_LIMIT_MS, "ms"))
    for name, value, limit, unit in checks:
        if not value <= limit:
            reasons.append(f"{name} {value:.3g} {unit} > {limit:g}")
    return reasons


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """The daemon's certificate (the generator's CA too) and key, PEM."""

    certificate: Path
    private_key: Path


@dataclass(frozen=True, slots=True)
class Options:
    """What every run shares."""

    generator: Path
    clip_ulaw: Path
    rate_cps: float
    duration_s: float
    settle_s: float
    aligned: bool
    load_gate: bool
    fifo_priority: int
    transport: str
    """udp, tcp or tls (``tls`` is set for tls)."""
    tls: TlsFiles | None
    srtp: bool


NO_LOAD_GATE: dict[str, int | float] = {"media_utilisation_max": 1.0, "media_lag_max_ms": 10_000}
"""``[limits]`` under which admission ignores the media clock's utilisation and lag (the
highest limits the config takes): raw capacity."""


def daemon_overrides(sessions: int, *, load_gate: bool = True, transport: str = "udp",
                     tls: TlsFiles | None = None, stream_port: int = 0,
                     srtp: bool = False) -> ConfigOverrides:
    """Room for N calls, quiet logs, and per-source SIP rate limits out of the way: every
    call comes from one address. Without ``load_gate`` admission ignores the media clock's
    utilisation and lag (the highest limits the config takes), to measure raw capacity.
    Over ``transport`` tcp or tls (``tls``: its certificate and key) the daemon also
    listens for SIP over it on 127.0.0.1:``stream_port``; with
    ``srtp`` it takes SRTP calls only (``[rtp] srtp = "required"``)."""
    limits: dict[str, int | float] = {"max_sessions": sessions + 50, "drain_timeout_s": 5}
    if not load_gate:
        limits |= NO_LOAD_GATE
    sip: dict[str, str | int | float] = {
        "invites_per_source_per_s": 100_000.0, "invite_burst": 1_000_000,
        "requests_per_source_per_s": 100_000.0, "requests_burst": 1_000_000}
    if transport == "tcp":
        sip["listen_tcp"] = f"127.0.0.1:{stream_port}"
    if tls is not None:
        sip |= {"listen_tls": f"127.0.0.1:{stream_port}",
                "tls_certificate": str(tls.certificate),
                "tls_private_key": str(tls.private_key)}
    overrides: dict[str, TomlTable] = {"limits": limits, "log": {"level": "warning"}, "sip": sip}
    if srtp:
        overrides["rtp"] = {"srtp": "required"}
    return overrides


def run_once(sessions: int, run: int, options: Options, workdir: Path) -> RunResult:
    """Fresh daemon, the generator through ramp, window and hang-up, and the figures."""
    workdir.mkdir(parents=True, exist_ok=True)
    # The same size as the daemon's range: reserve_port_range locks slots of one size
    # on one grid, so two ranges of different sizes could overlap (the generator's
    # ports then take the daemon's: 503 no-rtp-port).
    rtp_ports = 2 * sessions + 100
    media = reserve_port_range(rtp_ports)
    try:
        stream_port = free_tcp_port() if options.transport != "udp" else 0
        overrides = daemon_overrides(sessions, load_gate=options.load_gate,
                                     transport=options.transport, tls=options.tls,
                                     stream_port=stream_port, srtp=options.srtp)
        with running_daemon(workdir / "daemon", overrides, rtp_ports=rtp_ports,
                            cpu=DAEMON_CPU) as daemon:
            time.sleep(_IDLE_SETTLE_S)
            idle_rss = rss_kib(daemon.pid)
            fifo = ["chrt", "--fifo", str(options.fifo_priority)] if options.fifo_priority else []
            argv = [*fifo, "taskset", "-c", str(PEER_CPU), str(options.generator),
                    "--sip-port", str(stream_port or daemon.sip_port), "--rtp-base",
                    str(media.first), "--clip", str(options.clip_ulaw), "--calls", str(sessions),
                    "--rate", str(options.rate_cps), "--duration", str(options.duration_s),
                    "--settle", str(options.settle_s)]
            argv += ["--transport", options.transport]
            if options.tls:
                argv += ["--tls-ca", str(options.tls.certificate)]
            if options.srtp:
                argv.append("--srtp")
            if options.aligned:
                argv.append("--aligned")
            limit_s = (sessions / options.rate_cps + options.settle_s + options.duration_s
                       + _GENERATOR_SLACK_S)
            with (workdir / "rtpload.stderr").open("wb") as stderr, HostProbe(
                DAEMON_CPU, workdir / "host_probe.txt",
            ) as probe, subprocess.Popen(
                argv, stdout=subprocess.PIPE, stderr=stderr, text=True,
            ) as proc:
                watchdog = threading.Timer(limit_s, proc.kill)
                watchdog.start()
                try:
                    rss = 0
                    report: dict[str, object] = {}
                    assert proc.stdout is not None
                    for line in proc.stdout:
                        event = json.loads(line)
                        name = event.get("event")
                        if name == "window_start":
                            ticks_start, t_start = cpu_ticks(daemon.pid), time.monotonic()
                            core_start = core_ticks(DAEMON_CPU)
                            _, skipped_start = clock_counters(daemon.control_socket)
                            rss = rss_kib(daemon.pid)
                        elif name == "window_mid":
                            rss = max(rss, rss_kib(daemon.pid))
                        elif name == "window_end":
                            ticks_stop, t_stop = cpu_ticks(daemon.pid), time.monotonic()
                            core_stop = core_ticks(DAEMON_CPU)
                            _, skipped_stop = clock_counters(daemon.control_socket)
                            rss = max(rss, rss_kib(daemon.pid))
                        elif name == "result":
                            report = event
                            (workdir / "rtpload.json").write_text(line)
                    proc.wait()
                finally:
                    watchdog.cancel()
                    if proc.poll() is None:
                        proc.kill()
            if proc.returncode != 0 or not report:
                tail = (workdir / "rtpload.stderr").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"rtpload exited {proc.returncode}: {tail}")
            daemon_exited = not daemon.alive()
    finally:
        media.release()
    return RunResult(
        sessions=sessions, run=run, gen=GeneratorReport.from_json(report),
        window_s=t_stop - t_start, daemon_cpu_s=(ticks_stop - ticks_start) / _CLK_TCK,
        foreign_cpu_s=max(0, core_stop.busy - core_start.busy - (ticks_stop - ticks_start))
        / _CLK_TCK,
        steal_s=(core_stop.steal - core_start.steal) / _CLK_TCK,
        probe=probe.figures(t_start, t_stop),
        rss_kib=rss, idle_rss_kib=idle_rss,
        frames_skipped=round(skipped_stop - skipped_start), daemon_exited=daemon_exited,
    )


TABLE: Table[RunResult] = Table((
    ("N", "d", lambda r: r.sessions),
    ("run", "d", lambda r: r.run),
    ("ok", "d", lambda r: r.gen.calls_ok),
    ("503", "d", lambda r: r.refused),
    ("gap50", ".1f", lambda r: r.gen.gap_p50_ms),
    ("gap99", ".1f", lambda r: r.gen.gap_p99_ms),
    ("gapmax", ".1f", lambda r: r.gen.gap_max_ms),
    ("loss%", ".3f", lambda r: r.gen.loss_pct),
    ("echo50", ".1f", lambda r: r.gen.echo_p50_ms),
    ("echo99", ".1f", lambda r: r.gen.echo_p99_ms),
    ("drift", ".1f", lambda r: r.gen.echo_drift_ms),
    ("inv50", ".1f", lambda r: r.gen.invite_200_p50_ms),
    ("inv99", ".1f", lambda r: r.gen.invite_200_p99_ms),
    ("cpu%", ".1f", lambda r: r.cpu_pct),
    ("foreign%", ".1f", lambda r: r.foreign_pct),
    ("steal%", ".1f", lambda r: r.steal_pct),
    ("probe50", ".0f", lambda r: r.probe.p50_us),
    ("probe90", ".0f", lambda r: r.probe.p90_us),
    ("sys50", ".0f", lambda r: r.probe.syscall_p50_us),
    ("ms/sess-s", ".2f", lambda r: r.cpu_ms_per_session_s),
    ("us/tick", ".1f", lambda r: r.us_per_call_tick),
    ("KiB/sess", ".1f", lambda r: r.rss_per_session_kib),
    ("skipped", "d", lambda r: r.frames_skipped),
    ("gen%", ".1f", lambda r: r.gen.gen_cpu_pct),
    ("late99", ".2f", lambda r: r.gen.send_late_p99_ms),
    ("pass", "s", lambda r: "yes" if r.passed else "NO"),
))
"""Times in ms; ``foreign%`` other processes' CPU on the daemon's core, ``steal%`` the
hypervisor's, ``probe50``/``probe90`` how fast that core ran (:mod:`bench.host_probe`,
µs of CPU for a fixed unit of Python work: lower is faster) and ``sys50`` how fast
its system calls did (the same for a fixed unit of loopback UDP sends and reads); ``ms/sess-s``
daemon CPU per session-second; ``us/tick`` per call-tick;
``gen%`` the generator's CPU (% of its core); ``late99`` its send lateness p99."""


GENERATOR_CPU_LIMIT_PCT = 50.0
SEND_LATE_LIMIT_MS = 5.0


def generator_warnings(r: RunResult) -> list[str]:
    """Signs that the generator, not the daemon, limited the run."""
    warnings = []
    if not r.gen.gen_cpu_pct <= GENERATOR_CPU_LIMIT_PCT:
        warnings.append(f"warning: rtpload used {r.gen.gen_cpu_pct:.1f} % of its core")
    if not r.gen.send_late_p99_ms <= SEND_LATE_LIMIT_MS:
        warnings.append(f"warning: rtpload sent late (p99 {r.gen.send_late_p99_ms:.2f} ms)")
    if r.gen.srtp_errors:
        warnings.append(f"warning: {r.gen.srtp_errors} SRTP packets failed to protect or "
                        "unprotect (auth/replay)")
    return warnings


def clip_ulaw_file(workdir: Path) -> Path:
    """The speech clip as raw µ-law bytes (160·m + 1 samples, so looping never repeats a
    frame for m + 1 loops) in ``workdir``."""
    clip = make_speech_clip(workdir / "clip")
    ulaw = read_wav(clip.ulaw_wav).data
    if len(ulaw) % FRAME_SAMPLES != 1:
        raise RuntimeError(f"clip of {len(ulaw)} samples is not whole frames + 1")
    path = workdir / "clip.ulaw"
    path.write_bytes(ulaw)
    return path


def main(argv: list[str] | None = None) -> int:
    """Parse options, run every N ``--runs`` times, print the rows and the verdict."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.rtp_load", description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[300, 500, 700, 1000, 1500],
                        help="call counts (default: %(default)s)")
    parser.add_argument("--runs", type=int, default=3, help="runs per N (default: 3)")
    parser.add_argument("--duration", type=float, default=30.0,
                        help="steady window seconds, every call up (default: 30, at least 10)")
    parser.add_argument("--rate", type=float, default=100.0,
                        help="INVITEs per second during the ramp (default: 100)")
    parser.add_argument("--settle", type=float, default=2.0,
                        help="seconds from the last INVITE to the window (default: 2)")
    parser.add_argument("--aligned", action="store_true",
                        help="every call's 20 ms frames on the same phase (default: spread)")
    parser.add_argument("--no-load-gate", action="store_true",
                        help="admission ignores the media clock's load (raw capacity)")
    parser.add_argument("--fifo", type=int, default=1, metavar="PRIORITY",
                        help="run the generator SCHED_FIFO at this priority so other work on "
                        "its core cannot delay its sends (root; 0: normal; default: 1)")
    parser.add_argument("--transport", choices=("udp", "tcp", "tls"), default="udp",
                        help="SIP over UDP, or every call on one TCP or TLS connection to "
                        "[sip] listen_tcp / listen_tls (default: udp)")
    parser.add_argument("--srtp", action="store_true",
                        help="SRTP with SDES keys (RFC 4568), the daemon with "
                        "[rtp] srtp = \"required\" (default: plain RTP)")
    parser.add_argument("--all-steps", action="store_true",
                        help="keep stepping after an N no run sustained")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="configs, logs and the clip (default: a temp dir)")
    args = parser.parse_args(argv)
    if len(os.sched_getaffinity(0)) < 2:
        print("needs two CPUs (daemon on 0, the generator on 1)", file=sys.stderr)
        return 2
    if args.duration < 10:
        parser.error("--duration must be at least 10 s (the drift compares 5 s ends)")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="voxgate-rtp-load-"))
    workdir.mkdir(parents=True, exist_ok=True)
    tls = TlsFiles(*self_signed(workdir)) if args.transport == "tls" else None
    options = Options(build_generator(default_cache_dir()), clip_ulaw_file(workdir), args.rate,
                      args.duration, args.settle, args.aligned, not args.no_load_gate, args.fifo,
                      args.transport, tls, args.srtp)
    os.sched_setaffinity(0, {PEER_CPU})  # this process stays off the daemon's core
    print(f"workdir {workdir}; daemon on CPU {DAEMON_CPU}, rtpload on CPU {PEER_CPU}; "
          f"{args.rate:g} INVITE/s, {args.duration:g} s window, phases "
          f"{'aligned' if args.aligned else 'spread'}, admission load gate "
          f"{'off' if args.no_load_gate else 'on'}; SIP over {args.transport.upper()}"
          f"{' (one connection)' if args.transport != 'udp' else ''}, "
          f"{'SRTP' if args.srtp else 'plain RTP'}",
          flush=True)
    print(TABLE.header(), flush=True)
    results: list[RunResult] = []
    for sessions in args.steps:
        sustained = False
        for run in range(1, args.runs + 1):
            result = run_once(sessions, run, options, workdir / f"n{sessions}-{run}")
            results.append(result)
            print(TABLE.row(result), flush=True)
            for line in [*result.why_not, *generator_warnings(result)]:
                print(f"  N={sessions} run {run}: {line}", flush=True)
            sustained = sustained or result.passed
        if not sustained and not args.all_steps:
            break
    best = largest_sustained(results)
    print("no N was sustained in every run" if best is None
          else f"largest N sustained in all {args.runs} runs: {best}")
    print(LIMITS_TEXT)
    return 0


if __name__ == "__main__":
    sys.exit(main())
