"""Local faults against the real daemon: none ends it or the calls already up.

- Out of file descriptors (``prlimit`` lowers the daemon's soft ``RLIMIT_NOFILE``
  to just above what it holds): new calls get 503 ``no-rtp-port``, control and
  WebSocket connections wait in the kernel's backlog, each listener logs one
  ``resource_shortage`` line, a call that was up keeps its echo; with the
  limit back, everything works again and waiting connections are served.
- A ~64 KB INVITE whose responses cannot fit one UDP datagram gets a minimal
  513 Message Too Large (RFC 3261 §18.1.1, §21.5.11) instead of silence.
- journald killed under ``[log] target = "journal"``: records go to stderr
  after one notice, and back to the journal once a new journald runs.
- ``[control] socket`` on a full filesystem: exit 73 (EX_CANTCREAT, which the
  units list in ``RestartPreventExitStatus=``) and one line naming the key.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest

from tests.harness.audio import SpeechClip
from tests.harness.daemon import (
    Daemon,
    free_tcp_port,
    invite_request,
    options_request,
    status_code,
)
from tests.harness.phone import Phone, headers_of
from tests.integration.conftest import StartDaemon
from tests.integration.test_control import _ctl_command, wait_until
from tests.integration.test_journald import _skip_reason, run_with_journald
from tests.integration.test_recovery import live_call, ulaw_clip, wait_echo
from voxgate.errors import EX_CANTCREAT
from voxgate.sip.uas import MAX_UDP_PAYLOAD_BYTES

CALLS_WHILE_SHORT = 4
"""Calls placed while descriptors are short: the first may take the one spare."""
BACKLOG_WAIT_S = 30.0
"""How long a connection waiting in the backlog may take to be served after the
limit is raised (a busy two-core machine)."""
PROXY_VIAS = 31
PROXY_VIA_BYTES = 2000


# --- helpers ---------------------------------------------------------------------------------

def _require(*tools: str) -> None:
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"missing {', '.join(missing)} (apt-get install util-linux)")


def fd_limits(pid: int) -> tuple[int, int]:
    """(soft, hard) ``RLIMIT_NOFILE`` of ``pid``."""
    done = subprocess.run(["prlimit", f"--pid={pid}", "--nofile", "--raw", "--noheadings",
                           "--output=SOFT,HARD"], capture_output=True, text=True, check=True)
    soft, hard = done.stdout.split()
    return int(soft), int(hard)


def set_fd_limits(pid: int, soft: int, hard: int) -> None:
    """Set ``pid``'s ``RLIMIT_NOFILE``; only the soft one moves (raising a hard limit
    needs CAP_SYS_RESOURCE, which a container may not give root)."""
    subprocess.run(["prlimit", f"--pid={pid}", f"--nofile={soft}:{hard}"], check=True)


def highest_fd(pid: int) -> int:
    return max(int(fd) for fd in os.listdir(f"/proc/{pid}/fd"))


def websocket_upgrade(port: int) -> socket.socket:
    """Connect and send an RFC 6455 §4.1 opening handshake for ``/media``; the answer
    is read with :func:`http_status`."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=BACKLOG_WAIT_S)
    sock.sendall(b"GET /media HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                 b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                 b"Sec-WebSocket-Version: 13\r\n\r\n")
    return sock


def http_status(sock: socket.socket) -> int:
    """The status code of the HTTP response arriving on ``sock``."""
    head = b""
    while b"\r\n" not in head:
        chunk = sock.recv(4096)
        if not chunk:
            break
        head += chunk
    return int(head.split(b" ", 2)[1])


def metrics_status(port: int) -> int:
    with socket.create_connection(("127.0.0.1", port), timeout=BACKLOG_WAIT_S) as sock:
        sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        return http_status(sock)


def events_of(daemon: Daemon, event: str, component: str) -> list[dict[str, str]]:
    return [e for e in daemon.events(event) if e.get("component") == component]


# --- running out of file descriptors --------------------------------------------------------

def test_out_of_descriptors_is_survived_and_recovered(
    start_daemon: StartDaemon, clip: SpeechClip
) -> None:
    _require("prlimit")
    ws_port, metrics_port = free_tcp_port(), free_tcp_port()
    daemon = start_daemon({"websocket": {"listen": f"127.0.0.1:{ws_port}"},
                           "metrics": {"listen": f"127.0.0.1:{metrics_port}"}}, rtp_ports=40)
    soft, hard = fd_limits(daemon.pid)
    source = ulaw_clip(clip)
    with Phone(daemon) as phone, contextlib.ExitStack() as stack:
        _, peer_a, _ = live_call(phone, daemon, source)
        set_fd_limits(daemon.pid, highest_fd(daemon.pid) + 2, hard)  # one spare descriptor
        short_at = time.monotonic()
        statuses = [phone.call().final_status for _ in range(CALLS_WHILE_SHORT)]
        assert statuses.count(503) >= CALLS_WHILE_SHORT - 1, statuses
        assert set(statuses) <= {200, 503}, statuses
        refused = [e for e in daemon.events("call_setup_failed") if "NoRtpPort" in e["msg"]]
        assert len(refused) == statuses.count(503), daemon.log_text()[-3000:]

        ctl = stack.enter_context(subprocess.Popen(
            [*_ctl_command(), "--socket", daemon.control_socket, "status", "--timeout",
             str(BACKLOG_WAIT_S)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        ws = stack.enter_context(websocket_upgrade(ws_port))
        for component in ("rtp", "control", "listener"):
            wait_until(partial(events_of, daemon, "resource_shortage", component),
                       f"resource_shortage of {component}")
        wait_echo(peer_a, short_at)  # the call that was up is untouched
        time.sleep(1.0)  # the accept loops go on backing off: still one line each
        assert daemon.alive()

        set_fd_limits(daemon.pid, soft, hard)
        restored_at = time.monotonic()
        assert ctl.wait(timeout=BACKLOG_WAIT_S) == 0, ctl.stderr.read() if ctl.stderr else ""
        assert http_status(ws) == 101
        assert metrics_status(metrics_port) == 200
        live_call(phone, daemon, source)  # a new call is answered and echoed
        wait_echo(peer_a, restored_at)

    for component in ("rtp", "control", "listener"):
        (shortage,) = events_of(daemon, "resource_shortage", component)
        assert shortage["level"] == "error" and shortage["error"] == "EMFILE", shortage
    for component in ("rtp", "control"):
        (recovered,) = events_of(daemon, "resource_recovered", component)
        assert int(recovered["failures"]) >= 1, recovered
    assert "accept returned" not in daemon.log_text()  # trio's per-retry traceback
    assert daemon.terminate() == 0


# --- a request whose responses cannot fit one datagram ---------------------------------------

def big_invite(daemon: Daemon, source_port: int) -> bytes:
    """A real INVITE (RFC 3264 offer) that passed ``PROXY_VIAS`` proxies with long Vias."""
    invite = invite_request(daemon.sip_port, source_port, "big-invite-1", 40000)
    head, _, rest = invite.partition(b"\r\n")
    pad = b"x" * (PROXY_VIA_BYTES - 60)
    vias = b"".join(b"Via: SIP/2.0/UDP 10.0.0.%d:5060;branch=z9hG4bK-proxy%d;pad=%s\r\n"
                    % (i, i, pad) for i in range(PROXY_VIAS))
    top, _, others = rest.partition(b"\r\n")
    return b"\r\n".join((head, top, vias + others))


def test_invite_near_64kb_gets_a_minimal_513(start_daemon: StartDaemon) -> None:
    daemon = start_daemon(rtp_ports=10)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    invite = big_invite(daemon, port)
    assert 62_000 < len(invite) <= MAX_UDP_PAYLOAD_BYTES
    (answer,) = daemon.exchange(invite, source_port=port, timeout_s=5.0)
    assert status_code(answer) == 513, answer[:200]
    headers = headers_of(answer)
    assert len(headers["via"]) == 1 and "branch=z9hG4bK-big-invite-1" in headers["via"][0]
    assert headers["call-id"] == ["big-invite-1"] and headers["cseq"] == ["1 INVITE"]
    assert ";tag=" in headers["to"][0]
    assert len(answer) < 2048
    (bad,) = daemon.events("sip_bad_message")
    assert "513" in bad["msg"] and bad["call_id"] == "big-invite-1", bad
    assert daemon.events("sip_send_failed") == []
    (ok,) = daemon.exchange(options_request(daemon.sip_port, port, "after-big"),
                            source_port=port)
    assert status_code(ok) == 200


# --- journald going away and coming back -----------------------------------------------------

_JOURNALD_DRIVER = '''
import json, os, signal, subprocess, sys, time
from pathlib import Path
from tests.harness.daemon import running_daemon

SOCKET = "/run/systemd/journal/socket"

def journald_pids():
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                exe = os.readlink(f"/proc/{entry}/exe")
            except OSError:
                continue
            if exe == os.path.realpath(os.environ["JOURNALD"]):
                pids.append(int(entry))
    return pids

def wait(check, what):
    deadline = time.monotonic() + 15
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)

def reload(daemon, count):
    os.kill(daemon.pid, signal.SIGHUP)
    wait(lambda: len(daemon.events("reloaded")) >= count, f"reload {count} on stderr")

workdir = Path(sys.argv[1])
with running_daemon(workdir, {"log": {"target": "journal"}}, rtp_ports=10) as daemon:
    (pid,) = journald_pids()
    os.kill(pid, signal.SIGKILL)  # the namespace's journald: started by this test
    wait(lambda: not journald_pids(), "journald gone")
    reload(daemon, 1)
    reload(daemon, 2)
    before_restart = daemon.log_text()
    journald = subprocess.Popen([os.environ["JOURNALD"]], stderr=subprocess.DEVNULL)
    wait(lambda: os.path.exists(SOCKET) and journald_pids(), "journald back")
    time.sleep(0.5)  # its socket is bound once the file exists; give it a moment to read
    os.kill(daemon.pid, signal.SIGHUP)
    wait(lambda: daemon.events("journal_reachable"), "journal_reachable on stderr")
    (workdir / "stderr.json").write_text(json.dumps(
        {"before_restart": before_restart, "after": daemon.log_text()}))
'''


@pytest.mark.skipif(_skip_reason() is not None, reason=_skip_reason() or "")
def test_journald_down_logs_to_stderr_then_back(tmp_path: Path) -> None:
    driver = tmp_path / "journald_driver.py"
    driver.write_text(_JOURNALD_DRIVER)
    entries = run_with_journald(tmp_path, "EVENT=journal_reachable", sys.executable,
                                str(driver), str(tmp_path))
    (back,) = entries
    stderr = json.loads((tmp_path / "stderr.json").read_text())
    events = [line.split("event=", 1)[1].split(" ", 1)[0]
              for line in stderr["before_restart"].splitlines() if "event=" in line]
    # On a loaded machine the daemon may meet the namespace's journald not yet reading
    # at start-up: then "ready" (and a loop-lag warning) is on stderr too, and counted.
    watched = [e for e in events if e in ("journal_unreachable", "reloaded")]
    assert watched == ["journal_unreachable", "reloaded", "reloaded"], stderr["before_restart"]
    lines = stderr["after"].splitlines()
    marks = [i for i, line in enumerate(lines) if "event=journal_" in line]
    assert len(marks) == 2 and "event=journal_reachable" in lines[marks[1]], lines
    # Every record written to stderr while journald was away is counted (on a loaded
    # machine a loop-lag warning may join the two reloads).
    assert back["STDERR_RECORDS"] == str(marks[1] - marks[0] - 1), (back, lines)


# --- a listener the environment does not allow -------------------------------------------

@contextlib.contextmanager
def full_tmpfs() -> Iterator[Path]:
    """A tiny tmpfs with no inode and no block left; unmounted on the way out."""
    mount_point = Path(tempfile.mkdtemp(prefix="vg-full-"))  # short: AF_UNIX paths ≤ 107 B
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16k,nr_inodes=16", "tmpfs",
                           str(mount_point)], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        mount_point.rmdir()
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        with contextlib.suppress(OSError), (mount_point / "blocks").open("wb") as f:
            while True:  # ENOSPC ends it
                f.write(b"\0" * 4096)
                f.flush()
        for i in range(64):
            try:
                (mount_point / f"inode{i}").touch()
            except OSError:
                break
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], check=False)
        mount_point.rmdir()


def test_control_socket_on_a_full_filesystem_exits_73(start_daemon: StartDaemon) -> None:
    with full_tmpfs() as mount_point:
        path = mount_point / "control.sock"
        with pytest.raises(RuntimeError, match=rf"exit={EX_CANTCREAT}\)") as failed:
            start_daemon({"control": {"socket": str(path)}}, rtp_ports=10)
    message = str(failed.value)
    lines = [line for line in message.splitlines() if "event=listen_failed" in line]
    assert len(lines) == 1, message
    assert "[control] socket" in lines[0] and "No space left on device" in lines[0], lines
    assert "key=\"[control] socket\"" in lines[0], lines
