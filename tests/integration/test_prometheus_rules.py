"""The shipped Prometheus rules and Grafana dashboard, against promtool and a real daemon.

``packaging/prometheus/voxgate-rules.yml`` must pass ``promtool check rules``
and its unit tests (``voxgate-rules.test.yml``, ``promtool test rules``), with
every alert tested both firing and quiet. Every query of
``packaging/grafana/voxgate-dashboard.json`` must be valid PromQL. And every
metric name that a rule or a dashboard query names must be one a running
voxgated exports: a daemon with ``max_sessions = 1`` and a (never contacted)
stream provider takes a SIPp call and, drained, refuses one; its ``/metrics``
is scraped during and after. A name counts as exported when it is a series in a scrape or follows
from a declared family (``# TYPE``) whose series appear only after an event
(a labelled histogram with no observation yet): counters as ``NAME_total``,
histograms as ``NAME_bucket``/``_sum``/``_count``. The label names a selector
matches on must also be labels of that metric's series, where it has any.
Each scrape, held steady as promtool input series, then makes exactly the
expected alert conditions true: at capacity during the call, draining after.

promtool comes from Debian's ``prometheus`` package.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.harness import requires
from tests.harness.audio import SpeechClip
from tests.harness.daemon import (
    REPO_ROOT,
    Daemon,
    PortRange,
    free_tcp_port,
    free_udp_port,
    invite_request,
    status_code,
)
from tests.harness.sipp import Sipp
from tests.integration.conftest import StartDaemon
from tests.integration.test_control import ctl_ok, wait_until

ReservePorts = Callable[[int], PortRange]
PROMETHEUS_DIR = REPO_ROOT / "packaging" / "prometheus"
RULES = PROMETHEUS_DIR / "voxgate-rules.yml"
RULE_TESTS = PROMETHEUS_DIR / "voxgate-rules.test.yml"
DASHBOARD = REPO_ROOT / "packaging" / "grafana" / "voxgate-dashboard.json"
PROMTOOL_TIMEOUT_S = 60.0
SCRAPE_TIMEOUT_S = 5.0
GRID_COLUMNS = 24

TARGET = {"job": "voxgate", "instance": "vg1:9464"}
"""The target labels the scrapes are given as promtool input series."""
PROMETHEUS_SERIES = {"up"}
"""Series Prometheus writes itself for each target (not in the daemon's scrape)."""
TARGET_LABELS = {"job", "instance"}
"""Labels Prometheus attaches to every scraped series."""
SERIES_SUFFIXES = {
    "counter": ("_total",),
    "histogram": ("_bucket", "_sum", "_count"),
    "summary": ("", "_sum", "_count"),
    "gaugehistogram": ("_bucket", "_gsum", "_gcount"),
    "info": ("_info",),
}
"""Series names a declared family of each type has (others: its own name)."""

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_VARIABLE = re.compile(r"\$\{[^}]*\}|\$\w+")
_SELECTOR = re.compile(r"(?<![\w:])([A-Za-z_:][\w:]*)\s*\{([^}]*)\}")
_MATCHER_LABEL = re.compile(r"([A-Za-z_]\w*)\s*(?:=~|!~|!=|=)")
_STRIPPED = (
    re.compile(r"\{[^}]*\}"),  # label matchers
    re.compile(r"\[[^\]]*\]"),  # ranges and subqueries
    re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", re.I),
    re.compile(r"\boffset\s+-?\w+", re.I),
)
_IDENTIFIER = re.compile(r"(?<![\w:.])([A-Za-z_:][\w:]*)(?![\w:]|\s*\()")
_KEYWORDS = {"and", "or", "unless", "bool", "atan2", "inf", "nan"}
_LABEL_VALUES = re.compile(r"^\s*label_values\((?P<expr>.+),\s*\w+\s*\)\s*$", re.S)
_GRAFANA_INTERVALS = ("$__rate_interval", "$__interval", "$__range")


# --- reading PromQL out of the rules and the dashboard -------------------------------------

def _without_strings(expr: str) -> str:
    return _STRING.sub('""', _VARIABLE.sub("", expr))


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (functions, keywords, label
    names, durations and Grafana variables left out)."""
    text = _without_strings(expr)
    for pattern in _STRIPPED:
        text = pattern.sub(" ", text)
    return {name for name in _IDENTIFIER.findall(text) if name.lower() not in _KEYWORDS}


def selector_labels(expr: str) -> list[tuple[str, set[str]]]:
    """(metric name, label names its matchers test) for each ``name{…}`` selector."""
    return [(name, set(_MATCHER_LABEL.findall(matchers)))
            for name, matchers in _SELECTOR.findall(_without_strings(expr))]


def load_yaml(path: Path) -> Any:
    with path.open() as f:
        return yaml.safe_load(f)


def rules() -> list[dict[str, Any]]:
    """Every rule of the rules file, all groups."""
    return [rule for group in load_yaml(RULES)["groups"] for rule in group["rules"]]


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))  # a collapsed row holds its panels


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def dashboard_queries() -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target and every query variable."""
    board = dashboard()
    queries = [(f"panel {panel['title']!r} {target['refId']}", target["expr"])
               for panel in _panels(board["panels"]) for target in panel.get("targets", [])]
    for variable in board["templating"]["list"]:
        if variable["type"] != "query":
            continue
        query = variable["query"]
        query = query["query"] if isinstance(query, dict) else query
        match = _LABEL_VALUES.match(query)
        queries.append((f"variable {variable['name']}", match["expr"] if match else query))
    return queries


def all_queries() -> list[tuple[str, str]]:
    """Every rule expression and every dashboard query, each with where it is."""
    return [(f"rule {rule.get('alert') or rule['record']}", rule["expr"]) for rule in rules()] \
        + dashboard_queries()


def test_metric_names_are_read_out_of_promql() -> None:
    expr = ('histogram_quantile(0.95, sum by (job, le) (rate(a_seconds_bucket{job=~"$job", '
            'reason!="x y"}[$__rate_interval]))) > 2 and on (instance) b_total offset 5m '
            "or c / ignoring(state) group_left(level) d{level=\"soft\"} > bool 1e3")
    assert metric_names(expr) == {"a_seconds_bucket", "b_total", "c", "d"}
    assert metric_names("max by (instance) (up) == 0 unless vector(1)") == {"up"}
    assert selector_labels(expr) == [("a_seconds_bucket", {"job", "reason"}),
                                     ("d", {"level"})]


# --- promtool ---------------------------------------------------------------------------------

def promtool(*args: str, cwd: Path = PROMETHEUS_DIR) -> subprocess.CompletedProcess[str]:
    promtool_path = shutil.which("promtool")
    assert promtool_path is not None
    return subprocess.run([promtool_path, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=PROMTOOL_TIMEOUT_S, check=False)


@requires("promtool")
def test_promtool_checks_the_rules() -> None:
    done = promtool("check", "rules", str(RULES))
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(rules())} rules found" in done.stdout, done.stdout


@requires("promtool")
def test_the_rules_unit_tests_pass() -> None:
    done = promtool("test", "rules", RULE_TESTS.name)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout, done.stdout


def test_every_alert_is_tested_firing_and_quiet() -> None:
    cases = [case for test in load_yaml(RULE_TESTS)["tests"]
             for case in test.get("alert_rule_test", [])]
    alerts = [rule["alert"] for rule in rules() if "alert" in rule]
    assert len(alerts) >= 9, alerts
    firing = {case["alertname"] for case in cases if case.get("exp_alerts")}
    quiet = {case["alertname"] for case in cases if not case.get("exp_alerts")}
    assert set(alerts) <= firing, f"never tested firing: {sorted(set(alerts) - firing)}"
    assert set(alerts) <= quiet, f"never tested quiet: {sorted(set(alerts) - quiet)}"


def test_every_alert_says_how_bad_and_what_happened() -> None:
    for rule in rules():
        if "alert" in rule:
            assert rule["labels"]["severity"] in {"critical", "warning", "info"}, rule["alert"]
            assert {"summary", "description"} <= set(rule["annotations"]), rule["alert"]


@requires("promtool")
def test_every_dashboard_query_is_valid_promql(tmp_path: Path) -> None:
    """The queries, with Grafana's variables filled in, as recording rules for promtool."""
    records = []
    for n, (_, query) in enumerate(dashboard_queries()):
        for interval in _GRAFANA_INTERVALS:
            query = query.replace(interval, "5m")
        records.append({"record": f"dashboard:query_{n}", "expr": _VARIABLE.sub(".*", query)})
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": records}]}))
    done = promtool("check", "rules", str(path), cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_dashboard_layout_is_sound() -> None:
    """Unique panel ids, panels inside the 24-column grid and not overlapping, every
    query on the dashboard's data source variable."""
    board = dashboard()
    panels = list(_panels(board["panels"]))
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), ids
    cells: dict[tuple[int, int], str] = {}
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= GRID_COLUMNS, panel["title"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, f"{panel['title']!r} overlaps {cells[(x, y)]!r}"
                cells[x, y] = panel["title"]
        if panel["type"] != "row":
            assert panel["targets"], panel["title"]
        for target in panel.get("targets", []):
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]
    assert "datasource" in {v["name"] for v in board["templating"]["list"]}


# --- against a real daemon --------------------------------------------------------------------

def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics",
                                timeout=SCRAPE_TIMEOUT_S) as response:
        text: str = response.read().decode()
        return text


class Exported:
    """What scrapes showed: series (name → label names seen) and declared families."""

    def __init__(self) -> None:
        self.series: dict[str, set[str]] = {}
        self.declared: set[str] = set()

    def add(self, exposition: str) -> None:
        for family in text_string_to_metric_families(exposition):
            suffixes = SERIES_SUFFIXES.get(family.type, ("",))
            self.declared.update(family.name + suffix for suffix in suffixes)
            for sample in family.samples:
                self.series.setdefault(sample.name, set()).update(sample.labels)


def sample_value(exposition: str, name: str, **labels: str) -> float | None:
    """The value of the series ``name{labels}`` in ``exposition``, if there."""
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return sample.value
    return None


def scrape_in_state(port: int, state: str) -> str:
    """A scrape of ``port`` if it shows admission state ``state``, else ""."""
    text = scrape(port)
    return text if sample_value(text, "voxgate_admission_state", state=state) == 1 else ""


def _series(name: str, labels: dict[str, str]) -> str:
    return name + "{" + ", ".join(f"{k}={json.dumps(v)}" for k, v in sorted(labels.items())) + "}"


def check_alert_conditions(exposition: str, firing: dict[str, str], tmp_path: Path) -> None:
    """Every alert's expression, over the scrape held steady for 20 minutes, returns
    the one series (value 1) that ``firing`` maps it to, and nothing for the others."""
    series = [{"series": _series("up", TARGET), "values": "1x20"}]
    for family in text_string_to_metric_families(exposition):
        series += [{"series": _series(sample.name, {**sample.labels, **TARGET}),
                    "values": f"{sample.value!r}x20"} for sample in family.samples]
    alerts = {rule["alert"]: rule["expr"] for rule in rules() if "alert" in rule}
    assert set(firing) <= set(alerts), firing
    cases = [{"expr": expr, "eval_time": "10m",
              "exp_samples": [{"labels": firing[alert], "value": 1}] if alert in firing else []}
             for alert, expr in alerts.items()]
    path = tmp_path / "daemon-series.test.yml"
    path.write_text(yaml.safe_dump({"evaluation_interval": "1m", "tests": [
        {"interval": "1m", "input_series": series, "promql_expr_test": cases}]}))
    done = promtool("test", "rules", path.name, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr


@requires("sipp", "promtool")
def test_every_queried_metric_is_exported_by_a_running_daemon(
    start_daemon: StartDaemon, reserve_ports: ReservePorts, clip: SpeechClip, tmp_path: Path
) -> None:
    port = free_tcp_port()
    daemon: Daemon = start_daemon({
        "limits": {"max_sessions": 1},
        "metrics": {"listen": f"127.0.0.1:{port}"},
        # A provider makes the voxgate_provider_* series exist; the echo agent never
        # connects to it, so it stays healthy.
        "agent.providers": [{"name": "bot-a", "url": f"ws://127.0.0.1:{free_tcp_port()}/ws"}],
    }, rtp_ports=20)
    exported = Exported()
    media = reserve_ports(4)
    sipp = Sipp("uac_echo", daemon.sip_address, workdir=tmp_path / "sipp",
                local_port=free_udp_port(), media_port=media.first, clip=clip,
                duration_ms=round(clip.duration_s * 1000) + 1500, timeout_s=40.0)
    with sipp:
        during = wait_until(lambda: scrape_in_state(port, "full"), "the call taking the slot",
                            20.0)
        exported.add(during)
        result = sipp.wait()
    assert result.returncode == 0 and result.successful_calls == 1, result.describe()
    check_alert_conditions(during, {"VoxgateAtCapacity": _series("", TARGET)}, tmp_path)

    ctl_ok(daemon, "drain")
    source = free_udp_port()
    answers = daemon.exchange(invite_request(daemon.sip_port, source, "rules-drained-1",
                                             media.first), source_port=source, until_final=True)
    assert answers and status_code(answers[-1]) == 503, answers
    after = scrape(port)
    exported.add(after)
    for state, value in (("draining", 1), ("admitting", 0), ("full", 0), ("unhealthy", 0)):
        assert sample_value(after, "voxgate_admission_state", state=state) == value
    check_alert_conditions(after, {
        "VoxgateDrainingTooLong": _series("voxgate_admission_state",
                                          {**TARGET, "state": "draining"}),
    }, tmp_path)

    missing, bad_labels = [], []
    for where, query in all_queries():
        for name in sorted(metric_names(query) - PROMETHEUS_SERIES):
            if name not in exported.series and name not in exported.declared:
                missing.append(f"{where}: {name}")
        for name, labels in selector_labels(query):
            seen = exported.series.get(name)
            unknown = labels - TARGET_LABELS - (seen or set())
            if seen is not None and unknown:
                bad_labels.append(f"{where}: {name} has no label {', '.join(sorted(unknown))}")
    assert not missing, "metrics not exported:\n" + "\n".join(missing)
    assert not bad_labels, "\n".join(bad_labels)
    assert daemon.terminate() == 0

