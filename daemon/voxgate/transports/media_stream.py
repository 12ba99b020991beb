"""WebSocket media streams: the Twilio Media Streams message set, the stream
state machine and the recovery-token table; sans-IO.

Every message is one WebSocket text frame holding one JSON object whose
``event`` names it (Twilio "Media Streams - WebSocket Messages"). From the
media server (Twilio, or anything speaking its set) to voxgate::

    {"event": "connected", "protocol": "Call", "version": "1.0.0"}
    {"event": "start", "sequenceNumber": "1", "streamSid": S,
     "start": {"streamSid": S, "accountSid": A, "callSid": C, "tracks": ["inbound"],
               "customParameters": {"tenant": "acme", "recoveryToken": "…"},
               "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}}}
    {"event": "media", "sequenceNumber": "3", "streamSid": S,
     "media": {"track": "inbound", "chunk": "2", "timestamp": "20", "payload": BASE64}}
    {"event": "dtmf", "streamSid": S, "sequenceNumber": "5",
     "dtmf": {"track": "inbound_track", "digit": "1"}}
    {"event": "mark", "streamSid": S, "sequenceNumber": "4", "mark": {"name": "7"}}
    {"event": "stop", "streamSid": S, "sequenceNumber": "9",
     "stop": {"accountSid": A, "callSid": C}}

From voxgate to the media server: ``media`` (``{"event": "media",
"streamSid": S, "media": {"payload": BASE64}}``, 20 ms of µ-law), ``mark``
(``{"event": "mark", "streamSid": S, "mark": {"name": N}}``: the far end
echoes it once the audio sent before it has played) and ``clear``
(``{"event": "clear", "streamSid": S}``: drop the audio not played yet).

**Transfer (a voxgate extension; Twilio transfers with TwiML instead).** A
bot behind the stream agent asks for a blind transfer of the caller with
``{"event": "transfer", "streamSid": S, "transfer": {"target": "sip:…"}}``; a
transfer that fails (the call goes on) is answered with ``{"event":
"transfer_failed", "streamSid": S, "transfer": {"target": "sip:…", "status":
486, "reason": "failed"}}`` (``status`` null when there is none; ``reason``
one of :data:`~voxgate.agents.transfer.TransferFailureReason`). Success ends the
call: the stream then stops as at any hang-up.

Payloads are G.711 µ-law at 8000 Hz, mono, in whole 20 ms frames
(:data:`FRAME_BYTES` bytes each); ``sequenceNumber``, ``chunk`` and
``timestamp`` (ms) are decimal strings (plain integers are accepted).
``connected`` is optional; ``start`` must come before anything else.

**Recovery token.** Right after ``start`` (and again after each resumption)
voxgate sends ``{"event": "mark", "streamSid": S, "mark": {"name":
"voxgate-recovery:<token>"}}``. A stream that drops without ``stop`` leaves
its session paused; a new connection whose ``start.customParameters.recoveryToken``
carries the token resumes that same session. A mark carries it because
Twilio-compatible clients already echo or ignore marks, so it needs no new
message type and breaks no client. Tokens are 128 random bits (32 hex
digits), good for one resumption, and die with their session.

Errors: everything that reads the peer's bytes raises :class:`MediaStreamError`
(a :class:`~voxgate.errors.RemoteProtocolError`) carrying the WebSocket close
code to answer with (RFC 6455 §7.4.1): 1003 binary frames or an unsupported
media format, 1007 bad JSON (or JSON beyond :func:`voxgate.jsonbounds.loads_untrusted`'s
bounds), bad base64 or a payload that is not whole frames, 1008 unknown
events, missing or ill-typed fields, messages out of order and the rate
limit, 1009 a message over the size limit (in UTF-8 bytes).
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Final

from voxgate.agents.transfer import MAX_TARGET_CHARS
from voxgate.errors import LocalProtocolError, RemoteProtocolError
from voxgate.jsonbounds import JSONTooLargeError, UntrustedJSONError, loads_untrusted
from voxgate.rtp.dtmf import DTMF_DIGITS

# Close codes (RFC 6455 §7.4.1; 1013 "Try Again Later" from the IANA registry).
CLOSE_NORMAL: Final = 1000
CLOSE_GOING_AWAY: Final = 1001
CLOSE_UNSUPPORTED_DATA: Final = 1003
CLOSE_INVALID_PAYLOAD: Final = 1007
CLOSE_POLICY_VIOLATION: Final = 1008
CLOSE_MESSAGE_TOO_BIG: Final = 1009
CLOSE_INTERNAL_ERROR: Final = 1011
CLOSE_TRY_AGAIN_LATER: Final = 1013

MAX_CLOSE_REASON_BYTES: Final = 123
"""A close frame's reason: 125 payload bytes (RFC 6455 §5.5) less the 2-byte code."""

FRAME_BYTES: Final = 160
"""One 20 ms frame of µ-law at 8000 Hz."""
MEDIA_FORMAT: Final = MappingProxyType(
    {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1})
"""The only ``start.mediaFormat`` accepted (Twilio's, and G.711 µ-law as RTP has it)."""

RECOVERY_MARK_PREFIX: Final = "voxgate-recovery:"
RECOVERY_TOKEN_PARAMETER: Final = "recoveryToken"
TENANT_PARAMETER: Final = "tenant"
INBOUND_TRACK: Final = "inbound"
TRACKS: Final = frozenset({"inbound", "outbound"})

MAX_ID_CHARS: Final = 128
"""Longest streamSid, callSid, accountSid, mark name or custom parameter (name or value)."""
MAX_CUSTOM_PARAMETERS: Final = 32
MAX_MESSAGE_BYTES: Final = 16 << 20
"""Largest message :func:`parse_message_untrusted` takes unless told (the ceiling of
``[websocket] max_message_bytes``)."""
MAX_MESSAGE_DEPTH: Final = 8
"""Deepest nesting of arrays/objects in a message (Twilio's nest 3 deep)."""
START_TIMEOUT_S: Final = 10.0
"""How long a connection may wait before its ``start`` message."""

# Stream states and the one transition table (h11 style).
IDLE: Final = "idle"
CONNECTED: Final = "connected"
STREAMING: Final = "streaming"
STOPPED: Final = "stopped"


class MediaStreamError(RemoteProtocolError):
    """The peer broke the message set; close the WebSocket with ``close_code`` and
    ``reason`` (already cut to :data:`MAX_CLOSE_REASON_BYTES`)."""

    def __init__(self, close_code: int, reason: str) -> None:
        super().__init__(_cut_reason(reason), status_hint=None)
        self.close_code = close_code


def _cut_reason(reason: str) -> str:
    encoded = reason.encode()
    if len(encoded) <= MAX_CLOSE_REASON_BYTES:
        return reason
    return encoded[:MAX_CLOSE_REASON_BYTES].decode(errors="ignore")


# -- events ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Connected:
    """The first message: the protocol the stream speaks."""

    protocol: str = "Call"
    version: str = "1.0.0"


@dataclass(frozen=True, slots=True)
class Start:
    """The stream's metadata; its ``mediaFormat`` was :data:`MEDIA_FORMAT`."""

    stream_sid: str
    call_sid: str
    account_sid: str = ""
    tracks: tuple[str, ...] = (INBOUND_TRACK,)
    custom_parameters: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Media:
    """Whole 20 ms frames of µ-law in ``payload``.

    From the media server ``track`` (``inbound``/``outbound``), ``chunk`` and
    ``timestamp_ms`` (since the stream started) are set; voxgate's own media
    messages carry the payload only.
    """

    stream_sid: str
    payload: bytes
    track: str | None = None
    chunk: int | None = None
    timestamp_ms: int | None = None


@dataclass(frozen=True, slots=True)
class Dtmf:
    """A key press; ``digit`` is one of ``0-9 * # A-D``."""

    stream_sid: str
    digit: str
    track: str = "inbound_track"


@dataclass(frozen=True, slots=True)
class Mark:
    """A named point in the outbound audio (sent by voxgate, echoed by the far end)."""

    stream_sid: str
    name: str


@dataclass(frozen=True, slots=True)
class Stop:
    """The stream (the call) has ended."""

    stream_sid: str
    account_sid: str = ""
    call_sid: str = ""


@dataclass(frozen=True, slots=True)
class Clear:
    """Drop the outbound audio not played yet (barge-in)."""

    stream_sid: str


@dataclass(frozen=True, slots=True)
class Transfer:
    """The bot asks voxgate to blind-transfer the caller to the SIP URI ``target``."""

    stream_sid: str
    target: str


@dataclass(frozen=True, slots=True)
class TransferFailed:
    """voxgate tells the bot that its transfer failed (see the module docstring)."""

    stream_sid: str
    target: str
    status: int | None
    reason: str


Event = Connected | Start | Media | Dtmf | Mark | Stop | Clear | Transfer | TransferFailed

FROM_MEDIA_SERVER: Final = "media-server"
FROM_VOXGATE: Final = "voxgate"
FROM_BOT: Final = "bot"
"""A bot behind the stream agent: it sends what voxgate sends a media server
(``media``, ``mark``, ``clear``), its media in chunks of any length."""


# -- parsing -----------------------------------------------------------------


def _policy(reason: str) -> MediaStreamError:
    return MediaStreamError(CLOSE_POLICY_VIOLATION, reason)


def _object(value: object, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _policy(f"{where} must be an object")
    return value


def _string(obj: dict[str, Any], key: str, where: str, *, required: bool = True,
            max_chars: int = MAX_ID_CHARS) -> str:
    value = obj.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        raise _policy(f"{where}.{key} missing or not a string")
    if len(value) > max_chars:
        raise _policy(f"{where}.{key} longer than {max_chars} characters")
    return value


def _counter(obj: dict[str, Any], key: str, where: str, *, required: bool) -> int | None:
    """A non-negative decimal count (Twilio sends strings; integers are accepted)."""
    value = obj.get(key)
    if value is None and not required:
        return None
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 1 << 63:
        return value
    if isinstance(value, str) and 0 < len(value) <= 19 and value.isascii() and value.isdigit():
        return int(value)
    raise _policy(f"{where}.{key} missing or not a non-negative decimal number")


def _payload(text: str, *, whole_frames: bool = True) -> bytes:
    try:
        payload = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise MediaStreamError(CLOSE_INVALID_PAYLOAD, "media.payload is not base64") from None
    if not payload or (whole_frames and len(payload) % FRAME_BYTES):
        raise MediaStreamError(
            CLOSE_INVALID_PAYLOAD,
            f"media.payload of {len(payload)} bytes is not whole 20 ms frames "
            f"({FRAME_BYTES} bytes of 8 kHz mu-law)")
    return payload


def _parse_connected(msg: dict[str, Any]) -> Connected:
    return Connected(_string(msg, "protocol", "connected", required=False) or "Call",
                     _string(msg, "version", "connected", required=False) or "1.0.0")


def _parse_start(msg: dict[str, Any]) -> Start:
    start = _object(msg.get("start"), "start")
    stream_sid = _string(start, "streamSid", "start")
    outer = msg.get("streamSid")
    if outer is not None and outer != stream_sid:
        raise _policy("streamSid differs from start.streamSid")
    fmt = _object(start.get("mediaFormat"), "start.mediaFormat")
    if any(type(fmt.get(k)) is not type(v) or fmt.get(k) != v for k, v in MEDIA_FORMAT.items()):
        raise MediaStreamError(
            CLOSE_UNSUPPORTED_DATA,
            f"unsupported mediaFormat {fmt.get('encoding')!r}/{fmt.get('sampleRate')!r}/"
            f"{fmt.get('channels')!r}: only audio/x-mulaw 8000 Hz mono")
    tracks = start.get("tracks", [INBOUND_TRACK])
    if (not isinstance(tracks, list) or not 0 < len(tracks) <= len(TRACKS)
            or not all(isinstance(t, str) and t in TRACKS for t in tracks)
            or len(set(tracks)) != len(tracks)):
        raise _policy("start.tracks must be a list of distinct 'inbound'/'outbound'")
    raw = _object(start.get("customParameters", {}), "start.customParameters")
    if len(raw) > MAX_CUSTOM_PARAMETERS:
        raise _policy(f"more than {MAX_CUSTOM_PARAMETERS} customParameters")
    params = {name: _string(raw, name, "start.customParameters") for name in raw}
    if any(len(name) > MAX_ID_CHARS for name in params):
        raise _policy(f"a customParameters name is longer than {MAX_ID_CHARS} characters")
    return Start(stream_sid=stream_sid, call_sid=_string(start, "callSid", "start"),
                 account_sid=_string(start, "accountSid", "start", required=False),
                 tracks=tuple(tracks), custom_parameters=MappingProxyType(params))


# The media server's ``media`` message as compact JSON usually has it, for the 20 ms hot
# path (:func:`_media_fast_untrusted`): the members in Twilio's order (event,
# sequenceNumber, media, streamSid) or in :func:`serialize`'s (event, streamSid, media,
# sequenceNumber), ``sequenceNumber`` optional, the ``media`` members in Twilio's order,
# no whitespace (JSON with whitespace takes the full parse). Every string is printable
# ASCII without escapes (RFC 8259 §7; the payload once strict base64 decoding took it,
# which refuses any other character), so text the fast path takes is valid JSON,
# decoded as the groups show; quantifiers are possessive (no backtracking: linear).
_DECIMAL = r'"([0-9]{1,19}+)"'  # a counter as _counter takes it, as a string
_SID = rf'"([ !#-\[\]-~]{{0,{MAX_ID_CHARS}}}+)"'  # printable ASCII but " and \
_MEDIA_TEXT: Final = re.compile(
    r'\{"event":"media",'
    rf'(?:"sequenceNumber":{_DECIMAL},)?+'  # 1
    rf'(?:"streamSid":{_SID},)?+'  # 2
    r'"media":\{"track":"(inbound|outbound)",'  # 3
    rf'"chunk":{_DECIMAL},'  # 4
    rf'"timestamp":{_DECIMAL},'  # 5
    r'"payload":"([^"]*+)"\}'  # 6: checked by a2b_base64(strict_mode=True)
    rf'(?:,"streamSid":{_SID})?+'  # 7
    rf'(?:,"sequenceNumber":{_DECIMAL})?+'  # 8
    r'\}')


def _media_fields_untrusted(text: str) -> tuple[str, bytes, str, str, str] | None:
    """A media server's ``media`` message of the usual layout (:data:`_MEDIA_TEXT`)
    checked in one go, without a JSON parser: (streamSid, payload, track, chunk,
    timestamp), the last two decimal strings; None when it has another layout or
    anything is off (a repeated member, bad base64, no whole frames), for the full
    parse and checks to decide."""
    match = _MEDIA_TEXT.fullmatch(text)
    if match is None:
        return None
    seq_a, sid_a, track, chunk, timestamp, payload, sid_b, seq_b = match.groups()
    if (sid_a is None) == (sid_b is None) or (seq_a is not None and seq_b is not None):
        return None
    try:  # strict: accepts a subset of what b64decode(validate=True) does, decoded alike
        data = binascii.a2b_base64(payload, strict_mode=True)
    except (binascii.Error, ValueError):
        return None
    if not data or len(data) % FRAME_BYTES:
        return None
    return sid_a if sid_b is None else sid_b, data, track, chunk, timestamp


def _media_fast_untrusted(text: str) -> Media | None:
    """:func:`_media_fields_untrusted` as a :class:`Media` event."""
    fields = _media_fields_untrusted(text)
    if fields is None:
        return None
    stream_sid, data, track, chunk, timestamp = fields
    return Media(stream_sid, data, track, int(chunk), int(timestamp))


def _parse_media(msg: dict[str, Any], sender: str) -> Media:
    media = _object(msg.get("media"), "media")
    stream_sid = _string(msg, "streamSid", "media")
    payload = _payload(_string(media, "payload", "media", max_chars=1 << 30),
                       whole_frames=sender != FROM_BOT)
    if sender in (FROM_VOXGATE, FROM_BOT):
        return Media(stream_sid, payload)
    track = _string(media, "track", "media")
    if track not in TRACKS:
        raise _policy(f"media.track {track!r} is not inbound or outbound")
    return Media(stream_sid, payload, track,
                 _counter(media, "chunk", "media", required=True),
                 _counter(media, "timestamp", "media", required=True))


def _parse_dtmf(msg: dict[str, Any]) -> Dtmf:
    dtmf = _object(msg.get("dtmf"), "dtmf")
    digit = _string(dtmf, "digit", "dtmf")
    if len(digit) != 1 or digit not in DTMF_DIGITS:
        raise _policy(f"dtmf.digit {digit!r} is not one of {DTMF_DIGITS}")
    return Dtmf(_string(msg, "streamSid", "dtmf"), digit,
                _string(dtmf, "track", "dtmf", required=False) or "inbound_track")


def _parse_mark(msg: dict[str, Any]) -> Mark:
    mark = _object(msg.get("mark"), "mark")
    return Mark(_string(msg, "streamSid", "mark"), _string(mark, "name", "mark"))


def _parse_stop(msg: dict[str, Any]) -> Stop:
    stop = _object(msg.get("stop", {}), "stop")
    return Stop(_string(msg, "streamSid", "stop"),
                _string(stop, "accountSid", "stop", required=False),
                _string(stop, "callSid", "stop", required=False))


def _parse_clear(msg: dict[str, Any]) -> Clear:
    return Clear(_string(msg, "streamSid", "clear"))


def _parse_transfer(msg: dict[str, Any]) -> Transfer:
    transfer = _object(msg.get("transfer"), "transfer")
    return Transfer(_string(msg, "streamSid", "transfer"),
                    _string(transfer, "target", "transfer", max_chars=MAX_TARGET_CHARS))


def _parse_transfer_failed(msg: dict[str, Any]) -> TransferFailed:
    transfer = _object(msg.get("transfer"), "transfer_failed.transfer")
    status = transfer.get("status")
    if status is not None and not (type(status) is int and 100 <= status <= 699):
        raise _policy("transfer_failed.transfer.status is not null or a SIP status")
    return TransferFailed(
        _string(msg, "streamSid", "transfer_failed"),
        _string(transfer, "target", "transfer_failed.transfer", max_chars=MAX_TARGET_CHARS),
        status, _string(transfer, "reason", "transfer_failed.transfer"))


_PARSERS: Final[Mapping[str, Mapping[str, Callable[[dict[str, Any]], Event]]]] = {
    FROM_MEDIA_SERVER: {
        "connected": _parse_connected, "start": _parse_start,
        "media": lambda msg: _parse_media(msg, FROM_MEDIA_SERVER),
        "dtmf": _parse_dtmf, "mark": _parse_mark, "stop": _parse_stop,
    },
    FROM_VOXGATE: {
        "media": lambda msg: _parse_media(msg, FROM_VOXGATE),
        "mark": _parse_mark, "clear": _parse_clear, "transfer_failed": _parse_transfer_failed,
    },
    FROM_BOT: {
        "media": lambda msg: _parse_media(msg, FROM_BOT),
        "mark": _parse_mark, "clear": _parse_clear, "transfer": _parse_transfer,
    },
}


def parse_message_untrusted(data: str | bytes, sender: str = FROM_MEDIA_SERVER, *,
                            max_bytes: int = MAX_MESSAGE_BYTES) -> Event:
    """One WebSocket message from ``sender`` (:data:`FROM_MEDIA_SERVER`,
    :data:`FROM_BOT`, or :data:`FROM_VOXGATE` for a client reading our messages)
    as an event.

    The JSON is decoded within bounds (:func:`voxgate.jsonbounds.loads_untrusted`:
    ``max_bytes`` of UTF-8, :data:`MAX_MESSAGE_DEPTH` deep, no NaN/Infinity, no
    integer over :data:`~voxgate.jsonbounds.MAX_INTEGER_DIGITS` digits, no unpaired
    surrogate) and every field's type is checked, so nothing but
    :class:`MediaStreamError` leaves.

    Raises:
        MediaStreamError: a binary frame (1003), over ``max_bytes`` (1009),
            bad or unbounded JSON (1007), an unknown event or a field missing
            or wrong (1008), an unsupported media format (1003), bad base64 or
            a partial frame (1007).
    """
    if not isinstance(data, str):
        raise MediaStreamError(CLOSE_UNSUPPORTED_DATA, "binary messages are not part of the "
                               "protocol: send JSON text")
    if (sender == FROM_MEDIA_SERVER and len(data) <= max_bytes  # ASCII when it matches
            and (media := _media_fast_untrusted(data)) is not None):
        return media
    try:
        msg = loads_untrusted(data, max_bytes=max_bytes, max_depth=MAX_MESSAGE_DEPTH)
    except JSONTooLargeError as e:
        raise MediaStreamError(CLOSE_MESSAGE_TOO_BIG, f"message {e.reason}") from None
    except UntrustedJSONError as e:
        raise MediaStreamError(CLOSE_INVALID_PAYLOAD,
                               f"message is not valid JSON: {e.reason}") from None
    msg = _object(msg, "message")
    event = msg.get("event")
    if not isinstance(event, str) or (parser := _PARSERS[sender].get(event)) is None:
        raise _policy(f"unknown event {str(event)[:40]!r}")
    if "sequenceNumber" in msg:
        _counter(msg, "sequenceNumber", event, required=True)
    return parser(msg)


# -- serialization -------------------------------------------------------------


def serialize(event: Event, *, sequence_number: int | None = None) -> str:
    """One event as a message's JSON text (the layouts of the module docstring).

    ``sequence_number`` is written (as a decimal string, Twilio's way) when given.
    """
    msg: dict[str, Any] = {}
    if isinstance(event, Connected):
        msg = {"event": "connected", "protocol": event.protocol, "version": event.version}
    elif isinstance(event, Start):
        msg = {"event": "start", "streamSid": event.stream_sid, "start": {
            "streamSid": event.stream_sid, "accountSid": event.account_sid,
            "callSid": event.call_sid, "tracks": list(event.tracks),
            "customParameters": dict(event.custom_parameters),
            "mediaFormat": dict(MEDIA_FORMAT)}}
    elif isinstance(event, Media):
        media: dict[str, str] = {}
        if event.track is not None:
            media["track"] = event.track
        if event.chunk is not None:
            media["chunk"] = str(event.chunk)
        if event.timestamp_ms is not None:
            media["timestamp"] = str(event.timestamp_ms)
        media["payload"] = base64.b64encode(event.payload).decode()
        msg = {"event": "media", "streamSid": event.stream_sid, "media": media}
    elif isinstance(event, Dtmf):
        msg = {"event": "dtmf", "streamSid": event.stream_sid,
               "dtmf": {"track": event.track, "digit": event.digit}}
    elif isinstance(event, Mark):
        msg = {"event": "mark", "streamSid": event.stream_sid, "mark": {"name": event.name}}
    elif isinstance(event, Stop):
        msg = {"event": "stop", "streamSid": event.stream_sid,
               "stop": {"accountSid": event.account_sid, "callSid": event.call_sid}}
    elif isinstance(event, Transfer):
        msg = {"event": "transfer", "streamSid": event.stream_sid,
               "transfer": {"target": event.target}}
    elif isinstance(event, TransferFailed):
        msg = {"event": "transfer_failed", "streamSid": event.stream_sid,
               "transfer": {"target": event.target, "status": event.status,
                            "reason": event.reason}}
    else:
        msg = {"event": "clear", "streamSid": event.stream_sid}
    if sequence_number is not None:
        msg["sequenceNumber"] = str(sequence_number)
    return json.dumps(msg, separators=(",", ":"))


def recovery_mark_name(token: str) -> str:
    """The name of the mark that hands ``token`` to the client."""
    return RECOVERY_MARK_PREFIX + token


def recovery_token_of(mark: Mark) -> str | None:
    """The token a recovery mark carries, or None for any other mark."""
    if mark.name.startswith(RECOVERY_MARK_PREFIX):
        return mark.name[len(RECOVERY_MARK_PREFIX):]
    return None


# -- the stream state machine ---------------------------------------------------

_TRANSITIONS: Final = {
    # (state, event type): next state. Anything else is out of order (1008).
    (IDLE, Connected): CONNECTED,
    (IDLE, Start): STREAMING,
    (CONNECTED, Start): STREAMING,
    (STREAMING, Media): STREAMING,
    (STREAMING, Dtmf): STREAMING,
    (STREAMING, Mark): STREAMING,
    (STREAMING, Stop): STOPPED,
}


class MediaStreamStats:
    """Counters of one connection's stream, in messages (``frames_in``: 20 ms frames)."""

    __slots__ = ("frames_in", "media_in", "messages_in", "messages_out")

    def __init__(self) -> None:
        self.messages_in = 0
        self.media_in = 0
        self.frames_in = 0
        self.messages_out = 0


class MediaStream:
    """One WebSocket connection's side of the message set, seen from voxgate.

    Created when the WebSocket is accepted at ``now`` (monotonic seconds).
    :meth:`receive_message_untrusted` checks size, rate, order and the
    ``streamSid`` of every message; :meth:`next_deadline`/:meth:`handle_timer`
    bound the wait for ``start`` (``start_timeout_s``); :meth:`media`,
    :meth:`mark` and :meth:`clear` build our messages once streaming.
    ``max_messages_per_s`` is counted per whole second of ``now``.

    Raises:
        LocalProtocolError: a limit below 1.
    """

    __slots__ = ("_max_bytes", "_max_per_s", "_media_prefix", "_rate_count", "_rate_second",
                 "_start_deadline", "start", "state", "stats")

    def __init__(self, now: float, *, max_message_bytes: int, max_messages_per_s: int,
                 start_timeout_s: float = START_TIMEOUT_S) -> None:
        if max_message_bytes < 1 or max_messages_per_s < 1:
            raise LocalProtocolError("message size and rate limits must be >= 1")
        self._max_bytes = max_message_bytes
        self._max_per_s = max_messages_per_s
        self._start_deadline = now + start_timeout_s
        self._rate_second = math.floor(now)
        self._rate_count = 0
        self._media_prefix = b""
        self.state: str = IDLE
        self.start: Start | None = None
        self.stats = MediaStreamStats()

    @property
    def stream_sid(self) -> str | None:
        """The stream's ``streamSid`` once ``start`` arrived."""
        return None if self.start is None else self.start.stream_sid

    def receive_message_untrusted(self, data: str | bytes, now: float) -> Event:
        """Take one message from the media server; returns its event.

        Raises:
            MediaStreamError: over ``max_message_bytes`` (1009) or the rate
                (1008), malformed (see :func:`parse_message_untrusted`), out of
                order, or for another ``streamSid`` (1008).
        """
        self._count_rate(now)
        event = parse_message_untrusted(data, max_bytes=self._max_bytes)
        kind = type(event)
        if kind is not Media or self.state != STREAMING:  # (the hot path stays STREAMING)
            try:
                self.state = _TRANSITIONS[self.state, kind]
            except KeyError:
                raise _policy(f"{kind.__name__.lower()} message while {self.state}") from None
        if isinstance(event, Start):
            self.start = event
            self._media_prefix = ('{"event":"media","streamSid":' + json.dumps(event.stream_sid)
                                  + ',"media":{"payload":"').encode()
        elif not isinstance(event, Connected) and (
                self.start is None or event.stream_sid != self.start.stream_sid):
            raise _policy("message for another streamSid")
        if isinstance(event, Media):
            self._count_media(event.payload)
        else:
            self.stats.messages_in += 1
        return event

    def inbound_media_untrusted(self, data: str | bytes, now: float) -> bytes | None:
        """The 20 ms hot path: the µ-law payload (whole frames) of an ``inbound`` track
        ``media`` message for this stream in the usual layout (no JSON parser, no
        event), taken and counted as :meth:`receive_message_untrusted` takes it; None,
        nothing taken, for any other message (give it to :meth:`receive_message_untrusted`).

        Raises:
            MediaStreamError: over the message rate (1008).
        """
        start = self.start
        if (self.state != STREAMING or start is None or type(data) is not str
                or len(data) > self._max_bytes):  # ASCII when the layout matches
            return None
        fields = _media_fields_untrusted(data)
        if fields is None or fields[0] != start.stream_sid or fields[2] != INBOUND_TRACK:
            return None
        self._count_rate(now)
        self._count_media(fields[1])
        return fields[1]

    def _count_media(self, payload: bytes) -> None:
        """Count one ``media`` message of ``payload`` (whole frames) taken."""
        stats = self.stats
        stats.messages_in += 1
        stats.media_in += 1
        stats.frames_in += len(payload) // FRAME_BYTES

    def _count_rate(self, now: float) -> None:
        """Count one message at ``now``; raises MediaStreamError (1008) over the rate."""
        second = math.floor(now)
        if second != self._rate_second:
            self._rate_second, self._rate_count = second, 0
        self._rate_count += 1
        if self._rate_count > self._max_per_s:
            raise _policy(f"more than {self._max_per_s} messages per second")

    def next_deadline(self) -> float | None:
        """When the wait for ``start`` runs out (monotonic seconds), or None once started."""
        return self._start_deadline if self.state in (IDLE, CONNECTED) else None

    def handle_timer(self, now: float) -> None:
        """Raises MediaStreamError (1008) when ``start`` is overdue at ``now``."""
        deadline = self.next_deadline()
        if deadline is not None and now >= deadline:
            raise _policy("no start message in time")

    def media(self, payload: bytes) -> bytes:
        """A ``media`` message carrying µ-law ``payload``, as UTF-8 JSON (the 20 ms hot
        path: the base64 goes straight between a prefix made at ``start`` and the
        closing braces, no dict and no ``json.dumps``).

        Raises:
            LocalProtocolError: not streaming.
        """
        self._check_streaming()
        self.stats.messages_out += 1
        return self._media_prefix + binascii.b2a_base64(payload, newline=False) + b'"}}'

    def mark(self, name: str) -> str:
        """A ``mark`` message named ``name``; raises LocalProtocolError when not streaming."""
        self._check_streaming()
        self.stats.messages_out += 1
        return serialize(Mark(self._sid(), name))

    def clear(self) -> str:
        """A ``clear`` message; raises LocalProtocolError when not streaming."""
        self._check_streaming()
        self.stats.messages_out += 1
        return serialize(Clear(self._sid()))

    def _check_streaming(self) -> None:
        if self.state != STREAMING:
            raise LocalProtocolError(f"cannot send media-stream messages while {self.state}")

    def _sid(self) -> str:
        assert self.start is not None
        return self.start.stream_sid


# -- recovery tokens -------------------------------------------------------------------


def new_token() -> str:
    """128 random bits as 32 lower-case hex digits."""
    return secrets.token_hex(16)


def _is_token(text: str) -> bool:
    return len(text) == 32 and all(c in "0123456789abcdef" for c in text)


class RecoveryTokens:
    """Recovery token → session id, one live token per session, at most ``capacity``.

    A token is single-use (:meth:`redeem_untrusted` removes it; the resumed
    session is then issued a new one) and dies with its session
    (:meth:`forget`). Issuing beyond ``capacity`` evicts the oldest session's
    token (counted in ``evicted``).

    Raises:
        LocalProtocolError: ``capacity`` < 1.
    """

    def __init__(self, capacity: int, token_factory: Callable[[], str] = new_token) -> None:
        if capacity < 1:
            raise LocalProtocolError(f"capacity must be >= 1, not {capacity}")
        self.capacity = capacity
        self._new = token_factory
        self._by_token: dict[str, str] = {}
        self._by_session: dict[str, str] = {}  # insertion order: oldest first
        self.evicted = 0

    def issue(self, session_id: str) -> str:
        """A fresh token for ``session_id``; its previous token stops working."""
        self.forget(session_id)
        if len(self._by_session) >= self.capacity:
            self.forget(next(iter(self._by_session)))
            self.evicted += 1
        token = self._new()
        self._by_token[token] = session_id
        self._by_session[session_id] = token
        return token

    def redeem_untrusted(self, token: str) -> str | None:
        """The session ``token`` resumes (the token is used up), or None when it is
        malformed, unknown, used or expired."""
        if not _is_token(token):
            return None
        session_id = self._by_token.pop(token, None)
        if session_id is not None:
            del self._by_session[session_id]
        return session_id

    def forget(self, session_id: str) -> None:
        """The session ended (or got a new token): its token stops working (idempotent)."""
        token = self._by_session.pop(session_id, None)
        if token is not None:
            del self._by_token[token]

    def __len__(self) -> int:
        return len(self._by_session)
