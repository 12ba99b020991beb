"""The watchdog's ping/withhold judgement."""

from __future__ import annotations

from voxgate.watchdog import Watchdog


def test_pings_when_all_checked_in_and_loop_fast():
    dog = Watchdog(["sip", "reaper"], max_loop_lag_s=0.5)
    dog.check_in("sip", 10.0)
    dog.check_in("reaper", 10.2)
    dog.record_lag(0.01)
    verdict = dog.verdict(10.5, window_s=2.0)
    assert verdict.ping
    assert verdict.failures == ()


def test_withholds_and_names_the_task_that_went_quiet():
    dog = Watchdog(["sip", "reaper"], max_loop_lag_s=0.5)
    dog.check_in("sip", 10.0)
    dog.check_in("reaper", 5.0)
    verdict = dog.verdict(10.5, window_s=2.0)
    assert not verdict.ping
    assert verdict.failures == ("reaper did not check in",)
    assert dog.withheld == 1


def test_a_task_that_never_checked_in_fails():
    dog = Watchdog(["sip"], max_loop_lag_s=0.5)
    assert dog.verdict(0.5, window_s=2.0).failures == ("sip did not check in",)


def test_withholds_on_loop_lag_and_resets_the_lag_each_period():
    dog = Watchdog(["sip"], max_loop_lag_s=0.5)
    dog.check_in("sip", 1.0)
    dog.record_lag(0.8)
    dog.record_lag(0.1)
    assert dog.verdict(1.5, window_s=2.0).failures == ("loop lag 800 ms > 500 ms",)
    assert dog.verdict(2.0, window_s=2.0).ping
    assert dog.pings == 1
