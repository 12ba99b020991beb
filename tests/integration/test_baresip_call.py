"""baresip calls the real daemon, plays the clip and records what comes back."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

from tests.harness import requires
from tests.harness.audio import SpeechClip
from tests.harness.baresip import assert_echoed, call_and_record
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
    assert_echoed(result, clip)

    daemon.wait_log(r"event=call_start\b")
    daemon.wait_log(r"event=call_end\b.*\breason=bye\b", timeout_s=10)
