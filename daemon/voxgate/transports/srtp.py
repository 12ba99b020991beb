"""SRTP (RFC 3711) for one call's RTP leg, with pylibsrtp (libsrtp 2).

Two libsrtp sessions per call, keyed from SDES (:mod:`voxgate.sip.sdes`):
the inbound one with the peer's master key and salt from its ``a=crypto``
line, the outbound one with ours from the answer. The leg calls
:meth:`SrtpContext.unprotect_untrusted` on every datagram before the RTP
stream sees it and :meth:`SrtpContext.protect` on every packet it sends.

What fails to unprotect is dropped and counted by reason, never decoded:
``auth`` (wrong key, forged or plain RTP: RFC 3711 §3.3 step 5), ``replay``
(an index seen before or older than the 128-packet window, §3.3.2) and
``malformed`` (too short to be SRTP). RTCP that shares the RTP port
(RFC 5761) passes through untouched: the stream ignores and counts it, so
SRTCP is not unprotected (voxgate neither reads nor sends RTCP).

libsrtp adds an inbound stream per SSRC only once a packet from it has
authenticated; :data:`MAX_INBOUND_SSRCS` bounds how many a peer holding the
key can make us keep (the oldest is removed first).
"""

from __future__ import annotations

import pylibsrtp

from voxgate.errors import LocalProtocolError
from voxgate.rtp.packet import is_rtcp_untrusted
from voxgate.sip.sdes import Crypto

MAX_INBOUND_SSRCS = 4
"""Inbound SSRCs whose SRTP state (rollover counter, replay window) is kept."""

DROP_REASONS = ("auth", "replay", "malformed")
"""Why an inbound datagram was dropped: the labels of
``voxgate_srtp_packets_dropped_total``."""

_PROFILES = {
    "AES_CM_128_HMAC_SHA1_80": pylibsrtp.Policy.SRTP_PROFILE_AES128_CM_SHA1_80,
    "AES_CM_128_HMAC_SHA1_32": pylibsrtp.Policy.SRTP_PROFILE_AES128_CM_SHA1_32,
}
_AUTH_FAILURE = "authentication failure"
_SSRC = slice(8, 12)  # RFC 3550 §5.1: the SSRC's bytes, left in the clear (RFC 3711 §3.1)


def _reason(error: pylibsrtp.Error) -> str:
    """libsrtp's status (pylibsrtp's message) → a :data:`DROP_REASONS` label."""
    message = str(error)
    if message == _AUTH_FAILURE:
        return "auth"
    return "replay" if message.startswith("replay") else "malformed"


class SrtpContext:
    """The SRTP state of one call: ``remote`` is the peer's offered crypto,
    ``local`` our answer to it (same suite). Not thread-safe; no I/O.

    Raises:
        LocalProtocolError: the two use different suites.
    """

    __slots__ = (
        "_inbound",
        "_outbound",
        "_ssrcs",
        "drops",
        "local",
        "protect_failures",
        "remote",
    )

    def __init__(self, remote: Crypto, local: Crypto) -> None:
        self.drops = dict.fromkeys(DROP_REASONS, 0)
        """Inbound datagrams dropped, by reason."""
        self.protect_failures = 0
        """Outbound packets libsrtp refused to protect (not sent)."""
        self.rekey(remote, local)

    def rekey(self, remote: Crypto, local: Crypto) -> None:
        """Start over with new keys both ways (a re-INVITE changed them, RFC 4568
        §7.1.4): fresh sessions, rollover counters and replay windows; the
        counters carry on.

        Raises:
            LocalProtocolError: the two use different suites.
        """
        if remote.suite != local.suite:
            raise LocalProtocolError("SRTP: both directions must use the negotiated suite")
        profile = _PROFILES[remote.suite]
        self.remote, self.local = remote, local
        self._inbound = pylibsrtp.Session(pylibsrtp.Policy(
            key=remote.key_salt, ssrc_type=pylibsrtp.Policy.SSRC_ANY_INBOUND,
            srtp_profile=profile))
        self._outbound = pylibsrtp.Session(pylibsrtp.Policy(
            key=local.key_salt, ssrc_type=pylibsrtp.Policy.SSRC_ANY_OUTBOUND,
            srtp_profile=profile))
        self._ssrcs: dict[bytes, None] = {}  # inbound SSRCs libsrtp holds, oldest first

    def unprotect_untrusted(self, data: bytes) -> bytes | None:
        """The RTP packet inside SRTP datagram ``data`` (RFC 3711 §3.3), RTCP
        unchanged, or ``None`` when it fails authentication or the replay
        check or is malformed (counted in :attr:`drops`). Never raises."""
        if is_rtcp_untrusted(data):
            return data
        try:
            packet = self._inbound.unprotect(data)
        except (pylibsrtp.Error, ValueError) as e:  # ValueError: longer than 1500 bytes
            self.drops[_reason(e) if isinstance(e, pylibsrtp.Error) else "malformed"] += 1
            return None
        ssrc = data[_SSRC]
        ssrcs = self._ssrcs
        if ssrc not in ssrcs:
            ssrcs[ssrc] = None
            if len(ssrcs) > MAX_INBOUND_SSRCS:
                oldest = next(iter(ssrcs))
                del ssrcs[oldest]
                self._inbound.remove_stream(int.from_bytes(oldest, "big"))
        return packet

    def protect(self, packet: bytes) -> bytes | None:
        """RTP ``packet`` protected with our key (RFC 3711 §3.3), or ``None``
        (counted in :attr:`protect_failures`) if libsrtp refuses it (the key
        is worn out after 2^48 packets). Never raises."""
        try:
            return self._outbound.protect(packet)
        except (pylibsrtp.Error, ValueError):
            self.protect_failures += 1
            return None

    def counters(self) -> dict[str, int]:
        """``srtp_drop_<reason>`` for each of :data:`DROP_REASONS` and
        ``drop_srtp_protect`` (outbound packets not sent)."""
        counters = {f"srtp_drop_{reason}": n for reason, n in self.drops.items()}
        counters["drop_srtp_protect"] = self.protect_failures
        return counters
