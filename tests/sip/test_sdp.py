"""Tests for voxgate.sip.sdp: parsing, negotiation and answers (RFC 4566, RFC 3264)."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest

from voxgate.errors import LocalProtocolError, RemoteProtocolError
from voxgate.sip.sdes import Crypto
from voxgate.sip.sdp import (
    SUPPORTED_CODECS,
    Codec,
    MediaDescription,
    Negotiated,
    NotAcceptable,
    Origin,
    RtpMap,
    SessionDescription,
    build_answer,
    negotiate,
    parse_sdp_untrusted,
)


def sdp(*lines: str, eol: str = "\r\n") -> bytes:
    return (eol.join(lines) + eol).encode()


SIPP_OFFER = sdp(
    "v=0",
    "o=user1 53655765 2353687637 IN IP4 127.0.0.1",
    "s=-",
    "c=IN IP4 127.0.0.1",
    "t=0 0",
    "m=audio 6000 RTP/AVP 0",
    "a=rtpmap:0 PCMU/8000",
)

BARESIP_OFFER = sdp(
    "v=0",
    "o=- 1406397853 2216063478 IN IP4 192.168.1.10",
    "s=-",
    "c=IN IP4 192.168.1.10",
    "t=0 0",
    "m=audio 10000 RTP/AVP 96 97 9 0 8 101",
    "b=TIAS:64000",
    "a=rtpmap:96 opus/48000/2",
    "a=fmtp:96 stereo=1;sprop-stereo=1",
    "a=rtpmap:97 G7221/16000",
    "a=fmtp:97 bitrate=32000",
    "a=rtpmap:9 G722/8000",
    "a=rtpmap:0 PCMU/8000",
    "a=rtpmap:8 PCMA/8000",
    "a=rtpmap:101 telephone-event/8000",
    "a=fmtp:101 0-15",
    "a=rtcp-mux",
    "a=sendrecv",
    "a=label:1",
    "a=ssrc:1234567 cname:abc@def",
)

ASTERISK_OFFER = sdp(
    "v=0",
    "o=- 1234 1234 IN IP4 10.0.0.1",
    "s=Asterisk",
    "c=IN IP4 10.0.0.1",
    "t=0 0",
    "m=audio 17000 RTP/AVP 8 0 3 101",
    "a=rtpmap:8 PCMA/8000",
    "a=rtpmap:0 PCMU/8000",
    "a=rtpmap:3 GSM/8000",
    "a=rtpmap:101 telephone-event/8000",
    "a=fmtp:101 0-16",
    "a=ptime:20",
    "a=maxptime:150",
    "a=sendrecv",
)

FREESWITCH_OFFER = sdp(
    "v=0",
    "o=FreeSWITCH 1686000000 1686000001 IN IP4 10.0.0.2",
    "s=FreeSWITCH",
    "c=IN IP4 10.0.0.2",
    "t=0 0",
    "m=audio 20000 RTP/AVP 0 8 102 13 118",
    "a=rtpmap:0 PCMU/8000",
    "a=rtpmap:8 PCMA/8000",
    "a=rtpmap:102 telephone-event/48000",
    "a=rtpmap:13 CN/8000",
    "a=rtpmap:118 telephone-event/8000",
    "a=fmtp:118 0-16",
    "a=ptime:30",
    "a=sendrecv",
    "a=rtcp:20001 IN IP4 10.0.0.2",
)


def offer_with(media_lines: tuple[str, ...], *, session: tuple[str, ...] = ()) -> bytes:
    return sdp(
        "v=0",
        "o=- 1 1 IN IP4 198.51.100.7",
        "s=-",
        *session,
        "t=0 0",
        *media_lines,
    )


def answer_lines(
    offer: SessionDescription,
    negotiated: Negotiated,
    *,
    local_address: str = "203.0.113.5",
    local_port: int = 40000,
    session_id: int = 77,
    session_version: int = 1,
    local_crypto: Crypto | None = None,
) -> list[str]:
    body = build_answer(
        offer,
        negotiated,
        local_address=local_address,
        local_port=local_port,
        session_id=session_id,
        session_version=session_version,
        local_crypto=local_crypto,
    )
    assert body.endswith(b"\r\n")
    assert b"\n" not in body.replace(b"\r\n", b"")
    return body.decode("ascii").split("\r\n")[:-1]


# --- parsing ---------------------------------------------------------------


def test_parse_sipp_offer() -> None:
    offer = parse_sdp_untrusted(SIPP_OFFER)
    assert offer.origin == Origin("user1", "53655765", "2353687637", "IN", "IP4", "127.0.0.1")
    assert offer.session_name == "-"
    assert offer.connection == "127.0.0.1"
    assert offer.attributes == ()
    assert offer.media == (
        MediaDescription(
            media="audio",
            port=6000,
            proto="RTP/AVP",
            formats=("0",),
            connection=None,
            attributes=(("rtpmap", "0 PCMU/8000"),),
        ),
    )


def test_parse_keeps_attributes_in_order_with_property_attributes() -> None:
    media = parse_sdp_untrusted(BARESIP_OFFER).media[0]
    assert media.attributes[-4:] == (
        ("rtcp-mux", None),
        ("sendrecv", None),
        ("label", "1"),
        ("ssrc", "1234567 cname:abc@def"),
    )
    assert media.attribute("fmtp") == "96 stereo=1;sprop-stereo=1"
    assert media.attribute("rtcp-mux") is None
    assert media.attribute("missing") is None


def test_rtpmap_lookups() -> None:
    media = parse_sdp_untrusted(BARESIP_OFFER).media[0]
    assert media.rtpmap(96) == RtpMap("opus", 48000, 2)
    assert media.rtpmap(0) == RtpMap("PCMU", 8000)
    assert media.rtpmap(101) == RtpMap("telephone-event", 8000)
    assert media.rtpmap(100) is None


def test_static_payload_types_without_rtpmap() -> None:
    offer = parse_sdp_untrusted(
        offer_with(("m=audio 5004 RTP/AVP 18 8 0 96",), session=("c=IN IP4 192.0.2.1",))
    )
    media = offer.media[0]
    assert media.rtpmap(0) == RtpMap("PCMU", 8000)
    assert media.rtpmap(8) == RtpMap("PCMA", 8000)
    assert media.rtpmap(18) == RtpMap("G729", 8000)
    assert media.rtpmap(96) is None  # dynamic types need a=rtpmap


def test_explicit_rtpmap_overrides_static_assignment_and_malformed_is_skipped() -> None:
    offer = parse_sdp_untrusted(
        offer_with(
            (
                "m=audio 5004 RTP/AVP 0 8",
                "a=rtpmap:0 garbage",
                "a=rtpmap:8 L16/16000",
            ),
            session=("c=IN IP4 192.0.2.1",),
        )
    )
    media = offer.media[0]
    assert media.rtpmap(0) == RtpMap("PCMU", 8000)
    assert media.rtpmap(8) == RtpMap("L16", 16000)


def test_ptime() -> None:
    assert parse_sdp_untrusted(ASTERISK_OFFER).media[0].ptime_ms == 20
    assert parse_sdp_untrusted(FREESWITCH_OFFER).media[0].ptime_ms == 30
    assert parse_sdp_untrusted(SIPP_OFFER).media[0].ptime_ms is None
    odd = offer_with(
        ("m=audio 5004 RTP/AVP 0", "a=ptime:20.0", "m=audio 5006 RTP/AVP 0", "a=ptime:abc"),
        session=("c=IN IP4 192.0.2.1",),
    )
    first, second = parse_sdp_untrusted(odd).media
    assert (first.ptime_ms, second.ptime_ms) == (20, None)


def test_direction_media_level_over_session_level() -> None:
    offer = parse_sdp_untrusted(
        offer_with(
            ("m=audio 5004 RTP/AVP 0", "m=audio 5006 RTP/AVP 0", "a=inactive"),
            session=("c=IN IP4 192.0.2.1", "a=sendonly"),
        )
    )
    assert offer.direction == "sendonly"
    plain, inactive = offer.media
    assert plain.direction(offer.direction) == "sendonly"
    assert plain.direction() == "sendrecv"
    assert inactive.direction(offer.direction) == "inactive"


def test_lf_line_ends_and_blank_lines_are_tolerated() -> None:
    crlf = parse_sdp_untrusted(ASTERISK_OFFER)
    lf = parse_sdp_untrusted(ASTERISK_OFFER.replace(b"\r\n", b"\n") + b"\n\n")
    assert lf == crlf


def test_unknown_and_ignored_lines() -> None:
    offer = parse_sdp_untrusted(
        offer_with(
            (
                "m=audio 5004 RTP/AVP 0",
                "i=audio stream",
                "b=AS:64",
                "k=prompt",
                "y=1234",
                "x=whatever",
            ),
            session=(
                "i=a call",
                "u=http://example.com/",
                "e=someone@example.com",
                "p=+1 555 0100",
                "c=IN IP4 192.0.2.1",
                "b=CT:128",
                "z=2882844526 -1h",
                "r=7d 1h 0 25h",
            ),
        )
    )
    assert offer.media[0].attributes == ()
    assert offer.connection == "192.0.2.1"


def test_non_utf8_session_name_is_tolerated() -> None:
    body = SIPP_OFFER.replace(b"s=-", b"s=caf\xe9")
    assert parse_sdp_untrusted(body).session_name == "caf\ufffd"


def test_connection_with_ttl_and_number_of_ports() -> None:
    offer = parse_sdp_untrusted(
        offer_with(("m=audio 5004/2 RTP/AVP 0", "c=IN IP4 233.252.0.1/127"))
    )
    assert offer.media[0].port == 5004
    assert offer.media[0].connection == "233.252.0.1"


def test_first_connection_per_level_counts() -> None:
    offer = parse_sdp_untrusted(
        offer_with(
            ("m=audio 5004 RTP/AVP 0", "c=IN IP4 192.0.2.10", "c=IN IP4 192.0.2.11"),
            session=("c=IN IP4 192.0.2.1", "c=IN IP4 192.0.2.2"),
        )
    )
    assert offer.connection == "192.0.2.1"
    assert offer.media[0].connection == "192.0.2.10"


def test_ipv6_connection() -> None:
    offer = parse_sdp_untrusted(offer_with(("m=audio 5004 RTP/AVP 0", "c=IN IP6 2001:DB8:0:0::1")))
    assert offer.media[0].connection == "2001:db8::1"


def test_non_rtp_formats_are_tokens() -> None:
    offer = parse_sdp_untrusted(
        offer_with(
            ("m=application 5008 UDP/BFCP *", "m=image 0 udptl t38"),
            session=("c=IN IP4 192.0.2.1",),
        )
    )
    assert [m.formats for m in offer.media] == [("*",), ("t38",)]


def test_port_zero_needs_no_connection() -> None:
    offer = parse_sdp_untrusted(offer_with(("m=audio 0 RTP/AVP 0",)))
    assert offer.media[0].port == 0
    assert offer.connection is None


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"", "v=0"),
        (b"\r\n\r\n", "v=0"),
        (b"v=1\r\no=- 1 1 IN IP4 1.2.3.4\r\n", "v=0"),
        (b"o=- 1 1 IN IP4 1.2.3.4\r\nv=0\r\n", "v=0"),
        (b"\x00\x01\x02binary", "v=0"),
        (b"v=0\r\ns=-\r\nt=0 0\r\n", "no o="),
        (b"v=0\r\no=- 1 IN IP4 1.2.3.4\r\n", "o= needs 6"),
        (b"v=0\r\no=- 1 1 IN IP4 a\r\no=- 2 2 IN IP4 a\r\n", "o= must come once"),
        (b"v=0\r\no=- 1 1 IN IP4 a\r\nv=0\r\n", "repeated v="),
        (b"v=0\r\no=- 1 1 IN IP4 a\r\nhello\r\n", "line 3: not <type>=<value>"),
        (b"v=0\r\no=- 1 1 IN IP4 a\r\nA=b\r\n", "not <type>=<value>"),
        (b"v=0\r\no=- 1 1 IN IP4 a\r\n a=b\r\n", "not <type>=<value>"),
        (b"v=0\r\no=- 1 1 IN IP4 a\r\nc=IN IP4\r\n", "c= must be"),
        (b"v=0\r\no=- 1 1 IN IP4 a\r\nc=ATM NSAP 1234\r\n", "c= must be"),
        (b"v=0\r\no=- 1 1 IN IP4 a\r\nc=IN IP4 pbx.example.com\r\n", "not an IP literal"),
        (b"v=0\r\no=- 1 1 IN IP4 a\r\nc=IN IP4 ::1\r\n", "not IP4"),
        (b"v=0\r\no=- 1 1 IN IP4 a\r\nc=IN IP6 10.0.0.1\r\n", "not IP6"),
        (b"v=0\r\no=- 1 1 IN IP4 a\r\nc=IN IP4 256.1.1.1\r\n", "not an IP literal"),
        (b"v=0\r\no=- 1 1 IN IP4 a\r\nc=IN IP4 1.2.3.4\r\nm=audio 5004 RTP/AVP\r\n", "m= needs"),
        (b"v=0\r\no=- 1 1 IN IP4 a\r\nc=IN IP4 1.2.3.4\r\nm=audio 70000 RTP/AVP 0\r\n", "bad m="),
        (b"v=0\r\no=- 1 1 IN IP4 a\r\nc=IN IP4 1.2.3.4\r\nm=audio -1 RTP/AVP 0\r\n", "bad m="),
        (b"v=0\r\no=- 1 1 IN IP4 a\r\nc=IN IP4 1.2.3.4\r\nm=audio 5004 RTP//AVP 0\r\n", "bad m="),
        (b"v=0\r\no=- 1 1 IN IP4 a\r\nc=IN IP4 1.2.3.4\r\nm=audio 5004 RTP/AVP 128\r\n", "0-127"),
        (b"v=0\r\no=- 1 1 IN IP4 a\r\nc=IN IP4 1.2.3.4\r\nm=audio 5004 RTP/AVP PCMU\r\n", "0-127"),
        (b"v=0\r\no=- 1 1 IN IP4 a\r\nm=audio 5004 RTP/AVP 0\r\n", "has no c="),
        (b"v=0\r\no=- 1 1 IN IP4 a\r\na=:value\r\n", "bad attribute name"),
        (b"v=0\r\no=- 1 1 IN IP4 a\r\nm=audio 0 RTP/AVP 0\r\no=- 1 1 IN IP4 a\r\n", "o= must"),
    ],
)
def test_malformed_sdp_is_a_400(body: bytes, reason: str) -> None:
    with pytest.raises(RemoteProtocolError, match=reason) as caught:
        parse_sdp_untrusted(body)
    assert caught.value.status_hint == 400


def test_body_size_is_bounded() -> None:
    padding = b"a=x-pad:" + b"x" * 200 + b"\r\n"
    body = SIPP_OFFER + padding * 40
    assert len(body) > 8192
    with pytest.raises(RemoteProtocolError, match="exceeds 8192") as caught:
        parse_sdp_untrusted(body)
    assert caught.value.status_hint == 400
    assert parse_sdp_untrusted(body, max_bytes=len(body)).media[0].port == 6000


def test_media_count_is_bounded() -> None:
    body = offer_with(("m=audio 0 RTP/AVP 0",) * 3)
    assert len(parse_sdp_untrusted(body, max_media=3).media) == 3
    with pytest.raises(RemoteProtocolError, match="more than 2 m= lines") as caught:
        parse_sdp_untrusted(body, max_media=2)
    assert caught.value.status_hint == 400


# --- negotiation -----------------------------------------------------------


def test_negotiate_sipp() -> None:
    negotiated = negotiate(parse_sdp_untrusted(SIPP_OFFER))
    assert negotiated == Negotiated(
        codec=SUPPORTED_CODECS["PCMU"],
        telephone_event_pt=None,
        remote_rtp=("127.0.0.1", 6000),
        direction="sendrecv",
        ptime_ms=20,
        media_index=0,
    )


def test_negotiate_baresip_skips_unsupported_codecs() -> None:
    negotiated = negotiate(parse_sdp_untrusted(BARESIP_OFFER))
    assert negotiated.codec == Codec("PCMU", 0, 8000)
    assert negotiated.telephone_event_pt == 101
    assert negotiated.remote_rtp == ("192.168.1.10", 10000)


def test_negotiate_keeps_the_offers_order_over_our_preference() -> None:
    offer = parse_sdp_untrusted(ASTERISK_OFFER)
    assert negotiate(offer).codec.name == "PCMA"
    assert negotiate(offer, preference=("PCMU", "PCMA")).codec.name == "PCMA"


def test_preference_filters_codecs() -> None:
    offer = parse_sdp_untrusted(ASTERISK_OFFER)
    assert negotiate(offer, preference=("pcmu",)).codec == SUPPORTED_CODECS["PCMU"]
    with pytest.raises(NotAcceptable):
        negotiate(parse_sdp_untrusted(SIPP_OFFER), preference=("PCMA",))


def test_preference_with_unsupported_codec_is_our_error() -> None:
    with pytest.raises(LocalProtocolError, match="G729"):
        negotiate(parse_sdp_untrusted(SIPP_OFFER), preference=("PCMU", "G729"))


def test_negotiate_freeswitch_picks_the_8000_hz_telephone_event() -> None:
    negotiated = negotiate(parse_sdp_untrusted(FREESWITCH_OFFER))
    assert negotiated.codec.name == "PCMU"
    assert negotiated.telephone_event_pt == 118
    assert negotiated.ptime_ms == 20  # we send 20 ms whatever the offer's ptime


def test_dynamic_payload_type_for_pcmu_is_reused() -> None:
    offer = parse_sdp_untrusted(
        offer_with(
            ("m=audio 5004 RTP/AVP 98", "a=rtpmap:98 pcmu/8000"),
            session=("c=IN IP4 192.0.2.1",),
        )
    )
    assert negotiate(offer).codec == Codec("PCMU", 98, 8000)


def test_wrong_clock_rate_or_channels_is_not_g711() -> None:
    offer = parse_sdp_untrusted(
        offer_with(
            (
                "m=audio 5004 RTP/AVP 96 97 8",
                "a=rtpmap:96 PCMU/16000",
                "a=rtpmap:97 PCMU/8000/2",
            ),
            session=("c=IN IP4 192.0.2.1",),
        )
    )
    assert negotiate(offer).codec == SUPPORTED_CODECS["PCMA"]


def test_media_level_connection_wins() -> None:
    offer = parse_sdp_untrusted(
        offer_with(
            ("m=audio 5004 RTP/AVP 0", "c=IN IP4 192.0.2.99"),
            session=("c=IN IP4 192.0.2.1",),
        )
    )
    assert negotiate(offer).remote_rtp == ("192.0.2.99", 5004)


def test_session_level_connection_is_used_without_media_level() -> None:
    offer = parse_sdp_untrusted(
        offer_with(("m=audio 5004 RTP/AVP 0",), session=("c=IN IP4 192.0.2.1",))
    )
    assert negotiate(offer).remote_rtp == ("192.0.2.1", 5004)


@pytest.mark.parametrize(
    ("attribute", "connection", "remote_rtp", "direction"),
    [
        ("a=sendrecv", "192.0.2.1", ("192.0.2.1", 5004), "sendrecv"),
        ("a=sendonly", "192.0.2.1", ("192.0.2.1", 5004), "recvonly"),
        ("a=recvonly", "192.0.2.1", ("192.0.2.1", 5004), "sendonly"),
        ("a=inactive", "192.0.2.1", ("192.0.2.1", 5004), "inactive"),
        # RFC 2543 hold (RFC 3264 §8.4): send nothing to 0.0.0.0.
        ("a=sendrecv", "0.0.0.0", None, "recvonly"),
        ("a=sendonly", "0.0.0.0", None, "recvonly"),
        ("a=recvonly", "0.0.0.0", None, "inactive"),
        ("a=inactive", "0.0.0.0", None, "inactive"),
    ],
)
def test_hold_variants(
    attribute: str, connection: str, remote_rtp: tuple[str, int] | None, direction: str
) -> None:
    offer = parse_sdp_untrusted(
        offer_with(("m=audio 5004 RTP/AVP 0", f"c=IN IP4 {connection}", attribute))
    )
    negotiated = negotiate(offer)
    assert negotiated.remote_rtp == remote_rtp
    assert negotiated.direction == direction
    assert f"a={direction}" in answer_lines(offer, negotiated)


def test_session_level_sendonly_is_hold() -> None:
    offer = parse_sdp_untrusted(
        offer_with(("m=audio 5004 RTP/AVP 0",), session=("c=IN IP4 192.0.2.1", "a=sendonly"))
    )
    assert negotiate(offer).direction == "recvonly"


def test_ipv6_unspecified_address_is_hold() -> None:
    offer = parse_sdp_untrusted(offer_with(("m=audio 5004 RTP/AVP 0", "c=IN IP6 ::")))
    assert negotiate(offer).remote_rtp is None


def test_ipv6_offer() -> None:
    offer = parse_sdp_untrusted(
        sdp(
            "v=0",
            "o=- 5 5 IN IP6 ::1",
            "s=-",
            "c=IN IP6 ::1",
            "t=0 0",
            "m=audio 5004 RTP/AVP 8 101",
            "a=rtpmap:101 telephone-event/8000",
        )
    )
    negotiated = negotiate(offer)
    assert negotiated.remote_rtp == ("::1", 5004)
    assert negotiated.codec.name == "PCMA"
    assert negotiated.telephone_event_pt == 101


@pytest.mark.parametrize(
    "media_lines",
    [
        ("m=audio 5004 RTP/AVP 18", "a=rtpmap:18 G729/8000"),
        ("m=audio 5004 RTP/AVP 111", "a=rtpmap:111 opus/48000/2"),
        ("m=audio 5004 RTP/AVP 96 101", "a=rtpmap:101 telephone-event/8000"),
        ("m=audio 5004 RTP/SAVP 0",),
        ("m=audio 0 RTP/AVP 0",),
        ("m=video 5006 RTP/AVP 0",),
        (),
    ],
)
def test_no_common_codec_is_a_488(media_lines: tuple[str, ...]) -> None:
    offer = parse_sdp_untrusted(offer_with(media_lines, session=("c=IN IP4 192.0.2.1",)))
    with pytest.raises(NotAcceptable) as caught:
        negotiate(offer)
    assert isinstance(caught.value, RemoteProtocolError)
    assert caught.value.status_hint == 488


MULTI_STREAM_OFFER = sdp(
    "v=0",
    "o=- 9 9 IN IP4 192.0.2.1",
    "s=-",
    "c=IN IP4 192.0.2.1",
    "t=0 0",
    "m=video 5010 RTP/AVP 96",
    "a=rtpmap:96 H264/90000",
    "m=audio 5000 RTP/AVP 18",
    "m=audio 5002 RTP/AVP 8 0 101",
    "a=rtpmap:101 telephone-event/8000",
    "m=audio 5004 RTP/AVP 0",
)


def test_multiple_streams_accept_the_first_usable_audio() -> None:
    negotiated = negotiate(parse_sdp_untrusted(MULTI_STREAM_OFFER))
    assert negotiated.media_index == 2
    assert negotiated.codec.name == "PCMA"
    assert negotiated.remote_rtp == ("192.0.2.1", 5002)


# --- answers ---------------------------------------------------------------


def test_answer_to_sipp() -> None:
    offer = parse_sdp_untrusted(SIPP_OFFER)
    assert answer_lines(offer, negotiate(offer)) == [
        "v=0",
        "o=- 77 1 IN IP4 203.0.113.5",
        "s=voxgate",
        "c=IN IP4 203.0.113.5",
        "t=0 0",
        "m=audio 40000 RTP/AVP 0",
        "a=rtpmap:0 PCMU/8000",
        "a=ptime:20",
        "a=sendrecv",
    ]


def test_answer_to_baresip_echoes_telephone_event() -> None:
    offer = parse_sdp_untrusted(BARESIP_OFFER)
    lines = answer_lines(offer, negotiate(offer))
    assert lines[5:] == [
        "m=audio 40000 RTP/AVP 0 101",
        "a=rtpmap:0 PCMU/8000",
        "a=rtpmap:101 telephone-event/8000",
        "a=fmtp:101 0-16",
        "a=ptime:20",
        "a=sendrecv",
    ]


def test_answer_reuses_a_dynamic_payload_type() -> None:
    offer = parse_sdp_untrusted(
        offer_with(
            ("m=audio 5004 RTP/AVP 98", "a=rtpmap:98 PCMA/8000"), session=("c=IN IP4 192.0.2.1",)
        )
    )
    lines = answer_lines(offer, negotiate(offer))
    assert "m=audio 40000 RTP/AVP 98" in lines
    assert "a=rtpmap:98 PCMA/8000" in lines


def test_answer_rejects_other_streams_with_port_zero_in_offer_order() -> None:
    offer = parse_sdp_untrusted(MULTI_STREAM_OFFER)
    lines = answer_lines(offer, negotiate(offer))
    media_lines = [line for line in lines if line.startswith("m=")]
    assert media_lines == [
        "m=video 0 RTP/AVP 96",
        "m=audio 0 RTP/AVP 18",
        "m=audio 40000 RTP/AVP 8 101",
        "m=audio 0 RTP/AVP 0",
    ]


def test_answer_is_parseable_and_negotiates_back() -> None:
    offer = parse_sdp_untrusted(MULTI_STREAM_OFFER)
    negotiated = negotiate(offer)
    answer = parse_sdp_untrusted(
        build_answer(
            offer,
            negotiated,
            local_address="203.0.113.5",
            local_port=40000,
            session_id=77,
            session_version=3,
        )
    )
    assert answer.origin == Origin("-", "77", "3", "IN", "IP4", "203.0.113.5")
    assert len(answer.media) == len(offer.media)
    again = negotiate(answer)
    assert again.media_index == negotiated.media_index
    assert again.codec == negotiated.codec
    assert again.remote_rtp == ("203.0.113.5", 40000)


def test_answer_session_version_is_the_callers() -> None:
    offer = parse_sdp_untrusted(SIPP_OFFER)
    negotiated = negotiate(offer)
    first = answer_lines(offer, negotiated, session_version=1)
    second = answer_lines(offer, negotiated, session_version=2)
    assert first[1] == "o=- 77 1 IN IP4 203.0.113.5"
    assert second[1] == "o=- 77 2 IN IP4 203.0.113.5"


def test_answer_over_ipv6() -> None:
    offer = parse_sdp_untrusted(offer_with(("m=audio 5004 RTP/AVP 0", "c=IN IP6 ::1")))
    lines = answer_lines(offer, negotiate(offer), local_address="2001:DB8::5")
    assert lines[1] == "o=- 77 1 IN IP6 2001:db8::5"
    assert lines[3] == "c=IN IP6 2001:db8::5"


@pytest.mark.parametrize(
    "overrides",
    [
        {"local_address": "voxgate.example.com"},
        {"local_port": 0},
        {"local_port": 65536},
        {"session_id": -1},
        {"session_version": -1},
    ],
)
def test_answer_rejects_bad_local_arguments(overrides: dict[str, Any]) -> None:
    offer = parse_sdp_untrusted(SIPP_OFFER)
    with pytest.raises(LocalProtocolError):
        answer_lines(offer, negotiate(offer), **overrides)


def test_answer_rejects_a_foreign_negotiation() -> None:
    negotiated = negotiate(parse_sdp_untrusted(MULTI_STREAM_OFFER))
    with pytest.raises(LocalProtocolError, match="no m= line 2"):
        answer_lines(parse_sdp_untrusted(SIPP_OFFER), negotiated)


def test_import_is_sans_io() -> None:
    code = (
        "import sys\n"
        "import voxgate.sip.sdp\n"
        "assert not {'trio', 'asyncio'} & set(sys.modules), 'I/O library imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# --- SRTP with SDES keys (RFC 3711 §12, RFC 4568) ----------------------------

PEER_KEY_B64 = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwd"  # bytes 0..29
PEER_KEY = bytes(range(30))
OUR_KEY = b"\xaa" * 30
SAVP_LINES = (
    "m=audio 5004 RTP/SAVP 0 101",
    "a=rtpmap:101 telephone-event/8000",
    f"a=crypto:1 AEAD_AES_256_GCM inline:{PEER_KEY_B64}",
    f"a=crypto:2 AES_CM_128_HMAC_SHA1_80 inline:{PEER_KEY_B64}|2^31",
    f"a=crypto:3 AES_CM_128_HMAC_SHA1_32 inline:{PEER_KEY_B64}",
    f"a=crypto:4 AES_CM_128_HMAC_SHA1_80 inline:{PEER_KEY_B64}",
)
AVP_LINES = ("m=audio 6000 RTP/AVP 8",)
SESSION = ("c=IN IP4 192.0.2.1",)
SRTP_OFFER = offer_with((*AVP_LINES, *SAVP_LINES), session=SESSION)
"""Plain and SRTP streams, crypto lines usable and not (a fuzz seed too)."""


def srtp_offer(*media: tuple[str, ...]) -> SessionDescription:
    return parse_sdp_untrusted(offer_with(tuple(line for m in media for line in m),
                                          session=SESSION))


@pytest.mark.parametrize("mode", ["offer", "required"])
def test_an_savp_offer_gets_its_first_usable_crypto_line(mode: str) -> None:
    negotiated = negotiate(srtp_offer(SAVP_LINES), srtp=mode)
    assert negotiated.crypto == Crypto(3, "AES_CM_128_HMAC_SHA1_32", PEER_KEY)
    assert negotiated.remote_rtp == ("192.0.2.1", 5004)


@pytest.mark.parametrize(("mode", "media", "index", "protected"), [
    ("offer", (AVP_LINES,), 0, False),
    ("offer", (AVP_LINES, SAVP_LINES), 0, False),  # the offer's order decides
    ("offer", (SAVP_LINES, AVP_LINES), 0, True),
    ("off", (SAVP_LINES, AVP_LINES), 1, False),
    ("required", (AVP_LINES, SAVP_LINES), 1, True),
])
def test_the_srtp_mode_chooses_among_the_streams(
    mode: str, media: tuple[tuple[str, ...], ...], index: int, protected: bool
) -> None:
    negotiated = negotiate(srtp_offer(*media), srtp=mode)
    assert negotiated.media_index == index
    assert (negotiated.crypto is not None) == protected


@pytest.mark.parametrize(("mode", "media", "missing"), [
    ("off", (SAVP_LINES,), "no RTP/AVP audio stream offers"),
    ("required", (AVP_LINES,), "no RTP/SAVP audio stream with a usable a=crypto"),
    ("offer", (SAVP_LINES[:3],), "no RTP/AVP or RTP/SAVP audio stream with a usable a=crypto"),
    ("required", (("m=audio 5004 RTP/SAVP 0",),), "RTP/SAVP"),  # no a=crypto at all
    ("required", (("m=audio 5004 UDP/TLS/RTP/SAVP 0",),), "RTP/SAVP"),  # DTLS-SRTP
])
def test_no_acceptable_stream_for_the_srtp_mode_is_a_488(
    mode: str, media: tuple[tuple[str, ...], ...], missing: str
) -> None:
    with pytest.raises(NotAcceptable, match=missing) as caught:
        negotiate(srtp_offer(*media), srtp=mode)
    assert caught.value.status_hint == 488


def test_an_unknown_srtp_mode_is_our_error() -> None:
    with pytest.raises(LocalProtocolError, match="srtp"):
        negotiate(srtp_offer(AVP_LINES), srtp="maybe")


def test_the_srtp_answer_is_savp_with_our_key_under_the_offers_tag() -> None:
    offer = parse_sdp_untrusted(SRTP_OFFER)
    negotiated = negotiate(offer, srtp="required")
    assert negotiated.crypto is not None
    ours = negotiated.crypto.answer(OUR_KEY)
    lines = answer_lines(offer, negotiated, local_crypto=ours)
    assert lines[5:] == [
        "m=audio 0 RTP/AVP 8",
        "m=audio 40000 RTP/SAVP 0 101",
        "a=rtpmap:0 PCMU/8000",
        "a=rtpmap:101 telephone-event/8000",
        "a=fmtp:101 0-16",
        "a=ptime:20",
        "a=sendrecv",
        f"a=crypto:3 AES_CM_128_HMAC_SHA1_32 inline:{'qqqq' * 10}",
    ]


def test_the_answers_crypto_must_match_the_negotiation() -> None:
    plain = srtp_offer(AVP_LINES)
    protected = srtp_offer(SAVP_LINES)
    negotiated = negotiate(protected, srtp="required")
    assert negotiated.crypto is not None
    for offer, chosen, ours in [
        (plain, negotiate(plain), Crypto(1, "AES_CM_128_HMAC_SHA1_80", OUR_KEY)),
        (protected, negotiated, None),
        (protected, negotiated, Crypto(9, negotiated.crypto.suite, OUR_KEY)),
        (protected, negotiated, Crypto(3, "AES_CM_128_HMAC_SHA1_80", OUR_KEY)),
    ]:
        with pytest.raises(LocalProtocolError, match="local_crypto"):
            answer_lines(offer, chosen, local_crypto=ours)
