"""Tests for voxgate.codec.g711: G.711 code points, round trips and quality."""

from __future__ import annotations

import math
import struct
import subprocess
import sys
from types import ModuleType

import pytest

from voxgate.codec.g711 import PCMA, PCMU, G711Codec, codec_for
from voxgate.errors import LocalProtocolError

ALL_CODES = bytes(range(256))


def pcm16(*samples: int) -> bytes:
    return struct.pack(f"<{len(samples)}h", *samples)


def samples_of(pcm: bytes) -> tuple[int, ...]:
    return struct.unpack(f"<{len(pcm) // 2}h", pcm)


@pytest.mark.parametrize(
    ("codec", "code", "linear"),
    [
        # µ-law (G.711 table 2): 0xFF and 0x7F are ±0, extremes are ±32124.
        (PCMU, 0xFF, 0),
        (PCMU, 0x7F, 0),
        (PCMU, 0x00, -32124),
        (PCMU, 0x80, 32124),
        (PCMU, 0xFE, 8),
        (PCMU, 0x7E, -8),
        # A-law (G.711 table 1, even bits inverted): 0xD5/0x55 are ±8, extremes ±32256.
        (PCMA, 0xD5, 8),
        (PCMA, 0x55, -8),
        (PCMA, 0xAA, 32256),
        (PCMA, 0x2A, -32256),
    ],
)
def test_known_code_points_decode(codec: G711Codec, code: int, linear: int) -> None:
    assert codec.decode(bytes([code])) == pcm16(linear)


@pytest.mark.parametrize(
    ("codec", "linear", "code"),
    [
        (PCMU, 0, 0xFF),
        (PCMU, 32767, 0x80),
        (PCMU, -32768, 0x00),
        (PCMA, 0, 0xD5),
        (PCMA, -1, 0x55),
        (PCMA, 32767, 0xAA),
        (PCMA, -32768, 0x2A),
    ],
)
def test_known_code_points_encode(codec: G711Codec, linear: int, code: int) -> None:
    assert codec.encode(pcm16(linear)) == bytes([code])


def test_decode_is_little_endian_two_bytes_per_sample() -> None:
    pcm = PCMU.decode(b"\x00\x80")
    assert len(pcm) == 4
    assert pcm == b"\x84\x82\x7c\x7d"  # -32124, 32124 little-endian


def test_mulaw_round_trip_of_every_code_point() -> None:
    expected = bytes(0xFF if code == 0x7F else code for code in ALL_CODES)
    assert PCMU.encode(PCMU.decode(ALL_CODES)) == expected


def test_alaw_round_trip_of_every_code_point() -> None:
    assert PCMA.encode(PCMA.decode(ALL_CODES)) == ALL_CODES


@pytest.mark.parametrize("codec", [PCMU, PCMA])
def test_decode_is_monotonic_within_each_sign(codec: G711Codec) -> None:
    values = sorted(set(samples_of(codec.decode(ALL_CODES))))
    # 255 distinct levels for µ-law (double zero), 256 for A-law.
    assert len(values) == (255 if codec is PCMU else 256)


@pytest.mark.parametrize("codec", [PCMU, PCMA])
def test_sine_snr_above_35_db(codec: G711Codec) -> None:
    rate = codec.sample_rate_hz
    samples = [round(16000 * math.sin(2 * math.pi * 1004 * n / rate)) for n in range(rate)]
    decoded = samples_of(codec.decode(codec.encode(pcm16(*samples))))
    signal = sum(s * s for s in samples)
    noise = sum((s - d) ** 2 for s, d in zip(samples, decoded, strict=True))
    assert 10 * math.log10(signal / noise) > 35


@pytest.mark.parametrize("codec", [PCMU, PCMA])
def test_frame_sizes(codec: G711Codec) -> None:
    frame = codec.silence(160)
    assert len(frame) == 160
    pcm = codec.decode(frame)
    assert len(pcm) == 320
    assert len(codec.encode(pcm)) == 160


def test_silence_payloads() -> None:
    assert PCMU.silence(3) == b"\xff\xff\xff"
    assert PCMA.silence(2) == b"\xd5\xd5"
    assert PCMU.silence(0) == b""
    assert max(abs(s) for s in samples_of(PCMA.decode(PCMA.silence(160)))) == 8
    assert set(samples_of(PCMU.decode(PCMU.silence(160)))) == {0}


def test_silence_rejects_negative_count() -> None:
    with pytest.raises(LocalProtocolError):
        PCMU.silence(-1)


def test_encode_rejects_partial_sample() -> None:
    with pytest.raises(LocalProtocolError, match="3 bytes"):
        PCMA.encode(b"\x00\x00\x00")


def test_empty_payloads() -> None:
    assert PCMU.decode(b"") == b""
    assert PCMA.encode(b"") == b""


def test_codec_identity() -> None:
    assert (PCMU.name, PCMU.payload_type, PCMU.sample_rate_hz) == ("PCMU", 0, 8000)
    assert (PCMA.name, PCMA.payload_type, PCMA.sample_rate_hz) == ("PCMA", 8, 8000)
    assert repr(PCMA) == "<G711Codec PCMA pt=8>"


def test_codec_for() -> None:
    assert codec_for("PCMU") is PCMU
    assert codec_for("pcma") is PCMA
    with pytest.raises(LocalProtocolError, match="G729"):
        codec_for("G729")


def test_import_is_sans_io_and_silent() -> None:
    code = (
        "import sys, warnings\n"
        "warnings.simplefilter('error')\n"
        "import voxgate.codec.g711\n"
        "assert 'trio' not in sys.modules, 'trio imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def _audioop() -> ModuleType:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import audioop
    return audioop


EVERY_SAMPLE = struct.pack("<65536h", *range(-32768, 32768))


@pytest.mark.parametrize(("codec", "law"), [(PCMU, "ulaw"), (PCMA, "alaw")])
def test_every_sample_and_code_agree_with_audioop(codec: G711Codec, law: str) -> None:
    """The compiled build looks G.711 up in tables (``_g711.c``): every one of the
    65,536 samples encodes, and every code decodes, as audioop's own functions do
    (the pure-Python build calls those)."""
    audioop = _audioop()
    assert codec.encode(EVERY_SAMPLE) == getattr(audioop, f"lin2{law}")(EVERY_SAMPLE, 2)
    assert codec.decode(ALL_CODES) == getattr(audioop, f"{law}2lin")(ALL_CODES, 2)


def test_the_lookup_tables_refuse_what_audioop_refuses() -> None:
    g711 = pytest.importorskip("voxgate.codec._g711")
    encoder = g711.Encoder(bytes(16384), 2)
    with pytest.raises(ValueError, match="2-byte"):
        encoder.encode(b"\x00\x00", 1)
    with pytest.raises(ValueError, match="whole number"):
        encoder.encode(b"\x00", 2)
    with pytest.raises(ValueError, match="65536 >> shift"):
        g711.Encoder(bytes(100), 2)
    with pytest.raises(ValueError, match="256 native int16"):
        g711.Decoder(bytes(100))
    assert g711.Decoder(bytes(range(256)) * 2).decode(memoryview(b"\x01"), 2) == b"\x02\x03"
