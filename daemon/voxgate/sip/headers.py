"""Typed views of SIP header values (RFC 3261 §20, grammar in §25.1).

The parser (:mod:`voxgate.sip.parser`) stores header values as text, one
entry per list element; the functions here turn one such value into a frozen
record. Every ``parse_*`` function reads untrusted text and raises
:class:`~voxgate.errors.RemoteProtocolError` with status hint 400.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from voxgate.errors import RemoteProtocolError
from voxgate.sip import grammar
from voxgate.sip.uri import (
    SIP_SCHEMES,
    format_host_port,
    parse_host_untrusted,
    parse_port_untrusted,
    parse_uri_untrusted,
)

MAX_CSEQ = 2**31 - 1
"""Largest CSeq sequence number (RFC 3261 §8.1.1.5: less than 2**31)."""

LIST_HEADERS = frozenset(
    {
        "accept", "accept-encoding", "accept-language", "alert-info", "allow",
        "allow-events", "call-info", "contact", "content-encoding", "content-language",
        "error-info", "in-reply-to", "path", "p-asserted-identity", "proxy-require",
        "reason", "record-route", "require", "route", "service-route", "supported",
        "unsupported", "via", "warning",
    }
)  # fmt: skip
"""Lower-cased names of headers whose value is a comma-separated list (§7.3.1).

Authorization and the *-Authenticate headers hold commas too but are not
lists (§7.3.1); unknown headers are never split.
"""

SINGLE_VALUE_HEADERS = frozenset(
    {
        "call-id", "content-disposition", "content-length", "content-type", "cseq",
        "date", "expires", "from", "max-forwards", "min-expires", "mime-version",
        "refer-to", "reply-to", "retry-after", "session-expires", "timestamp", "to",
    }
)  # fmt: skip
"""Lower-cased names of headers that may appear once only (§20; RFC 4475 §3.3.11)."""

TOKEN_LIST_HEADERS = frozenset({"allow", "proxy-require", "require", "supported", "unsupported"})
"""Lower-cased names of headers whose elements are single tokens (option-tags, methods)."""

_LIST_ELEMENT_RE = re.compile(r'(?:[^,"<]+|"(?:[^"\\]|\\.?)*"?|<[^>]*>?)*')
_QUOTE_ME_RE = re.compile(r'["\\\x00-\x08\x0b\x0c\x0e-\x1f\x7f]')


@dataclass(frozen=True, slots=True)
class Via:
    """One via-parm (RFC 3261 §20.42): ``SIP/2.0/<transport> <host>[:<port>];params``.

    ``transport`` is upper-cased; ``host`` is an IPv6 address without brackets,
    an IPv4 address or a hostname; ``params`` maps lower-cased names to values
    (``None`` for a parameter without ``=``), in wire order.
    """

    transport: str
    host: str
    port: int | None
    params: dict[str, str | None]

    @property
    def branch(self) -> str | None:
        """The ``branch`` parameter (§8.1.1.7), or ``None``."""
        return self.params.get("branch")

    @property
    def received(self) -> str | None:
        """The ``received`` parameter (§18.2.1), or ``None``."""
        return self.params.get("received")

    @property
    def rport(self) -> int | None:
        """The ``rport`` port number (RFC 3581 §4); ``None`` when absent or valueless."""
        value = self.params.get("rport")
        if value is None or not grammar.DIGITS_RE.fullmatch(value):
            return None
        return int(value)

    @property
    def has_rport(self) -> bool:
        """Whether ``rport`` is present, with or without a value (RFC 3581 §4)."""
        return "rport" in self.params

    def serialize(self) -> str:
        """The via-parm as text: ``SIP/2.0/UDP host:port;p=v...``."""
        sent_by = format_host_port(self.host, self.port)
        return f"SIP/2.0/{self.transport} {sent_by}{_format_params(self.params)}"

    def with_params(self, **params: str | None) -> Via:
        """A copy with ``params`` added or replaced (``None`` = no value), e.g. ``rport="5060"``."""
        return replace(self, params={**self.params, **params})


def parse_via(value: str) -> Via:
    """Parse one via-parm (RFC 3261 §20.42); the protocol must be ``SIP/2.0``."""
    text = value.strip()
    match = grammar.VIA_PARM_RE.match(text)
    if match is None:
        raise RemoteProtocolError(f"malformed Via {text[:60]!r}")
    name, version, transport, host, port = match.groups()
    if name.upper() != "SIP" or version != "2.0":
        raise RemoteProtocolError(f"Via protocol is not SIP/2.0: {text[:30]!r}")
    params = _parse_params(text, match.end(), "Via")
    rport = params.get("rport")
    if rport is not None:
        parse_port_untrusted(rport)
    return Via(
        transport=transport.upper(),
        host=parse_host_untrusted(host),
        port=None if port is None else parse_port_untrusted(port),
        params=params,
    )


@dataclass(frozen=True, slots=True)
class NameAddr:
    """A From/To/Contact/Route value (RFC 3261 §20.10, §20.20, §20.39).

    ``display`` is the display name without quotes and with quoted-pairs
    resolved (``None`` when absent); ``uri`` is the URI text as on the wire;
    ``params`` are the header parameters (lower-cased names), in wire order.
    """

    display: str | None
    uri: str
    params: dict[str, str | None]

    @property
    def tag(self) -> str | None:
        """The ``tag`` parameter (§19.3), or ``None``."""
        return self.params.get("tag")

    def serialize(self) -> str:
        """``"display" <uri>;params`` (the URI always in angle brackets)."""
        addr = f"<{self.uri}>{_format_params(self.params)}"
        if self.display is None:
            return addr
        return f"{_quote(self.display)} {addr}"


def parse_name_addr(value: str) -> NameAddr:
    """Parse ``name-addr`` or ``addr-spec`` followed by header parameters (§20.10).

    Without angle brackets the URI ends at the first ``;`` (what follows are
    header parameters) and may not hold ``,`` or ``?``. ``sip:``/``sips:``
    URIs are checked with :func:`~voxgate.sip.uri.parse_uri_untrusted`; other
    schemes only for absoluteURI characters (the caller decides about them).
    """
    text = value.strip()
    match = grammar.NAME_ADDR_RE.match(text)
    if match is not None:
        quoted, tokens, uri = match.groups()
        display = tokens if quoted is None else _unquote(quoted)
    else:
        match = grammar.ADDR_SPEC_RE.match(text)
        if match is None:
            raise RemoteProtocolError(f"malformed name-addr {text[:60]!r}")
        display, uri = None, match[0]
    if uri.partition(":")[0].lower() in SIP_SCHEMES:
        parse_uri_untrusted(uri)
    return NameAddr(display, uri, _parse_params(text, match.end(), "name-addr"))


@dataclass(frozen=True, slots=True)
class CSeq:
    """A CSeq value (RFC 3261 §20.16): sequence number and method."""

    number: int
    method: str


def parse_cseq(value: str) -> CSeq:
    """Parse ``1*DIGIT LWS Method``; the number must be at most 2**31-1 (§8.1.1.5)."""
    match = grammar.CSEQ_RE.fullmatch(value.strip())
    if match is None:
        raise RemoteProtocolError(f"malformed CSeq {value[:40]!r}")
    return CSeq(parse_uint(match[1], MAX_CSEQ, "CSeq number"), match[2])


def parse_uint(value: str, maximum: int, what: str) -> int:
    """Parse ``1*DIGIT`` (leading zeros allowed) no larger than ``maximum``.

    ``what`` names the field in the error. Huge inputs are refused by their
    length, before any conversion.
    """
    text = value.strip()
    if not grammar.DIGITS_RE.fullmatch(text):
        raise RemoteProtocolError(f"{what} is not a decimal number: {text[:20]!r}")
    significant = text.lstrip("0") or "0"
    if len(significant) > len(str(maximum)) or int(significant) > maximum:
        raise RemoteProtocolError(f"{what} exceeds {maximum}: {text[:20]!r}")
    return int(significant)


def split_list_value(value: str) -> list[str]:
    """Split a list header value at commas outside quoted strings and ``<...>`` (§7.3.1).

    Elements are stripped; empty elements are kept (as ``""``) so that the
    caller can refuse them. An unterminated quote or bracket runs to the end.
    """
    if '"' not in value and "<" not in value:
        return [element.strip() for element in value.split(",")]
    elements: list[str] = []
    pos = 0
    while True:
        match = _LIST_ELEMENT_RE.match(value, pos)
        assert match is not None  # the pattern also matches the empty string
        elements.append(match[0].strip())
        pos = match.end() + 1  # skip the comma
        if pos > len(value):
            return elements


def parse_token_list(values: list[str]) -> list[str]:
    """Flatten Require/Supported/Allow… values into their tokens (§20.32, §20.37, §20.5).

    Each value may itself be comma-separated; empty elements are skipped.
    """
    tokens: list[str] = []
    for value in values:
        for element in split_list_value(value):
            if not element:
                continue
            if not grammar.TOKEN_RE.fullmatch(element):
                raise RemoteProtocolError(f"not a token: {element[:40]!r}")
            tokens.append(element)
    return tokens


def _parse_params(text: str, pos: int, what: str) -> dict[str, str | None]:
    """``*(SEMI generic-param)`` from ``pos`` to the end of ``text``."""
    params: dict[str, str | None] = {}
    while pos < len(text):
        match = grammar.GENERIC_PARAM_RE.match(text, pos)
        if match is None:
            raise RemoteProtocolError(f"malformed {what} parameters {text[pos : pos + 40]!r}")
        params[match[1].lower()] = match[2]
        pos = match.end()
    return params


def _format_params(params: dict[str, str | None]) -> str:
    return "".join(f";{k}" if v is None else f";{k}={v}" for k, v in params.items())


def _unquote(quoted: str) -> str:
    return grammar.QUOTED_PAIR_RE.sub(lambda m: m[0][1], quoted[1:-1])


def _quote(text: str) -> str:
    safe = text.replace("\r", " ").replace("\n", " ")
    return '"' + _QUOTE_ME_RE.sub(lambda m: "\\" + m[0], safe) + '"'
