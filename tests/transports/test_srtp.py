"""SrtpContext: unprotect what authenticates, drop and count the rest by reason,
keep RTCP for the stream to ignore, bound the inbound SSRCs, rekey."""

from __future__ import annotations

import struct

import pylibsrtp
import pytest

from voxgate.errors import LocalProtocolError
from voxgate.sip.sdes import Crypto
from voxgate.transports.srtp import MAX_INBOUND_SSRCS, SrtpContext

PEER_KEY, OUR_KEY = b"\x01" * 30, b"\x02" * 30
SUITE_80, SUITE_32 = "AES_CM_128_HMAC_SHA1_80", "AES_CM_128_HMAC_SHA1_32"


def rtp(sequence: int, ssrc: int = 0x1234) -> bytes:
    return struct.pack("!BBHII", 0x80, 0, sequence, sequence * 160, ssrc) + b"\xff" * 160


def context(suite: str = SUITE_80) -> SrtpContext:
    offered = Crypto(7, suite, PEER_KEY)
    return SrtpContext(offered, offered.answer(OUR_KEY))


def sender(key: bytes = PEER_KEY, suite: int = pylibsrtp.Policy.SRTP_PROFILE_AES128_CM_SHA1_80
           ) -> pylibsrtp.Session:
    return pylibsrtp.Session(pylibsrtp.Policy(
        key=key, ssrc_type=pylibsrtp.Policy.SSRC_ANY_OUTBOUND, srtp_profile=suite))


def test_the_32_bit_tag_suite_round_trips_both_ways() -> None:
    srtp = context(SUITE_32)
    peer = sender(suite=pylibsrtp.Policy.SRTP_PROFILE_AES128_CM_SHA1_32)
    protected = peer.protect(rtp(1))
    assert len(protected) == len(rtp(1)) + 4
    assert srtp.unprotect_untrusted(protected) == rtp(1)
    ours = srtp.protect(rtp(5))
    assert ours is not None and len(ours) == len(rtp(5)) + 4


@pytest.mark.parametrize(("datagram", "reason"), [
    (b"\x80", "malformed"),
    (b"", "malformed"),
    (rtp(1), "auth"),
    (b"\x80" * 1600, "malformed"),
])
def test_what_does_not_unprotect_is_counted_by_reason(datagram: bytes, reason: str) -> None:
    srtp = context()
    assert srtp.unprotect_untrusted(datagram) is None
    assert srtp.counters()[f"srtp_drop_{reason}"] == 1
    assert sum(srtp.drops.values()) == 1


def test_rtcp_passes_through_for_the_stream_to_ignore() -> None:
    receiver_report = struct.pack("!BBHI", 0x80, 201, 1, 0x1234)
    assert context().unprotect_untrusted(receiver_report) == receiver_report


def test_the_inbound_ssrcs_kept_are_bounded_oldest_out() -> None:
    srtp, peer = context(), sender()
    first = peer.protect(rtp(1, ssrc=100))
    assert srtp.unprotect_untrusted(first) is not None
    for ssrc in range(101, 101 + MAX_INBOUND_SSRCS):
        assert srtp.unprotect_untrusted(peer.protect(rtp(1, ssrc=ssrc))) is not None
    # SSRC 100's replay window went with it: the same packet authenticates again.
    assert srtp.unprotect_untrusted(first) is not None
    assert srtp.drops["replay"] == 0
    newest = peer.protect(rtp(2, ssrc=100 + MAX_INBOUND_SSRCS))
    assert srtp.unprotect_untrusted(newest) is not None
    assert srtp.unprotect_untrusted(newest) is None and srtp.drops["replay"] == 1


def test_rekey_starts_over_and_keeps_the_counters() -> None:
    srtp = context()
    assert srtp.unprotect_untrusted(rtp(1)) is None
    new_peer_key = b"\x09" * 30
    offered = Crypto(1, SUITE_32, new_peer_key)
    srtp.rekey(offered, offered.answer(b"\x0a" * 30))
    peer = sender(new_peer_key, pylibsrtp.Policy.SRTP_PROFILE_AES128_CM_SHA1_32)
    assert srtp.unprotect_untrusted(peer.protect(rtp(1))) == rtp(1)
    assert srtp.drops["auth"] == 1 and srtp.local.key_salt == b"\x0a" * 30


def test_both_directions_need_one_suite() -> None:
    with pytest.raises(LocalProtocolError):
        SrtpContext(Crypto(1, SUITE_80, PEER_KEY), Crypto(1, SUITE_32, OUR_KEY))
