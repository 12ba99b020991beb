"""The real daemon's systemd watchdog: WATCHDOG=1 while healthy, withheld while blocked.

``WATCHDOG_USEC=1000000`` (1 s) makes the daemon judge its health and ping
every 0.5 s. ``[watchdog] test_block_s`` arms the test-only hook: SIGUSR2
blocks the event loop for that long. Assertions are about presence, absence
and order of pings and log lines, not about exact intervals (a shared
2-core machine).
"""

from __future__ import annotations

import re
import signal
import time
from pathlib import Path

from tests.harness.daemon import Daemon
from tests.integration.conftest import StartDaemon
from tests.integration.test_control import ctl_ok
from tests.integration.test_lifecycle import wait_until

PING = "WATCHDOG=1"
WATCHDOG_ENV = {"WATCHDOG_USEC": "1000000"}
BLOCK_S = 2
MAX_LOOP_LAG_MS = 300


def _pings(daemon: Daemon) -> int:
    return daemon.notifications.count(PING)


def _caught_signals(pid: int) -> set[int]:
    """Signal numbers with a handler installed, from ``SigCgt`` in /proc/PID/status."""
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"^SigCgt:\s*([0-9a-f]+)$", status, re.MULTILINE)
    assert match is not None, status
    mask = int(match.group(1), 16)
    return {bit + 1 for bit in range(64) if mask >> bit & 1}


def test_healthy_daemon_pings(start_daemon: StartDaemon) -> None:
    daemon = start_daemon(env=WATCHDOG_ENV)
    time.sleep(3.0)
    assert _pings(daemon) >= 3, daemon.notifications


def test_healthy_idle_daemon_never_withholds_a_ping(start_daemon: StartDaemon) -> None:
    daemon = start_daemon(env=WATCHDOG_ENV)
    time.sleep(3.0)
    assert not daemon.events("watchdog_withheld"), daemon.log_text()


def test_no_pings_without_watchdog_usec_or_for_another_pid(start_daemon: StartDaemon) -> None:
    plain = start_daemon()
    other_pid = start_daemon(env={**WATCHDOG_ENV, "WATCHDOG_PID": "1"})
    time.sleep(2.0)
    assert _pings(plain) == 0, plain.notifications
    assert _pings(other_pid) == 0, other_pid.notifications


def test_blocked_loop_withholds_pings_until_it_recovers(start_daemon: StartDaemon) -> None:
    daemon = start_daemon(
        {"watchdog": {"test_block_s": BLOCK_S, "max_loop_lag_ms": MAX_LOOP_LAG_MS}},
        env=WATCHDOG_ENV,
    )
    wait_until(lambda: _pings(daemon) >= 2, 10.0, "two pings before the block")
    daemon.proc.send_signal(signal.SIGUSR2)
    daemon.wait_log(r"event=test_block_loop\b")
    time.sleep(0.3)  # still inside the block: the pings sent before it have arrived
    during_block = _pings(daemon)

    withheld = daemon.wait_log(r"event=watchdog_withheld\b.*\bloop lag (\d+) ms > (\d+) ms",
                               timeout_s=10.0)
    # The next verdict comes half a period after the withheld one: no ping may
    # have arrived between the start of the block and the withheld verdict.
    assert _pings(daemon) == during_block, daemon.notifications
    assert int(withheld.group(1)) >= BLOCK_S * 1000 / 2, withheld.string
    assert int(withheld.group(2)) == MAX_LOOP_LAG_MS, withheld.string
    assert len(daemon.events("watchdog_withheld")) == 1, daemon.log_text()

    wait_until(lambda: _pings(daemon) >= during_block + 2, 10.0, "pings after the block")
    assert daemon.alive()
    metrics = ctl_ok(daemon, "metrics")
    assert "# TYPE voxgate_watchdog_pings_withheld_total counter\n" in metrics
    withheld_total = re.search(r"^voxgate_watchdog_pings_withheld_total (\S+)$", metrics, re.M)
    assert withheld_total is not None and float(withheld_total.group(1)) >= 1, metrics


def test_sigusr2_is_caught_only_when_the_test_hook_is_armed(start_daemon: StartDaemon) -> None:
    # Read from the kernel instead of sending SIGUSR2: unarmed, it would kill the daemon.
    armed = start_daemon({"watchdog": {"test_block_s": BLOCK_S}})
    plain = start_daemon()
    for daemon in (armed, plain):
        assert {signal.SIGTERM, signal.SIGINT, signal.SIGHUP} <= _caught_signals(daemon.pid)
    assert signal.SIGUSR2 in _caught_signals(armed.pid)
    assert signal.SIGUSR2 not in _caught_signals(plain.pid)
