"""``voxgatectl`` against the real daemon: every command, exit codes, socket access, bad input.

Also the helpers other integration tests use to run ``voxgatectl``:
:func:`control_socket`, :func:`voxgatectl` and :func:`ctl_json`.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import socket
import stat
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.harness import requires
from tests.harness.audio import SpeechClip
from tests.harness.daemon import (
    REPO_ROOT,
    Daemon,
    PortRange,
    free_udp_port,
    options_request,
    running_daemon,
    status_code,
)
from tests.harness.sipp import Sipp, SippResult
from tests.integration.conftest import StartDaemon

ReservePorts = Callable[[int], PortRange]
CTL_TIMEOUT_S = 30.0
POLL_S = 0.1
NOBODY = 65534
SYSTEM_PYTHON = "/usr/bin/python3"
MAX_LINE_BYTES = 65_536
EX_REFUSED, EX_USAGE, EX_UNAVAILABLE, EX_TEMPFAIL, EX_BROKEN_PIPE = 1, 2, 69, 75, 141
RUN_DIR = Path("/run/voxgate")

# Run as another uid by setpriv: connect, send ``hello``, print the reply line
# or ``OSError <errno>``. Plain stdlib, for the system interpreter. A refusing
# daemon may answer and close before the request is sent: read the reply anyway.
_RAW_HELLO = """
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(10)
try:
    s.connect(sys.argv[1])
    try:
        s.sendall(b'{"id": 1, "cmd": "hello"}\\n')
    except (BrokenPipeError, ConnectionResetError):
        pass
    print(s.makefile("rb").readline().decode().strip())
except OSError as e:
    print(f"OSError {e.errno}")
"""


# --- helpers (also used by test_admission) --------------------------------------------------

def control_socket(daemon: Daemon) -> str:
    """The ``[control] socket`` path of ``daemon``'s config file."""
    path: str = tomllib.loads(daemon.config_path.read_text())["control"]["socket"]
    return path


def _ctl_command() -> list[str]:
    script = Path(sys.executable).parent / "voxgatectl"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "voxgate.control.cli"]


def _ctl_env() -> dict[str, str]:
    """An operator's environment: no socket, screen size (a pipe: 80 columns) or
    PYTHONUNBUFFERED."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("VOXGATE_CONTROL_SOCKET", "COLUMNS", "LINES", "PYTHONUNBUFFERED")}
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO_ROOT / "daemon"), env.get("PYTHONPATH", "")) if p
    )
    return env


def voxgatectl(
    socket_path: str, *args: str, timeout_s: float = CTL_TIMEOUT_S
) -> subprocess.CompletedProcess[str]:
    """Run ``voxgatectl --socket socket_path ARGS`` to completion; output captured as text."""
    return subprocess.run(
        [*_ctl_command(), "--socket", socket_path, *args],
        capture_output=True, text=True, timeout=timeout_s, env=_ctl_env(), check=False,
    )


def ctl_ok(daemon: Daemon, *args: str) -> str:
    """``voxgatectl ARGS`` on ``daemon``, asserted to exit 0; returns stdout."""
    done = voxgatectl(control_socket(daemon), *args)
    assert done.returncode == 0, f"voxgatectl {args}: exit {done.returncode}\n{done.stderr}"
    return done.stdout


def ctl_json(daemon: Daemon, *args: str) -> Any:
    """``voxgatectl --json ARGS`` on ``daemon``, asserted to exit 0; the parsed result."""
    return json.loads(ctl_ok(daemon, "--json", *args))


def health_json(daemon: Daemon) -> Any:
    """``voxgatectl --json health`` on ``daemon``, asserted to exit 0 when healthy and 3
    when not; the parsed result."""
    done = voxgatectl(control_socket(daemon), "--json", "health")
    health = json.loads(done.stdout)
    assert done.returncode == (0 if health["healthy"] else 3), (
        f"voxgatectl health: exit {done.returncode}\n{done.stderr}")
    return health


def wait_until(check: Callable[[], Any], what: str, timeout_s: float = 10.0) -> Any:
    """Poll ``check`` until it returns something truthy, and return that.

    Raises:
        AssertionError: naming ``what``, when ``timeout_s`` passed first.
    """
    deadline = time.monotonic() + timeout_s
    while not (result := check()):
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(POLL_S)
    return result


# --- local helpers ----------------------------------------------------------------------------

def _sipp(scenario: str, daemon: Daemon, workdir: Path, media: PortRange, clip: SpeechClip,
          *, calls: int = 1, duration_ms: int = 1000) -> Sipp:
    return Sipp(scenario, daemon.sip_address, workdir=workdir, local_port=free_udp_port(),
                media_port=media.first, clip=clip, calls=calls, limit=calls, rate=10,
                duration_ms=duration_ms, timeout_s=40.0)


def _sessions(daemon: Daemon, count: int) -> list[dict[str, Any]]:
    def listed() -> list[dict[str, Any]] | None:
        sessions: list[dict[str, Any]] = ctl_json(daemon, "sessions")
        return sessions if len(sessions) == count else None
    result: list[dict[str, Any]] = wait_until(listed, f"{count} sessions")
    return result


def _assert_all_ok(result: SippResult, calls: int) -> None:
    assert result.returncode == 0, result.describe()
    assert result.successful_calls == calls, result.describe()


def _raw_control(path: str, data: bytes, replies: int | None) -> list[dict[str, Any]]:
    """Send ``data`` on a fresh connection; read ``replies`` reply lines (None: until EOF)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(path)
        s.sendall(data)
        reader = s.makefile("rb")
        lines = reader.readlines() if replies is None else [reader.readline()
                                                             for _ in range(replies)]
    return [json.loads(line) for line in lines if line]


def _sip_still_answers(daemon: Daemon) -> None:
    answer = daemon.exchange(options_request(daemon.sip_port, free_udp_port(), "probe-after"))
    assert answer and status_code(answer[0]) == 200, answer


# --- tests ----------------------------------------------------------------------------------------

@requires("sipp")
def test_every_command_with_and_without_json(
    start_daemon: StartDaemon, reserve_ports: ReservePorts, clip: SpeechClip, tmp_path: Path
) -> None:
    daemon = start_daemon()
    path = control_socket(daemon)
    with _sipp("uac_wait_bye", daemon, tmp_path / "sipp", reserve_ports(8), clip,
               calls=2) as sipp:
        first, second = _sessions(daemon, 2)
        ids = sorted(s["id"] for s in (first, second))

        status = ctl_json(daemon, "status")
        assert status["state"] == "running" and status["admitting"] is True, status
        assert status["sessions"]["active"] == 2, status
        assert status["limits"]["max_sessions"] == 100, status
        assert status["config"] == str(daemon.config_path), status
        human = ctl_ok(daemon, "status")
        assert re.search(r"^state:\s+running$", human, re.M), human
        assert "2 active, 0 queued" in human, human
        assert max(map(len, human.splitlines())) <= 80, human
        # The common options go after the command too (`systemctl status --json` style).
        assert json.loads(ctl_ok(daemon, "status", "--json"))["sessions"]["active"] == 2

        assert {s["tenant"] for s in (first, second)} == {"default"}
        assert {s["transport"] for s in (first, second)} == {"sip"}
        human = ctl_ok(daemon, "sessions")
        assert human.splitlines()[0].split()[:3] == ["ID", "CALL-ID", "TENANT"], human
        assert all(sid in human for sid in ids), human

        def streaming() -> dict[str, Any] | None:
            shown: dict[str, Any] = ctl_json(daemon, "show", ids[0])
            return shown if shown["stats"]["packets_out"] > 0 else None
        shown = wait_until(streaming, "echoed RTP in show's stats.packets_out")
        assert shown["id"] == ids[0] and shown["stats"]["packets_in"] > 0, shown
        assert shown["codec"] == "PCMU" and shown["state"] == "active", shown
        human = ctl_ok(daemon, "show", ids[0])
        out = re.search(r"^\s+packets_out: (\d+)$", human, re.M)
        assert out is not None and int(out.group(1)) > 0, human

        health = health_json(daemon)
        assert health["healthy"] is True and "memory" in health["components"], health
        assert ctl_ok(daemon, "health").startswith("healthy"), "health"

        metrics = ctl_json(daemon, "metrics")["text"]
        assert 'voxgate_sessions_active{tenant="default",transport="sip"} 2.0' in metrics
        assert "voxgate_rtp_packets_total" in ctl_ok(daemon, "metrics")

        hello = ctl_json(daemon, "hello")
        assert hello["daemon"] == "voxgated" and hello["protocol"] == 1, hello
        assert re.fullmatch(r"voxgated \S+ \(protocol 1\)\n", ctl_ok(daemon, "hello"))

        lines = ctl_ok(daemon, "--json", "top", "--iterations", "2").splitlines()
        assert len(lines) == 2, lines
        assert all(json.loads(x)["status"]["sessions"]["active"] == 2 for x in lines), lines
        human = ctl_ok(daemon, "top", "--iterations", "2")
        assert human.count("voxgate top") == 2 and ids[1] in human, human
        assert max(map(len, human.splitlines())) <= 80, human

        assert ctl_json(daemon, "reload")["message"] == "config reloaded"
        assert ctl_ok(daemon, "reload").strip() == "config reloaded"

        assert "2 sessions in progress" in ctl_ok(daemon, "drain")
        assert ctl_json(daemon, "status")["state"] == "draining"
        assert ctl_ok(daemon, "resume").strip() == "admitting calls again"
        assert ctl_json(daemon, "drain")["message"].startswith("draining")
        assert ctl_json(daemon, "resume") == {"message": "admitting calls again"}
        assert ctl_json(daemon, "status")["state"] == "running"
        assert ctl_json(daemon, "sessions") and len(ctl_json(daemon, "sessions")) == 2

        assert ctl_json(daemon, "hangup", ids[0])["message"].endswith("(reason operator)")
        assert ids[1] in ctl_ok(daemon, "hangup", ids[1])
        # The SIPp callers' scenario succeeds only by receiving the daemon's BYE.
        _assert_all_ok(sipp.wait(), 2)
    daemon.wait_log(r"event=call_end\b.*\breason=operator\b", count=2)
    assert ctl_json(daemon, "sessions") == []
    # An ended call is shown from its record (issue: show works for calls up and ended).
    ended = ctl_json(daemon, "show", ids[0])
    assert "stats" not in ended and ended["record"]["reason"] == "operator", ended
    assert voxgatectl(path, "show", "no-such-call").returncode == EX_REFUSED


@requires("sipp")
def test_drain_wait_returns_when_the_last_call_ended(
    start_daemon: StartDaemon, reserve_ports: ReservePorts, clip: SpeechClip, tmp_path: Path
) -> None:
    daemon = start_daemon()
    media = reserve_ports(4)
    for json_flag in ((), ("--json",)):
        workdir = tmp_path / f"sipp{len(json_flag)}"
        with _sipp("uac_echo", daemon, workdir, media, clip, duration_ms=2500) as sipp:
            _sessions(daemon, 1)
            done = voxgatectl(control_socket(daemon), *json_flag, "drain", "--wait")
            assert done.returncode == 0, done.stderr
            # --wait polls until no session is left: the call is over when it returns.
            assert ctl_json(daemon, "status")["sessions"]["active"] == 0
            _assert_all_ok(sipp.wait(), 1)
        progress = done.stderr if json_flag else done.stdout
        assert "1 session left of 1" in progress and "0 sessions left of 1" in progress, done
        if not json_flag:
            assert "1 session in progress" in done.stdout.splitlines()[0], done.stdout
        assert progress.rstrip().endswith("drain done"), done
        if json_flag:
            assert json.loads(done.stdout)["message"].startswith("draining"), done.stdout
        assert ctl_json(daemon, "status")["state"] == "draining"
        ctl_ok(daemon, "resume")
    daemon.wait_log(r"event=call_end\b.*\breason=bye\b", count=2)


def test_exit_codes(start_daemon: StartDaemon, tmp_path: Path) -> None:
    daemon = start_daemon()
    path = control_socket(daemon)

    refusals: list[tuple[str, ...]] = [
        ("show", "nosuch"), ("--json", "show", "nosuch"), ("hangup", "nosuch")]
    for args in refusals:
        done = voxgatectl(path, *args)
        assert done.returncode == EX_REFUSED, done
        assert "no session 'nosuch'" in done.stderr and "(not-found)" in done.stderr, done
        assert done.stdout == "", done

    for args in [(), ("show",), ("frobnicate",), ("top", "--iterations", "x")]:
        done = voxgatectl(path, *args)
        assert done.returncode == EX_USAGE, done
        assert "usage: voxgatectl" in done.stderr, done

    missing = str(tmp_path / "absent.sock")
    done = voxgatectl(missing, "status")
    assert done.returncode == EX_UNAVAILABLE, done
    assert missing in done.stderr and "is voxgated running?" in done.stderr, done

    assert daemon.terminate() == 0
    done = voxgatectl(path, "--json", "status")
    assert done.returncode == EX_UNAVAILABLE, done
    assert path in done.stderr, done
    assert not os.path.exists(path), "the daemon left its socket file behind"


@requires("setpriv")
def test_socket_mode_and_other_uids(start_daemon: StartDaemon) -> None:
    daemon = start_daemon()
    path = control_socket(daemon)
    st = os.stat(path)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o660, oct(st.st_mode)
    os.chmod(os.path.dirname(path), 0o711)  # the harness's mkdtemp is 0700: let nobody in

    def as_nobody() -> str:
        done = subprocess.run(
            ["setpriv", "--reuid", str(NOBODY), "--regid", str(NOBODY), "--clear-groups",
             SYSTEM_PYTHON, "-c", _RAW_HELLO, path],
            capture_output=True, text=True, timeout=CTL_TIMEOUT_S, cwd="/", check=False,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    # 0660 root:root: the kernel refuses the connection (EACCES) before the daemon sees it.
    assert as_nobody() == "OSError 13"
    # With the file opened up, the daemon's own SO_PEERCRED check still says no.
    os.chmod(path, 0o666)
    said = as_nobody()
    assert said.startswith("{"), said
    reply = json.loads(said)
    assert reply["ok"] is False and reply["error"]["code"] == "forbidden", reply
    assert f"uid {NOBODY}" in reply["error"]["message"], reply
    forbidden = daemon.wait_log(r"event=control_forbidden\b")
    assert f"uid={NOBODY}" in forbidden.string
    assert ctl_json(daemon, "hello")["daemon"] == "voxgated"  # root still served


@requires("setpriv")
def test_control_group_members_are_served(start_daemon: StartDaemon) -> None:
    daemon = start_daemon({"control": {"group": "nogroup"}})
    path = control_socket(daemon)
    st = os.stat(path)
    assert stat.S_IMODE(st.st_mode) == 0o660 and st.st_gid == NOBODY, (oct(st.st_mode), st)
    os.chmod(os.path.dirname(path), 0o711)
    done = subprocess.run(
        ["setpriv", "--reuid", str(NOBODY), "--regid", str(NOBODY), "--clear-groups",
         SYSTEM_PYTHON, "-c", _RAW_HELLO, path],
        capture_output=True, text=True, timeout=CTL_TIMEOUT_S, cwd="/", check=False,
    )
    reply = json.loads(done.stdout)
    assert reply["ok"] is True and reply["result"]["daemon"] == "voxgated", reply
    assert not daemon.events("control_forbidden")


def test_bad_input_gets_error_replies_and_the_daemon_keeps_serving(
    start_daemon: StartDaemon,
) -> None:
    daemon = start_daemon()
    path = control_socket(daemon)

    # Malformed JSON and garbage bytes: an error reply each, the connection stays usable.
    replies = _raw_control(path, b'{"id": 1, "cmd": \n\xff\xfe\x00garbage\x80\n'
                                 b'[1, 2]\n{"id": 4, "cmd": "nosuch"}\n'
                                 b'{"id": 5, "cmd": "hello"}\n', 5)
    assert [r["ok"] for r in replies] == [False, False, False, False, True], replies
    assert [r.get("error", {}).get("code") for r in replies[:4]] == [
        "bad-json", "bad-json", "bad-request", "unknown-command"], replies
    assert replies[3]["id"] == 4 and replies[4]["id"] == 5, replies

    # An oversized line: one too-large reply, then the daemon closes the connection.
    replies = _raw_control(path, b"x" * (MAX_LINE_BYTES + 4096), None)
    assert len(replies) == 1, replies
    assert replies[0]["ok"] is False and replies[0]["error"]["code"] == "too-large", replies
    assert replies[0]["id"] is None

    # A client that connects and leaves without a word.
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(path)
        s.sendall(b'{"id": 1, "cmd": "hel')

    assert daemon.alive()
    assert ctl_json(daemon, "hello")["protocol"] == 1
    assert ctl_json(daemon, "status")["state"] == "running"
    _sip_still_answers(daemon)
    assert not daemon.events("control_connection_failed")
    assert not daemon.events("control_internal_error")


@pytest.mark.parametrize("command", ["status", "sessions", "health", "metrics", "hello"])
def test_read_only_commands_before_any_call(start_daemon: StartDaemon, command: str) -> None:
    daemon = start_daemon({"limits": {"max_sessions": 7}})
    result = ctl_json(daemon, command)
    expected: Callable[[Any], bool] = {
        "status": lambda r: r["sessions"] == {"active": 0, "queued": 0, "by_tenant": {
            "default": {"active": 0, "queued": 0, "max_sessions": None}}}
            and r["limits"]["max_sessions"] == 7,
        "sessions": lambda r: r == [],
        "health": lambda r: r["healthy"] is True,
        "metrics": lambda r: "voxgate_queue_depth 0.0" in r["text"],
        "hello": lambda r: r["daemon"] == "voxgated",
    }[command]
    assert expected(result), result
    human = ctl_ok(daemon, command)
    assert human.strip(), command
    if command == "sessions":
        assert human.strip() == "no sessions"


@requires("sipp")
def test_drain_wait_timeout_leaves_the_call_up(
    start_daemon: StartDaemon, reserve_ports: ReservePorts, clip: SpeechClip, tmp_path: Path
) -> None:
    daemon = start_daemon()
    with _sipp("uac_wait_bye", daemon, tmp_path / "sipp", reserve_ports(4), clip) as sipp:
        (session,) = _sessions(daemon, 1)
        done = voxgatectl(control_socket(daemon), "drain", "--wait", "--timeout", "1")
        assert done.returncode == EX_TEMPFAIL, done
        assert done.stderr == ("voxgatectl: drain: 1 session still up after 1 s; "
                               "the drain goes on\n"), done.stderr
        assert "] 1 session left of 1" in done.stdout, done.stdout
        status = ctl_json(daemon, "status")
        assert status["state"] == "draining" and status["sessions"]["active"] == 1, status
        ctl_ok(daemon, "hangup", session["id"])
        _assert_all_ok(sipp.wait(), 1)


def test_instance_socket_and_pipes(tmp_path: Path) -> None:
    """``-i N`` finds voxgate@N's socket (/run/voxgate/N/control.sock); output piped to a
    reader that goes away ends without a traceback."""
    if not os.access(RUN_DIR.parent, os.W_OK):
        pytest.skip(f"needs to write {RUN_DIR.parent}")
    instance = f"test-{secrets.token_hex(4)}"
    made_run_dir = not RUN_DIR.exists()
    overrides = {"control": {"socket": str(RUN_DIR / instance / "control.sock")}}
    try:
        with running_daemon(tmp_path / "daemon", overrides, rtp_ports=10):
            ctl = _ctl_command()

            def run(argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[Any]:
                return subprocess.run(argv, env=_ctl_env(), timeout=CTL_TIMEOUT_S,
                                      check=False, **kwargs)

            for args in (("-i", instance, "status", "--json"),
                         ("--json", "status", "--instance", instance)):
                done = run([*ctl, *args], capture_output=True, text=True)
                assert done.returncode == 0, done
                assert json.loads(done.stdout)["state"] == "running", done.stdout

            done = run(["bash", "-c", 'set -o pipefail; "$@" | head -1', "sh", *ctl, "-i",
                        instance, "status"], capture_output=True, text=True)
            assert (done.stdout, done.stderr) == ("state:     running\n", ""), done
            read_end, write_end = os.pipe()
            os.close(read_end)  # the reader is gone before the first byte, for certain
            try:
                for command in (["status"], ["calls", "--limit", "1000"], ["metrics"]):
                    done = run([*ctl, "-i", instance, *command], stdout=write_end,
                               stderr=subprocess.PIPE)
                    assert (done.returncode, done.stderr) == (EX_BROKEN_PIPE, b""), done
            finally:
                os.close(write_end)
    finally:
        shutil.rmtree(RUN_DIR / instance, ignore_errors=True)
        if made_run_dir:
            with contextlib.suppress(OSError):
                RUN_DIR.rmdir()
