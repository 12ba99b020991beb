"""The server side of one WebSocket connection over a Trio TCP stream (RFC 6455).

wsproto (sans-IO) parses and frames; this module only moves its bytes. It
replaces trio-websocket's server, which runs its handler only once the
handshake is over (so a listener cannot count a connection from its TCP
accept), leaves a rejected handshake's TCP connection open until the client
closes it, and answers a frame that breaks the protocol with a bare TCP close
instead of a close frame. Here:

- :meth:`ServerWebSocket.receive_request` reads the opening handshake
  (§4.2.1); a request that is no WebSocket upgrade is answered as wsproto
  says (400, or 426 for the wrong version) and closed. The caller bounds its
  time.
- :meth:`~ServerWebSocket.reject` answers an HTTP status and closes the TCP
  connection at once; :meth:`~ServerWebSocket.accept` answers 101.
- :meth:`~ServerWebSocket.get_message` reads frames until a whole message:
  pings are answered (§5.5.2), a close frame is echoed and the TCP
  connection closed (§5.5.1, §7.1.1: the server closes TCP first), a message
  over ``max_message_bytes`` fails the connection with 1009, and a frame that
  breaks the protocol (unmasked, RSV bits, reserved opcode, bad close code:
  1002; text that is not UTF-8: 1007, §7.4.1) fails it as §7.1.7 says: a
  close frame with that code, then TCP close, nothing more read.
- There is no reader task: frames are read only while one task waits in
  ``get_message`` (or ``aclose``), or when its owner polls with
  :meth:`~ServerWebSocket.receive_nowait` and
  :meth:`~ServerWebSocket.message_nowait` (the media clock does, once a tick,
  instead of a task wake-up per message), so a busy reader pushes back on the
  peer through TCP and one connection holds at most one receive
  (:data:`RECEIVE_BYTES`) of unparsed input and one message being assembled
  (or, on the fast path below, one incomplete frame of at most 64 KiB).
- Fast path: the common frame (a whole masked text frame under 64 KiB with
  no RSV bits, within ``max_message_bytes``, valid UTF-8) is unmasked and
  decoded here, without wsproto's per-frame objects. The first frame that is
  anything else (control, fragment, binary, broken) and everything after it
  go to wsproto, for good, so its checks and answers are unchanged. The fast
  path only starts when the handshake left no byte behind in wsproto (a client
  sends nothing before the 101, RFC 6455 §4.1).
- Text frames are framed here (:func:`text_frame`: a server's frames are
  unmasked, and no extension is negotiated) so that a message can be built
  once and written at once with :meth:`~ServerWebSocket.send_nowait`, no task
  switch; what the socket does not take waits in a backlog that the next
  awaited send (or :meth:`~ServerWebSocket.flush`) writes first.

:func:`refuse_unread` answers a connection over a limit without reading it.
"""

from __future__ import annotations

import http
import os
import struct
from collections import deque
from collections.abc import Sequence
from contextlib import suppress
from dataclasses import dataclass
from typing import Final, NoReturn, cast

import trio
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Event,
    Ping,
    RejectConnection,
    TextMessage,
)
from wsproto.events import Request as UpgradeRequest
from wsproto.utilities import LocalProtocolError
from wsproto.utilities import RemoteProtocolError as HandshakeProtocolError

RECEIVE_BYTES: Final = 4096
"""Bytes read from the socket at once (the unparsed input one connection holds)."""
CLOSE_ABNORMAL: Final = 1006
"""The code reported when TCP ends without a close frame (RFC 6455 §7.1.5); never sent."""
CLOSE_MESSAGE_TOO_BIG: Final = 1009
_FIN_TEXT: Final = 0x81  # FIN + opcode 1 (RFC 6455 §5.2)
_HEADER_16: Final = struct.Struct("!BBH")
_HEADER_64: Final = struct.Struct("!BBQ")
_NO_MASK: Final = b"\0\0\0\0"  # a masking key that leaves the payload as it is


def text_frame(payload: bytes) -> bytes:
    """One unfragmented, unmasked text frame (RFC 6455 §5.2, as a server sends it)
    carrying ``payload`` (UTF-8; the caller guarantees it)."""
    size = len(payload)
    if size < 126:
        return bytes((_FIN_TEXT, size)) + payload
    if size < 1 << 16:
        return _HEADER_16.pack(_FIN_TEXT, 126, size) + payload
    return _HEADER_64.pack(_FIN_TEXT, 127, size) + payload


class ConnectionClosed(Exception):
    """The WebSocket is closed: ``code`` and ``reason`` as RFC 6455 §7.1.5/§7.1.6 define
    them (the peer's close frame, ours, or 1006 when TCP ended without one).

    ``failed`` is True when this side failed the connection (§7.1.7) because the
    peer broke the protocol or a limit: the close frame with ``code`` was sent.
    """

    def __init__(self, code: int, reason: str = "", *, failed: bool = False) -> None:
        super().__init__(code, reason)
        self.code = code
        self.reason = reason
        self.failed = failed


class HandshakeError(Exception):
    """The opening handshake failed and the TCP connection is closed: ``status`` is
    the HTTP status answered (400 or 426), 0 when the peer left before its request
    ended."""

    def __init__(self, reason: str, status: int) -> None:
        super().__init__(reason)
        self.status = status


@dataclass(frozen=True, slots=True)
class Request:
    """An opening handshake: its request target (path and query, RFC 6455 §4.1)
    and headers (names lower-cased, both decoded as Latin-1; ``host`` and the
    ``sec-websocket-protocol``/``-extensions`` headers are left out by wsproto)."""

    path: str
    headers: tuple[tuple[str, str], ...]


class ServerWebSocket:
    """One accepted TCP connection speaking WebSocket as the server.

    One task reads (``receive_request``, then ``get_message``, then ``aclose``);
    any task may ``send_message`` meanwhile. Close frames and HTTP answers wait
    at most ``close_timeout_s``; messages and pongs wait as long as the caller's
    cancel scope lets them, and a send it interrupts makes the
    connection unusable (a partial frame may be on the wire), so ``aclose``
    then closes TCP without a close frame.
    """

    def __init__(self, stream: trio.SocketStream, *, max_message_bytes: int,
                 close_timeout_s: float) -> None:
        self._stream = stream
        self._ws = WSConnection(ConnectionType.SERVER)
        self._max_message_bytes = max_message_bytes
        self._close_timeout_s = close_timeout_s
        self._events: deque[Event | str] = deque()  # parsed; str: a fast-path message
        self._fast = False  # whole text frames are parsed here (see the module docstring)
        self._inbuf = b""  # fast path: bytes of the next, incomplete frame
        self._request_head = bytearray()  # the handshake's bytes, until the request is in
        self._text: list[str] = []
        self._binary: list[bytes] = []
        self._message_bytes = 0
        self._send_lock = trio.StrictFIFOLock()
        self._backlog = b""  # the part of a send_nowait frame the socket did not take
        self._unsendable = False
        self._eof = False  # receive_nowait saw TCP end: get_message reports it
        self._fd = stream.socket.fileno()
        self._closed: ConnectionClosed | None = None
        self.remote, self.source_ip = _peer(stream)
        """``ip:port`` of the peer (``unknown`` once it has gone) and its IP (or None)."""

    async def receive_request(self) -> Request:
        """Read the opening handshake (RFC 6455 §4.2.1) until the whole request is in.

        Raises HandshakeError (the connection answered when the request is no
        WebSocket upgrade or cannot be decoded, and closed). Unbounded in time:
        the caller's cancel scope bounds it (then ``aclose`` closes the TCP
        connection).
        """
        while True:
            for event in self._ws.events():
                if isinstance(event, UpgradeRequest):
                    head = self._request_head
                    self._fast = head.find(b"\r\n\r\n") + 4 == len(head)
                    self._request_head = bytearray()
                    headers = tuple((name.decode("latin-1"), value.decode("latin-1"))
                                    for name, value in event.extra_headers)
                    return Request(event.target, headers)
            data = await self._receive()
            if not data:
                await self._close_stream(CLOSE_ABNORMAL, "gone during the handshake")
                raise HandshakeError("the peer left before its request ended", 0)
            self._request_head += data
            # Compiled (setup.py): the refusal is awaited after the except clauses (an
            # await in one loses the exception being handled), one name per type.
            refusal: tuple[Event | None, str] | None = None
            try:
                self._ws.receive_data(data)
            except HandshakeProtocolError as exc:
                refusal = exc.event_hint, str(exc)
            except UnicodeError as undecodable:  # wsproto decodes the target and Host (IDNA)
                refusal = None, f"undecodable request: {undecodable}"
            if refusal is not None:
                await self._refuse_request(*refusal)

    async def reject(self, status: int, headers: Sequence[tuple[bytes, bytes]] = ()) -> None:
        """Answer the request with HTTP ``status`` and ``headers`` (no body) and close
        the TCP connection (also when the answer cannot be sent or is cancelled)."""
        await self._answer(RejectConnection(status_code=status,
                                            headers=[*headers, (b"connection", b"close")]))

    async def accept(self) -> None:
        """Answer the request with 101 (no subprotocol, no extensions).

        Raises ConnectionClosed when the peer has gone.
        """
        await self._send(self._ws.send(AcceptConnection()))

    async def get_message(self) -> str | bytes:
        """The next whole message: ``str`` for text, ``bytes`` for binary.

        Raises ConnectionClosed once the connection is closed: by the peer's
        close frame (answered), by TCP ending, by ``aclose``, or failed by this
        side (``failed``; see the module docstring). Cancellation loses nothing:
        bytes are only taken from the socket when a receive completes.
        """
        while True:
            if self._closed is not None:
                closed = self._closed
                raise ConnectionClosed(closed.code, closed.reason, failed=closed.failed)
            if not self._events and not self._fast:
                self._events.extend(self._ws.events())
            if self._events:
                message = await self._on_event(self._events.popleft())
                if message is not None:
                    return message
                continue
            data = await self._receive()
            if data:
                self._feed(data)
            else:
                await self._close_stream(CLOSE_ABNORMAL, "closed without a close frame")

    def receive_nowait(self) -> None:
        """Take what the socket holds now (at most :data:`RECEIVE_BYTES`), without
        waiting; :meth:`message_nowait` then hands out the whole messages.

        Only while no task waits in ``get_message``. TCP ending (or failing) is
        kept for ``get_message`` to report (see :attr:`needs_attention`).
        """
        if self._closed is not None or self._eof:
            return
        try:
            data = os.read(self._fd, RECEIVE_BYTES)
        except BlockingIOError:
            return
        except OSError:  # reset: as TCP ending
            data = b""
        if data:
            self._feed(data)
        else:
            self._eof = True

    def message_nowait(self) -> str | bytes | None:
        """The next whole message already received, or None.

        None also when what comes next needs ``get_message`` (a control frame,
        a message over ``max_message_bytes``, a protocol error, TCP ended):
        :attr:`needs_attention` is then True. Never raises, never waits.
        """
        events = self._events
        if self._fast and self._closed is None:  # only fast-path messages (str) are queued
            return cast(str, events.popleft()) if events else None
        while self._closed is None:
            if not events:
                if self._fast:
                    return None
                events.extend(self._ws.events())
                if not events:
                    return None
            event = events[0]
            if isinstance(event, str):  # a fast-path message: within the limit
                events.popleft()
                return event
            if not isinstance(event, TextMessage | BytesMessage):
                return None
            size = _data_bytes(event)
            if self._message_bytes + size > self._max_message_bytes:
                return None
            events.popleft()
            self._message_bytes += size
            message = self._append(event)
            if message is not None:
                return message
        return None

    @property
    def needs_attention(self) -> bool:
        """Whether ``get_message`` has work that :meth:`message_nowait` leaves:
        an event it did not take, TCP ended, or the connection closed."""
        return bool(self._events) or self._eof or self._closed is not None

    @property
    def backlogged(self) -> bool:
        """Whether bytes of a :meth:`send_nowait` frame still wait for :meth:`flush`."""
        return bool(self._backlog)

    def send_nowait(self, frame: bytes) -> bool:
        """Write ``frame`` (whole frames, e.g. :func:`text_frame`'s) now, without
        waiting; False, nothing written, while another send is in progress or a
        backlog waits. What the socket does not take becomes the backlog
        (:attr:`backlogged`): call :meth:`flush`.

        Raises ConnectionClosed when the connection is closed or closing, or the
        peer has gone.
        """
        if (self._closed is not None or self._unsendable
                or self._ws.state is not ConnectionState.OPEN):
            raise ConnectionClosed(CLOSE_ABNORMAL, "closed")
        if self._backlog or self._send_lock.locked():
            return False
        try:
            sent = os.write(self._fd, frame)
        except BlockingIOError:
            sent = 0
        except OSError:
            self._unsendable = True
            raise ConnectionClosed(CLOSE_ABNORMAL, "the peer has gone") from None
        if sent < len(frame):
            self._backlog = frame[sent:]
        return True

    async def send_frame(self, frame: bytes) -> None:
        """Send ``frame`` (one whole frame, e.g. :func:`text_frame`), after the backlog.

        Raises ConnectionClosed when the connection is closed or closing.
        """
        if self._ws.state is not ConnectionState.OPEN:
            raise ConnectionClosed(CLOSE_ABNORMAL, "closed")
        await self._send(frame)

    async def flush(self) -> None:
        """Write the backlog (see :meth:`send_nowait`); raises ConnectionClosed."""
        if self._backlog:
            await self._send(b"")

    async def aclose(self, code: int = 1000, reason: str = "") -> None:
        """Close (RFC 6455 §7.1.2): a close frame with ``code`` and ``reason``, then
        wait for the peer's (messages meanwhile are dropped) at most
        ``close_timeout_s``, then close TCP. Before the handshake has completed,
        only TCP is closed.

        Idempotent; cancellation cuts the closing handshake short and TCP is
        closed all the same.
        """
        if self._closed is not None:
            return
        try:
            if self._ws.state is ConnectionState.OPEN and not self._unsendable:
                with trio.move_on_after(self._close_timeout_s), suppress(ConnectionClosed):
                    await self._send(self._ws.send(CloseConnection(code=code, reason=reason)))
                    while True:
                        await self.get_message()
        finally:
            await self._close_stream(code, reason)

    # -- internals --------------------------------------------------------------

    def _feed(self, data: bytes) -> None:
        """Bytes from the peer after the handshake: whole simple text frames to
        ``_events`` (fast path), anything else from the first other frame on to wsproto."""
        if not self._fast:
            self._ws.receive_data(data)
            return
        if self._inbuf:
            data = self._inbuf + data
        size = len(data)
        pos = 0
        simple = True
        events = self._events
        while size - pos >= 2:
            length = data[pos + 1] & 0x7F
            if data[pos] != _FIN_TEXT or data[pos + 1] < 0x80 or length == 127:
                simple = False  # not a whole masked text frame with a short length
                break
            head = pos + 2
            if size - pos < (8 if length == 126 else 6):
                break
            if length == 126:
                length = (data[head] << 8) | data[head + 1]
                head += 2
                if length < 126:  # not the minimal encoding: wsproto fails it
                    simple = False
                    break
            if length > self._max_message_bytes:  # wsproto streams it and fails 1009
                simple = False
                break
            end = head + 4 + length
            if end > size:
                break
            payload = data[head + 4:end]
            if length and data[head:head + 4] != _NO_MASK:
                key = int.from_bytes((data[head:head + 4] * ((length >> 2) + 1))[:length],
                                     "little")
                payload = (int.from_bytes(payload, "little") ^ key).to_bytes(length, "little")
            try:
                events.append(payload.decode())
            except UnicodeDecodeError:  # wsproto fails it with 1007
                simple = False
                break
            pos = end
        self._inbuf = data[pos:] if pos < size else b""
        if not simple:
            self._fast = False
            self._ws.receive_data(self._inbuf)
            self._inbuf = b""

    async def _on_event(self, event: Event | str) -> str | bytes | None:
        if isinstance(event, str):  # a fast-path message, under max_message_bytes
            return event
        if isinstance(event, TextMessage | BytesMessage):
            return await self._on_data(event)
        if isinstance(event, Ping):
            await self._send(self._ws.send(event.response()))
        elif isinstance(event, CloseConnection):
            await self._on_close(event)
        return None  # a pong: we send no pings

    async def _on_data(self, event: TextMessage | BytesMessage) -> str | bytes | None:
        self._message_bytes += _data_bytes(event)
        if self._message_bytes > self._max_message_bytes:
            await self._fail(CLOSE_MESSAGE_TOO_BIG,
                             f"message over {self._max_message_bytes} bytes")
            return None
        return self._append(event)

    def _append(self, event: TextMessage | BytesMessage) -> str | bytes | None:
        """Add a data event (already counted); the whole message once it is finished."""
        if isinstance(event, TextMessage):
            if event.message_finished and not self._text:
                self._message_bytes = 0
                return event.data
            self._text.append(event.data)
        else:
            self._binary.append(bytes(event.data))
        if not event.message_finished:
            return None
        message = "".join(self._text) if isinstance(event, TextMessage) else b"".join(
            self._binary)
        self._text, self._binary, self._message_bytes = [], [], 0
        return message

    async def _on_close(self, event: CloseConnection) -> None:
        reason = event.reason or ""
        if self._ws.state is ConnectionState.REMOTE_CLOSING:  # the peer's close: echo it
            with suppress(ConnectionClosed):
                await self._send(self._ws.send(event.response()))
            await self._close_stream(event.code, reason)
        elif self._ws.state is ConnectionState.OPEN:  # wsproto's report of a broken frame
            await self._fail(event.code, reason)
        else:  # the answer to our close
            await self._close_stream(event.code, reason)

    async def _fail(self, code: int, reason: str) -> None:
        """Fail the connection (RFC 6455 §7.1.7): a close frame with ``code``, then TCP."""
        if not self._unsendable:
            with trio.move_on_after(self._close_timeout_s), suppress(ConnectionClosed):
                await self._send(self._ws.send(CloseConnection(code=code, reason=reason)))
        await self._close_stream(code, reason, failed=True)

    async def _refuse_request(self, hint: Event | None, reason: str) -> NoReturn:
        answer = hint if isinstance(hint, RejectConnection) else RejectConnection()  # 400
        await self._answer(answer)
        raise HandshakeError(reason, answer.status_code)

    async def _answer(self, response: RejectConnection) -> None:
        try:
            with trio.move_on_after(self._close_timeout_s), suppress(ConnectionClosed):
                await self._send(self._ws.send(response))
        except LocalProtocolError:  # wsproto cannot answer in this state: close unanswered
            pass
        finally:
            await self._close_stream(CLOSE_ABNORMAL, f"answered {response.status_code}")

    async def _receive(self) -> bytes:
        """The next bytes from the peer; b"" when TCP has ended."""
        if self._eof:
            return b""
        try:
            return await self._stream.receive_some(RECEIVE_BYTES)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return b""

    async def _send(self, data: bytes) -> None:
        if self._unsendable or self._closed is not None:
            raise ConnectionClosed(CLOSE_ABNORMAL, "closed")
        async with self._send_lock:
            sent = False
            data, self._backlog = self._backlog + data, b""
            try:
                if data:
                    await self._stream.send_all(data)
                sent = True
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                raise ConnectionClosed(CLOSE_ABNORMAL, "the peer has gone") from None
            finally:
                self._unsendable = self._unsendable or not sent

    async def _close_stream(self, code: int, reason: str, *, failed: bool = False) -> None:
        if self._closed is None:
            self._closed = ConnectionClosed(code, reason, failed=failed)
        self._events.clear()
        self._inbuf = b""
        self._text, self._binary, self._message_bytes = [], [], 0
        await self._stream.aclose()


async def refuse_unread(stream: trio.SocketStream, status: int,
                        headers: Sequence[tuple[bytes, bytes]], timeout_s: float) -> None:
    """Answer HTTP/1.1 ``status`` with ``headers`` (no body, ``connection: close``)
    without reading the request, then close the TCP connection.

    For a connection over a limit: it costs no parsing and no waiting. A request
    still unread when the socket closes makes the kernel reset the connection;
    the answer sent before it stays readable for the peer. The send is bounded
    by ``timeout_s``; cancellation closes the connection all the same.
    """
    lines = [f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}".encode()]
    lines += [name + b": " + value for name, value in headers]
    lines += [b"content-length: 0", b"connection: close", b"", b""]
    try:
        with trio.move_on_after(timeout_s), suppress(trio.BrokenResourceError):
            await stream.send_all(b"\r\n".join(lines))
    finally:
        await stream.aclose()


def _data_bytes(event: TextMessage | BytesMessage) -> int:
    """A data event's size in bytes (text as UTF-8)."""
    data = event.data
    if isinstance(data, str):
        return len(data) if data.isascii() else len(data.encode())
    return len(data)


def _peer(stream: trio.SocketStream) -> tuple[str, str | None]:
    try:
        address = stream.socket.getpeername()
    except OSError:  # already reset by the peer
        return "unknown", None
    return f"{address[0]}:{address[1]}", str(address[0])
