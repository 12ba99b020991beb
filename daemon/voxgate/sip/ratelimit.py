"""Per-source flood protection for new SIP transactions, sans-IO.

Each source IP address has one token bucket per request class (INVITE,
OPTIONS, other requests) for requests that would start a NEW transaction;
retransmissions and in-dialog requests never reach this module (the UAS
core decides that). A request is:

- admitted while its bucket holds a token (rate ``*_per_s``, depth ``*_burst``);
- refused (the caller answers a stateless 503 + Retry-After) while the
  source's refusal bucket holds a token: that bucket fills at
  ``(flood_drop_factor - 1)`` times the class's rate and depth, so a source
  offering up to ``flood_drop_factor`` times its rate hears a 503 for the
  excess;
- dropped silently beyond that (no answer: the box is no amplifier).

While a source is beyond that point for a class (:meth:`SourceRateLimiter.flooding`),
the UAS core drops its INVITE/OPTIONS datagrams before parsing them, so a
flood costs a few microseconds per datagram instead of a parse. A
retransmission or re-INVITE from such a source is dropped with the flood:
the price of not parsing (its own calls are the ones flooding).

The bucket table is bounded by :data:`MAX_SOURCES`; the least recently seen
source is evicted (counted). Time is the caller's ``now`` (monotonic
seconds). The token bucket is the one of RFC 2697 §3.1 (single rate, one
bucket of depth CBS), refilled continuously instead of per tick.
"""

from __future__ import annotations

import enum
from collections import OrderedDict
from dataclasses import dataclass
from typing import Protocol

MAX_SOURCES = 4096
"""Source addresses whose buckets are kept; the least recently seen is evicted beyond."""


class RequestClass(enum.Enum):
    """The bucket a new request draws from."""

    INVITE = "invite"
    OPTIONS = "options"
    OTHER = "other"


class Verdict(enum.Enum):
    """What to do with a new request."""

    ADMIT = "admit"
    REFUSE = "refuse"  # answer a stateless 503 + Retry-After
    DROP = "drop"  # answer nothing


class FloodSettings(Protocol):
    """The ``[sip]`` keys this module reads (``voxgate.config.SipConfig`` has them)."""

    @property
    def invites_per_source_per_s(self) -> float: ...
    @property
    def invite_burst(self) -> int: ...
    @property
    def options_per_source_per_s(self) -> float: ...
    @property
    def options_burst(self) -> int: ...
    @property
    def requests_per_source_per_s(self) -> float: ...
    @property
    def requests_burst(self) -> int: ...
    @property
    def flood_drop_factor(self) -> float: ...
    @property
    def transaction_share_per_source(self) -> float: ...
    @property
    def unacked_failures_per_source(self) -> int: ...


@dataclass(frozen=True, slots=True)
class FloodLimits:
    """Per-source limits; rates in requests per second, bursts in requests.

    ``transaction_share_per_source`` (0-1] is the largest fraction of the
    transaction table one source may hold; ``unacked_failures_per_source`` is
    how many un-ACKed 3xx-6xx to INVITE a source may have before further ones
    are sent once, without Timer G retransmissions (RFC 3261 §17.2.1). Both
    are applied by :class:`~voxgate.sip.transaction.TransactionTable`.
    Defaults never bother a trunk placing 50 calls/s from one address.
    """

    invites_per_source_per_s: float = 100.0
    invite_burst: int = 200
    options_per_source_per_s: float = 20.0
    options_burst: int = 40
    requests_per_source_per_s: float = 50.0
    requests_burst: int = 100
    flood_drop_factor: float = 2.0
    transaction_share_per_source: float = 0.75
    unacked_failures_per_source: int = 16

    @classmethod
    def from_settings(cls, settings: FloodSettings) -> FloodLimits:
        """The limits of a validated ``[sip]`` section (or anything with its keys)."""
        return cls(
            invites_per_source_per_s=settings.invites_per_source_per_s,
            invite_burst=settings.invite_burst,
            options_per_source_per_s=settings.options_per_source_per_s,
            options_burst=settings.options_burst,
            requests_per_source_per_s=settings.requests_per_source_per_s,
            requests_burst=settings.requests_burst,
            flood_drop_factor=settings.flood_drop_factor,
            transaction_share_per_source=settings.transaction_share_per_source,
            unacked_failures_per_source=settings.unacked_failures_per_source,
        )

    def rate_and_burst(self, request_class: RequestClass) -> tuple[float, float]:
        """``(tokens per second, bucket depth)`` of ``request_class``."""
        if request_class is RequestClass.INVITE:
            return self.invites_per_source_per_s, float(self.invite_burst)
        if request_class is RequestClass.OPTIONS:
            return self.options_per_source_per_s, float(self.options_burst)
        return self.requests_per_source_per_s, float(self.requests_burst)


class TokenBucket:
    """A token bucket: ``rate_per_s`` tokens per second up to ``burst`` (starts full).

    ``now`` is monotonic seconds; a ``now`` earlier than the last one adds
    nothing (never raises).
    """

    __slots__ = ("_last_s", "_tokens", "burst", "rate_per_s")

    def __init__(self, rate_per_s: float, burst: float, now: float) -> None:
        self.rate_per_s = rate_per_s
        self.burst = burst
        self._tokens = burst
        self._last_s = now

    def tokens(self, now: float) -> float:
        """Tokens available at ``now`` (refilled, at most ``burst``)."""
        self._refill(now)
        return self._tokens

    def take(self, now: float) -> bool:
        """Take one token at ``now``; False (nothing taken) when fewer than one is left."""
        self._refill(now)
        if self._tokens < 1.0:
            return False
        self._tokens -= 1.0
        return True

    def reconfigure(self, rate_per_s: float, burst: float) -> None:
        """New rate and depth; the tokens held are kept, capped at the new depth."""
        self.rate_per_s, self.burst = rate_per_s, burst
        self._tokens = min(self._tokens, burst)

    def _refill(self, now: float) -> None:
        elapsed_s = max(0.0, now - self._last_s)
        self._last_s = max(self._last_s, now)
        self._tokens = min(self.burst, self._tokens + elapsed_s * self.rate_per_s)


class _SourceBuckets:
    """One source: an admit bucket and a refusal bucket per request class (both start full)."""

    __slots__ = ("admit", "refuse")

    def __init__(self, limits: FloodLimits, now: float) -> None:
        self.admit: dict[RequestClass, TokenBucket] = {}
        self.refuse: dict[RequestClass, TokenBucket] = {}
        for request_class in RequestClass:
            (rate_per_s, burst), excess = limits.rate_and_burst(request_class), _excess(limits)
            self.admit[request_class] = TokenBucket(rate_per_s, burst, now)
            self.refuse[request_class] = TokenBucket(excess * rate_per_s, excess * burst, now)

    def apply(self, limits: FloodLimits) -> None:
        excess = _excess(limits)
        for request_class in RequestClass:
            rate_per_s, burst = limits.rate_and_burst(request_class)
            self.admit[request_class].reconfigure(rate_per_s, burst)
            self.refuse[request_class].reconfigure(excess * rate_per_s, excess * burst)


def _excess(limits: FloodLimits) -> float:
    """The refusal bucket's share of the admit bucket's rate and depth."""
    return max(0.0, limits.flood_drop_factor - 1.0)


class SourceRateLimiter:
    """Token buckets for new requests, per source address, LRU-bounded.

    ``evicted`` counts sources forgotten to stay within ``max_sources``
    (an evicted source comes back with full buckets).
    """

    def __init__(self, limits: FloodLimits | None = None, max_sources: int = MAX_SOURCES) -> None:
        self._limits = limits or FloodLimits()
        self.max_sources = max_sources
        self.evicted = 0
        self._sources: OrderedDict[str, _SourceBuckets] = OrderedDict()

    @property
    def limits(self) -> FloodLimits:
        return self._limits

    @limits.setter
    def limits(self, limits: FloodLimits) -> None:
        """New limits apply at once to every known source (tokens held are kept, capped)."""
        self._limits = limits
        for buckets in self._sources.values():
            buckets.apply(limits)

    def __len__(self) -> int:
        return len(self._sources)

    def flooding(self, source_host: str, request_class: RequestClass, now: float) -> bool:
        """Whether a new ``request_class`` request from ``source_host`` would be dropped
        now (both buckets empty); takes no token, creates no entry."""
        buckets = self._sources.get(source_host)
        return (buckets is not None and buckets.admit[request_class].tokens(now) < 1.0
                and buckets.refuse[request_class].tokens(now) < 1.0)

    def check(self, source_host: str, request_class: RequestClass, now: float) -> Verdict:
        """The verdict on one new request of ``request_class`` from ``source_host`` at ``now``."""
        buckets = self._sources.get(source_host)
        if buckets is None:
            if len(self._sources) >= self.max_sources:
                self._sources.popitem(last=False)
                self.evicted += 1
            buckets = self._sources[source_host] = _SourceBuckets(self._limits, now)
        else:
            self._sources.move_to_end(source_host)
        if buckets.admit[request_class].take(now):
            return Verdict.ADMIT
        if buckets.refuse[request_class].take(now):
            return Verdict.REFUSE
        return Verdict.DROP
