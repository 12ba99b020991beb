"""StreamFramer: SIP messages cut from a TCP/TLS byte stream (RFC 3261 §18.3, RFC 5626 §4.4.1)."""

from __future__ import annotations

import pytest

from voxgate.sip.framing import FramingError, StreamFramer

HEAD = (b"OPTIONS sip:echo@127.0.0.1 SIP/2.0\r\n"
        b"Via: SIP/2.0/TCP 127.0.0.1:5070;branch=z9hG4bK1\r\n"
        b"Call-ID: c1\r\nCSeq: 1 OPTIONS\r\n")


def message(body: bytes = b"", length: int | None = None, name: bytes = b"Content-Length") -> bytes:
    size = len(body) if length is None else length
    return HEAD + name + b": " + str(size).encode() + b"\r\n\r\n" + body


def drain(framer: StreamFramer) -> list[bytes]:
    out = []
    while (m := framer.next_message()) is not None:
        out.append(m)
    return out


def test_messages_split_at_content_length_whatever_the_chunks() -> None:
    stream = message(b"v=0\r\n") + message() + message(b"x" * 10, name=b"l")
    for size in (1, 7, len(stream)):
        framer = StreamFramer(65_535)
        got: list[bytes] = []
        for i in range(0, len(stream), size):
            framer.receive_data(stream[i:i + size])
            got += drain(framer)
        assert got == [message(b"v=0\r\n"), message(), message(b"x" * 10, name=b"l")]
        assert not framer.partial


def test_partial_message_is_reported_until_complete() -> None:
    framer = StreamFramer(65_535)
    framer.receive_data(message(b"abcd")[:-2])
    assert framer.next_message() is None
    assert framer.partial
    framer.receive_data(b"cd")
    assert framer.next_message() == message(b"abcd")
    assert not framer.partial


def test_crlf_keepalives_are_skipped_and_pings_counted() -> None:
    framer = StreamFramer(65_535)
    framer.receive_data(b"\r\n\r\n\r\n\r\n" + b"\r\n" + message())
    assert drain(framer) == [message()]
    assert framer.pongs_due == 2


@pytest.mark.parametrize(("data", "status", "has_head"), [
    (HEAD + b"\r\n", 400, True),
    (HEAD + b"Content-Length: 1\r\nContent-Length: 2\r\n\r\n", 400, True),
    (HEAD + b"Content-Length: -3\r\n\r\n", 400, True),
    (HEAD + b"Content-Length: 99999999999999999999\r\n\r\n", 400, True),
    (HEAD + b"Content-Length: 70000\r\n\r\n", 413, True),
    (HEAD + b"X-Endless: " + b"a" * 70_000, 400, False),
], ids=["missing", "conflicting", "negative", "overlong", "huge", "endless-headers"])
def test_framing_errors_carry_the_answer_and_stick(data: bytes, status: int,
                                                    has_head: bool) -> None:
    framer = StreamFramer(65_535)
    framer.receive_data(data)
    with pytest.raises(FramingError) as caught:
        framer.next_message()
    assert caught.value.status_hint == status
    assert bool(caught.value.head) is has_head
    if has_head:
        assert caught.value.head.startswith(b"OPTIONS ")
    framer.receive_data(message())
    with pytest.raises(FramingError):  # the stream cannot be resynchronised
        framer.next_message()
    assert not framer.partial


def test_a_message_exactly_at_the_bound_passes() -> None:
    whole = message(b"y" * 100)
    framer = StreamFramer(len(whole))
    framer.receive_data(whole)
    assert framer.next_message() == whole
    framer = StreamFramer(len(whole) - 1)
    framer.receive_data(whole)
    with pytest.raises(FramingError):
        framer.next_message()
