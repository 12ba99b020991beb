"""UasCore over a reliable transport (TCP, TLS): RFC 3261 §17 timers, §18.2.2 answers."""

from __future__ import annotations

import itertools

import pytest

from tests.sip.fakelink import SDP_ANSWER, UAS_ADDRESS, FakeLink, to_tag_of
from voxgate.sip.headers import parse_via
from voxgate.sip.message import Response
from voxgate.sip.parser import parse_message_untrusted
from voxgate.sip.transaction import Input, Kind, State, TimerConfig
from voxgate.sip.uas import CallAcked, HangupCompleted, IncomingCall, UasCore

CONNECTION = ("127.0.0.2", 40001)
"""The peer's end of the connection: not the port its Via names (5070)."""


def stream_link(transport: str) -> FakeLink:
    tokens = itertools.count(1)
    core = UasCore(local_host=UAS_ADDRESS[0], local_port=5061, transport=transport,
                   random_token=lambda: f"tok{next(tokens):04d}")
    return FakeLink(core)


def on_connection(link: FakeLink) -> list[Response]:
    """What the core sent to CONNECTION, parsed (responses only)."""
    out = [parse_message_untrusted(data) for data, addr in link.elsewhere if addr == CONNECTION]
    return [m for m in out if isinstance(m, Response)]


def test_reliable_timers() -> None:
    reliable = TimerConfig(reliable=True)
    assert reliable.armed(Kind.CLIENT_NON_INVITE, State.TRYING) == {Input.TIMER_F: 32.0}
    assert reliable.armed(Kind.SERVER_INVITE, State.COMPLETED) == {Input.TIMER_H: 32.0}
    assert reliable.armed(Kind.SERVER_INVITE, State.ACCEPTED) == {
        Input.TIMER_G: 0.5, Input.TIMER_H: 32.0}  # the 2xx is retransmitted (§13.3.1.4)
    assert reliable.armed(Kind.SERVER_INVITE, State.CONFIRMED) == {Input.TIMER_I: 0.0}
    assert reliable.armed(Kind.SERVER_NON_INVITE, State.COMPLETED) == {Input.TIMER_J: 0.0}
    assert TimerConfig().armed(Kind.CLIENT_NON_INVITE, State.COMPLETED) == {Input.TIMER_K: 5.0}


def test_tcp_call_answered_on_its_connection_and_our_bye_goes_there_once() -> None:
    link = stream_link("TCP")
    link.core.connection_opened(CONNECTION)
    invite = link.uac.invite()
    link.send(invite, CONNECTION)
    (event,) = link.take_events()
    assert isinstance(event, IncomingCall) and event.source == CONNECTION
    link.core.accept(event.call_key, SDP_ANSWER, link.clock.now)
    link.pump()
    assert link.responses == [] and [r.status for r in on_connection(link)] == [100, 200]
    ok = on_connection(link)[-1]
    assert ok.headers.get("Contact") == "<sip:127.0.0.1:5061;transport=tcp>"
    link.send(link.uac.ack_for(invite, ok), CONNECTION)
    assert link.take_events() == [CallAcked(event.call_key)]

    link.core.hangup(event.call_key, link.clock.now)
    link.pump()
    byes = [(parse_message_untrusted(d), a) for d, a in link.elsewhere if b"BYE sip" in d[:8]]
    assert len(byes) == 1
    bye, destination = byes[0]
    assert destination == CONNECTION  # the connection the INVITE came on, not the Contact
    assert parse_via(bye.headers.get("Via") or "").transport == "TCP"
    link.advance(31.9)  # no Timer E over a reliable transport
    assert sum(b"BYE sip" in d[:8] for d, _ in link.elsewhere) == 1
    link.advance(0.2)
    assert link.take_events() == [HangupCompleted(event.call_key, None)]


def test_bye_goes_to_the_remote_target_once_the_connection_is_gone() -> None:
    link = stream_link("TCP")
    link.core.connection_opened(CONNECTION)
    invite = link.uac.invite()
    link.send(invite, CONNECTION)
    (event,) = link.take_events()
    assert isinstance(event, IncomingCall)
    link.core.accept(event.call_key, SDP_ANSWER, link.clock.now)
    link.pump()
    link.send(link.uac.ack_for(invite, on_connection(link)[-1]), CONNECTION)
    link.core.connection_closed(CONNECTION)
    link.core.hangup(event.call_key, link.clock.now)
    link.pump()
    (bye,) = link.requests  # to the Contact, sip:caller@127.0.0.2:5070: the UAC's address
    assert bye.method == "BYE"


@pytest.mark.parametrize(("scheme", "contact"), [
    ("sip", "<sip:127.0.0.1:5061;transport=tls>"), ("sips", "<sips:127.0.0.1:5061>")])
def test_tls_contact_follows_the_request_uri_scheme(scheme: str, contact: str) -> None:
    link = stream_link("TLS")
    invite = link.uac.invite()
    invite.uri = f"{scheme}:echo@127.0.0.1:5061"
    link.send(invite, CONNECTION)
    (event,) = link.take_events()
    assert isinstance(event, IncomingCall)
    link.core.accept(event.call_key, SDP_ANSWER, link.clock.now)
    link.pump()
    assert on_connection(link)[-1].headers.get("Contact") == contact  # RFC 5630 §3.1.3


def test_failure_sent_once_and_transaction_ends_at_its_ack() -> None:
    link = stream_link("TCP")
    invite = link.uac.invite()
    link.send(invite, CONNECTION)
    (event,) = link.take_events()
    assert isinstance(event, IncomingCall)
    link.core.reject(event.call_key, 486, link.clock.now)
    link.pump()
    link.advance(5.0)  # no Timer G for a 3xx-6xx over a reliable transport
    assert [r.status for r in on_connection(link)] == [100, 486]
    link.send(link.uac.ack_for(invite, on_connection(link)[-1]), CONNECTION)
    link.advance(0.0)  # Timer I is 0
    assert link.core.active_transactions == 0


@pytest.mark.parametrize("transport", ["UDP", "SCTP"])
def test_only_known_transports(transport: str) -> None:
    if transport == "UDP":
        assert not UasCore(local_host="127.0.0.1", local_port=5060).reliable
        return
    with pytest.raises(ValueError, match="transport"):
        UasCore(local_host="127.0.0.1", local_port=5060, transport=transport)


def test_unframed_message_answered_400_from_its_header_section() -> None:
    link = stream_link("TCP")
    head = link.uac.request("OPTIONS").serialize().split(b"\r\n\r\n")[0]
    link.core.reject_message(head, CONNECTION, link.clock.now, "no Content-Length")
    link.pump()
    (answer,) = on_connection(link)
    assert answer.status == 400 and to_tag_of(answer) is not None
    assert link.core.stats.bad_messages == 1
    link.core.reject_message(b"\x16\x03\x01 garbage", CONNECTION, link.clock.now, "junk")
    link.pump()
    assert len(on_connection(link)) == 1  # nothing to answer from
    assert link.core.stats.bad_messages == 2
