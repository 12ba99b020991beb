"""Prometheus metrics (prometheus-client), one registry for the daemon.

Two kinds of metric live here:

- event metrics that code updates when something happens, a handful of times
  per call (session ends, queue waits, durations);
- live metrics read only when someone scrapes: the gauges and the media
  counters are summed from the sessions' own plain-int counters by
  :class:`LiveCollector`, so the 20 ms media path never touches a lock.

``voxgatectl metrics`` prints :func:`exposition`; ``[metrics] listen``
serves the same text on ``/metrics`` (see :mod:`voxgate.metrics_http`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

REGISTRY = CollectorRegistry(auto_describe=True)

SESSIONS_ENDED = Counter(
    "voxgate_sessions_ended", "Sessions ended, by transport and end reason",
    ["transport", "reason"], registry=REGISTRY,
)
SESSION_DURATION = Histogram(
    "voxgate_session_duration_seconds", "Session length from arrival to end",
    ["transport"], registry=REGISTRY,
    buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, float("inf")),
)
QUEUE_WAIT = Histogram(
    "voxgate_queue_wait_seconds", "Time calls waited in the admission queue",
    registry=REGISTRY, buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, float("inf")),
)
PLAYBACK_COMPLETION = Counter(
    "voxgate_playback_completion", "Utterances finished, by transport and by the signal "
    "that ended them (drained, mark, paced, deadman, cleared)",
    ["transport", "signal"], registry=REGISTRY,
)
TIME_TO_FIRST_VOICE = Histogram(
    "voxgate_time_to_first_voice_seconds",
    "From the answer to the agent's first audio played (local agent)",
    registry=REGISTRY, buckets=(0.05, 0.1, 0.25, 0.5, 0.75, 1, 1.5, 2, 3, 5, float("inf")),
)
RESPONSE_LATENCY = Histogram(
    "voxgate_response_latency_seconds",
    "From the end of the caller's speech to the agent's answer queued for playout "
    "(local: VAD stop_ms, recognition, logic and synthesis; stream: the bot's first audio)",
    ["agent"], registry=REGISTRY,
    buckets=(0.25, 0.5, 0.75, 1, 1.25, 1.5, 2, 3, 5, 10, float("inf")),
)
PROVIDER_UP = Gauge(
    "voxgate_provider_up", "1 while a bot provider is healthy or ramping back, 0 when down",
    ["provider"], registry=REGISTRY,
)
PROVIDER_SHARE = Gauge(
    "voxgate_provider_ramp_share", "Share of new sessions a provider may take (1 healthy, "
    "0 down, between while ramping back)", ["provider"], registry=REGISTRY,
)
PROVIDER_SESSIONS = Counter(
    "voxgate_provider_sessions", "Bot sessions by provider and result (ok: the bot hung up; "
    "dropped: the connection was lost; failover: the first choice failed, another served)",
    ["provider", "result"], registry=REGISTRY,
)
PROVIDER_ERRORS = Counter(
    "voxgate_provider_errors", "Provider errors by kind (connect, timeout, rejected, "
    "handshake, tls, early-close, probe)", ["provider", "kind"], registry=REGISTRY,
)
PROVIDER_CONNECT = Histogram(
    "voxgate_provider_connect_seconds", "WebSocket connect and handshake time to a provider",
    ["provider"], registry=REGISTRY,
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 3, float("inf")),
)
BOT_MESSAGES_DROPPED = Counter(
    "voxgate_bot_messages_dropped", "Stream-agent messages dropped, by provider and reason "
    "(from the bot: malformed, rate; to it: send_queue, caller audio the socket could not "
    "take)", ["provider", "reason"], registry=REGISTRY,
)
LOOP_LAG = Histogram(
    "voxgate_loop_lag_seconds", "Event-loop lag measured by the watchdog",
    registry=REGISTRY, buckets=(0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1, float("inf")),
)


@dataclass
class Snapshot:
    """What the live collector reads at scrape time (built by the daemon)."""

    sessions_active: Mapping[tuple[str, str], int] = field(default_factory=dict)
    """(tenant, transport) → active sessions."""
    queue_depth: int = 0
    admissions: Mapping[tuple[str, str, str], int] = field(default_factory=dict)
    """(result, reason, tenant) → decisions."""
    counters: Mapping[str, Mapping[tuple[tuple[str, str], ...], float]] = field(
        default_factory=dict)
    """Further counters: metric name → label pairs → value (media, SIP, drops)."""
    gauges: Mapping[str, float] = field(default_factory=dict)


class LiveCollector(Collector):
    """Turns a :class:`Snapshot` into metric families on each scrape."""

    def __init__(self, snapshot: Callable[[], Snapshot], help_texts: Mapping[str, str]) -> None:
        self._snapshot = snapshot
        self._help = help_texts

    def collect(self) -> Iterator[Metric]:
        snap = self._snapshot()
        active = GaugeMetricFamily("voxgate_sessions_active", "Sessions in progress",
                                   labels=["tenant", "transport"])
        for (tenant, transport), n in sorted(snap.sessions_active.items()):
            active.add_metric([tenant, transport], n)
        yield active
        yield GaugeMetricFamily("voxgate_queue_depth", "Calls waiting for admission",
                                value=snap.queue_depth)
        admissions = CounterMetricFamily("voxgate_admissions", "Admission decisions",
                                         labels=["result", "reason", "tenant"])
        for labels, n in sorted(snap.admissions.items()):
            admissions.add_metric(list(labels), n)
        yield admissions
        for name, series in sorted(snap.counters.items()):
            label_names = [k for k, _ in next(iter(series), ())]
            family = CounterMetricFamily(name, self._help.get(name, name), labels=label_names)
            for pairs, value in sorted(series.items()):
                family.add_metric([v for _, v in pairs], value)
            yield family
        for name, value in sorted(snap.gauges.items()):
            yield GaugeMetricFamily(name, self._help.get(name, name), value=value)


def exposition() -> str:
    """The registry in the Prometheus text format (version 0.0.4)."""
    return generate_latest(REGISTRY).decode()
