"""voxgatectl as a subprocess against a real ControlServer with fake handlers."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from voxgate.control.cli import CLEAR_SCREEN, progress_bar, render_mapping, table
from voxgate.control.server import CommandError, ControlServer

DAEMON_SRC = str(Path(__file__).resolve().parents[2] / "daemon")


class FakeDaemon:
    """Handlers with canned results; ``status`` counts sessions down while draining."""

    def __init__(self) -> None:
        self.active = 3
        self.draining = False
        self.status_calls = 0

    async def status(self, args):
        self.status_calls += 1
        result = {
            "state": "draining" if self.draining else "running",
            "sessions": {"active": self.active, "queued": 1,
                         "by_tenant": {"default": {"active": self.active, "queued": 1,
                                                   "max_sessions": None}}},
            "limits": {"max_sessions": 10, "queue_size": 5},
            "health": {"healthy": True, "components": {"sip": {"healthy": True,
                                                               "detail": "listening"}}},
            "admission": {"counters": [{"result": "refused", "reason": "full",
                                        "tenant": "default", "count": 7}]},
            "future_key": "ignored",
        }
        if self.draining and self.active > 0:
            self.active -= 1
        return result

    async def sessions(self, args):
        return [
            {"id": "s1", "call_id": "abc@pbx", "tenant": "default", "transport": "sip",
             "state": "active", "codec": "PCMU", "age_s": 65.2, "remote": "10.0.0.5:4000"},
            {"id": "s2", "call_id": "def@pbx", "tenant": "acme", "transport": "websocket",
             "state": "ringing", "codec": "PCMA", "age_s": 3.04, "remote": None},
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


def voxgatectl(*argv: str, socket_env: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "VOXGATE_CONTROL_SOCKET"}
    env["PYTHONPATH"] = DAEMON_SRC
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
     lambda r: [s["id"] for s in r] == ["s1", "s2"]),
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
    human = voxgatectl("--socket", path, *argv)
    assert human.returncode == 0, human.stderr
    for text in shows:
        assert text in human.stdout
    assert "future_key" not in human.stdout
    raw = voxgatectl("--socket", path, "--json", *argv)
    assert raw.returncode == 0, raw.stderr
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
    left = [int(m.group(1)) for m in map(re.compile(r"\] (\d+)/3 sessions left").search, lines)
            if m]
    assert left == [3, 2, 1, 0]
    assert fake.active == 0


def test_progress_bar():
    assert progress_bar(5, 10) == "[##########----------] 5/10 sessions left"
    assert progress_bar(10, 10) == "[--------------------] 10/10 sessions left"
    assert progress_bar(0, 0) == "[####################] 0/0 sessions left"


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
    assert version.returncode == 0 and version.stdout.strip().startswith("voxgatectl ")
    instance = voxgatectl("status", "-i", "7")
    assert instance.returncode == 69
    assert "/run/voxgate/7/control.sock" in instance.stderr


def test_a_closed_pipe_ends_quietly(daemon):
    _, path = daemon
    env = {**os.environ, "PYTHONPATH": DAEMON_SRC}
    proc = subprocess.Popen([sys.executable, "-m", "voxgate.control.cli", "--socket", path,
                             "calls", "--limit", "5000"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.readline()
    proc.stdout.close()  # as `| head -1` does
    stderr = proc.stderr.read().decode()
    proc.stderr.close()
    assert proc.wait(timeout=60) == 141
    assert "Traceback" not in stderr and "BrokenPipeError" not in stderr


def test_drain_wait_gives_up_at_its_timeout(daemon):
    fake, path = daemon
    out = voxgatectl("--socket", path, "drain", "--wait", "--wait-timeout", "0")
    assert out.returncode == 1
    assert "3 sessions still up after 0 s" in out.stderr
    assert fake.draining
