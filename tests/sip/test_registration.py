"""The registration core (RFC 3261 §10.2): challenge, refresh, 423, backoff, removal;
and its REGISTERs on the UAS core's client transactions."""

from __future__ import annotations

import itertools

import pytest

from voxgate.backoff import backoff_delay_s
from voxgate.sip.digest import AuthResult, Credential, DigestAuthenticator
from voxgate.sip.headers import parse_cseq, parse_name_addr, parse_via
from voxgate.sip.message import Request, Response, make_response
from voxgate.sip.parser import parse_message_untrusted
from voxgate.sip.registration import (
    MAX_FOLLOW_UPS,
    BindingSettings,
    OutgoingRequest,
    RegistrationClient,
)
from voxgate.sip.uas import RequestCompleted, UasCore

NOW = 1000.0
REGISTRAR = ("127.0.0.1", 5070)
CONTACT = "sip:echo@127.0.0.1:5060"
ALICE = Credential("echo", password="s3cret:pw")


def settings(**changes: object) -> BindingSettings:
    values: dict[str, object] = dict(
        registrar_uri="sip:127.0.0.1:5070", registrar=REGISTRAR, aor="sip:echo@example.org",
        contact_uri=CONTACT, credentials=(ALICE,), expires_s=600, retry_initial_s=5.0,
        retry_max_s=40.0)
    values.update(changes)
    return BindingSettings(**values)  # type: ignore[arg-type]


def client(*bindings: BindingSettings) -> RegistrationClient:
    tokens = (f"t{i}" for i in itertools.count())
    return RegistrationClient(bindings or (settings(),), via_host_port="127.0.0.1:5060",
                              random_token=lambda: next(tokens))


def sent_one(reg: RegistrationClient) -> OutgoingRequest:
    out = reg.requests_to_send()
    assert len(out) == 1, out
    # what goes on the wire parses back (the registrar's view)
    parsed = parse_message_untrusted(out[0].request.serialize())
    assert isinstance(parsed, Request)
    return out[0]


def answer(out: OutgoingRequest, status: int, *extra: tuple[str, str]) -> Response:
    return make_response(out.request, status, to_tag="reg", extra=extra)


def state(reg: RegistrationClient) -> str:
    return reg.statuses(NOW)[0].state


def test_register_then_refresh_at_half_the_granted_time() -> None:
    reg = client()
    reg.start(NOW)
    first = sent_one(reg)
    request = first.request
    assert (request.method, request.uri, first.destination) == (
        "REGISTER", "sip:127.0.0.1:5070", REGISTRAR)
    assert parse_via(request.headers.get("Via") or "").branch == first.branch
    assert request.headers.get("Contact") == f"<{CONTACT}>;expires=600"
    assert request.headers.get("Expires") == "600"
    assert parse_name_addr(request.headers.get("To") or "").uri == "sip:echo@example.org"
    assert state(reg) == "registering"
    # The registrar grants 120 s for our contact (and lists another binding of the AOR).
    reg.receive_response(first.branch, answer(
        first, 200, ("Contact", "<sip:other@10.0.0.9>;expires=3600"),
        ("Contact", f"<{CONTACT}>;expires=120")), NOW)
    assert state(reg) == "registered"
    assert reg.statuses(NOW)[0].expires_in_s == 120
    assert reg.next_deadline() == NOW + 60
    reg.handle_timer(NOW + 59)
    assert reg.requests_to_send() == []
    reg.handle_timer(NOW + 60)
    refresh = sent_one(reg).request
    assert refresh.call_id == request.call_id  # §10.2: one Call-ID per binding
    assert parse_cseq(refresh.headers.get("CSeq") or "").number == 2
    assert state(reg) == "registered"  # still bound while the refresh runs
    assert reg.counts == {("sip:127.0.0.1:5070", "sip:echo@example.org", "ok"): 1}


def test_granted_time_from_the_expires_header_when_our_contact_is_not_listed() -> None:
    reg = client()
    reg.start(NOW)
    out = sent_one(reg)
    reg.receive_response(out.branch, answer(out, 200, ("Expires", "300")), NOW)
    assert reg.next_deadline() == NOW + 150


@pytest.mark.parametrize("algorithm", ["MD5", "SHA-256"])
@pytest.mark.parametrize("status", [401, 407])
def test_challenge_answered_once_with_digest(algorithm: str, status: int) -> None:
    """Our own digest server checks the answer (RFC 7616, qop=auth)."""
    server = DigestAuthenticator(secret=b"k" * 32)
    server.configure((ALICE,), realm="pbx", nonce_ttl_s=300, max_nonces=16,
                     algorithms=(algorithm,))
    ask, give = (("WWW-Authenticate", "Authorization") if status == 401
                 else ("Proxy-Authenticate", "Proxy-Authorization"))
    reg = client()
    reg.start(NOW)
    first = sent_one(reg)
    reg.receive_response(first.branch, answer(
        first, status, *((ask, c) for c in server.challenges(NOW))), NOW)
    second = sent_one(reg).request
    assert parse_cseq(second.headers.get("CSeq") or "").number == 2
    assert second.call_id == first.request.call_id
    verdict = server.check("REGISTER", second.uri, second.headers.get_all(give), NOW)
    assert verdict.result is AuthResult.OK, verdict
    assert f"algorithm={algorithm}" in (second.headers.get(give) or "")
    assert state(reg) == "registering"


def challenged(reg: RegistrationClient, challenge: str) -> OutgoingRequest:
    """Start, get a 401 with ``challenge``, return the answer sent."""
    out = sent_one(reg)
    reg.receive_response(out.branch, answer(out, 401, ("WWW-Authenticate", challenge)), NOW)
    return sent_one(reg)


CHALLENGE = 'Digest realm="pbx", nonce="n1", qop="auth,auth-int", algorithm=MD5'


def test_second_challenge_is_a_failure_unless_stale() -> None:
    reg = client()
    reg.start(NOW)
    answered = challenged(reg, CHALLENGE)
    assert "nc=00000001" in (answered.request.headers.get("Authorization") or "")
    # stale=true: the same credentials with the new nonce (RFC 7616 §3.3)
    stale = CHALLENGE.replace("n1", "n2") + ", stale=true"
    reg.receive_response(answered.branch, answer(answered, 401, ("WWW-Authenticate", stale)),
                         NOW)
    again = sent_one(reg)
    assert 'nonce="n2"' in (again.request.headers.get("Authorization") or "")
    # not stale: the credentials are wrong; no third try now, a retry after the backoff
    reg.receive_response(again.branch, answer(again, 401, ("WWW-Authenticate", CHALLENGE)),
                         NOW)
    assert reg.requests_to_send() == []
    status = reg.statuses(NOW)[0]
    assert (status.state, status.last_status, status.last_error) == (
        "failed", 401, "credentials refused")
    assert reg.next_deadline() == NOW + 5.0


def test_challenge_that_cannot_be_answered_fails() -> None:
    reg = client(settings(credentials=()))
    reg.start(NOW)
    out = sent_one(reg)
    reg.receive_response(out.branch, answer(out, 401, ("WWW-Authenticate", CHALLENGE)), NOW)
    assert state(reg) == "failed"
    assert "no credentials" in reg.statuses(NOW)[0].last_error
    reg = client()
    reg.start(NOW)
    out = sent_one(reg)
    only_int = CHALLENGE.replace("auth,auth-int", "auth-int")
    reg.receive_response(out.branch, answer(out, 401, ("WWW-Authenticate", only_int)), NOW)
    assert "qop=auth not offered" in reg.statuses(NOW)[0].last_error


def test_interval_too_brief_asks_again_with_min_expires() -> None:
    reg = client()
    reg.start(NOW)
    out = sent_one(reg)
    reg.receive_response(out.branch, answer(out, 423, ("Min-Expires", "1800")), NOW)
    again = sent_one(reg).request
    assert again.headers.get("Expires") == "1800"
    assert again.headers.get("Contact") == f"<{CONTACT}>;expires=1800"
    # a 423 whose Min-Expires is not above what we asked is a failure
    reg = client()
    reg.start(NOW)
    out = sent_one(reg)
    reg.receive_response(out.branch, answer(out, 423, ("Min-Expires", "600")), NOW)
    assert state(reg) == "failed"


def test_failures_back_off_and_success_resets() -> None:
    reg = client()
    reg.start(NOW)
    now = NOW
    for failures in range(1, 6):
        out = sent_one(reg)
        if failures % 2:
            reg.receive_response(out.branch, answer(out, 503, ("Warning", '399 pbx "busy"')),
                                 now)
        else:
            reg.receive_response(out.branch, None, now)  # Timer F
        delay = backoff_delay_s(failures, 5.0, 40.0)
        assert reg.next_deadline() == now + delay
        assert reg.statuses(now)[0].failures == failures
        now += delay
        reg.handle_timer(now)
        assert state(reg) == "registering"
    assert reg.statuses(now)[0].next_try_in_s is None
    out = sent_one(reg)
    reg.receive_response(out.branch, answer(out, 200), now)
    assert reg.statuses(now)[0].failures == 0
    counts = {result: n for (_, _, result), n in reg.counts.items()}
    assert counts == {"rejected": 3, "timeout": 2, "ok": 1}


def test_stop_removes_the_binding_with_expires_zero() -> None:
    reg = client()
    reg.start(NOW)
    out = sent_one(reg)
    reg.receive_response(out.branch, answer(out, 200), NOW)
    reg.stop(NOW + 1)
    removal = sent_one(reg)
    assert removal.request.headers.get("Expires") == "0"
    assert removal.request.headers.get("Contact") == f"<{CONTACT}>;expires=0"
    assert reg.pending and state(reg) == "unregistering"
    # the removal may be challenged too
    reg.receive_response(removal.branch, answer(removal, 401, ("WWW-Authenticate", CHALLENGE)),
                         NOW + 1)
    authorized = sent_one(reg)
    assert authorized.request.headers.get("Expires") == "0"
    reg.receive_response(authorized.branch, answer(authorized, 200), NOW + 1)
    assert state(reg) == "unregistered" and not reg.pending
    assert reg.next_deadline() is None


def test_stop_while_registering_removes_after_the_answer_and_never_retries() -> None:
    reg = client(settings(), settings(aor="sip:other@example.org"))
    reg.start(NOW)
    first, second = reg.requests_to_send()
    reg.stop(NOW)
    assert reg.requests_to_send() == [] and reg.pending
    reg.receive_response(first.branch, answer(first, 200), NOW)
    removal = sent_one(reg)
    assert removal.request.headers.get("Expires") == "0"
    reg.receive_response(second.branch, answer(second, 503), NOW)  # no retry when stopping
    reg.receive_response(removal.branch, None, NOW)  # the registrar went away
    assert [s.state for s in reg.statuses(NOW)] == ["unregistered", "unregistered"]
    assert not reg.pending and reg.next_deadline() is None


def test_register_runs_on_a_uas_client_transaction() -> None:
    """Timer E retransmits the REGISTER; its final response, or Timer F, comes back as
    RequestCompleted with the branch."""
    core = UasCore(local_host="127.0.0.1", local_port=5060)
    reg = client()
    reg.start(NOW)
    out = sent_one(reg)
    assert core.send_request(out.request, out.destination, NOW)
    assert core.datagrams_to_send() == [(out.request.serialize(), REGISTRAR)]
    core.handle_timer(NOW + 0.5)
    assert core.datagrams_to_send() == [(out.request.serialize(), REGISTRAR)]  # Timer E
    core.receive_datagram(answer(out, 200).serialize(), REGISTRAR, NOW + 0.6)
    event = core.next_event()
    assert isinstance(event, RequestCompleted) and event.branch == out.branch
    assert event.response is not None and event.response.status == 200
    core.receive_datagram(answer(out, 200).serialize(), REGISTRAR, NOW + 0.7)
    assert core.next_event() is None  # a retransmitted 200 is absorbed
    # no answer at all: Timer F (64·T1)
    reg.receive_response(out.branch, event.response, NOW + 1)
    reg.handle_timer(NOW + 1000)
    refresh = sent_one(reg)
    assert core.send_request(refresh.request, refresh.destination, NOW + 1000)
    core.handle_timer(NOW + 1000 + 32)
    core.handle_timer(NOW + 1000 + 33)
    assert core.next_event() == RequestCompleted(refresh.branch, None)
    assert core.active_transactions == 0


def test_a_registrar_that_always_says_stale_fails_the_try() -> None:
    reg = client()
    reg.start(NOW)
    out = sent_one(reg)
    for nonce in range(10):
        stale = CHALLENGE.replace("n1", f"s{nonce}") + ", stale=true"
        reg.receive_response(out.branch, answer(out, 401, ("WWW-Authenticate", stale)), NOW)
        sent = reg.requests_to_send()
        if not sent:
            break
        out = sent[0]
    assert nonce == MAX_FOLLOW_UPS
    status = reg.statuses(NOW)[0]
    assert (status.state, status.last_error) == (
        "failed", f"401 again after {MAX_FOLLOW_UPS} follow-up REGISTERs")
    # the next try starts afresh
    reg.handle_timer(NOW + 5)
    out = sent_one(reg)
    reg.receive_response(out.branch, answer(out, 401, ("WWW-Authenticate", CHALLENGE)), NOW + 5)
    assert len(reg.requests_to_send()) == 1


def test_retry_after_of_a_refusal_is_honoured_when_longer_than_the_backoff() -> None:
    reg = client()
    reg.start(NOW)
    out = sent_one(reg)
    reg.receive_response(out.branch, answer(out, 503, ("Retry-After", "120 (maintenance)")),
                         NOW)
    assert reg.next_deadline() == NOW + 120
    reg.handle_timer(NOW + 120)
    out = sent_one(reg)
    reg.receive_response(out.branch, answer(out, 503, ("Retry-After", "1")), NOW + 120)
    assert reg.next_deadline() == NOW + 120 + backoff_delay_s(2, 5.0, 40.0)
