"""Synthesis: espeak-ng to 8 kHz frames, the cache, failures."""

from __future__ import annotations

import io
import math
import struct
import wave

import pytest

from tests.harness import requires
from voxgate.agents.synth import SynthesisError, Synthesizer, wav_to_frames
from voxgate.pipeline.frames import PCM_FRAME_BYTES as FRAME_BYTES


def wav_bytes(samples: list[int], rate_hz: int, channels: int = 1) -> bytes:
    out = io.BytesIO()
    with wave.open(out, "wb") as wav:
        wav.setnchannels(channels)
        wav.setsampwidth(2)
        wav.setframerate(rate_hz)
        wav.writeframes(struct.pack(f"<{len(samples)}h", *samples))
    return out.getvalue()


def test_wav_is_resampled_to_8khz_frames():
    tone = [int(8000 * math.sin(2 * math.pi * 440 * n / 22050)) for n in range(22050)]
    frames = wav_to_frames(wav_bytes(tone, 22050))
    assert all(len(frame) == FRAME_BYTES for frame in frames)
    assert len(frames) == 50  # one second, the last frame padded


def test_8khz_wav_is_cut_and_padded():
    frames = wav_to_frames(wav_bytes([1] * 170, 8000))
    assert len(frames) == 2
    assert frames[1] == struct.pack("<10h", *[1] * 10) + bytes(300)


@pytest.mark.parametrize(
    ("blob", "message"),
    [
        (b"not a wav", "unreadable WAV"),
        (wav_bytes([0, 0], 8000, channels=2), "not mono"),
        (wav_bytes([0] * (8000 * 61), 8000), "longer than 60 s"),
    ],
)
def test_bad_wavs(blob, message):
    with pytest.raises(SynthesisError, match=message):
        wav_to_frames(blob)


@requires("espeak-ng")
async def test_espeak_speaks_and_the_cache_answers_again():
    synth = Synthesizer("en-us", 160, processes=1)
    frames = await synth.frames("Say balance, agent, or goodbye.")
    assert 1.0 < len(frames) * 0.02 < 5.0
    assert any(any(frame) for frame in frames)
    assert await synth.frames("Say  balance, agent, or goodbye. ") is frames
    assert (synth.processes_run, synth.cache_hits) == (1, 1)
    assert await synth.frames("   ") == ()


@requires("espeak-ng")
async def test_cache_is_bounded_in_bytes():
    synth = Synthesizer("en-us", 160, processes=1, cache_bytes=40 * FRAME_BYTES)
    await synth.frames("one")
    await synth.frames("two")
    assert synth._cached_bytes <= 40 * FRAME_BYTES
    await synth.frames("one")
    assert synth.processes_run == 3


@requires("espeak-ng")
async def test_unknown_voice_is_a_synthesis_error():
    with pytest.raises(SynthesisError, match="espeak-ng exit"):
        await Synthesizer("nosuchvoice", 160, processes=1).frames("hello")
