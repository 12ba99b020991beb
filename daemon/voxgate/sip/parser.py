"""Parse one SIP message from an untrusted datagram (RFC 3261 §7, §18.3).

``parse_message_untrusted(data)`` returns a :class:`Request` or
:class:`Response`, or raises :class:`BadMessage` saying what is wrong and how
a UAS answers it. Steps:

1. Leading CRLFs (keep-alives, §7.5) are skipped; nothing else → drop.
2. The head ends at the first empty line (CRLF or bare LF line ends); folded
   lines are unfolded (§7.3.1); undecodable bytes are kept as surrogate
   escapes, so that echoing a header gives back the peer's bytes.
3. The start line (§7.1, §7.2), then every header line: names are case-
   insensitive and compact forms expanded; list headers (§7.3.1) are split
   into one entry per value; the headers that voxgate acts on are checked
   with the typed parsers of :mod:`voxgate.sip.headers`.
4. The body is exactly Content-Length octets (§18.3, §20.14); trailing octets
   are ignored; without Content-Length the rest of the datagram is the body.

Anything wrong in a request raises ``BadMessage`` with a status hint (400,
505, 513) and a leniently parsed ``partial`` request to answer from; anything
wrong in a response raises it with ``status_hint=None`` (responses are
dropped, never answered, §16.7/§18.1.2).
"""

from __future__ import annotations

import re
from collections.abc import Callable

from voxgate.errors import RemoteProtocolError
from voxgate.sip import grammar
from voxgate.sip.headers import (
    LIST_HEADERS,
    SINGLE_VALUE_HEADERS,
    TOKEN_LIST_HEADERS,
    parse_cseq,
    parse_name_addr,
    parse_uint,
    parse_via,
    split_list_value,
)
from voxgate.sip.message import SIP_VERSION, Headers, Request, Response, canonical_header_name
from voxgate.sip.uri import SIP_SCHEMES, parse_uri_untrusted

MAX_MESSAGE_BYTES = 65_535
"""Largest datagram accepted; larger ones get 513 (RFC 3261 §21.5.14)."""

MAX_HEADER_FIELDS = 256
"""Most header entries in a message, counted after list splitting; more → 400."""

MAX_HEADER_LINE_BYTES = 8_192
"""Longest header line, counted after unfolding; longer → 400."""

MAX_FORWARDS_LIMIT = 255
"""Largest Max-Forwards value (RFC 3261 §20.22: 0-255 in practice, RFC 4475 §3.1.2.4)."""

MAX_DELTA_SECONDS = 2**32 - 1
"""Largest Expires / Content-Length value (RFC 3261 §20.19, §20.14)."""

REQUIRED_HEADERS = ("Via", "From", "To", "Call-ID", "CSeq")
"""Headers every message must carry (RFC 3261 §8.1.1); a request without them gets 400."""

_CR, _LF = 0x0D, 0x0A
_FOLD_RE = re.compile(r"\n[ \t]+")


class BadMessage(RemoteProtocolError):
    """A message that cannot be processed.

    ``reason`` names the defect (it goes to the log). ``status_hint`` is the
    SIP answer (400, 505, 513) or ``None`` to drop silently (keep-alives, bad
    responses, bytes that are not even a request line). ``partial`` is a
    best-effort :class:`Request` built leniently (headers split at the first
    ``:`` of each unfolded line, no validation, empty body) so that the UAS
    can copy Via/From/To/Call-ID/CSeq into its answer; ``None`` when even the
    start line is not a request.
    """

    def __init__(
        self, reason: str, status_hint: int | None = 400, partial: Request | None = None
    ) -> None:
        super().__init__(reason, status_hint)
        self.partial = partial


def parse_message_untrusted(
    data: bytes, *, max_bytes: int = MAX_MESSAGE_BYTES
) -> Request | Response:
    """Parse one SIP message from the bytes of one datagram (RFC 3261 §7, §18.3).

    Raises :class:`BadMessage` for anything that is not a well-formed SIP/2.0
    message within the limits above (``max_bytes`` bounds the whole datagram).
    """
    stripped = data.lstrip(b"\r\n")
    if not stripped.strip():
        raise BadMessage("empty datagram (keep-alive)", None)
    if len(data) > max_bytes:
        head, _ = _split_head(stripped[:max_bytes])
        raise _bad_request(f"message of {len(data)} bytes exceeds {max_bytes}", 513, _unfold(head))
    head, rest = _split_head(stripped)
    lines = _unfold(head)
    status_line = grammar.STATUS_LINE_RE.fullmatch(lines[0])
    if status_line is not None or lines[0][:4].upper() == "SIP/":
        try:
            return _parse_response(status_line, lines, rest)
        except RemoteProtocolError as exc:
            raise BadMessage(f"response dropped: {exc.reason}", None) from None
    try:
        return _parse_request(lines, rest)
    except RemoteProtocolError as exc:
        raise _bad_request(exc.reason, exc.status_hint, lines) from None


def _split_head(data: bytes) -> tuple[bytes, bytes]:
    """(head, rest) at the first empty line; no empty line → all head, no body.

    An empty line is LF followed by LF or CRLF, so a head ends at the first
    of those two patterns (two ``find`` calls beat a regex search).
    """
    ends = [i for i in (data.find(b"\n\n"), data.find(b"\n\r\n")) if i >= 0]
    if not ends:
        return data.rstrip(b"\r\n"), b""
    end = min(ends)
    rest_start = end + (2 if data[end + 1] == _LF else 3)
    if end > 0 and data[end - 1] == _CR:
        end -= 1
    return data[:end], data[rest_start:]


def _unfold(head: bytes) -> list[str]:
    """Head lines with folding undone (§7.3.1), decoded as UTF-8 + surrogateescape.

    CRLF and bare LF both end a line; a CR elsewhere stays in the line. The
    start line is never a fold target: whitespace after it starts a bad header.
    """
    text = head.decode("utf-8", "surrogateescape").replace("\r\n", "\n")
    start_line, _, fields = text.partition("\n")
    if "\n " in fields or "\n\t" in fields:
        fields = _FOLD_RE.sub(" ", fields)
    return [start_line, *fields.split("\n")] if fields else [start_line]


def _parse_request(lines: list[str], rest: bytes) -> Request:
    match = grammar.REQUEST_LINE_RE.fullmatch(lines[0])
    if match is None:
        raise RemoteProtocolError(f"malformed Request-Line {lines[0][:80]!r}")
    method, uri, version = match.groups()
    if version.upper() != SIP_VERSION:
        raise RemoteProtocolError(f"unsupported version {version[:20]!r}", 505)
    is_sip_uri = uri.partition(":")[0].lower() in SIP_SCHEMES
    if is_sip_uri and parse_uri_untrusted(uri).headers:
        raise RemoteProtocolError("Request-URI holds headers (RFC 3261 §19.1.1 Table 1)")
    headers, singles = _parse_headers(lines)
    cseq = parse_cseq(singles["cseq"])
    if cseq.method != method:
        raise RemoteProtocolError(f"CSeq method {cseq.method[:30]!r} differs from {method[:30]!r}")
    return Request(method, uri, headers, _body(singles, rest), SIP_VERSION)


def _parse_response(status_line: re.Match[str] | None, lines: list[str], rest: bytes) -> Response:
    if status_line is None:
        raise RemoteProtocolError(f"malformed Status-Line {lines[0][:80]!r}")
    version, code, reason = status_line.groups()
    if version.upper() != SIP_VERSION:
        raise RemoteProtocolError(f"unsupported version {version[:20]!r}")
    headers, singles = _parse_headers(lines)
    return Response(int(code), reason or "", headers, _body(singles, rest), SIP_VERSION)


def _check_contact(value: str) -> None:
    if value != "*":
        parse_name_addr(value)


def _check_call_id(value: str) -> None:
    if not grammar.CALL_ID_RE.fullmatch(value):
        raise RemoteProtocolError(f"malformed Call-ID {value[:60]!r}")


def _check_max_forwards(value: str) -> None:
    parse_uint(value, MAX_FORWARDS_LIMIT, "Max-Forwards")


def _check_delta_seconds(value: str) -> None:
    parse_uint(value, MAX_DELTA_SECONDS, "Expires")


def _check_token(value: str) -> None:
    if value and not grammar.TOKEN_RE.fullmatch(value):
        raise RemoteProtocolError(f"not a token: {value[:40]!r}")


# Checks of the header values voxgate acts on, keyed by lower-cased name; one
# call per list element. Content-Length is checked when the body is cut.
_CHECKS: dict[str, Callable[[str], object]] = {
    "via": parse_via,
    "from": parse_name_addr,
    "to": parse_name_addr,
    "contact": _check_contact,
    "route": parse_name_addr,
    "record-route": parse_name_addr,
    "call-id": _check_call_id,
    "cseq": parse_cseq,
    "max-forwards": _check_max_forwards,
    "expires": _check_delta_seconds,
    **dict.fromkeys(TOKEN_LIST_HEADERS, _check_token),
}


def _parse_headers(lines: list[str]) -> tuple[Headers, dict[str, str]]:
    """Header lines → (Headers, values of single-value headers by lower-cased name).

    List headers are split, the values in ``_CHECKS`` are checked and the
    required headers must be present.
    """
    if len(lines) - 1 > MAX_HEADER_FIELDS:
        raise RemoteProtocolError(f"more than {MAX_HEADER_FIELDS} header fields")
    items: list[tuple[str, str]] = []
    singles: dict[str, str] = {}
    present: set[str] = set()
    _check_line(lines[0])
    for line in lines[1:]:
        _check_line(line)
        match = grammar.HEADER_FIELD_RE.fullmatch(line)
        if match is None:
            raise RemoteProtocolError(f"malformed header line {line[:60]!r}")
        name = canonical_header_name(match[1])
        key = name.lower()
        value = match[2].strip()
        present.add(key)
        check = _CHECKS.get(key)
        if key in LIST_HEADERS and "," in value:
            values = split_list_value(value)
            if "" in values:
                raise RemoteProtocolError(f"empty element in {name} list {value[:60]!r}")
            for element in values:
                if check is not None:
                    check(element)
                items.append((name, element))
        else:
            if key in SINGLE_VALUE_HEADERS:
                if key in singles:
                    raise RemoteProtocolError(f"several {name} header fields")
                singles[key] = value
            if check is not None:
                check(value)
            items.append((name, value))
        if len(items) > MAX_HEADER_FIELDS:
            raise RemoteProtocolError(f"more than {MAX_HEADER_FIELDS} header values")
    missing = [name for name in REQUIRED_HEADERS if name.lower() not in present]
    if missing:
        raise RemoteProtocolError(f"missing required header(s): {', '.join(missing)}")
    return Headers(items), singles


def _check_line(line: str) -> None:
    # A character takes 1 to 4 bytes: only long lines need encoding to be measured.
    if len(line) > MAX_HEADER_LINE_BYTES // 4 and (
        len(line.encode("utf-8", "surrogateescape")) > MAX_HEADER_LINE_BYTES
    ):
        raise RemoteProtocolError(f"line longer than {MAX_HEADER_LINE_BYTES} bytes")
    if "\r" in line:
        raise RemoteProtocolError(f"bare CR in line {line[:60]!r}")


def _body(singles: dict[str, str], rest: bytes) -> bytes:
    """The body: Content-Length octets of ``rest``, or all of it without one (§18.3)."""
    text = singles.get("content-length")
    if text is None:
        return rest
    length = parse_uint(text, MAX_DELTA_SECONDS, "Content-Length")
    if length > len(rest):
        raise RemoteProtocolError(f"Content-Length {length} exceeds the {len(rest)} body octets")
    return rest[:length]


def _bad_request(reason: str, status_hint: int | None, lines: list[str]) -> BadMessage:
    """BadMessage carrying a lenient partial request; dropped when there is none."""
    partial = _lenient_request(lines)
    return BadMessage(reason, None if partial is None else status_hint, partial)


def _lenient_request(lines: list[str]) -> Request | None:
    """Method, URI and version from a request-shaped start line, headers split at ':'."""
    parts = lines[0].split()
    if len(parts) < 3 or not parts[-1].upper().startswith("SIP/"):
        return None
    items: list[tuple[str, str]] = []
    for line in lines[1 : MAX_HEADER_FIELDS + 1]:
        name, colon, value = line.partition(":")
        if colon and name.strip():
            items.append((name.strip(), value.strip()))
    return Request(parts[0], " ".join(parts[1:-1]), Headers(items), b"", parts[-1])
