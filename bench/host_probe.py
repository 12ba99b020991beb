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
at its fastest, 1,970-2,160 at the median, 10 s each on both cores). Then the
CPU time of a fixed unit of system calls, the other half of the daemon's
work: :data:`SYSCALL_PAIRS` 172-byte UDP datagrams (a 160-byte µ-law frame
with its RTP header) sent to itself on loopback and read back, as a leg's
tick sends and reads one packet (here: 263-287 µs at its fastest, 410-468 at
the median, 10 s each on both idle cores; about 4 µs a pair, a fifth of a
call-tick). Machines whose Python runs as fast can differ here (virtualised
network calls, kernel mitigations).
Benchmarks run it pinned to the daemon's core (:class:`HostProbe`) and print
p50/p90 of the first and p50 of the second over the window: comparable
between runs (lower is faster), and a run that failed in a slow spell shows
a high p90. Under a SCHED_FIFO daemon it runs in the daemon's idle time,
which only delays it: its figures are CPU time.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from tests.harness.pcap import percentile

PERIOD_S = 0.2
UNIT_ITERATIONS = 8000  # 2-4 ms of CPython 3.11 here
SYSCALL_PAIRS = 100
_DATAGRAM = bytes(172)


def work_unit() -> int:
    """A fixed amount of interpreter work (integer arithmetic in a loop)."""
    total = 0
    for i in range(UNIT_ITERATIONS):
        total += (i * i) ^ (total >> 3)
    return total


def syscall_unit(sock: socket.socket) -> None:
    """A fixed amount of system calls: :data:`SYSCALL_PAIRS` datagrams that the UDP
    socket ``sock`` (bound on loopback, blocking) sends to itself and reads back."""
    address = sock.getsockname()
    for _ in range(SYSCALL_PAIRS):
        sock.sendto(_DATAGRAM, address)
        sock.recv(2048)


def _cpu_us(unit: Callable[[], object]) -> float:
    before = time.thread_time()
    unit()
    return (time.thread_time() - before) * 1e6


def main() -> None:
    """Probe until killed: a line ``<monotonic s> <Python unit CPU µs> <system call unit
    CPU µs>`` per period, flushed.

    It runs SCHED_OTHER whatever its parent's policy (a SCHED_FIFO benchmark's
    child would otherwise run each unit ahead of a daemon of the same priority).
    """
    os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        next_at = time.monotonic()
        while True:
            python_us = _cpu_us(work_unit)
            syscall_us = _cpu_us(lambda: syscall_unit(sock))
            print(f"{time.monotonic():.6f} {python_us:.1f} {syscall_us:.1f}", flush=True)
            next_at += PERIOD_S
            time.sleep(max(0.0, next_at - time.monotonic()))


@dataclass(frozen=True, slots=True)
class ProbeFigures:
    """The probe's units' CPU time over a window, µs (NaN without samples): the Python
    unit's p50 and p90, the system call unit's p50."""

    p50_us: float
    p90_us: float
    syscall_p50_us: float
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
        """Figures of the periods that ended between monotonic ``start_s`` and ``stop_s``."""
        periods = [(float(python_us), float(syscall_us))
                   for at, python_us, syscall_us in (
                       line.split() for line in self._path.read_text().splitlines()
                       if line.count(" ") == 2)  # not a line cut by the kill
                   if start_s <= float(at) <= stop_s]
        python = [p for p, _ in periods]
        return ProbeFigures(percentile(python, 50), percentile(python, 90),
                            percentile([s for _, s in periods], 50), len(periods))


if __name__ == "__main__":
    main()
