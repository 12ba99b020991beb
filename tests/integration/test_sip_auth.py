"""SIPp authenticates its INVITE with digest credentials ([sip] auth_credentials_file)."""

from __future__ import annotations

import signal
from collections.abc import Callable
from pathlib import Path

from tests.harness import requires
from tests.harness.daemon import Daemon, PortRange, free_udp_port
from tests.harness.sipp import Sipp, SippResult
from tests.integration.conftest import StartDaemon
from tests.integration.test_control import ctl_ok

pytestmark = requires("sipp")

ReservePorts = Callable[[int], PortRange]


def _caller(daemon: Daemon, workdir: Path, media: PortRange, password: str) -> SippResult:
    """One uac_auth call as ``alice`` with ``password``."""
    return Sipp(
        "uac_auth", daemon.sip_address, workdir=workdir, local_port=free_udp_port(),
        media_port=media.first, duration_ms=1000, timeout_s=30.0,
        # the digest-uri must be the Request-URI (RFC 3261 §22.4); SIPp's default is
        # remote_ip:remote_port
        extra_args=["-au", "alice", "-ap", password, "-auth_uri",
                    f"echo@{daemon.sip_address[0]}:{daemon.sip_address[1]}"],
    ).run()


def _auth_metrics(daemon: Daemon) -> dict[str, float]:
    prefix = 'voxgate_sip_auth_total{result="'
    return {line[len(prefix):].split('"', 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in ctl_ok(daemon, "metrics").splitlines() if line.startswith(prefix)}


def test_digest_caller_gets_a_call_and_a_wrong_password_none_after_reload(
    start_daemon: StartDaemon, reserve_ports: ReservePorts, tmp_path: Path
) -> None:
    users = tmp_path / "sip-users"
    users.write_text("# test callers\nalice:first secret\n")
    users.chmod(0o600)
    # SIPp 3.6 reads only the first challenge and knows only MD5 (SHA-256 is covered
    # by the RFC 7616 vectors in tests/sip/test_digest.py)
    daemon = start_daemon({"sip": {"auth_credentials_file": str(users),
                                   "auth_algorithms": ["MD5"]}})

    ok = _caller(daemon, tmp_path / "right", reserve_ports(4), "first secret")
    assert (ok.returncode, ok.successful_calls, ok.failed_calls) == (0, 1, 0), ok.describe()
    daemon.wait_log(r"event=call_end\b.*\breason=bye\b", timeout_s=10)
    assert len(daemon.events("call_start")) == 1
    assert _auth_metrics(daemon) == {"ok": 1, "missing": 1, "bad_header": 0, "unknown_user": 0,
                                     "wrong_response": 0, "stale": 0, "replay": 0}

    users.write_text("alice:second secret\n")  # re-read on reload: the old password fails
    daemon.proc.send_signal(signal.SIGHUP)
    daemon.wait_log(r"event=reloaded\b")
    refused = _caller(daemon, tmp_path / "wrong", reserve_ports(4), "first secret")
    assert refused.returncode == 0, refused.describe()  # ended at the scenario's "refused"
    assert len(daemon.events("call_start")) == 1
    metrics = _auth_metrics(daemon)
    assert (metrics["ok"], metrics["missing"], metrics["wrong_response"]) == (1, 2, 1), metrics
    assert daemon.alive()
