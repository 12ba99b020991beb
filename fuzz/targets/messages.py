"""Fuzz targets for the JSON protocols: control socket, WebSocket media streams,
webhook replies and the bounded JSON decoder under all of them.

Documented error types: :class:`~voxgate.jsonbounds.UntrustedJSONError`,
:class:`~voxgate.control.protocol.ControlProtocolError`,
:class:`~voxgate.transports.media_stream.MediaStreamError` and, for webhook
replies, :class:`~voxgate.errors.RemoteProtocolError` (all of them are one).

What a bot reads from voxgate in the Twilio message set (the voxgate
direction) is fuzzed by :func:`media_stream_bot`; what the stream agent reads
from a Vonage bot by :func:`vonage_bot` (documented error type:
:class:`~voxgate.agents.bot_wire.BotWireError`, a ``RemoteProtocolError``).
"""

from __future__ import annotations

import contextlib
import json

from fuzz.targets.framing import split_records
from voxgate.agents.bot_wire import (
    VONAGE_RATES_HZ,
    BotAudio,
    BotMark,
    BotWireError,
    CallMeta,
    VonageWire,
)
from voxgate.agents.dialogue import BUILTIN_MENU, Dialogue
from voxgate.agents.webhook import parse_reply_untrusted
from voxgate.config import WebSocketConfig
from voxgate.control.protocol import (
    DEFAULT_MAX_PENDING_REQUESTS,
    ControlConnection,
    ControlProtocolError,
    Reply,
    Request,
    decode_reply,
)
from voxgate.errors import RemoteProtocolError
from voxgate.jsonbounds import UntrustedJSONError, loads_untrusted
from voxgate.transports import media_stream as ms

CONTROL_COMMANDS = ("hello", "status", "sessions", "show", "calls", "hangup", "drain",
                    "resume", "reload", "health", "metrics")
"""Command names the control target's connection knows (a subset of ``control/commands.py``)."""
CONTROL_MAX_LINE_BYTES = 1024
"""Small, so that fuzzed lines reach the ``too-large`` path."""
JSON_MAX_BYTES = 65_536
JSON_MAX_DEPTH = 32
MESSAGE_INTERVAL_S = 0.02
"""Time between two WebSocket messages of one input (one media frame)."""
RECOVERY_TOKEN_CAPACITY = 4
SESSION_ID = "fuzz-session"
BOT_MAX_MESSAGE_BYTES = 1024
"""Small, so that fuzzed bot messages reach the too-large path."""
BOT_CALL = CallMeta(call_id="fuzz-call", session_id=SESSION_ID, tenant="default",
                    transport="sip", from_uri="sip:a@127.0.0.1", to_uri="sip:bot@127.0.0.1")


def control(data: bytes) -> None:
    """Reads (cut by :func:`~fuzz.targets.framing.split_records`; an empty one is EOF)
    into a :class:`ControlConnection`; every event answered in order, a request with
    its own ``args`` as result, an error with its code; the reply line decoded as
    ``voxgatectl`` does. Each read is also decoded as a reply line.

    Crash: anything but ``ControlProtocolError`` from ``decode_reply`` of a read;
    any exception from the connection; a reply line that does not decode to the
    reply sent (the id of a request is always one a reply can echo).
    """
    connection = ControlConnection(CONTROL_COMMANDS, max_line_bytes=CONTROL_MAX_LINE_BYTES,
                                   max_pending_requests=DEFAULT_MAX_PENDING_REQUESTS)
    for chunk in split_records(data):
        with contextlib.suppress(ControlProtocolError):
            decode_reply(chunk)
        connection.receive_data(chunk)
        _answer_control(connection)
    connection.receive_data(b"")
    _answer_control(connection)


def _answer_control(connection: ControlConnection) -> None:
    while (event := connection.next_request()) is not None:
        if isinstance(event, Request):
            reply = Reply.success(event.id, dict(event.args))
        else:
            reply = Reply.failure(event.id, event.code, event.message)
        decoded = decode_reply(connection.send_reply(reply))
        assert decoded == reply, (decoded, reply)


def _websocket_message(record: bytes) -> str | bytes:
    """A text message when ``record`` is UTF-8 (as the WebSocket library hands text
    frames over), else the bytes of a binary message."""
    try:
        return record.decode("utf-8")
    except UnicodeDecodeError:
        return record


def media_stream(data: bytes) -> None:
    """WebSocket messages (cut by :func:`~fuzz.targets.framing.split_records`) from a
    media server into a :class:`~voxgate.transports.media_stream.MediaStream` with
    the ``[websocket]`` defaults, 20 ms apart, until the first error (which closes
    the connection). Behind each event, what the WebSocket transport does: a start
    redeems its recovery token and gets a new one in a mark, media is echoed,
    a mark's recovery token is read.

    Crash: anything but ``MediaStreamError``; a close reason over 123 bytes; a
    message voxgate builds that does not parse back (voxgate direction) to what
    it carries.
    """
    config = WebSocketConfig()
    now = 100.0
    stream = ms.MediaStream(now, max_message_bytes=config.max_message_bytes,
                            max_messages_per_s=config.max_messages_per_s)
    tokens = ms.RecoveryTokens(RECOVERY_TOKEN_CAPACITY)
    try:
        for record in split_records(data):
            event = stream.receive_message_untrusted(_websocket_message(record), now)
            _answer_media_event(stream, tokens, event)
            now += MESSAGE_INTERVAL_S
        stream.handle_timer(now + ms.START_TIMEOUT_S)
    except ms.MediaStreamError as exc:
        assert len(exc.reason.encode()) <= ms.MAX_CLOSE_REASON_BYTES, exc.reason


def _answer_media_event(stream: ms.MediaStream, tokens: ms.RecoveryTokens,
                        event: ms.Event) -> None:
    if isinstance(event, ms.Start):
        tokens.redeem_untrusted(event.custom_parameters.get(ms.RECOVERY_TOKEN_PARAMETER, ""))
        name = ms.recovery_mark_name(tokens.issue(SESSION_ID))
        sent = ms.parse_message_untrusted(stream.mark(name), ms.FROM_VOXGATE)
        assert sent == ms.Mark(event.stream_sid, name), sent
    elif isinstance(event, ms.Media):
        frame = event.payload[: ms.FRAME_BYTES]
        sent = ms.parse_message_untrusted(stream.media(frame), ms.FROM_VOXGATE)
        assert sent == ms.Media(event.stream_sid, frame), sent
    elif isinstance(event, ms.Mark):
        ms.recovery_token_of(event)


def media_stream_bot(data: bytes) -> None:
    """One message in the voxgate direction (what a bot or a client reads) through
    ``parse_message_untrusted(..., sender=FROM_VOXGATE)``, then re-serialized.

    Crash: anything but ``MediaStreamError``; an event whose ``serialize`` does not
    parse back to the same event.
    """
    try:
        event = ms.parse_message_untrusted(_websocket_message(data), ms.FROM_VOXGATE)
    except ms.MediaStreamError:
        return
    again = ms.parse_message_untrusted(ms.serialize(event), ms.FROM_VOXGATE)
    assert again == event, (again, event)


def vonage_bot(data: bytes) -> None:
    """WebSocket messages from a Vonage bot (cut by
    :func:`~fuzz.targets.framing.split_records`; a record's first byte says binary
    (even) or text (odd, the rest decoded as UTF-8 with replacement characters, as a
    WebSocket text message always is)) into a :class:`VonageWire` at each rate,
    with :data:`BOT_MAX_MESSAGE_BYTES`; every ``notify`` answered as the agent does.

    Crash: anything but ``BotWireError``; audio that is empty or not whole samples;
    a ``notify`` whose answer does not carry its payload back.
    """
    wires = [VonageWire(BOT_CALL, max_message_bytes=BOT_MAX_MESSAGE_BYTES, sample_rate_hz=rate)
             for rate in VONAGE_RATES_HZ]
    for record in split_records(data):
        if not record:
            continue
        body = record[1:]
        message = body.decode("utf-8", "replace") if record[0] & 1 else body
        for wire in wires:
            try:
                event = wire.receive_untrusted(message)
            except BotWireError:
                continue
            if isinstance(event, BotAudio):
                assert event.pcm and len(event.pcm) % 2 == 0, len(event.pcm)
            elif isinstance(event, BotMark):
                answer = wire.mark(event.name)
                assert answer is not None, event
                assert json.loads(answer)["payload"] == json.loads(event.name), (answer, event)


def webhook_reply(data: bytes) -> None:
    """A webhook's response body through ``parse_reply_untrusted``, then the local
    agent's ``Dialogue.follow`` on the built-in menu, as the agent does.

    Crash: anything but ``RemoteProtocolError``; any exception from the dialogue.
    """
    try:
        reply = parse_reply_untrusted(data)
    except RemoteProtocolError:
        return
    if not reply.empty:
        dialogue = Dialogue(BUILTIN_MENU)
        dialogue.go(dialogue.follow(reply.say, reply.next, reply.hangup))


def json_value(data: bytes) -> None:
    """``loads_untrusted`` on the input, as bytes or (first byte odd) as text with
    undecodable bytes kept as lone surrogates.

    Crash: anything but ``UntrustedJSONError``; a value that ``json.dumps``
    (``allow_nan=False``) cannot write as UTF-8 or that does not decode back equal.
    """
    if not data:
        return
    body = data[1:]
    value_in: bytes | str = body.decode("utf-8", "surrogateescape") if data[0] & 1 else body
    try:
        value = loads_untrusted(value_in, max_bytes=JSON_MAX_BYTES, max_depth=JSON_MAX_DEPTH)
    except UntrustedJSONError:
        return
    dumped = json.dumps(value, allow_nan=False, ensure_ascii=False).encode("utf-8")
    again = loads_untrusted(dumped, max_bytes=len(dumped), max_depth=JSON_MAX_DEPTH)
    assert again == value, (again, value)
