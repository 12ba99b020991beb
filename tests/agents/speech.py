"""Caller speech for the agent tests: espeak-ng phrases as 8 kHz PCM16 or µ-law."""

from __future__ import annotations

import subprocess
import warnings

from voxgate.agents.synth import wav_to_frames

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import audioop

CALLER_VOICE = "en-us"
"""espeak-ng voice of the callers (the agent speaks it at another rate)."""


def speak_pcm(text: str, *, rate_wpm: int = 150, voice: str = CALLER_VOICE) -> bytes:
    """``text`` spoken by espeak-ng, as 8 kHz 16-bit mono PCM, through G.711 µ-law once
    (what the daemon gets from a PCMU call)."""
    wav = subprocess.run(["espeak-ng", "-v", voice, "-s", str(rate_wpm), "--stdout", text],
                         capture_output=True, check=True, timeout=30).stdout
    pcm = b"".join(wav_to_frames(wav))
    return audioop.ulaw2lin(audioop.lin2ulaw(pcm, 2), 2)


def speak_ulaw(text: str, *, rate_wpm: int = 150, voice: str = CALLER_VOICE) -> bytes:
    """``text`` spoken, as µ-law bytes for an RTP peer."""
    return audioop.lin2ulaw(speak_pcm(text, rate_wpm=rate_wpm, voice=voice), 2)
