"""The stream agent's Twilio wire: what the bot is sent and what it may send."""

from __future__ import annotations

import base64
import dataclasses
import json

import pytest

from voxgate.agents.bot_wire import (
    BotAudio,
    BotClear,
    BotMark,
    BotWireError,
    CallMeta,
    TwilioWire,
)
from voxgate.codec.g711 import PCMU

META = CallMeta(call_id="abc@10.0.0.1", session_id="0123456789ab", tenant="acme",
                transport="sip", from_uri="sip:alice@10.0.0.1", to_uri="sip:bot@10.0.0.2")


def test_opening_is_connected_then_start_with_the_call_in_custom_parameters():
    wire = TwilioWire(META, max_message_bytes=65536)
    connected, start = (json.loads(m) for m in wire.opening())
    assert connected == {"event": "connected", "protocol": "Call", "version": "1.0.0"}
    assert start["event"] == "start" and start["sequenceNumber"] == "1"
    body = start["start"]
    assert body["streamSid"] == start["streamSid"] == wire.stream_sid
    assert body["callSid"] == META.call_id and body["accountSid"].startswith("AC")
    assert body["tracks"] == ["inbound"]
    assert body["mediaFormat"] == {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}
    assert body["customParameters"] == {
        "from": META.from_uri, "to": META.to_uri, "tenant": "acme", "transport": "sip",
        "session_id": META.session_id, "call_id": META.call_id}


def test_a_resumed_start_says_so():
    wire = TwilioWire(dataclasses.replace(META, resumed=True), max_message_bytes=65536)
    start = json.loads(wire.opening()[1])
    assert start["start"]["customParameters"]["resumed"] == "true"


def test_media_counts_chunks_timestamps_and_sequence_numbers():
    wire = TwilioWire(META, max_message_bytes=65536)
    wire.opening()
    pcm = bytes(range(256)) + bytes(64)
    first, second = json.loads(wire.media(pcm)), json.loads(wire.media(pcm))
    assert first["media"] == {"track": "inbound", "chunk": "1", "timestamp": "0",
                              "payload": base64.b64encode(PCMU.encode(pcm)).decode()}
    assert second["media"]["chunk"] == "2" and second["media"]["timestamp"] == "20"
    assert (first["sequenceNumber"], second["sequenceNumber"]) == ("2", "3")
    dtmf = json.loads(wire.dtmf("5"))
    assert dtmf["dtmf"] == {"track": "inbound_track", "digit": "5"}
    assert json.loads(wire.mark("m1"))["mark"] == {"name": "m1"}
    stop = json.loads(wire.closing()[0])
    assert stop["event"] == "stop" and stop["stop"]["callSid"] == META.call_id


def test_bot_messages_of_any_length_become_events():
    wire = TwilioWire(META, max_message_bytes=65536)
    ten_ms = PCMU.encode(bytes(160))  # 80 samples of silence
    payload = base64.b64encode(ten_ms).decode()
    audio = wire.receive_untrusted(json.dumps(
        {"event": "media", "streamSid": wire.stream_sid, "media": {"payload": payload}}))
    assert audio == BotAudio(PCMU.decode(ten_ms))
    assert wire.receive_untrusted(json.dumps(
        {"event": "mark", "streamSid": "x", "mark": {"name": "m"}})) == BotMark("m")
    assert wire.receive_untrusted(json.dumps({"event": "clear", "streamSid": "x"})) == BotClear()


@pytest.mark.parametrize("message", [
    "{", b"\x00\x01", json.dumps({"event": "start"}), json.dumps({"event": "media"}),
    json.dumps({"event": "media", "streamSid": "x", "media": {"payload": "!!"}}),
    json.dumps({"event": "mark", "streamSid": "x", "mark": {"name": 5}}),
    "[" * 5000 + "]" * 5000, '{"event": "clear", "streamSid": "x", "n": ' + "1" * 5000 + "}",
    "x" * 70_000,
])
def test_malformed_bot_messages_raise_only_bot_wire_error(message):
    wire = TwilioWire(META, max_message_bytes=65536)
    with pytest.raises(BotWireError):
        wire.receive_untrusted(message)
