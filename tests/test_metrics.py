"""The live metrics: every raw counter of the daemon lands in one declared metric."""

from __future__ import annotations

import dataclasses

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from voxgate import admission as adm
from voxgate.control.server import ServerStats
from voxgate.errors import LocalProtocolError
from voxgate.metrics import (
    LIVE_METRICS,
    LiveCollector,
    LiveValues,
    admission_values,
    alsa_values,
    control_values,
    exposition,
    media_values,
    one_hot,
    sip_values,
    websocket_values,
)
from voxgate.sip.uas import UasStats
from voxgate.transports.alsa import LineStats

LABELS = {m.name: m.labels for m in LIVE_METRICS}


def distinct(names: list[str]) -> dict[str, float]:
    """Each name with its own value (1, 2, 3 …), so that every one can be found again."""
    return {name: float(i) for i, name in enumerate(names, start=1)}


def assert_all_routed(counts: dict[str, float], values: LiveValues) -> None:
    """Every count shows up once, in a declared metric, with its label count."""
    seen = sorted(v for series in values.values() for v in series.values())
    assert seen == sorted(counts.values())
    for name, series in values.items():
        assert all(len(labels) == len(LABELS[name]) for labels in series), name


def test_every_sip_counter_is_exported():
    counts = distinct([f.name for f in dataclasses.fields(UasStats)])
    values = sip_values(counts)
    assert_all_routed(counts, values)
    assert values["voxgate_sip_messages_dropped_total"].keys() == {
        ("backlog",), ("flood",), ("stray_response",)}


def test_every_control_counter_is_exported():
    assert_all_routed(distinct(list(ServerStats.__slots__)),
                      control_values(distinct(list(ServerStats.__slots__))))


def test_every_alsa_line_counter_is_exported_per_line():
    fields = [f.name for f in dataclasses.fields(LineStats)]
    values = alsa_values({"kitchen": distinct(fields), "hall": distinct(fields)})
    assert values["voxgate_alsa_xruns_total"].keys() == {
        ("kitchen", "capture"), ("kitchen", "playback"), ("hall", "capture"),
        ("hall", "playback")}
    assert_all_routed(distinct(fields), {
        name: {k: v for k, v in series.items() if k[0] == "hall"}
        for name, series in values.items()})


def test_websocket_counters_with_a_reason_or_close_code_in_their_name():
    counts = distinct(["connections", "rejected_path", "refused_full", "refused_draining",
                       "setup_failed", "bad_message_1008", "media_dropped_not_admitted"])
    values = websocket_values(counts)
    assert_all_routed(counts, values)
    assert values["voxgate_websocket_streams_refused_total"] == {
        ("full",): 3, ("draining",): 4, ("setup_failed",): 5}
    assert values["voxgate_websocket_bad_messages_total"] == {("1008",): 6}


def test_a_counter_nobody_mapped_is_an_error_not_a_silent_gap():
    with pytest.raises(LocalProtocolError, match="'new_counter'"):
        websocket_values({"new_counter": 1})


def test_media_counters_start_at_zero_and_skip_the_unexported():
    values = media_values({"packets_in": 5, "drop_late": 2, "budget_drop_jitter": 1,
                           "frames_partial": 9})
    assert values["voxgate_rtp_packets_total"] == {("in",): 5, ("out",): 0}
    assert values["voxgate_media_drops_total"] == {("late",): 2}
    assert values["voxgate_budget_drops_total"] == {("jitter",): 1}
    assert 9 not in {v for series in values.values() for v in series.values()}


def test_jitter_delay_changes_are_one_counter_by_change():
    values = media_values({"jitter_grown": 3, "jitter_shrunk": 2})
    assert values["voxgate_rtp_jitter_delay_changes_total"] == {("grown",): 3, ("shrunk",): 2}


def test_admission_decisions_split_into_admitted_queued_refused_cancelled():
    admission = adm.Admission(adm.AdmissionLimits(max_sessions=1, queue_size=1,
                                                  queue_timeout_s=1.0))
    call = adm.CallInfo(ruri_user=None, ruri_host=None, headers={}, source_ip=None)
    for ticket in ("a", "b", "c"):  # admitted, queued, refused (queue full)
        admission.request(ticket, call, 0.0)
    admission.release("a", 0.5)  # b is dequeued
    admission.request("d", call, 0.5)
    admission.cancel("d", 0.6)
    values = admission_values(admission.counters)
    assert values == {
        "voxgate_admission_admitted_total": {("default", "direct"): 1, ("default", "queue"): 1},
        "voxgate_admission_queued_total": {("default", "full"): 2},
        "voxgate_admission_refusals_total": {("default", "full"): 1},
        "voxgate_admission_queue_cancelled_total": {("default",): 1},
    }


def test_collector_exports_every_live_metric_and_one_hot_state():
    registry = CollectorRegistry()
    registry.register(LiveCollector(lambda: {
        "voxgate_admission_state": one_hot(adm.ADMISSION_STATES, "draining"),
        "voxgate_max_sessions": {(): 7},
    }))
    families = {f.name: f for f in text_string_to_metric_families(
        generate_latest(registry).decode())}
    assert set(families) == {m.name.removesuffix("_total") for m in LIVE_METRICS}
    state = {s.labels["state"]: s.value for s in families["voxgate_admission_state"].samples}
    assert state == {"admitting": 0, "draining": 1, "full": 0, "unhealthy": 0}
    assert families["voxgate_max_sessions"].samples[0].value == 7


def test_collector_refuses_an_undeclared_metric():
    collector = LiveCollector(lambda: {"voxgate_nonsense": {(): 1}})
    with pytest.raises(LocalProtocolError, match="voxgate_nonsense"):
        list(collector.collect())


def test_exposition_has_process_build_info_and_no_created_series():
    text = exposition()
    assert "\nprocess_resident_memory_bytes " in text
    assert "\nprocess_cpu_seconds_total " in text
    assert '\nvoxgate_build_info{python="' in text
    assert "_created" not in text
