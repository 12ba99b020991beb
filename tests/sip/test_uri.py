"""Tests of voxgate.sip.uri (RFC 3261 §19.1)."""

from __future__ import annotations

import time

import pytest

from voxgate.errors import RemoteProtocolError
from voxgate.sip.uri import SipUri, format_host_port, parse_uri_untrusted


def test_full_sip_uri():
    uri = parse_uri_untrusted(
        "sip:alice:secret@atlanta.example.com:5060;transport=TCP;lr?subject=hi&x="
    )
    assert uri == SipUri(
        scheme="sip",
        user="alice",
        password="secret",
        host="atlanta.example.com",
        port=5060,
        params={"transport": "TCP", "lr": None},
        headers={"subject": "hi", "x": ""},
    )


def test_scheme_and_param_names_are_lower_cased():
    uri = parse_uri_untrusted("SIPS:Bob@Example.COM;Maddr=Host.Example")
    assert uri.scheme == "sips"
    assert uri.user == "Bob"
    assert uri.host == "Example.COM"
    assert uri.params == {"maddr": "Host.Example"}


def test_host_only():
    uri = parse_uri_untrusted("sip:192.0.2.1")
    assert (uri.user, uri.password, uri.host, uri.port) == (None, None, "192.0.2.1", None)


def test_ipv6_reference_loses_brackets():
    uri = parse_uri_untrusted("sip:[2001:db8::10]:5070;transport=udp")
    assert uri.host == "2001:db8::10"
    assert uri.port == 5070
    assert format_host_port(uri.host, uri.port) == "[2001:db8::10]:5070"


def test_format_host_port():
    assert format_host_port("example.com", None) == "example.com"
    assert format_host_port("192.0.2.1", 5060) == "192.0.2.1:5060"
    assert format_host_port("::1", None) == "[::1]"


def test_escapes_stay_on_the_wire_and_unescape_on_demand():
    uri = parse_uri_untrusted("sip:%75se%72@example.com")
    assert uri.user == "%75se%72"
    assert uri.user_unescaped == "user"
    assert parse_uri_untrusted("sip:null-%00-null@example.com").user_unescaped == "null-\x00-null"
    assert parse_uri_untrusted("sip:example.com").user_unescaped is None


def test_escaped_param_names_are_kept_escaped():
    uri = parse_uri_untrusted("sip:cal%6Cer@host5.example.net;%6C%72;n%61me=v%61lue%25%34%31")
    assert uri.params == {"%6c%72": None, "n%61me": "v%61lue%25%34%31"}


def test_semicolon_in_user_part():
    # RFC 4475 §3.1.1.9 semiuri: the ";" belongs to the user part.
    uri = parse_uri_untrusted("sip:user;par=u%40example.net@example.com")
    assert uri.user == "user;par=u%40example.net"
    assert uri.host == "example.com"
    assert uri.params == {}


def test_unusual_but_legal_user_and_password():
    # RFC 4475 §3.1.1.2 intmeth.
    uri = parse_uri_untrusted(
        "sip:1_unusual.URI~(to-be!sure)&isn't+it$/crazy?,/;;*:&it+has=1,weird!*pas$wo~d_too."
        "(doesn't-it)@example.com"
    )
    assert uri.user == "1_unusual.URI~(to-be!sure)&isn't+it$/crazy?,/;;*"
    assert uri.password == "&it+has=1,weird!*pas$wo~d_too.(doesn't-it)"
    assert uri.host == "example.com"


@pytest.mark.parametrize(
    "text",
    [
        "tel:+15551234",
        "http://www.example.com",
        "nobodyKnowsThisScheme:opaque",
        "soap.beep://192.0.2.103:3002",
    ],
)
def test_other_schemes_get_416(text):
    with pytest.raises(RemoteProtocolError) as info:
        parse_uri_untrusted(text)
    assert info.value.status_hint == 416


@pytest.mark.parametrize(
    "text",
    [
        "",
        "no scheme here",
        "sip:",
        "sip:alice@",
        "sip:a b@example.com",
        "sip:example.com:99999",
        "sip:example.com:",
        "sip:[2001:db8::g]",
        "sip:256.1.1.1",
        "sip:host..example.com",
        "sip:example.com;=x",
        "sip:example.com;a=b=c",
        "sip:example.com?noequals",
        "sip:example.com?a=b&&c=d",
        "sip:al%zzice@example.com",
        "sip:<example.com>",
        "sip:alice:pa:ss@example.com",
    ],
)
def test_malformed_uris_get_400(text):
    with pytest.raises(RemoteProtocolError) as info:
        parse_uri_untrusted(text)
    assert info.value.status_hint == 400


def test_adversarial_uris_fail_fast():
    texts = ["sip:" + "a" * 8000 + "!", "sip:" + "a;" * 4000 + "@", "sip:a@" + "b." * 4000 + "-!"]
    for text in texts:
        start = time.perf_counter()
        with pytest.raises(RemoteProtocolError):
            parse_uri_untrusted(text)
        assert time.perf_counter() - start < 0.25
