"""MediaLoad: utilisation and wake-up lag per window, a verdict with hysteresis."""

from __future__ import annotations

import pytest

from voxgate.pipeline.media_load import MediaLoad

TICK_S = 0.02


class Clock:
    """Ticks a MediaLoad every 20 ms, carrying on where the last run stopped."""

    def __init__(self, load: MediaLoad) -> None:
        self.load = load
        self.now = 0.0

    def run(self, seconds: float, busy_s: float, lag_s: float = 0.0) -> list[bool]:
        """Tick for ``seconds``; the verdicts of the windows that closed meanwhile."""
        verdicts = []
        for _ in range(round(seconds / TICK_S)):
            if self.load.tick(self.now, lag_s, busy_s):
                verdicts.append(self.load.healthy)
            self.now += TICK_S
        return verdicts


def test_utilisation_is_the_share_of_each_window_spent_ticking():
    load = MediaLoad(utilisation_max=0.7, lag_max_s=0.015)
    assert Clock(load).run(2.1, busy_s=0.005) == [True, True]
    assert load.utilisation == pytest.approx(0.25, abs=0.01)
    assert load.headroom == pytest.approx(0.45, abs=0.01)
    assert load.detail == "utilisation 25%/70%, lag p90 0.0/15 ms, headroom 45%"


def test_over_the_limit_refuses_and_needs_to_fall_below_80_percent_to_admit_again():
    load = MediaLoad(utilisation_max=0.5, lag_max_s=1.0)
    clock = Clock(load)
    assert clock.run(1.02, busy_s=0.011) == [False]  # 55 %
    assert load.headroom == 0.0
    assert clock.run(2.0, busy_s=0.009) == [False, False]  # 45 %: not yet
    assert clock.run(1.0, busy_s=0.007) == [True]  # 35 % < 40 %


def test_lag_p90_ignores_one_late_wake_up_but_not_a_tenth_of_them():
    load = MediaLoad(utilisation_max=1.0, lag_max_s=0.015)
    verdicts = [load.tick(n * TICK_S, 0.2 if n == 10 else 0.001, 0.0001) for n in range(60)]
    assert verdicts.count(True) == 1 and load.healthy  # one garbage collection
    assert load.lag_p90_s == pytest.approx(0.001)
    for n in range(60, 120):
        load.tick(n * TICK_S, 0.03 if n % 5 == 0 else 0.001, 0.0001)
    assert not load.healthy and load.lag_p90_s == pytest.approx(0.03)
