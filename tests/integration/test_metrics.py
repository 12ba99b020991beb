"""``GET /metrics`` of the real daemon: promtool's lint after a call, HTTP behaviour,
and the capacity and admission gauges through a drain and reloads."""

from __future__ import annotations

import contextlib
import gzip
import http.client
import subprocess
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path

from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families

from tests.harness import requires
from tests.harness.audio import SpeechClip
from tests.harness.daemon import Daemon, PortRange, free_tcp_port, free_udp_port, render_toml
from tests.harness.sipp import Sipp
from tests.integration.conftest import StartDaemon
from tests.integration.test_control import ctl_ok, wait_until
from voxgate.metrics_http import MAX_CONNECTIONS

HTTP_TIMEOUT_S = 10.0
Labels = Mapping[str, str]


def metrics_daemon(start_daemon: StartDaemon, **sections: Mapping[str, object]) -> tuple[
        Daemon, int]:
    """A daemon serving ``/metrics`` on a free loopback port: (daemon, port)."""
    port = free_tcp_port()
    overrides = {"metrics": {"listen": f"127.0.0.1:{port}"}, **sections}
    return start_daemon(overrides), port


def request(port: int, method: str = "GET", path: str = "/metrics",
            headers: Mapping[str, str] | None = None
            ) -> tuple[http.client.HTTPResponse, bytes]:
    """One request on a new connection: the response and its body."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=HTTP_TIMEOUT_S)
    with contextlib.closing(conn):
        conn.request(method, path, headers=dict(headers or {}))
        response = conn.getresponse()
        return response, response.read()


def scrape(port: int) -> str:
    response, body = request(port)
    assert response.status == 200, (response.status, body)
    return body.decode()


def value(text: str, name: str, **labels: str) -> float | None:
    """The sample ``name{labels}`` (labels exactly) of a text-format scrape; None if absent."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    return None


def states(text: str) -> dict[str, float]:
    """``voxgate_admission_state`` by state."""
    return {s.labels["state"]: s.value for f in text_string_to_metric_families(text)
            if f.name == "voxgate_admission_state" for s in f.samples}


@requires("sipp", "promtool")
def test_promtool_accepts_a_scrape_after_a_call(
    start_daemon: StartDaemon, reserve_ports: Callable[[int], PortRange], clip: SpeechClip,
    tmp_path: Path,
) -> None:
    daemon, port = metrics_daemon(start_daemon)
    media = reserve_ports(4)
    before = scrape(port)  # every end reason is there at 0 before any call ends
    assert value(before, "voxgate_sessions_ended_total", transport="sip", reason="bye") == 0
    assert value(before, "voxgate_sessions_ended_total", transport="sip", reason="budget") == 0
    assert value(before, "voxgate_sessions_ended_total", transport="websocket",
                 reason="bye") is None  # no [websocket] listen: no series
    sipp = Sipp("uac_echo", daemon.sip_address, workdir=tmp_path / "sipp",
                local_port=free_udp_port(), media_port=media.first, clip=clip,
                duration_ms=1500, timeout_s=40.0)
    result = sipp.run()
    assert result.returncode == 0 and result.successful_calls == 1, result.describe()
    daemon.wait_log(r"event=call_end\b")

    text = scrape(port)
    lint = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True,
                          text=True, timeout=60, check=False)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    assert not (lint.stdout + lint.stderr).strip(), lint.stdout + lint.stderr

    assert "_created" not in text
    assert value(text, "voxgate_sessions_ended_total", transport="sip", reason="bye") == 1
    assert value(text, "voxgate_admission_admitted_total", tenant="default",
                 route="direct") == 1
    assert (value(text, "voxgate_rtp_packets_total", direction="in") or 0) > 0
    assert (value(text, "voxgate_sip_messages_received_total") or 0) >= 3  # INVITE ACK BYE
    assert (value(text, "process_resident_memory_bytes") or 0) > 0
    assert (value(text, "process_open_fds") or 0) > 0
    assert value(text, "voxgate_watchdog_pings_withheld_total") == 0
    builds = [f for f in text_string_to_metric_families(text) if f.name == "voxgate_build_info"]
    assert len(builds) == 1 and len(builds[0].samples) == 1, builds
    assert builds[0].samples[0].value == 1
    assert set(builds[0].samples[0].labels) == {"version", "python"}


def test_http_head_keepalive_gzip_openmetrics_and_errors(start_daemon: StartDaemon) -> None:
    _, port = metrics_daemon(start_daemon)

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=HTTP_TIMEOUT_S)
    with contextlib.closing(conn):
        conn.request("GET", "/metrics")
        got = conn.getresponse()
        plain = got.read()
        assert got.status == 200 and not got.will_close
        assert got.getheader("content-type") == "text/plain; version=0.0.4; charset=utf-8"
        assert got.getheader("content-encoding") is None
        first = conn.sock
        assert first is not None
        local = first.getsockname()
        conn.request("HEAD", "/metrics?ignored=1")  # the same connection, kept alive
        head = conn.getresponse()
        assert head.read() == b"" and head.status == 200 and not head.will_close
        assert conn.sock is first and first.getsockname() == local
        assert head.getheader("content-type") == got.getheader("content-type")
        assert int(head.getheader("content-length") or 0) > len(plain) // 2

    zipped, body = request(port, headers={"Accept-Encoding": "gzip, deflate"})
    assert zipped.getheader("content-encoding") == "gzip"
    assert "voxgate_build_info{" in gzip.decompress(body).decode()

    om, body = request(port, headers={
        "Accept": "application/openmetrics-text; version=1.0.0; charset=utf-8, "
                  "text/plain; version=0.0.4; q=0.5"})
    assert (om.getheader("content-type") or "").startswith("application/openmetrics-text")
    assert body.endswith(b"# EOF\n")
    parsed = openmetrics_families(body.decode())  # type: ignore[no-untyped-call]
    types = {f.name: f.type for f in parsed}
    assert types["voxgate_build"] == "info"
    assert types["voxgate_admission_state"] == "gauge"

    missing, _ = request(port, path="/other")
    assert missing.status == 404
    post, _ = request(port, method="POST")
    assert post.status == 405 and post.getheader("allow") == "GET, HEAD"
    huge, _ = request(port, headers={"X-Filler": "x" * 40_000})
    assert huge.status == 431
    _, scrape = request(port)
    assert 'voxgate_metrics_http_refused_total{reason="bad-request"} 1.0' in scrape.decode()


def test_connections_are_bounded_and_freed(start_daemon: StartDaemon) -> None:
    _, port = metrics_daemon(start_daemon)
    with contextlib.ExitStack() as stack:
        held = []
        for _ in range(MAX_CONNECTIONS):  # each served once, then idle and kept alive
            conn = stack.enter_context(contextlib.closing(
                http.client.HTTPConnection("127.0.0.1", port, timeout=HTTP_TIMEOUT_S)))
            conn.request("GET", "/metrics")
            response = conn.getresponse()
            response.read()
            assert response.status == 200
            held.append(conn)
        busy, _ = request(port)
        assert busy.status == 503 and busy.will_close
        held[0].close()

        scrapes: list[str] = []

        def served() -> bool:
            # a slot frees once the server has seen the client's close; until then 503
            response, body = request(port)
            scrapes.append(body.decode())
            return response.status == 200
        wait_until(served, "a connection slot freed by the client's close")
        busy_line = 'voxgate_metrics_http_refused_total{reason="busy"} '
        (refused,) = [line for line in scrapes[-1].splitlines() if line.startswith(busy_line)]
        assert float(refused.removeprefix(busy_line)) >= 1


def test_capacity_and_admission_gauges_follow_drain_and_reload(
    start_daemon: StartDaemon,
) -> None:
    budget = {"rss_soft_bytes": 900_000_000, "rss_hard_bytes": 1_000_000_000}
    daemon, port = metrics_daemon(start_daemon, limits={"max_sessions": 5}, budget=budget)
    text = scrape(port)
    assert value(text, "voxgate_max_sessions") == 5
    assert states(text) == {"admitting": 1, "draining": 0, "full": 0, "unhealthy": 0}
    assert value(text, "voxgate_rss_watermark_bytes", level="soft") == 900_000_000
    assert value(text, "voxgate_rss_watermark_bytes", level="hard") == 1_000_000_000

    ctl_ok(daemon, "drain")
    assert states(scrape(port)) == {"admitting": 0, "draining": 1, "full": 0, "unhealthy": 0}
    ctl_ok(daemon, "resume")
    assert states(scrape(port))["admitting"] == 1

    # Watermarks below the daemon's own RSS: the memory gate closes, the state is "full".
    reload(daemon, limits={"max_sessions": 7},
           budget={"rss_soft_bytes": 1_000_000, "rss_hard_bytes": 2_000_000})
    text = scrape(port)
    assert value(text, "voxgate_max_sessions") == 7
    assert value(text, "voxgate_rss_watermark_bytes", level="soft") == 1_000_000
    assert value(text, "voxgate_rss_watermark_bytes", level="hard") == 2_000_000
    wait_until(lambda: states(scrape(port))["full"] == 1, "admission state full")
    assert sum(states(scrape(port)).values()) == 1

    reload(daemon, budget=budget)
    wait_until(lambda: states(scrape(port))["admitting"] == 1, "admission state admitting")


def reload(daemon: Daemon, **sections: Mapping[str, int]) -> None:
    """Update sections of the daemon's config file and ``voxgatectl reload``."""
    config = tomllib.loads(daemon.config_path.read_text())
    for section, keys in sections.items():
        config[section] = {**config.get(section, {}), **keys}
    daemon.config_path.write_text(render_toml(config))
    assert ctl_ok(daemon, "reload").strip() == "config reloaded"
