"""Result tables and pass criteria shared by the load benchmarks."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

R = TypeVar("R")
WIDTH = 9

GAP_P99_LIMIT_MS = 30.0
GAP_MAX_LIMIT_MS = 100.0
LOSS_LIMIT_PCT = 0.1
ECHO_P99_LIMIT_MS = 60.0
LIMITS_TEXT = (f"limits: gap p99 <= {GAP_P99_LIMIT_MS} ms, gap max <= {GAP_MAX_LIMIT_MS} ms, "
               f"loss <= {LOSS_LIMIT_PCT} %, echo p99 <= {ECHO_P99_LIMIT_MS} ms")
"""The walking skeleton's sustained-load criteria, shared by the echo benchmarks."""


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
