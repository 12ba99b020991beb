"""200 short SIPp calls; afterwards the daemon holds no RTP socket and no extra fd."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.harness import requires
from tests.harness.audio import SpeechClip
from tests.harness.daemon import Daemon, PortRange, free_udp_port
from tests.harness.sipp import Sipp
from tests.integration.conftest import StartDaemon

pytestmark = requires("sipp")

CALLS = 200
SETTLE_TIMEOUT_S = 10.0


def udp_sockets_in_range(first: int, last: int) -> int:
    """UDP sockets (IPv4 and IPv6, any process) bound to a local port in [first, last]."""
    count = 0
    for table in ("/proc/net/udp", "/proc/net/udp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local = line.split()[1]  # "0100007F:4E20": address:port in hex
            if first <= int(local.rsplit(":", 1)[1], 16) <= last:
                count += 1
    return count


def _settled(daemon: Daemon, baseline_fds: int) -> tuple[int, int]:
    """Poll until no RTP socket is left and the fd count is back (or time runs out)."""
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    while True:
        state = (udp_sockets_in_range(daemon.rtp.first, daemon.rtp.last), daemon.fd_count())
        if (state[0] == 0 and state[1] <= baseline_fds) or time.monotonic() > deadline:
            return state
        time.sleep(0.1)


def test_two_hundred_calls_leave_nothing_behind(
    start_daemon: StartDaemon,
    reserve_ports: Callable[[int], PortRange],
    clip: SpeechClip,
    tmp_path: Path,
) -> None:
    daemon = start_daemon()
    baseline_fds = daemon.fd_count()
    assert udp_sockets_in_range(daemon.rtp.first, daemon.rtp.last) == 0
    media = reserve_ports(512)  # SIPp takes a fresh even port per call
    sipp = Sipp(
        "uac_echo",
        daemon.sip_address,
        workdir=tmp_path / "sipp",
        local_port=free_udp_port(),
        media_port=media.first,
        clip=clip,
        calls=CALLS,
        limit=20,
        rate=20,
        duration_ms=1000,
        timeout_s=90.0,
    )
    result = sipp.run()
    assert result.returncode == 0, result.describe()
    assert result.successful_calls == CALLS, result.describe()

    daemon.wait_log(r"event=call_end\b", timeout_s=15, count=CALLS)
    ends = daemon.events("call_end")
    assert len(ends) == CALLS
    assert {e.get("reason") for e in ends} == {"bye"}
    assert len({e.get("call_id") for e in ends}) == CALLS

    rtp_sockets, fds = _settled(daemon, baseline_fds)
    assert rtp_sockets == 0, "RTP sockets left open after every call ended"
    assert fds <= baseline_fds, f"fd count {fds} > baseline {baseline_fds}"
    assert daemon.alive()
    status = _status(daemon)
    assert status["sessions"] == {"active": 0, "queued": 0,
                                  "by_tenant": {"default": {"active": 0, "queued": 0,
                                                            "max_sessions": None}}}
    assert status["sip"]["dialogs"] == 0, "SIP dialog state left behind"


def _status(daemon: Daemon) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-m", "voxgate.control.cli", "--socket", daemon.control_socket,
         "--json", "status"],
        capture_output=True, text=True, timeout=30, check=True,
    )
    result: dict[str, Any] = json.loads(out.stdout)
    return result
