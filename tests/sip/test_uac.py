"""Outbound calls in the UAS core: our INVITE as a UAC (RFC 3261 §13.2, §17.1.1, §9.1, §22.2)."""

from __future__ import annotations

import pytest

from tests.sip.fakelink import SDP_ANSWER, FakeLink, invite_branch, to_tag_of
from voxgate.errors import LocalProtocolError
from voxgate.sip.digest import Credential, DigestAuthenticator
from voxgate.sip.message import Request, Response, make_response
from voxgate.sip.uas import (
    CallEnded,
    HangupCompleted,
    OutboundAnswered,
    OutboundFailed,
    OutboundProgress,
)

TARGET = "sip:callee@127.0.0.2:5070"
OFFER = b"v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=voxgate\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
CALLEE_TAG = "calleetag"
CALLEE_CONTACT = "<sip:callee@127.0.0.2:5070>"


def dial(link: FakeLink, **kwargs: object) -> tuple[str, Request]:
    """Our INVITE to TARGET: (call key, the INVITE as the callee got it)."""
    key = link.core.invite(TARGET, OFFER, link.clock.now, **kwargs)  # type: ignore[arg-type]
    link.pump()
    (invite,) = link.requests
    link.requests.clear()
    return key, invite


def answer(invite: Request, status: int, *, body: bytes = b"",
           extra: list[tuple[str, str]] | None = None) -> Response:
    """The callee's response to ``invite`` (tagged, with Contact for 1xx-2xx)."""
    headers = [("Contact", CALLEE_CONTACT)] if status < 300 else []
    return make_response(invite, status, to_tag=CALLEE_TAG, extra=headers + (extra or []),
                         body=body)


def answered(link: FakeLink) -> tuple[str, Request]:
    key, invite = dial(link)
    link.send(answer(invite, 200, body=SDP_ANSWER))
    assert link.take_events() == [OutboundAnswered(key, SDP_ANSWER)]
    link.requests.clear()
    return key, invite


def test_invite_ringing_answer_ack_then_our_bye() -> None:
    link = FakeLink()
    key, invite = dial(link)
    assert invite.method == "INVITE" and invite.uri == TARGET
    assert invite.body == OFFER
    assert invite.headers.get("To") == f"<{TARGET}>"
    assert to_tag_of(invite) is None
    assert "tag=" in (invite.headers.get("From") or "")
    assert invite.headers.get("Contact") == "<sip:127.0.0.1:5060>"
    assert invite.headers.get("Content-Type") == "application/sdp"

    link.send(answer(invite, 100))
    link.send(answer(invite, 180))
    assert link.take_events() == [OutboundProgress(key, 180)]

    ok = answer(invite, 200, body=SDP_ANSWER)
    ok.headers.add("Record-Route", "<sip:127.0.0.2:5070;lr>")
    link.send(ok)
    assert link.take_events() == [OutboundAnswered(key, SDP_ANSWER)]
    (ack,) = link.requests
    assert ack.method == "ACK" and ack.uri == "sip:callee@127.0.0.2:5070"
    assert ack.headers.get("CSeq") == f"{(invite.headers.get('CSeq') or '').split()[0]} ACK"
    assert to_tag_of(ack) == CALLEE_TAG
    assert ack.headers.get("Route") == "<sip:127.0.0.2:5070;lr>"
    assert invite_branch(ack) != invite_branch(invite)  # §13.2.2.4: its own transaction

    link.core.hangup(key, link.clock.now, reason="agent-hangup")
    link.pump()
    bye = link.requests[-1]
    assert bye.method == "BYE"
    assert to_tag_of(bye) == CALLEE_TAG
    assert int((bye.headers.get("CSeq") or "").split()[0]) == int(
        (invite.headers.get("CSeq") or "").split()[0]) + 1
    link.reply(bye, 200)
    assert link.take_events() == [HangupCompleted(key, 200)]


def test_retransmitted_2xx_is_acked_again() -> None:
    link = FakeLink()
    key, invite = dial(link)
    ok = answer(invite, 200, body=SDP_ANSWER)
    link.send(ok)
    link.send(ok)
    link.send(ok)
    acks = [r for r in link.requests if r.method == "ACK"]
    assert len(acks) == 3
    assert len({a.serialize() for a in acks}) == 1
    assert link.take_events() == [OutboundAnswered(key, SDP_ANSWER)]
    link.advance(33.0)  # Timer M (RFC 6026): the INVITE transaction is gone, the call goes on
    assert link.core.active_transactions == 0
    assert link.core.active_dialogs == 1


def test_callee_hangs_up_with_bye() -> None:
    link = FakeLink()
    key, invite = answered(link)
    our_tag = (invite.headers.get("From") or "").split("tag=")[1]
    bye = link.uac.request("BYE", uri="sip:127.0.0.1:5060", to_tag=our_tag)
    # the callee's BYE: From is the callee (its tag), To is us (our tag)
    bye.headers.set("From", f"{CALLEE_CONTACT};tag={CALLEE_TAG}")
    bye.headers.set("To", invite.headers.get("From") or "")
    bye.headers.set("Call-ID", invite.call_id)
    link.send(bye)
    assert link.statuses()[-1] == 200
    assert link.take_events() == [CallEnded(key, "bye")]


def test_busy_callee_is_acked_and_fails() -> None:
    link = FakeLink()
    key, invite = dial(link)
    busy = answer(invite, 486)
    link.send(busy)
    (ack,) = link.requests
    assert ack.method == "ACK"
    assert invite_branch(ack) == invite_branch(invite)  # §17.1.1.3: the INVITE's transaction
    assert to_tag_of(ack) == CALLEE_TAG
    assert link.take_events() == [OutboundFailed(key, 486, "486 Busy Here")]
    link.send(busy)  # retransmitted: ACKed again, reported once
    assert [r.method for r in link.requests] == ["ACK", "ACK"]
    assert link.take_events() == []
    link.advance(33.0)  # Timer D (64·T1)
    assert link.core.active_transactions == 0


def test_no_answer_retransmits_then_timer_b_fails() -> None:
    link = FakeLink()
    key, _ = dial(link)
    link.advance(31.0)
    assert len(link.requests) == 5  # Timer A: at 0.5, 1.5, 3.5, 7.5, 15.5 s (no T2 cap)
    link.advance(2.0)
    assert link.take_events() == [OutboundFailed(key, None, "no final response (Timer B)")]


def test_challenge_answered_with_credentials() -> None:
    link = FakeLink()
    server = DigestAuthenticator(secret=b"k" * 32)
    server.configure((Credential("alice", "secret"),), realm="voxgate-test", nonce_ttl_s=60,
                     max_nonces=16, algorithms=("MD5",))
    key, invite = dial(link, credentials=(Credential("alice", "secret"),))
    challenges = [("Proxy-Authenticate", c) for c in server.challenges(link.clock.now)]
    link.send(answer(invite, 407, extra=challenges))
    ack, again = link.requests
    assert ack.method == "ACK" and again.method == "INVITE"
    assert again.call_id == invite.call_id
    assert again.headers.get("From") == invite.headers.get("From")
    first_cseq = int((invite.headers.get("CSeq") or "").split()[0])
    assert again.headers.get("CSeq") == f"{first_cseq + 1} INVITE"
    verdict = server.check("INVITE", again.uri,
                           again.headers.get_all("Proxy-Authorization"), link.clock.now)
    assert verdict.username == "alice"
    assert link.take_events() == []
    link.requests.clear()

    link.send(answer(again, 200, body=SDP_ANSWER))
    assert link.take_events() == [OutboundAnswered(key, SDP_ANSWER)]
    (ack,) = link.requests
    assert ack.headers.get("CSeq") == f"{first_cseq + 1} ACK"


def test_second_challenge_to_credentials_fails() -> None:
    link = FakeLink()
    key, invite = dial(link, credentials=(Credential("alice", "wrong"),))
    challenge = [("WWW-Authenticate",
                  'Digest realm="r", nonce="n1", qop="auth", algorithm=MD5')]
    link.send(answer(invite, 401, extra=challenge))
    again = link.requests[-1]
    assert (again.headers.get("Authorization") or "").startswith('Digest username="alice"')
    link.send(answer(again, 401, extra=challenge))
    assert link.take_events() == [OutboundFailed(key, 401, "401: credentials refused")]


def test_challenge_without_credentials_fails() -> None:
    link = FakeLink()
    key, invite = dial(link)
    challenge = [("WWW-Authenticate",
                  'Digest realm="r", nonce="n1", qop="auth", algorithm=MD5')]
    link.send(answer(invite, 401, extra=challenge))
    assert link.take_events() == [OutboundFailed(key, 401, "401: no credentials for realm 'r'")]


def test_ring_timeout_cancels_then_487() -> None:
    link = FakeLink()
    key, invite = dial(link)
    link.send(answer(invite, 180))
    link.take_events()
    link.core.hangup(key, link.clock.now, reason="ring-timeout")
    link.core.hangup(key, link.clock.now, reason="shutdown")  # a second hangup: one CANCEL
    link.pump()
    (cancel,) = link.requests
    assert cancel.method == "CANCEL" and cancel.uri == invite.uri
    assert invite_branch(cancel) == invite_branch(invite)
    assert cancel.headers.get("CSeq") == (invite.headers.get("CSeq") or "").replace(
        "INVITE", "CANCEL")
    link.reply(cancel, 200)
    link.send(answer(invite, 487))
    assert link.requests[-1].method == "ACK"
    assert link.take_events() == [HangupCompleted(key, 487)]


def test_cancel_waits_for_a_provisional() -> None:
    link = FakeLink()
    key, invite = dial(link)
    link.core.hangup(key, link.clock.now)
    link.pump()
    assert link.requests == []  # §9.1: no CANCEL before a provisional response
    link.send(answer(invite, 180))
    assert [r.method for r in link.requests] == ["CANCEL"]
    assert link.take_events() == []


def test_answer_crossing_our_cancel_is_acked_and_byed() -> None:
    link = FakeLink()
    key, invite = dial(link)
    link.send(answer(invite, 180))
    link.core.hangup(key, link.clock.now)
    link.send(answer(invite, 200, body=SDP_ANSWER))
    assert [r.method for r in link.requests] == ["CANCEL", "ACK", "BYE"]
    link.reply(link.requests[-1], 200)
    assert link.take_events() == [OutboundProgress(key, 180), HangupCompleted(key, 200)]


def test_cancelled_invite_without_final_response_times_out() -> None:
    link = FakeLink()
    key, invite = dial(link)
    link.send(answer(invite, 180))
    link.take_events()
    link.core.hangup(key, link.clock.now)
    link.pump()
    link.advance(40.0)
    assert link.take_events() == [HangupCompleted(key, None)]


@pytest.mark.parametrize("target", ["sips:a@127.0.0.2", "sip:a@example.com", "tel:+123", "x"])
def test_bad_target_refused(target: str) -> None:
    link = FakeLink()
    with pytest.raises(LocalProtocolError):
        link.core.invite(target, OFFER, link.clock.now)
    assert link.core.active_dialogs == 0


def test_forget_outbound_call() -> None:
    link = FakeLink()
    key, _ = answered(link)
    link.core.forget(key)
    assert link.core.active_dialogs == 0
    key, _ = dial(link)
    link.core.forget(key)  # never answered: no dialog id indexed
    assert link.core.active_dialogs == 0
