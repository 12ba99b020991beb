"""Run fuzz targets one after another, each for a bounded time, and report.

    python -m fuzz.run --seconds-per-target 15              # the CI pass (make test)
    python -m fuzz.run --seconds-per-target 3600 --target sdp    # make fuzz
    python -m fuzz.run --target sdp --replay fuzz/crashes/sdp-crash-…  # reproduce

Each target runs in its own ``python -m fuzz.worker`` process (libFuzzer owns
the process), one at a time, seeded from ``fuzz/corpus/<target>``; inputs it
finds go to ``--corpus-out``/<target> (a temporary directory unless given),
never into the checked-in corpus. Per target it prints the executions and
executions per second; on a crash, the traceback, the input as hex and where
libFuzzer saved it (``fuzz/crashes/<target>-crash-<sha1>``, or ``-timeout-``,
``-oom-``). The exit status is 1 when any target crashed or failed, else 0.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from fuzz.targets import TARGETS, Target

ROOT = Path(__file__).resolve().parent.parent
CRASH_DIR = ROOT / "fuzz" / "crashes"
INPUT_TIMEOUT_S = 10
"""One input running longer than this is a crash (libFuzzer ``-timeout``)."""
RSS_LIMIT_MB = 2048
"""A worker above this resident size is a crash (libFuzzer ``-rss_limit_mb``)."""
GRACE_S = 60
"""Time a worker gets beyond its ``-max_total_time`` (start-up, final stats) before
it is killed and the target reported as failed."""
MAX_HEX_BYTES = 4096
"""Longest crashing input printed as hex (the file holds all of it)."""
LOG_TAIL_LINES = 30
"""Lines of a worker's output printed when it failed without a saved input."""

_EXECUTIONS_RE = re.compile(r"^stat::number_of_executed_units:\s*(\d+)", re.MULTILINE)
_NEW_UNITS_RE = re.compile(r"^stat::new_units_added:\s*(\d+)", re.MULTILINE)
_STATUS_LINE_RE = re.compile(r"^#(\d+)\s", re.MULTILINE)
_DONE_RE = re.compile(r"^Done (\d+) runs in (\d+) second", re.MULTILINE)
_ARTIFACT_RE = re.compile(r"Test unit written to (\S+)")
_TRACEBACK_RE = re.compile(r"=== Uncaught Python exception: ===\n(.*?)\n(?:==\d+==|$)", re.DOTALL)


@dataclass(frozen=True, slots=True)
class TargetResult:
    """What one worker run gave: ``executions`` inputs run in ``seconds``;
    ``crash_file`` the input libFuzzer saved, ``failure`` what went wrong (None: ok)."""

    name: str
    executions: int
    seconds: float
    new_units: int
    failure: str | None = None
    crash_file: Path | None = None
    traceback: str = ""

    @property
    def executions_per_s(self) -> float:
        return self.executions / self.seconds if self.seconds > 0 else 0.0


def summarize(name: str, log: str, returncode: int | None, elapsed_s: float) -> TargetResult:
    """Read a worker's libFuzzer output; ``returncode`` None means it was killed.

    Executions come from the final stats (else the last status line); the
    duration from libFuzzer's ``Done … in N seconds`` (else ``elapsed_s``).
    """
    stats = _EXECUTIONS_RE.findall(log) or _STATUS_LINE_RE.findall(log) or ["0"]
    new_units = _NEW_UNITS_RE.findall(log)
    done = _DONE_RE.search(log)
    seconds = float(done[2]) if done is not None and int(done[2]) > 0 else elapsed_s
    artifact = _ARTIFACT_RE.search(log)
    traceback = _TRACEBACK_RE.search(log)
    failure = None
    if returncode is None:
        failure = "killed: ran past its time"
    elif artifact is not None or returncode != 0:
        failure = "crash" if traceback is not None else f"worker exited with {returncode}"
    return TargetResult(
        name=name,
        executions=int(stats[-1]),
        seconds=seconds,
        new_units=int(new_units[-1]) if new_units else 0,
        failure=failure,
        crash_file=None if artifact is None else Path(artifact[1]),
        traceback="" if traceback is None else traceback[1].strip(),
    )


def fuzz_target(target: Target, seconds: int, corpus_out: Path, crash_dir: Path) -> TargetResult:
    """Fuzz ``target`` for ``seconds`` in a worker process; blocks until it ends."""
    corpus_out.mkdir(parents=True, exist_ok=True)
    crash_dir.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable, "-m", "fuzz.worker", target.name,
        f"-max_total_time={seconds}", f"-max_len={target.max_len_bytes}",
        f"-timeout={INPUT_TIMEOUT_S}", f"-rss_limit_mb={RSS_LIMIT_MB}", "-print_final_stats=1",
        f"-artifact_prefix={crash_dir}/{target.name}-", str(corpus_out), str(target.corpus_dir),
    ]  # fmt: skip
    with tempfile.TemporaryFile() as log:
        started = time.monotonic()
        returncode: int | None
        try:
            returncode = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                        timeout=seconds + GRACE_S, check=False).returncode
        except subprocess.TimeoutExpired:
            returncode = None
        elapsed_s = time.monotonic() - started
        log.seek(0)
        text = log.read().decode("utf-8", "replace")
    result = summarize(target.name, text, returncode, elapsed_s)
    if result.failure is not None and result.crash_file is None and not result.traceback:
        print("\n".join(text.splitlines()[-LOG_TAIL_LINES:]), file=sys.stderr)
    return result


def report(result: TargetResult) -> str:
    """One line per target, then the crash details when it failed."""
    line = (f"{result.name:<18} {result.executions:>10} execs {result.executions_per_s:>9.0f}"
            f" execs/s {result.new_units:>5} new  {result.failure or 'ok'}")
    if result.failure is None:
        return line
    lines = [line]
    if result.traceback:
        lines.append(result.traceback)
    if result.crash_file is not None and result.crash_file.is_file():
        data = result.crash_file.read_bytes()
        more = f" … ({len(data)} bytes)" if len(data) > MAX_HEX_BYTES else ""
        lines.append(f"input ({len(data)} bytes, hex): {data[:MAX_HEX_BYTES].hex()}{more}")
        lines.append(f"saved to {result.crash_file}")
        lines.append(f"reproduce: python -m fuzz.run --target {result.name} "
                     f"--replay {result.crash_file}")
    return "\n".join(lines)


def replay(target: Target, paths: Sequence[Path]) -> None:
    """Run ``target`` on each file in this process (no libFuzzer): a crash raises here
    with its full traceback."""
    for path in paths:
        print(f"{target.name}: {path}", flush=True)
        target.run(path.read_bytes())


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m fuzz.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds-per-target", type=int, default=15,
                        help="libFuzzer -max_total_time per target (default 15)")
    parser.add_argument("--target", action="append", choices=list(TARGETS),
                        help="run only this target (repeatable; default: all)")
    parser.add_argument("--corpus-out", type=Path,
                        help="keep the inputs found in DIR/<target> (default: discard)")
    parser.add_argument("--crash-dir", type=Path, default=CRASH_DIR,
                        help="where crashing inputs are saved (default fuzz/crashes)")
    parser.add_argument("--replay", type=Path, nargs="+", metavar="FILE",
                        help="run the one --target on FILEs in-process, no fuzzing")
    args = parser.parse_args(argv)
    targets = [TARGETS[name] for name in args.target or TARGETS]
    if args.replay:
        if len(targets) != 1:
            parser.error("--replay needs exactly one --target")
        replay(targets[0], args.replay)
        return 0
    if args.seconds_per_target < 1:
        parser.error("--seconds-per-target must be >= 1")
    failed = 0
    with tempfile.TemporaryDirectory(prefix="voxgate-fuzz-") as scratch:
        corpus_root = args.corpus_out or Path(scratch)
        for target in targets:
            result = fuzz_target(target, args.seconds_per_target, corpus_root / target.name,
                                 args.crash_dir.resolve())
            print(report(result), flush=True)
            failed += result.failure is not None
    print(f"fuzz: {len(targets)} targets, {args.seconds_per_target} s each, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
