"""Wrap-aware arithmetic on RTP sequence numbers and timestamps (RFC 3550 §5.1).

Sequence numbers are 16-bit and timestamps 32-bit unsigned counters that wrap
around, so they are never compared with a raw ``<``: ``65535 + 1 == 0`` and
``0`` is *after* ``65535``. A difference is taken modulo 2**16 (2**32) and
read as a signed number in half the range, the serial-number arithmetic of
RFC 1982 that aiortc's ``uint16_gt`` also uses.
"""

from __future__ import annotations

from typing import Final

_UINT16_MASK: Final = 0xFFFF
_UINT16_HALF: Final = 0x8000
_UINT16_MOD: Final = 0x10000
_UINT32_MASK: Final = 0xFFFFFFFF
_UINT32_HALF: Final = 0x80000000
_UINT32_MOD: Final = 0x100000000


def uint16_add(a: int, n: int) -> int:
    """Return ``a + n`` modulo 2**16 (``n`` may be negative)."""
    return (a + n) & _UINT16_MASK


def uint16_diff(a: int, b: int) -> int:
    """Return the signed distance ``a - b`` of two 16-bit counters, in [-32768, 32767].

    ``uint16_diff(0, 65535) == 1``: 0 comes one step after 65535.
    """
    d = (a - b) & _UINT16_MASK
    return d - _UINT16_MOD if d >= _UINT16_HALF else d


def uint16_gt(a: int, b: int) -> bool:
    """Return whether the 16-bit counter ``a`` comes after ``b``."""
    return 0 < ((a - b) & _UINT16_MASK) < _UINT16_HALF


def uint32_add(a: int, n: int) -> int:
    """Return ``a + n`` modulo 2**32 (``n`` may be negative)."""
    return (a + n) & _UINT32_MASK


def uint32_diff(a: int, b: int) -> int:
    """Return the signed distance ``a - b`` of two 32-bit counters, in [-2**31, 2**31 - 1]."""
    d = (a - b) & _UINT32_MASK
    return d - _UINT32_MOD if d >= _UINT32_HALF else d


def uint32_gt(a: int, b: int) -> bool:
    """Return whether the 32-bit counter ``a`` comes after ``b``."""
    return 0 < ((a - b) & _UINT32_MASK) < _UINT32_HALF
