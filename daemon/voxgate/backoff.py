"""Retry delays: exponential backoff with a cap, one rule for every component.

Used by ALSA lines that cannot open their device, the call records and the
post-call queue when their database fails, and post-call deliveries.
"""

from __future__ import annotations

_MAX_DOUBLINGS = 64
"""Beyond this many doublings every delay is ``max_s`` anyway (and 2**n stays finite)."""


def backoff_delay_s(failures: int, initial_s: float, max_s: float) -> float:
    """The wait after ``failures`` failed tries in a row (≥ 1): ``initial_s``
    doubling per failure, at most ``max_s`` (seconds)."""
    return min(max_s, initial_s * 2.0 ** min(max(failures - 1, 0), _MAX_DOUBLINGS))


class Backoff:
    """A failure count and its next delay (:func:`backoff_delay_s`)."""

    def __init__(self) -> None:
        self.failures = 0

    def delay_s(self, initial_s: float, max_s: float) -> float:
        """The delay before the next try, counting one more failure."""
        self.failures += 1
        return backoff_delay_s(self.failures, initial_s, max_s)

    def reset(self) -> None:
        self.failures = 0
