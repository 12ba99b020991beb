"""The systemd watchdog's judgement: ping only while the daemon is healthy; sans-IO.

systemd restarts a service that stops sending ``WATCHDOG=1`` within
``WatchdogSec``. voxgate pings at half that interval, but only while

- the event loop's lag (how late a timer fires) stays under
  ``[watchdog] max_loop_lag_ms``, and
- every critical task (SIP receive loop, admission timers, control server,
  session reaper, media clock) has checked in since the previous ping.

Otherwise it withholds the ping and says which check failed, so a hung or
overloaded daemon is restarted instead of limping on. The driver
(:mod:`voxgate.supervisor`) measures lag and sends the datagrams.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Verdict:
    """The outcome of one watchdog period."""

    ping: bool
    failures: tuple[str, ...]
    """Human-readable failed checks, e.g. ``"loop lag 812 ms > 500 ms"``."""


class Watchdog:
    """Tracks check-ins and loop lag between two pings."""

    def __init__(self, critical: Iterable[str], max_loop_lag_s: float) -> None:
        self.critical = tuple(critical)
        self.max_loop_lag_s = max_loop_lag_s
        self._checked_in: set[str] = set()
        self._worst_lag_s = 0.0
        self.pings = 0
        self.withheld = 0

    def check_in(self, task: str) -> None:
        """A critical task proves it is making progress."""
        self._checked_in.add(task)

    def record_lag(self, lag_s: float) -> None:
        """One loop-lag measurement (seconds a timer fired late)."""
        self._worst_lag_s = max(self._worst_lag_s, lag_s)

    def verdict(self) -> Verdict:
        """Judge the period since the last verdict and start a new one."""
        failures = [f"{task} did not check in" for task in self.critical
                    if task not in self._checked_in]
        if self._worst_lag_s > self.max_loop_lag_s:
            failures.append(f"loop lag {self._worst_lag_s * 1000:.0f} ms > "
                            f"{self.max_loop_lag_s * 1000:.0f} ms")
        self._checked_in.clear()
        self._worst_lag_s = 0.0
        if failures:
            self.withheld += 1
        else:
            self.pings += 1
        return Verdict(not failures, tuple(failures))
