"""SIP and SIPS URIs (RFC 3261 §19.1, grammar in §25.1).

``parse_uri_untrusted`` takes the text of a URI exactly as it appeared in a
Request-URI or between ``<`` and ``>`` in a header, and returns a
:class:`SipUri`. Parts keep their %-escapes as on the wire so that a URI can
be echoed byte for byte; :attr:`SipUri.user_unescaped` decodes the user part.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from urllib.parse import unquote

from voxgate.errors import RemoteProtocolError
from voxgate.sip import grammar

MAX_PORT = 65_535
"""Largest port number (RFC 793)."""

SIP_SCHEMES = frozenset({"sip", "sips"})
"""URI schemes this module parses (RFC 3261 §19.1)."""

_SCHEME_RE = re.compile(rf"({grammar.SCHEME}):")
_IPV4_RE = re.compile(r"[0-9]+(?:\.[0-9]+){3}")


@dataclass(frozen=True, slots=True)
class SipUri:
    """A parsed SIP or SIPS URI (RFC 3261 §19.1.1).

    ``user`` and ``password`` are still %-escaped; ``host`` is an IPv6 address
    without brackets, an IPv4 address or a hostname; ``params`` maps
    lower-cased uri-parameter names to their (escaped) value, ``None`` for a
    parameter without ``=``; ``headers`` maps hname to hvalue.
    """

    scheme: str
    user: str | None
    password: str | None
    host: str
    port: int | None
    params: dict[str, str | None]
    headers: dict[str, str]

    @property
    def user_unescaped(self) -> str | None:
        """The user part with %-escapes decoded (UTF-8; other bytes kept as surrogates)."""
        if self.user is None:
            return None
        return unquote(self.user, errors="surrogateescape")


def parse_uri_untrusted(text: str) -> SipUri:
    """Parse a ``sip:``/``sips:`` URI from untrusted text (RFC 3261 §19.1.1).

    Raises :class:`RemoteProtocolError` with status hint 416 when the text is a
    URI of another scheme (``tel:``, ``http:``…) and 400 when it is malformed.
    """
    scheme_match = _SCHEME_RE.match(text)
    if scheme_match is None:
        raise RemoteProtocolError(f"not a URI: {text[:60]!r}")
    scheme = scheme_match[1].lower()
    if scheme not in SIP_SCHEMES:
        raise RemoteProtocolError(f"unsupported URI scheme {scheme[:20]!r}", 416)
    rest = text[scheme_match.end() :]
    user: str | None = None
    password: str | None = None
    userinfo, at, hostpart = rest.partition("@")
    if at:
        # No "@" may appear unescaped after the userinfo, so the first one ends it.
        userinfo_match = grammar.USERINFO_RE.fullmatch(userinfo)
        if userinfo_match is None:
            raise RemoteProtocolError(f"malformed userinfo in URI {text[:60]!r}")
        user, password = userinfo_match[1], userinfo_match[2]
    else:
        hostpart = rest
    match = grammar.HOSTPORT_PARAMS_HEADERS_RE.fullmatch(hostpart)
    if match is None:
        raise RemoteProtocolError(f"malformed host part in URI {text[:60]!r}")
    host_text, port_text, params_text, headers_text = match.groups()
    return SipUri(
        scheme=scheme,
        user=user,
        password=password,
        host=parse_host_untrusted(host_text),
        port=None if port_text is None else parse_port_untrusted(port_text),
        params=_parse_uri_params(params_text),
        headers={} if headers_text is None else _parse_uri_headers(headers_text),
    )


def format_host_port(host: str, port: int | None) -> str:
    """``host[:port]`` with an IPv6 address put in brackets (RFC 3261 §25.1 hostport)."""
    shown = f"[{host}]" if ":" in host else host
    return shown if port is None else f"{shown}:{port}"


def parse_host_untrusted(text: str) -> str:
    """Check a ``host`` (RFC 3261 §25.1) and return it, IPv6 without brackets.

    ``text`` must already match :data:`grammar.HOST`. Raises
    :class:`RemoteProtocolError` (400) for a bad IPv6 or IPv4 literal.
    """
    if text.startswith("["):
        try:
            ipaddress.IPv6Address(text[1:-1])
        except ValueError:
            raise RemoteProtocolError(f"bad IPv6 reference {text[:60]!r}") from None
        return text[1:-1]
    if _IPV4_RE.fullmatch(text):
        try:
            ipaddress.IPv4Address(text)
        except ValueError:
            raise RemoteProtocolError(f"bad IPv4 address {text[:60]!r}") from None
    elif ".." in text:
        raise RemoteProtocolError(f"bad hostname {text[:60]!r}")
    return text


def parse_port_untrusted(text: str) -> int:
    """A decimal port number 0…65535; :class:`RemoteProtocolError` (400) otherwise."""
    if not grammar.DIGITS_RE.fullmatch(text) or len(text) > 5 or int(text) > MAX_PORT:
        raise RemoteProtocolError(f"port out of range: {text[:20]!r}")
    return int(text)


def _parse_uri_params(text: str) -> dict[str, str | None]:
    params: dict[str, str | None] = {}
    for piece in text.split(";")[1:]:
        match = grammar.URI_PARAM_RE.fullmatch(piece)
        if match is None:
            raise RemoteProtocolError(f"malformed URI parameter {piece[:40]!r}")
        params[match[1].lower()] = match[2]
    return params


def _parse_uri_headers(text: str) -> dict[str, str]:
    headers: dict[str, str] = {}
    for piece in text.split("&"):
        match = grammar.URI_HEADER_RE.fullmatch(piece)
        if match is None:
            raise RemoteProtocolError(f"malformed URI header {piece[:40]!r}")
        headers[match[1]] = match[2]
    return headers
