"""Outbound calls (``voxgatectl call``) from the real daemon to SIPp callees.

voxgated (echo agent) calls a SIPp UAS: the call is admitted like any other,
rings, is answered, RTP flows both ways and our BYE ends it, the record says
``outbound``; the callee's BYE ends it as well; a second call while the only
slot is taken is refused; a busy callee (486) ends the call with
``callee-busy``; a callee that challenges with 401 is answered with
``[sip] outbound_credentials_file``; a callee that only rings is cancelled at
``[sip] outbound_ring_timeout_s`` (reason ``ring-timeout``); a draining daemon
refuses to call.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.harness import missing_tools, requires
from tests.harness.audio import SpeechClip
from tests.harness.baresip import assert_echoed, finish_call, start_callee
from tests.harness.daemon import Daemon, PortRange, free_udp_port
from tests.harness.sipp import Sipp
from tests.integration.conftest import StartDaemon
from tests.integration.test_control import control_socket, ctl_json, voxgatectl, wait_until

pytestmark = requires("sipp")

RUN_S = 20


def callee(tmp_path: Path, daemon: Daemon, scenario: str, media_port: int,
           clip: SpeechClip | None = None, duration_ms: int = 1000) -> tuple[Sipp, int]:
    """A SIPp UAS playing ``scenario`` on a free port; returns it and its port."""
    port = free_udp_port()
    sipp = Sipp(scenario, ("127.0.0.1", daemon.sip_address[1]), workdir=tmp_path / scenario,
                local_port=port, media_port=media_port, clip=clip, timeout_s=RUN_S,
                duration_ms=duration_ms)
    sipp.start()
    return sipp, port


def call(daemon: Daemon, port: int, *options: str, user: str = "callee") -> str:
    """``voxgatectl call`` to ``user`` on ``port``; its printed session id."""
    done = voxgatectl(control_socket(daemon), "call", f"sip:{user}@127.0.0.1:{port}", *options)
    assert done.returncode == 0, done.stderr
    sid = done.stdout.strip()
    assert len(sid) == 12, done.stdout
    return sid


def ended_record(daemon: Daemon, sid: str) -> dict[str, Any]:
    """The call record of session ``sid`` once the call has ended."""
    def ended() -> dict[str, Any] | None:
        shown = ctl_json(daemon, "show", sid)
        record: dict[str, Any] | None = shown.get("record")
        return record if record and record.get("state") == "ended" else None
    result: dict[str, Any] = wait_until(ended, f"session {sid} ended", timeout_s=RUN_S)
    return result


def test_outbound_call_answered_media_both_ways_our_bye(
    start_daemon: StartDaemon, reserve_ports: Callable[[int], PortRange], tmp_path: Path,
    clip: SpeechClip,
) -> None:
    daemon = start_daemon({"limits": {"max_sessions": 1}})
    media = reserve_ports(4)
    sipp, port = callee(tmp_path, daemon, "uas_outbound_answer.xml", media.first, clip)
    sid = call(daemon, port)
    wait_until(lambda: ctl_json(daemon, "show", sid).get("state") == "active",
               "the callee answered", timeout_s=RUN_S)
    daemon.wait_log(r"event=sip_outbound_answered\b", timeout_s=5)
    wait_until(lambda: ctl_json(daemon, "show", sid)["stats"]["packets_in"] > 50,
               "RTP from the callee", timeout_s=RUN_S)

    refused = voxgatectl(control_socket(daemon), "call", f"sip:other@127.0.0.1:{port}")
    assert refused.returncode == 1 and "call refused" in refused.stderr, refused

    assert voxgatectl(control_socket(daemon), "hangup", sid).returncode == 0
    record = ended_record(daemon, sid)
    assert record["direction"] == "outbound", record
    assert record["reason"] == "operator", record
    assert record["answered_at"] is not None, record
    assert record["packets_in"] > 50 and record["packets_out"] > 50, record
    assert record["to_uri"] == f"sip:callee@127.0.0.1:{port}", record
    result = sipp.wait()
    assert result.successful_calls == 1, result.describe()
    metrics = ctl_json(daemon, "metrics")["text"]
    assert 'voxgate_sip_outbound_calls_total{outcome="answered"} 1.0' in metrics
    assert 'voxgate_sip_outbound_calls_total{outcome="refused"} 1.0' in metrics


def test_baresip_callee_hears_the_echo_and_hangs_up(
    start_daemon: StartDaemon, reserve_ports: Callable[[int], PortRange], tmp_path: Path,
    clip: SpeechClip,
) -> None:
    """baresip answers at once, plays the clip and hangs up at its end (BYE); the
    echo agent's answer is in its recording."""
    if missing_tools("baresip"):
        pytest.skip("missing baresip")
    daemon = start_daemon()
    media = reserve_ports(10)
    port = free_udp_port()
    baresip = start_callee(tmp_path, clip=clip, sip_port=port, rtp_first=media.first,
                           rtp_last=media.last, run_s=RUN_S)
    try:
        wait_until(lambda: "baresip is ready" in (tmp_path / "baresip.log").read_text(
            errors="replace"), "baresip ready", timeout_s=10)
        sid = call(daemon, port, user="caller")  # baresip's account
        record = ended_record(daemon, sid)
    finally:
        result = finish_call(baresip, tmp_path, RUN_S)
    assert record["reason"] == "bye", (record, result.output[-3000:])
    assert record["direction"] == "outbound" and record["packets_in"] > 50, record
    assert_echoed(result, clip)


def test_callee_hangs_up_with_bye(
    start_daemon: StartDaemon, reserve_ports: Callable[[int], PortRange], tmp_path: Path,
) -> None:
    daemon = start_daemon()
    sipp, port = callee(tmp_path, daemon, "uas_outbound_bye.xml", reserve_ports(4).first,
                        duration_ms=2000)
    sid = call(daemon, port)
    record = ended_record(daemon, sid)
    assert record["reason"] == "bye", record
    assert record["direction"] == "outbound" and record["answered_at"] is not None, record
    result = sipp.wait()
    assert result.successful_calls == 1, result.describe()  # its BYE got our 200


def test_busy_callee_ends_with_callee_busy(
    start_daemon: StartDaemon, reserve_ports: Callable[[int], PortRange], tmp_path: Path,
) -> None:
    daemon = start_daemon()
    sipp, port = callee(tmp_path, daemon, "uas_486.xml", reserve_ports(4).first)
    sid = call(daemon, port, "--tenant", "default", "--agent", "echo")
    record = ended_record(daemon, sid)
    assert record["reason"] == "callee-busy", record
    assert (record["tenant"], record["agent"]) == ("default", "echo"), record
    assert record["direction"] == "outbound" and record["answered_at"] is None, record
    daemon.wait_log(r"event=sip_outbound_failed\b.*\bstatus=486\b", timeout_s=5)
    result = sipp.wait()
    assert result.successful_calls == 1, result.describe()  # it got our ACK


def test_challenging_callee_gets_credentials(
    start_daemon: StartDaemon, reserve_ports: Callable[[int], PortRange], tmp_path: Path,
) -> None:
    secret = tmp_path / "outbound.credentials"
    secret.write_text("alice:secret\n")
    secret.chmod(0o600)
    daemon = start_daemon({"sip": {"outbound_credentials_file": str(secret)}})
    sipp, port = callee(tmp_path, daemon, "uas_outbound_auth.xml", reserve_ports(4).first)
    sid = call(daemon, port)
    wait_until(lambda: ctl_json(daemon, "show", sid).get("state") == "active",
               "the callee answered the authenticated INVITE", timeout_s=RUN_S)
    assert voxgatectl(control_socket(daemon), "hangup", sid).returncode == 0
    assert ended_record(daemon, sid)["reason"] == "operator"
    result = sipp.wait()
    assert result.successful_calls == 1, result.describe()


def test_ring_timeout_cancels(
    start_daemon: StartDaemon, reserve_ports: Callable[[int], PortRange], tmp_path: Path,
) -> None:
    daemon = start_daemon({"sip": {"outbound_ring_timeout_s": 2}})
    sipp, port = callee(tmp_path, daemon, "uas_outbound_ring.xml", reserve_ports(4).first)
    sid = call(daemon, port)
    record = ended_record(daemon, sid)
    assert record["reason"] == "ring-timeout", record
    result = sipp.wait()
    assert result.successful_calls == 1, result.describe()  # CANCEL, 487, ACK


def test_draining_daemon_refuses_outbound_calls(start_daemon: StartDaemon) -> None:
    daemon = start_daemon()
    assert voxgatectl(control_socket(daemon), "drain").returncode == 0
    refused = voxgatectl(control_socket(daemon), "call", "sip:callee@127.0.0.1:5999")
    assert refused.returncode == 1, refused
    assert "call refused: draining" in refused.stderr, refused.stderr
    bad = voxgatectl(control_socket(daemon), "call", "sip:callee@example.com")
    assert bad.returncode == 1 and "bad-args" in bad.stderr, bad.stderr
    for option, value in (("--agent", "local"), ("--tenant", "nobody")):
        bad = voxgatectl(control_socket(daemon), "call", "sip:callee@127.0.0.1:5999",
                         option, value)
        assert bad.returncode == 1 and "bad-args" in bad.stderr, bad.stderr
