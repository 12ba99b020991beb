"""Per-source token buckets (voxgate.sip.ratelimit); ``now`` is always an argument."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from voxgate.sip.ratelimit import (
    FloodLimits,
    RequestClass,
    SourceRateLimiter,
    TokenBucket,
    Verdict,
)

A, B = "192.0.2.1", "192.0.2.2"


def test_bucket_starts_full_and_refills_at_its_rate() -> None:
    bucket = TokenBucket(rate_per_s=10.0, burst=3.0, now=0.0)
    assert [bucket.take(0.0) for _ in range(4)] == [True, True, True, False]
    assert not bucket.take(0.05)  # half a token
    assert bucket.take(0.1)
    assert bucket.tokens(100.0) == 3.0  # capped at the burst


def test_bucket_ignores_time_going_backwards() -> None:
    bucket = TokenBucket(rate_per_s=1.0, burst=1.0, now=10.0)
    assert bucket.take(10.0)
    assert not bucket.take(5.0)
    assert bucket.tokens(10.5) == pytest.approx(0.5)


def test_bucket_reconfigure_keeps_tokens_capped() -> None:
    bucket = TokenBucket(rate_per_s=1.0, burst=10.0, now=0.0)
    bucket.reconfigure(2.0, 4.0)
    assert bucket.tokens(0.0) == 4.0
    assert all(bucket.take(0.0) for _ in range(4))
    assert bucket.tokens(1.0) == pytest.approx(2.0)


def verdicts(limiter: SourceRateLimiter, source: str, request_class: RequestClass, count: int,
             now: float = 0.0) -> list[Verdict]:
    return [limiter.check(source, request_class, now) for _ in range(count)]


def test_admit_then_refuse_then_drop() -> None:
    limits = FloodLimits(invites_per_source_per_s=2.0, invite_burst=4, flood_drop_factor=2.0)
    limiter = SourceRateLimiter(limits)
    got = verdicts(limiter, A, RequestClass.INVITE, 10)
    assert got == [Verdict.ADMIT] * 4 + [Verdict.REFUSE] * 4 + [Verdict.DROP] * 2
    # One second later: the rate is back in both buckets.
    assert verdicts(limiter, A, RequestClass.INVITE, 5, now=1.0) == [
        Verdict.ADMIT, Verdict.ADMIT, Verdict.REFUSE, Verdict.REFUSE, Verdict.DROP]


def test_drop_factor_one_never_refuses() -> None:
    limiter = SourceRateLimiter(FloodLimits(options_burst=1, flood_drop_factor=1.0))
    assert verdicts(limiter, A, RequestClass.OPTIONS, 3) == [
        Verdict.ADMIT, Verdict.DROP, Verdict.DROP]


def test_sources_and_classes_are_separate() -> None:
    limits = FloodLimits(invite_burst=1, options_burst=1, requests_burst=1, flood_drop_factor=1.0)
    limiter = SourceRateLimiter(limits)
    assert verdicts(limiter, A, RequestClass.INVITE, 2) == [Verdict.ADMIT, Verdict.DROP]
    assert limiter.check(A, RequestClass.OPTIONS, 0.0) is Verdict.ADMIT
    assert limiter.check(A, RequestClass.OTHER, 0.0) is Verdict.ADMIT
    assert limiter.check(B, RequestClass.INVITE, 0.0) is Verdict.ADMIT


def test_defaults_let_a_50_calls_per_s_trunk_through() -> None:
    limiter = SourceRateLimiter()
    sent = [i / 50 for i in range(50 * 60)]  # one minute at 50 INVITE/s
    assert {limiter.check(A, RequestClass.INVITE, t) for t in sent} == {Verdict.ADMIT}
    burst = verdicts(limiter, B, RequestClass.INVITE, 200)  # a 200-call burst at once
    assert set(burst) == {Verdict.ADMIT}


def test_table_is_lru_bounded_and_counts_evictions() -> None:
    limiter = SourceRateLimiter(FloodLimits(invite_burst=1, flood_drop_factor=1.0), max_sources=2)
    assert limiter.check(A, RequestClass.INVITE, 0.0) is Verdict.ADMIT
    assert limiter.check(B, RequestClass.INVITE, 0.0) is Verdict.ADMIT
    assert limiter.check(A, RequestClass.INVITE, 0.0) is Verdict.DROP  # A is now most recent
    assert limiter.check("192.0.2.3", RequestClass.INVITE, 0.0) is Verdict.ADMIT  # evicts B
    assert (len(limiter), limiter.evicted) == (2, 1)
    assert limiter.check(A, RequestClass.INVITE, 0.0) is Verdict.DROP  # A was kept
    assert limiter.check(B, RequestClass.INVITE, 0.0) is Verdict.ADMIT  # B came back full


def test_new_limits_apply_to_known_sources() -> None:
    limiter = SourceRateLimiter(FloodLimits(invite_burst=100))
    assert limiter.check(A, RequestClass.INVITE, 0.0) is Verdict.ADMIT
    limiter.limits = FloodLimits(invite_burst=1, flood_drop_factor=1.0)
    assert verdicts(limiter, A, RequestClass.INVITE, 2) == [Verdict.ADMIT, Verdict.DROP]


@dataclass(frozen=True)
class _Section:
    invites_per_source_per_s: float = 7.0
    invite_burst: int = 8
    options_per_source_per_s: float = 9.0
    options_burst: int = 10
    requests_per_source_per_s: float = 11.0
    requests_burst: int = 12
    flood_drop_factor: float = 3.0
    transaction_share_per_source: float = 0.25
    unacked_failures_per_source: int = 4


def test_from_settings_reads_every_key() -> None:
    limits = FloodLimits.from_settings(_Section())
    assert limits == FloodLimits(7.0, 8, 9.0, 10, 11.0, 12, 3.0, 0.25, 4)
    assert limits.rate_and_burst(RequestClass.OTHER) == (11.0, 12.0)


def test_defaults_match_the_config_defaults() -> None:
    from voxgate.config import SipConfig

    assert FloodLimits.from_settings(SipConfig()) == FloodLimits()
