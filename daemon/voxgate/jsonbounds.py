"""Bounded JSON decoding of a peer's bytes (RFC 8259); sans-IO.

``json.loads`` on hostile input fails in more ways than ``JSONDecodeError``:
deep nesting raises ``RecursionError``, an integer longer than
``sys.get_int_max_str_digits()`` raises a plain ``ValueError``,
``NaN``/``Infinity`` are accepted although RFC 8259 §6 has no such
numbers, ``1e400`` silently becomes ``inf`` (which ``json.dumps(...,
allow_nan=False)`` then refuses to echo), and an unpaired surrogate escape
(``"\\ud800"``) makes a ``str`` that cannot be encoded back to UTF-8 (RFC 8259
§8.2). :func:`loads_untrusted` turns each of these into one
:class:`UntrustedJSONError`, checking size and nesting before any parsing.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any, Final

from voxgate.errors import RemoteProtocolError

MAX_INTEGER_DIGITS: Final = 40
"""Longest integer literal accepted, sign excluded: every 128-bit value fits, and
the conversion stays far below Python's int-string limit (4300 digits)."""

# Outside strings, the characters the depth scan cares about.
_STRUCTURAL = re.compile(r'["\[\]{}]')
# The rest of a string after its opening quote, closing quote included (RFC 8259 §7).
# Possessive, so an unterminated string is scanned once, never backtracked over.
_STRING_REST = re.compile(r'(?:[^"\\]++|\\.)*+"', re.DOTALL)
# A \uD800-\uDFFF escape: decoded strings may then hold an unpaired surrogate.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


class UntrustedJSONError(RemoteProtocolError):
    """A peer's JSON was too large, too deep or malformed; ``reason`` says which.

    Never a SIP answer, so ``status_hint`` is ``None``.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason, status_hint=None)


class JSONTooLargeError(UntrustedJSONError):
    """The input was over ``max_bytes`` (for callers that answer size apart, e.g.
    WebSocket close code 1009)."""


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _bounded_int(literal: str) -> int:
    if len(literal.lstrip("-")) > MAX_INTEGER_DIGITS:
        raise ValueError(f"integer of more than {MAX_INTEGER_DIGITS} digits")
    return int(literal)


def _finite_float(literal: str) -> float:
    value = float(literal)
    if not math.isfinite(value):
        raise ValueError(f"number {literal[:24]} out of range")
    return value


_DECODER: Final = json.JSONDecoder(parse_constant=_reject_constant, parse_int=_bounded_int,
                                  parse_float=_finite_float)


def _nests_deeper(text: str, max_depth: int) -> bool:
    """Whether arrays/objects in ``text`` nest deeper than ``max_depth``: one linear
    pass over the brackets outside strings, no recursion; the text need not be
    valid JSON (an unterminated string ends the scan)."""
    depth = 0
    pos = 0
    while (match := _STRUCTURAL.search(text, pos)) is not None:
        char = match.group()
        if char == '"':
            rest = _STRING_REST.match(text, match.end())
            if rest is None:
                return False
            pos = rest.end()
            continue
        pos = match.end()
        if char in "[{":
            depth += 1
            if depth > max_depth:
                return True
        else:
            depth -= 1
    return False


def loads_untrusted(data: bytes | str, *, max_bytes: int, max_depth: int) -> Any:
    """Decode one JSON value from a peer, within bounds.

    Args:
        data: UTF-8 bytes, or text (measured by its UTF-8 length).
        max_bytes: largest input accepted, in UTF-8 bytes.
        max_depth: most arrays/objects nested in one another (``[]`` is 1 deep,
            a scalar 0).

    Returns:
        The value as ``json.loads`` builds it; integers have at most
        :data:`MAX_INTEGER_DIGITS` digits, floats are finite, strings encode
        to UTF-8.

    Raises:
        JSONTooLargeError: over ``max_bytes``.
        UntrustedJSONError: invalid UTF-8 (unpaired surrogates included),
            invalid JSON (RFC 8259), nesting over ``max_depth``, an integer
            over :data:`MAX_INTEGER_DIGITS` digits, ``NaN``/``Infinity`` or a
            number that overflows a double.
    """
    try:
        if isinstance(data, bytes):
            size = len(data)
            text = data.decode("utf-8") if size <= max_bytes else ""
        else:
            text = data
            size = len(data) if len(data) > max_bytes else len(data.encode("utf-8"))
    except (UnicodeDecodeError, UnicodeEncodeError) as e:
        raise UntrustedJSONError(f"not UTF-8: {e.reason} at offset {e.start}") from None
    if size > max_bytes:
        raise JSONTooLargeError(f"JSON of {size} bytes, over {max_bytes}")
    # No more brackets than max_depth cannot nest deeper: the scan is for the rest.
    if text.count("{") + text.count("[") > max_depth and _nests_deeper(text, max_depth):
        raise UntrustedJSONError(f"JSON nested deeper than {max_depth}")
    try:
        value = _DECODER.decode(text)
        if "\\" in text and _SURROGATE_ESCAPE.search(text):
            json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeError:
        raise UntrustedJSONError("JSON string with an unpaired surrogate") from None
    except (ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError
        raise UntrustedJSONError(f"not JSON: {e}") from None
    return value
