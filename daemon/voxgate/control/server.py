"""Trio driver for the control socket: bind, authorize, serve each connection.

The protocol lives in the sans-IO :class:`~voxgate.control.protocol.ControlConnection`;
this driver owns the Unix socket file, checks each peer's credentials
(``SO_PEERCRED``, see unix(7)), runs one task per connection with its own
error boundary, and calls the daemon's command handlers. ``hello`` is
answered here.

Who may connect: uid 0, the daemon's own uid, and members of the control
group (primary gid, supplementary groups from ``/proc/<pid>/status``, or the
group's member list): the configured group, else the daemon's own (effective)
group, so that ``adduser alice voxgate`` is enough for a daemon running as
``voxgate:voxgate``. Anyone else gets one ``forbidden`` reply and is
disconnected. The socket file is mode 0660, owned by the control group.

Slots: at most ``max_connections`` connections are served at once, and the
last :data:`ROOT_RESERVED_CONNECTIONS` of them only for uid 0, so that an
operator's ``sudo voxgatectl drain`` gets through while every other slot is
held; a peer beyond its limit gets one ``busy`` reply. A request line must be
complete within ``request_timeout_s`` of the server being ready for it, so a
peer dripping bytes cannot keep a slot forever. Every refusal and timeout is
counted in :attr:`ControlServer.stats`. accept(2) failing for lack of
descriptors or memory is logged once per episode and backed off from.
"""

from __future__ import annotations

import contextlib
import grp
import logging
import os
import pwd
import socket
import stat
import struct
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import trio

from voxgate.control.protocol import (
    BUSY,
    DEFAULT_MAX_LINE_BYTES,
    FORBIDDEN,
    INTERNAL,
    PROTOCOL_VERSION,
    ControlConnection,
    ProtocolError,
    Reply,
    Request,
    encode_reply,
)
from voxgate.errors import LocalProtocolError, VoxgateError, is_resource_shortage
from voxgate.logging import SHORTAGE_BACKOFF_S, ResourceShortage, log_event

Handler = Callable[[Mapping[str, Any]], Awaitable[Any]]
"""A command handler: takes ``args``, returns the JSON-able result.

Raises :class:`CommandError` when the daemon says no; anything else it raises
is a bug, answered with ``internal`` and logged.
"""

SOCKET_MODE = 0o660
PARENT_DIR_MODE = 0o755
LISTEN_BACKLOG = 16
RECEIVE_CHUNK_BYTES = 4096
DEFAULT_IDLE_TIMEOUT_S = 60.0
"""A connection that sends no byte while a request is awaited, or does not take its
reply, this long is closed."""
DEFAULT_REQUEST_TIMEOUT_S = 10.0
"""The whole time a request line may take to arrive, from the connection being
accepted or the previous reply sent; voxgatectl sends each request at once and
polls at most every second."""
ROOT_RESERVED_CONNECTIONS = 1
"""Connection slots (out of ``max_connections``) that only uid 0 may take."""
REFUSE_TIMEOUT_S = 1.0
"""How long a ``busy`` answer may take before the connection is just closed."""
STALE_PROBE_TIMEOUT_S = 1.0

# struct ucred { pid_t pid; uid_t uid; gid_t gid; } (Linux <sys/socket.h>):
# three native 32-bit ints, 12 bytes.
_UCRED = struct.Struct("=iII")


class ControlSetupError(VoxgateError):
    """The control socket cannot be set up; the message names the path."""


class CommandError(VoxgateError):
    """A handler's "the daemon said no": becomes an error reply with ``code``."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


@dataclass(frozen=True, slots=True)
class PeerCredentials:
    """The peer process's credentials when it connected (``SO_PEERCRED``)."""

    pid: int
    uid: int
    gid: int


class ServerStats:
    """Counters of one control server, in connections (``internal_errors``: requests)."""

    __slots__ = ("accepted", "forbidden", "idle_timeouts", "internal_errors", "refused_busy",
                 "refused_no_credentials", "request_timeouts")

    def __init__(self) -> None:
        self.accepted = 0
        self.refused_busy = 0
        """Refused for lack of a slot, the reserved ones included."""
        self.refused_no_credentials = 0
        """Closed because ``SO_PEERCRED`` could not be read."""
        self.forbidden = 0
        self.idle_timeouts = 0
        self.request_timeouts = 0
        """Closed because a request line was not complete within ``request_timeout_s``."""
        self.internal_errors = 0


def peer_credentials(sock: trio.socket.SocketType) -> PeerCredentials:
    """Read ``SO_PEERCRED`` of a connected Unix socket."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    pid, uid, gid = _UCRED.unpack(raw)
    return PeerCredentials(pid, uid, gid)


def parse_proc_groups(status_text: str, uid: int) -> frozenset[int]:
    """Supplementary gids from the text of ``/proc/<pid>/status`` (proc(5)).

    Returns an empty set unless the ``Uid:`` line's effective uid is ``uid``
    (the pid may have been reused by another user's process).
    """
    fields: dict[str, list[str]] = {}
    for line in status_text.splitlines():
        name, sep, value = line.partition(":")
        if sep:
            fields[name] = value.split()
    uids = fields.get("Uid", [])
    if len(uids) < 2 or uids[1] != str(uid):
        return frozenset()
    return frozenset(int(g) for g in fields.get("Groups", []) if g.isdigit())


def _proc_groups(cred: PeerCredentials) -> frozenset[int]:
    if cred.pid <= 0:  # the peer lives in another pid namespace
        return frozenset()
    try:
        with open(f"/proc/{cred.pid}/status", encoding="utf-8", errors="replace") as f:
            return parse_proc_groups(f.read(), cred.uid)
    except OSError:
        return frozenset()


def _listed_member(uid: int, gid: int) -> bool:
    try:
        return pwd.getpwuid(uid).pw_name in grp.getgrgid(gid).gr_mem
    except KeyError:
        return False


def is_authorized(cred: PeerCredentials, *, own_uid: int, group_gid: int) -> bool:
    """Whether ``cred`` may use the control socket; blocking (procfs, NSS).

    Allowed: uid 0, ``own_uid``, and members of ``group_gid`` (primary gid,
    supplementary groups of the process, or listed in the group database).
    """
    if cred.uid in (0, own_uid):
        return True
    return (
        cred.gid == group_gid
        or group_gid in _proc_groups(cred)
        or _listed_member(cred.uid, group_gid)
    )


def _resolve_group(group: str | None) -> int:
    """The gid of ``group``; None is the daemon's own (effective) group."""
    if group is None:
        return os.getegid()
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise ControlSetupError(f"control socket group {group!r} does not exist") from None


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def _make_parent_dir(path: str) -> None:
    parent = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(parent):
        return
    try:
        os.makedirs(parent, PARENT_DIR_MODE)
        os.chmod(parent, PARENT_DIR_MODE)
    except OSError as e:
        raise ControlSetupError(f"{parent}: cannot create directory: {e.strerror}") from e


async def _remove_stale_socket(path: str) -> None:
    """Unlink ``path`` if it is a socket nobody accepts on; else leave it and raise.

    Raises:
        ControlSetupError: ``path`` is not a socket, or a live one.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as e:
        raise ControlSetupError(f"{path}: {e.strerror}") from e
    if not stat.S_ISSOCK(st.st_mode):
        raise ControlSetupError(f"{path} exists and is not a socket; not replacing it")
    probe = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with probe:
        try:
            with trio.move_on_after(STALE_PROBE_TIMEOUT_S):
                await probe.connect(path)
        except ConnectionRefusedError:
            os.unlink(path)
            log_event(logging.INFO, "control_stale_socket", f"removed stale socket {path}",
                      path=path)
            return
        except FileNotFoundError:
            return
        except OSError as e:
            raise ControlSetupError(f"{path}: cannot probe existing socket: {e.strerror}") from e
    raise ControlSetupError(f"{path} already in use (is another voxgated running?)")


class ControlServer:
    """Serves the control protocol on the Unix socket ``path``.

    Args:
        path: the socket file; its parent is created (0755) if missing.
        handlers: command name -> :data:`Handler`; ``hello`` is answered by
            the server itself and needs no handler.
        group: the group name that owns the socket and may use it, or None
            for the daemon's own (effective) group.
        version: the daemon's version, reported by ``hello``.
        max_connections: connections served at once, the last
            :data:`ROOT_RESERVED_CONNECTIONS` of them for uid 0 only; a peer
            beyond its limit is answered ``busy``.
        max_line_bytes: longest request line accepted.
        idle_timeout_s: a connection that sends no byte while a request is
            awaited, or does not take its reply, this long is closed.
        request_timeout_s: a request line not complete this long after the
            server became ready for it (connection accepted, previous reply
            sent) closes the connection, however the bytes trickle in.

    Raises:
        ValueError: ``max_connections`` leaves no slot beyond the reserved ones.
    """

    def __init__(
        self,
        path: str,
        handlers: Mapping[str, Handler],
        *,
        group: str | None,
        version: str,
        max_connections: int = 32,
        max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
        idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S,
        request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S,
    ) -> None:
        if max_connections <= ROOT_RESERVED_CONNECTIONS:
            raise ValueError(f"max_connections must be over {ROOT_RESERVED_CONNECTIONS} "
                             f"(the slots reserved for root), not {max_connections}")
        self._path = path
        self._handlers = dict(handlers)
        self._commands = frozenset(self._handlers) | {"hello"}
        self._group = group
        self._group_gid = -1
        """Resolved by :meth:`run` (group names may change until then)."""
        self._hello = {"protocol": PROTOCOL_VERSION, "daemon": "voxgated", "version": version}
        self._max_connections = max_connections
        self._max_line_bytes = max_line_bytes
        self._idle_timeout_s = idle_timeout_s
        self._request_timeout_s = request_timeout_s
        self._own_uid = os.getuid()
        self._active = 0
        self.stats = ServerStats()
        self.accept_shortage = ResourceShortage("control", "accept on the control socket")
        """accept(2) out of descriptors or memory: its episodes and failures."""

    @property
    def active_connections(self) -> int:
        """Connections being served now."""
        return self._active

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Bind the socket, report started, serve until cancelled, remove the socket file.

        Raises:
            ControlSetupError: unknown group, the path is taken (a live socket
                or not a socket), or bind/chmod/chown failed.
        """
        self._group_gid = _resolve_group(self._group)
        _make_parent_dir(self._path)
        await _remove_stale_socket(self._path)
        listener, identity = await self._bind()
        try:
            log_event(logging.INFO, "control_listening", f"control socket {self._path}",
                      path=self._path, group=_group_name(self._group_gid))
            task_status.started()
            async with trio.open_nursery() as nursery:
                await self._accept_loop(listener, nursery)
        finally:
            listener.socket.close()
            self._unlink_if_ours(identity)

    async def _bind(self) -> tuple[trio.SocketListener, tuple[int, int]]:
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        bound = False
        try:
            await sock.bind(self._path)
            bound = True
            os.chmod(self._path, SOCKET_MODE)
            if os.lstat(self._path).st_gid != self._group_gid:  # or a setgid parent's group
                os.chown(self._path, -1, self._group_gid)
            sock.listen(LISTEN_BACKLOG)
            st = os.lstat(self._path)
        except OSError as e:
            sock.close()
            if bound:
                os.unlink(self._path)
            raise ControlSetupError(f"{self._path}: cannot set up control socket: "
                                    f"{e.strerror}") from e
        return trio.SocketListener(sock), (st.st_dev, st.st_ino)

    def _unlink_if_ours(self, identity: tuple[int, int]) -> None:
        """Remove the socket file unless someone else replaced it meanwhile."""
        try:
            st = os.lstat(self._path)
            if (st.st_dev, st.st_ino) == identity:
                os.unlink(self._path)
        except OSError:
            pass

    async def _accept_loop(self, listener: trio.SocketListener, nursery: trio.Nursery) -> None:
        while True:
            try:
                stream = await listener.accept()
            except OSError as e:
                if not is_resource_shortage(e):
                    raise
                self.accept_shortage.failed(e)
                await trio.sleep(SHORTAGE_BACKOFF_S)
                continue
            self.accept_shortage.recovered()
            try:
                cred = peer_credentials(stream.socket)
            except OSError as e:
                self.stats.refused_no_credentials += 1
                log_event(logging.WARNING, "control_no_credentials", "control connection "
                          f"closed: cannot read its credentials: {e.strerror}")
                stream.socket.close()
                continue
            limit = self._max_connections
            if cred.uid != 0:
                limit -= ROOT_RESERVED_CONNECTIONS
            if self._active >= limit:
                self.stats.refused_busy += 1
                log_event(logging.WARNING, "control_busy", "control connection refused: busy",
                          active=self._active, uid=cred.uid, pid=cred.pid)
                with trio.move_on_after(REFUSE_TIMEOUT_S):
                    await self._refuse(stream, BUSY, f"too many control connections ({limit})")
                stream.socket.close()
                continue
            self.stats.accepted += 1
            self._active += 1
            nursery.start_soon(self._serve_connection, stream, cred)

    @staticmethod
    async def _refuse(stream: trio.SocketStream, code: str, message: str) -> None:
        """Send one ``id: null`` error reply; the caller closes the stream."""
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await stream.send_all(encode_reply(Reply.failure(None, code, message)))

    async def _serve_connection(self, stream: trio.SocketStream, cred: PeerCredentials) -> None:
        """One connection, inside its own error boundary; always closes the stream."""
        try:
            async with stream:
                if await self._authorized(cred):
                    await self._converse(stream, cred)
                else:
                    self.stats.forbidden += 1
                    log_event(logging.WARNING, "control_forbidden",
                              f"uid {cred.uid} may not use the control socket",
                              uid=cred.uid, pid=cred.pid)
                    with trio.move_on_after(REFUSE_TIMEOUT_S):
                        await self._refuse(stream, FORBIDDEN,
                                           f"uid {cred.uid} may not use the control socket")
        except trio.TooSlowError:
            self.stats.idle_timeouts += 1
            log_event(logging.INFO, "control_idle_timeout", "control connection idle; closed",
                      uid=cred.uid, pid=cred.pid)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the client went away mid-request: nothing to answer
        except Exception as e:
            log_event(logging.ERROR, "control_connection_failed", "control connection failed",
                      exc_info=e, uid=cred.uid)
        finally:
            self._active -= 1

    async def _authorized(self, cred: PeerCredentials) -> bool:
        if cred.uid in (0, self._own_uid):
            return True
        # Group lookups read procfs and may ask NSS (LDAP…): not on the event loop.
        return await trio.to_thread.run_sync(
            lambda: is_authorized(cred, own_uid=self._own_uid, group_gid=self._group_gid))

    async def _converse(self, stream: trio.SocketStream, cred: PeerCredentials) -> None:
        """Answer requests in order until EOF, a fatal error, a request timeout or
        idleness (TooSlowError)."""
        conn = ControlConnection(self._commands, max_line_bytes=self._max_line_bytes)
        request_deadline: float | None = None
        while True:
            event = conn.next_request()
            if event is None:
                if conn.closed:
                    return
                if request_deadline is None:
                    request_deadline = trio.current_time() + self._request_timeout_s
                data = await self._receive(stream, request_deadline)
                if data is None:
                    self.stats.request_timeouts += 1
                    log_event(logging.INFO, "control_request_timeout", "control connection "
                              f"sent no complete request within {self._request_timeout_s} s; "
                              "closed", uid=cred.uid, pid=cred.pid)
                    return
                conn.receive_data(data)
                continue
            request_deadline = None
            if isinstance(event, ProtocolError):
                line = conn.send_reply(Reply.failure(event.id, event.code, event.message))
            else:
                reply = await self._dispatch(event, cred)
                try:
                    line = conn.send_reply(reply)
                except LocalProtocolError as e:  # the handler's result is not JSON-able
                    line = conn.send_reply(self._internal(event, cred, e))
            with trio.fail_after(self._idle_timeout_s):
                await stream.send_all(line)
            if isinstance(event, ProtocolError) and event.fatal:
                return

    async def _receive(self, stream: trio.SocketStream, deadline: float) -> bytes | None:
        """The next bytes (``b""``: EOF), or None once ``deadline`` has passed.

        Raises:
            trio.TooSlowError: no byte within ``idle_timeout_s``.
        """
        with trio.move_on_at(deadline), trio.fail_after(self._idle_timeout_s):
            return await stream.receive_some(RECEIVE_CHUNK_BYTES)
        return None

    async def _dispatch(self, request: Request, cred: PeerCredentials) -> Reply:
        log_event(logging.DEBUG, "control_command", f"control command {request.cmd}",
                  cmd=request.cmd, uid=cred.uid, pid=cred.pid)
        if request.cmd == "hello":
            return Reply.success(request.id, self._hello)
        try:
            result = await self._handlers[request.cmd](request.args)
        except CommandError as e:
            return Reply.failure(request.id, e.code, e.message)
        except Exception as e:
            return self._internal(request, cred, e)
        return Reply.success(request.id, result)

    def _internal(self, request: Request, cred: PeerCredentials, error: Exception) -> Reply:
        """Log a handler's bug and make the ``internal`` reply for it."""
        self.stats.internal_errors += 1
        log_event(logging.ERROR, "control_internal_error", f"control command {request.cmd} "
                  "failed", exc_info=error, cmd=request.cmd, uid=cred.uid, pid=cred.pid)
        return Reply.failure(request.id, INTERNAL, f"internal error in {request.cmd!r}: "
                                                   f"{type(error).__name__}")
