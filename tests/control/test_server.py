"""The control server over a real Unix socket, with fake handlers."""

from __future__ import annotations

import errno
import grp
import json
import logging
import os
import shutil
import socket
import stat
import subprocess
import tempfile
from typing import Any

import pytest
import trio
from trio.testing import wait_all_tasks_blocked

from voxgate.control import server as control_server
from voxgate.control.protocol import encode_request
from voxgate.control.server import (
    ROOT_RESERVED_CONNECTIONS,
    CommandError,
    ControlServer,
    ControlSetupError,
    PeerCredentials,
    is_authorized,
    parse_proc_groups,
)

NOBODY = 65534
SYSTEM_PYTHON = "/usr/bin/python3"


async def status(args):
    return {"state": "running", "echo": dict(args)}


async def refuse(args):
    raise CommandError("reload-failed", "bad config")


async def buggy(args):
    raise ZeroDivisionError("oops")


async def not_json(args):
    return {"when": object()}


async def slow(args):
    await trio.sleep(0.2)
    return {"slept": True}


HANDLERS = {"status": status, "reload": refuse, "hangup": buggy, "sessions": not_json,
            "drain": slow}


class EventLog(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.events: list[tuple[str, dict[str, Any]]] = []

    def emit(self, record):
        event, fields = getattr(record, "voxgate_fields", ("log", {}))
        self.events.append((event, fields))

    def names(self):
        return [name for name, _ in self.events]


@pytest.fixture
def log_events():
    logger = logging.getLogger("voxgate")
    handler = EventLog()
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(old_level)


@pytest.fixture
def sock_path(tmp_path):
    return str(tmp_path / "control.sock")


@pytest.fixture
def start(nursery, sock_path):
    async def start_server(path=sock_path, **kwargs):
        kwargs.setdefault("group", None)
        kwargs.setdefault("version", "9.9.9")
        server = ControlServer(path, kwargs.pop("handlers", HANDLERS), **kwargs)
        await nursery.start(server.run)
        return server
    return start_server


async def connect(path) -> trio.SocketStream:
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await sock.connect(path)
    return trio.SocketStream(sock)


async def read_until_eof(stream: trio.SocketStream) -> bytes:
    data = b""
    with trio.fail_after(5):
        while True:
            try:
                chunk = await stream.receive_some(65536)
            except trio.BrokenResourceError:  # ECONNRESET: we left bytes unread
                return data
            if not chunk:
                return data
            data += chunk


async def read_replies(stream: trio.SocketStream, count: int) -> list[dict[str, Any]]:
    data = b""
    with trio.fail_after(5):
        while data.count(b"\n") < count:
            chunk = await stream.receive_some(65536)
            assert chunk, f"EOF after {data!r}"
            data += chunk
    return [json.loads(line) for line in data.splitlines()]


async def ask(path, cmd, args=None, request_id=1) -> dict[str, Any]:
    async with await connect(path) as stream:
        await stream.send_all(encode_request(request_id, cmd, args or {}))
        (reply,) = await read_replies(stream, 1)
        return reply


async def test_round_trip(start, sock_path):
    await start()
    reply = await ask(sock_path, "status", {"x": 1}, request_id="abc")
    assert reply == {"id": "abc", "ok": True, "result": {"state": "running", "echo": {"x": 1}}}


async def test_requests_on_one_connection_are_answered_in_order(start, sock_path):
    await start()
    async with await connect(sock_path) as stream:
        await stream.send_all(encode_request(1, "drain", {}) + encode_request(2, "status", {}))
        first, second = await read_replies(stream, 2)
    assert (first["id"], first["result"]) == (1, {"slept": True})
    assert second["id"] == 2


async def test_hello_is_answered_by_the_server(start, sock_path):
    await start(version="1.2.3")
    reply = await ask(sock_path, "hello")
    assert reply["result"] == {"protocol": 1, "daemon": "voxgated", "version": "1.2.3"}


async def test_command_error_becomes_its_code(start, sock_path):
    await start()
    reply = await ask(sock_path, "reload", request_id=5)
    assert reply == {"id": 5, "ok": False,
                     "error": {"code": "reload-failed", "message": "bad config"}}


async def test_handler_bug_is_internal_and_logged(start, sock_path, log_events):
    server = await start()
    reply = await ask(sock_path, "hangup", {"id": "s1"}, request_id=6)
    assert reply["ok"] is False and reply["id"] == 6
    assert reply["error"]["code"] == "internal"
    assert "ZeroDivisionError" in reply["error"]["message"]
    reply = await ask(sock_path, "sessions")
    assert reply["error"]["code"] == "internal"
    assert server.stats.internal_errors == 2
    assert log_events.names().count("control_internal_error") == 2
    assert (await ask(sock_path, "status"))["ok"] is True


async def test_unknown_command(start, sock_path):
    await start()
    reply = await ask(sock_path, "reboot", request_id=3)
    assert reply["id"] == 3
    assert reply["error"]["code"] == "unknown-command"


async def test_malformed_input_keeps_the_connection_and_the_server(start, sock_path):
    await start()
    async with await connect(sock_path) as stream:
        await stream.send_all(b"{oops\n" + encode_request(2, "status", {}))
        bad, good = await read_replies(stream, 2)
    assert (bad["id"], bad["error"]["code"]) == (None, "bad-json")
    assert good["ok"] is True
    assert (await ask(sock_path, "hello"))["ok"] is True


async def test_oversized_line_closes_the_connection_only(start, sock_path):
    server = await start(max_line_bytes=1024)
    async with await connect(sock_path) as stream:
        await stream.send_all(b'{"cmd": "status", "args": {"pad": "' + b"x" * 4096)
        data = await read_until_eof(stream)
    reply = json.loads(data.splitlines()[0])
    assert reply["id"] is None
    assert reply["error"]["code"] == "too-large"
    assert (await ask(sock_path, "hello"))["ok"] is True
    await wait_all_tasks_blocked(0.05)
    assert server.active_connections == 0


async def test_client_gone_mid_request_is_fine(start, sock_path, log_events):
    server = await start()
    stream = await connect(sock_path)
    await stream.send_all(encode_request(1, "drain", {}))
    await stream.aclose()
    await trio.sleep(0.4)
    assert (await ask(sock_path, "status"))["ok"] is True
    assert "control_connection_failed" not in log_events.names()
    await wait_all_tasks_blocked(0.05)
    assert server.active_connections == 0


async def test_busy_beyond_max_connections(start, sock_path, log_events):
    server = await start(max_connections=2)
    async with await connect(sock_path) as first, await connect(sock_path) as second:
        for stream in (first, second):  # root (this test) may take the reserved slot too
            await stream.send_all(encode_request(1, "hello", {}))
            await read_replies(stream, 1)
        async with await connect(sock_path) as third:
            reply = json.loads(await read_until_eof(third))
        assert (reply["id"], reply["error"]["code"]) == (None, "busy")
    assert server.stats.refused_busy == 1
    assert "control_busy" in log_events.names()


def test_max_connections_must_leave_a_slot_beyond_roots(sock_path):
    with pytest.raises(ValueError, match="reserved for root"):
        ControlServer(sock_path, HANDLERS, group=None, version="0",
                      max_connections=ROOT_RESERVED_CONNECTIONS)


async def test_unusable_ids_are_answered_and_the_connection_goes_on(start, sock_path,
                                                                    log_events):
    await start()
    async with await connect(sock_path) as stream:
        await stream.send_all(b'{"id": 1e400, "cmd": "status"}\n'
                              b'{"id": -1e400, "cmd": "hangup"}\n'
                              b'{"id": [1], "cmd": "status"}\n'
                              + encode_request(4, "status", {}))
        replies = await read_replies(stream, 4)
    assert [(r["id"], r["ok"]) for r in replies] == [
        (None, False), (None, False), (None, False), (4, True)]
    assert [r["error"]["code"] for r in replies[:3]] == ["bad-json", "bad-json", "bad-request"]
    assert "control_connection_failed" not in log_events.names()
    assert "control_internal_error" not in log_events.names()


async def test_unreadable_credentials_close_the_connection_only(start, sock_path, monkeypatch,
                                                                log_events):
    server = await start()

    def no_credentials(sock):
        raise OSError(errno.ENOTCONN, "Transport endpoint is not connected")

    monkeypatch.setattr(control_server, "peer_credentials", no_credentials)
    async with await connect(sock_path) as stream:
        assert await read_until_eof(stream) == b""
    monkeypatch.undo()
    assert (await ask(sock_path, "status"))["ok"] is True
    assert server.stats.refused_no_credentials == 1
    assert "control_no_credentials" in log_events.names()


@pytest.fixture
def mock_clock():
    return trio.testing.MockClock()  # rate 0: time moves only on jump()


async def test_slow_drip_is_closed_at_the_request_timeout(start, sock_path, mock_clock,
                                                          log_events):
    server = await start(request_timeout_s=10.0)
    line = encode_request(1, "status", {})
    async with await connect(sock_path) as stream:
        for byte in line[:4]:  # a byte every 3 s: never idle (60 s), never complete
            await stream.send_all(bytes([byte]))
            await wait_all_tasks_blocked()
            mock_clock.jump(3.0)
        assert await read_until_eof(stream) == b""
    await wait_all_tasks_blocked()
    assert server.stats.request_timeouts == 1
    assert server.stats.idle_timeouts == 0
    assert server.active_connections == 0
    assert "control_request_timeout" in log_events.names()


async def test_request_timeout_starts_again_for_each_request(start, sock_path, mock_clock):
    server = await start(request_timeout_s=10.0)
    async with await connect(sock_path) as stream:
        for i in range(3):
            mock_clock.jump(8.0)  # 24 s on one connection, each request within 10 s
            await stream.send_all(encode_request(i, "status", {}))
            (reply,) = await read_replies(stream, 1)
            assert (reply["id"], reply["ok"]) == (i, True)
        await wait_all_tasks_blocked()
        assert server.stats.request_timeouts == 0
        mock_clock.jump(10.0)
        assert await read_until_eof(stream) == b""
    assert server.stats.request_timeouts == 1


async def test_idle_connection_times_out(start, sock_path):
    server = await start(idle_timeout_s=0.2)
    async with await connect(sock_path) as stream:
        assert await read_until_eof(stream) == b""
    assert server.stats.idle_timeouts == 1
    assert server.active_connections == 0


async def test_socket_mode_and_removal_on_exit(sock_path):
    server = ControlServer(sock_path, HANDLERS, group=None, version="0")
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        st = os.lstat(sock_path)
        assert stat.S_ISSOCK(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == 0o660
        assert st.st_gid == os.getegid()  # no [control] group: the daemon's own
        nursery.cancel_scope.cancel()
    assert not os.path.exists(sock_path)


async def test_socket_group_and_parent_dir(start, tmp_path):
    path = tmp_path / "run" / "voxgate" / "c.sock"
    await start(path=str(path), group="nogroup")
    assert os.lstat(path).st_gid == grp.getgrnam("nogroup").gr_gid
    assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o755


async def test_own_group_even_in_a_setgid_directory(start, tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root to give the directory another group")
    parent = tmp_path / "setgid"
    parent.mkdir()
    os.chown(parent, -1, NOBODY)
    parent.chmod(0o2755)  # files made inside get the directory's group
    await start(path=str(parent / "c.sock"))
    assert os.lstat(parent / "c.sock").st_gid == os.getegid()


async def test_unknown_group_fails_at_bind(sock_path):
    server = ControlServer(sock_path, HANDLERS, group="no-such-group-xyz", version="0")
    with pytest.raises(ControlSetupError, match="no-such-group-xyz"):
        await server.run()
    assert not os.path.exists(sock_path)


async def test_stale_socket_is_replaced(start, sock_path, log_events):
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(sock_path)
    stale.close()
    assert stat.S_ISSOCK(os.lstat(sock_path).st_mode)
    await start()
    assert (await ask(sock_path, "hello"))["ok"] is True
    assert "control_stale_socket" in log_events.names()


async def test_live_socket_is_not_taken_over(sock_path):
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as live:
        live.bind(sock_path)
        live.listen(1)
        server = ControlServer(sock_path, HANDLERS, group=None, version="0")
        with pytest.raises(ControlSetupError, match="already in use"):
            await server.run()
        assert stat.S_ISSOCK(os.lstat(sock_path).st_mode)


async def test_regular_file_is_never_deleted(tmp_path):
    path = tmp_path / "control.sock"
    path.write_text("precious")
    server = ControlServer(str(path), HANDLERS, group=None, version="0")
    with pytest.raises(ControlSetupError, match="not a socket"):
        await server.run()
    assert path.read_text() == "precious"


def test_parse_proc_groups():
    text = "Name:\tpython3\nUid:\t1000\t1000\t1000\t1000\nGid:\t100\t100\t100\t100\n" \
           "Groups:\t4 24 27 \n"
    assert parse_proc_groups(text, 1000) == {4, 24, 27}
    assert parse_proc_groups(text, 1001) == frozenset()
    assert parse_proc_groups("Uid:\t5\t5\t5\t5\nGroups:\n", 5) == frozenset()


def test_is_authorized_rules():
    me = os.getuid()
    assert is_authorized(PeerCredentials(0, 0, 0), own_uid=1234, group_gid=98)
    assert is_authorized(PeerCredentials(0, 1234, 99), own_uid=1234, group_gid=98)
    assert not is_authorized(PeerCredentials(0, 4321, 99), own_uid=me, group_gid=98)
    assert is_authorized(PeerCredentials(0, 4321, 99), own_uid=me, group_gid=99)
    assert not is_authorized(PeerCredentials(0, 4321, 98), own_uid=me, group_gid=99)


# --- another uid, through setpriv -------------------------------------------------------

CLIENT = """
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(sys.argv[1])
data = b""
try:
    s.sendall(b'{"id": 1, "cmd": "hello"}\\n')
except BrokenPipeError:
    pass  # refused before it read the request; the reply is still there
try:
    while not data.endswith(b"\\n"):
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
except ConnectionResetError:
    pass
sys.stdout.write(data.decode())
"""


@pytest.fixture
def public_dir():
    if os.geteuid() != 0:
        pytest.skip("needs root to run a client as another uid")
    if shutil.which("setpriv") is None or not os.access(SYSTEM_PYTHON, os.X_OK):
        pytest.skip("needs setpriv and /usr/bin/python3")
    path = tempfile.mkdtemp(prefix="vgctl-", dir="/tmp")
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path)


async def ask_as_nobody(path, *groups: str) -> dict[str, Any]:
    cmd = ["setpriv", "--reuid", str(NOBODY), "--regid", str(NOBODY)]
    cmd += ["--groups", ",".join(groups)] if groups else ["--clear-groups"]
    with trio.fail_after(20):
        result = await trio.run_process([*cmd, SYSTEM_PYTHON, "-c", CLIENT, path],
                                        capture_stdout=True, capture_stderr=True)
    reply: dict[str, Any] = json.loads(result.stdout)
    return reply


async def test_other_uid_is_forbidden(start, public_dir, log_events):
    path = os.path.join(public_dir, "c.sock")
    server = await start(path=path)
    os.chmod(path, 0o666)  # let the filesystem through: SO_PEERCRED must still say no
    reply = await ask_as_nobody(path)
    assert reply["ok"] is False
    assert reply["error"]["code"] == "forbidden"
    assert server.stats.forbidden == 1
    (fields,) = [f for name, f in log_events.events if name == "control_forbidden"]
    assert fields["uid"] == NOBODY
    assert fields["pid"] > 0


async def test_member_of_the_group_by_primary_gid(start, public_dir):
    path = os.path.join(public_dir, "c.sock")
    await start(path=path, group=grp.getgrgid(NOBODY).gr_name)
    reply = await ask_as_nobody(path)
    assert reply["ok"] is True
    assert reply["result"]["daemon"] == "voxgated"


DRIP_CLIENT = """
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(sys.argv[1])
s.sendall(b'{"id": 1, "cmd": "st')
sys.stdout.write("sent\\n")
sys.stdout.flush()
s.recv(1)
"""


async def test_root_gets_the_reserved_slot_when_others_hold_the_rest(start, public_dir):
    path = os.path.join(public_dir, "c.sock")
    server = await start(path=path, group=grp.getgrgid(NOBODY).gr_name, max_connections=2,
                         request_timeout_s=600)
    as_nobody = ["setpriv", "--reuid", str(NOBODY), "--regid", str(NOBODY), "--clear-groups"]
    dripper = await trio.lowlevel.open_process(
        [*as_nobody, SYSTEM_PYTHON, "-c", DRIP_CLIENT, path], stdout=subprocess.PIPE)
    try:
        assert dripper.stdout is not None
        with trio.fail_after(20):
            assert await dripper.stdout.receive_some(64) == b"sent\n"
        await wait_all_tasks_blocked()
        assert server.active_connections == 1  # the dripping peer holds the one open slot
        busy = await ask_as_nobody(path)
        assert (busy["id"], busy["error"]["code"]) == (None, "busy")
        reply = await ask(path, "status")  # uid 0: the reserved slot
        assert reply["ok"] is True
    finally:
        dripper.kill()
        await dripper.wait()
        assert dripper.stdout is not None
        await dripper.stdout.aclose()
    assert server.stats.refused_busy == 1


async def test_member_of_the_group_by_supplementary_gid(start, public_dir):
    path = os.path.join(public_dir, "c.sock")
    await start(path=path, group="daemon")
    reply = await ask_as_nobody(path, str(grp.getgrnam("daemon").gr_gid))
    assert reply["ok"] is True


async def test_no_group_means_the_daemons_own_group(start, public_dir):
    path = os.path.join(public_dir, "c.sock")
    await start(path=path)  # [control] group = ""
    os.chmod(path, 0o666)  # let the filesystem through: only SO_PEERCRED and groups decide
    assert (await ask_as_nobody(path, str(os.getegid())))["ok"] is True
    assert (await ask_as_nobody(path))["error"]["code"] == "forbidden"


async def test_accept_out_of_descriptors_is_one_logged_episode(start, sock_path, monkeypatch,
                                                               log_events):
    real_accept = trio.SocketListener.accept
    failures = 5

    async def accept(self):
        nonlocal failures
        if failures:
            failures -= 1
            await trio.lowlevel.checkpoint()
            raise OSError(errno.EMFILE, "Too many open files")
        return await real_accept(self)

    monkeypatch.setattr(trio.SocketListener, "accept", accept)
    server = await start()
    assert (await ask(sock_path, "status"))["ok"] is True  # served once it recovered
    assert server.accept_shortage.failures == 5
    assert not server.accept_shortage.active
    shortages = [f for name, f in log_events.events if name == "resource_shortage"]
    assert shortages == [{"component": "control", "error": "EMFILE"}]
    (recovered,) = [f for name, f in log_events.events if name == "resource_recovered"]
    assert recovered["failures"] == 5
    assert (await ask(sock_path, "status"))["ok"] is True
    assert log_events.names().count("resource_shortage") == 1
