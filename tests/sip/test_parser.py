"""Tests of voxgate.sip.parser (RFC 3261 §7, §18.3)."""

from __future__ import annotations

import time

import pytest

from voxgate.errors import RemoteProtocolError
from voxgate.sip.message import Request, Response
from voxgate.sip.parser import (
    MAX_HEADER_FIELDS,
    MAX_HEADER_LINE_BYTES,
    BadMessage,
    parse_message_untrusted,
)

SDP = (
    b"v=0\r\no=alice 2890844526 2890844526 IN IP4 192.0.2.101\r\ns=-\r\n"
    b"c=IN IP4 192.0.2.101\r\nt=0 0\r\nm=audio 49172 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n"
)
INVITE_HEAD = (
    "INVITE sip:bob@biloxi.example.com SIP/2.0\r\n"
    "Via: SIP/2.0/UDP client.atlanta.example.com:5060;branch=z9hG4bK74bf9;rport\r\n"
    "Max-Forwards: 70\r\n"
    "f: Alice <sip:alice@atlanta.example.com>;tag=9fxced76sl\r\n"
    "To: Bob <sip:bob@biloxi.example.com>\r\n"
    "i: 3848276298220188511@atlanta.example.com\r\n"
    "CSeq: 2 INVITE\r\n"
    "Contact: <sip:alice@client.atlanta.example.com;transport=udp>\r\n"
    "Allow: INVITE, ACK, CANCEL, OPTIONS, BYE\r\n"
    "Date: Sat, 13 Nov 2010 23:29:00 GMT\r\n"
    'Authorization: Digest username="alice", realm="atlanta.example.com"\r\n'
    "c: application/sdp\r\n"
)
INVITE = (INVITE_HEAD + f"l: {len(SDP)}\r\n\r\n").encode() + SDP


def build(
    *headers: str, start: str = "OPTIONS sip:bob@example.com SIP/2.0", body: bytes = b""
) -> bytes:
    """A message from a start line and header lines, CRLF line ends."""
    return ("\r\n".join((start, *headers)) + "\r\n\r\n").encode() + body


BASE = (
    "Via: SIP/2.0/UDP 192.0.2.1;branch=z9hG4bKabc",
    "From: <sip:alice@example.com>;tag=1",
    "To: <sip:bob@example.com>",
    "Call-ID: abc@192.0.2.1",
    "CSeq: 1 OPTIONS",
)


def rejected(data: bytes) -> BadMessage:
    with pytest.raises(BadMessage) as info:
        parse_message_untrusted(data)
    return info.value


# --- well-formed messages --------------------------------------------------------


def test_invite():
    request = parse_message_untrusted(INVITE)
    assert isinstance(request, Request)
    assert (request.method, request.uri, request.version) == (
        "INVITE",
        "sip:bob@biloxi.example.com",
        "SIP/2.0",
    )
    assert request.body == SDP
    assert request.call_id == "3848276298220188511@atlanta.example.com"
    # Compact forms are expanded, list headers split, the others kept whole.
    assert request.headers.get("From") == "Alice <sip:alice@atlanta.example.com>;tag=9fxced76sl"
    assert request.headers.get("Content-Type") == "application/sdp"
    assert request.headers.get_all("Allow") == ["INVITE", "ACK", "CANCEL", "OPTIONS", "BYE"]
    assert request.headers.get("Date") == "Sat, 13 Nov 2010 23:29:00 GMT"
    assert request.headers.get_all("Authorization") == [
        'Digest username="alice", realm="atlanta.example.com"'
    ]
    assert [name for name, _ in request.headers][:3] == ["Via", "Max-Forwards", "From"]


def test_serialize_parse_round_trip():
    request = parse_message_untrusted(INVITE)
    assert isinstance(request, Request)
    again = parse_message_untrusted(request.serialize())
    assert isinstance(again, Request)
    assert list(again.headers) == list(request.headers)
    assert again.body == request.body


def test_bare_lf_line_ends():
    head, _, body = INVITE.partition(b"\r\n\r\n")
    request = parse_message_untrusted(head.replace(b"\r\n", b"\n") + b"\n\n" + body)
    assert isinstance(request, Request)
    assert request.body == SDP
    assert request.headers.get("CSeq") == "2 INVITE"


def test_leading_crlf_skipped():
    assert isinstance(parse_message_untrusted(b"\r\n\r\n" + build(*BASE)), Request)


@pytest.mark.parametrize("data", [b"", b"\r\n\r\n", b"\n", b"   \r\n", b"\r\n \t "])
def test_keep_alives_are_dropped(data):
    error = rejected(data)
    assert error.status_hint is None
    assert error.partial is None


def test_line_folding():
    request = parse_message_untrusted(
        build(*BASE, "Subject: first\r\n  second\r\n\tthird", "Contact:\r\n <sip:a@example.com>")
    )
    assert isinstance(request, Request)
    assert request.headers.get("Subject") == "first second third"
    assert request.headers.get("Contact") == "<sip:a@example.com>"


def test_header_names_are_case_insensitive():
    request = parse_message_untrusted(
        build(*BASE, "cOnTaCt  : <sip:a@example.com>", "V: SIP/2.0/TCP h2")
    )
    assert isinstance(request, Request)
    assert request.headers.get_all("contact") == ["<sip:a@example.com>"]
    assert request.headers.get_all("Via") == [
        "SIP/2.0/UDP 192.0.2.1;branch=z9hG4bKabc",
        "SIP/2.0/TCP h2",
    ]


def test_list_values_split_but_unknown_headers_kept_whole():
    request = parse_message_untrusted(
        build(*BASE, 'Contact: "A, B" <sip:a@example.com>, <sip:b@example.com>', "X-Odd: ;;,,;;,;")
    )
    assert isinstance(request, Request)
    assert request.headers.get_all("Contact") == [
        '"A, B" <sip:a@example.com>',
        "<sip:b@example.com>",
    ]
    assert request.headers.get("X-Odd") == ";;,,;;,;"


def test_empty_list_header_is_kept():
    request = parse_message_untrusted(build(*BASE, "Supported:", "Accept:"))
    assert isinstance(request, Request)
    assert request.headers.get_all("Supported") == [""]
    assert request.headers.get_all("Accept") == [""]


def test_non_utf8_bytes_survive():
    data = build(*BASE, "Subject: caf\xe9").replace(b"caf\xc3\xa9", b"caf\xe9\xff")
    request = parse_message_untrusted(data)
    assert isinstance(request, Request)
    assert b"Subject: caf\xe9\xff\r\n" in request.serialize()


def test_method_is_any_token_and_case_sensitive():
    base = [h for h in BASE if not h.startswith("CSeq")]
    request = parse_message_untrusted(
        build(*base, "CSeq: 5 invite", start="invite sip:bob@example.com SIP/2.0")
    )
    assert isinstance(request, Request)
    assert request.method == "invite"


def test_lower_case_version_is_accepted():
    request = parse_message_untrusted(build(*BASE, start="OPTIONS sip:bob@example.com sip/2.0"))
    assert isinstance(request, Request)
    assert request.version == "SIP/2.0"


def test_other_uri_schemes_parse():
    request = parse_message_untrusted(build(*BASE, start="OPTIONS tel:+15551234 SIP/2.0"))
    assert isinstance(request, Request)
    assert request.uri == "tel:+15551234"


# --- bodies ----------------------------------------------------------------------


def test_trailing_octets_after_content_length_ignored():
    request = parse_message_untrusted(build(*BASE, "Content-Length: 5", body=b"hello, world"))
    assert isinstance(request, Request)
    assert request.body == b"hello"


def test_no_content_length_takes_the_rest():
    request = parse_message_untrusted(build(*BASE, body=b"rest of datagram"))
    assert isinstance(request, Request)
    assert request.body == b"rest of datagram"


def test_no_empty_line_means_no_body():
    request = parse_message_untrusted(build(*BASE).rstrip(b"\r\n"))
    assert isinstance(request, Request)
    assert request.body == b""


@pytest.mark.parametrize(
    ("header", "body"),
    [
        ("Content-Length: 10", b"short"),
        ("Content-Length: -1", b""),
        ("Content-Length: ten", b""),
        ("Content-Length: 99999999999999999999999", b""),
        ("Content-Length: 0\r\nl: 0", b""),
    ],
)
def test_bad_content_length(header, body):
    error = rejected(build(*BASE, header, body=body))
    assert error.status_hint == 400
    assert error.partial is not None


# --- rejected requests -----------------------------------------------------------------


def test_partial_request_carries_the_headers_to_answer_with():
    error = rejected(build(*BASE, "Max-Forwards: 256"))
    assert error.status_hint == 400
    assert "Max-Forwards" in error.reason
    partial = error.partial
    assert partial is not None
    assert (partial.method, partial.uri) == ("OPTIONS", "sip:bob@example.com")
    for name in ("Via", "From", "To", "Call-ID", "CSeq"):
        assert partial.headers.get(name) is not None
    assert partial.body == b""


def test_version_505():
    error = rejected(build(*BASE, start="OPTIONS sip:bob@example.com SIP/3.0"))
    assert error.status_hint == 505
    assert error.partial is not None
    assert error.partial.version == "SIP/3.0"


@pytest.mark.parametrize(
    "start",
    [
        "OPTIONS <sip:bob@example.com> SIP/2.0",
        "OPTIONS sip:bob@example.com; lr SIP/2.0",
        "OPTIONS  sip:bob@example.com SIP/2.0",
        "OPTIONS sip:bob@example.com SIP/2.0 ",
        'OPT"IONS sip:bob@example.com SIP/2.0',
        "OPTIONS sip:bob@example.com?Route=%3Csip:x%3E SIP/2.0",
        "OPTIONS sip:bob@@example.com SIP/2.0",
    ],
)
def test_bad_request_lines_get_400_with_partial(start):
    error = rejected(build(*BASE, start=start))
    assert error.status_hint == 400
    assert error.partial is not None
    assert error.partial.headers.get("Via") == "SIP/2.0/UDP 192.0.2.1;branch=z9hG4bKabc"


@pytest.mark.parametrize("start", ["GET / HTTP/1.1", "hello", "\x16\x03\x01 binary"])
def test_not_a_request_is_dropped(start):
    error = rejected(build(*BASE, start=start))
    assert error.status_hint is None
    assert error.partial is None


def test_missing_headers_are_named():
    error = rejected(build(BASE[0], BASE[4]))
    assert error.status_hint == 400
    assert error.reason == "missing required header(s): From, To, Call-ID"


def test_cseq_method_must_match():
    error = rejected(build(*BASE[:4], "CSeq: 1 INVITE"))
    assert error.status_hint == 400
    assert "CSeq" in error.reason


@pytest.mark.parametrize(
    "header",
    [
        "To: <sip:carol@example.com>",  # second To
        "Call-ID: other@192.0.2.1",
        "Date: Sat, 13 Nov 2010 23:29:00 GMT\r\nDate: Sat, 13 Nov 2010 23:29:01 GMT",
        "Expires: 4294967296",
        "Max-Forwards: x",
        "Via: SIP/2.0/UDP 192.0.2.1;branch=z9hG4bKa,",  # empty list element
        "Contact: sip:a@example.com;;",
        "Route: junk",
        "Require: not a token",
        "Call-ID: has space",
        "NoColonHere",
        "Bad Name: value",
    ],
)
def test_bad_headers_get_400(header):
    error = rejected(build(*BASE, header))
    assert error.status_hint == 400
    assert error.partial is not None


def test_folding_onto_the_start_line_is_refused():
    error = rejected(build(" ;lr", *BASE))
    assert error.status_hint == 400
    assert "malformed header line" in error.reason


def test_bare_cr_in_a_header_is_refused():
    error = rejected(build(*BASE, "Subject: a\rInjected: b"))
    assert error.status_hint == 400
    assert "CR" in error.reason


def test_contact_star():
    request = parse_message_untrusted(build(*BASE, "Contact: *"))
    assert isinstance(request, Request)
    assert request.headers.get("Contact") == "*"


# --- limits ------------------------------------------------------------------------


def test_too_many_header_fields():
    error = rejected(build(*BASE, *(f"X-H{i}: {i}" for i in range(MAX_HEADER_FIELDS))))
    assert error.status_hint == 400
    assert error.partial is not None
    assert error.partial.headers.get("Call-ID") == "abc@192.0.2.1"


def test_too_many_values_after_list_splitting():
    error = rejected(build(*BASE, "Allow: " + ", ".join(["INVITE"] * MAX_HEADER_FIELDS)))
    assert error.status_hint == 400
    assert "header values" in error.reason


def test_header_line_too_long_after_unfolding():
    folded = "Subject: " + "\r\n ".join(["x" * 1000] * 9)
    error = rejected(build(*BASE, folded))
    assert error.status_hint == 400
    assert "longer than" in error.reason
    long_utf8 = "Subject: " + "é" * (MAX_HEADER_LINE_BYTES // 2)  # few characters, many bytes
    assert "longer than" in rejected(build(*BASE, long_utf8)).reason


def test_message_too_large():
    data = build(*BASE, body=b"x" * 2000)
    error = pytest.raises(BadMessage, parse_message_untrusted, data, max_bytes=1000).value
    assert error.status_hint == 513
    assert error.partial is not None
    assert error.partial.headers.get("CSeq") == "1 OPTIONS"


def test_adversarial_lines_fail_fast():
    evil = [
        "From: " + "a " * 3000 + "<",
        "To: <sip:" + "a;" * 3000 + ">",
        "Via: SIP/2.0/UDP h" + " ;a=b" * 1500 + ";",
        "Contact: " + '"' * 7000,
        "Contact: " + "<sip:a@b>," * 700,
        "Subject: " + " " * 8000 + "x",
    ]
    for header in evil:
        start = time.perf_counter()
        with pytest.raises(BadMessage):
            parse_message_untrusted(build(*BASE[:2], *BASE[3:], header))
        assert time.perf_counter() - start < 0.25, header[:20]


# --- responses -------------------------------------------------------------------------


def test_response():
    head = ["SIP/2.0 180 Ringing", *BASE[:4], "CSeq: 1 INVITE", "Content-Length: 0"]
    response = parse_message_untrusted(("\r\n".join(head) + "\r\n\r\n").encode())
    assert isinstance(response, Response)
    assert (response.status, response.reason, response.body) == (180, "Ringing", b"")


@pytest.mark.parametrize("status_line", ["SIP/2.0 100 ", "SIP/2.0 100"])
def test_response_with_empty_reason(status_line):
    response = parse_message_untrusted(build(*BASE, start=status_line))
    assert isinstance(response, Response)
    assert response.reason == ""


@pytest.mark.parametrize(
    ("status_line", "extra"),
    [
        ("SIP/2.0 4294967301 big", ()),
        ("SIP/2.0 099 Low", ()),
        ("SIP/2.0 700 High", ()),
        ("SIP/3.0 200 OK", ()),
        ("SIP/2.0 OK", ()),
        ("SIP/2.0 200 OK", ("Content-Length: 5",)),
        ("SIP/2.0 200 OK", ("CSeq: 1 OPTIONS",)),
    ],
)
def test_bad_responses_are_dropped(status_line, extra):
    error = rejected(build(*BASE, *extra, start=status_line))
    assert error.status_hint is None
    assert error.partial is None


def test_bad_message_is_a_remote_protocol_error():
    error = rejected(b"\r\n")
    assert isinstance(error, RemoteProtocolError)
