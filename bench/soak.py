"""Soak benchmark: hours of churning SIP calls against one pinned daemon; watch for leaks.

Run from the repository root as ``python -m bench.soak --duration 1h`` (or
``make soak DURATION=1h``). A fresh ``voxgated`` (echo agent, call records on,
``info`` logs) is pinned to CPU 0; SIPp, pinned to CPU 1, keeps
``--load`` (80 %) of ``--calls`` (400) concurrent calls up, with churn:

- echo calls streaming the looped speech clip (``rtp_stream``) for a uniform
  random 10-120 s each, then BYE;
- the same with RFC 4733 key presses: SIPp plays a pcap built here (the clip
  as PCMU plus a key press every :data:`DTMF_EVERY_S`) with ``play_pcap_audio``;
- calls abandoned before the answer: CANCEL on the 180 (``answer_delay_ms``
  rings every call for :data:`ANSWER_DELAY_MS` first).

Its scenarios are ``tests/harness/scenarios/uac_echo.xml`` and ``uac_cancel.xml``,
the first rewritten (random pause, pcap media) into the working directory.
Every ``--interval`` seconds it prints elapsed time, RSS (MiB), open fds,
sessions in progress, calls ended, unexpected ends (a ``call_end`` reason
other than ``bye`` or ``cancel``) and error log lines; at the end the RSS
growth after the warm-up (the first 10 % of the run), the unexpected ends by
reason, the key presses the daemon counted, SIPp's totals and every ERROR line.
It prints figures; it never asserts.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import struct
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from tests.harness.audio import SpeechClip, make_speech_clip, read_wav
from tests.harness.daemon import (
    ConfigOverrides,
    Daemon,
    free_udp_port,
    parse_logfmt,
    reserve_port_range,
    running_daemon,
)
from tests.harness.pcap import LINKTYPE_EN10MB
from tests.harness.sipp import Sipp, read_stats, scenario_path
from tests.integration.test_control import voxgatectl

from bench.sip_load import DAEMON_CPU, PEER_CPU, rss_kib

DEFAULT_CALLS = 400
DEFAULT_LOAD = 0.8
CALL_MIN_S = 10
CALL_MAX_S = 120
DTMF_SHARE = 0.1
"""Of the concurrent calls, the share that also sends key presses."""
CANCEL_PER_ANSWERED = 0.1
"""Abandoned calls per answered call."""
ANSWER_DELAY_MS = 500
RAMP_S = 20.0
WARMUP_SHARE = 0.1
EXPECTED_REASONS = frozenset({"bye", "cancel"})
DTMF_EVERY_S = 10.0
TELEPHONE_EVENT_PT = 101
"""As ``uac_echo.xml`` offers it (``a=rtpmap:101 telephone-event/8000``)."""
DTMF_EVENTS = 12
"""RFC 4733 §3.2 event codes 0-11: the keys 0-9, * and #, pressed in turn."""
MAX_ERROR_LINES = 1000
"""ERROR lines kept for the summary; more are counted only."""
DTMF_PCAP = "voxgate_soak_dtmf.pcap"
_FRAME_BYTES = 160
_EVENT_PACKETS = 7  # RFC 4733 §2.5.1.4: 4 updates, then the end packet 3 times
_SIPP_GRACE_S = 300.0

# RTP fixed header (RFC 3550 §5.1) and telephone-event payload (RFC 4733 §2.3).
_RTP = struct.Struct("!BBHII")
_EVENT = struct.Struct("!BBH")
# pcap (little-endian, µs): magic, version 2.4, thiszone, sigfigs, snaplen, linktype;
# record: ts_sec, ts_usec, captured length, original length.
_PCAP_HEADER = struct.Struct("<IHHiIII")
_PCAP_RECORD = struct.Struct("<IIII")
# Ethernet II (dst, src, ethertype), IPv4 without options (RFC 791), UDP (RFC 768).
_ETHERNET = struct.Struct("!6s6sH")
_IPV4 = struct.Struct("!BBHHHBBH4s4s")
_UDP = struct.Struct("!HHHH")
_LOOPBACK = bytes([127, 0, 0, 1])


def parse_duration_s(text: str) -> float:
    """``"180"``, ``"90s"``, ``"10m"``, ``"1h"`` → seconds.

    Raises:
        argparse.ArgumentTypeError: anything else, or not above 0.
    """
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*", text)
    if match is None or float(match.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"a duration like 180, 90s, 10m or 1h, not {text!r}")
    return float(match.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[match.group(2)]


def rtp_with_dtmf(ulaw: bytes, duration_s: float, seed: int = 4733) -> list[bytes]:
    """RTP packets, one per 20 ms, of ``ulaw`` looped for ``duration_s`` (PCMU, PT 0), with
    an RFC 4733 key press (100 ms, then the end packet thrice) every :data:`DTMF_EVERY_S`
    in place of the audio of those ticks."""
    rng = random.Random(seed)
    ssrc, sequence, timestamp = rng.getrandbits(32), rng.getrandbits(16), rng.getrandbits(32)
    packets: list[bytes] = []
    frames = round(duration_s / 0.02)
    every = round(DTMF_EVERY_S / 0.02)
    tick = 0
    while tick < frames:
        if tick % every == every // 2:
            key = (tick // every) % DTMF_EVENTS
            for n in range(_EVENT_PACKETS):
                end = n >= 4
                marker = 0x80 if n == 0 else 0
                header = _RTP.pack(0x80, marker | TELEPHONE_EVENT_PT, sequence, timestamp, ssrc)
                duration = min(n + 1, 5) * _FRAME_BYTES
                packets.append(header + _EVENT.pack(key, (0x80 if end else 0) | 10, duration))
                sequence = (sequence + 1) & 0xFFFF
            timestamp = (timestamp + _EVENT_PACKETS * _FRAME_BYTES) & 0xFFFFFFFF
            tick += _EVENT_PACKETS
            continue
        start = (tick * _FRAME_BYTES) % (len(ulaw) - _FRAME_BYTES)
        header = _RTP.pack(0x80, 0x80 if tick == 0 else 0, sequence, timestamp, ssrc)
        packets.append(header + ulaw[start:start + _FRAME_BYTES])
        sequence = (sequence + 1) & 0xFFFF
        timestamp = (timestamp + _FRAME_BYTES) & 0xFFFFFFFF
        tick += 1
    return packets


def write_udp_pcap(path: Path, payloads: list[bytes], interval_s: float = 0.02,
                   ports: tuple[int, int] = (6000, 6002)) -> None:
    """A classic pcap (Ethernet, IPv4 127.0.0.1 → 127.0.0.1, UDP) of ``payloads``
    ``interval_s`` apart, as SIPp's ``play_pcap_audio`` reads it (it keeps the
    payloads and the timing, and rewrites addresses and ports)."""
    with path.open("wb") as f:
        f.write(_PCAP_HEADER.pack(0xA1B2C3D4, 2, 4, 0, 0, 65535, LINKTYPE_EN10MB))
        for n, payload in enumerate(payloads):
            udp = _UDP.pack(ports[0], ports[1], _UDP.size + len(payload), 0) + payload
            ip = _IPV4.pack(0x45, 0, _IPV4.size + len(udp), n & 0xFFFF, 0, 64, 17, 0,
                            _LOOPBACK, _LOOPBACK) + udp
            frame = _ETHERNET.pack(b"\0" * 6, b"\0" * 6, 0x0800) + ip
            at_us = round(n * interval_s * 1e6)
            f.write(_PCAP_RECORD.pack(at_us // 1_000_000, at_us % 1_000_000,
                                      len(frame), len(frame)))
            f.write(frame)


def churn_scenarios(workdir: Path) -> tuple[Path, Path]:
    """``uac_echo.xml`` rewritten with a uniform random pause of CALL_MIN_S..CALL_MAX_S:
    as is (rtp_stream), and with the DTMF pcap on SIPp's media port instead."""
    base = scenario_path("uac_echo").read_text()
    pause = (f'<pause distribution="uniform" min="{CALL_MIN_S * 1000}" '
             f'max="{CALL_MAX_S * 1000}"/>')
    echo = base.replace("<pause/>", pause)
    dtmf = (echo.replace("[rtpstream_audio_port]", "[media_port]")
            .replace('rtp_stream="voxgate_clip_ulaw.wav,-1,0,PCMU/8000"',
                     f'play_pcap_audio="{DTMF_PCAP}"'))
    assert echo != base and dtmf != echo, "uac_echo.xml changed: update churn_scenarios"
    paths = workdir / "soak_echo.xml", workdir / "soak_dtmf.xml"
    paths[0].write_text(echo)
    paths[1].write_text(dtmf)
    return paths


@dataclass
class LogWatch:
    """Reads the daemon's log as it grows: call ends by reason, ERROR lines."""

    path: Path
    offset: int = 0
    ends: Counter[str] = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)
    error_count: int = 0

    def poll(self) -> None:
        """Read the lines completed since the last poll."""
        with self.path.open("rb") as f:
            f.seek(self.offset)
            data = f.read()
        complete = data[:data.rfind(b"\n") + 1]
        self.offset += len(complete)
        for raw in complete.decode(errors="replace").splitlines():
            fields = parse_logfmt(raw)
            if fields.get("event") == "call_end":
                self.ends[fields.get("reason", "?")] += 1
            if fields.get("level") == "error":
                self.error_count += 1
                if len(self.errors) < MAX_ERROR_LINES:
                    self.errors.append(raw)

    @property
    def unexpected(self) -> int:
        """Call ends whose reason is not in :data:`EXPECTED_REASONS`."""
        return sum(n for reason, n in self.ends.items() if reason not in EXPECTED_REASONS)


@dataclass(frozen=True, slots=True)
class Sample:
    """One progress line's figures."""

    elapsed_s: float
    rss_kib: int
    fds: int
    sessions: int
    ended: int
    unexpected: int
    errors: int

    def line(self) -> str:
        """The progress line."""
        return (f"{self.elapsed_s:8.0f} {self.rss_kib / 1024:8.1f} {self.fds:6d} "
                f"{self.sessions:8d} {self.ended:8d} {self.unexpected:10d} {self.errors:6d}")


HEADER = f"{'elapsed':>8} {'rssMiB':>8} {'fds':>6} {'sessions':>8} {'ended':>8} " \
         f"{'unexpected':>10} {'errors':>6}"


def _control(daemon: Daemon, *args: str) -> dict[str, object] | None:
    done = voxgatectl(daemon.control_socket, "--json", *args)
    if done.returncode != 0:
        return None
    result: dict[str, object] = json.loads(done.stdout)
    return result


def _sessions(daemon: Daemon) -> int:
    status = _control(daemon, "status")
    sessions = status.get("sessions") if status else None
    return int(sessions.get("active", -1)) if isinstance(sessions, dict) else -1


def _dtmf_events(daemon: Daemon) -> int:
    metrics = _control(daemon, "metrics")
    text = str(metrics.get("text", "")) if metrics else ""
    match = re.search(r"^voxgate_dtmf_events_total (\S+)$", text, re.M)
    return int(float(match.group(1))) if match else 0


def sample(daemon: Daemon, watch: LogWatch, started: float) -> Sample:
    """Poll the log and the process; one :class:`Sample`."""
    watch.poll()
    return Sample(time.monotonic() - started, rss_kib(daemon.pid), daemon.fd_count(),
                  _sessions(daemon), sum(watch.ends.values()), watch.unexpected,
                  watch.error_count)


def _callers(daemon: Daemon, clip: SpeechClip, workdir: Path, calls: int, load: float,
             duration_s: float, media_first: int) -> list[Sipp]:
    """The three SIPp processes: echo, echo + DTMF, cancel. Concurrency shares follow
    Little's law: answered calls last (CALL_MIN_S + CALL_MAX_S) / 2 on average."""
    echo_xml, dtmf_xml = churn_scenarios(workdir)
    ulaw = read_wav(clip.ulaw_wav).data
    write_udp_pcap(workdir / DTMF_PCAP, rtp_with_dtmf(ulaw, CALL_MAX_S + 5))
    concurrent = max(2, round(calls * load))
    dtmf_limit = max(1, round(concurrent * DTMF_SHARE))
    echo_limit = concurrent - dtmf_limit
    ramp_s = min(RAMP_S, duration_s * WARMUP_SHARE * 0.8)
    mean_s = (CALL_MIN_S + CALL_MAX_S) / 2 + ANSWER_DELAY_MS / 1000
    cancel_rate = max(0.1, concurrent / mean_s * CANCEL_PER_ANSWERED)
    timeout_s = duration_s + _SIPP_GRACE_S
    plans = [  # scenario, limit, rate (calls/s), media ports
        (str(echo_xml), echo_limit, echo_limit / ramp_s, 2 * echo_limit + 16),
        (str(dtmf_xml), dtmf_limit, dtmf_limit / ramp_s, 16),
        ("uac_cancel", max(2, round(cancel_rate * 4)), cancel_rate, 16),
    ]
    callers = []
    for n, (scenario, limit, rate, ports) in enumerate(plans):
        callers.append(Sipp(
            scenario, daemon.sip_address, workdir=workdir / f"sipp{n}",
            local_port=free_udp_port(), media_port=media_first, clip=clip,
            calls=10**9, limit=limit, rate=rate, timeout_s=timeout_s, cpu=PEER_CPU))
        media_first += ports
    (workdir / "sipp1" / DTMF_PCAP).symlink_to(workdir / DTMF_PCAP)
    return callers


def run(duration_s: float, calls: int, load: float, interval_s: float, workdir: Path) -> None:
    """Start the daemon and SIPp, print progress every ``interval_s``, then the summary."""
    clip = make_speech_clip(workdir / "clip")
    overrides: ConfigOverrides = {
        "sip": {"answer_delay_ms": ANSWER_DELAY_MS},
        "limits": {"max_sessions": calls, "drain_timeout_s": 5},
        "log": {"level": "info"},
    }
    media = reserve_port_range(2 * calls + 100)
    try:
        with running_daemon(workdir / "daemon", overrides, rtp_ports=2 * calls + 100,
                            cpu=DAEMON_CPU) as daemon:
            callers = _callers(daemon, clip, workdir, calls, load, duration_s, media.first)
            watch = LogWatch(daemon.log_path)
            started = time.monotonic()
            warmup_rss: int | None = None
            try:
                for caller in callers:
                    caller.start()
                print(HEADER, flush=True)
                next_line = started + interval_s
                end = started + duration_s
                while (now := time.monotonic()) < end:
                    if warmup_rss is None and now - started >= duration_s * WARMUP_SHARE:
                        warmup_rss = rss_kib(daemon.pid)
                    if now >= next_line:
                        print(sample(daemon, watch, started).line(), flush=True)
                        next_line += interval_s
                    time.sleep(min(1.0, max(0.0, min(next_line, end) - now)))
                final = sample(daemon, watch, started)
                dtmf = _dtmf_events(daemon)
            finally:
                for caller in callers:
                    caller.stop()
            code = daemon.terminate()
    finally:
        media.release()
    print(final.line())
    _summary(final, warmup_rss or final.rss_kib, watch, dtmf, callers, code)


def _summary(final: Sample, warmup_rss: int, watch: LogWatch, dtmf: int,
             callers: list[Sipp], exit_code: int) -> None:
    growth_pct = 100.0 * (final.rss_kib - warmup_rss) / warmup_rss if warmup_rss else 0.0
    print(f"RSS after warm-up {warmup_rss / 1024:.1f} MiB, at the end "
          f"{final.rss_kib / 1024:.1f} MiB: growth {growth_pct:+.1f} %")
    print(f"call ends by reason: {dict(sorted(watch.ends.items()))}")
    print(f"unexpected ends: {final.unexpected}")
    print(f"key presses the daemon counted: {dtmf}")
    for name, caller in zip(("echo", "echo+dtmf", "cancel"), callers, strict=True):
        stats = read_stats(caller.workdir / "sipp_stat.csv")
        print(f"sipp {name}: created {stats.get('TotalCallCreated', '?')}, "
              f"ok {stats.get('SuccessfulCall(C)', '?')}, "
              f"failed {stats.get('FailedCall(C)', '?')}")
    print(f"daemon exit code after SIGTERM: {exit_code}")
    print(f"ERROR lines: {watch.error_count}")
    for line in watch.errors:
        print(f"  {line}")
    if watch.error_count > len(watch.errors):
        print(f"  … {watch.error_count - len(watch.errors)} more")


def main(argv: list[str] | None = None) -> int:
    """Parse options and run the soak."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.soak", description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--duration", type=parse_duration_s, default=parse_duration_s("10m"),
                        help="how long: seconds, or with s/m/h (default: 10m)")
    parser.add_argument("--calls", type=int, default=DEFAULT_CALLS,
                        help="the sustained load in concurrent calls (default: %(default)s)")
    parser.add_argument("--load", type=float, default=DEFAULT_LOAD,
                        help="share of --calls kept up (default: %(default)s)")
    parser.add_argument("--interval", type=float, default=60.0,
                        help="seconds between progress lines (default: %(default)s)")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="configs, logs, SIPp files (default: a temp dir)")
    args = parser.parse_args(argv)
    if len(os.sched_getaffinity(0)) < 2:
        print("needs two CPUs (daemon on 0, SIPp on 1)", file=sys.stderr)
        return 2
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="voxgate-soak-"))
    print(f"workdir {workdir}; {args.duration:.0f} s, {args.load:.0%} of {args.calls} calls, "
          f"daemon on CPU {DAEMON_CPU}, SIPp on CPU {PEER_CPU}", flush=True)
    run(args.duration, args.calls, args.load, args.interval, workdir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
