"""Result tables and pass criteria shared by the load benchmarks."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Generic, Protocol, TypeVar


class StepFigures(Protocol):
    """What the stepping loop reads of one step's result."""

    @property
    def sessions(self) -> int: ...
    @property
    def passed(self) -> bool: ...
    @property
    def rss_per_session_kib(self) -> float: ...
    @property
    def cpu_pct(self) -> float: ...


R = TypeVar("R", bound=StepFigures)
WIDTH = 9

GAP_P99_LIMIT_MS = 30.0
GAP_MAX_LIMIT_MS = 100.0
LOSS_LIMIT_PCT = 0.1
ECHO_P99_LIMIT_MS = 60.0
LIMITS_TEXT = (f"limits: gap p99 <= {GAP_P99_LIMIT_MS} ms, gap max <= {GAP_MAX_LIMIT_MS} ms, "
               f"loss <= {LOSS_LIMIT_PCT} %, echo p99 <= {ECHO_P99_LIMIT_MS} ms")
"""The walking skeleton's sustained-load criteria, shared by the echo benchmarks."""


def largest_sustained(results: Iterable[StepFigures]) -> int | None:
    """The largest N whose every run passed (None: no N did)."""
    by_n: dict[int, bool] = {}
    for r in results:
        by_n[r.sessions] = by_n.get(r.sessions, True) and r.passed
    return max((n for n, passed in by_n.items() if passed), default=None)


def within_limits(gap_p99_ms: float, gap_max_ms: float, loss_pct: float,
                  echo_p99_ms: float) -> bool:
    """Whether one step's outbound media meets every limit (NaN fails)."""
    return (gap_p99_ms <= GAP_P99_LIMIT_MS and gap_max_ms <= GAP_MAX_LIMIT_MS
            and loss_pct <= LOSS_LIMIT_PCT and echo_p99_ms <= ECHO_P99_LIMIT_MS)


class Table(Generic[R]):
    """Columns of (name, format spec, getter) over one result type."""

    def __init__(self, columns: Sequence[tuple[str, str, Callable[[R], object]]]) -> None:
        self.columns = tuple(columns)

    def header(self) -> str:
        """The header line (names right-aligned)."""
        return " ".join(name.rjust(WIDTH) for name, _, _ in self.columns)

    def row(self, result: R) -> str:
        """One line for ``result``, aligned with :meth:`header`."""
        return " ".join(format(get(result), spec).rjust(WIDTH) for _, spec, get in self.columns)

    def step_through(self, steps: Iterable[int], run: Callable[[int], R],
                     warnings: Callable[[R], list[str]], unit: str, *,
                     stop_at_failure: bool = True) -> None:
        """Run each step, print its row and warnings, stop at the first failure (unless
        ``stop_at_failure`` is false: then every step runs), then print the largest
        sustained N (per ``unit``: the last step passed before the first failure) and
        the limits."""
        print(self.header(), flush=True)
        best: R | None = None
        failed = False
        for sessions in steps:
            result = run(sessions)
            print(self.row(result), flush=True)
            for warning in warnings(result):
                print(f"  warning: {warning}")
            failed = failed or not result.passed
            if failed and stop_at_failure:
                break
            if not failed:
                best = result
        if best is None:
            print("no step met the limits")
        else:
            print(f"largest sustained N: {best.sessions} (RSS per {unit} "
                  f"{best.rss_per_session_kib:.1f} KiB, CPU {best.cpu_pct:.1f} %)")
        print(LIMITS_TEXT)

    def runs_through(self, steps: Iterable[int], runs: int, run: Callable[[int, int], R],
                     warnings: Callable[[R], list[str]]) -> None:
        """Run each step ``runs`` times (``run(n, i)``, ``i`` from 1), print every row
        and its warnings, stop after a step that no run passed, then print the largest
        N sustained in all runs (:func:`largest_sustained`) and the limits."""
        print(self.header(), flush=True)
        results: list[R] = []
        for sessions in steps:
            sustained = False
            for index in range(1, runs + 1):
                result = run(sessions, index)
                results.append(result)
                print(self.row(result), flush=True)
                for warning in warnings(result):
                    print(f"  N={sessions} run {index}: warning: {warning}")
                sustained = sustained or result.passed
            if not sustained:
                break
        best = largest_sustained(results)
        print("no N was sustained in every run" if best is None
              else f"largest N sustained in all {runs} runs: {best}")
        print(LIMITS_TEXT)
