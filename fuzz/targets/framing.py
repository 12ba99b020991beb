"""How one fuzz input is cut into several messages, datagrams or reads.

Text protocols (SIP over UDP, control lines, WebSocket messages) use a
separator that no seed holds, so mutations splice whole messages; binary
RTP uses a one-byte header per datagram (see :func:`split_datagrams`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

MAX_RECORDS = 64
"""Most messages taken from one input; the rest of the input is ignored."""

RECORD_SEPARATOR = b"\n%%\n"
"""Separates the messages of one text-protocol input (absent from every seed)."""

MAX_TICKS_PER_DATAGRAM = 7
"""Most 20 ms media ticks a datagram header can ask to run before its datagram."""


def split_records(data: bytes) -> list[bytes]:
    """``data`` cut at :data:`RECORD_SEPARATOR`, at most :data:`MAX_RECORDS` pieces."""
    return data.split(RECORD_SEPARATOR, MAX_RECORDS)[:MAX_RECORDS]


@dataclass(frozen=True, slots=True)
class DatagramRecord:
    """One datagram of a media input: run ``ticks`` 20 ms ticks (0-7), then deliver
    ``payload`` as if sent from source number ``source`` (0-3)."""

    ticks: int
    source: int
    payload: bytes


def split_datagrams(data: bytes) -> Iterator[DatagramRecord]:
    """Decode ``header length payload`` records, at most :data:`MAX_RECORDS` of them.

    ``header`` is one byte: bits 0-1 the source number, bits 2-4 the ticks to
    run first; ``length`` is one byte (0-255, cut to what is left); ``payload``
    follows. An input that ends inside a header ends the datagrams.
    """
    pos = 0
    for _ in range(MAX_RECORDS):
        if pos + 2 > len(data):
            return
        header, length = data[pos], data[pos + 1]
        payload = data[pos + 2 : pos + 2 + length]
        pos += 2 + len(payload)
        yield DatagramRecord((header >> 2) & MAX_TICKS_PER_DATAGRAM, header & 0x03, payload)


def join_datagrams(records: list[DatagramRecord]) -> bytes:
    """The input :func:`split_datagrams` cuts into ``records`` (for building seeds).

    Raises:
        ValueError: a payload over 255 bytes, ticks over 7 or a source over 3.
    """
    out = bytearray()
    for record in records:
        if (len(record.payload) > 0xFF or not 0 <= record.ticks <= MAX_TICKS_PER_DATAGRAM
                or not 0 <= record.source <= 3):
            raise ValueError(f"cannot frame {record!r}")
        out += bytes([record.ticks << 2 | record.source, len(record.payload)]) + record.payload
    return bytes(out)
