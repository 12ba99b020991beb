"""SRTP with SDES keys against the real daemon: baresip (srtp-mand) calls in and
hears its echo while packets under a wrong key hit the call's port and are
dropped and counted, a plain call beside it keeps its echo and new calls are
still answered; a plain RTP offer to ``srtp = "required"`` gets 488; re-INVITEs
keep the key, re-key on a new one and cannot turn SRTP off."""

from __future__ import annotations

import base64
import math
import os
import re
import socket
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pylibsrtp

from tests.harness import requires
from tests.harness.audio import SpeechClip
from tests.harness.baresip import BaresipResult, assert_echoed, call_and_record
from tests.harness.daemon import PortRange, free_udp_port, parse_logfmt, status_code
from tests.harness.phone import Phone, body_of
from tests.harness.sipp import Sipp, offer_keys
from tests.integration.conftest import StartDaemon
from tests.integration.test_control import ctl_ok
from tests.integration.test_recovery import live_call, ulaw_clip, wait_echo

ReservePorts = Callable[[int], PortRange]
WRONG_KEY_PACKETS = 100


def _wrong_key_packets(count: int) -> list[bytes]:
    """PCMU packets protected with a key nobody negotiated."""
    policy = pylibsrtp.Policy(key=os.urandom(30), ssrc_type=pylibsrtp.Policy.SSRC_ANY_OUTBOUND)
    session = pylibsrtp.Session(policy)
    return [session.protect(struct.pack("!BBHII", 0x80, 0, seq, seq * 160, 0xBAD)
                            + b"\x00" * 160) for seq in range(count)]


@requires("baresip")
def test_baresip_with_mandatory_srtp_hears_its_echo_and_wrong_keys_are_dropped(
    start_daemon: StartDaemon, reserve_ports: ReservePorts, clip: SpeechClip, tmp_path: Path
) -> None:
    daemon = start_daemon({"rtp": {"srtp": "offer"}})
    rtp = reserve_ports(10)
    results: list[BaresipResult] = []

    def call() -> None:
        results.append(call_and_record(
            daemon.sip_address, tmp_path, clip=clip, sip_port=free_udp_port(),
            rtp_first=rtp.first, rtp_last=rtp.last, run_s=math.ceil(clip.duration_s) + 6,
            mediaenc="srtp-mand"))

    with Phone(daemon) as phone:
        _, plain_peer, _ = live_call(phone, daemon, ulaw_clip(clip))  # plain RTP beside it
        caller = threading.Thread(target=call)
        caller.start()
        try:
            start = daemon.wait_log(r"event=call_start\b.*\bsrtp=", timeout_s=20)
            assert "srtp=AES_CM_128_HMAC_SHA1_80" in start.string, start.string
            fields = parse_logfmt(start.string)
            port, sid = int(fields["local_rtp_port"]), fields["session_id"]
            # A sender without the key, spread over a second of the SRTP call.
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as attacker:
                for packet in _wrong_key_packets(WRONG_KEY_PACKETS):
                    attacker.sendto(packet, ("127.0.0.1", port))
                    time.sleep(0.01)
            wait_echo(plain_peer, time.monotonic())  # the plain call echoes on
            assert phone.call().final_status == 200  # and the listener still answers
        finally:
            caller.join(timeout=math.ceil(clip.duration_s) + 30)
    assert results, "baresip did not finish"
    result = results[0]
    assert_echoed(result, clip)

    daemon.wait_log(rf"event=call_end\b.*\bsession_id={sid}\b.*\breason=bye\b", timeout_s=10)
    metrics = ctl_ok(daemon, "metrics")
    assert (f'voxgate_srtp_packets_dropped_total{{reason="auth"}} {WRONG_KEY_PACKETS}.0'
            in metrics), metrics
    assert 'voxgate_srtp_packets_dropped_total{reason="replay"} 0.0' in metrics


@requires("sipp")
def test_plain_rtp_offer_to_required_srtp_gets_488(
    start_daemon: StartDaemon, reserve_ports: ReservePorts, tmp_path: Path
) -> None:
    daemon = start_daemon({"rtp": {"srtp": "required"}})
    sipp = Sipp("uac_488", daemon.sip_address, workdir=tmp_path / "sipp",
                local_port=free_udp_port(), media_port=reserve_ports(4).first, timeout_s=40.0,
                extra_args=offer_keys(0, "PCMU"))
    result = sipp.run()
    assert result.returncode == 0 and result.successful_calls == 1, result.describe()
    refused = daemon.wait_log(r"event=call_refused\b.*")
    assert "status=488" in refused.string and "RTP/SAVP" in refused.string, refused.string
    assert not daemon.events("call_start")
    assert daemon.alive()


def _crypto(key: bytes, tag: int = 1) -> str:
    return f"{tag} AES_CM_128_HMAC_SHA1_80 inline:{base64.b64encode(key).decode()}"


def _answered_crypto(answer: bytes) -> str:
    found = re.findall(rb"^a=crypto:(.*?)\r$", body_of(answer), re.M)
    assert len(found) == 1 and b"m=audio" in body_of(answer), answer
    assert re.search(rb"^m=audio [1-9]\d* RTP/SAVP 0\r$", body_of(answer), re.M), answer
    return str(found[0].decode())


def test_reinvites_keep_the_key_rekey_on_a_new_one_and_cannot_drop_srtp(
    start_daemon: StartDaemon,
) -> None:
    daemon = start_daemon({"rtp": {"srtp": "offer"}})
    with Phone(daemon) as phone:
        call = phone.call(crypto=_crypto(b"\x01" * 30, tag=3))
        assert call.final_status == 200, call.final
        first = _answered_crypto(call.final or b"")
        assert re.fullmatch(r"3 AES_CM_128_HMAC_SHA1_80 inline:[A-Za-z0-9+/]{40}", first), first

        call.crypto = _crypto(b"\x01" * 30, tag=5)  # same key, new tag: our key stays
        same = phone.reinvite(call)
        assert status_code(same) == 200, same
        assert _answered_crypto(same) == "5" + first[1:]

        call.crypto = _crypto(b"\x02" * 30, tag=5)  # a new key: ours is new too
        rekeyed = phone.reinvite(call)
        assert status_code(rekeyed) == 200, rekeyed
        assert _answered_crypto(rekeyed).split()[2] != first.split()[2]

        call.crypto = None  # SRTP cannot be dropped in the call
        assert status_code(phone.reinvite(call)) == 488
        phone.hang_up(call)
    assert daemon.alive()
