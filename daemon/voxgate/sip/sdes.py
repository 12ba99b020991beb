"""SDES keys for SRTP: the SDP ``a=crypto`` attribute (RFC 4568), sans-IO.

An offer over ``RTP/SAVP`` carries one or more ``a=crypto`` lines, each a
crypto suite and the offerer's master key and salt for what it sends
(RFC 4568 §6.1). The answer picks one line, keeps its tag and suite, and
carries the answerer's own fresh key (§7.1.2, §5.1.2)::

    offered = first_usable_crypto(media.attributes)   # None: no usable line
    ours = offered.answer(secrets.token_bytes(KEY_SALT_BYTES))
    f"a=crypto:{ours.to_sdp()}"

Supported: the two mandatory suites AES_CM_128_HMAC_SHA1_80 and _32
(§6.2), one ``inline:`` key per line without lifetime or MKI (§6.1), no
session parameters (§6.3). A line with anything else is not usable, and a
stream with no usable line is not accepted. Keys are never shown in a repr.
"""

from __future__ import annotations

import binascii
import re
from dataclasses import dataclass, field

from voxgate.errors import LocalProtocolError

SRTP_PROTO = "RTP/SAVP"
"""The SDP transport protocol of SRTP (RFC 3711 §12)."""

SRTP_MODES = ("off", "offer", "required")
"""``[rtp] srtp``: plain RTP only; SRTP when offered; SRTP only."""

SUITES = ("AES_CM_128_HMAC_SHA1_80", "AES_CM_128_HMAC_SHA1_32")
"""Crypto suites we accept (RFC 4568 §6.2.1, §6.2.2), in no order of ours:
the answer takes the offer's first usable line."""

KEY_SALT_BYTES = 30
"""A 128-bit master key and a 112-bit master salt, concatenated (RFC 4568 §6.2.1)."""

# --- Grammar (RFC 4568 §9.1) -----------------------------------------------
# a=crypto:<tag> 1*WSP <crypto-suite> 1*WSP <key-params> *(1*WSP <session-param>)
# tag = 1*9DIGIT; crypto-suite = 1*(ALPHA / DIGIT / "_")
# key-params = key-param *(";" key-param); key-param = "inline:" key-info
# SRTP key-info (§6.1) = key-salt ["|" lifetime] ["|" mki ":" mki-length];
# key-salt = base64 of key || salt (40 characters for 30 bytes, §6.2.1).
_CRYPTO_RE = re.compile(r"(\d{1,9})[ \t]+([A-Za-z0-9_]+)[ \t]+(\S+)((?:[ \t]+\S+)*)[ \t]*")
_INLINE_RE = re.compile(r"inline:([A-Za-z0-9+/]{40})")


@dataclass(frozen=True, slots=True)
class Crypto:
    """One ``a=crypto`` line we can use: ``tag`` (0-999999999), ``suite`` (one
    of :data:`SUITES`) and ``key_salt``, the :data:`KEY_SALT_BYTES` master key
    and salt of whoever sends with it."""

    tag: int
    suite: str
    key_salt: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if self.suite not in SUITES or len(self.key_salt) != KEY_SALT_BYTES:
            raise LocalProtocolError(
                f"SRTP crypto needs a suite of {SUITES} and {KEY_SALT_BYTES} bytes of key")

    def answer(self, key_salt: bytes) -> Crypto:
        """Our answer to this offered line: same tag and suite, our ``key_salt``
        (RFC 4568 §7.1.2). Raises LocalProtocolError for a key of the wrong length."""
        return Crypto(self.tag, self.suite, key_salt)

    def to_sdp(self) -> str:
        """The attribute value: ``<tag> <suite> inline:<base64 key||salt>``."""
        key = binascii.b2a_base64(self.key_salt, newline=False).decode("ascii")
        return f"{self.tag} {self.suite} inline:{key}"


def parse_crypto_untrusted(value: str) -> Crypto | None:
    """An ``a=crypto`` value from the network (RFC 4568 §9.1), or ``None``
    when it is malformed or asks for what we do not support (another suite,
    several keys, a lifetime or MKI, session parameters). Never raises."""
    match = _CRYPTO_RE.fullmatch(value)
    if match is None or match[2] not in SUITES or match[4]:
        return None
    key = _INLINE_RE.fullmatch(match[3])
    if key is None:
        return None
    return Crypto(int(match[1]), match[2], binascii.a2b_base64(key[1], strict_mode=True))


def first_usable_crypto(attributes: tuple[tuple[str, str | None], ...]) -> Crypto | None:
    """The first ``a=crypto`` line among a stream's ``attributes`` that
    :func:`parse_crypto_untrusted` accepts (the offerer lists its preferred
    first, RFC 4568 §7.1.1), ``None`` when there is none. Never raises."""
    for name, value in attributes:
        if name == "crypto" and value is not None:
            crypto = parse_crypto_untrusted(value)
            if crypto is not None:
                return crypto
    return None
