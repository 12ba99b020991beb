"""The 49 RFC 4475 torture messages through voxgate.sip.parser.

Each file either parses (as a Request with the given method or a Response
with the given status) or raises BadMessage with the given status hint
(``None``: dropped without an answer). The UAS layer, not the parser, picks
405/416/420/501… for the messages that parse. Where RFC 4475 lets an element
be liberal, the comment says which way the parser goes.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from voxgate.sip.headers import parse_name_addr, parse_via
from voxgate.sip.message import Request, Response
from voxgate.sip.parser import BadMessage, parse_message_untrusted

_HERE = Path(__file__).resolve()
_CANDIDATES = [
    _HERE.parents[3] / "shared" / "conformance" / "rfc4475",  # /work/main/tests/sip → /work/shared
    _HERE.parents[2] / "shared" / "conformance" / "rfc4475",  # shared/ inside the checkout
]
CORPUS = next((path for path in _CANDIDATES if (path / "INDEX.md").is_file()), None)

needs_corpus = pytest.mark.skipif(
    CORPUS is None,
    reason="RFC 4475 corpus not found: expected shared/conformance/rfc4475/ beside the repository",
)

# file → ("request", method) | ("response", status) | ("bad", status_hint)
EXPECTED: dict[str, tuple[str, object]] = {
    # §3.1.1 valid messages
    "wsinv.dat": ("request", "INVITE"),
    "intmeth.dat": ("request", "!interesting-Method0123456789_*+`.%indeed'~"),
    "esc01.dat": ("request", "INVITE"),
    "escnull.dat": ("request", "REGISTER"),
    "esc02.dat": ("request", "RE%47IST%45R"),  # "%" is a token char: unknown method → UAS 501
    "lwsdisp.dat": ("request", "OPTIONS"),
    "longreq.dat": ("request", "INVITE"),
    "dblreq.dat": ("request", "REGISTER"),
    "semiuri.dat": ("request", "OPTIONS"),
    "transports.dat": ("request", "OPTIONS"),
    "mpart01.dat": ("request", "MESSAGE"),
    "unreason.dat": ("response", 200),
    "noreason.dat": ("response", 100),
    # §3.1.2 invalid messages
    "badinv01.dat": ("bad", 400),
    "clerr.dat": ("bad", 400),
    "ncl.dat": ("bad", 400),
    "scalar02.dat": ("bad", 400),
    "scalarlg.dat": ("bad", None),
    "quotbal.dat": ("bad", 400),
    "ltgtruri.dat": ("bad", 400),
    "lwsruri.dat": ("bad", 400),
    "lwsstart.dat": ("bad", 400),
    "trws.dat": ("bad", 400),  # strict: SP after SIP-Version
    "escruri.dat": ("bad", 400),  # strict: headers in a Request-URI (§19.1.1 Table 1)
    "baddate.dat": ("request", "INVITE"),  # liberal: Date is not interpreted
    "regbadct.dat": ("bad", 400),  # strict: "?" in an addr-spec without <> (§20)
    "badaspec.dat": ("bad", 400),  # strict: spaces inside <>
    "baddn.dat": ("bad", 400),
    "badvers.dat": ("bad", 505),
    "mismatch01.dat": ("bad", 400),
    "mismatch02.dat": ("bad", 400),
    "bigcode.dat": ("bad", None),
    # §3.2 transaction layer
    "badbranch.dat": ("request", "OPTIONS"),
    # §3.3 application layer
    "insuf.dat": ("bad", 400),
    "unkscm.dat": ("request", "OPTIONS"),
    "novelsc.dat": ("request", "OPTIONS"),
    "unksm2.dat": ("request", "REGISTER"),
    "bext01.dat": ("request", "OPTIONS"),
    "invut.dat": ("request", "INVITE"),
    "regaut01.dat": ("request", "REGISTER"),
    "multi01.dat": ("bad", 400),
    "mcl01.dat": ("bad", 400),
    "bcast.dat": ("response", 200),
    "zeromf.dat": ("request", "OPTIONS"),
    "cparam01.dat": ("request", "REGISTER"),
    "cparam02.dat": ("request", "REGISTER"),
    "regescrt.dat": ("request", "REGISTER"),
    "sdp01.dat": ("request", "INVITE"),
    # §3.4 backward compatibility
    "inv2543.dat": ("request", "INVITE"),
}


def load(name: str) -> bytes:
    assert CORPUS is not None
    return (CORPUS / name).read_bytes()


def parse(name: str) -> Request | Response:
    return parse_message_untrusted(load(name))


@needs_corpus
def test_expectations_cover_the_corpus():
    assert CORPUS is not None
    assert sorted(p.name for p in CORPUS.glob("*.dat")) == sorted(EXPECTED)
    assert len(EXPECTED) == 49


@needs_corpus
@pytest.mark.parametrize(("name", "expected"), sorted(EXPECTED.items()))
def test_torture_message(name, expected):
    kind, value = expected
    if kind == "bad":
        with pytest.raises(BadMessage) as info:
            parse(name)
        assert info.value.status_hint == value, info.value.reason
        if value is not None:  # an answer needs the headers to copy
            partial = info.value.partial
            assert partial is not None
            assert partial.headers.get("Via") is not None
            assert partial.headers.get("CSeq") is not None
        return
    message = parse(name)
    if kind == "request":
        assert isinstance(message, Request)
        assert message.method == value
    else:
        assert isinstance(message, Response)
        assert message.status == value


@needs_corpus
def test_wsinv_details():
    request = parse("wsinv.dat")
    assert isinstance(request, Request)
    headers = request.headers
    assert request.uri == "sip:vivekg@chair-dnrc.example.com;unknownparam"
    vias = [parse_via(v) for v in headers.get_all("Via")]
    assert [(v.transport, v.host, v.branch) for v in vias] == [
        ("UDP", "192.0.2.2", "390skdjuw"),
        ("TCP", "spindle.example.com", "z9hG4bK9ikj8"),
        ("UDP", "192.168.255.111", "z9hG4bK30239"),
    ]
    assert parse_name_addr(headers.get("To") or "").tag == "1918181833n"
    sender = parse_name_addr(headers.get("From") or "")
    assert (sender.display, sender.tag) == ('J Rosenberg \\"', "98asjd8")
    assert headers.get("Max-Forwards") == "0068"
    assert headers.get("CSeq") == "0009 INVITE"
    assert headers.get("Subject") == ""
    assert headers.get("NewFangledHeader") == "newfangled value continued newfangled value"
    assert headers.get("UnknownHeaderWithUnusualValue") == ";;,,;;,;"
    contact = parse_name_addr(headers.get("Contact") or "")
    assert contact.params == {"newparam": "newvalue", "secondparam": None, "q": "0.33"}
    assert len(request.body) == 150


@needs_corpus
def test_valid_message_details():
    assert len(parse("longreq.dat").headers.get_all("Via")) == 34
    assert len(parse("transports.dat").headers.get_all("Via")) == 5
    assert len(parse("semiuri.dat").headers.get_all("Accept")) == 6
    assert len(parse("esc02.dat").headers.get_all("Contact")) == 2  # C%6Fntact is another header
    assert parse("esc02.dat").headers.get("C%6Fntact") == "<sip:alias2@host2.example.com>"
    assert parse("dblreq.dat").body == b""  # the second message is ignored
    assert len(parse("mpart01.dat").body) == 553
    assert parse("inv2543.dat").body.startswith(b"v=0")  # no Content-Length: rest of datagram
    assert (
        parse("intmeth.dat").headers.get("Call-ID")
        == "intmeth.word%ZK-!.*_+'@word`~)(><:\\/\"][?}{"
    )


@needs_corpus
def test_odd_reason_phrases():
    unreason = parse("unreason.dat")
    assert isinstance(unreason, Response)
    assert unreason.reason.startswith("= 2**3 * 5**2 но")
    noreason = parse("noreason.dat")
    assert isinstance(noreason, Response)
    assert noreason.reason == ""


@needs_corpus
def test_insuf_names_the_missing_headers():
    with pytest.raises(BadMessage) as info:
        parse("insuf.dat")
    assert info.value.reason == "missing required header(s): From, To, Call-ID"


@needs_corpus
def test_mutated_corpus_only_ever_raises_bad_message():
    """Truncate, flip, insert and cut bytes (fixed seed): BadMessage or a message, nothing else."""
    corpus = [load(name) for name in sorted(EXPECTED)]
    rng = random.Random(4475)
    alphabet = b'\r\n \t:;,<>"\\@%=/\x00\x80\xff\xc3SIP/2.0 0123456789'
    outcomes = {"parsed": 0, "bad": 0}
    for _ in range(5000):
        data = bytearray(rng.choice(corpus))
        for _ in range(rng.randint(1, 4)):
            op = rng.randrange(4)
            pos = rng.randrange(len(data) + 1)
            if op == 0:
                del data[pos:]
            elif op == 1 and pos < len(data):
                data[pos] = rng.choice(alphabet)
            elif op == 2:
                data.insert(pos, rng.choice(alphabet))
            else:
                del data[pos : pos + rng.randint(1, 20)]
        try:
            message = parse_message_untrusted(bytes(data))
        except BadMessage as exc:
            outcomes["bad"] += 1
            if exc.partial is not None:
                exc.partial.serialize()
        else:
            outcomes["parsed"] += 1
            message.serialize()
    assert outcomes["parsed"] > 0
    assert outcomes["bad"] > 0
