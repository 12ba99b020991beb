"""Tests of voxgate.sip.headers (RFC 3261 §20)."""

from __future__ import annotations

import pytest

from voxgate.errors import RemoteProtocolError
from voxgate.sip.headers import (
    MAX_CSEQ,
    CSeq,
    NameAddr,
    Via,
    parse_cseq,
    parse_name_addr,
    parse_token_list,
    parse_uint,
    parse_via,
    split_list_value,
)

# --- Via ---------------------------------------------------------------------


def test_via_basic():
    via = parse_via("SIP/2.0/udp client.example.com:5060;branch=z9hG4bK74bf9;Received=192.0.2.1")
    assert via == Via(
        "UDP", "client.example.com", 5060, {"branch": "z9hG4bK74bf9", "received": "192.0.2.1"}
    )
    assert via.branch == "z9hG4bK74bf9"
    assert via.received == "192.0.2.1"
    assert via.rport is None
    assert not via.has_rport


def test_via_with_lws_everywhere():
    # RFC 4475 wsinv, after unfolding.
    via = parse_via("SIP  /    2.0   / UDP  192.168.255.111   ; branch= z9hG4bK30239")
    assert (via.transport, via.host, via.port, via.branch) == (
        "UDP",
        "192.168.255.111",
        None,
        "z9hG4bK30239",
    )
    via = parse_via("SIP / 2.0 / TCP host.example.com : 5061 ;lr")
    assert (via.port, via.params) == (5061, {"lr": None})


def test_via_rport():
    valueless = parse_via("SIP/2.0/UDP 192.0.2.1;rport;branch=z9hG4bKx")
    assert valueless.has_rport
    assert valueless.rport is None
    filled = valueless.with_params(rport="5062", received="198.51.100.7")
    assert filled.rport == 5062
    assert filled.received == "198.51.100.7"
    assert valueless.params["rport"] is None  # the original is unchanged
    assert filled.serialize() == (
        "SIP/2.0/UDP 192.0.2.1;rport=5062;branch=z9hG4bKx;received=198.51.100.7"
    )


def test_via_ipv6_sent_by_and_received():
    via = parse_via("SIP/2.0/UDP [2001:db8::1]:5060;received=2001:db8::2;branch=z9hG4bKa")
    assert via.host == "2001:db8::1"
    assert via.received == "2001:db8::2"
    assert via.serialize() == "SIP/2.0/UDP [2001:db8::1]:5060;received=2001:db8::2;branch=z9hG4bKa"


def test_via_serialize_round_trip():
    text = "SIP/2.0/TLS t3.example.com;branch=z9hG4bK2980unddj"
    assert parse_via(text).serialize() == text


@pytest.mark.parametrize(
    "text",
    [
        "",
        "SIP/2.0/UDP",
        "SIP/3.0/UDP host.example.com",
        "HTTP/2.0/UDP host.example.com",
        "SIP/2.0 host.example.com",
        "SIP/2.0/UDP 192.0.2.15;;",
        "SIP/2.0/UDP host.example.com;branch=",
        "SIP/2.0/UDP host.example.com:70000",
        "SIP/2.0/UDP host.example.com;rport=abc",
        "SIP/2.0/UDP host.example.com junk",
        "SIP/2.0/UDP 999.0.0.1",
    ],
)
def test_via_malformed(text):
    with pytest.raises(RemoteProtocolError) as info:
        parse_via(text)
    assert info.value.status_hint == 400


# --- name-addr ------------------------------------------------------------------


def test_name_addr_quoted_display_with_escapes():
    addr = parse_name_addr('"J Rosenberg \\\\\\""       <sip:jdrosen@example.com> ; tag = 98asjd8')
    assert addr == NameAddr('J Rosenberg \\"', "sip:jdrosen@example.com", {"tag": "98asjd8"})
    assert addr.tag == "98asjd8"
    assert addr.serialize() == '"J Rosenberg \\\\\\"" <sip:jdrosen@example.com>;tag=98asjd8'


def test_name_addr_token_display_names():
    # RFC 4475 intmeth: several tokens; lwsdisp: no LWS before "<".
    addr = parse_name_addr("token1~` token2'+_ token3*%!.- <sip:mundane@example.com>;tag=_t~1")
    assert addr.display == "token1~` token2'+_ token3*%!.-"
    assert addr.tag == "_t~1"
    assert parse_name_addr("caller<sip:caller@example.com>;tag=323").display == "caller"


def test_name_addr_quoted_pairs_of_control_characters():
    addr = parse_name_addr('"BEL:\\\x07 NUL:\\\x00" <sip:a@example.com>')
    assert addr.display == "BEL:\x07 NUL:\x00"
    assert addr.serialize() == '"BEL:\\\x07 NUL:\\\x00" <sip:a@example.com>'


def test_addr_spec_parameters_belong_to_the_header():
    addr = parse_name_addr("sip:+19725552222@gw1.example.net;unknownparam;tag=1")
    assert addr == NameAddr(
        None, "sip:+19725552222@gw1.example.net", {"unknownparam": None, "tag": "1"}
    )
    assert addr.serialize() == "<sip:+19725552222@gw1.example.net>;unknownparam;tag=1"


def test_uri_parameters_stay_inside_brackets():
    addr = parse_name_addr("<sip:+19725552222@gw1.example.net;unknownparam>")
    assert addr.uri == "sip:+19725552222@gw1.example.net;unknownparam"
    assert addr.params == {}
    assert addr.tag is None


def test_other_schemes_are_accepted():
    # RFC 4475 unksm2: the application layer decides about them.
    assert parse_name_addr("isbn:2983792873").uri == "isbn:2983792873"
    assert parse_name_addr("<http://www.example.com>;tag=3234233").tag == "3234233"


def test_quoted_param_value_is_kept_quoted():
    addr = parse_name_addr('<sip:a@example.com>;p="v a l";tag=x')
    assert addr.params == {"p": '"v a l"', "tag": "x"}


def test_empty_display_name():
    addr = parse_name_addr('"" <sip:a@example.com>')
    assert addr.display == ""
    assert addr.serialize() == '"" <sip:a@example.com>'


def test_serialize_never_breaks_the_line():
    addr = NameAddr("evil\r\nVia: x", "sip:a@example.com", {})
    assert "\r" not in addr.serialize()
    assert "\n" not in addr.serialize()


@pytest.mark.parametrize(
    "text",
    [
        "",
        '"Mr. J. User <sip:j.user@example.com>',  # quotbal
        "Bell, Alexander <sip:a.g.bell@example.com>;tag=43",  # baddn
        '"Watson, Thomas" < sip:t.watson@example.org >',  # badaspec
        "sip:user@example.com?Route=%3Csip:sip.example.com%3E",  # regbadct
        '"Joe" <sip:joe@example.org>;;;;',  # badinv01
        "<sip:a@example.com",
        "<sip:a@example.com>junk",
        "<sip:a@@example.com>",
        "<>",
        "plain words",
    ],
)
def test_name_addr_malformed(text):
    with pytest.raises(RemoteProtocolError) as info:
        parse_name_addr(text)
    assert info.value.status_hint == 400


# --- CSeq and numbers ----------------------------------------------------------------


def test_cseq():
    assert parse_cseq("0009 INVITE") == CSeq(9, "INVITE")
    assert parse_cseq(f"{MAX_CSEQ} RE%47IST%45R") == CSeq(MAX_CSEQ, "RE%47IST%45R")


@pytest.mark.parametrize(
    "text",
    [
        "",
        "INVITE",
        "1",
        "-1 INVITE",
        "1 INV ITE",
        "2147483648 INVITE",
        "36893488147419103232 REGISTER",
        "1 INVITE;x",
    ],
)
def test_cseq_malformed(text):
    with pytest.raises(RemoteProtocolError):
        parse_cseq(text)


def test_parse_uint():
    assert parse_uint("0068", 255, "Max-Forwards") == 68
    assert parse_uint("0" * 5000 + "7", 255, "Max-Forwards") == 7
    with pytest.raises(RemoteProtocolError, match="Max-Forwards exceeds 255"):
        parse_uint("256", 255, "Max-Forwards")
    with pytest.raises(RemoteProtocolError, match="exceeds"):
        parse_uint("9" * 5000, 2**32 - 1, "Expires")  # no ValueError from int()
    with pytest.raises(RemoteProtocolError, match="not a decimal"):
        parse_uint("-999", 2**32 - 1, "Content-Length")


# --- lists -----------------------------------------------------------------------


def test_split_list_value_respects_quotes_and_brackets():
    value = '"Bell, A." <sip:a@example.com;x=1,2>;tag=1, <sip:b@example.com> ,sip:c@example.com'
    assert split_list_value(value) == [
        '"Bell, A." <sip:a@example.com;x=1,2>;tag=1',
        "<sip:b@example.com>",
        "sip:c@example.com",
    ]


def test_split_list_value_escaped_quote_and_unterminated_parts():
    assert split_list_value('"a\\", b" <sip:x@y>, c') == ['"a\\", b" <sip:x@y>', "c"]
    assert split_list_value('"open, quote') == ['"open, quote']
    assert split_list_value("<sip:a@b, c") == ["<sip:a@b, c"]


def test_split_list_value_keeps_empty_elements():
    assert split_list_value("") == [""]
    assert split_list_value("a,,b,") == ["a", "", "b", ""]
    assert split_list_value("SIP/2.0/UDP 192.0.2.15;;,;,,") == [
        "SIP/2.0/UDP 192.0.2.15;;",
        ";",
        "",
        "",
    ]


def test_parse_token_list():
    assert parse_token_list(["replaces, timer", "100rel", ""]) == ["replaces", "timer", "100rel"]
    with pytest.raises(RemoteProtocolError):
        parse_token_list(["timer, not a token"])
