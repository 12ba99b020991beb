"""The systemd watchdog's judgement: ping only while the daemon is healthy; sans-IO.

systemd restarts a service that stops sending ``WATCHDOG=1`` within
``WatchdogSec``. voxgate pings at half that interval, but only while

- the event loop's lag (how late a timer fires) stays under
  ``[watchdog] max_loop_lag_ms``, and
- every critical task (SIP receive loop, admission timers, control server,
  session reaper, media clock) has checked in recently (within
  ``window_s`` of the verdict: idle loops check in about once a second).

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
    """Tracks check-ins and the worst loop lag since the last verdict."""

    def __init__(self, critical: Iterable[str], max_loop_lag_s: float) -> None:
        self.critical = tuple(critical)
        self.max_loop_lag_s = max_loop_lag_s
        self._last_check_in: dict[str, float] = {}
        self._worst_lag_s = 0.0
        self.pings = 0
        self.withheld = 0

    def check_in(self, task: str, now: float) -> None:
        """A critical task proves it is making progress."""
        self._last_check_in[task] = now

    def record_lag(self, lag_s: float) -> None:
        """One loop-lag measurement (seconds a timer fired late)."""
        self._worst_lag_s = max(self._worst_lag_s, lag_s)

    def verdict(self, now: float, window_s: float) -> Verdict:
        """Judge now: every critical task checked in within ``window_s``, and the
        worst lag since the last verdict; then start a new lag period."""
        failures = [f"{task} did not check in" for task in self.critical
                    if now - self._last_check_in.get(task, -window_s - 1) > window_s]
        if self._worst_lag_s > self.max_loop_lag_s:
            failures.append(f"loop lag {self._worst_lag_s * 1000:.0f} ms > "
                            f"{self.max_loop_lag_s * 1000:.0f} ms")
        self._worst_lag_s = 0.0
        if failures:
            self.withheld += 1
        else:
            self.pings += 1
        return Verdict(not failures, tuple(failures))
