"""How fast the daemon's core ran during a benchmark window (a virtual machine's
core is not always the same speed).

Measured here (a 2-vCPU VM, nothing else running, a C loop of fixed work
pinned to one core): the CPU time of the same work varied, p50 1.22x, p90
1.69x, p99 1.80x its fastest, in spells of 20 ms to several seconds. Steal
time (``/proc/stat``) shows only the spells when the core did not run at all;
in the others it ran slower (the host's other work on the same physical
core). A daemon at 70 % of its core in a fast spell needs more than all of it
in a 1.5x one, and its media clock skips ticks.

``python -m bench.host_probe`` runs a fixed unit of pure-Python work every
200 ms (1-2 % of a core) and prints, a line each, the monotonic time it
ended and the unit's CPU time in µs: the time of a fixed amount of the
interpreter's work, as the daemon's is (on an idle core here: 1,100-1,450 µs
at its fastest, 1,970-2,160 at the median, 10 s each on both cores).
Benchmarks run it pinned to the daemon's core (:class:`HostProbe`) and print
its p50/p90 over the window: comparable between runs (lower is faster), and a
run that failed in a slow spell shows a high p90. Under a SCHED_FIFO daemon
it runs in the daemon's idle time, which only delays it: its figure is CPU
time.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from tests.harness.pcap import percentile

PERIOD_S = 0.2
UNIT_ITERATIONS = 8000  # 2-4 ms of CPython 3.11 here


def work_unit() -> int:
    """A fixed amount of interpreter work (integer arithmetic in a loop)."""
    total = 0
    for i in range(UNIT_ITERATIONS):
        total += (i * i) ^ (total >> 3)
    return total


def main() -> None:
    """Probe until killed: a line ``<monotonic s> <unit CPU µs>`` per unit, flushed.

    It runs SCHED_OTHER whatever its parent's policy (a SCHED_FIFO benchmark's
    child would otherwise run each unit ahead of a daemon of the same priority).
    """
    os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
    next_at = time.monotonic()
    while True:
        cpu_before = time.thread_time()
        work_unit()
        cpu_us = (time.thread_time() - cpu_before) * 1e6
        print(f"{time.monotonic():.6f} {cpu_us:.1f}", flush=True)
        next_at += PERIOD_S
        time.sleep(max(0.0, next_at - time.monotonic()))


@dataclass(frozen=True, slots=True)
class ProbeFigures:
    """The probe's unit CPU time over a window, µs (NaN without samples)."""

    p50_us: float
    p90_us: float
    samples: int


class HostProbe:
    """Runs the probe pinned to CPU ``cpu`` (``taskset``) while the ``with`` block
    lasts, its lines into ``path``; :meth:`figures` reads them afterwards."""

    def __init__(self, cpu: int, path: Path) -> None:
        self._argv = ["taskset", "-c", str(cpu), sys.executable, "-m", "bench.host_probe"]
        self._path = path
        self._proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> HostProbe:
        with self._path.open("wb") as out:
            self._proc = subprocess.Popen(self._argv, stdout=out, cwd=Path(__file__).parents[1])
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait()

    def figures(self, start_s: float, stop_s: float) -> ProbeFigures:
        """p50/p90 of the units that ended between monotonic ``start_s`` and ``stop_s``."""
        units = [float(cpu_us)
                 for at, cpu_us in (line.split() for line in self._path.read_text().splitlines()
                                    if line.count(" ") == 1)  # not a line cut by the kill
                 if start_s <= float(at) <= stop_s]
        return ProbeFigures(percentile(units, 50), percentile(units, 90), len(units))


if __name__ == "__main__":
    main()
