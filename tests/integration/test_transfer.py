"""Blind transfer (RFC 3515) of a real baresip call by ``voxgatectl transfer``.

baresip calls voxgated (echo agent); the operator transfers the session to a
SIPp UAS. baresip follows the REFER by calling that target and reports the
outcome by NOTIFY (``message/sipfrag``): a 200 ends voxgate's call with reason
``transferred``; a busy target (486) is a failure and the call goes on.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

from tests.harness import requires
from tests.harness.audio import SpeechClip
from tests.harness.baresip import finish_call, start_call
from tests.harness.daemon import Daemon, PortRange, free_udp_port
from tests.harness.sipp import Sipp
from tests.integration.conftest import StartDaemon
from tests.integration.test_control import control_socket, ctl_json, voxgatectl, wait_until

pytestmark = requires("baresip", "sipp", "sox")

RUN_S = 20


def tone(tmp_path: Path) -> SpeechClip:
    """A 30 s tone for baresip to play (it hangs up when its source ends)."""
    wav = tmp_path / "tone.wav"
    subprocess.run(["sox", "-n", "-r", "8000", "-c", "1", "-b", "16", str(wav),
                    "synth", "30", "sine", "440", "vol", "0.3"], check=True, timeout=30)
    return SpeechClip(ulaw_wav=wav, pcm16_wav=wav, pcm16=b"")


def transfer_call(daemon: Daemon, tmp_path: Path, rtp: PortRange, scenario: str,
                  ) -> tuple[Sipp, subprocess.Popen[bytes], str, int]:
    """Start the SIPp target and baresip's call; transfer the call to the target once
    it is up. Returns the target, baresip, the session id and the target's port."""
    target_port = free_udp_port()
    target = Sipp(scenario, ("127.0.0.1", daemon.sip_address[1]), workdir=tmp_path / "target",
                  local_port=target_port, media_port=rtp.last - 1, timeout_s=RUN_S + 10)
    target.start()
    baresip = start_call(daemon.sip_address, tmp_path, clip=tone(tmp_path),
                         sip_port=free_udp_port(), rtp_first=rtp.first, rtp_last=rtp.last - 2,
                         run_s=RUN_S, max_calls=2)
    (session,) = wait_until(lambda: ctl_json(daemon, "sessions"), "baresip's call")
    wait_until(lambda: ctl_json(daemon, "show", session["id"])["state"] == "active",
               "the call answered")
    done = voxgatectl(control_socket(daemon), "transfer", session["id"],
                      f"sip:human@127.0.0.1:{target_port}")
    assert done.returncode == 0, done.stderr
    return target, baresip, session["id"], target_port


def test_baresip_follows_refer_to_the_target(
    start_daemon: StartDaemon, reserve_ports: Callable[[int], PortRange], tmp_path: Path,
) -> None:
    daemon = start_daemon()
    target, baresip, sid, _ = transfer_call(daemon, tmp_path, reserve_ports(12),
                                            "uas_transfer_target.xml")
    daemon.wait_log(r"event=sip_transfer_succeeded\b", timeout_s=15)
    daemon.wait_log(r"event=call_end\b.*\breason=transferred\b", timeout_s=10)
    record = ctl_json(daemon, "show", sid)
    assert record["record"]["reason"] == "transferred", record
    result = finish_call(baresip, tmp_path, RUN_S)  # baresip quits: BYE to the target
    sipp = target.wait()
    assert sipp.successful_calls == 1, sipp.describe() + result.output[-3000:]
    metrics = ctl_json(daemon, "metrics")["text"]
    assert 'voxgate_sip_transfers_total{outcome="succeeded"} 1' in metrics


def test_busy_target_fails_and_the_call_goes_on(
    start_daemon: StartDaemon, reserve_ports: Callable[[int], PortRange], tmp_path: Path,
) -> None:
    daemon = start_daemon()
    target, baresip, sid, _ = transfer_call(daemon, tmp_path, reserve_ports(12), "uas_486.xml")
    daemon.wait_log(r"event=sip_transfer_failed\b.*\bstatus=486\b", timeout_s=15)
    sipp = target.wait()
    assert sipp.successful_calls == 1, sipp.describe()
    assert ctl_json(daemon, "show", sid)["state"] == "active"
    refused = voxgatectl(control_socket(daemon), "transfer", sid, "sip:bad uri")
    assert refused.returncode != 0 and "transfer refused" in refused.stderr, refused
    result = finish_call(baresip, tmp_path, RUN_S)
    daemon.wait_log(r"event=call_end\b.*\breason=bye\b", timeout_s=10)
    metrics = ctl_json(daemon, "metrics")["text"]
    assert 'voxgate_sip_transfers_total{outcome="failed"} 1' in metrics, result.output[-3000:]
    assert 'voxgate_sip_transfers_total{outcome="refused"} 1' in metrics
