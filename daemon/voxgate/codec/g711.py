"""G.711 µ-law (PCMU) and A-law (PCMA) codecs (ITU-T G.711, RFC 3551 §4.5.14).

An RTP payload carries one byte per sample at 8000 Hz; the linear side is the
pipeline's PCM16: signed, little-endian, two bytes per sample. A 20 ms frame
is 160 payload bytes ↔ 320 PCM bytes.

The conversions run on the hot path (every 20 ms per call and direction), so
they are the C functions of the stdlib ``audioop`` module, which the
``audioop-lts`` distribution provides under the same name on Python ≥ 3.13.
The codecs hold no state: one shared object per codec serves every call.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable
from typing import Final

from voxgate.errors import LocalProtocolError

with warnings.catch_warnings():
    # Python 3.11/3.12 deprecate audioop (PEP 594) with a DeprecationWarning at import.
    warnings.simplefilter("ignore", DeprecationWarning)
    import audioop

PCM_SAMPLE_WIDTH_BYTES: Final = 2
"""Bytes per linear sample (PCM16)."""

# audioop reads and writes linear samples in the machine's byte order.
_NATIVE_IS_LITTLE_ENDIAN: Final = sys.byteorder == "little"


class G711Codec:
    """One G.711 law: a name, its static RTP payload type and the conversions.

    Instances are immutable and shared; use :data:`PCMU`, :data:`PCMA` or
    :func:`codec_for` rather than building new ones.
    """

    __slots__ = ("_from_linear", "_silence_byte", "_to_linear", "name", "payload_type")

    sample_rate_hz = 8000

    def __init__(
        self,
        name: str,
        payload_type: int,
        *,
        to_linear: Callable[[bytes, int], bytes],
        from_linear: Callable[[bytes, int], bytes],
        silence_byte: int,
    ) -> None:
        self.name = name
        self.payload_type = payload_type
        self._to_linear = to_linear
        self._from_linear = from_linear
        self._silence_byte = bytes((silence_byte,))

    def __repr__(self) -> str:
        return f"<G711Codec {self.name} pt={self.payload_type}>"

    def decode(self, payload: bytes) -> bytes:
        """Expand a payload of ``n`` code bytes into ``2 * n`` bytes of PCM16 LE."""
        pcm = self._to_linear(payload, PCM_SAMPLE_WIDTH_BYTES)
        if _NATIVE_IS_LITTLE_ENDIAN:
            return pcm
        return audioop.byteswap(pcm, PCM_SAMPLE_WIDTH_BYTES)

    def encode(self, pcm: bytes) -> bytes:
        """Compress ``2 * n`` bytes of PCM16 LE into a payload of ``n`` code bytes.

        Raises :class:`~voxgate.errors.LocalProtocolError` when ``pcm`` has an
        odd length (not whole samples): our pipeline produced it.
        """
        if len(pcm) % PCM_SAMPLE_WIDTH_BYTES:
            raise LocalProtocolError(f"PCM16 buffer of {len(pcm)} bytes is not whole samples")
        if not _NATIVE_IS_LITTLE_ENDIAN:
            pcm = audioop.byteswap(pcm, PCM_SAMPLE_WIDTH_BYTES)
        return self._from_linear(pcm, PCM_SAMPLE_WIDTH_BYTES)

    def silence(self, samples: int) -> bytes:
        """An encoded payload of ``samples`` samples of digital silence.

        Raises :class:`~voxgate.errors.LocalProtocolError` for a negative count.
        """
        if samples < 0:
            raise LocalProtocolError(f"negative sample count {samples}")
        return self._silence_byte * samples


PCMU = G711Codec(
    "PCMU", 0, to_linear=audioop.ulaw2lin, from_linear=audioop.lin2ulaw, silence_byte=0xFF
)
"""G.711 µ-law, RTP payload type 0."""

PCMA = G711Codec(
    "PCMA", 8, to_linear=audioop.alaw2lin, from_linear=audioop.lin2alaw, silence_byte=0xD5
)
"""G.711 A-law, RTP payload type 8."""

_BY_NAME = {codec.name: codec for codec in (PCMU, PCMA)}


def codec_for(name: str) -> G711Codec:
    """The shared codec for an SDP encoding name (case-insensitive, RFC 4566 §6).

    Raises :class:`~voxgate.errors.LocalProtocolError` for a name that is not
    ``PCMU`` or ``PCMA``: negotiation only ever selects those.
    """
    try:
        return _BY_NAME[name.upper()]
    except KeyError:
        raise LocalProtocolError(f"no G.711 codec named {name!r}") from None
