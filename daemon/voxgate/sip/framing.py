"""SIP message framing on a byte stream (RFC 3261 §18.3, §7.5; RFC 5626 §4.4.1), sans-IO.

Over TCP and TLS a message ends where its Content-Length says: the header
section runs to the first empty line (CRLF CRLF, or LF LF leniently) and the
body is exactly Content-Length octets. :class:`StreamFramer` takes bytes as
they arrive (:meth:`~StreamFramer.receive_data`) and gives whole messages back
(:meth:`~StreamFramer.next_message`). Between messages, CRLFs are skipped
(§7.5); each double-CRLF "ping" asks for a single-CRLF "pong" (RFC 5626
§4.4.1), counted in :attr:`~StreamFramer.pongs_due`.

Bounds: a message (header section plus body) is at most ``max_message_bytes``.
Errors are :class:`FramingError`: the header section grows past the bound
with no empty line (400), Content-Length missing, repeated with different
values or not a number (400), or announcing a body past the bound (413,
§21.4.14). The stream cannot be resynchronised after any of them: the driver
answers ``status`` from ``head`` when there is one and closes the connection.
"""

from __future__ import annotations

import re

from voxgate.errors import RemoteProtocolError

_CONTENT_LENGTH_RE = re.compile(rb"^(?:content-length|l)[ \t]*:[ \t]*([^\r\n]*?)[ \t]*\r?$",
                                re.IGNORECASE | re.MULTILINE)
"""Content-Length (§20.14, compact form ``l``) in a header section, per line."""
_PING = b"\r\n\r\n"


class FramingError(RemoteProtocolError):
    """The stream holds no well-framed message; the connection must be closed.

    ``reason`` names the defect, ``status_hint`` the SIP answer (400 or 413),
    ``head`` the header section to answer from (``b""`` when it never ended).
    """

    def __init__(self, reason: str, status_hint: int, head: bytes = b"") -> None:
        super().__init__(reason, status_hint)
        self.head = head


class StreamFramer:
    """Cuts one connection's bytes into SIP messages (see the module docstring).

    ``max_message_bytes`` bounds a message, and so the bytes buffered.
    """

    def __init__(self, max_message_bytes: int) -> None:
        self.max_message_bytes = max_message_bytes
        self.pongs_due = 0
        """Double-CRLF pings seen and not answered yet; the driver sends one CRLF
        for each and sets this back to 0."""
        self._buffer = bytearray()
        self._failed: FramingError | None = None

    @property
    def failed(self) -> bool:
        """Whether a framing error ended the stream (see :meth:`next_message`)."""
        return self._failed is not None

    @property
    def buffered_bytes(self) -> int:
        """Bytes held for the message being received."""
        return len(self._buffer)

    @property
    def partial(self) -> bool:
        """Whether part of a message is buffered (a read deadline should run)."""
        return bool(self._buffer)

    def receive_data(self, data: bytes | bytearray) -> None:
        """Append bytes read from the stream (untrusted; never raises); after a
        framing error they are discarded."""
        if self._failed is None:
            self._buffer += data

    def next_message(self) -> bytes | None:
        """The next whole message (header section and body), or ``None`` until
        more bytes arrive. Raises FramingError, then again on every call."""
        if self._failed is not None:
            raise self._failed
        try:
            return self._next_message()
        except FramingError as exc:
            self._failed = exc
            self._buffer.clear()
            raise

    def _next_message(self) -> bytes | None:
        buffer = self._buffer
        self._skip_keepalives()
        end, body_start = _head_end(buffer, self.max_message_bytes)
        if end < 0:
            if len(buffer) > self.max_message_bytes:
                raise FramingError(f"header section longer than {self.max_message_bytes} "
                                   "bytes", 400)
            return None
        head = bytes(buffer[:end])
        length = _content_length(head)
        if body_start + length > self.max_message_bytes:
            raise FramingError(f"Content-Length {length} makes the message longer than "
                               f"{self.max_message_bytes} bytes", 413, head)
        if len(buffer) < body_start + length:
            return None
        message = bytes(buffer[:body_start + length])
        del buffer[:body_start + length]
        return message

    def _skip_keepalives(self) -> None:
        """Drop leading CRLFs (§7.5), counting double-CRLF pings (RFC 5626 §4.4.1)."""
        buffer = self._buffer
        start = 0
        while True:
            if buffer.startswith(_PING, start):
                self.pongs_due += 1
                start += len(_PING)
            elif buffer.startswith(b"\r\n", start):
                start += 2
            elif buffer.startswith(b"\n", start):
                start += 1
            else:
                break
        del buffer[:start]


def _head_end(buffer: bytearray, limit: int) -> tuple[int, int]:
    """(end of the header section, start of the body) in ``buffer``, searched
    within ``limit`` bytes; ``(-1, -1)`` when no empty line is there yet."""
    crlf, lf = buffer.find(b"\r\n\r\n", 0, limit + 4), buffer.find(b"\n\n", 0, limit + 2)
    ends = [(i, i + size) for i, size in ((crlf, 4), (lf, 2)) if i >= 0]
    return min(ends, default=(-1, -1))


def _content_length(head: bytes) -> int:
    """The Content-Length of a header section (§18.3: required on a stream).

    Raises FramingError(400) when it is missing, not a number, or given twice
    with different values.
    """
    values = {m.group(1) for m in _CONTENT_LENGTH_RE.finditer(head)}
    if not values:
        raise FramingError("no Content-Length on a stream transport", 400, head)
    if len(values) > 1:
        raise FramingError("conflicting Content-Length values", 400, head)
    value = values.pop()
    if not value.isdigit() or len(value) > 10:
        raise FramingError("Content-Length is not a number", 400, head)
    return int(value)
