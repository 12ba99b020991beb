"""Kamailio's dispatcher, as the example config ships, in front of two real voxgated instances.

The packaged ``kamailio`` runs ``packaging/kamailio/kamailio-dispatcher.cfg``
with only its defines overridden (:mod:`tests.harness.kamailio`). SIPp calls
Kamailio, never voxgate directly. Every phase counts the calls each instance
took (its call records, ``voxgatectl calls``) and asserts that none failed:
round-robin after ``kamcmd dispatcher.reload``, one instance draining (its
503 sends the call on to the other), killed (no answer: the other after the
2 s final-response timer), resumed and restarted (OPTIONS probes bring it
back), full (503 again); then the in-dialog BYE through the Record-Route in
both directions.
"""

from __future__ import annotations

import itertools
import os
import re
import signal
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.harness import requires
from tests.harness.audio import SpeechClip
from tests.harness.daemon import Daemon, PortRange, free_udp_port
from tests.harness.kamailio import Kamailio, dispatcher_uri, running_kamailio
from tests.harness.sipp import Sipp, SippResult
from tests.integration.conftest import StartDaemon
from tests.integration.test_control import ctl_json, ctl_ok, wait_until

pytestmark = requires("sipp", "kamailio", "kamcmd")

ReservePorts = Callable[[int], PortRange]
CALLS_PER_PHASE = 4
PING_INTERVAL_S = 2  # a draining instance stays selectable ≥ 2 s: its 503 is what fails over
STATE_TIMEOUT_S = 20.0  # two good probes plus the interval they wait for, with room
SIPP_TIMEOUT_S = 30.0
MEDIA_PORTS = 40  # two SIPp at a time, each with room for its calls' RTP and RTCP ports
HELD_MEDIA_OFFSET = MEDIA_PORTS // 2
# -trace_msg: a line of dashes and a timestamp, "UDP message received [N] bytes :", the message.
_RECEIVED = re.compile(r"message received \[\d+\] bytes :\s*(.*?)\s*(?=^-{10,}|\Z)",
                       re.MULTILINE | re.DOTALL)


@dataclass
class Cluster:
    """Kamailio in front of named voxgated instances, and a way to call through it."""

    kamailio: Kamailio
    instances: dict[str, Daemon]
    workdir: Path
    media: PortRange
    clip: SpeechClip
    _runs: Iterator[int] = field(default_factory=itertools.count)

    def uri(self, name: str) -> str:
        """The dispatcher-list URI of instance ``name``."""
        return dispatcher_uri(self.instances[name].sip_address)

    def sipp(
        self, scenario: str, calls: int, *extra_args: str,
        target: tuple[str, int] | None = None, media_offset: int = 0,
    ) -> Sipp:
        """SIPp running ``scenario`` (``calls`` one after the other) against Kamailio, or
        ``target``, in a fresh working directory. SIPp runs at the same time need
        different ``media_offset`` (into the media port range)."""
        return Sipp(
            scenario, target or self.kamailio.address,
            workdir=self.workdir / f"sipp{next(self._runs)}", local_port=free_udp_port(),
            media_port=self.media.first + media_offset, clip=self.clip,
            calls=calls, limit=1, rate=10, duration_ms=300, timeout_s=SIPP_TIMEOUT_S,
            extra_args=extra_args,
        )

    def place_calls(self, count: int = CALLS_PER_PHASE) -> dict[str, int]:
        """``count`` echo calls through Kamailio, every one asserted to succeed;
        returns how many each live instance took."""
        live = {name: d for name, d in self.instances.items() if d.alive()}
        before = {name: _call_ids(d) for name, d in live.items()}
        result = self.sipp("uac_echo", count).run()
        self.assert_all_ok(result, count)
        return {name: len(_call_ids(d) - before[name]) for name, d in live.items()}

    def assert_all_ok(self, result: SippResult, count: int) -> None:
        """SIPp saw ``count`` successful calls and no failed one (Kamailio's log on failure)."""
        tail = "\n".join(self.kamailio.log_text().splitlines()[-20:])
        assert result.returncode == 0, f"{result.describe()}\nkamailio:\n{tail}"
        assert result.successful_calls == count, f"{result.describe()}\nkamailio:\n{tail}"
        assert result.failed_calls == 0, f"{result.describe()}\nkamailio:\n{tail}"


def _call_ids(daemon: Daemon) -> set[str]:
    return {record["call_id"] for record in ctl_json(daemon, "calls")}


def _refused(daemon: Daemon, reason: str) -> int:
    rows = ctl_json(daemon, "status")["admission"]["counters"]
    return sum(r["count"] for r in rows if r["result"] == "refused" and r["reason"] == reason)


def _failovers(kamailio: Kamailio, uri: str, what: str) -> int:
    """Kamailio's failure-route log lines for ``uri``: ``what`` is "answered 503" or
    "did not answer"."""
    return kamailio.log_text().count(f"voxgate {uri} {what}")


@pytest.fixture
def cluster(
    start_daemon: StartDaemon, reserve_ports: ReservePorts, clip: SpeechClip, tmp_path: Path
) -> Iterator[Cluster]:
    """Instances ``a`` and ``b`` behind Kamailio, whose list names only ``a`` at start."""
    instances = {"a": start_daemon(), "b": start_daemon()}
    uri_a = dispatcher_uri(instances["a"].sip_address)
    with running_kamailio(tmp_path / "kamailio", [uri_a],
                          ping_interval_s=PING_INTERVAL_S) as kamailio:
        yield Cluster(kamailio, instances, tmp_path, reserve_ports(MEDIA_PORTS), clip)


def test_failover_costs_no_call(cluster: Cluster, start_daemon: StartDaemon) -> None:
    kam, a, b = cluster.kamailio, cluster.instances["a"], cluster.instances["b"]
    uri_a, uri_b = cluster.uri("a"), cluster.uri("b")
    half = CALLS_PER_PHASE // 2

    # kamcmd reaches ctl.so: the second instance is added without a restart.
    assert "successfully reloaded" in kam.reload([uri_a, uri_b])
    assert set(kam.destinations()) == {uri_a, uri_b}

    # Round-robin: the instances take turns.
    assert cluster.place_calls() == {"a": half, "b": half}

    # Drain a: its 503 sends the call on to b at once, before any probe noticed.
    ctl_ok(a, "drain")
    assert cluster.place_calls() == {"a": 0, "b": CALLS_PER_PHASE}
    assert _refused(a, "draining") >= 1, "no call reached the draining instance"
    assert _failovers(kam, uri_a, "answered 503") >= 1, kam.log_text()[-3000:]
    assert kam.destinations()[uri_a].startswith("I"), kam.destinations()

    # Resume a: two 200s to OPTIONS and it takes its turns again.
    ctl_ok(a, "resume")
    kam.wait_state(uri_a, "A", STATE_TIMEOUT_S)
    assert cluster.place_calls() == {"a": half, "b": half}

    # Kill b: no answer within 2 s, the call goes on to a.
    os.kill(b.pid, signal.SIGKILL)
    b.proc.wait(timeout=10)
    assert cluster.place_calls() == {"a": CALLS_PER_PHASE}
    assert _failovers(kam, uri_b, "did not answer") >= 1, kam.log_text()[-3000:]
    assert kam.destinations()[uri_b].startswith("I"), kam.destinations()

    # Restart b on the same SIP port, room for one call: its probes bring it back.
    # (The new Daemon's sip_port is the harness's own pick, unused: the override wins.)
    b_address = b.sip_address
    b = cluster.instances["b"] = start_daemon(
        {"sip": {"listen": f"{b_address[0]}:{b_address[1]}"}, "limits": {"max_sessions": 1}})
    kam.wait_state(uri_b, "A", STATE_TIMEOUT_S)
    assert cluster.place_calls() == {"a": half, "b": half}

    # Fill b with a call of its own: "full" is a 503 too, the calls go on to a.
    failovers = _failovers(kam, uri_b, "answered 503")
    with cluster.sipp("uac_wait_bye", 1, target=b_address,
                      media_offset=HELD_MEDIA_OFFSET) as held:
        session = wait_until(lambda: ctl_json(b, "sessions"), "b's own call")[0]
        assert cluster.place_calls() == {"a": CALLS_PER_PHASE, "b": 0}
        # Either a call met b's 503 "full" and failed over, or b's 503 to an OPTIONS
        # probe had marked it inactive first (a loaded machine): both cost no call.
        refused = _refused(b, "full")
        assert refused >= 1 or kam.destinations()[uri_b].startswith("I"), kam.destinations()
        ctl_ok(b, "hangup", session["id"])
        cluster.assert_all_ok(held.wait(), 1)
    if refused:  # a call met the 503: Kamailio logged the failover
        assert _failovers(kam, uri_b, "answered 503") > failovers, kam.log_text()[-3000:]


def test_in_dialog_bye_goes_through_kamailio_both_ways(cluster: Cluster) -> None:
    kam, instances = cluster.kamailio, cluster.instances
    kam.reload([cluster.uri("a"), cluster.uri("b")])

    # The caller hangs up: its BYE carries Kamailio's Record-Route and reaches
    # voxgate through it (Kamailio answers 404 to an in-dialog request without one).
    took = cluster.place_calls(2)
    assert took == {"a": 1, "b": 1}, took
    wait_until(lambda: all(_ended(d) == ["bye"] for d in instances.values()),
               "the caller's BYE in both records")

    # voxgate hangs up: its BYE follows the route set to Kamailio, which relays it to SIPp.
    messages = cluster.workdir / "wait_bye_messages.log"
    sipp = cluster.sipp("uac_wait_bye", 1, "-trace_msg", "-message_file", str(messages))
    with sipp:
        daemon, session = wait_until(lambda: _one_session(instances), "the call's session")
        ctl_ok(daemon, "hangup", session["id"])
        result = sipp.wait()
    cluster.assert_all_ok(result, 1)
    wait_until(lambda: _ended(daemon) == ["bye", "operator"], "the operator's hangup recorded")
    bye = _received_bye(messages.read_text(errors="replace"))
    vias = re.findall(r"^Via: *SIP/2\.0/UDP ([^;\s]+)", bye, re.MULTILINE | re.IGNORECASE)
    assert vias == [f"127.0.0.1:{kam.port}", f"127.0.0.1:{daemon.sip_port}"], bye
    assert not re.search(r"^Route:", bye, re.MULTILINE | re.IGNORECASE), bye


def _ended(daemon: Daemon) -> list[str | None]:
    """End reasons of ``daemon``'s call records, oldest first (None while a call runs)."""
    records = sorted(ctl_json(daemon, "calls"), key=lambda r: r["started_at"])
    return [r["reason"] for r in records]


def _one_session(instances: dict[str, Daemon]) -> tuple[Daemon, dict[str, Any]] | None:
    for daemon in instances.values():
        sessions = ctl_json(daemon, "sessions")
        if sessions:
            return daemon, sessions[0]
    return None


def _received_bye(trace: str) -> str:
    """The BYE request SIPp logged as received (``-trace_msg``)."""
    for message in _RECEIVED.findall(trace):
        if message.startswith("BYE "):
            return str(message)
    raise AssertionError(f"no BYE received in SIPp's trace:\n{trace[-3000:]}")
