"""Bounded JSON decoding: every hostile input becomes UntrustedJSONError."""

from __future__ import annotations

import pytest

from voxgate.errors import RemoteProtocolError
from voxgate.jsonbounds import (
    MAX_INTEGER_DIGITS,
    JSONTooLargeError,
    UntrustedJSONError,
    loads_untrusted,
)

BIG = 1 << 20


def nested(depth: int) -> list[object]:
    value: list[object] = []
    for _ in range(depth - 1):
        value = [value]
    return value


def loads(data: bytes | str, max_bytes: int = BIG, max_depth: int = 32) -> object:
    return loads_untrusted(data, max_bytes=max_bytes, max_depth=max_depth)


@pytest.mark.parametrize(
    ("data", "value"),
    [
        (b'{"a": [1, 2.5, "x", null, true]}', {"a": [1, 2.5, "x", None, True]}),
        ('"caf\u00e9"', "caf\u00e9"),
        (b'"\\ud83d\\ude00"', "\U0001f600"),  # a surrogate pair is one character
        (b'"[[[[" ', "[[[["),  # brackets inside strings do not nest
        (b'"\\"[[[["', '"[[[['),  # nor after an escaped quote
        (b"-" + b"9" * MAX_INTEGER_DIGITS, -int("9" * MAX_INTEGER_DIGITS)),
        (b"1e308", 1e308),
        (b"[" * 32 + b"]" * 32, nested(32)),
    ],
)
def test_accepts_json_within_bounds(data, value):
    assert loads(data) == value


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"[" * 30_000 + b"]" * 30_000, "nested deeper than 32"),
        (b'{"a":' * 33 + b"1" + b"}" * 33, "nested deeper than 32"),
        (b"[" * 100_000, "nested deeper"),  # never closed: still no recursion
        (b"9" * 5000, "more than 40 digits"),
        (b"[" + b"1" * (MAX_INTEGER_DIGITS + 1) + b"]", "more than 40 digits"),
        (b"NaN", "NaN is not"),
        (b"[-Infinity]", "-Infinity is not"),
        (b'{"id": 1e400}', "out of range"),
        (b"-1e400", "out of range"),
        (b"\xff\xfe", "not UTF-8"),
        (b'"\xed\xa0\x80"', "not UTF-8"),  # a UTF-8-encoded surrogate
        ("\"\ud800\"", "not UTF-8"),
        (b'{"say": "\\ud800"}', "unpaired surrogate"),
        (b'"\\udc00\\ud800"', "unpaired surrogate"),
        (b"{", "not JSON"),
        (b"", "not JSON"),
        (b"[1] [2]", "not JSON"),
        ('\ufeff{}', "not JSON"),
        (b'"unterminated [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[', "not JSON"),
    ],
)
def test_rejects_hostile_json(data, reason):
    with pytest.raises(UntrustedJSONError, match=reason) as err:
        loads(data)
    assert isinstance(err.value, RemoteProtocolError)
    assert err.value.status_hint is None
    assert not isinstance(err.value, JSONTooLargeError)


def test_depth_limit_is_inclusive():
    assert loads(b"[[[]]]", max_depth=3) == [[[]]]
    with pytest.raises(UntrustedJSONError, match="deeper than 2"):
        loads(b"[[[]]]", max_depth=2)
    assert loads(b"1", max_depth=0) == 1


@pytest.mark.parametrize("data", [b"[1, 2, 3]", "[1, 2, 3]", "\"\u00e9\u00e9\u00e9\u00e9\""])
def test_size_limit_counts_utf8_bytes(data):
    size = len(data if isinstance(data, bytes) else data.encode())
    assert loads(data, max_bytes=size) is not None
    with pytest.raises(JSONTooLargeError, match=f"over {size - 1}"):
        loads(data, max_bytes=size - 1)


def test_an_unterminated_string_full_of_escapes_is_scanned_once():
    # Quadratic rescanning of '"\"\"\"...' would take minutes at this size.
    data = b'"' + b'\\"' * 100_000
    with pytest.raises(UntrustedJSONError, match="not JSON"):
        loads(data, max_bytes=len(data))
