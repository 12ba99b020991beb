"""Recorded prompts: a WAV file read once into 20 ms PCM16 frames.

The fallback prompt (``[agent] fallback_prompt``) plays when the agent has
not answered within ``[timers] agent_response_s``. The file must be 8 kHz,
mono, 16-bit PCM WAV (``sox in.wav -r 8000 -c 1 -b 16 prompt.wav``).
"""

from __future__ import annotations

import wave

from voxgate.errors import ConfigError
from voxgate.pipeline.frames import RATE_HZ, split_frames

MAX_PROMPT_S = 60


def load_prompt(path: str, key: str) -> tuple[bytes, ...]:
    """The WAV at ``path`` as 320-byte frames (the last one zero-padded).

    Raises ConfigError naming ``key`` when it is unreadable or not 8 kHz mono PCM16.
    """
    try:
        with wave.open(path, "rb") as wav:
            if (wav.getframerate(), wav.getnchannels(), wav.getsampwidth()) != (RATE_HZ, 1, 2):
                raise ConfigError(f"{key}: {path} must be 8 kHz mono 16-bit PCM WAV")
            if wav.getnframes() > RATE_HZ * MAX_PROMPT_S:
                raise ConfigError(f"{key}: {path} is longer than {MAX_PROMPT_S} s")
            pcm = wav.readframes(wav.getnframes())
    except (OSError, EOFError, wave.Error) as e:
        raise ConfigError(f"{key}: cannot read {path}: {e}") from e
    return split_frames(pcm)
