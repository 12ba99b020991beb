"""Prometheus metrics (prometheus-client), one registry for the daemon.

Three kinds of metric live here:

- the process and Python collectors (``process_resident_memory_bytes``,
  ``process_cpu_seconds_total``, ``process_open_fds`` …, ``python_info``,
  ``python_gc_*``) and ``voxgate_build_info``;
- event metrics that code updates when something happens, a handful of times
  per call (session ends, queue waits, durations);
- live metrics (:data:`LIVE_METRICS`) read only when someone scrapes: the
  gauges, the media counters summed from the sessions' own plain-int
  counters, and each listener's counters, turned into series by
  :class:`LiveCollector`, so the 20 ms media path never touches a lock.

Each metric means one thing: its labels split it into parts that add up
(``voxgate_sip_messages_dropped_total{reason}``), never into unrelated
counts. No ``*_created`` series are exported.

``voxgatectl metrics`` prints :func:`exposition`; ``[metrics] listen``
serves the registry on ``/metrics`` (see :mod:`voxgate.metrics_http`).
"""

from __future__ import annotations

import platform
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from voxgate import __version__
from voxgate.end_reasons import END_REASONS
from voxgate.errors import LocalProtocolError
from voxgate.sip.digest import AuthResult
from voxgate.transports.srtp import DROP_REASONS as SRTP_DROP_REASONS

disable_created_metrics()  # type: ignore[no-untyped-call]  # before any metric is made

REGISTRY = CollectorRegistry(auto_describe=True)
ProcessCollector(registry=REGISTRY)
PlatformCollector(registry=REGISTRY)
GCCollector(registry=REGISTRY)

Info("voxgate_build", "The running version of voxgate and of its Python (value 1)",
     registry=REGISTRY).info({"version": __version__, "python": platform.python_version()})

METRICS_HTTP_REFUSED = Counter(
    "voxgate_metrics_http_refused", "/metrics requests refused, by reason (busy: "
    "connection limit; bad-request: a protocol error, oversize head or body)",
    ["reason"], registry=REGISTRY,
)
SESSIONS_ENDED = Counter(
    "voxgate_sessions_ended", "Sessions ended, by transport and end reason",
    ["transport", "reason"], registry=REGISTRY,
)


def precreate_sessions_ended(transports: Sequence[str]) -> None:
    """Put every end reason of each of ``transports`` in ``voxgate_sessions_ended_total``
    at 0, so that ``rate()`` and ``increase()`` see the first call that ends with it
    (a series born at 1 shows no increase)."""
    for transport in transports:
        for reason in END_REASONS:
            SESSIONS_ENDED.labels(transport, reason)


SESSION_DURATION = Histogram(
    "voxgate_session_duration_seconds", "Session length from arrival to end",
    ["transport"], registry=REGISTRY,
    buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, float("inf")),
)
QUEUE_WAIT = Histogram(
    "voxgate_queue_wait_seconds", "Time calls waited in the admission queue",
    registry=REGISTRY, buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, float("inf")),
)
SIP_OUTBOUND_CALLS = Counter(
    "voxgate_sip_outbound_calls",
    "Outbound calls (voxgatectl call) by outcome: answered, busy (486/600/603), rejected "
    "(other 3xx-6xx), unreachable (no final response), ring-timeout, ended (by us before "
    "the answer), refused (admission), failed (not placed)",
    ["outcome"], registry=REGISTRY,
)
AGENT_TRANSFER_FAILURES = Counter(
    "voxgate_agent_transfer_failures", "Transfers that failed and were told to the agent "
    "(the call went on), by transport and reason (bad-target, not-supported, refused, "
    "failed, timeout)",
    ["transport", "reason"], registry=REGISTRY,
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
    "(local: the endpointing silence, recognition, logic and synthesis; "
    "stream: the bot's first audio)",
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
    "take; no_bot, a transfer_failed while no bot was connected)", ["provider", "reason"],
    registry=REGISTRY,
)
LOOP_LAG = Histogram(
    "voxgate_loop_lag_seconds", "Event-loop lag measured by the watchdog",
    registry=REGISTRY, buckets=(0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1, float("inf")),
)
RECOGNIZER_RESTARTS = Counter(
    "voxgate_recognizer_restarts", "Local-agent recogniser worker processes restarted "
    "(died, exceeded [agent] recognizer_timeout_s, or failed to start)", registry=REGISTRY,
)


# --- live metrics: read at scrape time --------------------------------------------------------

@dataclass(frozen=True, slots=True)
class LiveMetric:
    """A metric read at scrape time: its exported name, type, help and label names."""

    name: str
    kind: Literal["counter", "gauge"]
    help: str
    labels: tuple[str, ...] = ()


def _counter(name: str, help_text: str, *labels: str) -> LiveMetric:
    return LiveMetric(name, "counter", help_text, labels)


def _gauge(name: str, help_text: str, *labels: str) -> LiveMetric:
    return LiveMetric(name, "gauge", help_text, labels)


LIVE_METRICS: tuple[LiveMetric, ...] = (
    # capacity and admission
    _gauge("voxgate_max_sessions", "Configured capacity: [limits] max_sessions (follows reloads)"),
    _gauge("voxgate_admission_state", "1 for the admission state in force, 0 for the others: "
           "admitting, draining (whatever else), unhealthy (a component is), full "
           "(max_sessions reached and the queue full, or RSS above the soft watermark)",
           "state"),
    _gauge("voxgate_rss_watermark_bytes", "RSS watermarks: above soft admission closes, above "
           "hard the newest sessions are shed ([budget], follows reloads)", "level"),
    _gauge("voxgate_sessions_active", "Sessions in progress", "tenant", "transport"),
    _gauge("voxgate_queue_depth", "Calls waiting for admission"),
    _counter("voxgate_admission_admitted_total", "Calls admitted, at once (route direct) or "
             "from the queue (route queue)", "tenant", "route"),
    _counter("voxgate_admission_queued_total", "Calls put in the admission queue, by the cap "
             "they waited on (full, tenant-full)", "tenant", "cap"),
    _counter("voxgate_admission_refusals_total", "Calls refused by admission, by reason (full, "
             "tenant-full, unhealthy, draining, memory, queue-timeout)", "tenant", "reason"),
    _counter("voxgate_admission_queue_cancelled_total", "Queued calls the caller cancelled",
             "tenant"),
    _counter("voxgate_watchdog_pings_withheld_total",
             "Watchdog periods in which a check failed and WATCHDOG=1 was not sent"),
    # media, summed over ended and live sessions
    _counter("voxgate_rtp_packets_total", "RTP packets received and sent", "direction"),
    _counter("voxgate_rtp_bytes_total", "RTP bytes received and sent", "direction"),
    _counter("voxgate_media_drops_total", "Audio dropped, by cause (bad packet, late, "
             "duplicate, overflow …)", "reason"),
    _counter("voxgate_budget_drops_total",
             "Audio frames dropped because a session buffer hit its cap", "buffer"),
    _counter("voxgate_session_pauses_total", "Sessions paused because media stopped"),
    _counter("voxgate_session_recoveries_total", "Paused sessions whose media came back"),
    _counter("voxgate_agent_fallbacks_total",
             "Fallback prompts played because the agent did not answer"),
    _counter("voxgate_playback_deadmans_total", "Utterances ended by the playback deadman"),
    _counter("voxgate_rtp_frames_concealed_total", "Inbound frames lost and concealed"),
    _counter("voxgate_rtp_jitter_delay_changes_total", "Jitter buffer delay moved by a frame "
             "(grown: for a late packet; shrunk: given back after a calm spell)", "change"),
    _counter("voxgate_rtcp_ignored_total", "RTCP packets that arrived on an RTP port"),
    _counter("voxgate_srtp_packets_dropped_total", "Inbound packets of SRTP calls dropped "
             "undecoded, by reason (auth: failed authentication, e.g. a wrong key or plain "
             "RTP; replay: an index seen before or too old; malformed)", "reason"),
    _counter("voxgate_dtmf_events_total", "RFC 4733 key presses received"),
    _counter("voxgate_speech_turns_total", "Caller speech starts detected by the VAD"),
    _counter("voxgate_media_clock_frames_skipped_total",
             "20 ms ticks the media clock was too late for"),
    _gauge("voxgate_media_clock_utilisation_ratio",
           "Share of the last second the media clock spent ticking calls"),
    _gauge("voxgate_media_clock_lag_p90_seconds",
           "90th percentile of the media clock's wake-up lag over the last second"),
    _counter("voxgate_playout_frames_skipped_total",
             "Agent frames not sent because the media clock was late for their tick"),
    _counter("voxgate_rtp_ports_exhausted_total", "Calls refused because no RTP port was free"),
    _gauge("voxgate_rtp_ports_free", "RTP ports free in the pool"),
    # SIP listener
    _counter("voxgate_sip_messages_received_total", "SIP datagrams received"),
    _counter("voxgate_sip_bad_messages_total", "SIP messages that could not be parsed or were "
             "invalid (answered 4xx statelessly when possible)"),
    _counter("voxgate_sip_responses_too_large_total", "Requests whose answer would not fit one "
             "UDP datagram: answered 513 Message Too Large"),
    _counter("voxgate_sip_messages_dropped_total", "SIP messages ignored without an answer, by "
             "reason (backlog: event queue full; flood: beyond flood_drop_factor; "
             "stray_response: a response matching no transaction)", "reason"),
    _counter("voxgate_sip_flood_unparsed_drops_total", "Of the flood drops, the INVITE and "
             "OPTIONS dropped before they were parsed"),
    _counter("voxgate_sip_requests_refused_total", "New requests answered 503 because a table "
             "was full (transactions_full, dialogs_full) or their source held its share of the "
             "transaction table (source_share), or 403 because their source is not in "
             "[sip] trusted_cidrs (untrusted_source)", "reason"),
    _counter("voxgate_sip_rate_limited_total", "New requests over their source's token bucket, "
             "answered a stateless 503, by request class (invite, options, other)", "request"),
    _counter("voxgate_sip_retransmissions_absorbed_total", "Retransmitted requests answered by "
             "their transaction, and stray ACKs"),
    _counter("voxgate_sip_retransmissions_sent_total",
             "SIP messages retransmitted by voxgate's transactions"),
    _counter("voxgate_sip_failure_retransmissions_capped_total", "3xx-6xx answers to sources "
             "that do not ACK, sent once instead of retransmitted"),
    _counter("voxgate_sip_send_queue_drops_total",
             "Outbound SIP datagrams dropped because the send queue was full"),
    _counter("voxgate_sip_late_actions_total", "Actions on calls whose SIP state had moved on "
             "(an answer after CANCEL …)"),
    _counter("voxgate_sip_flood_sources_evicted_total",
             "Least recently seen sources forgotten by the flood bucket table"),
    _counter("voxgate_sip_auth_total", "New INVITEs checked against [sip] "
             "auth_credentials_file, by result (ok; the others got 401: missing, bad_header, "
             "unknown_user, wrong_response, stale, replay)", "result"),
    _counter("voxgate_sip_auth_nonces_evicted_total", "Nonces forgotten by the digest "
             "replay table ([sip] auth_replay_table_size)"),
    _gauge("voxgate_sip_registration_state", "1 for each [[sip.registrations]] binding's "
           "state, 0 for the others: unregistered, registering, registered, failed, "
           "unregistering", "registrar", "aor", "state"),
    _counter("voxgate_sip_register_responses_total", "How our REGISTER requests ended, by "
             "result (ok: 2xx; challenge: 401/407, answered once; interval_too_brief: 423; "
             "rejected: another final status; timeout: no final response)", "registrar",
             "aor", "result"),
    _counter("voxgate_sip_transfers_total", "Blind transfers (REFER, RFC 3515) by outcome: "
             "succeeded, failed (REFER refused or timed out, NOTIFY 3xx-6xx), refused (bad "
             "target URI or call not answered: nothing sent), timeout (no final NOTIFY "
             "within [sip] transfer_timeout_s)", "outcome"),
    # ALSA lines
    _counter("voxgate_alsa_sessions_total", "Sessions run on an ALSA line", "line"),
    _counter("voxgate_alsa_open_failures_total", "ALSA devices that could not be opened", "line"),
    _counter("voxgate_alsa_devices_lost_total", "Sessions ended because the device went away",
             "line"),
    _counter("voxgate_alsa_refusals_total", "Line calls refused by admission", "line"),
    _counter("voxgate_alsa_retries_total", "Line restarts after a failure (with backoff)", "line"),
    _counter("voxgate_alsa_xruns_total", "ALSA over- and underruns of ended sessions",
             "line", "direction"),
    # WebSocket media streams
    _counter("voxgate_websocket_streams_total",
             "WebSocket connections accepted as media streams"),
    _counter("voxgate_websocket_handshakes_failed_total", "WebSocket connections that never "
             "became a stream, by reason (busy: too many connections, 503; path: 404; "
             "timeout; bad_request; abandoned: the client went away)", "reason"),
    _counter("voxgate_websocket_streams_refused_total", "Media streams that got no session, by "
             "admission refusal reason or setup_failed", "reason"),
    _counter("voxgate_websocket_bad_messages_total",
             "Media streams closed for a bad message, by close code", "close_code"),
    _counter("voxgate_websocket_media_ignored_total", "Media messages ignored (not_admitted: "
             "the stream has no session yet; outbound_track)", "reason"),
    _counter("voxgate_websocket_streams_dropped_total", "Streams closed without stop: their "
             "session waits for a resumption"),
    _counter("voxgate_websocket_streams_resumed_total",
             "Streams resumed with their recovery token"),
    _counter("voxgate_websocket_resumes_refused_total",
             "Resumptions refused: unknown, used or expired token"),
    _counter("voxgate_websocket_connection_errors_total",
             "WebSocket connections that failed on an internal error"),
    # control socket
    _counter("voxgate_control_connections_total", "Control connections accepted"),
    _counter("voxgate_control_connections_refused_total", "Control connections refused, by "
             "reason (busy, no_credentials, forbidden)", "reason"),
    _counter("voxgate_control_connections_timed_out_total", "Control connections closed for "
             "idleness (idle) or an incomplete request (request)", "timeout"),
    _counter("voxgate_control_internal_errors_total",
             "Control requests whose handler failed (a bug: see the log)"),
)

Series = Mapping[tuple[str, ...], float]
"""One live metric's samples: label values (in its label order) → value."""
LiveValues = Mapping[str, Series]
"""Live metric name → its samples; what the daemon hands :class:`LiveCollector`."""


class LiveCollector(Collector):
    """Turns the daemon's :data:`LiveValues` into :data:`LIVE_METRICS` on each scrape.

    Every live metric is exported, with no samples when it has none yet.
    """

    def __init__(self, values: Callable[[], LiveValues]) -> None:
        self._values = values

    def describe(self) -> Iterator[Metric]:
        """The families without samples (so registering never reads the daemon)."""
        return _families({})

    def collect(self) -> Iterator[Metric]:
        """The families with the daemon's values now.

        Raises:
            LocalProtocolError: a value names no live metric (a bug of the caller).
        """
        values = self._values()
        unknown = set(values) - {m.name for m in LIVE_METRICS}
        if unknown:
            raise LocalProtocolError(f"not live metrics: {', '.join(sorted(unknown))}")
        return _families(values)


def _families(values: LiveValues) -> Iterator[Metric]:
    for metric in LIVE_METRICS:
        make = CounterMetricFamily if metric.kind == "counter" else GaugeMetricFamily
        family = make(metric.name, metric.help, labels=metric.labels)
        for labels, value in sorted(values.get(metric.name, {}).items()):
            family.add_metric(labels, value)
        yield family


# --- the daemon's raw counters → live values ----------------------------------------------

_Route = tuple[str, tuple[str, ...]]
"""Where a raw counter goes: live metric name and label values."""

_MEDIA: Mapping[str, _Route] = {
    "packets_in": ("voxgate_rtp_packets_total", ("in",)),
    "packets_out": ("voxgate_rtp_packets_total", ("out",)),
    "bytes_in": ("voxgate_rtp_bytes_total", ("in",)),
    "bytes_out": ("voxgate_rtp_bytes_total", ("out",)),
    "session_pauses": ("voxgate_session_pauses_total", ()),
    "session_recoveries": ("voxgate_session_recoveries_total", ()),
    "agent_fallbacks": ("voxgate_agent_fallbacks_total", ()),
    "playback_deadmans": ("voxgate_playback_deadmans_total", ()),
    "frames_concealed": ("voxgate_rtp_frames_concealed_total", ()),
    "jitter_grown": ("voxgate_rtp_jitter_delay_changes_total", ("grown",)),
    "jitter_shrunk": ("voxgate_rtp_jitter_delay_changes_total", ("shrunk",)),
    "rtcp_ignored": ("voxgate_rtcp_ignored_total", ()),
    **{f"srtp_drop_{reason}": ("voxgate_srtp_packets_dropped_total", (reason,))
       for reason in SRTP_DROP_REASONS},
    "dtmf_events": ("voxgate_dtmf_events_total", ()),
    "speech_turns": ("voxgate_speech_turns_total", ()),
    "playout_skipped": ("voxgate_playout_frames_skipped_total", ()),
}
_MEDIA_PREFIXES = (("budget_drop_", "voxgate_budget_drops_total"),
                   ("drop_", "voxgate_media_drops_total"))

_SIP: Mapping[str, _Route] = {  # the fields of voxgate.sip.uas.UasStats
    "messages_in": ("voxgate_sip_messages_received_total", ()),
    "bad_messages": ("voxgate_sip_bad_messages_total", ()),
    "responses_too_large": ("voxgate_sip_responses_too_large_total", ()),
    "messages_dropped_backlog": ("voxgate_sip_messages_dropped_total", ("backlog",)),
    "flood_dropped": ("voxgate_sip_messages_dropped_total", ("flood",)),
    "responses_dropped": ("voxgate_sip_messages_dropped_total", ("stray_response",)),
    "flood_dropped_unparsed": ("voxgate_sip_flood_unparsed_drops_total", ()),
    "transactions_refused": ("voxgate_sip_requests_refused_total", ("transactions_full",)),
    "dialogs_refused": ("voxgate_sip_requests_refused_total", ("dialogs_full",)),
    "untrusted_refused": ("voxgate_sip_requests_refused_total", ("untrusted_source",)),
    "transactions_refused_share": ("voxgate_sip_requests_refused_total", ("source_share",)),
    "flood_refused_invite": ("voxgate_sip_rate_limited_total", ("invite",)),
    "flood_refused_options": ("voxgate_sip_rate_limited_total", ("options",)),
    "flood_refused_other": ("voxgate_sip_rate_limited_total", ("other",)),
    "requests_absorbed": ("voxgate_sip_retransmissions_absorbed_total", ()),
    "retransmissions": ("voxgate_sip_retransmissions_sent_total", ()),
    "failure_retransmissions_capped": ("voxgate_sip_failure_retransmissions_capped_total", ()),
    "datagrams_dropped": ("voxgate_sip_send_queue_drops_total", ()),
    "late_actions": ("voxgate_sip_late_actions_total", ()),
    "flood_sources_evicted": ("voxgate_sip_flood_sources_evicted_total", ()),
    **{f"auth_{result.value}": ("voxgate_sip_auth_total", (result.value,))
       for result in AuthResult},
    "auth_nonces_evicted": ("voxgate_sip_auth_nonces_evicted_total", ()),
    **{f"transfers_{outcome}": ("voxgate_sip_transfers_total", (outcome,))
       for outcome in ("succeeded", "failed", "refused", "timeout")},
}

_ALSA: Mapping[str, _Route] = {  # the fields of voxgate.transports.alsa.LineStats
    "sessions": ("voxgate_alsa_sessions_total", ()),
    "open_failures": ("voxgate_alsa_open_failures_total", ()),
    "device_lost": ("voxgate_alsa_devices_lost_total", ()),
    "refusals": ("voxgate_alsa_refusals_total", ()),
    "retries": ("voxgate_alsa_retries_total", ()),
    "xruns_capture": ("voxgate_alsa_xruns_total", ("capture",)),
    "xruns_playback": ("voxgate_alsa_xruns_total", ("playback",)),
}

_WEBSOCKET: Mapping[str, _Route] = {  # WebSocketEndpoint.stats
    "connections": ("voxgate_websocket_streams_total", ()),
    "rejected_busy": ("voxgate_websocket_handshakes_failed_total", ("busy",)),
    "rejected_path": ("voxgate_websocket_handshakes_failed_total", ("path",)),
    "rejected_handshake_timeout": ("voxgate_websocket_handshakes_failed_total", ("timeout",)),
    "rejected_bad_request": ("voxgate_websocket_handshakes_failed_total", ("bad_request",)),
    "handshake_abandoned": ("voxgate_websocket_handshakes_failed_total", ("abandoned",)),
    "setup_failed": ("voxgate_websocket_streams_refused_total", ("setup_failed",)),
    "media_dropped_not_admitted": ("voxgate_websocket_media_ignored_total", ("not_admitted",)),
    "media_ignored_outbound_track": ("voxgate_websocket_media_ignored_total",
                                     ("outbound_track",)),
    "streams_dropped": ("voxgate_websocket_streams_dropped_total", ()),
    "streams_resumed": ("voxgate_websocket_streams_resumed_total", ()),
    "resume_refused": ("voxgate_websocket_resumes_refused_total", ()),
    "connection_errors": ("voxgate_websocket_connection_errors_total", ()),
}
_WEBSOCKET_PREFIXES = (("refused_", "voxgate_websocket_streams_refused_total"),
                       ("bad_message_", "voxgate_websocket_bad_messages_total"))

_CONTROL: Mapping[str, _Route] = {  # the slots of voxgate.control.server.ServerStats
    "accepted": ("voxgate_control_connections_total", ()),
    "refused_busy": ("voxgate_control_connections_refused_total", ("busy",)),
    "refused_no_credentials": ("voxgate_control_connections_refused_total",
                               ("no_credentials",)),
    "forbidden": ("voxgate_control_connections_refused_total", ("forbidden",)),
    "idle_timeouts": ("voxgate_control_connections_timed_out_total", ("idle",)),
    "request_timeouts": ("voxgate_control_connections_timed_out_total", ("request",)),
    "internal_errors": ("voxgate_control_internal_errors_total", ()),
}



def route_counters(counts: Mapping[str, float], routes: Mapping[str, _Route],
                   prefixes: tuple[tuple[str, str], ...] = (),
                   labels: tuple[str, ...] = ()) -> dict[str, dict[tuple[str, ...], float]]:
    """Raw named counters → live values, by ``routes`` (exact names) or ``prefixes``
    (the rest of the name is the last label value); ``labels`` go first in each
    series (the ALSA line).

    Raises:
        LocalProtocolError: a counter has no route (a new counter nobody mapped).
    """
    values: dict[str, dict[tuple[str, ...], float]] = {}
    for key, value in counts.items():
        route = routes.get(key) or next(
            ((name, (key.removeprefix(prefix),)) for prefix, name in prefixes
             if key.startswith(prefix)), None)
        if route is None:
            raise LocalProtocolError(f"counter {key!r} maps to no metric")
        series = values.setdefault(route[0], {})
        series[(*labels, *route[1])] = series.get((*labels, *route[1]), 0) + value
    return values


def media_values(counts: Mapping[str, float]) -> dict[str, dict[tuple[str, ...], float]]:
    """The sessions' summed media counters (``Registry.summed_counters()``) as live values
    (0 before the first session); those not exported (frames, barge-ins …) are left out."""
    exported = dict.fromkeys(_MEDIA, 0.0)
    exported.update((key, value) for key, value in counts.items()
                    if key in _MEDIA or key.startswith(tuple(p for p, _ in _MEDIA_PREFIXES)))
    return route_counters(exported, _MEDIA, _MEDIA_PREFIXES)


def sip_values(stats: Mapping[str, float]) -> dict[str, dict[tuple[str, ...], float]]:
    """The SIP core's ``UasStats`` (as a dict) as live values."""
    return route_counters(stats, _SIP)


def alsa_values(lines: Mapping[str, Mapping[str, float]]
                ) -> dict[str, dict[tuple[str, ...], float]]:
    """Each ALSA line's ``LineStats`` (as a dict), by line name, as live values."""
    values: dict[str, dict[tuple[str, ...], float]] = {}
    for line, stats in lines.items():
        for name, series in route_counters(stats, _ALSA, labels=(line,)).items():
            values.setdefault(name, {}).update(series)
    return values


def websocket_values(stats: Mapping[str, float]) -> dict[str, dict[tuple[str, ...], float]]:
    """The WebSocket endpoint's connection-level counters as live values."""
    return route_counters(stats, _WEBSOCKET, _WEBSOCKET_PREFIXES)


def control_values(stats: Mapping[str, float]) -> dict[str, dict[tuple[str, ...], float]]:
    """The control server's ``ServerStats`` (as a dict) as live values."""
    return route_counters(stats, _CONTROL)


def admission_values(counters: Mapping[tuple[str, str, str], float]
                     ) -> dict[str, dict[tuple[str, ...], float]]:
    """Admission's (result, reason, tenant) decision counters as live values: admitted
    (route direct or queue), queued (by cap), refusals (by reason), cancelled."""
    values: dict[str, dict[tuple[str, ...], float]] = {}
    for (result, reason, tenant), n in counters.items():
        route: _Route
        match result:  # the results of voxgate.admission
            case "admitted" | "dequeued":
                route = ("voxgate_admission_admitted_total",
                         (tenant, "queue" if result == "dequeued" else "direct"))
            case "queued":
                route = ("voxgate_admission_queued_total", (tenant, reason))
            case "refused":
                route = ("voxgate_admission_refusals_total", (tenant, reason))
            case "cancelled":
                route = ("voxgate_admission_queue_cancelled_total", (tenant,))
            case _:
                raise LocalProtocolError(f"admission result {result!r} maps to no metric")
        values.setdefault(route[0], {})[route[1]] = n
    return values


def registration_values(
    states: Sequence[tuple[str, str, str]], counts: Mapping[tuple[str, str, str], float],
    all_states: tuple[str, ...],
) -> dict[str, dict[tuple[str, ...], float]]:
    """Each binding's (registrar, aor, state) as a one-hot over ``all_states``, and the
    REGISTER outcomes by (registrar, aor, result), as live values."""
    gauge: dict[tuple[str, ...], float] = {
        (registrar, aor, state): float(state == current)
        for registrar, aor, current in states for state in all_states}
    outcomes: dict[tuple[str, ...], float] = {key: n for key, n in counts.items()}
    return {"voxgate_sip_registration_state": gauge,
            "voxgate_sip_register_responses_total": outcomes}


def one_hot(states: tuple[str, ...], current: str) -> dict[tuple[str, ...], float]:
    """A state gauge's series: 1 for ``current``, 0 for the other ``states``."""
    return {(state,): float(state == current) for state in states}


def exposition() -> str:
    """The registry in the Prometheus text format (version 0.0.4)."""
    return generate_latest(REGISTRY).decode()
