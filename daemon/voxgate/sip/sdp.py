"""SDP parsing (RFC 4566) and offer/answer for one G.711 audio stream (RFC 3264).

Sans-IO: bytes in, frozen records out, bytes back. The flow for an INVITE
with an offer is::

    offer = parse_sdp_untrusted(body)          # RemoteProtocolError → 400
    negotiated = negotiate(offer, srtp="offer")  # NotAcceptable → 488
    answer = build_answer(offer, negotiated, local_address=..., local_port=...,
                          session_id=..., session_version=...,
                          local_crypto=...)     # ours, when negotiated.crypto

We accept at most one stream: the first ``m=audio`` line that offers PCMU or
PCMA over ``RTP/AVP`` or, as ``srtp`` allows, ``RTP/SAVP`` with a usable
``a=crypto`` line (SDES, :mod:`voxgate.sip.sdes`); every other ``m=`` line is
answered with port 0. Addresses are IP literals; ``c=`` lines naming a host
are rejected.

For an outbound call we are the offerer: :func:`build_offer` makes the
offer, and the answer goes through :func:`negotiate` like an offer (its
stream, codec and direction mirrored the same way, RFC 3264 §7).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from voxgate.errors import LocalProtocolError, RemoteProtocolError
from voxgate.sip.sdes import SRTP_MODES, SRTP_PROTO, Crypto, first_usable_crypto

PTIME_MS = 20
"""Packetization time we send and ask for (``a=ptime``, RFC 4566 §6)."""

TELEPHONE_EVENT = "telephone-event"
"""Encoding name of RFC 4733 DTMF events."""

DIRECTIONS = frozenset({"sendrecv", "sendonly", "recvonly", "inactive"})
"""Direction attributes of RFC 4566 §6 / RFC 3264 §5.1."""

# --- Grammar (RFC 4566 §9) -------------------------------------------------
# token-char = %x21 / %x23-27 / %x2A-2B / %x2D-2E / %x30-39 / %x41-5A / %x5E-7E
_TOKEN = r"[!#$%&'*+\-.0-9A-Z^_`a-z{|}~]+"
_TOKEN_RE = re.compile(_TOKEN)
# §5: a line is <type>=<value>, <type> one lower-case letter.
_LINE_RE = re.compile(r"([a-z])=(.*)")
# §5.14: port ["/" integer]; the number of ports is ignored.
_PORT_RE = re.compile(r"(\d{1,5})(?:/\d{1,5})?")
# §5.14: proto = token *("/" token), e.g. RTP/AVP, UDP/TLS/RTP/SAVPF.
_PROTO_RE = re.compile(rf"{_TOKEN}(?:/{_TOKEN})*")
# RFC 3551 §3: RTP payload types are 7 bits.
_PAYLOAD_TYPE_RE = re.compile(r"\d{1,3}")
# §6 rtpmap: <payload type> <encoding name>/<clock rate>[/<channels>]
_RTPMAP_RE = re.compile(r"(\d{1,3}) +([^/ ]+)/(\d{1,6})(?:/(\d{1,2}))? *")
# §6 ptime: milliseconds, an integer (some stacks write "20.0").
_PTIME_RE = re.compile(r"(\d{1,4})(?:\.0*)?")

_MAX_PAYLOAD_TYPE = 127


@dataclass(frozen=True, slots=True)
class RtpMap:
    """What a payload type stands for (``a=rtpmap``, RFC 4566 §6)."""

    encoding_name: str
    clock_rate_hz: int
    channels: int = 1


# RFC 3551 §6 table 4: static audio payload types usable without a=rtpmap.
_STATIC_PAYLOAD_TYPES: dict[int, RtpMap] = {
    0: RtpMap("PCMU", 8000),
    3: RtpMap("GSM", 8000),
    4: RtpMap("G723", 8000),
    8: RtpMap("PCMA", 8000),
    9: RtpMap("G722", 8000),
    18: RtpMap("G729", 8000),
}


def _direction_of(attributes: tuple[tuple[str, str | None], ...]) -> str | None:
    return next((name for name, _ in attributes if name in DIRECTIONS), None)


@dataclass(frozen=True, slots=True)
class MediaDescription:
    """One ``m=`` section (RFC 4566 §5.14).

    ``connection`` is this section's own ``c=`` address (an IP literal,
    without TTL), ``None`` when it inherits the session-level one.
    ``attributes`` are ``(name, value)`` pairs in wire order, ``value`` being
    ``None`` for property attributes such as ``a=sendonly``.
    """

    media: str
    port: int
    proto: str
    formats: tuple[str, ...]
    connection: str | None
    attributes: tuple[tuple[str, str | None], ...]

    def attribute(self, name: str) -> str | None:
        """The value of the first ``a=<name>:<value>`` line, ``None`` if none."""
        return next((v for n, v in self.attributes if n == name and v is not None), None)

    def rtpmap(self, payload_type: int) -> RtpMap | None:
        """The encoding of ``payload_type``: its ``a=rtpmap`` line, else the
        RFC 3551 static assignment, else ``None`` (dynamic types need rtpmap).

        A malformed ``a=rtpmap`` value is skipped, as if it were absent.
        """
        for name, value in self.attributes:
            if name != "rtpmap" or value is None:
                continue
            match = _RTPMAP_RE.fullmatch(value)
            if match is not None and int(match[1]) == payload_type:
                return RtpMap(match[2], int(match[3]), int(match[4] or 1))
        return _STATIC_PAYLOAD_TYPES.get(payload_type)

    def direction(self, session_default: str = "sendrecv") -> str:
        """``sendrecv``/``sendonly``/``recvonly``/``inactive`` of this stream as
        its sender declared it; without a media-level attribute, the
        session-level one (pass :attr:`SessionDescription.direction`)."""
        return _direction_of(self.attributes) or session_default

    @property
    def ptime_ms(self) -> int | None:
        """The ``a=ptime`` packetization time in ms, ``None`` if absent or malformed."""
        value = self.attribute("ptime")
        match = None if value is None else _PTIME_RE.fullmatch(value)
        return None if match is None else int(match[1])


@dataclass(frozen=True, slots=True)
class Origin:
    """The ``o=`` line (RFC 4566 §5.2), kept as the peer wrote it.

    A re-offer carries the same ``session_id`` and a different
    ``session_version`` when the session changed (RFC 3264 §8).
    """

    username: str
    session_id: str
    session_version: str
    net_type: str
    address_type: str
    address: str


@dataclass(frozen=True, slots=True)
class SessionDescription:
    """A parsed SDP body (RFC 4566 §5): session level and its ``m=`` sections."""

    origin: Origin
    session_name: str
    connection: str | None
    attributes: tuple[tuple[str, str | None], ...]
    media: tuple[MediaDescription, ...]

    @property
    def direction(self) -> str:
        """The session-level direction attribute, ``sendrecv`` when absent."""
        return _direction_of(self.attributes) or "sendrecv"


@dataclass(slots=True)
class _PendingMedia:
    """An ``m=`` section while its lines are being read."""

    media: str
    port: int
    proto: str
    formats: tuple[str, ...]
    connection: str | None = None
    attributes: list[tuple[str, str | None]] = field(default_factory=list)

    def freeze(self) -> MediaDescription:
        return MediaDescription(
            self.media,
            self.port,
            self.proto,
            self.formats,
            self.connection,
            tuple(self.attributes),
        )


def _malformed(line_number: int, reason: str) -> RemoteProtocolError:
    return RemoteProtocolError(f"malformed SDP, line {line_number}: {reason}", 400)


def _parse_origin(value: str, line_number: int) -> Origin:
    # §5.2: o=<username> <sess-id> <sess-version> <nettype> <addrtype> <unicast-address>
    fields = value.split()
    if len(fields) != 6:
        raise _malformed(line_number, "o= needs 6 fields")
    return Origin(*fields)


def _parse_connection(value: str, line_number: int) -> str:
    # §5.7: c=<nettype> <addrtype> <connection-address>[/<ttl>][/<number of addresses>]
    fields = value.split()
    if len(fields) != 3 or fields[0] != "IN" or fields[1] not in ("IP4", "IP6"):
        raise _malformed(line_number, "c= must be 'IN IP4|IP6 <address>'")
    try:
        address = ipaddress.ip_address(fields[2].split("/", 1)[0])
    except ValueError:
        raise _malformed(line_number, "c= address is not an IP literal") from None
    if fields[1] != f"IP{address.version}":
        raise _malformed(line_number, f"c= address is not {fields[1]}")
    return str(address)


def _parse_media(value: str, line_number: int) -> _PendingMedia:
    # §5.14: m=<media> <port>[/<number of ports>] <proto> <fmt> ...
    fields = value.split()
    if len(fields) < 4:
        raise _malformed(line_number, "m= needs media, port, proto and formats")
    media, port, proto, *formats = fields
    port_match = _PORT_RE.fullmatch(port)
    if (
        _TOKEN_RE.fullmatch(media) is None
        or port_match is None
        or int(port_match[1]) > 0xFFFF
        or _PROTO_RE.fullmatch(proto) is None
        or not all(_TOKEN_RE.fullmatch(fmt) for fmt in formats)
    ):
        raise _malformed(line_number, "bad m= line")
    if proto.startswith("RTP/") and not all(
        _PAYLOAD_TYPE_RE.fullmatch(fmt) and int(fmt) <= _MAX_PAYLOAD_TYPE for fmt in formats
    ):
        raise _malformed(line_number, "RTP formats must be payload types 0-127")
    return _PendingMedia(media, int(port_match[1]), proto, tuple(formats))


def _parse_attribute(value: str, line_number: int) -> tuple[str, str | None]:
    # §5.13: a=<attribute> / a=<attribute>:<value>
    name, colon, rest = value.partition(":")
    if _TOKEN_RE.fullmatch(name) is None:
        raise _malformed(line_number, "bad attribute name")
    return name, rest if colon else None


def parse_sdp_untrusted(
    body: bytes, *, max_bytes: int = 8192, max_media: int = 8
) -> SessionDescription:
    """Parse an SDP body from the network (RFC 4566 §5).

    Tolerant of LF-only line ends, blank lines, non-UTF-8 text in free-form
    fields, and line types or attributes it does not know (ignored or kept
    verbatim). Strict where we act on the value: ``v=0`` first, one ``o=``,
    well-formed ``c=`` (IP literal) and ``m=`` lines, and a connection address
    for every ``m=`` line with a non-zero port (§5.7).

    Bounded: ``body`` longer than ``max_bytes`` or with more than
    ``max_media`` ``m=`` lines is refused.

    Raises :class:`~voxgate.errors.RemoteProtocolError` with ``status_hint``
    400 for anything malformed or over a bound.
    """
    if len(body) > max_bytes:
        raise RemoteProtocolError(f"SDP body of {len(body)} bytes exceeds {max_bytes}", 400)
    lines = [
        (number, line.removesuffix("\r"))
        for number, line in enumerate(body.decode("utf-8", "replace").split("\n"), 1)
        if line.strip()
    ]
    if not lines or lines[0][1] != "v=0":
        raise RemoteProtocolError("malformed SDP: does not start with v=0", 400)
    origin: Origin | None = None
    session_name = ""
    session_connection: str | None = None
    session_attributes: list[tuple[str, str | None]] = []
    media: list[_PendingMedia] = []
    for number, line in lines[1:]:
        match = _LINE_RE.fullmatch(line)
        if match is None:
            raise _malformed(number, "not <type>=<value>")
        kind, value = match[1], match[2]
        current = media[-1] if media else None
        if kind == "m":
            if len(media) == max_media:
                raise _malformed(number, f"more than {max_media} m= lines")
            media.append(_parse_media(value, number))
        elif kind == "a":
            attributes = current.attributes if current else session_attributes
            attributes.append(_parse_attribute(value, number))
        elif kind == "c":
            connection = _parse_connection(value, number)
            # §5.7 allows several c= per level (layered multicast): the first counts.
            if current is None:
                session_connection = session_connection or connection
            else:
                current.connection = current.connection or connection
        elif kind == "o":
            if origin is not None or current is not None:
                raise _malformed(number, "o= must come once, before any m= line")
            origin = _parse_origin(value, number)
        elif kind == "v":
            raise _malformed(number, "repeated v= line")
        elif kind == "s" and current is None:
            session_name = value
        # Every other line type (i u e p b z k t r, unknown ones) does not concern us.
    if origin is None:
        raise RemoteProtocolError("malformed SDP: no o= line", 400)
    for index, pending in enumerate(media):
        if pending.port and pending.connection is None and session_connection is None:
            raise RemoteProtocolError(f"malformed SDP: m= line {index} has no c= address", 400)
    return SessionDescription(
        origin=origin,
        session_name=session_name,
        connection=session_connection,
        attributes=tuple(session_attributes),
        media=tuple(pending.freeze() for pending in media),
    )


# --- Offer/answer (RFC 3264) -----------------------------------------------


@dataclass(frozen=True, slots=True)
class Codec:
    """An audio codec we can answer with; ``payload_type`` is the one in use."""

    name: str
    payload_type: int
    clock_rate_hz: int


SUPPORTED_CODECS: dict[str, Codec] = {
    "PCMU": Codec("PCMU", 0, 8000),
    "PCMA": Codec("PCMA", 8, 8000),
}
"""Codecs by upper-case SDP encoding name, with their RFC 3551 static payload types."""


class NotAcceptable(RemoteProtocolError):
    """No offered audio stream has a codec, profile and keys we accept (SIP 488
    Not Acceptable Here, RFC 3261 §21.4.26); the reason says what was missing."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason, status_hint=488)


@dataclass(frozen=True, slots=True)
class Negotiated:
    """The outcome of :func:`negotiate` for the one audio stream we accept.

    ``codec`` carries the payload type the offer used for it (RFC 3264 §6.1:
    the answer reuses the offer's numbers). ``telephone_event_pt`` is the
    offer's RFC 4733 ``telephone-event/8000`` payload type, ``None`` if not
    offered. ``remote_rtp`` is ``(address, port)`` to send RTP to, ``None``
    when we must not send (``c=`` 0.0.0.0 or ``::``, RFC 3264 §8.4; a
    stream with port 0 is disabled and never accepted). ``direction`` is
    ours, for the answer: the offer's mirrored (sendonly → recvonly …), minus
    sending when ``remote_rtp`` is ``None``. ``media_index`` is the accepted
    ``m=`` line's position in the offer. ``crypto`` is the offer's SDES line
    we chose (RFC 4568: the peer's key, its suite and tag) when the stream is
    ``RTP/SAVP``, ``None`` for plain ``RTP/AVP``.
    """

    codec: Codec
    telephone_event_pt: int | None
    remote_rtp: tuple[str, int] | None
    direction: str
    ptime_ms: int
    media_index: int
    crypto: Crypto | None = None


# RFC 3264 §6.1: the answer's direction mirrors the offer's.
_ANSWER_DIRECTION = {
    "sendrecv": "sendrecv",
    "sendonly": "recvonly",
    "recvonly": "sendonly",
    "inactive": "inactive",
}
# The same with sending taken away, for an offer whose address is unspecified.
_ANSWER_DIRECTION_NO_SEND = {
    "sendrecv": "recvonly",
    "sendonly": "recvonly",
    "recvonly": "inactive",
    "inactive": "inactive",
}


def _first_common_codec(media: MediaDescription, wanted: frozenset[str]) -> Codec | None:
    for fmt in media.formats:
        payload_type = int(fmt)
        rtpmap = media.rtpmap(payload_type)
        if rtpmap is None or rtpmap.channels != 1:
            continue
        codec = SUPPORTED_CODECS.get(rtpmap.encoding_name.upper())
        if codec and codec.name in wanted and rtpmap.clock_rate_hz == codec.clock_rate_hz:
            return replace(codec, payload_type=payload_type)
    return None


def _telephone_event_pt(media: MediaDescription) -> int | None:
    for fmt in media.formats:
        rtpmap = media.rtpmap(int(fmt))
        if (
            rtpmap is not None
            and rtpmap.encoding_name.lower() == TELEPHONE_EVENT
            and rtpmap.clock_rate_hz == 8000
        ):
            return int(fmt)
    return None


# [rtp] srtp mode → the transport protocols we accept (RFC 3551, RFC 3711 §12).
_PROTOS = {
    "off": ("RTP/AVP",),
    "offer": ("RTP/AVP", SRTP_PROTO),
    "required": (SRTP_PROTO,),
}


def negotiate(
    offer: SessionDescription,
    *,
    preference: Sequence[str] = ("PCMU", "PCMA"),
    srtp: str = "off",
) -> Negotiated:
    """Pick the audio stream and codec to answer ``offer`` with (RFC 3264 §6.1).

    The stream is the first ``m=audio`` line with a non-zero port that offers
    a codec named in ``preference`` over a protocol ``srtp`` allows: ``off``
    plain ``RTP/AVP`` only, ``offer`` that or ``RTP/SAVP``, ``required``
    ``RTP/SAVP`` only; an ``RTP/SAVP`` line also needs a usable ``a=crypto``
    line (:func:`~voxgate.sip.sdes.first_usable_crypto`, RFC 4568). The codec
    is the first such one in the offer's own order (the answerer keeps the
    offerer's preference). ``c=`` at media level wins over session level.

    Raises :class:`NotAcceptable` (status_hint 488) when no stream qualifies,
    :class:`~voxgate.errors.LocalProtocolError` when ``preference`` names a
    codec outside :data:`SUPPORTED_CODECS` or ``srtp`` is not one of
    :data:`~voxgate.sip.sdes.SRTP_MODES`.
    """
    unknown = [name for name in preference if name.upper() not in SUPPORTED_CODECS]
    if unknown:
        raise LocalProtocolError(f"unsupported codecs in preference: {unknown}")
    if srtp not in SRTP_MODES:
        raise LocalProtocolError(f"srtp mode {srtp!r} is not one of {SRTP_MODES}")
    protos = _PROTOS[srtp]
    wanted = frozenset(name.upper() for name in preference)
    for index, media in enumerate(offer.media):
        if media.media != "audio" or media.port == 0 or media.proto not in protos:
            continue
        codec = _first_common_codec(media, wanted)
        if codec is None:
            continue
        crypto = None
        if media.proto == SRTP_PROTO:
            crypto = first_usable_crypto(media.attributes)
            if crypto is None:
                continue
        address = media.connection or offer.connection
        remote_rtp = (
            None
            if address is None or ipaddress.ip_address(address).is_unspecified
            else (address, media.port)
        )
        table = _ANSWER_DIRECTION if remote_rtp else _ANSWER_DIRECTION_NO_SEND
        return Negotiated(
            codec=codec,
            telephone_event_pt=_telephone_event_pt(media),
            remote_rtp=remote_rtp,
            direction=table[media.direction(offer.direction)],
            ptime_ms=PTIME_MS,
            media_index=index,
            crypto=crypto,
        )
    with_keys = " with a usable a=crypto (AES_CM_128_HMAC_SHA1_80/_32)" if (
        SRTP_PROTO in protos) else ""
    raise NotAcceptable(f"no {' or '.join(protos)} audio stream{with_keys} offers any of "
                        f"{', '.join(sorted(wanted))}")


def _accepted_media_lines(
    negotiated: Negotiated, local_port: int, local_crypto: Crypto | None
) -> list[str]:
    codec, event_pt = negotiated.codec, negotiated.telephone_event_pt
    formats = f"{codec.payload_type}" if event_pt is None else f"{codec.payload_type} {event_pt}"
    proto = "RTP/AVP" if local_crypto is None else SRTP_PROTO
    lines = [
        f"m=audio {local_port} {proto} {formats}",
        f"a=rtpmap:{codec.payload_type} {codec.name}/{codec.clock_rate_hz}",
    ]
    if event_pt is not None:
        # RFC 4733 §7.1.1: events 0-15 are DTMF digits, 16 is flash.
        lines += [f"a=rtpmap:{event_pt} {TELEPHONE_EVENT}/8000", f"a=fmtp:{event_pt} 0-16"]
    lines += [f"a=ptime:{negotiated.ptime_ms}", f"a={negotiated.direction}"]
    if local_crypto is not None:
        lines.append(f"a=crypto:{local_crypto.to_sdp()}")
    return lines


def build_answer(
    offer: SessionDescription,
    negotiated: Negotiated,
    *,
    local_address: str,
    local_port: int,
    session_id: int,
    session_version: int,
    local_crypto: Crypto | None = None,
) -> bytes:
    """Serialize our answer to ``offer`` (RFC 3264 §6), CRLF line ends.

    One ``m=`` line per offered one, same order; the accepted one at
    ``local_port`` with the negotiated codec (and telephone-event, if
    offered), ``a=ptime`` and our direction, the others with port 0. When
    ``negotiated.crypto`` is set, the accepted line is ``RTP/SAVP`` and
    carries ``local_crypto`` (our key, :meth:`Crypto.answer`, RFC 4568 §7.1.2).
    ``local_address`` (an IP literal) goes into ``o=`` and a session-level
    ``c=`` as ``IN IP4`` or ``IN IP6``. ``session_version`` must grow with
    every changed answer in the dialog (RFC 3264 §8); the caller keeps it.

    Raises :class:`~voxgate.errors.LocalProtocolError` for an address that is
    not an IP literal, a port outside 1-65535, negative ids, a
    ``negotiated`` that does not belong to ``offer``, or ``local_crypto``
    given without ``negotiated.crypto`` (or missing with it, or for another
    tag or suite).
    """
    lines = _session_lines(local_address, local_port, session_id, session_version)
    if not 0 <= negotiated.media_index < len(offer.media):
        raise LocalProtocolError(f"offer has no m= line {negotiated.media_index}")
    offered = negotiated.crypto
    if (None if offered is None else (offered.tag, offered.suite)) != (
            None if local_crypto is None else (local_crypto.tag, local_crypto.suite)):
        raise LocalProtocolError("local_crypto must answer negotiated.crypto (same tag, suite)")
    for index, media in enumerate(offer.media):
        if index == negotiated.media_index:
            lines += _accepted_media_lines(negotiated, local_port, local_crypto)
        else:
            lines.append(f"m={media.media} 0 {media.proto} {' '.join(media.formats)}")
    return ("\r\n".join(lines) + "\r\n").encode("ascii")


DEFAULT_TELEPHONE_EVENT_PT = 101
"""The dynamic payload type our offers give telephone-event (RFC 4733, RFC 3551 §3)."""


def build_offer(
    codec: str,
    *,
    local_address: str,
    local_port: int,
    session_id: int,
    session_version: int,
) -> bytes:
    """Serialize our offer for an outbound call (RFC 3264 §5), CRLF line ends:
    one ``RTP/AVP`` ``m=audio`` line at ``local_port`` with ``codec`` (a
    :data:`SUPPORTED_CODECS` name, its static payload type) and telephone-event
    (:data:`DEFAULT_TELEPHONE_EVENT_PT`, events 0-16), ``a=ptime`` and
    ``a=sendrecv``; ``o=`` and ``c=`` as in :func:`build_answer`.

    Raises :class:`~voxgate.errors.LocalProtocolError` for an unknown codec,
    an address that is not an IP literal, a port outside 1-65535 or negative ids.
    """
    chosen = SUPPORTED_CODECS.get(codec.upper())
    if chosen is None:
        raise LocalProtocolError(f"unsupported codec {codec!r}")
    lines = _session_lines(local_address, local_port, session_id, session_version)
    offered = Negotiated(codec=chosen, telephone_event_pt=DEFAULT_TELEPHONE_EVENT_PT,
                         remote_rtp=None, direction="sendrecv", ptime_ms=PTIME_MS,
                         media_index=0)
    lines += _accepted_media_lines(offered, local_port, None)
    return ("\r\n".join(lines) + "\r\n").encode("ascii")


def _session_lines(
    local_address: str, local_port: int, session_id: int, session_version: int
) -> list[str]:
    """The session-level lines of our SDP (``v= o= s= c= t=``); raises
    LocalProtocolError for a bad address, port or ids (see :func:`build_answer`)."""
    try:
        address = ipaddress.ip_address(local_address)
    except ValueError:
        raise LocalProtocolError(f"local address {local_address!r} is not an IP") from None
    if not 0 < local_port <= 0xFFFF or session_id < 0 or session_version < 0:
        raise LocalProtocolError("local port, session id or version out of range")
    connection = f"IN IP{address.version} {address}"
    return [
        "v=0",
        f"o=- {session_id} {session_version} {connection}",
        "s=voxgate",
        f"c={connection}",
        "t=0 0",
    ]
