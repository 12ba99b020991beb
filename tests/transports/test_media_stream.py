"""The Twilio Media Streams message set, the stream state machine and recovery tokens."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from collections.abc import Mapping

import pytest

from voxgate.errors import LocalProtocolError, RemoteProtocolError
from voxgate.transports import media_stream as ms
from voxgate.transports.media_stream import (
    Clear,
    Connected,
    Dtmf,
    Mark,
    Media,
    MediaStream,
    MediaStreamError,
    RecoveryTokens,
    Start,
    Stop,
    parse_message_untrusted,
    serialize,
)

SID = "MZ18ad3ab5a668481ce02b83e7395059f0"
FRAME = bytes(range(160))

# Twilio's documented examples (Media Streams - WebSocket Messages), verbatim in shape.
TWILIO_START = {
    "event": "start", "sequenceNumber": "1",
    "start": {
        "accountSid": "AC123", "streamSid": SID, "callSid": "CA123",
        "tracks": ["inbound", "outbound"],
        "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
        "customParameters": {"FirstName": "Jane", "tenant": "acme"},
    },
    "streamSid": SID,
}
TWILIO_MEDIA = {
    "event": "media", "sequenceNumber": "3",
    "media": {"track": "outbound", "chunk": "1", "timestamp": "5",
              "payload": base64.b64encode(FRAME).decode()},
    "streamSid": SID,
}


def text(obj: object) -> str:
    return json.dumps(obj)


def started(now: float = 100.0, **limits: int) -> MediaStream:
    stream = MediaStream(now, max_message_bytes=limits.get("max_message_bytes", 65536),
                         max_messages_per_s=limits.get("max_messages_per_s", 200))
    stream.receive_message_untrusted(serialize(Connected()), now)
    stream.receive_message_untrusted(text(TWILIO_START), now)
    return stream


def media_text(payload: bytes = FRAME, chunk: int = 1, sid: str = SID) -> str:
    return serialize(Media(sid, payload, "inbound", chunk, 20 * chunk), sequence_number=chunk + 2)


# -- parsing good messages -------------------------------------------------------


def test_parses_twilio_documented_messages():
    connected = parse_message_untrusted('{"event": "connected", "protocol": "Call", '
                                        '"version": "1.0.0"}')
    assert connected == Connected("Call", "1.0.0")
    start = parse_message_untrusted(text(TWILIO_START))
    assert isinstance(start, Start)
    assert (start.stream_sid, start.call_sid, start.account_sid) == (SID, "CA123", "AC123")
    assert start.tracks == ("inbound", "outbound")
    assert dict(start.custom_parameters) == {"FirstName": "Jane", "tenant": "acme"}
    media = parse_message_untrusted(text(TWILIO_MEDIA))
    assert media == Media(SID, FRAME, "outbound", 1, 5)
    dtmf = parse_message_untrusted(text({"event": "dtmf", "streamSid": SID, "sequenceNumber": "5",
                                         "dtmf": {"track": "inbound_track", "digit": "#"}}))
    assert dtmf == Dtmf(SID, "#", "inbound_track")
    mark = parse_message_untrusted(text({"event": "mark", "sequenceNumber": "4",
                                         "streamSid": SID, "mark": {"name": "my label"}}))
    assert mark == Mark(SID, "my label")
    stop = parse_message_untrusted(text({"event": "stop", "sequenceNumber": "5",
                                         "stop": {"accountSid": "AC123", "callSid": "CA123"},
                                         "streamSid": SID}))
    assert stop == Stop(SID, "AC123", "CA123")


def test_integer_counters_and_multi_frame_payloads_are_accepted():
    msg = {"event": "media", "streamSid": SID, "sequenceNumber": 7,
           "media": {"track": "inbound", "chunk": 3, "timestamp": 40,
                     "payload": base64.b64encode(FRAME * 3).decode()}}
    event = parse_message_untrusted(text(msg))
    assert isinstance(event, Media)
    assert (event.chunk, event.timestamp_ms, len(event.payload)) == (3, 40, 480)


@pytest.mark.parametrize("event", [
    Connected(), Start(SID, "CA1", "AC1", ("inbound",), {"tenant": "acme"}),
    Media(SID, FRAME * 2, "inbound", 9, 180), Dtmf(SID, "7"), Mark(SID, "12"),
    Stop(SID, "AC1", "CA1"),
])
def test_round_trip_from_the_media_server(event):
    assert parse_message_untrusted(serialize(event, sequence_number=4)) == event


@pytest.mark.parametrize("event", [
    Media(SID, FRAME), Mark(SID, "3"), Clear(SID),
    ms.TransferFailed(SID, "sip:human@10.0.0.9", 486, "failed"),
    ms.TransferFailed(SID, "sip:human@10.0.0.9", None, "timeout"),
])
def test_round_trip_of_our_messages(event):
    assert parse_message_untrusted(serialize(event), ms.FROM_VOXGATE) == event


def test_round_trip_of_a_bots_transfer():
    event = ms.Transfer(SID, "sip:human@10.0.0.9")
    assert parse_message_untrusted(serialize(event), ms.FROM_BOT) == event
    with pytest.raises(MediaStreamError):  # a media server cannot ask for one
        parse_message_untrusted(serialize(event))


def test_our_messages_have_twilios_layout():
    stream = started()
    assert json.loads(stream.media(FRAME)) == {
        "event": "media", "streamSid": SID,
        "media": {"payload": base64.b64encode(FRAME).decode()}}
    assert json.loads(stream.mark("7")) == {"event": "mark", "streamSid": SID,
                                           "mark": {"name": "7"}}
    assert json.loads(stream.clear()) == {"event": "clear", "streamSid": SID}
    assert stream.stats.messages_out == 3


def test_client_side_refuses_server_only_events():
    with pytest.raises(MediaStreamError) as err:
        parse_message_untrusted(serialize(Stop(SID)), ms.FROM_VOXGATE)
    assert err.value.close_code == ms.CLOSE_POLICY_VIOLATION


# -- parsing bad messages -------------------------------------------------------------


def _with(path: str, value: object, base: Mapping[str, object] | None = None) -> str:
    """TWILIO_MEDIA (or ``base``) with the dotted ``path`` set (or removed for ...)."""
    msg = json.loads(json.dumps(base or TWILIO_MEDIA))
    *parents, key = path.split(".")
    node = msg
    for parent in parents:
        node = node[parent]
    if value is ...:
        del node[key]
    else:
        node[key] = value
    return text(msg)


@pytest.mark.parametrize(("data", "code", "words"), [
    (b'{"event": "connected"}', 1003, "binary"),
    ("{not json", 1007, "not valid JSON"),
    ('{"event": "media", "x": NaN}', 1007, "not valid JSON"),
    ("[" * 100_000, 1007, "not valid JSON"),
    ('"media"', 1008, "must be an object"),
    ('{"event": "hello"}', 1008, "unknown event"),
    ('{"event": 5}', 1008, "unknown event"),
    ('{"protocol": "Call"}', 1008, "unknown event"),
    (_with("media.payload", "!!notbase64"), 1007, "not base64"),
    (_with("media.payload", base64.b64encode(FRAME[:100]).decode()), 1007, "whole 20 ms"),
    (_with("media.payload", ""), 1007, "whole 20 ms"),
    (_with("media.payload", ...), 1008, "media.payload"),
    (_with("media.payload", 12), 1008, "media.payload"),
    (_with("media.track", "both"), 1008, "media.track"),
    (_with("media.chunk", ...), 1008, "media.chunk"),
    (_with("media.timestamp", "-5"), 1008, "media.timestamp"),
    (_with("media.timestamp", True), 1008, "media.timestamp"),
    (_with("media", "x"), 1008, "media must be an object"),
    (_with("streamSid", ...), 1008, "streamSid"),
    (_with("sequenceNumber", "one"), 1008, "sequenceNumber"),
    (_with("start.mediaFormat.encoding", "audio/l16", TWILIO_START), 1003, "mediaFormat"),
    (_with("start.mediaFormat.sampleRate", 16000, TWILIO_START), 1003, "mediaFormat"),
    (_with("start.mediaFormat.channels", True, TWILIO_START), 1003, "mediaFormat"),
    (_with("start.mediaFormat", ..., TWILIO_START), 1008, "mediaFormat"),
    (_with("start.callSid", ..., TWILIO_START), 1008, "start.callSid"),
    (_with("start.streamSid", "MZother", TWILIO_START), 1008, "differs"),
    (_with("start.tracks", ["both"], TWILIO_START), 1008, "tracks"),
    (_with("start.customParameters", {"a": 1}, TWILIO_START), 1008, "customParameters.a"),
    (_with("start.customParameters", {str(i): "v" for i in range(40)}, TWILIO_START),
     1008, "customParameters"),
    (_with("start.callSid", "C" * 500, TWILIO_START), 1008, "longer than"),
    (text({"event": "dtmf", "streamSid": SID, "dtmf": {"digit": "12"}}), 1008, "dtmf.digit"),
    (text({"event": "mark", "streamSid": SID, "mark": {}}), 1008, "mark.name"),
    (text({"event": "clear", "streamSid": SID}), 1008, "unknown event"),
])
def test_malformed_messages_name_the_defect_and_the_close_code(data, code, words):
    with pytest.raises(MediaStreamError) as err:
        parse_message_untrusted(data)
    assert err.value.close_code == code
    assert words in err.value.reason
    assert isinstance(err.value, RemoteProtocolError)
    assert len(err.value.reason.encode()) <= ms.MAX_CLOSE_REASON_BYTES


def _start_with(path: str, value: object) -> str:
    return _with(path, value, TWILIO_START)


# Hostile ``start`` messages: every field of the wrong type or shape (hypothesis is not
# pinned, so a hand-written table). Each must be a 1008 policy close, never a TypeError.
BAD_TRACKS: tuple[object, ...] = (
    [["inbound"]], [{}], [{"inbound": 1}], [None], [1], [True], "inbound", {},
    {"inbound": 1}, [], ["inbound", "inbound"], ["inbound", "outbound", "inbound"], None,
)
BAD_CUSTOM_PARAMETERS: tuple[object, ...] = (
    [], "tenant=acme", {"tenant": ["acme"]}, {"tenant": {}}, {"tenant": None},
    {"tenant": 1.5}, {"x" * 200: "v"},
)
BAD_MEDIA_FORMATS: tuple[object, ...] = ([], "audio/x-mulaw", 8000)
HOSTILE_STARTS = [
    *[_start_with("start.tracks", tracks) for tracks in BAD_TRACKS],
    *[_start_with("start.customParameters", params) for params in BAD_CUSTOM_PARAMETERS],
    *[_start_with("start.mediaFormat", fmt) for fmt in BAD_MEDIA_FORMATS],
    *[_start_with(f"start.{key}", value) for key in ("streamSid", "callSid", "accountSid")
      for value in ([SID], {"sid": SID}, 5, True)],
    _start_with("start", [TWILIO_START["start"]]),
    _start_with("start", "start"),
    _start_with("streamSid", [SID]),
    _start_with("streamSid", {}),
    _start_with("sequenceNumber", [1]),
    _start_with("sequenceNumber", {}),
    _start_with("sequenceNumber", 1.5),
    _start_with("sequenceNumber", -1),
    _start_with("event", ["start"]),
    _start_with("event", {"start": 1}),
]


@pytest.mark.parametrize("data", HOSTILE_STARTS, ids=range(len(HOSTILE_STARTS)))
def test_hostile_start_fields_are_policy_closes(data):
    with pytest.raises(MediaStreamError) as err:
        parse_message_untrusted(data)
    assert err.value.close_code == ms.CLOSE_POLICY_VIOLATION
    stream = MediaStream(0.0, max_message_bytes=65536, max_messages_per_s=200)
    with pytest.raises(MediaStreamError) as err:
        stream.receive_message_untrusted(data, 0.0)
    assert err.value.close_code == ms.CLOSE_POLICY_VIOLATION
    assert stream.state == ms.IDLE


def test_unhashable_tracks_are_a_policy_close_naming_the_field():
    with pytest.raises(MediaStreamError) as err:
        parse_message_untrusted(_start_with("start.tracks", [["inbound"]]))
    assert err.value.close_code == ms.CLOSE_POLICY_VIOLATION
    assert "start.tracks" in err.value.reason


HOSTILE_JSON = [
    "[" * 30_000 + "]" * 30_000,
    '{"event": "start", "start": ' + "[" * 40 + "]" * 40 + "}",
    _start_with("sequenceNumber", 10 ** 80),
    '{"event": "media", "streamSid": "' + SID + '", "sequenceNumber": ' + "7" * 5000 + "}",
    '{"event": "media", "sequenceNumber": 1e400}',
    '{"event": "media", "streamSid": Infinity}',
    text(TWILIO_START).replace('"tenant"', '"\\ud800"'),  # an unpaired surrogate escape
    '{"event": "start", "start": {"customParameters": {"\\udfff": "v"}}}',
    '{"event": "connected", "protocol": "\ud800"}',  # a surrogate in the text itself
]


@pytest.mark.parametrize("data", HOSTILE_JSON, ids=range(len(HOSTILE_JSON)))
def test_hostile_json_is_an_invalid_payload_close(data):
    with pytest.raises(MediaStreamError) as err:
        parse_message_untrusted(data)
    assert err.value.close_code == ms.CLOSE_INVALID_PAYLOAD
    assert "not valid JSON" in err.value.reason


def test_close_reasons_are_cut_to_fit_a_close_frame():
    error = MediaStreamError(1008, "é" * 200)
    assert len(error.reason.encode()) <= ms.MAX_CLOSE_REASON_BYTES
    assert error.reason.startswith("éé")


# -- the state machine -------------------------------------------------------------


def test_stream_goes_through_its_states():
    stream = MediaStream(0.0, max_message_bytes=65536, max_messages_per_s=200)
    assert stream.state == ms.IDLE and stream.stream_sid is None
    stream.receive_message_untrusted(serialize(Connected()), 0.0)
    assert stream.state == ms.CONNECTED
    stream.receive_message_untrusted(text(TWILIO_START), 0.0)
    assert stream.state == ms.STREAMING
    assert stream.start is not None and stream.start.call_sid == "CA123"
    assert stream.stream_sid == SID
    event = stream.receive_message_untrusted(media_text(FRAME * 2), 0.1)
    assert isinstance(event, Media)
    stream.receive_message_untrusted(serialize(Mark(SID, "1")), 0.2)
    stream.receive_message_untrusted(serialize(Stop(SID)), 0.3)
    assert stream.state == ms.STOPPED
    assert (stream.stats.messages_in, stream.stats.media_in, stream.stats.frames_in) == (5, 1, 2)


def test_connected_is_optional():
    stream = MediaStream(0.0, max_message_bytes=65536, max_messages_per_s=200)
    stream.receive_message_untrusted(text(TWILIO_START), 0.0)
    assert stream.state == ms.STREAMING


@pytest.mark.parametrize(("first", "then"), [
    (None, media_text()),
    (None, serialize(Stop(SID))),
    (text(TWILIO_START), text(TWILIO_START)),
    (text(TWILIO_START), serialize(Connected())),
    (serialize(Connected()), serialize(Connected())),
])
def test_messages_out_of_order_close_with_1008(first, then):
    stream = MediaStream(0.0, max_message_bytes=65536, max_messages_per_s=200)
    if first is not None:
        stream.receive_message_untrusted(first, 0.0)
    with pytest.raises(MediaStreamError) as err:
        stream.receive_message_untrusted(then, 0.0)
    assert err.value.close_code == 1008
    assert "while" in err.value.reason


def test_nothing_after_stop():
    stream = started()
    stream.receive_message_untrusted(serialize(Stop(SID)), 100.0)
    with pytest.raises(MediaStreamError, match="while stopped"):
        stream.receive_message_untrusted(media_text(), 100.0)


def test_other_stream_sid_is_refused():
    stream = started()
    with pytest.raises(MediaStreamError, match="another streamSid"):
        stream.receive_message_untrusted(media_text(sid="MZother"), 100.0)


def test_size_limit_closes_with_1009():
    stream = started(max_message_bytes=400)
    stream.receive_message_untrusted(media_text(), 100.0)  # 160 bytes → ~290 characters
    with pytest.raises(MediaStreamError) as err:
        stream.receive_message_untrusted(media_text(FRAME * 2), 100.0)
    assert err.value.close_code == ms.CLOSE_MESSAGE_TOO_BIG


def test_size_limit_counts_utf8_bytes():
    stream = started(max_message_bytes=400)
    name = "\u20ac" * 120  # 3 bytes a character in UTF-8
    mark = f'{{"event": "mark", "streamSid": "{SID}", "mark": {{"name": "{name}"}}}}'
    assert len(mark) <= 400 < len(mark.encode())
    with pytest.raises(MediaStreamError) as err:
        stream.receive_message_untrusted(mark, 100.0)
    assert err.value.close_code == ms.CLOSE_MESSAGE_TOO_BIG


def test_rate_is_counted_per_second():
    stream = started(now=100.0, max_messages_per_s=10)  # connected + start: 2 in second 100
    for i in range(8):
        stream.receive_message_untrusted(media_text(chunk=i), 100.5)
    with pytest.raises(MediaStreamError) as err:
        stream.receive_message_untrusted(media_text(chunk=9), 100.99)
    assert err.value.close_code == 1008 and "per second" in err.value.reason
    fresh = started(now=100.0, max_messages_per_s=10)
    for i in range(8):
        fresh.receive_message_untrusted(media_text(chunk=i), 100.5)
    for i in range(10):  # a new second, a new count
        fresh.receive_message_untrusted(media_text(chunk=10 + i), 101.0)


def test_start_must_come_in_time():
    stream = MediaStream(50.0, max_message_bytes=65536, max_messages_per_s=200,
                         start_timeout_s=2.0)
    assert stream.next_deadline() == 52.0
    stream.handle_timer(51.9)
    with pytest.raises(MediaStreamError, match="no start"):
        stream.handle_timer(52.0)
    stream = started()
    assert stream.next_deadline() is None
    stream.handle_timer(1e9)


def test_sending_before_start_is_our_bug():
    stream = MediaStream(0.0, max_message_bytes=65536, max_messages_per_s=200)
    with pytest.raises(LocalProtocolError):
        stream.media(FRAME)
    with pytest.raises(LocalProtocolError):
        stream.mark("1")


def test_limits_must_be_positive():
    with pytest.raises(LocalProtocolError):
        MediaStream(0.0, max_message_bytes=0, max_messages_per_s=1)


# -- recovery tokens -------------------------------------------------------------


def test_tokens_are_128_bit_hex_and_single_use():
    tokens = RecoveryTokens(4)
    token = tokens.issue("s1")
    assert len(token) == 32 and int(token, 16) >= 0
    assert tokens.redeem_untrusted(token) == "s1"
    assert tokens.redeem_untrusted(token) is None
    assert len(tokens) == 0


def test_a_new_token_replaces_the_old_and_forget_expires_it():
    tokens = RecoveryTokens(4)
    first = tokens.issue("s1")
    second = tokens.issue("s1")
    assert first != second
    assert tokens.redeem_untrusted(first) is None
    tokens.forget("s1")
    tokens.forget("s1")
    assert tokens.redeem_untrusted(second) is None


def test_table_is_bounded_and_evicts_the_oldest():
    counter = iter(range(100))
    tokens = RecoveryTokens(2, token_factory=lambda: f"{next(counter):032x}")
    a, b, c = tokens.issue("a"), tokens.issue("b"), tokens.issue("c")
    assert len(tokens) == 2 and tokens.evicted == 1
    assert tokens.redeem_untrusted(a) is None
    assert (tokens.redeem_untrusted(b), tokens.redeem_untrusted(c)) == ("b", "c")


@pytest.mark.parametrize("garbage", ["", "x" * 32, "A" * 32, "0" * 31, "0" * 33, "0" * 10_000])
def test_malformed_tokens_are_unknown(garbage):
    tokens = RecoveryTokens(2, token_factory=lambda: "0" * 32)
    tokens.issue("s")
    assert tokens.redeem_untrusted(garbage) is None
    assert len(tokens) == 1


def test_recovery_mark_carries_the_token():
    name = ms.recovery_mark_name("ab" * 16)
    assert name == "voxgate-recovery:" + "ab" * 16
    assert ms.recovery_token_of(Mark(SID, name)) == "ab" * 16
    assert ms.recovery_token_of(Mark(SID, "7")) is None
    with pytest.raises(LocalProtocolError):
        RecoveryTokens(0)


def test_module_imports_no_event_loop():
    code = ("import sys, voxgate.transports.media_stream\n"
            "print(','.join(m for m in ('trio', 'asyncio') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True)
    assert out.stdout.strip() == ""


@pytest.mark.parametrize(("media", "expected"), [
    pytest.param({"track": "inbound", "chunk": "2", "timestamp": "40",
                  "payload": base64.b64encode(FRAME).decode()},
                 Media(SID, FRAME, "inbound", 2, 40), id="fast"),
    pytest.param({"track": "outbound", "chunk": 2, "timestamp": 40,
                  "payload": base64.b64encode(FRAME * 2).decode()},
                 Media(SID, FRAME * 2, "outbound", 2, 40), id="integer-counters"),
    pytest.param({"track": "inbound", "chunk": "2", "timestamp": "40",
                  "payload": base64.b64encode(FRAME).decode()[:-4]}, 1007, id="partial-frame"),
    pytest.param({"track": "inbound", "chunk": "2", "timestamp": "40",
                  "payload": "QQ=" + "A" * 213}, 1007, id="bad-padding"),
    pytest.param({"track": "inbound", "chunk": "-2", "timestamp": "40",
                  "payload": base64.b64encode(FRAME).decode()}, 1008, id="negative-chunk"),
    pytest.param({"track": "sideways", "chunk": "2", "timestamp": "40",
                  "payload": base64.b64encode(FRAME).decode()}, 1008, id="bad-track"),
])
def test_the_media_fast_path_decides_as_the_full_checks(media, expected):
    message = json.dumps({"event": "media", "sequenceNumber": "3", "streamSid": SID,
                          "media": media})
    if isinstance(expected, Media):
        assert parse_message_untrusted(message) == expected
    else:
        with pytest.raises(ms.MediaStreamError) as caught:
            parse_message_untrusted(message)
        assert caught.value.close_code == expected


_B64 = base64.b64encode(FRAME).decode()
_MEDIA_BODY = f'"media":{{"track":"inbound","chunk":"2","timestamp":"40","payload":"{_B64}"}}'


@pytest.mark.parametrize(("text", "fast"), [
    pytest.param(f'{{"event":"media","sequenceNumber":"3",{_MEDIA_BODY},"streamSid":"{SID}"}}',
                 True, id="twilio-order"),
    pytest.param(f'{{"event":"media","streamSid":"{SID}",{_MEDIA_BODY},"sequenceNumber":"3"}}',
                 True, id="serialize-order"),
    pytest.param(f'{{"event":"media","streamSid":"{SID}",{_MEDIA_BODY}}}', True, id="no-sequence"),
    pytest.param(json.dumps({"event": "media", "sequenceNumber": "3", "streamSid": SID,
                             "media": {"track": "inbound", "chunk": "2", "timestamp": "40",
                                       "payload": _B64}}), False, id="whitespace"),
    pytest.param(f'{{"event":"media","streamSid":"MZ",{_MEDIA_BODY},"streamSid":"{SID}"}}',
                 False, id="repeated-sid"),
    pytest.param(f'{{"event":"media","sequenceNumber":"3","streamSid":"{SID}",{_MEDIA_BODY},'
                 '"sequenceNumber":"4"}', False, id="repeated-sequence"),
    pytest.param(f'{{"event":"media","streamSid":"{SID[:-1]}\\u{ord(SID[-1]):04x}",{_MEDIA_BODY}}}',
                 False, id="escape"),
    pytest.param(f'{{"streamSid":"{SID}","event":"media",{_MEDIA_BODY}}}', False, id="other-order"),
    pytest.param(f'{{"event":"media","streamSid":"{SID}",{_MEDIA_BODY}}}'.replace(
        f'"payload":"{_B64[0]}', f'"payload":"\\u{ord(_B64[0]):04x}'), False, id="payload-escape"),
])
def test_the_media_text_fast_path_decodes_as_json_does(text, fast):
    """Layouts the fast path takes decode as the full parse would; others fall back to it."""
    expected = Media(SID, FRAME, "inbound", 2, 40)
    assert (ms._media_fast_untrusted(text) == expected) is fast
    assert parse_message_untrusted(text) == expected


@pytest.mark.parametrize(("payload", "code"), [
    pytest.param(_B64[:-4], 1007, id="partial-frame"),
    pytest.param("QQ=" + "A" * 213, 1007, id="bad-padding"),
    pytest.param("", 1007, id="empty"),
])
def test_bad_payloads_in_the_fast_layout_get_the_full_checks_answer(payload, code):
    text = f'{{"event":"media","streamSid":"{SID}","media":{{"track":"inbound","chunk":"2",' \
           f'"timestamp":"40","payload":"{payload}"}}}}'
    assert ms._media_fast_untrusted(text) is None
    with pytest.raises(ms.MediaStreamError) as caught:
        parse_message_untrusted(text)
    assert caught.value.close_code == code


def test_a_long_unterminated_payload_is_refused_by_the_fast_path():
    text = f'{{"event":"media","streamSid":"{SID}","media":{{"track":"inbound","chunk":"2",' \
           '"timestamp":"40","payload":"' + "A" * 1_000_000
    assert ms._media_fast_untrusted(text) is None


def test_the_inbound_media_hot_path_takes_and_counts_only_this_streams_inbound_media():
    stream = started(max_messages_per_s=5)
    message = f'{{"event":"media","sequenceNumber":"3",{_MEDIA_BODY},"streamSid":"{SID}"}}'
    before = stream.stats.messages_in
    assert stream.inbound_media_untrusted(message, 100.0) == FRAME
    assert (stream.stats.messages_in - before, stream.stats.frames_in) == (1, 1)
    others = [message.replace('"inbound"', '"outbound"'), message.replace(SID, SID[:-1] + "x"),
              json.dumps(json.loads(message)), serialize(Mark(SID, "7"))]
    assert [stream.inbound_media_untrusted(m, 100.0) for m in others] == [None] * 4
    assert stream.stats.messages_in - before == 1  # nothing taken: they go the full way
    assert isinstance(stream.receive_message_untrusted(others[0], 100.0), Media)
    with pytest.raises(MediaStreamError) as caught:
        for _ in range(5):
            stream.inbound_media_untrusted(message, 100.5)
    assert caught.value.close_code == 1008
    assert MediaStream(0.0, max_message_bytes=65536, max_messages_per_s=5) \
        .inbound_media_untrusted(message, 0.0) is None  # not streaming yet
