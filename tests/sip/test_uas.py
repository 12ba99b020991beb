"""UasCore end to end over the fake link (RFC 3261 §8.2, §12-§15, §17, §18.2)."""

from __future__ import annotations

import dataclasses
import itertools
import re

import pytest

from tests.sip.fakelink import (
    SDP_ANSWER,
    SDP_OFFER,
    UAC_ADDRESS,
    UAS_ADDRESS,
    FakeLink,
    ScriptedUac,
    to_tag_of,
)
from tests.sip.test_digest import authorization
from voxgate.cidr import parse_networks
from voxgate.errors import LocalProtocolError
from voxgate.sip.digest import Credential
from voxgate.sip.headers import parse_via
from voxgate.sip.message import Request, Response
from voxgate.sip.parser import parse_message_untrusted
from voxgate.sip.ratelimit import FloodLimits
from voxgate.sip.uas import (
    ALLOW,
    MAX_UDP_PAYLOAD_BYTES,
    BadMessageReceived,
    CallAcked,
    CallCancelled,
    CallEnded,
    HangupCompleted,
    IncomingCall,
    ReInvite,
    UasCore,
)


def start_call(link: FakeLink) -> tuple[Request, str]:
    invite = link.uac.invite()
    link.send(invite)
    (event,) = link.take_events()
    assert isinstance(event, IncomingCall)
    return invite, event.call_key


def answered_call(link: FakeLink) -> tuple[Request, str]:
    invite, key = start_call(link)
    link.core.accept(key, SDP_ANSWER, link.clock.now)
    link.pump()
    ok = link.responses[-1]
    assert ok.status == 200
    link.send(link.uac.ack_for(invite, ok))
    assert link.take_events() == [CallAcked(key)]
    return invite, key


def test_full_call_peer_hangs_up() -> None:
    link = FakeLink()
    invite = link.uac.invite()
    link.send(invite)
    (event,) = link.take_events()
    assert isinstance(event, IncomingCall)
    assert event.sdp_offer == SDP_OFFER
    assert event.source == UAC_ADDRESS
    assert event.call_id == "call-1@uac"
    assert link.statuses() == [100]
    assert to_tag_of(link.responses[0]) is None

    link.core.send_provisional(event.call_key, 180, link.clock.now)
    link.core.accept(event.call_key, SDP_ANSWER, link.clock.now)
    link.pump()
    assert link.statuses() == [100, 180, 200]
    ringing, ok = link.responses[1:]
    assert to_tag_of(ringing) == to_tag_of(ok) is not None
    assert ok.body == SDP_ANSWER
    assert ok.headers.get("Content-Type") == "application/sdp"
    assert ok.headers.get("Contact") == "<sip:127.0.0.1:5060>"

    link.send(link.uac.ack_for(invite, ok))
    assert link.take_events() == [CallAcked(event.call_key)]

    link.send(link.uac.request("BYE", to_tag=to_tag_of(ok)))
    assert link.statuses()[-1] == 200
    assert link.take_events() == [CallEnded(event.call_key, "bye")]

    link.run_timers_out()
    assert link.core.active_transactions == 0
    assert link.core.active_dialogs == 1
    link.core.forget(event.call_key)
    assert link.core.active_dialogs == 0


def test_we_hang_up_with_reason() -> None:
    link = FakeLink()
    invite, key = answered_call(link)
    link.core.hangup(key, link.clock.now, reason='agent "done"\r\nX: y')
    link.pump()
    (bye,) = link.requests
    assert bye.method == "BYE"
    assert bye.uri == "sip:caller@127.0.0.2:5070"  # the remote target (Contact)
    assert bye.headers.get("To") == invite.headers.get("From")
    assert to_tag_of(bye) == "uactag"
    assert (bye.headers.get("From") or "").endswith(f";tag={to_tag_of(link.responses[-1])}")
    assert bye.headers.get("X-Voxgate-Reason") == "agent _done___X: y"
    assert (bye.headers.get("Reason") or "").startswith("Q.850;cause=16;")
    via = parse_via(bye.headers.get("Via") or "")
    assert (via.host, via.port, via.has_rport) == ("127.0.0.1", 5060, True)
    assert (via.branch or "").startswith("z9hG4bK")

    link.reply(bye, 200)
    assert link.take_events() == [HangupCompleted(key, 200)]
    link.reply(bye, 200)  # a retransmitted final response is absorbed
    assert link.take_events() == []
    link.core.hangup(key, link.clock.now)  # already ended: nothing
    assert link.core.stats.late_actions == 1


def test_2xx_retransmitted_until_ack() -> None:
    link = FakeLink()
    invite, key = start_call(link)
    link.core.accept(key, SDP_ANSWER, link.clock.now)
    link.pump()
    link.advance(0.5)
    link.advance(1.0)
    assert link.statuses() == [100, 200, 200, 200]  # Timer G: T1, then 2·T1
    link.send(link.uac.ack_for(invite, link.responses[-1]))
    assert link.take_events() == [CallAcked(key)]
    link.send(link.uac.ack_for(invite, link.responses[-1]))  # ACK retransmission: ignored
    assert link.take_events() == []
    link.run_timers_out()
    assert link.statuses() == [100, 200, 200, 200]
    assert link.core.stats.retransmissions == 2
    assert link.core.active_transactions == 0


def test_ack_timeout_reported_then_app_hangs_up() -> None:
    link = FakeLink()
    _, key = start_call(link)
    link.core.accept(key, SDP_ANSWER, link.clock.now)
    link.pump()
    link.advance(31.9)
    assert link.take_events() == []
    link.advance(0.2)
    assert link.take_events() == [CallEnded(key, "ack-timeout")]
    # G intervals 0.5, 1, 2, 4, 4, … until H at 64·T1 = 32 s.
    assert link.statuses().count(200) == 1 + 10
    assert link.requests == []  # the core does not send BYE by itself
    link.core.hangup(key, link.clock.now)
    link.pump()
    assert [r.method for r in link.requests] == ["BYE"]


def test_hangup_before_ack_is_deferred_until_ack() -> None:
    link = FakeLink()
    invite, key = start_call(link)
    link.core.accept(key, SDP_ANSWER, link.clock.now)
    link.core.hangup(key, link.clock.now)
    link.pump()
    assert link.requests == []
    link.send(link.uac.ack_for(invite, link.responses[-1]))
    assert [r.method for r in link.requests] == ["BYE"]


def test_hangup_before_answer_rejects_with_480() -> None:
    link = FakeLink()
    _, key = start_call(link)
    link.core.hangup(key, link.clock.now, reason="shutdown")
    link.pump()
    assert link.statuses() == [100, 480]
    assert link.responses[-1].headers.get("X-Voxgate-Reason") == "shutdown"
    assert link.take_events() == [HangupCompleted(key, 480)]


def test_cancel_before_answer() -> None:
    link = FakeLink()
    invite, key = start_call(link)
    link.send(link.uac.cancel_for(invite))
    assert link.statuses() == [100, 200, 487]
    ok_cancel, terminated = link.responses[1:]
    assert (ok_cancel.headers.get("CSeq") or "").endswith("CANCEL")
    assert (terminated.headers.get("CSeq") or "").endswith("INVITE")
    assert to_tag_of(ok_cancel) == to_tag_of(terminated) is not None
    assert link.take_events() == [CallCancelled(key)]
    link.send(link.uac.ack_for(invite, terminated))  # absorbed by the INVITE transaction
    link.core.accept(key, SDP_ANSWER, link.clock.now)  # too late
    link.pump()
    assert link.statuses() == [100, 200, 487]
    assert link.core.stats.late_actions == 1
    link.advance(4.0)
    assert link.statuses() == [100, 200, 487]  # ACK stopped Timer G
    link.core.forget(key)
    link.run_timers_out()
    assert (link.core.active_transactions, link.core.active_dialogs) == (0, 0)


def test_cancel_after_answer_has_no_effect() -> None:
    link = FakeLink()
    invite, key = answered_call(link)
    link.send(link.uac.cancel_for(invite))
    assert link.statuses()[-1] == 200
    assert link.take_events() == []


def test_481_for_unknown_dialog_and_transaction() -> None:
    link = FakeLink()
    link.send(link.uac.request("BYE", to_tag="nosuchtag"))
    link.send(link.uac.request("CANCEL"))
    assert link.statuses() == [481, 481]


@pytest.mark.parametrize(
    ("method", "uri", "extra", "body", "content_type", "status", "header"),
    [
        ("REGISTER", "sip:127.0.0.1", (), b"", None, 405, ("Allow", ALLOW)),
        ("FOO", "sip:127.0.0.1", (), b"", None, 501, None),
        ("OPTIONS", "tel:+15551234", (), b"", None, 416, None),
        ("OPTIONS", "sip:127.0.0.1", (("Require", "100rel, foo"),), b"", None, 420,
         ("Unsupported", "100rel, foo")),
        ("INVITE", "sip:127.0.0.1", (), b"hello", "text/plain", 415, ("Accept", "application/sdp")),
        ("INVITE", "sip:127.0.0.1", (("Accept", "text/html"),), SDP_OFFER, "application/sdp",
         406, None),
    ],
)  # fmt: skip
def test_section_8_2_rejections(method, uri, extra, body, content_type, status, header) -> None:
    link = FakeLink()
    request = link.uac.request(method, uri=uri, extra=extra)
    request.body = body
    if content_type:
        request.headers.set("Content-Type", content_type)
    link.send(request)
    assert link.statuses() == [status]
    if header is not None:
        assert ", ".join(link.responses[0].headers.get_all(header[0])) == header[1]
    assert to_tag_of(link.responses[0]) is not None
    assert link.take_events() == []
    link.run_timers_out()
    assert link.core.active_transactions == 0


def test_invite_accepting_sdp_by_wildcard_is_processed() -> None:
    link = FakeLink()
    link.send(link.uac.invite(extra=[("Accept", "text/html, application/*")]))
    assert link.statuses() == [100]


def test_retransmitted_invite_absorbed() -> None:
    link = FakeLink()
    invite = link.uac.invite()
    link.send(invite)
    link.send(invite)
    assert len([e for e in link.take_events() if isinstance(e, IncomingCall)]) == 1
    assert link.statuses() == [100, 100]  # Proceeding: the last provisional again
    assert link.core.stats.requests_absorbed == 1


def test_rejected_invite_final_retransmitted_until_ack() -> None:
    link = FakeLink()
    invite, key = start_call(link)
    link.core.reject(key, 486, link.clock.now, reason="busy", retry_after_s=60)
    link.pump()
    busy = link.responses[-1]
    assert busy.status == 486
    assert busy.headers.get("Warning") == '399 voxgate "busy"'
    assert busy.headers.get("Retry-After") == "60"
    link.send(invite)  # INVITE retransmission in Completed: the 486 again
    assert link.statuses() == [100, 486, 486]
    link.advance(0.5)
    assert link.statuses() == [100, 486, 486, 486]
    link.send(link.uac.ack_for(invite, busy))
    link.advance(10.0)
    assert link.statuses() == [100, 486, 486, 486]
    with pytest.raises(LocalProtocolError):
        link.core.reject(key, 200, link.clock.now)


def test_our_bye_retransmitted_then_timer_f() -> None:
    link = FakeLink()
    _, key = answered_call(link)
    link.core.hangup(key, link.clock.now)
    link.pump()
    link.advance(31.9)
    # Timer E: 0.5, 1, 2, 4, 4, … (T2) after the first send, inside 64·T1.
    assert len(link.requests) == 1 + 10
    assert len({r.headers.get("Via") for r in link.requests}) == 1
    assert link.take_events() == []
    link.advance(0.2)
    assert link.take_events() == [HangupCompleted(key, None)]
    assert link.core.active_transactions == 0


def test_reinvite() -> None:
    link = FakeLink()
    _, key = answered_call(link)
    tag = to_tag_of(link.responses[-1])
    reinvite = link.uac.invite(to_tag=tag)
    reinvite.headers.set("Contact", "<sip:caller@127.0.0.3:5080>")
    link.send(reinvite)
    (event,) = link.take_events()
    assert isinstance(event, ReInvite)
    assert (event.call_key, event.sdp_offer) == (key, SDP_OFFER)
    assert link.statuses()[-1] == 100

    overlapping = link.uac.invite(to_tag=tag)
    link.send(overlapping)
    assert link.statuses()[-1] == 500  # §14.2: one INVITE at a time
    assert link.responses[-1].headers.get("Retry-After") is not None

    link.core.answer_reinvite(key, SDP_ANSWER, 200, link.clock.now)
    link.pump()
    ok = link.responses[-1]
    assert (ok.status, ok.body) == (200, SDP_ANSWER)
    link.send(link.uac.ack_for(reinvite, ok))
    assert link.take_events() == []  # CallAcked is for the initial INVITE only
    link.core.hangup(key, link.clock.now)
    link.pump()
    (data, destination) = link.elsewhere[-1]
    assert destination == ("127.0.0.3", 5080)  # target refreshed by the re-INVITE
    assert data.startswith(b"BYE sip:caller@127.0.0.3:5080 SIP/2.0\r\n")


def test_reinvite_rejected() -> None:
    link = FakeLink()
    _, key = answered_call(link)
    link.send(link.uac.invite(to_tag=to_tag_of(link.responses[-1])))
    link.core.answer_reinvite(key, None, 488, link.clock.now)
    link.pump()
    assert link.statuses()[-1] == 488


def test_options_available_and_draining() -> None:
    link = FakeLink()
    link.send(link.uac.request("OPTIONS"))
    ok = link.responses[-1]
    assert ok.status == 200
    assert ok.headers.get_all("Allow") == ["INVITE", "ACK", "BYE", "CANCEL", "OPTIONS"]
    assert ok.headers.get("Accept") == "application/sdp"
    assert ok.headers.get_all("Supported") == [""]  # no option tags
    link.core.available = False
    link.core.unavailable_reason = "draining"
    link.core.retry_after_s = 120
    link.send(link.uac.request("OPTIONS"))
    busy = link.responses[-1]
    assert busy.status == 503
    assert busy.headers.get("Warning") == '399 voxgate "draining"'
    assert busy.headers.get("Retry-After") == "120"


def test_untrusted_source_gets_403_before_any_work_and_calls_in_progress_go_on() -> None:
    link = FakeLink()
    _, key = answered_call(link)  # from UAC_ADDRESS, before the list existed
    ok = link.responses[-1]
    transactions = link.core.active_transactions
    link.core.trusted_networks = parse_networks(["192.0.2.0/24", "::ffff:10.0.0.0/104"])
    stranger = ScriptedUac(("127.0.0.3", 5070), call_id="call-2@uac")
    for message in (stranger.invite(), stranger.request("OPTIONS")):
        link.send(message, stranger.address)
        data, destination = link.elsewhere[-1]
        forbidden = parse_message_untrusted(data)
        assert destination == stranger.address
        assert isinstance(forbidden, Response) and forbidden.status == 403, forbidden
        assert forbidden.headers.get("Warning") == '399 voxgate "untrusted-source"'
    assert link.take_events() == []
    assert link.core.active_transactions == transactions  # nothing new was started
    assert link.core.stats.untrusted_refused == 2
    link.send(link.uac.request("BYE", to_tag=to_tag_of(ok)))  # inside the call: unaffected
    assert link.statuses()[-1] == 200
    assert link.take_events() == [CallEnded(key, "bye")]
    link.core.trusted_networks = parse_networks(["127.0.0.0/8"])
    link.send(stranger.request("OPTIONS"), stranger.address)
    answer = parse_message_untrusted(link.elsewhere[-1][0])
    assert isinstance(answer, Response) and answer.status == 200


def test_max_forwards_zero_options_is_processed() -> None:
    link = FakeLink()
    request = link.uac.request("OPTIONS")
    request.headers.set("Max-Forwards", "0")
    link.send(request)
    assert link.statuses() == [200]


def test_cseq_lower_than_last_gets_500() -> None:
    link = FakeLink()
    invite, _ = answered_call(link)
    tag = to_tag_of(link.responses[-1])
    link.send(link.uac.request("BYE", to_tag=tag, cseq=1))
    assert link.statuses()[-1] == 500
    assert link.take_events() == []
    link.send(link.uac.request("BYE", to_tag=tag))
    assert link.statuses()[-1] == 200


def test_response_addressing_received_and_rport() -> None:
    link = FakeLink()
    request = link.uac.request("OPTIONS")
    request.headers.set("Via", "SIP/2.0/UDP uac.example.com:5999;branch=z9hG4bKa;rport")
    link.send(request, source=("127.0.0.9", 40000))
    ((data, destination),) = link.elsewhere
    assert destination == ("127.0.0.9", 40000)  # rport: the source port
    stamped = (
        b"Via: SIP/2.0/UDP uac.example.com:5999;branch=z9hG4bKa;rport=40000;received=127.0.0.9"
    )
    assert stamped in data

    request = link.uac.request("OPTIONS", via_params="")
    request.headers.set("Via", "SIP/2.0/UDP uac.example.com:5999;branch=z9hG4bKb")
    link.send(request, source=("127.0.0.9", 40000))
    assert link.elsewhere[-1][1] == ("127.0.0.9", 5999)  # received host, sent-by port
    assert b";branch=z9hG4bKb;received=127.0.0.9\r\n" in link.elsewhere[-1][0]

    request = link.uac.request("OPTIONS", via_params="")
    link.send(request)  # sent-by equals the source: no received, default answer there
    assert link.responses[-1].headers.get("Via") == request.headers.get("Via")


def test_bad_message_answered_and_reported() -> None:
    link = FakeLink()
    request = link.uac.request("OPTIONS")
    request.headers.set("CSeq", "2 INVITE")  # method mismatch
    link.send(request)
    assert link.statuses() == [400]
    (event,) = link.take_events()
    assert isinstance(event, BadMessageReceived)
    assert event.call_id == "call-1@uac"
    link.send(b"\x00garbage\r\n\r\n")
    assert link.statuses() == [400]  # no Via to answer to
    assert link.core.stats.bad_messages == 2
    assert link.core.active_transactions == 0


def test_stray_response_dropped() -> None:
    link = FakeLink()
    link.send(
        b"SIP/2.0 200 OK\r\nVia: SIP/2.0/UDP 127.0.0.1;branch=z9hG4bKx\r\n"
        b"From: <sip:a@b>;tag=1\r\nTo: <sip:a@b>\r\nCall-ID: x\r\nCSeq: 1 BYE\r\n\r\n"
    )
    assert link.responses == []
    assert link.core.stats.responses_dropped == 1


def test_transaction_table_full_answers_503() -> None:
    link = FakeLink(UasCore(local_host="127.0.0.1", local_port=5060, max_transactions=1))
    link.send(link.uac.request("OPTIONS"))
    link.send(link.uac.request("OPTIONS"))
    assert link.statuses() == [200, 503]
    assert link.core.stats.transactions_refused == 1
    assert link.core.active_transactions == 1


def test_dialog_limit_answers_503() -> None:
    link = FakeLink(UasCore(local_host="127.0.0.1", local_port=5060, max_dialogs=1))
    start_call(link)
    link.uac.call_id = "call-2@uac"
    link.send(link.uac.invite())
    assert link.statuses() == [100, 503]
    assert link.core.stats.dialogs_refused == 1
    assert link.take_events() == []


def test_merged_invite_gets_482() -> None:
    link = FakeLink()
    invite, _ = start_call(link)
    forked = link.uac.request("INVITE", cseq=int((invite.headers.get("CSeq") or "").split()[0]),
                              body=SDP_OFFER)  # fmt: skip
    link.send(forked)
    assert link.statuses() == [100, 482]


def test_bye_on_pending_invite_answers_487() -> None:
    link = FakeLink()
    _, key = start_call(link)
    tag = "recreated"
    link.uac.call_id = "call-2@uac"
    link.send(link.uac.invite(to_tag=tag))  # unknown To tag: taken as a new call, keeps the tag
    (event,) = link.take_events()
    assert isinstance(event, IncomingCall)
    link.send(link.uac.request("BYE", to_tag=tag))
    assert link.statuses()[-2:] == [200, 487]
    assert link.take_events() == [CallEnded(event.call_key, "bye")]


def test_forget_answers_a_pending_invite() -> None:
    link = FakeLink()
    _, key = start_call(link)
    link.core.forget(key)
    link.pump()
    assert link.statuses() == [100, 480]
    link.run_timers_out()
    assert (link.core.active_transactions, link.core.active_dialogs) == (0, 0)


def test_hangup_with_pending_reinvite_answers_it_487() -> None:
    link = FakeLink()
    _, key = answered_call(link)
    link.send(link.uac.invite(to_tag=to_tag_of(link.responses[-1])))
    link.core.hangup(key, link.clock.now)
    link.pump()
    assert link.statuses()[-2:] == [100, 487]
    assert [r.method for r in link.requests] == ["BYE"]


def test_forgotten_call_reports_nothing() -> None:
    link = FakeLink()
    _, key = start_call(link)
    link.core.accept(key, SDP_ANSWER, link.clock.now)
    link.core.forget(key)
    link.run_timers_out()
    assert link.take_events() == []
    assert (link.core.active_transactions, link.core.active_dialogs) == (0, 0)
    with pytest.raises(LocalProtocolError):
        link.core.accept(key, SDP_ANSWER, link.clock.now)


def test_event_backlog_drops_datagrams() -> None:
    core = UasCore(local_host="127.0.0.1", local_port=5060, max_queued_events=1)
    link = FakeLink(core)
    core.receive_datagram(link.uac.invite().serialize(), UAC_ADDRESS, 0.0)
    core.receive_datagram(link.uac.request("OPTIONS").serialize(), UAC_ADDRESS, 0.0)
    assert core.stats.messages_dropped_backlog == 1
    assert [d for _, d in core.datagrams_to_send()] == [UAC_ADDRESS]


# --- per-source flood protection ------------------------------------------------------------

OTHER_SOURCE = ("127.0.0.3", 5080)


def flood_link(limits: FloodLimits, max_transactions: int = 4096) -> FakeLink:
    """A link whose UAC is the flooding source; the core uses ``limits``."""
    tokens = itertools.count(1)
    core = UasCore(local_host=UAS_ADDRESS[0], local_port=UAS_ADDRESS[1],
                   random_token=lambda: f"tok{next(tokens):04d}", flood_limits=limits,
                   max_transactions=max_transactions)  # fmt: skip
    return FakeLink(core)


def new_invite(uac: ScriptedUac, number: int) -> Request:
    uac.call_id = f"flood-{number}@uac"
    return uac.invite()


def elsewhere_statuses(link: FakeLink, destination: tuple[str, int]) -> list[int]:
    return [getattr(parse_message_untrusted(data), "status", 0)
            for data, where in link.elsewhere if where == destination]


def test_flood_from_one_source_does_not_stop_another() -> None:
    link = flood_link(FloodLimits(invites_per_source_per_s=1.0, invite_burst=2,
                                  flood_drop_factor=2.0))
    for number in range(10):
        link.send(new_invite(link.uac, number))
    assert link.statuses() == [100, 100, 503, 503]  # 2 admitted, 2 refused, 6 dropped
    refused = link.responses[2]
    assert refused.headers.get("Warning") == '399 voxgate "rate-limited"'
    assert refused.headers.get("Retry-After") == str(link.core.retry_after_s)
    assert to_tag_of(refused) is not None
    assert sum(isinstance(e, IncomingCall) for e in link.take_events()) == 2
    assert (link.core.active_transactions, link.core.active_dialogs) == (2, 2)  # stateless
    stats = link.core.stats
    assert (stats.flood_refused_invite, stats.flood_dropped) == (2, 6)

    caller = ScriptedUac(OTHER_SOURCE, call_id="normal@other")
    link.send(caller.invite(), source=OTHER_SOURCE)
    (event,) = link.take_events()
    assert isinstance(event, IncomingCall)
    assert event.source == OTHER_SOURCE
    assert elsewhere_statuses(link, OTHER_SOURCE) == [100]

    link.advance(1.0)  # one token back
    link.send(new_invite(link.uac, 10))
    assert link.statuses()[-1] == 100


def test_options_and_other_requests_have_their_own_buckets() -> None:
    limits = FloodLimits(options_burst=1, requests_burst=1, flood_drop_factor=2.0)
    link = flood_link(limits)
    link.send(link.uac.request("OPTIONS"))
    link.send(link.uac.request("OPTIONS"))
    link.send(link.uac.request("OPTIONS"))
    link.send(link.uac.request("REGISTER"))
    link.send(link.uac.request("REGISTER"))
    assert link.statuses() == [200, 503, 405, 503]
    stats = link.core.stats
    assert (stats.flood_refused_options, stats.flood_refused_other, stats.flood_dropped) == (
        1, 1, 1)
    link.send(new_invite(link.uac, 1))  # INVITE's bucket is untouched
    assert link.statuses()[-1] == 100


def test_retransmissions_and_in_dialog_requests_never_limited() -> None:
    limits = FloodLimits(invite_burst=1, options_burst=1, requests_burst=1, flood_drop_factor=1.0)
    link = flood_link(limits)
    invite = link.uac.invite()
    link.send(invite)
    (event,) = link.take_events()
    assert isinstance(event, IncomingCall)
    for _ in range(5):
        link.send(invite)  # retransmissions: absorbed by the transaction
    link.core.accept(event.call_key, SDP_ANSWER, link.clock.now)
    link.pump()
    ok = link.responses[-1]
    for _ in range(3):
        link.send(link.uac.ack_for(invite, ok))
    tag = to_tag_of(ok)
    for _ in range(3):  # re-INVITEs inside the dialog, each answered
        reinvite = link.uac.invite(to_tag=tag)
        link.send(reinvite)
        link.core.answer_reinvite(event.call_key, SDP_ANSWER, 200, link.clock.now)
        link.pump()
        link.send(link.uac.ack_for(reinvite, link.responses[-1]))
    link.send(link.uac.request("BYE", to_tag=tag))
    assert link.statuses() == [100] * 6 + [200, 100, 200, 100, 200, 100, 200, 200]
    assert link.take_events()[-1] == CallEnded(event.call_key, "bye")

    link.uac.call_id = "second@uac"
    link.clock.now += 1.0
    second = link.uac.invite()
    link.send(second)
    link.send(link.uac.request("REGISTER"))  # takes the only "other" token
    link.send(link.uac.cancel_for(second))  # CANCEL of a known INVITE: not limited
    link.send(link.uac.cancel_for(second))  # a CANCEL retransmission
    assert link.statuses()[-5:] == [100, 405, 200, 487, 200]
    stats = link.core.stats
    assert (stats.flood_refused_invite, stats.flood_refused_other, stats.flood_dropped) == (
        0, 0, 0)


def test_source_share_of_transaction_table() -> None:
    link = flood_link(FloodLimits(transaction_share_per_source=0.25), max_transactions=8)
    for _ in range(3):
        link.send(link.uac.request("OPTIONS"))
    assert link.statuses() == [200, 200, 503]
    assert link.responses[-1].headers.get("Warning") == '399 voxgate "full"'
    caller = ScriptedUac(OTHER_SOURCE)
    link.send(caller.request("OPTIONS"), source=OTHER_SOURCE)
    assert elsewhere_statuses(link, OTHER_SOURCE) == [200]
    stats = link.core.stats
    assert (stats.transactions_refused_share, stats.transactions_refused) == (1, 0)
    assert link.core.active_transactions == 3


def test_failures_to_a_source_that_never_acks_are_sent_once() -> None:
    link = flood_link(FloodLimits(unacked_failures_per_source=1))
    keys = []
    for number in range(3):
        link.send(new_invite(link.uac, number))
        (event,) = link.take_events()
        assert isinstance(event, IncomingCall)
        keys.append(event.call_key)
    for key in keys:
        link.core.reject(key, 503, link.clock.now, retry_after_s=5)
    link.pump()
    link.advance(31.0)  # Timer G would have resent each about 10 times
    assert link.statuses() == [100] * 3 + [503] * 3
    assert link.core.stats.failure_retransmissions_capped == 3

    caller = ScriptedUac(OTHER_SOURCE)
    link.send(caller.invite(), source=OTHER_SOURCE)
    (event,) = link.take_events()
    assert isinstance(event, IncomingCall)
    link.core.reject(event.call_key, 486, link.clock.now)
    link.pump()
    link.advance(0.5)
    assert elsewhere_statuses(link, OTHER_SOURCE) == [100, 486, 486]  # still retransmitted


def test_bad_requests_answered_within_the_other_bucket() -> None:
    link = flood_link(FloodLimits(requests_burst=1, flood_drop_factor=1.0))
    for _ in range(3):
        request = link.uac.request("OPTIONS")
        request.headers.set("CSeq", "2 INVITE")  # method mismatch: 400
        link.send(request)
    assert link.statuses() == [400]
    assert (link.core.stats.bad_messages, link.core.stats.flood_dropped) == (3, 2)


def test_flood_limits_can_change_at_run_time() -> None:
    link = flood_link(FloodLimits(options_burst=1, flood_drop_factor=1.0))
    link.send(link.uac.request("OPTIONS"))
    link.send(link.uac.request("OPTIONS"))
    assert link.statuses() == [200]
    link.core.flood_limits = dataclasses.replace(
        link.core.flood_limits, options_per_source_per_s=1000.0, options_burst=1000)
    link.clock.now += 0.01
    link.send(link.uac.request("OPTIONS"))
    assert link.statuses() == [200, 200]
    assert link.core.flood_limits.options_burst == 1000


# --- responses that would not fit one UDP datagram (§18.1.1, §21.5.11) --------------------

PROXY_VIA_BYTES = 2000
"""One long Via value of a proxy on the request's path."""


def proxy_vias(count: int) -> list[tuple[str, str]]:
    pad = "x" * (PROXY_VIA_BYTES - 60)
    return [("Via", f"SIP/2.0/UDP 10.0.0.{i}:5060;branch=z9hG4bKproxy{i};pad={pad}")
            for i in range(count)]


def test_invite_whose_responses_would_not_fit_gets_a_minimal_513() -> None:
    link = FakeLink()
    invite = link.uac.invite(extra=proxy_vias(31))
    data = invite.serialize()
    assert 62_000 < len(data) <= MAX_UDP_PAYLOAD_BYTES  # a real, deliverable datagram
    link.send(data)
    assert link.statuses() == [513]
    (answer,) = link.responses
    assert answer.reason == "Message Too Large"
    assert answer.headers.get_all("Via") == [
        "SIP/2.0/UDP 127.0.0.2:5070;branch=z9hG4bKuac1;rport=5070;received=127.0.0.2"]
    assert to_tag_of(answer) is not None
    assert answer.call_id == "call-1@uac"
    assert answer.headers.get("CSeq") == "2 INVITE"
    assert len(answer.serialize()) < 1024
    (event,) = link.take_events()  # no IncomingCall: the call never starts
    assert isinstance(event, BadMessageReceived) and "513" in event.reason
    assert link.core.stats.responses_too_large == 1
    assert link.core.active_transactions == 0 and link.core.active_dialogs == 0
    link.send(data)  # a retransmission gets the same answer (stateless)
    assert link.statuses() == [513, 513]


def test_record_route_counts_towards_the_responses() -> None:
    """The 100 would fit, the 180/200 carrying the Record-Route set would not."""
    link = FakeLink()
    route = "<sip:10.0.0.1;lr;pad=" + "r" * 7000 + ">"
    invite = link.uac.invite(extra=[("Record-Route", route)] * 9)
    link.send(invite)
    assert link.statuses() == [513]
    assert link.responses[0].headers.get_all("Record-Route") == []


def test_responses_that_fit_are_not_cut() -> None:
    link = FakeLink(UasCore(local_host="127.0.0.1", local_port=5060, max_datagram_bytes=8000))
    invite, key = start_call(link)
    link.core.accept(key, SDP_ANSWER, link.clock.now)
    link.pump()
    assert link.statuses() == [100, 200]
    assert link.core.stats.responses_too_large == 0
    big = FakeLink(UasCore(local_host="127.0.0.1", local_port=5060, max_datagram_bytes=8000))
    big.send(big.uac.invite(extra=proxy_vias(2)))  # 4 KB copied + 4 KB headroom > 8000
    assert big.statuses() == [513]


def test_bad_request_whose_answer_would_not_fit_gets_a_minimal_513() -> None:
    link = FakeLink(UasCore(local_host="127.0.0.1", local_port=5060, max_datagram_bytes=8000))
    request = link.uac.request("OPTIONS", extra=proxy_vias(5))
    request.headers.set("CSeq", "2 INVITE")  # method mismatch: 400, too large to send
    link.send(request)
    assert link.statuses() == [513]
    assert len(link.responses[0].headers.get_all("Via")) == 1
    assert link.core.stats.responses_too_large == 1


def test_a_flooding_source_is_dropped_before_parsing_but_not_its_own_calls() -> None:
    link = flood_link(FloodLimits(invites_per_source_per_s=1.0, invite_burst=1,
                                  flood_drop_factor=1.0))
    link.send(new_invite(link.uac, 0))  # admitted: its bucket is empty now
    for number in range(1, 4):
        link.send(new_invite(link.uac, number))
    stats = link.core.stats
    assert (stats.flood_dropped, stats.flood_dropped_unparsed) == (3, 3)
    assert link.core.stats.messages_in == 4
    link.uac.call_id = "flood-0@uac"  # a retransmission of the admitted call: parsed
    link.send(link.uac.invite())
    assert link.core.stats.flood_dropped_unparsed == 3
    link.advance(1.0)  # a token back: parsed and admitted again
    link.send(new_invite(link.uac, 4))
    assert link.core.stats.flood_dropped_unparsed == 3
    assert sum(isinstance(e, IncomingCall) for e in link.take_events()) == 2


def test_digest_auth_challenges_new_invites_only() -> None:
    link = FakeLink()
    link.core.digest.configure([Credential("alice", password="wonder land")], realm="voxgate",
                               nonce_ttl_s=300, max_nonces=64)
    transactions = link.core.active_transactions
    first = link.uac.invite()
    link.send(first)
    unauthorized = link.responses[-1]
    assert unauthorized.status == 401 and to_tag_of(unauthorized) is not None
    challenges = unauthorized.headers.get_all("WWW-Authenticate")
    assert [re.findall(r"algorithm=([\w-]+)", c) for c in challenges] == [["SHA-256"], ["MD5"]]
    assert link.take_events() == [] and link.core.active_transactions == transactions
    link.send(link.uac.ack_for(first, unauthorized))  # stateless 401: the ACK is absorbed
    link.send(link.uac.request("OPTIONS"))
    assert link.statuses()[-1] == 200  # only INVITEs authenticate

    credentials = authorization(challenges[1], "alice", "wonder land")
    invite = link.uac.invite(extra=[("Authorization", credentials)])
    link.send(invite)
    link.send(invite)  # a retransmission is absorbed by the transaction, not re-checked
    (event,) = link.take_events()
    assert isinstance(event, IncomingCall) and event.auth_user == "alice"
    assert link.statuses()[-2:] == [100, 100]
    link.core.accept(event.call_key, SDP_ANSWER, link.clock.now)
    link.pump()
    ok = link.responses[-1]
    link.send(link.uac.ack_for(invite, ok))
    link.send(link.uac.invite(to_tag=to_tag_of(ok)))  # a re-INVITE needs no credentials
    assert isinstance(link.take_events()[-1], ReInvite)

    replayed = link.uac.invite(extra=[("Authorization", credentials)])
    replayed.headers.set("Call-ID", "call-9@uac")
    link.send(replayed)
    assert link.statuses()[-1] == 401
    stats = link.core.stats
    assert (stats.auth_missing, stats.auth_ok, stats.auth_replay) == (1, 1, 1)
