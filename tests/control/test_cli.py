"""voxgatectl as a subprocess against a real ControlServer with fake handlers."""

from __future__ import annotations

import json
import os
import re
import select
import socket
import subprocess
import sys
import termios
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import pytest
import trio

import voxgate
from voxgate.control.cli import CLEAR_SCREEN, progress_bar, render_mapping, table
from voxgate.control.server import CommandError, ControlServer

DAEMON_SRC = str(Path(__file__).resolve().parents[2] / "daemon")


LONG_CALL_ID = "a84b4c76e66710-4c1f-9a5e-6d3b2f0e8a11@pbx-frontend-17.example.net"


class FakeDaemon:
    """Handlers with canned results; ``status`` counts sessions down while draining."""

    def __init__(self) -> None:
        self.active = 3
        self.draining = False
        self.stuck = False
        """Sessions never end, draining or not."""
        self.status_calls = 0

    async def status(self, args):
        self.status_calls += 1
        result = {
            "state": "draining" if self.draining else "running",
            "sessions": {"active": self.active, "queued": 1,
                         "by_tenant": {"default": {"active": self.active, "queued": 1,
                                                   "max_sessions": None}}},
            "limits": {"max_sessions": 10, "queue_size": 5, "queue_timeout_s": 5.0,
                       "retry_after_s": 5, "default_tenant_max_sessions": None,
                       "drain_timeout_s": 30},
            "health": {"healthy": True, "components": {"sip": {"healthy": True,
                                                               "detail": "listening"}}},
            "admission": {"counters": [{"result": "refused", "reason": "full",
                                        "tenant": "default", "count": 7}]},
            "future_key": "ignored",
        }
        if self.draining and self.active > 0 and not self.stuck:
            self.active -= 1
        return result

    async def sessions(self, args):
        return [
            {"id": "s1", "call_id": "abc@pbx", "tenant": "default", "transport": "sip",
             "state": "active", "codec": "PCMU", "age_s": 65.2, "remote": "10.0.0.5:4000"},
            {"id": "s2", "call_id": "def@pbx", "tenant": "acme", "transport": "websocket",
             "state": "ringing", "codec": "PCMA", "age_s": 3.04, "remote": None},
            {"id": "5f0c2a9e17b3", "call_id": LONG_CALL_ID, "tenant": "acme",
             "transport": "sip", "state": "active", "codec": "PCMU", "age_s": 4000.0,
             "remote": "[2001:db8:85a3::8a2e:370:7334]:40000"},
        ]

    async def show(self, args):
        if args.get("id") != "s1":
            raise CommandError("not-found", f"no session {args.get('id')}")
        return {"id": "s1", "state": "active", "stats": {"packets_in": 100, "jitter_ms": 2.5}}

    async def hangup(self, args):
        return {"message": f"session {args['id']} hung up"}

    async def drain(self, args):
        self.draining = True
        return {"message": "draining"}

    async def resume(self, args):
        self.draining = False
        return {"message": "resumed"}

    async def reload(self, args):
        raise CommandError("reload-failed", "voxgate.toml: [limits] max_sessions: must be > 0")

    async def health(self, args):
        return {"healthy": False, "components": {"agent": {"healthy": False,
                                                           "detail": "provider down"}}}

    async def metrics(self, args):
        return {"text": "# TYPE voxgate_sessions_active gauge\nvoxgate_sessions_active 3\n"}

    async def calls(self, args):
        return [{"session_id": f"s{i}", "call_id": f"c{i}@pbx", "transport": "sip",
                 "tenant": "default", "state": "ended", "reason": "bye",
                 "started_at": "2026-12-05T07:00:00.000000Z", "duration_s": 1.0}
                for i in range(args.get("limit", 50))]

    def handlers(self) -> dict[str, Callable[..., Any]]:
        names = ("status", "sessions", "show", "hangup", "drain", "resume", "reload",
                 "health", "metrics", "calls")
        return {name: getattr(self, name) for name in names}


@pytest.fixture
def daemon(tmp_path) -> Iterator[tuple[FakeDaemon, str]]:
    """A ControlServer on its own Trio loop in a thread."""
    fake = FakeDaemon()
    path = str(tmp_path / "c.sock")
    ready = threading.Event()
    loop: dict[str, Any] = {}

    async def serve() -> None:
        server = ControlServer(path, fake.handlers(), group=None, version="0.1.0-test")
        async with trio.open_nursery() as nursery:
            loop["token"] = trio.lowlevel.current_trio_token()
            loop["scope"] = nursery.cancel_scope
            await nursery.start(server.run)
            ready.set()

    thread = threading.Thread(target=trio.run, args=(serve,))
    thread.start()
    assert ready.wait(10)
    yield fake, path
    trio.from_thread.run_sync(loop["scope"].cancel, trio_token=loop["token"])
    thread.join(10)


def _env() -> dict[str, str]:
    """This environment without the socket, the screen size (output is a pipe: 80) and
    PYTHONUNBUFFERED (an operator's shell has none: output is written at exit)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("VOXGATE_CONTROL_SOCKET", "COLUMNS", "LINES", "PYTHONUNBUFFERED")}
    env["PYTHONPATH"] = DAEMON_SRC
    return env


def voxgatectl(*argv: str, socket_env: str | None = None) -> subprocess.CompletedProcess[str]:
    env = _env()
    if socket_env is not None:
        env["VOXGATE_CONTROL_SOCKET"] = socket_env
    return subprocess.run([sys.executable, "-m", "voxgate.control.cli", *argv],
                          capture_output=True, text=True, timeout=60, env=env)


# (argv, what the human output shows, a check on the --json result)
CASES = [
    (["status"], ["state:     running", "3 active, 1 queued", "max_sessions=10 queue_size=5",
                  "TENANT", "default", "refused", "full", "7"],
     lambda r: r["sessions"]["active"] == 3),
    (["sessions"], ["CALL-ID", "abc@pbx", "1m05s", "3.0s", "10.0.0.5:4000", "websocket"],
     lambda r: [s["id"] for s in r] == ["s1", "s2", "5f0c2a9e17b3"]),
    (["show", "s1"], ["id: s1", "stats:", "  packets_in: 100", "  jitter_ms: 2.5"],
     lambda r: r["stats"]["packets_in"] == 100),
    (["hangup", "s2"], ["session s2 hung up"], lambda r: r == {"message": "session s2 hung up"}),
    (["drain"], ["draining"], lambda r: r == {"message": "draining"}),
    (["resume"], ["resumed"], lambda r: r == {"message": "resumed"}),
    (["health"], ["UNHEALTHY", "agent", "provider down"], lambda r: r["healthy"] is False),
    (["metrics"], ["# TYPE voxgate_sessions_active gauge\nvoxgate_sessions_active 3\n"],
     lambda r: r["text"].endswith("voxgate_sessions_active 3\n")),
    (["hello"], ["voxgated 0.1.0-test (protocol 1)"],
     lambda r: r == {"protocol": 1, "daemon": "voxgated", "version": "0.1.0-test"}),
]


@pytest.mark.parametrize(("argv", "shows", "check"), CASES, ids=[c[0][0] for c in CASES])
def test_command_human_and_json(daemon, argv, shows, check):
    _, path = daemon
    exit_code = 3 if argv == ["health"] else 0  # the fake daemon's health is unhealthy
    human = voxgatectl("--socket", path, *argv)
    assert human.returncode == exit_code, human.stderr
    for text in shows:
        assert text in human.stdout
    assert "future_key" not in human.stdout
    raw = voxgatectl("--socket", path, "--json", *argv)
    assert raw.returncode == exit_code, raw.stderr
    assert check(json.loads(raw.stdout))


def test_socket_from_environment(daemon):
    _, path = daemon
    out = voxgatectl("hello", socket_env=path)
    assert out.returncode == 0
    assert "voxgated" in out.stdout


def test_daemon_says_no_exits_1(daemon):
    _, path = daemon
    out = voxgatectl("--socket", path, "show", "nope")
    assert out.returncode == 1
    assert out.stderr.strip() == "voxgatectl: show: no session nope (not-found)"
    out = voxgatectl("--socket", path, "reload")
    assert out.returncode == 1
    assert "(reload-failed)" in out.stderr
    assert "max_sessions: must be > 0" in out.stderr


@pytest.mark.parametrize("argv", [[], ["show"], ["frobnicate"], ["top", "--iterations", "x"]])
def test_usage_errors_exit_2(argv):
    out = voxgatectl("--socket", "/nonexistent/c.sock", *argv)
    assert out.returncode == 2
    assert "usage: voxgatectl" in out.stderr


def test_unreachable_daemon_exits_69(tmp_path):
    path = str(tmp_path / "missing.sock")
    out = voxgatectl("--socket", path, "status")
    assert out.returncode == 69
    assert out.stderr.strip() == (f"voxgatectl: cannot connect to {path}: "
                                  "No such file or directory (is voxgated running?)")
    out = voxgatectl("status", socket_env=path)
    assert out.returncode == 69
    assert path in out.stderr


def test_garbage_reply_exits_69(tmp_path):
    path = str(tmp_path / "junk.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(path)
        listener.listen(1)

        def answer_junk() -> None:
            conn, _ = listener.accept()
            with conn:
                conn.recv(65536)
                conn.sendall(b"HTTP/1.1 400 Bad Request\n")

        thread = threading.Thread(target=answer_junk)
        thread.start()
        out = voxgatectl("--socket", path, "status")
        thread.join(10)
    assert out.returncode == 69
    assert "bad reply" in out.stderr


def test_top_refreshes_until_iterations(daemon):
    fake, path = daemon
    out = voxgatectl("--socket", path, "top", "--iterations", "2")
    assert out.returncode == 0, out.stderr
    assert out.stdout.count(CLEAR_SCREEN) == 2
    assert out.stdout.count("abc@pbx") == 2
    assert "state:     running" in out.stdout
    assert "refused" in out.stdout
    assert fake.status_calls == 2


def test_top_json_prints_one_snapshot_per_refresh(daemon):
    _, path = daemon
    out = voxgatectl("--socket", path, "--json", "top", "--iterations", "2")
    assert out.returncode == 0
    snapshots = [json.loads(line) for line in out.stdout.splitlines()]
    assert len(snapshots) == 2
    assert snapshots[0]["sessions"][0]["id"] == "s1"


def test_drain_wait_draws_progress_until_empty(daemon):
    fake, path = daemon
    out = voxgatectl("--socket", path, "drain", "--wait")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "draining"
    assert lines[-1] == "drain done"
    left = [int(m.group(1)) for m in map(re.compile(r"\] (\d+) sessions? left of 3").search, lines)
            if m]
    assert left == [3, 2, 1, 0]
    assert fake.active == 0


def test_progress_bar():
    assert progress_bar(5, 10) == "[##########----------] 5 sessions left of 10"
    assert progress_bar(10, 10) == "[--------------------] 10 sessions left of 10"
    assert progress_bar(1, 2) == "[##########----------] 1 session left of 2"
    assert progress_bar(0, 0) == "[####################] 0 sessions left of 0"


def test_render_mapping_nests_and_table_aligns():
    assert render_mapping({"a": 1, "b": {"c": None, "d": {"e": True}}}) == \
        "a: 1\nb:\n  c: -\n  d:\n    e: yes"
    assert table(("X", "LONGER"), [("abc", 1)]) == "X    LONGER\nabc  1"


def test_common_options_go_before_or_after_the_command(daemon):
    _, path = daemon
    after = voxgatectl("status", "--json", "--socket", path)
    assert after.returncode == 0, after.stderr
    assert json.loads(after.stdout)["sessions"]["active"] == 3
    before = voxgatectl("--json", "--socket", path, "calls", "--limit", "2")
    assert [c["session_id"] for c in json.loads(before.stdout)] == ["s0", "s1"]


def test_version_and_instance_socket():
    version = voxgatectl("--version")
    assert (version.returncode, version.stdout) == (0, f"voxgatectl {voxgate.__version__}\n")
    for argv in (["status", "-i", "7"], ["--instance", "7", "--json", "status"]):
        instance = voxgatectl(*argv)
        assert instance.returncode == 69, instance
        assert "cannot connect to /run/voxgate/7/control.sock" in instance.stderr
    for bad in ("../x", "a/b", ""):
        assert voxgatectl("-i", bad, "status").returncode == 2, bad
    assert voxgatectl("-i", "1", "--socket", "/x", "status").returncode == 2


def test_a_closed_pipe_ends_quietly(daemon):
    _, path = daemon
    proc = subprocess.Popen([sys.executable, "-m", "voxgate.control.cli", "--socket", path,
                             "calls", "--limit", "5000"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=_env())
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.readline()
    proc.stdout.close()  # as `| head -1` does
    stderr = proc.stderr.read().decode()
    proc.stderr.close()
    assert proc.wait(timeout=60) == 141
    assert "Traceback" not in stderr and "BrokenPipeError" not in stderr


@pytest.mark.parametrize("argv", [["drain", "--wait", "--timeout", "0.3"],
                                  ["--timeout", "0.3", "drain", "--wait"]])
def test_drain_wait_gives_up_at_its_timeout(daemon, argv):
    fake, path = daemon
    fake.active, fake.stuck = 1, True
    out = voxgatectl("--socket", path, *argv)
    assert out.returncode == 75, out
    assert out.stdout.splitlines()[:2] == ["draining", "[--------------------] 1 session left of 1"]
    assert out.stderr == ("voxgatectl: drain: 1 session still up after 0.3 s; "
                          "the drain goes on\n")
    assert fake.draining and fake.status_calls >= 1


@pytest.mark.parametrize("value", ["0", "-1", "soon", "inf"])
def test_timeout_must_be_seconds_above_zero(value):
    out = voxgatectl("--socket", "/nonexistent/c.sock", "drain", "--wait", "--timeout", value)
    assert out.returncode == 2
    assert "not a number of seconds above 0" in out.stderr


def test_a_closed_pipe_after_a_short_output_ends_quietly(daemon):
    """``status`` fits Python's stdout buffer: the write, and EPIPE, come at the end."""
    _, path = daemon
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the first byte, for certain
    try:
        done = subprocess.run([sys.executable, "-m", "voxgate.control.cli", "--socket", path,
                               "status"], stdout=write_end, stderr=subprocess.PIPE, env=_env(),
                              timeout=60, check=False)
    finally:
        os.close(write_end)
    assert done.returncode == 141
    assert done.stderr == b""


def test_status_piped_to_head_in_a_shell(daemon):
    _, path = daemon
    done = subprocess.run(["bash", "-c", 'set -o pipefail; "$@" | head -1', "sh",
                           sys.executable, "-m", "voxgate.control.cli", "--socket", path,
                           "status"], capture_output=True, text=True, env=_env(), timeout=60,
                          check=False)
    assert done.stdout == "state:     running\n"
    assert done.stderr == ""
    assert done.returncode in (0, 141)  # 141 when head left before the last write


def test_status_and_top_fit_80_columns(daemon):
    fake, path = daemon
    status = voxgatectl("--socket", path, "status")
    assert max(map(len, status.stdout.splitlines())) <= 80, status.stdout
    assert "\n           default_tenant_max_sessions=- drain_timeout_s=30\n" in status.stdout
    top = voxgatectl("--socket", path, "top", "--iterations", "1")
    lines = top.stdout.removeprefix(CLEAR_SCREEN).splitlines()
    assert max(map(len, lines)) == 80, top.stdout  # the long Call-ID is cut at the edge
    (row,) = [line for line in lines if line.startswith("5f0c2a9e17b3")]
    assert row.split()[:6] == ["5f0c2a9e17b3", "acme", "sip", "active", "PCMU", "1h06m"]
    assert LONG_CALL_ID.startswith(row.split()[6])
    assert "(Ctrl-C to quit)" in lines[0]  # stdin is not a terminal


def _frames(stream: IO[bytes], count: int, timeout_s: float = 30.0) -> bytes:
    """Read ``stream`` until ``count`` more top frames began (or EOF, or the timeout)."""
    data = b""
    deadline = time.monotonic() + timeout_s
    while data.count(CLEAR_SCREEN.encode()) < count and time.monotonic() < deadline:
        if select.select([stream], [], [], deadline - time.monotonic())[0]:
            chunk = os.read(stream.fileno(), 65536)
            if not chunk:
                break
            data += chunk
    return data


def test_top_quits_on_q_from_the_terminal(daemon):
    fake, path = daemon
    controller, terminal = os.openpty()
    saved = termios.tcgetattr(terminal)
    proc = subprocess.Popen([sys.executable, "-m", "voxgate.control.cli", "--socket", path,
                             "top"], stdin=terminal, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=_env())
    try:
        assert proc.stdout is not None
        assert b"(q to quit)" in _frames(proc.stdout, 1)
        os.write(controller, b"x")  # not q: top goes on
        assert _frames(proc.stdout, 2).count(CLEAR_SCREEN.encode()) == 2
        os.write(controller, b"q")
        assert proc.wait(timeout=30) == 0
        assert termios.tcgetattr(terminal) == saved  # echo and line mode are back
        assert proc.communicate(timeout=30)[1] == b""
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(controller)
        os.close(terminal)
