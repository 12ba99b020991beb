"""Tests for voxgate.sip.sdes: the a=crypto attribute (RFC 4568 §9.1)."""

from __future__ import annotations

import binascii

import pytest

from voxgate.errors import LocalProtocolError
from voxgate.sip.sdes import KEY_SALT_BYTES, Crypto, first_usable_crypto, parse_crypto_untrusted

KEY = bytes(range(KEY_SALT_BYTES))
KEY_B64 = binascii.b2a_base64(KEY, newline=False).decode()  # 40 characters


@pytest.mark.parametrize("suite", ["AES_CM_128_HMAC_SHA1_80", "AES_CM_128_HMAC_SHA1_32"])
def test_a_supported_line_parses(suite: str) -> None:
    assert parse_crypto_untrusted(f"1 {suite} inline:{KEY_B64}") == Crypto(1, suite, KEY)


def test_whitespace_is_1_wsp_or_more() -> None:
    crypto = parse_crypto_untrusted(f"42\tAES_CM_128_HMAC_SHA1_80  inline:{KEY_B64} ")
    assert crypto is not None and crypto.tag == 42


@pytest.mark.parametrize("value", [
    f"1 AEAD_AES_256_GCM inline:{KEY_B64}",  # a suite we do not support
    f"1 F8_128_HMAC_SHA1_80 inline:{KEY_B64}",
    f"1 AES_CM_128_HMAC_SHA1_80 inline:{KEY_B64}|2^31",  # lifetime
    f"1 AES_CM_128_HMAC_SHA1_80 inline:{KEY_B64}|1:4",  # MKI
    f"1 AES_CM_128_HMAC_SHA1_80 inline:{KEY_B64}|2^20|1:4",
    f"1 AES_CM_128_HMAC_SHA1_80 inline:{KEY_B64};inline:{KEY_B64}",  # several keys
    f"1 AES_CM_128_HMAC_SHA1_80 inline:{KEY_B64} KDR=1",  # session parameters
    f"1 AES_CM_128_HMAC_SHA1_80 inline:{KEY_B64} UNENCRYPTED_SRTP",
    f"1 AES_CM_128_HMAC_SHA1_80 inline:{KEY_B64[:-4]}",  # key too short
    f"1 AES_CM_128_HMAC_SHA1_80 inline:{KEY_B64}AAAA",  # key too long
    f"1 AES_CM_128_HMAC_SHA1_80 inline:{KEY_B64[:-1]}!",  # not base64
    f"1 AES_CM_128_HMAC_SHA1_80 outline:{KEY_B64}",  # another key method
    f"1234567890 AES_CM_128_HMAC_SHA1_80 inline:{KEY_B64}",  # tag over 9 digits
    f"x AES_CM_128_HMAC_SHA1_80 inline:{KEY_B64}",
    "1 AES_CM_128_HMAC_SHA1_80",
    "",
])
def test_an_unusable_line_is_none(value: str) -> None:
    assert parse_crypto_untrusted(value) is None


def test_the_first_usable_line_wins_in_offer_order() -> None:
    attributes = (
        ("rtpmap", "0 PCMU/8000"),
        ("crypto", f"1 AEAD_AES_256_GCM inline:{KEY_B64}"),
        ("crypto", None),
        ("crypto", f"2 AES_CM_128_HMAC_SHA1_32 inline:{KEY_B64}"),
        ("crypto", f"3 AES_CM_128_HMAC_SHA1_80 inline:{KEY_B64}"),
    )
    assert first_usable_crypto(attributes) == Crypto(2, "AES_CM_128_HMAC_SHA1_32", KEY)
    assert first_usable_crypto(attributes[:3]) is None


def test_the_answer_keeps_tag_and_suite_with_our_key_and_round_trips() -> None:
    offered = Crypto(5, "AES_CM_128_HMAC_SHA1_32", KEY)
    ours = offered.answer(b"\xaa" * KEY_SALT_BYTES)
    assert (ours.tag, ours.suite, ours.key_salt) == (5, offered.suite, b"\xaa" * 30)
    assert parse_crypto_untrusted(ours.to_sdp()) == ours
    assert ours.to_sdp().startswith("5 AES_CM_128_HMAC_SHA1_32 inline:qqqq")


def test_keys_stay_out_of_reprs() -> None:
    assert KEY_B64 not in repr(Crypto(1, "AES_CM_128_HMAC_SHA1_80", KEY))
    assert repr(KEY) not in repr(Crypto(1, "AES_CM_128_HMAC_SHA1_80", KEY))


@pytest.mark.parametrize(("suite", "key"), [
    ("AEAD_AES_128_GCM", KEY), ("AES_CM_128_HMAC_SHA1_80", KEY[:-1])])
def test_a_crypto_we_cannot_use_is_our_error(suite: str, key: bytes) -> None:
    with pytest.raises(LocalProtocolError):
        Crypto(1, suite, key)
