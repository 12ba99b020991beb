"""RSS per session: idle and active calls against one pinned daemon.

Run from the repository root as ``python -m bench.rss_sessions``. For each N
in ``--steps`` and each kind in ``--kinds`` a fresh ``voxgated`` is pinned to
CPU 0 (``taskset -c 0``) with ``max_sessions`` above N, the media timers out of
the way (3600 s) and the RSS watermarks far above anything reached. This
process (the callers) runs on CPU 1 when there is one. It measures:

- idle RSS: the daemon's ``VmRSS`` (``/proc/PID/status``), median of samples
  over ``--sample`` seconds after ``--settle`` seconds, before any call;
- RSS with N calls, measured the same way once all N are answered:
  ``idle`` calls offer ``a=inactive`` (on hold from the start: the daemon
  neither expects nor sends media), ``active`` calls each stream the looped
  speech clip (µ-law, 20 ms frames) from their own RTP peer and the echo agent
  sends every frame back;
- RSS per session = (RSS with N calls - idle RSS) / N, in KiB.

It prints a table (and how many active calls were echoing, and how many 20 ms
ticks the callers' media thread missed, a sign of an overloaded machine). It
prints figures; it never asserts.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from tests.harness import missing_tools
from tests.harness.audio import make_speech_clip, read_wav
from tests.harness.daemon import ConfigOverrides, Daemon, running_daemon
from tests.harness.phone import Call, Phone, RtpPeer

DAEMON_CPU = 0
CALLER_CPU = 1
KINDS = ("idle", "active")
BATCH_CALLS = 25
ANSWER_TIMEOUT_S = 20.0
SAMPLE_EVERY_S = 0.25
PEER_HISTORY_PACKETS = 100
ECHO_WINDOW_S = 1.0
"""An active call counts as echoing when frames it sent in this last window came back."""


@dataclass(frozen=True, slots=True)
class Row:
    """Figures for one N and kind."""

    sessions: int
    kind: str
    answered: int
    echoing: int | None
    idle_rss_kib: int
    rss_kib: int
    frames_skipped: int

    @property
    def per_session_kib(self) -> float:
        """(RSS with the calls - idle RSS) / N."""
        return (self.rss_kib - self.idle_rss_kib) / self.sessions


def rss_kib(pid: int) -> int:
    """VmRSS of ``pid`` in KiB (0 if the line is missing)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def settled_rss_kib(pid: int, settle_s: float, sample_s: float) -> int:
    """The median VmRSS (KiB) sampled every 250 ms over ``sample_s`` after ``settle_s``."""
    time.sleep(settle_s)
    samples = [rss_kib(pid)]
    deadline = time.monotonic() + sample_s
    while time.monotonic() < deadline:
        time.sleep(SAMPLE_EVERY_S)
        samples.append(rss_kib(pid))
    return int(statistics.median(samples))


def overrides(sessions: int) -> ConfigOverrides:
    """The daemon's config for N calls: room for them, no deadman or RSS gate in the way."""
    return {
        "limits": {"max_sessions": sessions + 10},
        "timers": {"first_media_s": 3600, "media_inactivity_s": 3600,
                   "max_duration_s": 86_400},
        "budget": {"rss_soft_bytes": 1 << 39, "rss_hard_bytes": 1 << 40},
    }


def place_calls(phone: Phone, sessions: int, source: bytes | None) -> tuple[list[Call],
                                                                           list[RtpPeer]]:
    """N calls in batches; active ones (``source`` given) start streaming once answered."""
    calls: list[Call] = []
    peers: list[RtpPeer] = []
    while len(calls) < sessions:
        batch: list[tuple[Call, RtpPeer | None]] = []
        for _ in range(min(BATCH_CALLS, sessions - len(calls))):
            if source is None:
                batch.append((phone.place(direction="inactive"), None))
                continue
            peer = phone.rtp_peer(history_packets=PEER_HISTORY_PACKETS)
            peer.play(source, loop=True)
            batch.append((phone.place(media=peer), peer))
        phone.wait_final([call for call, _ in batch], ANSWER_TIMEOUT_S)
        for call, media in batch:
            calls.append(call)
            if media is not None and call.final_status == 200:
                media.resume()
                peers.append(media)
    return calls, peers


def measure(daemon: Daemon, sessions: int, kind: str, source: bytes, *, settle_s: float,
            sample_s: float) -> Row:
    """Idle RSS, then RSS with ``sessions`` calls of ``kind`` up."""
    idle = settled_rss_kib(daemon.pid, settle_s, sample_s)
    with Phone(daemon) as phone:
        calls, peers = place_calls(phone, sessions, source if kind == "active" else None)
        loaded = settled_rss_kib(daemon.pid, settle_s, sample_s)
        since = time.monotonic() - ECHO_WINDOW_S
        echoing = sum(1 for peer in peers if peer.echoed(since)) if kind == "active" else None
        return Row(sessions, kind, sum(c.final_status == 200 for c in calls), echoing, idle,
                   loaded, phone.media_frames_skipped)


def print_table(rows: list[Row]) -> None:
    """The figures, one line per N and kind."""
    print(f"{'N':>5} {'kind':<7} {'answered':>8} {'echoing':>7} {'idle RSS KiB':>12} "
          f"{'RSS KiB':>9} {'per session KiB':>15} {'ticks missed':>12}")
    for r in rows:
        echoing = "-" if r.echoing is None else str(r.echoing)
        print(f"{r.sessions:>5} {r.kind:<7} {r.answered:>8} {echoing:>7} {r.idle_rss_kib:>12} "
              f"{r.rss_kib:>9} {r.per_session_kib:>15.1f} {r.frames_skipped:>12}")


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.rss_sessions", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", default="100,300",
                        help="comma-separated numbers of concurrent calls (default 100,300)")
    parser.add_argument("--kinds", default=",".join(KINDS),
                        help="comma-separated kinds of call: idle, active (default both)")
    parser.add_argument("--settle", type=float, default=3.0,
                        help="seconds to wait before sampling RSS (default 3)")
    parser.add_argument("--sample", type=float, default=2.0,
                        help="seconds over which RSS is sampled (default 2)")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where configs and daemon logs go (default: a temp dir)")
    args = parser.parse_args(argv)
    args.kinds = args.kinds.split(",")
    if any(kind not in KINDS for kind in args.kinds):
        parser.error(f"--kinds must name only {', '.join(KINDS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run every step and print the table; 2 when a needed tool is missing."""
    args = _parse_args(argv)
    missing = missing_tools("taskset", "espeak-ng", "sox")
    if missing:
        print(f"rss_sessions: missing {', '.join(missing)}", file=sys.stderr)
        return 2
    if (os.cpu_count() or 1) > CALLER_CPU:
        os.sched_setaffinity(0, {CALLER_CPU})
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="voxgate-rss-"))
    source = read_wav(make_speech_clip(workdir / "clip").ulaw_wav).data
    rows = []
    for sessions in (int(n) for n in args.steps.split(",")):
        for kind in args.kinds:
            with running_daemon(workdir / f"{kind}-{sessions}", overrides(sessions),
                                rtp_ports=2 * sessions + 20, cpu=DAEMON_CPU) as daemon:
                rows.append(measure(daemon, sessions, kind, source, settle_s=args.settle,
                                    sample_s=args.sample))
            row = rows[-1]
            print(f"N={sessions} {kind}: {row.answered} answered, "
                  f"{row.per_session_kib:.1f} KiB per session", flush=True)
    print()
    print_table(rows)
    print(f"\nlogs and configs: {workdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
