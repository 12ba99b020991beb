"""JournalHandler against a real systemd-journald, started by the test.

Everything runs inside ``unshare --mount --pid``: tmpfs over /run/systemd and
/run/log gives journald its sockets and a volatile journal of its own, so the
host's journal (if any) is never touched and nothing stays mounted. When the
namespace's first process exits, the kernel kills whatever is left in it
(journald included), so a timeout cannot leak a process either.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

JOURNALD = Path("/lib/systemd/systemd-journald")
REPO = Path(__file__).resolve().parents[2]
NAMESPACE_TIMEOUT_S = 60.0

# Runs as the namespace's PID 1: $1 the journal export to write, $2 a journal
# match (FIELD=value), then the command to run while journald is up. The
# command finds journalctl's directory in $JOURNAL_DIR.
_NAMESPACE_SCRIPT = r"""
set -eu
out=$1; match=$2; shift 2
export JOURNAL_DIR=/run/log/journal
mount -t tmpfs -o mode=0755 tmpfs /run/systemd
mount -t tmpfs -o mode=0755 tmpfs /run/log
mkdir -p /run/systemd/journal /run/systemd/journald.conf.d
printf '%s\n' '[Journal]' Storage=volatile ReadKMsg=no ForwardToSyslog=no ForwardToWall=no \
    RateLimitBurst=0 > /run/systemd/journald.conf.d/test.conf
"$JOURNALD" 2> /run/systemd/journald.log &
for _ in $(seq 100); do [ -S /run/systemd/journal/socket ] && break; sleep 0.05; done
[ -S /run/systemd/journal/socket ] || { cat /run/systemd/journald.log >&2; exit 90; }
"$@"
# journald stores entries asynchronously: wait (bounded) for the match to appear.
for _ in $(seq 100); do
    journalctl --directory="$JOURNAL_DIR" --no-pager -o json "$match" > "$out" || true
    [ -s "$out" ] && exit 0
    sleep 0.05
done
echo "no journal entry matches $match" >&2
exit 91
"""

_PROGRAM = '''
import logging, os
from systemd import journal
from voxgate.journal import JournalHandler, under_journald
from voxgate.logging import log_event, logger

# What systemd does for a service with StandardError=journal: stderr is a
# stream socket to journald and $JOURNAL_STREAM names its device and inode.
os.dup2(journal.stream_fd("voxgate-test", 6, False), 2)
st = os.fstat(2)
os.environ["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"

logger.handlers[:] = [JournalHandler()]
logger.setLevel(logging.DEBUG)
logger.propagate = False

def start():
    log_event(logging.INFO, "call_start", "call started", session_id="abc123",
              call_id="c1@x", tenant="default", transport="sip",
              under_journald=under_journald())

def crash():
    try:
        raise ValueError("agent exploded")
    except ValueError as e:
        log_event(logging.ERROR, "session_crashed", session_id="abc123", reason="bug",
                  exc_info=e)

start()
crash()
'''


_DAEMON_DRIVER = '''
import json, os, subprocess, sys, time
from pathlib import Path
from tests.harness.daemon import free_udp_port, running_daemon

def journal(*matches):
    done = subprocess.run(["journalctl", "--directory", os.environ["JOURNAL_DIR"], "--no-pager",
                           "-o", "json", *matches], capture_output=True, text=True, timeout=10)
    return [json.loads(line) for line in done.stdout.splitlines()]

workdir, tenant = Path(sys.argv[1]), sys.argv[2]
config = {"log": {"target": "journal"}, "tenants": [{"name": tenant, "ruri_user": tenant}]}
with running_daemon(workdir, config, rtp_ports=10) as daemon:
    sipp_port = free_udp_port()
    sipp = subprocess.run(
        ["sipp", "-sn", "uac", f"127.0.0.1:{daemon.sip_port}", "-s", tenant, "-m", "1",
         "-d", "500", "-nostdin", "-i", "127.0.0.1", "-p", str(sipp_port), "-timeout", "20s"],
        capture_output=True, text=True, timeout=40, cwd=workdir)
    assert sipp.returncode == 0, sipp.stdout[-3000:] + sipp.stderr
    # What an operator types: the tenant's ended calls.
    deadline = time.monotonic() + 10
    while not (ends := journal(f"TENANT={tenant}", "EVENT=call_end")) and \
            time.monotonic() < deadline:
        time.sleep(0.05)
    assert ends, f"no TENANT={tenant} EVENT=call_end in the journal"
    # One call's story, by its SESSION_ID.
    session = journal(f"SESSION_ID={ends[0]['SESSION_ID']}")
    (workdir / "session.json").write_text(json.dumps(
        {"ends": ends, "session": session, "sipp_port": sipp_port}))
'''


def _skip_reason() -> str | None:
    if sys.platform != "linux" or os.geteuid() != 0:
        return "needs root to mount tmpfs inside a mount namespace (unshare -m)"
    for tool in ("unshare", "journalctl"):
        if shutil.which(tool) is None:
            return f"{tool} missing (apt-get install util-linux systemd)"
    if not os.access(JOURNALD, os.X_OK):
        return f"{JOURNALD} missing (apt-get install systemd)"
    machine_id = Path("/etc/machine-id")
    if not machine_id.exists() or not machine_id.read_text().strip():
        return "journald needs /etc/machine-id (systemd-machine-id-setup)"
    return None


pytestmark = [
    pytest.mark.skipif(_skip_reason() is not None, reason=_skip_reason() or ""),
]


def run_with_journald(tmp_path: Path, match: str, *command: str) -> list[dict[str, Any]]:
    """Run ``command`` next to a private journald; the entries matching ``match``."""
    script = tmp_path / "namespace.sh"
    script.write_text(_NAMESPACE_SCRIPT)
    out = tmp_path / "entries.json"
    proc = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "--pid", "--fork", "--kill-child",
         "--mount-proc", "bash", str(script), str(out), match, *command],
        env={**os.environ, "JOURNALD": str(JOURNALD), "PYTHONPATH": str(REPO)},
        capture_output=True, text=True, timeout=NAMESPACE_TIMEOUT_S, check=False,
    )
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return [json.loads(line) for line in out.read_text().splitlines()]


def _line_of(source: str, needle: str) -> int:
    return next(i for i, line in enumerate(source.splitlines(), 1) if needle in line)


def test_log_event_lands_in_journald_with_its_fields(tmp_path: Path) -> None:
    program = tmp_path / "log_to_journal.py"
    program.write_text(_PROGRAM)
    entries = run_with_journald(tmp_path, "SESSION_ID=abc123", sys.executable, str(program))
    by_event = {e["EVENT"]: e for e in entries}
    assert set(by_event) == {"call_start", "session_crashed"}

    start = by_event["call_start"]
    assert start["MESSAGE"] == "call started: call_id=c1@x tenant=default"
    assert start["SYSLOG_IDENTIFIER"] == "voxgate"
    assert start["PRIORITY"] == "6"
    assert start["CALL_ID"] == "c1@x"
    assert start["TENANT"] == "default"
    assert start["TRANSPORT"] == "sip"
    assert start["UNDER_JOURNALD"] == "True"
    assert start["_TRANSPORT"] == "journal"  # the native protocol, not stderr
    assert start["CODE_FILE"] == str(program)
    assert start["CODE_FUNC"] == "start"
    assert start["CODE_LINE"] == str(_line_of(_PROGRAM, '"call_start"'))

    crashed = by_event["session_crashed"]
    assert crashed["PRIORITY"] == "3"
    assert crashed["REASON"] == "bug"
    assert crashed["CODE_FUNC"] == "crash"
    assert "ValueError: agent exploded" in crashed["EXCEPTION"]


@pytest.mark.skipif(shutil.which("sipp") is None,
                    reason="sipp missing (apt-get install sip-tester)")
def test_daemon_call_is_found_by_tenant_and_session_id(tmp_path: Path) -> None:
    """The real voxgated with [log] target = "journal" and one SIPp call of tenant
    ``acme``: ``journalctl TENANT=acme EVENT=call_end`` finds it, its MESSAGE
    tells the call's story in text, and every record of the call names the tenant."""
    driver = tmp_path / "daemon_driver.py"
    driver.write_text(_DAEMON_DRIVER)
    run_with_journald(tmp_path, "EVENT=call_end", sys.executable, str(driver), str(tmp_path),
                      "acme")
    found = json.loads((tmp_path / "session.json").read_text())
    by_event = {e["EVENT"]: e for e in found["session"]}
    assert {"admission", "call_start", "call_end"} <= set(by_event), sorted(by_event)
    (end,) = found["ends"]
    assert end == by_event["call_end"]
    assert end["SYSLOG_IDENTIFIER"] == "voxgate"
    assert end["PRIORITY"] == "6"
    assert end["TRANSPORT"] == "sip"
    assert end["CALL_ID"] == by_event["call_start"]["CALL_ID"]
    assert end["REASON"] == "bye"
    peer = f"127.0.0.1:{found['sipp_port']}"
    assert end["PEER"] == peer
    assert re.fullmatch(
        rf"call ended: call_id={re.escape(end['CALL_ID'])} reason=bye "
        rf"duration=\d+\.\ds peer={re.escape(peer)} tenant=acme", end["MESSAGE"])
    assert end["CODE_FILE"].endswith("/voxgate/session.py")
    assert end["_TRANSPORT"] == "journal"
    assert {(e["EVENT"], e.get("TENANT")) for e in found["session"]} == {
        (event, "acme") for event in by_event}
