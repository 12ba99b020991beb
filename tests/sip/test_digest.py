"""Digest authentication (RFC 7616 vectors, RFC 3261 §22.4 flow, hostile headers)."""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys

import pytest

from voxgate.errors import LocalProtocolError
from voxgate.sip.digest import (
    MAX_HEADER_CHARS,
    AuthResult,
    Credential,
    DigestAuthenticator,
    DigestResponse,
    expected_response,
    parse_authorization_untrusted,
    parse_credentials,
)

URI = "sip:agent@127.0.0.1:5060"
NOW = 1000.0

# RFC 7616 §3.9.1 (with its erratum: the password is "Circle of Life")
RFC_USER, RFC_PASSWORD, RFC_REALM = "Mufasa", "Circle of Life", "http-auth@example.org"
RFC_NONCE = "7ypf/xlj9XXwfDPEoM4URrv/xwf94BcCAzFZH4GiTo0v"
RFC_CNONCE = "f2/wE4q74E6zIJEtWaHKaf5wv/H5QzzpXusqGemxURZJ"
RFC_OPAQUE = "FQhe/qaU925kfnzjCev0ciny7QMkPqMAFRtzCUYo5tdS"
RFC_RESPONSES = {
    "MD5": "8ca523f5e9506fed4657c9700eebdbec",
    "SHA-256": "753927fa0e85d155564e2e272a28d1802ca10daf4496794697cf8db5856cb6c1",
}
_HASHES = {"MD5": hashlib.md5, "SHA-256": hashlib.sha256}


def authorization(challenge: str, user: str, password: str, *, method: str = "INVITE",
                  uri: str = URI, nc: int = 1, cnonce: str = "0a4f113b",
                  response: str | None = None) -> str:
    """An ``Authorization`` value answering ``challenge`` (a client, written apart
    from the code under test)."""
    params = dict(re.findall(r'(\w+)="?([^",]*)"?', challenge.removeprefix("Digest ")))
    algorithm = params["algorithm"]

    def h(text: str) -> str:
        return _HASHES[algorithm](text.encode()).hexdigest()

    ha1 = h(f"{user}:{params['realm']}:{password}")
    ha2 = h(f"{method}:{uri}")
    if response is None:
        response = h(f"{ha1}:{params['nonce']}:{nc:08x}:{cnonce}:auth:{ha2}")
    return (f'Digest username="{user}", realm="{params["realm"]}", nonce="{params["nonce"]}", '
            f'uri="{uri}", response="{response}", algorithm={algorithm}, qop=auth, '
            f'nc={nc:08x}, cnonce="{cnonce}", opaque="{params["opaque"]}"')


def authenticator(*entries: Credential, ttl_s: float = 300.0,
                  max_nonces: int = 64) -> DigestAuthenticator:
    auth = DigestAuthenticator(secret=b"k" * 32)
    auth.configure(entries or (Credential("alice", password="wonder land"),),
                   realm="voxgate", nonce_ttl_s=ttl_s, max_nonces=max_nonces)
    return auth


@pytest.mark.parametrize("algorithm", ["MD5", "SHA-256"])
def test_rfc7616_example_vectors(algorithm: str) -> None:
    header = (f'Digest username="{RFC_USER}", realm="{RFC_REALM}", uri="/dir/index.html", '
              f'algorithm={algorithm}, nonce="{RFC_NONCE}", nc=00000001, '
              f'cnonce="{RFC_CNONCE}", qop=auth, response="{RFC_RESPONSES[algorithm]}", '
              f'opaque="{RFC_OPAQUE}"')
    parsed = parse_authorization_untrusted(header)
    assert isinstance(parsed, DigestResponse), parsed
    assert (parsed.algorithm, parsed.nc, parsed.opaque) == (algorithm, "00000001", RFC_OPAQUE)
    entry = Credential(RFC_USER, password=RFC_PASSWORD)
    assert expected_response(entry, parsed, "GET", RFC_REALM) == RFC_RESPONSES[algorithm]
    ha1 = _HASHES[algorithm](f"{RFC_USER}:{RFC_REALM}:{RFC_PASSWORD}".encode()).hexdigest()
    stored = Credential(RFC_USER, realm=RFC_REALM, algorithm=algorithm, ha1=ha1)
    assert expected_response(stored, parsed, "GET", RFC_REALM) == RFC_RESPONSES[algorithm]


def test_challenges_offer_sha256_then_md5_with_one_nonce() -> None:
    first, second = authenticator().challenges(NOW)
    assert first.startswith('Digest realm="voxgate", qop="auth", algorithm=SHA-256, nonce="')
    assert "algorithm=MD5" in second
    nonces = [re.findall(r'nonce="([^"]+)"', c) for c in (first, second)]
    assert nonces[0] == nonces[1] and len(nonces[0]) == 1
    assert "stale" not in first
    assert all(c.endswith(", stale=true") for c in authenticator().challenges(NOW, stale=True))


@pytest.mark.parametrize("which", [0, 1])
def test_valid_response_passes_once_then_is_a_replay(which: int) -> None:
    auth = authenticator()
    header = authorization(auth.challenges(NOW)[which], "alice", "wonder land")
    verdict = auth.check("INVITE", URI, [header], NOW + 1)
    assert (verdict.result, verdict.username) == (AuthResult.OK, "alice")
    assert auth.check("INVITE", URI, [header], NOW + 2).result is AuthResult.REPLAY
    challenge = auth.challenges(NOW)[which]
    later = authorization(challenge, "alice", "wonder land", nc=2)
    assert auth.check("INVITE", URI, [later], NOW + 3).result is AuthResult.OK
    again = authorization(challenge, "alice", "wonder land", nc=2, cnonce="other")
    assert auth.check("INVITE", URI, [again], NOW + 4).result is AuthResult.REPLAY
    assert auth.counts == {"ok": 2, "missing": 0, "bad_header": 0, "unknown_user": 0,
                           "wrong_response": 0, "stale": 0, "replay": 2}


def test_outcomes_are_told_apart_and_counted() -> None:
    auth = authenticator()
    challenge = auth.challenges(NOW)[0]
    cases = [
        ([], AuthResult.MISSING),
        (["Basic YWxhZGRpbjpvcGVuc2VzYW1l"], AuthResult.BAD_HEADER),
        ([authorization(challenge, "mallory", "wonder land")], AuthResult.UNKNOWN_USER),
        ([authorization(challenge, "alice", "guess")], AuthResult.WRONG_RESPONSE),
        ([authorization(challenge, "alice", "wonder land", uri="sip:other@127.0.0.1")],
         AuthResult.BAD_HEADER),
        ([authorization(challenge, "alice", "wonder land", method="BYE")],
         AuthResult.WRONG_RESPONSE),
        ([authorization(challenge.replace('"voxgate"', '"elsewhere"'), "alice", "wonder land")],
         AuthResult.BAD_HEADER),
    ]
    for headers, expected in cases:
        assert auth.check("INVITE", URI, headers, NOW).result is expected, headers
    assert auth.counts["bad_header"] == 3 and auth.counts["ok"] == 0


def test_forged_or_foreign_nonce_is_refused() -> None:
    auth = authenticator()
    stranger = DigestAuthenticator(secret=b"x" * 32, opaque=auth.opaque)
    stranger.configure([Credential("alice", password="wonder land")], realm="voxgate",
                       nonce_ttl_s=300, max_nonces=16)
    header = authorization(stranger.challenges(NOW)[0], "alice", "wonder land")
    verdict = auth.check("INVITE", URI, [header], NOW)
    assert (verdict.result, verdict.reason) == (AuthResult.BAD_HEADER, "nonce")
    for nonce in ("", "!!!", "QUJD", "A" * 56):
        forged = re.sub(r'nonce="[^"]*"', f'nonce="{nonce}"', header)
        assert auth.check("INVITE", URI, [forged], NOW).result is AuthResult.BAD_HEADER


def test_expired_nonce_is_stale_only_with_the_right_response() -> None:
    auth = authenticator(ttl_s=30)
    challenge = auth.challenges(NOW)[1]
    good = authorization(challenge, "alice", "wonder land")
    bad = authorization(challenge, "alice", "nope")
    assert auth.check("INVITE", URI, [bad], NOW + 31).result is AuthResult.WRONG_RESPONSE
    assert auth.check("INVITE", URI, [good], NOW + 31).result is AuthResult.STALE
    fresh = authorization(auth.challenges(NOW + 31)[1], "alice", "wonder land")
    assert auth.check("INVITE", URI, [fresh], NOW + 32).result is AuthResult.OK


def test_only_the_configured_algorithms_are_challenged_and_accepted() -> None:
    auth = authenticator()
    sha, _ = auth.challenges(NOW)
    auth.configure([Credential("alice", password="wonder land")], realm="voxgate",
                   nonce_ttl_s=300, max_nonces=16, algorithms=["MD5"])
    (md5,) = auth.challenges(NOW)
    assert "algorithm=MD5" in md5
    verdict = auth.check("INVITE", URI, [authorization(sha, "alice", "wonder land")], NOW)
    assert (verdict.result, verdict.reason) == (AuthResult.BAD_HEADER, "algorithm not offered")
    with pytest.raises(LocalProtocolError):
        auth.configure([], realm="voxgate", nonce_ttl_s=300, max_nonces=16, algorithms=["SHA1"])


def test_stored_ha1_for_one_algorithm() -> None:
    ha1 = hashlib.md5(b"bob:voxgate:s3cret").hexdigest()
    auth = authenticator(Credential("bob", realm="voxgate", algorithm="MD5", ha1=ha1))
    sha, md5 = auth.challenges(NOW)
    assert auth.check("INVITE", URI, [authorization(md5, "bob", "s3cret")], NOW).result \
        is AuthResult.OK
    assert auth.check("INVITE", URI, [authorization(sha, "bob", "s3cret")], NOW).result \
        is AuthResult.UNKNOWN_USER


def test_replay_table_is_bounded_and_evictions_counted() -> None:
    auth = authenticator(max_nonces=16)
    for i in range(20):
        header = authorization(auth.challenges(NOW + i)[0], "alice", "wonder land")
        assert auth.check("INVITE", URI, [header], NOW + i).result is AuthResult.OK
    assert auth.nonces_evicted == 4
    auth.configure([Credential("alice", password="x")], realm="voxgate", nonce_ttl_s=300,
                   max_nonces=16)
    assert auth.enabled and auth.nonces_evicted == 4
    auth.configure([], realm="voxgate", nonce_ttl_s=300, max_nonces=16)
    assert not auth.enabled


def test_our_realm_is_picked_among_several_authorizations() -> None:
    auth = authenticator()
    ours = authorization(auth.challenges(NOW)[0], "alice", "wonder land")
    theirs = ours.replace('realm="voxgate"', 'realm="proxy"')
    assert auth.check("INVITE", URI, ["garbage", theirs, ours], NOW).result is AuthResult.OK


HOSTILE = [
    "",
    "Digest",
    "Digest ",
    "digest username",
    'Digest username="a',
    'Digest username="a\\"',
    "Digest username=a,,realm=b",
    'Digest username="a", username="b", realm="voxgate", nonce="n", uri="u", response="0"',
    "Digest " + ", ".join(f"p{i}=v" for i in range(40)),
    "Digest username=" + "a" * MAX_HEADER_CHARS,
    'Digest username="a\r\nVia: x", realm="voxgate"',
    'Digest username="a", realm="voxgate", nonce="n", uri="u", response="zz", qop=auth, '
    'nc=00000001, cnonce="c"',
    'Digest username="a", realm="voxgate", nonce="n", uri="u", response="' + "0" * 32 + '"',
    'Digest username="a", realm="voxgate", nonce="n", uri="u", response="' + "0" * 32
    + '", qop=auth-int, nc=00000001, cnonce="c"',
    'Digest username="a", realm="voxgate", nonce="n", uri="u", response="' + "0" * 32
    + '", qop=auth, nc=1, cnonce="c"',
    'Digest username="a", realm="voxgate", nonce="n", uri="u", response="' + "0" * 32
    + '", qop=auth, nc=00000001, cnonce="c", algorithm=SHA-512-256',
    'Digest username="a", realm="voxgate", nonce="n", uri="u", response="' + "0" * 32
    + '", qop=auth, nc=00000001, cnonce="c", userhash=true',
    "Digest \udcff=\udcfe",
    "Digest a=" + '"' + "\\" * 3000,
]


@pytest.mark.parametrize("value", HOSTILE)
def test_hostile_headers_are_refused_without_raising(value: str) -> None:
    assert isinstance(parse_authorization_untrusted(value), str)
    assert authenticator().check("INVITE", URI, [value], NOW).result is AuthResult.BAD_HEADER


def test_quoted_pairs_and_token_values_parse() -> None:
    parsed = parse_authorization_untrusted(
        'DIGEST username="a\\"b", realm=voxgate ,nonce="n",uri="sip:x",response='
        + "A" * 32 + ",qop=\"auth\",nc=0000000A,cnonce=c")
    assert isinstance(parsed, DigestResponse)
    assert (parsed.username, parsed.realm, parsed.response) == ('a"b', "voxgate", "a" * 32)


def test_credentials_file_forms() -> None:
    ha1 = "0123456789abcdef" * 4
    text = f"# users\n\nalice:pass:word\nbob:voxgate:{ha1.upper()}\nbob:pw\n  carol:x  \n"
    assert parse_credentials(text) == (
        Credential("alice", password="pass:word"),
        Credential("bob", realm="voxgate", algorithm="SHA-256", ha1=ha1),
        Credential("bob", password="pw"),
        Credential("carol", password="x"),
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "no credentials"),
        ("# only a comment\n", "no credentials"),
        ("alice\n", "line 1: must be"),
        ("alice:ok\n:nouser\n", "line 2: must be"),
        ("alice:\n", "line 1: must be"),
        ('al"ice:pw\n', "line 1: must be"),
        ("alice:a\nalice:b\n", "line 2: 'alice' is given twice"),
    ],
)
def test_malformed_credentials_name_the_line(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_credentials(text)


def test_import_does_not_pull_trio() -> None:
    code = "import sys, voxgate.sip.digest; assert 'trio' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
