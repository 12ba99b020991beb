"""The control protocol spoken on voxgate's Unix socket; sans-IO, h11 shape.

One JSON object per line, UTF-8, each line ended by ``\\n``::

    request  {"id": 7, "cmd": "status", "args": {}}
    reply    {"id": 7, "ok": true, "result": {...}}
    error    {"id": 7, "ok": false, "error": {"code": "unknown-command", "message": "..."}}

``id`` is a string, a finite number or null and is echoed in the reply (a
request whose id cannot be read or echoed gets its error with ``"id": null``);
``args`` is an object and may be left out. The daemon answers requests in
order, one reply per request. Lines are decoded within bounds
(:func:`voxgate.jsonbounds.loads_untrusted`: nesting up to
:data:`MAX_JSON_DEPTH`, no NaN/Infinity, no number a double cannot hold); a
line beyond them is ``bad-json``. A line longer than ``max_line_bytes`` gets a ``too-large``
error with ``"id": null`` and the connection is closed; the rest of the
oversized input is discarded, never buffered.

:class:`ControlConnection` is the daemon's side: it takes bytes with
:meth:`~ControlConnection.receive_data`, hands out :class:`Request` or
:class:`ProtocolError` events with :meth:`~ControlConnection.next_request`
(``None`` means "need data"), and turns :class:`Reply` into bytes with
:meth:`~ControlConnection.send_reply`. :func:`encode_request` and
:func:`decode_reply` are the client's side.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

from voxgate.errors import LocalProtocolError, RemoteProtocolError
from voxgate.jsonbounds import UntrustedJSONError, loads_untrusted

PROTOCOL_VERSION = 1
"""Answered by ``hello`` as ``"protocol"``; bumped on incompatible changes."""

DEFAULT_MAX_LINE_BYTES = 65_536
"""Longest request line accepted, without its ``\\n``."""

DEFAULT_MAX_PENDING_REQUESTS = 16
"""Requests received (complete lines) but not yet answered, per connection."""

MAX_JSON_DEPTH = 32
"""Deepest nesting of arrays/objects in a request or reply line."""

MAX_REPLY_BYTES = 16 * 1024 * 1024
"""Longest reply line :func:`decode_reply` takes."""

# Error codes carried in ``error.code``.
BAD_JSON = "bad-json"
"""The line is not valid UTF-8 JSON, or beyond bounds (:data:`MAX_JSON_DEPTH`, integers
of :data:`~voxgate.jsonbounds.MAX_INTEGER_DIGITS` digits, numbers a double holds)."""
BAD_REQUEST = "bad-request"
"""Valid JSON, but not a request object (cmd, args or id of the wrong type)."""
TOO_LARGE = "too-large"
"""A line longer than ``max_line_bytes``; the connection is closed."""
TOO_MANY_REQUESTS = "too-many-requests"
"""More than ``max_pending_requests`` unanswered requests; the connection is closed."""
UNKNOWN_COMMAND = "unknown-command"
"""``cmd`` names no command the daemon knows."""
FORBIDDEN = "forbidden"
"""The peer's uid is not allowed on the control socket; the connection is closed."""
BUSY = "busy"
"""Every connection slot is taken; the connection is closed."""
INTERNAL = "internal"
"""The daemon failed while running the command (a bug, logged)."""
RELOAD_FAILED = "reload-failed"
"""``reload`` found an invalid configuration and kept the running one."""

RequestId = str | int | float | None
"""A request id as JSON carries it (``bool`` is not a number here)."""


class ControlProtocolError(RemoteProtocolError):
    """The peer sent a line that breaks the control protocol.

    ``code`` is one of the error codes above; ``request_id`` is the request's
    id when it could be read (else ``None``). Never a SIP answer, so
    ``status_hint`` is ``None``.
    """

    def __init__(self, code: str, reason: str, request_id: RequestId = None) -> None:
        super().__init__(reason, status_hint=None)
        self.code = code
        self.request_id = request_id


@dataclass(frozen=True, slots=True)
class Request:
    """A well-formed request for a known command."""

    id: RequestId
    cmd: str
    args: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ProtocolError:
    """A line that could not become a :class:`Request`; it still takes a reply.

    ``fatal`` errors (``too-large``, ``too-many-requests``) close the
    connection once the reply has been sent.
    """

    id: RequestId
    code: str
    message: str
    fatal: bool = False


@dataclass(frozen=True, slots=True)
class Reply:
    """One reply: ``ok`` with a JSON-able ``result``, or an error ``code`` + ``message``."""

    id: RequestId
    ok: bool
    result: Any = None
    code: str = ""
    message: str = ""

    @classmethod
    def success(cls, request_id: RequestId, result: Any) -> Reply:
        """The reply to a request that worked."""
        return cls(request_id, True, result)

    @classmethod
    def failure(cls, request_id: RequestId, code: str, message: str) -> Reply:
        """The reply to a request that failed with error ``code``."""
        return cls(request_id, False, None, code, message)


class ConnectionStats:
    """Counters of one control connection."""

    __slots__ = ("discarded_bytes", "errors", "requests")

    def __init__(self) -> None:
        self.requests = 0
        """Requests handed out by :meth:`ControlConnection.next_request`."""
        self.errors = 0
        """:class:`ProtocolError` events handed out."""
        self.discarded_bytes = 0
        """Bytes thrown away: the rest of an oversized line, input after close."""


def _loads_untrusted(line: bytes, max_bytes: int) -> Any:
    """Parse one JSON value from ``line``; raises :class:`ControlProtocolError` (bad-json)."""
    try:
        return loads_untrusted(line, max_bytes=max_bytes, max_depth=MAX_JSON_DEPTH)
    except UntrustedJSONError as e:
        raise ControlProtocolError(BAD_JSON, f"malformed JSON: {e.reason}") from None


def _is_request_id(value: object) -> bool:
    return value is None or (isinstance(value, str | int | float) and not isinstance(value, bool))


def parse_request_untrusted(line: bytes, commands: Collection[str], *,
                            max_line_bytes: int = DEFAULT_MAX_LINE_BYTES) -> Request:
    """Turn one request line (without ``\\n``) into a :class:`Request`.

    The id of a request is always one :func:`encode_reply` can echo (numbers
    are finite, strings valid Unicode); a line whose id is not gives an error
    with ``request_id`` ``None``.

    Raises:
        ControlProtocolError: ``bad-json`` (also: over ``max_line_bytes``),
            ``bad-request`` or ``unknown-command``; ``request_id`` is set once
            the id was read.
    """
    obj = _loads_untrusted(line, max_line_bytes)
    if not isinstance(obj, dict):
        raise ControlProtocolError(BAD_REQUEST, "a request is a JSON object")
    request_id = obj.get("id")
    if not _is_request_id(request_id):
        raise ControlProtocolError(BAD_REQUEST, "id must be a string, a number or null")
    cmd = obj.get("cmd")
    if not isinstance(cmd, str):
        raise ControlProtocolError(BAD_REQUEST, "cmd must be a string", request_id)
    args = obj.get("args", {})
    if not isinstance(args, dict):
        raise ControlProtocolError(BAD_REQUEST, "args must be an object", request_id)
    if cmd not in commands:
        raise ControlProtocolError(UNKNOWN_COMMAND, f"unknown command {cmd[:64]!r}", request_id)
    return Request(request_id, cmd, args)


def _encode_line(obj: Mapping[str, Any]) -> bytes:
    """One JSON line; raises :class:`LocalProtocolError` if ``obj`` is not JSON-able."""
    try:
        text = json.dumps(obj, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as e:
        raise LocalProtocolError(f"not JSON-able: {e}") from None
    return text.encode("utf-8") + b"\n"


class ControlConnection:
    """The daemon's side of one control connection; sans-IO.

    Args:
        commands: the command names the daemon answers; any other ``cmd``
            becomes an ``unknown-command`` error.
        max_line_bytes: longest request line, without its ``\\n`` (>= 1).
        max_pending_requests: complete lines buffered plus requests handed
            out and not answered yet (>= 1); one more closes the connection
            with ``too-many-requests``.

    Raises:
        LocalProtocolError: a limit is below 1.
    """

    __slots__ = (
        "_closed",
        "_commands",
        "_discarding",
        "_events",
        "_max_line",
        "_max_pending",
        "_partial",
        "_unanswered",
        "stats",
    )

    def __init__(
        self,
        commands: Collection[str],
        *,
        max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
        max_pending_requests: int = DEFAULT_MAX_PENDING_REQUESTS,
    ) -> None:
        if max_line_bytes < 1 or max_pending_requests < 1:
            raise LocalProtocolError("max_line_bytes and max_pending_requests must be >= 1")
        self._commands = frozenset(commands)
        self._max_line = max_line_bytes
        self._max_pending = max_pending_requests
        self._partial = bytearray()
        self._events: deque[bytes | ProtocolError] = deque()
        self._unanswered = 0
        self._discarding = False
        self._closed = False
        self.stats = ConnectionStats()

    @property
    def closed(self) -> bool:
        """True once the peer closed (EOF) or a fatal error was queued.

        No more input is taken; :meth:`next_request` still hands out what was
        queued before, then returns ``None`` for good.
        """
        return self._closed

    def receive_data(self, data: bytes) -> None:
        """Feed bytes read from the peer; ``b""`` means the peer closed (EOF).

        An unterminated line at EOF is discarded. Input after close is
        discarded and counted in ``stats.discarded_bytes``.
        """
        if self._closed:
            self.stats.discarded_bytes += len(data)
            return
        if not data:
            self.stats.discarded_bytes += len(self._partial)
            self._partial.clear()
            self._closed = True
            return
        start = 0
        while not self._closed:
            end = data.find(b"\n", start)
            if end < 0:
                self._partial += data[start:]
                if len(self._partial) > self._max_line:
                    self._fail(TOO_LARGE, f"line longer than {self._max_line} bytes")
                    self.stats.discarded_bytes += len(self._partial)
                    self._partial.clear()
                return
            self._partial += data[start:end]
            start = end + 1
            self._queue_line(bytes(self._partial))
            self._partial.clear()
        self.stats.discarded_bytes += len(data) - start

    def _queue_line(self, line: bytes) -> None:
        if len(line) > self._max_line:
            self.stats.discarded_bytes += len(line)
            self._fail(TOO_LARGE, f"line longer than {self._max_line} bytes")
        elif len(self._events) + self._unanswered >= self._max_pending:
            self.stats.discarded_bytes += len(line)
            self._fail(TOO_MANY_REQUESTS, f"more than {self._max_pending} requests unanswered")
        else:
            self._events.append(line)

    def _fail(self, code: str, message: str) -> None:
        self._events.append(ProtocolError(None, code, message, fatal=True))
        self._closed = True

    def next_request(self) -> Request | ProtocolError | None:
        """The next request, or the next line's error, or ``None`` (need data).

        Every event handed out takes exactly one :meth:`send_reply`, in order.
        After a fatal :class:`ProtocolError` the driver sends its reply and
        closes the connection.
        """
        if not self._events:
            return None
        item = self._events.popleft()
        self._unanswered += 1
        if isinstance(item, ProtocolError):
            self.stats.errors += 1
            return item
        try:
            request = parse_request_untrusted(item, self._commands,
                                              max_line_bytes=self._max_line)
        except ControlProtocolError as e:
            self.stats.errors += 1
            return ProtocolError(e.request_id, e.code, e.reason)
        self.stats.requests += 1
        return request

    def send_reply(self, reply: Reply) -> bytes:
        """The bytes of ``reply`` for the event handed out first and not answered yet.

        Raises:
            LocalProtocolError: no event awaits a reply, or ``reply.result``
                is not JSON-able (the event still awaits its reply then).
        """
        if self._unanswered == 0:
            raise LocalProtocolError("send_reply without a pending request")
        data = encode_reply(reply)
        self._unanswered -= 1
        return data


def encode_reply(reply: Reply) -> bytes:
    """The line (with ``\\n``) of one reply, outside any connection state.

    For answers a driver gives before a :class:`ControlConnection` exists
    (``busy``, ``forbidden``).

    Raises:
        LocalProtocolError: ``reply.result`` is not JSON-able.
    """
    if reply.ok:
        obj: dict[str, Any] = {"id": reply.id, "ok": True, "result": reply.result}
    else:
        error = {"code": reply.code, "message": reply.message}
        obj = {"id": reply.id, "ok": False, "error": error}
    return _encode_line(obj)


def encode_request(request_id: RequestId, cmd: str, args: Mapping[str, Any]) -> bytes:
    """The line (with ``\\n``) of one request; the client's side.

    Raises:
        LocalProtocolError: ``args`` is not JSON-able.
    """
    return _encode_line({"id": request_id, "cmd": cmd, "args": dict(args)})


def decode_reply(line: bytes) -> Reply:
    """Parse one reply line (with or without its ``\\n``) from the daemon.

    Raises:
        ControlProtocolError: ``bad-json`` (also: over :data:`MAX_REPLY_BYTES`
            or :data:`MAX_JSON_DEPTH`) or ``bad-request`` (not a reply).
    """
    obj = _loads_untrusted(line, MAX_REPLY_BYTES)
    if not isinstance(obj, dict) or not _is_request_id(obj.get("id")):
        raise ControlProtocolError(BAD_REQUEST, "a reply is a JSON object with an id")
    request_id = obj.get("id")
    ok = obj.get("ok")
    if ok is True:
        return Reply.success(request_id, obj.get("result"))
    error = obj.get("error")
    if (
        ok is False
        and isinstance(error, dict)
        and isinstance(error.get("code"), str)
        and isinstance(error.get("message", ""), str)
    ):
        return Reply.failure(request_id, error["code"], error.get("message", ""))
    raise ControlProtocolError(BAD_REQUEST, "a reply has ok true with result, or ok false "
                                            "with error {code, message}", request_id)


def plural(count: int, word: str) -> str:
    """``1 session``, ``2 sessions``: counts in operator-facing text."""
    return f"{count} {word}{'' if count == 1 else 's'}"
