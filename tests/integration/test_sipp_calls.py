"""SIPp calls the real daemon: echo, CANCEL, 488, daemon-side BYE."""

from __future__ import annotations

import signal
from collections.abc import Callable, Sequence
from pathlib import Path

from tests.harness import requires
from tests.harness.audio import SpeechClip, compare_echo, decode_g711
from tests.harness.daemon import (
    Daemon,
    PortRange,
    free_udp_port,
)
from tests.harness.pcap import (
    Capture,
    echo_latencies_s,
    flow_payload,
    flow_stats,
    percentile,
    read_udp,
    rtp_packets,
)
from tests.harness.sipp import Sipp, SippResult, offer_keys
from tests.integration.conftest import StartDaemon
from tests.integration.test_control import ctl_ok

pytestmark = requires("sipp")

ReservePorts = Callable[[int], PortRange]
FRAME_RATE_PPS = 50.0
G729_OFFER = offer_keys(18, "G729")  # uac_488's offer: no codec in common


def _sipp(
    scenario: str,
    daemon: Daemon,
    workdir: Path,
    media: PortRange,
    *,
    clip: SpeechClip | None = None,
    duration_ms: int = 1000,
    extra_args: Sequence[str] = (),
) -> Sipp:
    return Sipp(
        scenario,
        daemon.sip_address,
        workdir=workdir,
        local_port=free_udp_port(),
        media_port=media.first,
        clip=clip,
        duration_ms=duration_ms,
        timeout_s=40.0,
        extra_args=extra_args,
    )


def _assert_ok(result: SippResult) -> None:
    assert result.returncode == 0, result.describe()
    assert result.successful_calls == 1, result.describe()
    assert result.failed_calls == 0, result.describe()


@requires("tcpdump")
def test_echo_call_returns_the_callers_speech(
    start_daemon: StartDaemon, reserve_ports: ReservePorts, clip: SpeechClip, tmp_path: Path
) -> None:
    daemon = start_daemon()
    media = reserve_ports(4)
    caller = ("127.0.0.1", media.first)
    pcap_path = tmp_path / "echo.pcap"
    with Capture(pcap_path, daemon.rtp.first, daemon.rtp.last) as capture:
        # The SDP answer (m=audio port, PCMU 0, telephone-event) is checked by the
        # scenario's regexp actions: a mismatch fails the call.
        sipp = _sipp(
            "uac_echo", daemon, tmp_path / "sipp", media, clip=clip,
            duration_ms=round(clip.duration_s * 1000) + 1500,
        )
        _assert_ok(sipp.run())
    assert capture.stats is not None and capture.stats.dropped_by_kernel == 0

    start = daemon.wait_log(r"event=call_start\b")
    assert "codec=PCMU" in start.string
    end = daemon.wait_log(r"event=call_end\b.*\breason=bye\b", timeout_s=10)
    assert "packets_in=" in end.string

    packets = rtp_packets(read_udp(pcap_path))
    flows = flow_stats(packets)
    inbound = [f for (src, _), f in flows.items() if src == caller]
    outbound = [f for (_, dst), f in flows.items() if dst == caller]
    assert len(inbound) == 1 and len(outbound) == 1, sorted(flows)
    for flow in (inbound[0], outbound[0]):
        assert flow.packets >= clip.duration_s * FRAME_RATE_PPS * 0.9, flow
        assert 0.9 * FRAME_RATE_PPS <= flow.rate_pps <= 1.1 * FRAME_RATE_PPS, flow
        assert flow.payload_types == frozenset({0}), flow
    assert outbound[0].loss_ratio <= 0.01, outbound[0]

    echoed = decode_g711(flow_payload(packets, outbound[0].src, caller), "PCMU")
    match = compare_echo(echoed, clip.pcm16)
    assert match.segments_matched >= 0.7, match
    assert match.overlap_s >= clip.duration_s * 0.8, match

    latencies = echo_latencies_s(packets, caller)
    assert len(latencies) >= outbound[0].packets * 0.5, len(latencies)
    # Jitter buffer (~20 ms) plus the 20 ms schedule; generous for a busy CI box.
    assert percentile(latencies, 50) < 0.2, percentile(latencies, 50)


def test_cancel_before_answer_gets_487(
    start_daemon: StartDaemon, reserve_ports: ReservePorts, tmp_path: Path
) -> None:
    daemon = start_daemon({"sip": {"answer_delay_ms": 3000}})
    _assert_ok(_sipp("uac_cancel", daemon, tmp_path / "sipp", reserve_ports(4)).run())
    daemon.wait_log(r"event=call_end\b.*\breason=cancel\b", timeout_s=10)
    assert daemon.alive()


def test_no_common_codec_gets_488(
    start_daemon: StartDaemon, reserve_ports: ReservePorts, tmp_path: Path
) -> None:
    daemon = start_daemon()
    _assert_ok(_sipp("uac_488", daemon, tmp_path / "sipp", reserve_ports(4),
                     extra_args=G729_OFFER).run())
    assert not daemon.events("call_start")
    assert daemon.alive()


def test_caller_outside_trusted_cidrs_gets_403_until_a_reload_trusts_it(
    start_daemon: StartDaemon, reserve_ports: ReservePorts, tmp_path: Path
) -> None:
    daemon = start_daemon({"sip": {"trusted_cidrs": ["192.0.2.0/24", "2001:db8::/32"]}})
    _assert_ok(_sipp("uac_403", daemon, tmp_path / "untrusted", reserve_ports(4)).run())
    assert not daemon.events("call_start")
    assert 'voxgate_sip_requests_refused_total{reason="untrusted_source"} 1.0' in ctl_ok(
        daemon, "metrics")
    text = daemon.config_path.read_text()
    daemon.config_path.write_text(text.replace('"192.0.2.0/24"', '"127.0.0.0/8"'))
    daemon.proc.send_signal(signal.SIGHUP)
    daemon.wait_log(r"event=reloaded\b")
    # Trusted now: the INVITE gets as far as the offer (no common codec: 488).
    _assert_ok(_sipp("uac_488", daemon, tmp_path / "trusted", reserve_ports(4),
                     extra_args=G729_OFFER).run())


def test_daemon_hangs_up_at_max_duration(
    start_daemon: StartDaemon, reserve_ports: ReservePorts, clip: SpeechClip, tmp_path: Path
) -> None:
    daemon = start_daemon({"timers": {"max_duration_s": 2}})
    result = _sipp("uac_wait_bye", daemon, tmp_path / "sipp", reserve_ports(4), clip=clip).run()
    _assert_ok(result)
    end = daemon.wait_log(r"event=call_end\b.*\breason=max-duration\b", timeout_s=10)
    duration = daemon.events("call_end")[0].get("duration_s", "0")
    assert 1.5 <= float(duration) <= 5.0, end.string
