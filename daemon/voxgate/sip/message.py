"""SIP message model and serializer (RFC 3261 §7).

The model is what the parser (:mod:`voxgate.sip.parser`) produces from
untrusted bytes and what the transaction and dialog layers build to send.
Header names are stored in their canonical long form (``Via``, ``Call-ID``,
``CSeq`` …); list-valued headers (§7.3.1: Via, Route, Contact, Allow …) hold
one entry per value, whether the peer sent them comma-separated or repeated.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

SIP_VERSION = "SIP/2.0"

# RFC 3261 §7.3.3 compact forms, plus RFC 3515/3891/4028 ones seen on the wire.
COMPACT_FORMS: dict[str, str] = {
    "i": "Call-ID",
    "m": "Contact",
    "e": "Content-Encoding",
    "l": "Content-Length",
    "c": "Content-Type",
    "f": "From",
    "s": "Subject",
    "k": "Supported",
    "t": "To",
    "v": "Via",
    "r": "Refer-To",
    "b": "Referred-By",
    "x": "Session-Expires",
    "o": "Event",
    "u": "Allow-Events",
}

# Canonical spelling of well-known header names, keyed by lower case.
_CANONICAL: dict[str, str] = {
    name.lower(): name
    for name in (
        "Accept", "Accept-Encoding", "Accept-Language", "Alert-Info", "Allow",
        "Allow-Events", "Authentication-Info", "Authorization", "Call-ID", "Call-Info",
        "Contact", "Content-Disposition", "Content-Encoding", "Content-Language",
        "Content-Length", "Content-Type", "CSeq", "Date", "Error-Info", "Event",
        "Expires", "From", "In-Reply-To", "Max-Forwards", "MIME-Version", "Min-Expires",
        "Organization", "Priority", "Proxy-Authenticate", "Proxy-Authorization",
        "Proxy-Require", "Reason", "Record-Route", "Refer-To", "Referred-By",
        "Reply-To", "Require", "Retry-After", "Route", "Server", "Session-Expires",
        "Subject", "Supported", "Timestamp", "To", "Unsupported", "User-Agent", "Via",
        "Warning", "WWW-Authenticate",
    )
}


def canonical_header_name(name: str) -> str:
    """Return the canonical long form of a header name (case-insensitive, §7.3.1).

    Compact forms are expanded (``v`` → ``Via``); unknown names keep the
    peer's spelling so that they are echoed unchanged.
    """
    lower = name.lower()
    if lower in COMPACT_FORMS:
        return COMPACT_FORMS[lower]
    return _CANONICAL.get(lower, name)


class Headers:
    """An ordered, case-insensitive multimap of SIP header fields.

    Entries are ``(canonical_name, value)`` pairs in wire order; a list-valued
    header contributes one entry per value.
    """

    __slots__ = ("_items",)

    def __init__(self, items: Iterable[tuple[str, str]] = ()) -> None:
        self._items: list[tuple[str, str]] = [
            (canonical_header_name(n), v) for n, v in items
        ]

    def get(self, name: str) -> str | None:
        """The first value of ``name``, or ``None`` when absent."""
        key = canonical_header_name(name).lower()
        for n, v in self._items:
            if n.lower() == key:
                return v
        return None

    def get_all(self, name: str) -> list[str]:
        """Every value of ``name`` in wire order (empty when absent)."""
        key = canonical_header_name(name).lower()
        return [v for n, v in self._items if n.lower() == key]

    def add(self, name: str, value: str) -> None:
        """Append one value."""
        self._items.append((canonical_header_name(name), value))

    def set(self, name: str, value: str) -> None:
        """Replace every value of ``name`` by one value, keeping its position."""
        canon = canonical_header_name(name)
        key = canon.lower()
        out: list[tuple[str, str]] = []
        placed = False
        for n, v in self._items:
            if n.lower() == key:
                if not placed:
                    out.append((canon, value))
                    placed = True
            else:
                out.append((n, v))
        if not placed:
            out.append((canon, value))
        self._items = out

    def remove(self, name: str) -> None:
        """Remove every value of ``name``."""
        key = canonical_header_name(name).lower()
        self._items = [(n, v) for n, v in self._items if n.lower() != key]

    def copy(self) -> Headers:
        return Headers(self._items)

    def __iter__(self) -> Iterator[tuple[str, str]]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.get(name) is not None

    def __repr__(self) -> str:
        return f"Headers({self._items!r})"


@dataclass
class Request:
    """A SIP request (§7.1). ``uri`` is the Request-URI as text."""

    method: str
    uri: str
    headers: Headers = field(default_factory=Headers)
    body: bytes = b""
    version: str = SIP_VERSION

    @property
    def call_id(self) -> str:
        return self.headers.get("Call-ID") or ""

    def serialize(self) -> bytes:
        """Wire bytes; Content-Length is set from ``body`` (§20.14)."""
        return _serialize(f"{self.method} {self.uri} {self.version}", self.headers, self.body)


@dataclass
class Response:
    """A SIP response (§7.2)."""

    status: int
    reason: str
    headers: Headers = field(default_factory=Headers)
    body: bytes = b""
    version: str = SIP_VERSION

    @property
    def call_id(self) -> str:
        return self.headers.get("Call-ID") or ""

    def serialize(self) -> bytes:
        """Wire bytes; Content-Length is set from ``body`` (§20.14)."""
        return _serialize(f"{self.version} {self.status} {self.reason}", self.headers, self.body)


Message = Request | Response


def _serialize(start_line: str, headers: Headers, body: bytes) -> bytes:
    lines = [start_line]
    lines.extend(f"{n}: {v}" for n, v in headers if n != "Content-Length")
    lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "surrogateescape") + body


REASON_PHRASES: dict[int, str] = {
    100: "Trying",
    180: "Ringing",
    183: "Session Progress",
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    406: "Not Acceptable",
    408: "Request Timeout",
    413: "Request Entity Too Large",
    415: "Unsupported Media Type",
    416: "Unsupported URI Scheme",
    420: "Bad Extension",
    481: "Call/Transaction Does Not Exist",
    482: "Loop Detected",
    483: "Too Many Hops",
    486: "Busy Here",
    487: "Request Terminated",
    488: "Not Acceptable Here",
    491: "Request Pending",
    500: "Server Internal Error",
    501: "Not Implemented",
    503: "Service Unavailable",
    505: "Version Not Supported",
    513: "Message Too Large",
}


def make_response(
    request: Request,
    status: int,
    reason: str | None = None,
    *,
    to_tag: str | None = None,
    extra: Iterable[tuple[str, str]] = (),
    body: bytes = b"",
) -> Response:
    """Build a response to ``request`` per §8.2.6.2.

    Via (all values, in order), From, Call-ID and CSeq are copied; To is
    copied and gets ``;tag=to_tag`` when given and not already tagged.
    ``extra`` headers are appended after those.
    """
    headers = Headers()
    for value in request.headers.get_all("Via"):
        headers.add("Via", value)
    for name in ("From", "To", "Call-ID", "CSeq"):
        found = request.headers.get(name)
        if found is None:
            continue
        if name == "To" and to_tag is not None and ";tag=" not in found.lower().replace(" ", ""):
            found = f"{found};tag={to_tag}"
        headers.add(name, found)
    for name, value in extra:
        headers.add(name, value)
    return Response(status, reason or REASON_PHRASES.get(status, "Unknown"), headers, body)
