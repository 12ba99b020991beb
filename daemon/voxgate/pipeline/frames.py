"""The media frame every transport converts to and from: 20 ms of 8 kHz audio.

One place for the frame constants (RFC 3551 §4.5: G.711 at 8000 Hz, ptime
20 ms by default). Inside voxgate a frame is 16-bit signed little-endian
mono PCM; on the wire G.711 carries one byte per sample.
"""

from __future__ import annotations

from typing import Final

FRAME_MS: Final = 20
"""One media frame, in milliseconds (the media clock's tick)."""
FRAME_S: Final = FRAME_MS / 1000
RATE_HZ: Final = 8000
"""The pipeline's sample rate: narrowband telephony."""
SAMPLE_WIDTH_BYTES: Final = 2
"""PCM16."""
SAMPLES_PER_FRAME: Final = RATE_HZ * FRAME_MS // 1000
"""160 samples."""
PCM_FRAME_BYTES: Final = SAMPLES_PER_FRAME * SAMPLE_WIDTH_BYTES
"""320 bytes: one frame of PCM16."""
G711_FRAME_BYTES: Final = SAMPLES_PER_FRAME
"""160 bytes: one frame of µ-law or A-law."""
PCM_SILENCE: Final = bytes(PCM_FRAME_BYTES)
"""One frame of PCM16 silence."""


def split_frames(pcm: bytes) -> tuple[bytes, ...]:
    """``pcm`` (PCM16 at :data:`RATE_HZ`) as 320-byte frames, the last one zero-padded."""
    pcm += bytes(-len(pcm) % PCM_FRAME_BYTES)
    return tuple(pcm[i:i + PCM_FRAME_BYTES] for i in range(0, len(pcm), PCM_FRAME_BYTES))
