"""The stream agent's wires (Twilio, Vonage): what the bot is sent and what it may send."""

from __future__ import annotations

import base64
import dataclasses
import json

import numpy as np
import pytest

from voxgate.agents.bot_wire import (
    MAX_NOTIFY_PAYLOAD_BYTES,
    WIRES,
    BotAudio,
    BotClear,
    BotMark,
    BotTransfer,
    BotWireError,
    CallMeta,
    TwilioWire,
    VonageWire,
)
from voxgate.agents.transfer import MAX_TARGET_CHARS, TransferFailure
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
    "x" * 70_000, json.dumps({"event": "transfer", "streamSid": "x"}),
    json.dumps({"event": "transfer", "streamSid": "x", "transfer": {"target": 5}}),
    json.dumps({"event": "transfer", "streamSid": "x",
                "transfer": {"target": "sip:" + "a" * MAX_TARGET_CHARS}}),
])
def test_malformed_bot_messages_raise_only_bot_wire_error(message):
    wire = TwilioWire(META, max_message_bytes=65536)
    with pytest.raises(BotWireError):
        wire.receive_untrusted(message)


def test_twilio_transfer_and_its_failure():
    wire = TwilioWire(META, max_message_bytes=65536)
    wire.opening()
    asked = wire.receive_untrusted(json.dumps(
        {"event": "transfer", "streamSid": wire.stream_sid,
         "transfer": {"target": "sip:human@10.0.0.9"}}))
    assert asked == BotTransfer("sip:human@10.0.0.9")
    # Not checked here: a bad target is the session's to refuse (told back as below).
    assert wire.receive_untrusted(json.dumps(
        {"event": "transfer", "streamSid": "x", "transfer": {"target": "tel:1"}})
    ) == BotTransfer("tel:1")
    told = json.loads(wire.transfer_failed(TransferFailure("sip:human@10.0.0.9", 486, "failed")))
    assert told == {"event": "transfer_failed", "streamSid": wire.stream_sid,
                    "sequenceNumber": "2",
                    "transfer": {"target": "sip:human@10.0.0.9", "status": 486,
                                 "reason": "failed"}}


# -- Vonage ----------------------------------------------------------------------------

def vonage(rate_hz: int = 16000) -> VonageWire:
    return VonageWire(META, max_message_bytes=65536, sample_rate_hz=rate_hz)


def sine(hz: float, seconds: float, rate_hz: int = 8000) -> bytes:
    """PCM16LE of a sine at a quarter of full scale."""
    t = np.arange(round(seconds * rate_hz)) / rate_hz
    return (8192 * np.sin(2 * np.pi * hz * t)).astype("<i2").tobytes()


def samples(pcm: bytes) -> np.ndarray:
    return np.frombuffer(pcm, dtype="<i2").astype(float)


def peak_hz(x: np.ndarray, rate_hz: int) -> float:
    return float(np.fft.rfftfreq(len(x), 1 / rate_hz)[np.argmax(np.abs(np.fft.rfft(x)))])


def best_correlation(x: np.ndarray, tone: np.ndarray) -> float:
    """Normalized correlation of ``x`` with a 1 kHz ``tone`` at its best phase
    (one period is 8 samples at 8 kHz, 16 at 16 kHz): 1.0 for the same tone
    without a gap or a phase jump."""
    x = x[:len(tone) - 16]
    return max(float(np.dot(x, tone[lag:lag + len(x)]))
               / float(np.linalg.norm(x) * np.linalg.norm(tone[lag:lag + len(x)]))
               for lag in range(16))


def frames(pcm: bytes, size: int = 320) -> list[bytes]:
    return [pcm[i:i + size] for i in range(0, len(pcm), size)]


def test_both_wires_are_made_alike_and_vonage_knows_its_rates():
    for protocol in ("twilio", "vonage"):
        wire = WIRES[protocol](META, max_message_bytes=65536, sample_rate_hz=8000)
        assert wire.opening()
    with pytest.raises(ValueError):
        VonageWire(META, max_message_bytes=65536, sample_rate_hz=44100)


@pytest.mark.parametrize("rate_hz", [8000, 16000])
def test_vonage_opening_is_connected_with_the_call_as_top_level_fields(rate_hz):
    (connected,) = vonage(rate_hz).opening()
    assert isinstance(connected, str)
    assert json.loads(connected) == {
        "event": "websocket:connected", "content-type": f"audio/l16;rate={rate_hz}",
        "from": META.from_uri, "to": META.to_uri, "tenant": "acme", "transport": "sip",
        "session_id": META.session_id, "call_id": META.call_id}
    resumed = VonageWire(dataclasses.replace(META, resumed=True), max_message_bytes=65536)
    assert json.loads(resumed.opening()[0])["resumed"] == "true"
    assert vonage(rate_hz).closing() == []


def test_vonage_at_8khz_passes_audio_through():
    wire = vonage(8000)
    pcm = bytes(range(256)) + bytes(64)
    assert wire.media(pcm) == pcm
    assert wire.receive_untrusted(pcm) == BotAudio(pcm)


def test_vonage_at_16khz_sends_640_byte_messages_of_the_callers_tone():
    wire = vonage(16000)
    sent = [wire.media(frame) for frame in frames(sine(1000, 1.0))]
    assert {len(m) for m in sent} == {640}
    first = next(i for i, m in enumerate(sent) if any(m))
    assert first <= 7, first  # the resampler's first block, then one message of margin
    tone_16khz = samples(b"".join(sent[first:]))
    assert peak_hz(tone_16khz, 16000) == pytest.approx(1000, abs=2)
    assert best_correlation(tone_16khz[40:], samples(sine(1000, 1.0, 16000))) >= 0.99


def test_a_tone_keeps_its_frequency_and_shape_through_16khz_both_ways():
    wire = vonage(16000)
    tone = sine(1000, 1.0)
    back = b"".join(event.pcm for m in (wire.media(f) for f in frames(tone))
                    if isinstance(event := wire.receive_untrusted(m), BotAudio))
    assert len(back) >= len(tone) // 2
    steady = samples(back)[len(back) // 8:]
    assert peak_hz(steady, 8000) == pytest.approx(1000, abs=4)
    assert best_correlation(steady, samples(tone)) >= 0.99


@pytest.mark.parametrize("rate_hz", [8000, 16000])
def test_odd_length_bot_audio_keeps_its_last_byte_for_the_next_message(rate_hz):
    wire = vonage(rate_hz)
    tone = sine(440, 1.0, rate_hz)
    pieces = [tone[i:i + 333] for i in range(0, len(tone), 333)]  # odd lengths
    out = b"".join(event.pcm for p in pieces
                   if isinstance(event := wire.receive_untrusted(p), BotAudio))
    if rate_hz == 8000:
        assert out == tone
    else:
        assert len(out) % 2 == 0 and abs(len(out) - len(tone) // 2) <= 2400  # a block inside
        assert peak_hz(samples(out)[len(out) // 8:], 8000) == pytest.approx(440, abs=4)
    assert vonage(8000).receive_untrusted(b"\x01") is None


def test_vonage_clear_drops_the_odd_byte_and_what_the_resampler_holds():
    wire = vonage(8000)
    assert wire.receive_untrusted(b"\x01\x02\x03") == BotAudio(b"\x01\x02")
    assert wire.receive_untrusted('{"action": "clear"}') == BotClear()
    assert wire.receive_untrusted(b"\x04\x05") == BotAudio(b"\x04\x05")
    # At 16 kHz, audio after a clear comes out as from a new connection (but for the
    # resampler's dither, a least significant bit or two).
    used, fresh = vonage(16000), vonage(16000)
    for piece in frames(sine(440, 0.3, 16000), 640):
        used.receive_untrusted(piece)
    assert used.receive_untrusted('{"action": "clear"}') == BotClear()
    tone = frames(sine(1000, 0.5, 16000), 640)
    after = [used.receive_untrusted(p) for p in tone]
    new = [fresh.receive_untrusted(p) for p in tone]
    assert [a is None for a in after] == [n is None for n in new]
    for a, n in zip(after, new, strict=True):
        if isinstance(a, BotAudio) and isinstance(n, BotAudio):
            assert np.abs(samples(a.pcm) - samples(n.pcm)).max() <= 4


def test_vonage_notify_comes_back_with_its_payload():
    wire = vonage()
    payload = {"name": "m1", "n": [1, 2.5, None], "é": {"deep": True}}
    event = wire.receive_untrusted(json.dumps({"action": "notify", "payload": payload}))
    assert isinstance(event, BotMark)
    assert event.name == json.dumps(payload, separators=(",", ":"), ensure_ascii=False)
    answer = wire.mark(event.name)
    assert answer is not None
    assert json.loads(answer) == {"event": "websocket:notify", "payload": payload}
    assert wire.mark("m1") is None and wire.mark("5") is None  # Twilio marks: no payload


def test_vonage_transfer_and_its_failure():
    wire = vonage()
    assert wire.receive_untrusted('{"action": "transfer", "target": "sip:h@10.0.0.9"}') == (
        BotTransfer("sip:h@10.0.0.9"))
    told = json.loads(wire.transfer_failed(TransferFailure("sip:h@10.0.0.9", None, "timeout")))
    assert told == {"event": "websocket:transfer_failed", "target": "sip:h@10.0.0.9",
                    "status": None, "reason": "timeout"}


def test_vonage_dtmf_is_a_websocket_dtmf_event():
    assert json.loads(vonage().dtmf("#")) == {"event": "websocket:dtmf", "digit": "#",
                                               "duration": 100}


@pytest.mark.parametrize("message", [
    "{", "[]", '"clear"', '{"action": "play"}', '{"event": "websocket:notify"}',
    '{"action": 5}', '{"action": "notify"}', '{"action": "notify", "payload": "m1"}',
    '{"action": "notify", "payload": [1]}',
    json.dumps({"action": "notify", "payload": {"name": "x" * MAX_NOTIFY_PAYLOAD_BYTES}}),
    '{"action": "notify", "payload": ' + "[" * 20 + "]" * 20 + "}",
    '{"action": "clear", "n": ' + "1" * 5000 + "}", "x" * 70_000, bytes(70_000),
    '{"action": "transfer"}', '{"action": "transfer", "target": ["sip:a@b"]}',
    json.dumps({"action": "transfer", "target": "sip:" + "a" * MAX_TARGET_CHARS}),
])
def test_malformed_vonage_messages_raise_only_bot_wire_error(message):
    with pytest.raises(BotWireError):
        vonage().receive_untrusted(message)
