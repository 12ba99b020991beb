"""The watchdog's ping/withhold judgement."""

from __future__ import annotations

from voxgate.watchdog import Watchdog


def test_pings_when_all_checked_in_and_loop_fast():
    dog = Watchdog(["sip", "reaper"], max_loop_lag_s=0.5)
    dog.check_in("sip")
    dog.check_in("reaper")
    dog.record_lag(0.01)
    verdict = dog.verdict()
    assert verdict.ping
    assert verdict.failures == ()


def test_withholds_and_names_the_missing_task():
    dog = Watchdog(["sip", "reaper"], max_loop_lag_s=0.5)
    dog.check_in("sip")
    verdict = dog.verdict()
    assert not verdict.ping
    assert verdict.failures == ("reaper did not check in",)
    assert dog.withheld == 1


def test_withholds_on_loop_lag_and_resets_each_period():
    dog = Watchdog(["sip"], max_loop_lag_s=0.5)
    dog.check_in("sip")
    dog.record_lag(0.8)
    dog.record_lag(0.1)
    assert dog.verdict().failures == ("loop lag 800 ms > 500 ms",)
    # the next period starts clean: check-ins are needed again
    assert dog.verdict().failures == ("sip did not check in",)
    dog.check_in("sip")
    assert dog.verdict().ping
    assert dog.pings == 1
