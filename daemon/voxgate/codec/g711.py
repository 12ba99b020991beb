"""G.711 µ-law (PCMU) and A-law (PCMA) codecs (ITU-T G.711, RFC 3551 §4.5.14).

An RTP payload carries one byte per sample at 8000 Hz; the linear side is the
pipeline's PCM16: signed, little-endian, two bytes per sample. A 20 ms frame
is 160 payload bytes ↔ 320 PCM bytes.

The conversions are the stdlib ``audioop`` module's (the ``audioop-lts``
distribution provides it under the same name on Python ≥ 3.13). They run on
the hot path, every 20 ms per call and direction, and audioop's encoder
searches each sample's segment (34 instructions a sample, callgrind), so the
compiled build (setup.py) looks them up instead in tables that audioop fills
at import: ``voxgate.codec._g711``, a few lines of C that know no G.711 of
their own (``tests/test_g711.py`` checks every sample and code against
audioop). The pure-Python build calls audioop. The codecs hold no state: one
shared object per codec serves every call.
"""

from __future__ import annotations

import sys
import warnings
from array import array
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


_Conversion = Callable[[bytes, int], bytes]


def _lookups(
    to_linear: _Conversion, from_linear: _Conversion, *, shift: int
) -> tuple[_Conversion, _Conversion]:
    """A law's ``(to_linear, from_linear)``: audioop's own functions, or the same
    results by table lookup when the C extension was built.

    ``shift``: the encoder depends only on the sample's top ``16 - shift``
    bits (audioop: µ-law 14, A-law 13), so its table holds ``65536 >> shift``
    codes, one for each such prefix.
    """
    try:
        from voxgate.codec import _g711
    except ImportError:  # the pure-Python build
        return to_linear, from_linear
    prefixes = array("h", range(-32768, 32768, 1 << shift)).tobytes()
    encoder = _g711.Encoder(from_linear(prefixes, PCM_SAMPLE_WIDTH_BYTES), shift)
    decoder = _g711.Decoder(to_linear(bytes(range(256)), PCM_SAMPLE_WIDTH_BYTES))
    return decoder.decode, encoder.encode


_ULAW_TO_LINEAR, _ULAW_FROM_LINEAR = _lookups(audioop.ulaw2lin, audioop.lin2ulaw, shift=2)
_ALAW_TO_LINEAR, _ALAW_FROM_LINEAR = _lookups(audioop.alaw2lin, audioop.lin2alaw, shift=3)

PCMU = G711Codec(
    "PCMU", 0, to_linear=_ULAW_TO_LINEAR, from_linear=_ULAW_FROM_LINEAR, silence_byte=0xFF
)
"""G.711 µ-law, RTP payload type 0."""

PCMA = G711Codec(
    "PCMA", 8, to_linear=_ALAW_TO_LINEAR, from_linear=_ALAW_FROM_LINEAR, silence_byte=0xD5
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
