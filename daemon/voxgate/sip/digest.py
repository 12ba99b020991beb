"""Digest authentication of SIP requests (RFC 3261 §22.4, RFC 7616), sans-IO.

A UAS that wants credentials answers a request 401 with one
``WWW-Authenticate`` challenge per algorithm, the preferred first (RFC 7616
§3.7; by default SHA-256, then MD5 for older clients), all with
``qop="auth"``; the
client repeats the request with an ``Authorization`` header whose
``response`` is::

    HA1      = H(username ":" realm ":" password)      (or the stored HA1)
    HA2      = H(method ":" digest-uri)
    response = H(HA1 ":" nonce ":" nc ":" cnonce ":" qop ":" HA2)

Nonces are stateless and expire: ``base64(t || HMAC-SHA256(secret, t || realm))``
with ``t`` the issue time in milliseconds (8 bytes, big-endian) of the
caller's monotonic clock and ``secret`` random per process (nonces do not
survive a restart). A nonce older than ``nonce_ttl_s`` gets a new challenge
with ``stale=true`` when the response was otherwise right (§3.3). Replays:
the highest ``nc`` seen per nonce is kept in a table of ``max_nonces``
entries (least recently used evicted, counted); a request whose ``nc`` is
not above it is refused. A nonce evicted before it expires could be replayed
once more: size the table for the nonces issued within ``nonce_ttl_s``.

The digest-uri must equal the Request-URI exactly (RFC 3261 §22.4).
Not supported (the request is refused as a bad header): ``qop=auth-int``,
requests without ``qop`` (RFC 2069), the ``-sess`` algorithms, ``userhash``
and ``username*``.

The client side (our REGISTER, :mod:`voxgate.sip.registration`):
:func:`choose_challenge` picks the strongest answerable challenge of a
401/407 and :func:`credentials_value` answers it with the same hashes.

Credentials file (:func:`parse_credentials`), one entry a line, ``#``
comments and blank lines ignored:

* ``username:password`` -- the password in clear (it may contain ``:``);
* ``username:realm:HA1`` -- HA1 as hex: 32 digits for MD5, 64 for SHA-256
  (the client must then use that algorithm). A line with exactly two ``:``
  whose last field is 32 or 64 hex digits is read as this form.
"""

from __future__ import annotations

import base64
import binascii
import enum
import hashlib
import hmac
import re
import secrets
import struct
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from voxgate.errors import LocalProtocolError

ALGORITHMS: dict[str, Callable[[bytes], str]] = {
    "SHA-256": lambda data: hashlib.sha256(data).hexdigest(),
    "MD5": lambda data: hashlib.md5(data, usedforsecurity=False).hexdigest(),
}
"""Hash (hex digest) by algorithm name, in the order they are offered (RFC 7616 §3.7)."""
_HEX_DIGITS = {"SHA-256": 64, "MD5": 32}
MAX_HEADER_CHARS = 4096
"""Longest ``Authorization`` value we parse; longer is a bad header."""
MAX_PARAMS = 16
MAX_CREDENTIAL_LINE_CHARS = 1024

# RFC 7616 §3.4 / RFC 7235 §2.1: auth-param = token BWS "=" BWS ( token / quoted-string )
_TOKEN = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_QUOTED = r'"(?:[^"\\\r\n]|\\[^\r\n])*"'
_PARAM_RE = re.compile(rf"[ \t]*({_TOKEN})[ \t]*=[ \t]*({_TOKEN}|{_QUOTED})[ \t]*(,|$)")
_SCHEME_RE = re.compile(r"[ \t]*Digest[ \t]+", re.IGNORECASE)
_NC_RE = re.compile(r"[0-9a-fA-F]{8}")
_HEX_RE = re.compile(r"[0-9a-fA-F]+")
_USERNAME_RE = re.compile(r"[^\s:\"\\]{1,128}")
_NONCE = struct.Struct(">Q")  # issue time, ms; followed by the 32-byte HMAC-SHA256
_NONCE_BYTES = _NONCE.size + 32


class AuthResult(enum.Enum):
    """What became of one request's credentials (the counter names)."""

    OK = "ok"
    MISSING = "missing"  # no Authorization for our realm
    BAD_HEADER = "bad_header"  # unparsable, wrong realm/uri/opaque/qop, forged nonce
    UNKNOWN_USER = "unknown_user"
    WRONG_RESPONSE = "wrong_response"
    STALE = "stale"  # right response, expired nonce: challenged again with stale=true
    REPLAY = "replay"  # nc not above the last one seen for the nonce


@dataclass(frozen=True, slots=True)
class Credential:
    """One line of the credentials file: a password, or an HA1 for one algorithm."""

    username: str
    password: str | None = None
    realm: str | None = None  # with ha1
    algorithm: str | None = None  # with ha1: "MD5" or "SHA-256"
    ha1: str | None = None  # lower-case hex


@dataclass(frozen=True, slots=True)
class DigestResponse:
    """The parameters of an ``Authorization: Digest`` value (unquoted)."""

    username: str
    realm: str
    nonce: str
    uri: str
    response: str
    algorithm: str
    cnonce: str
    nc: str  # 8 hex digits, as sent
    qop: str
    opaque: str | None


@dataclass(frozen=True, slots=True)
class Verdict:
    """The outcome; ``username`` is set when ``result`` is OK."""

    result: AuthResult
    reason: str = ""
    username: str | None = None


def parse_credentials(text: str) -> tuple[Credential, ...]:
    """The entries of a credentials file (format in the module docstring).

    Raises ValueError naming the line (1-based) for a malformed line, a user
    given two passwords or two HA1s of one algorithm, or a file with no entry.
    The password itself is never put in the message.
    """
    entries: list[Credential] = []
    seen: set[tuple[str, str | None]] = set()
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        entry = _credential_line(line)
        if entry is None:
            raise ValueError(f"line {number}: must be username:password or "
                             "username:realm:HA1 (32 or 64 hex digits)")
        if (entry.username, entry.algorithm) in seen:
            raise ValueError(f"line {number}: {entry.username!r} is given twice")
        seen.add((entry.username, entry.algorithm))
        entries.append(entry)
    if not entries:
        raise ValueError("no credentials in the file")
    return tuple(entries)


def _credential_line(line: str) -> Credential | None:
    if len(line) > MAX_CREDENTIAL_LINE_CHARS or not line.isprintable():
        return None
    fields = line.split(":")
    if len(fields) == 3 and _HEX_RE.fullmatch(fields[2]) and len(fields[2]) in (32, 64):
        username, realm, ha1 = fields
        algorithm = "MD5" if len(ha1) == 32 else "SHA-256"
        if not _USERNAME_RE.fullmatch(username) or not realm or '"' in realm:
            return None
        return Credential(username, realm=realm, algorithm=algorithm, ha1=ha1.lower())
    username, sep, password = line.partition(":")
    if not sep or not password or not _USERNAME_RE.fullmatch(username):
        return None
    return Credential(username, password=password)


def parse_authorization_untrusted(value: str) -> DigestResponse | str:
    """Parse one ``Authorization`` value (untrusted text): the response or why not.

    Never raises. Bounded: at most :data:`MAX_HEADER_CHARS` characters and
    :data:`MAX_PARAMS` parameters, each given once.
    """
    params = _digest_params_untrusted(value)
    return params if isinstance(params, str) else _digest_response(params)


def _digest_params_untrusted(value: str) -> dict[str, str] | str:
    """The parameters of one ``Digest`` credentials or challenge value (names lower-cased,
    quoted values unquoted), or why not. Bounded like :func:`parse_authorization_untrusted`."""
    if len(value) > MAX_HEADER_CHARS:
        return "too long"
    scheme = _SCHEME_RE.match(value)
    if scheme is None:
        return "not Digest"
    params: dict[str, str] = {}
    position = scheme.end()
    while position < len(value):
        found = _PARAM_RE.match(value, position)
        if found is None or found.end() == position:
            return "malformed parameters"
        name, raw = found.group(1).lower(), found.group(2)
        if name in params or len(params) >= MAX_PARAMS:
            return "repeated or too many parameters"
        params[name] = re.sub(r"\\(.)", r"\1", raw[1:-1]) if raw.startswith('"') else raw
        position = found.end()
    return params


def _digest_response(params: dict[str, str]) -> DigestResponse | str:
    missing = {"username", "realm", "nonce", "uri", "response"} - params.keys()
    if missing:
        return f"missing {', '.join(sorted(missing))}"
    if "username*" in params or params.get("userhash", "false").lower() != "false":
        return "userhash and username* are not supported"
    algorithm = params.get("algorithm", "MD5").upper()
    if algorithm not in ALGORITHMS:
        return "unsupported algorithm"
    if params.get("qop", "").lower() != "auth":
        return "qop must be auth"
    nc, cnonce, response = params.get("nc", ""), params.get("cnonce", ""), params["response"]
    if not _NC_RE.fullmatch(nc) or not cnonce:
        return "qop=auth needs nc (8 hex digits) and cnonce"
    if len(response) != _HEX_DIGITS[algorithm] or not _HEX_RE.fullmatch(response):
        return "malformed response"
    return DigestResponse(
        username=params["username"], realm=params["realm"], nonce=params["nonce"],
        uri=params["uri"], response=response.lower(), algorithm=algorithm, cnonce=cnonce,
        nc=nc, qop="auth", opaque=params.get("opaque"),
    )


class DigestAuthenticator:
    """Challenges and checks requests for one realm; off until :meth:`configure` is
    given credentials.

    ``secret`` keys the nonces' HMAC (default: 32 random bytes); ``opaque`` is
    random per instance. Counters: ``counts`` (by :class:`AuthResult` value)
    and ``nonces_evicted`` (replay table evictions). Time is the caller's
    ``now`` (monotonic seconds).
    """

    def __init__(self, *, secret: bytes | None = None, opaque: str | None = None) -> None:
        self._secret = secret or secrets.token_bytes(32)
        self.opaque = opaque or secrets.token_hex(8)
        self.realm = "voxgate"
        self.algorithms: tuple[str, ...] = tuple(ALGORITHMS)
        self.nonce_ttl_s = 300.0
        self.max_nonces = 4096
        self._users: dict[str, list[Credential]] = {}
        self._last_nc: OrderedDict[str, int] = OrderedDict()
        self.counts = dict.fromkeys((r.value for r in AuthResult), 0)
        self.nonces_evicted = 0

    @property
    def enabled(self) -> bool:
        """Whether requests must authenticate (credentials were given)."""
        return bool(self._users)

    def configure(
        self,
        credentials: Iterable[Credential],
        *,
        realm: str,
        nonce_ttl_s: float,
        max_nonces: int,
        algorithms: Sequence[str] = tuple(ALGORITHMS),
    ) -> None:
        """Apply settings at once (reload); no credentials turns checking off.

        ``algorithms`` (names in :data:`ALGORITHMS`) are challenged in that order and
        the only ones accepted. Nonces already issued stay valid when the realm is
        unchanged. Raises LocalProtocolError for an unknown or no algorithm.
        """
        if not algorithms or any(a not in ALGORITHMS for a in algorithms):
            raise LocalProtocolError(f"digest algorithms must be among {', '.join(ALGORITHMS)}")
        self.algorithms = tuple(algorithms)
        users: dict[str, list[Credential]] = {}
        for entry in credentials:
            users.setdefault(entry.username, []).append(entry)
        self._users = users
        self.realm = realm
        self.nonce_ttl_s = nonce_ttl_s
        self.max_nonces = max_nonces
        while len(self._last_nc) > max_nonces:
            self._last_nc.popitem(last=False)
            self.nonces_evicted += 1

    def challenges(self, now: float, *, stale: bool = False) -> list[str]:
        """``WWW-Authenticate`` values, one per configured algorithm, in order."""
        nonce = self._nonce(now)
        suffix = ", stale=true" if stale else ""
        return [f'Digest realm="{self.realm}", qop="auth", algorithm={algorithm}, '
                f'nonce="{nonce}", opaque="{self.opaque}"{suffix}'
                for algorithm in self.algorithms]

    def check(self, method: str, request_uri: str, authorizations: Sequence[str],
              now: float) -> Verdict:
        """Check a request's ``Authorization`` values (untrusted); counts the outcome.

        The first value that parses and names our realm is the one checked.
        Never raises on the header text.
        """
        verdict = self._verdict(method, request_uri, authorizations, now)
        self.counts[verdict.result.value] += 1
        return verdict

    def _verdict(self, method: str, request_uri: str, authorizations: Sequence[str],
                 now: float) -> Verdict:
        if not authorizations:
            return Verdict(AuthResult.MISSING)
        parsed = [parse_authorization_untrusted(value) for value in authorizations[:4]]
        ours = next((p for p in parsed if isinstance(p, DigestResponse)
                     and p.realm == self.realm), None)
        if ours is None:
            reason = next((p for p in parsed if isinstance(p, str)), "realm")
            return Verdict(AuthResult.BAD_HEADER, reason)
        if ours.algorithm not in self.algorithms:
            return Verdict(AuthResult.BAD_HEADER, "algorithm not offered")
        if ours.uri != request_uri:
            return Verdict(AuthResult.BAD_HEADER, "uri does not match the Request-URI")
        if ours.opaque is not None and ours.opaque != self.opaque:
            return Verdict(AuthResult.BAD_HEADER, "opaque")
        issued = self._nonce_time_untrusted(ours.nonce)
        if issued is None or issued > now + 1.0:
            return Verdict(AuthResult.BAD_HEADER, "nonce")
        entry = next((e for e in self._users.get(ours.username, ()) if e.password is not None
                      or (e.algorithm, e.realm) == (ours.algorithm, self.realm)), None)
        if entry is None:
            return Verdict(AuthResult.UNKNOWN_USER)
        if not hmac.compare_digest(expected_response(entry, ours, method, self.realm),
                                   ours.response):
            return Verdict(AuthResult.WRONG_RESPONSE)
        if now - issued > self.nonce_ttl_s:
            return Verdict(AuthResult.STALE)
        if not self._advance_nc(ours.nonce, int(ours.nc, 16)):
            return Verdict(AuthResult.REPLAY)
        return Verdict(AuthResult.OK, username=ours.username)

    def _nonce(self, now: float) -> str:
        stamp = _NONCE.pack(max(0, int(now * 1000)))
        return base64.b64encode(stamp + self._mac(stamp)).decode("ascii")

    def _mac(self, stamp: bytes) -> bytes:
        return hmac.new(self._secret, stamp + self.realm.encode(), hashlib.sha256).digest()

    def _nonce_time_untrusted(self, nonce: str) -> float | None:
        """The issue time (seconds) of a nonce we made, or ``None`` if we did not."""
        try:
            raw = base64.b64decode(nonce.encode("ascii"), validate=True)
        except (UnicodeEncodeError, binascii.Error):
            return None
        if len(raw) != _NONCE_BYTES:
            return None
        stamp, mac = raw[:_NONCE.size], raw[_NONCE.size:]
        if not hmac.compare_digest(self._mac(stamp), mac):
            return None
        return float(_NONCE.unpack(stamp)[0]) / 1000.0

    def _advance_nc(self, nonce: str, nc: int) -> bool:
        """Record ``nc`` for ``nonce``; False when it is not above the last one seen."""
        last = self._last_nc.get(nonce)
        if last is not None and nc <= last:
            return False
        self._last_nc[nonce] = nc
        self._last_nc.move_to_end(nonce)
        if len(self._last_nc) > self.max_nonces:
            self._last_nc.popitem(last=False)
            self.nonces_evicted += 1
        return True


def expected_response(entry: Credential, response: DigestResponse, method: str,
                      realm: str) -> str:
    """The ``response`` (hex) ``entry`` would give to ``response``'s challenge (qop=auth)."""
    hash_hex = ALGORITHMS[response.algorithm]

    def h(text: str) -> str:  # header text may hold surrogate-escaped bytes
        return hash_hex(text.encode("utf-8", "surrogateescape"))

    ha1 = entry.ha1 or h(f"{response.username}:{realm}:{entry.password}")
    ha2 = h(f"{method}:{response.uri}")
    return h(f"{ha1}:{response.nonce}:{response.nc}:{response.cnonce}:auth:{ha2}")


# --- the client side: answering a challenge (RFC 3261 §22.2, §22.3; RFC 7616 §3.4) ---------

MAX_CHALLENGES = 8
"""Challenge values of one response that are looked at; the rest are ignored."""
_UNSAFE_QUOTED = re.compile(r'["\\\x00-\x1f\x7f]')


@dataclass(frozen=True, slots=True)
class Challenge:
    """One ``WWW-Authenticate``/``Proxy-Authenticate: Digest`` challenge that offers
    ``qop=auth`` with an algorithm of :data:`ALGORITHMS`; ``stale`` is RFC 7616 §3.3's."""

    realm: str
    nonce: str
    algorithm: str
    opaque: str | None
    stale: bool


def parse_challenge_untrusted(value: str) -> Challenge | str:
    """Parse one challenge value (untrusted text): the challenge or why it cannot be
    answered. Never raises; bounded like :func:`parse_authorization_untrusted`."""
    params = _digest_params_untrusted(value)
    if isinstance(params, str):
        return params
    if "realm" not in params or "nonce" not in params:
        return "missing realm or nonce"
    algorithm = params.get("algorithm", "MD5").upper()
    if algorithm not in ALGORITHMS:
        return f"unsupported algorithm {algorithm[:20]!r}"
    if "auth" not in {q.strip().lower() for q in params.get("qop", "").split(",")}:
        return "qop=auth not offered"
    quoted = [params["realm"], params["nonce"], params.get("opaque", "")]
    if any(_UNSAFE_QUOTED.search(text) for text in quoted):
        return "quotes, backslashes or controls in realm, nonce or opaque"
    return Challenge(realm=params["realm"], nonce=params["nonce"], algorithm=algorithm,
                     opaque=params.get("opaque"),
                     stale=params.get("stale", "false").lower() == "true")


def choose_challenge(values: Sequence[str]) -> Challenge | str:
    """The challenge to answer among one response's values (the first
    :data:`MAX_CHALLENGES`): the first of the strongest algorithm, in
    :data:`ALGORITHMS` order (RFC 7616 §3.7); else why none can be answered."""
    parsed = [parse_challenge_untrusted(value) for value in values[:MAX_CHALLENGES]]
    usable = [c for c in parsed if isinstance(c, Challenge)]
    if not usable:
        return next((p for p in parsed if isinstance(p, str)), "no Digest challenge")
    order = list(ALGORITHMS)
    return min(usable, key=lambda c: order.index(c.algorithm))


def credentials_value(challenge: Challenge, entries: Sequence[Credential], method: str,
                      uri: str, *, cnonce: str, nc: int) -> str | None:
    """The ``Authorization``/``Proxy-Authorization`` value answering ``challenge`` for a
    ``method`` request to ``uri`` with qop=auth, ``cnonce`` and nonce count ``nc`` (≥ 1).

    The first entry with a password, or with an HA1 for the challenge's realm and
    algorithm, answers; ``None`` when no entry can.
    """
    entry = next((e for e in entries if e.password is not None
                  or (e.realm, e.algorithm) == (challenge.realm, challenge.algorithm)), None)
    if entry is None:
        return None
    answer = DigestResponse(
        username=entry.username, realm=challenge.realm, nonce=challenge.nonce, uri=uri,
        response="", algorithm=challenge.algorithm, cnonce=cnonce, nc=f"{nc:08x}", qop="auth",
        opaque=challenge.opaque)
    response = expected_response(entry, answer, method, challenge.realm)
    value = (f'Digest username="{entry.username}", realm="{challenge.realm}", '
             f'nonce="{challenge.nonce}", uri="{uri}", response="{response}", '
             f'algorithm={challenge.algorithm}, cnonce="{cnonce}", nc={answer.nc}, qop=auth')
    if challenge.opaque is not None:
        value += f', opaque="{challenge.opaque}"'
    return value


class ChallengeAnswerer:
    """Answers the 401/407 challenges to one client's series of requests (a binding's
    REGISTERs, an outbound call's INVITEs; RFC 3261 §22.2-22.3, RFC 7616).

    It keeps the nonce and its count across answers (the count rises while the
    server keeps the nonce) and whether the request in flight carried
    credentials (:attr:`authorized`, set by the caller when it sends): a second
    challenge to credentials is a refusal unless it says ``stale=true``.
    """

    def __init__(self) -> None:
        self.authorized = False
        self._nonce = ""
        self._nonce_count = 0

    def answer(self, status: int, challenges: Sequence[str], entries: Sequence[Credential],
               method: str, uri: str, *, cnonce: str) -> tuple[str, str] | str:
        """The ``(header name, value)`` answering a ``status`` (401 or 407) response
        whose ``WWW-Authenticate``/``Proxy-Authenticate`` values are ``challenges``,
        for a ``method`` request to ``uri``; else why it cannot be answered."""
        challenge = choose_challenge(challenges)
        if isinstance(challenge, str):
            return f"cannot answer the challenge: {challenge}"
        if self.authorized and not challenge.stale:
            return "credentials refused"
        if challenge.nonce == self._nonce:
            self._nonce_count += 1
        else:
            self._nonce, self._nonce_count = challenge.nonce, 1
        value = credentials_value(challenge, entries, method, uri, cnonce=cnonce,
                                  nc=self._nonce_count)
        if value is None:
            return f"no credentials for realm {challenge.realm[:40]!r}"
        return ("Proxy-Authorization" if status == 407 else "Authorization", value)
