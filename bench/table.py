"""Fixed-width result tables for the benchmarks (one line per step)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

R = TypeVar("R")
WIDTH = 9


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
