"""baresip calls the real daemon, plays the clip and records what comes back."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

from tests.harness import requires
from tests.harness.audio import SpeechClip, active_ratio, compare_echo, read_wav
from tests.harness.baresip import call_and_record
from tests.harness.daemon import PortRange, free_udp_port
from tests.integration.conftest import StartDaemon

pytestmark = requires("baresip")


def test_baresip_hears_its_own_speech_echoed(
    start_daemon: StartDaemon,
    reserve_ports: Callable[[int], PortRange],
    clip: SpeechClip,
    tmp_path: Path,
) -> None:
    daemon = start_daemon()
    rtp = reserve_ports(10)
    result = call_and_record(
        daemon.sip_address,
        tmp_path,
        clip=clip,
        sip_port=free_udp_port(),
        rtp_first=rtp.first,
        rtp_last=rtp.last,
        run_s=math.ceil(clip.duration_s) + 6,
    )
    assert result.received_wav is not None, result.output[-3000:]
    received = read_wav(result.received_wav).to_pcm16()
    assert len(received) / 2 / 8000 >= clip.duration_s * 0.8, result.output[-3000:]
    assert active_ratio(received) >= 0.3, "the recording is (nearly) silence"

    match = compare_echo(received, clip.pcm16)
    assert match.segments_matched >= 0.7, match
    assert match.overlap_s >= clip.duration_s * 0.7, match

    daemon.wait_log(r"event=call_start\b")
    daemon.wait_log(r"event=call_end\b.*\breason=bye\b", timeout_s=10)
