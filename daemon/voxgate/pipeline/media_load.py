"""How loaded the media clock is, as an admission health verdict; sans-IO.

The media clock (:mod:`voxgate.pipeline.clock`) reports every tick how late
it woke (``lag_s``: the event loop had other work, or the process waited for
a core) and the CPU time the event loop's thread used since the previous
tick (``busy_s``: ticking sessions, SIP, control, garbage collection). Over
windows of ``window_s`` this gives the *utilisation* (the share of wall time
the loop was busy: what it has left for more calls, whatever the work is)
and the wake-up lag's 90th percentile (robust to one garbage collection or
one slow control command). When either crosses its
limit the clock is unhealthy and admission refuses new calls with 503 +
Retry-After (SIP OPTIONS answer 503 too, so a dispatcher moves traffic),
before the calls already up lose frames; it is healthy again once both are
below ``RECOVER_SHARE`` of their limits, so the gate does not flap at the
edge. ``[limits] media_utilisation_max`` and ``media_lag_max_ms``.
"""

from __future__ import annotations

RECOVER_SHARE = 0.8
"""Healthy again when utilisation and lag are both below this share of their limits."""

WINDOW_S = 1.0
"""Length of one measurement window."""


class MediaLoad:
    """The media clock's utilisation and wake-up lag per window, with a verdict.

    Args:
        utilisation_max: utilisation (0..1) from which new calls are refused;
            1.0 never refuses on utilisation.
        lag_max_s: wake-up lag p90 (seconds) from which new calls are refused.
        window_s: window length in seconds.
    """

    __slots__ = ("_busy_s", "_lags", "_started", "healthy", "lag_max_s", "lag_p90_s",
                 "utilisation", "utilisation_max", "window_s")

    def __init__(self, utilisation_max: float, lag_max_s: float,
                 window_s: float = WINDOW_S) -> None:
        self.utilisation_max = utilisation_max
        self.lag_max_s = lag_max_s
        self.window_s = window_s
        self.healthy = True
        self.utilisation = 0.0
        """Of the last whole window, 0..1 (more only when the clock measures itself late)."""
        self.lag_p90_s = 0.0
        """Of the last whole window."""
        self._started: float | None = None
        self._busy_s = 0.0
        self._lags: list[float] = []

    def tick(self, now: float, lag_s: float, busy_s: float) -> bool:
        """One tick that woke ``lag_s`` late at ``now``, the loop busy ``busy_s`` since the last.

        Seconds, all three.

        Returns True when this tick closed a window (the figures and
        :attr:`healthy` were updated: report them), else False. A window
        holds the ticks from its start to the first tick ``window_s`` later.
        """
        started = self._started
        if started is None:
            self._started = started = now
        closed = now - started >= self.window_s
        if closed:
            self._close(now - started)
            self._started = now
        self._busy_s += busy_s
        self._lags.append(lag_s)
        return closed

    def _close(self, elapsed_s: float) -> None:
        lags = sorted(self._lags)
        self.lag_p90_s = lags[min(len(lags) - 1, int(len(lags) * 0.9))]
        self.utilisation = self._busy_s / elapsed_s
        self._busy_s = 0.0
        self._lags.clear()
        share = 1.0 if self.healthy else RECOVER_SHARE
        self.healthy = (self.utilisation < self.utilisation_max * share
                        and self.lag_p90_s < self.lag_max_s * share)

    @property
    def headroom(self) -> float:
        """Utilisation left before new calls are refused (0..1; 0 when over the limit)."""
        return max(0.0, self.utilisation_max - self.utilisation)

    @property
    def detail(self) -> str:
        """The figures against their limits in one line (``voxgatectl health``, the log)."""
        return (f"utilisation {self.utilisation:.0%}/{self.utilisation_max:.0%}, "
                f"lag p90 {self.lag_p90_s * 1000:.1f}/{self.lag_max_s * 1000:.0f} ms, "
                f"headroom {self.headroom:.0%}")
