"""Blind transfer by REFER (RFC 3515, RFC 4488) in the UAS core."""

from __future__ import annotations

import pytest

from tests.sip.fakelink import FakeLink, to_tag_of
from tests.sip.test_uas import answered_call, start_call
from voxgate.errors import LocalProtocolError
from voxgate.sip.message import Request, make_response
from voxgate.sip.uas import TransferEnded, sipfrag_status

TARGET = "sip:human@127.0.0.9:5080"


def referred(link: FakeLink) -> tuple[str, str, Request]:
    """An answered call, REFERred to TARGET: (call key, our tag, the REFER)."""
    _, key = answered_call(link)
    tag = to_tag_of(link.responses[-1]) or ""
    link.core.refer(key, TARGET, link.clock.now)
    link.pump()
    (refer,) = link.requests
    return key, tag, refer


def notify(link: FakeLink, tag: str, sipfrag: bytes, state: str = "active;expires=60") -> int:
    """The transferee's NOTIFY (RFC 3515 §2.4.4); the status we answered it."""
    request = link.uac.request("NOTIFY", to_tag=tag, extra=[
        ("Event", "refer"), ("Subscription-State", state),
        ("Content-Type", "message/sipfrag;version=2.0")])
    request.body = sipfrag
    link.send(request)
    return link.statuses()[-1]


def test_refer_then_notify_trying_then_ok_succeeds() -> None:
    link = FakeLink()
    key, tag, refer = referred(link)
    assert refer.method == "REFER"
    assert refer.uri == "sip:caller@127.0.0.2:5070"
    assert refer.headers.get("Refer-To") == f"<{TARGET}>"
    assert refer.headers.get("Referred-By") == "<sip:127.0.0.1:5060>"
    assert refer.headers.get("Contact") == "<sip:127.0.0.1:5060>"
    assert to_tag_of(refer) == "uactag"

    link.send(make_response(refer, 202))
    assert link.take_events() == []
    assert notify(link, tag, b"SIP/2.0 100 Trying\r\n") == 200
    assert link.take_events() == []
    assert notify(link, tag, b"SIP/2.0 200 OK\r\n", "terminated;reason=noresource") == 200
    assert link.take_events() == [TransferEnded(key, True, 200)]
    assert link.core.stats.transfers_succeeded == 1

    link.core.hangup(key, link.clock.now, reason="transferred")  # the app ends the call
    link.pump()
    assert link.requests[-1].method == "BYE"


def test_notify_before_the_202_is_taken() -> None:
    link = FakeLink()
    key, tag, refer = referred(link)
    assert notify(link, tag, b"SIP/2.0 200 OK\r\n") == 200
    assert link.take_events() == [TransferEnded(key, True, 200)]
    link.send(make_response(refer, 202))
    assert link.take_events() == []


def test_notify_503_reports_failure_and_the_call_goes_on() -> None:
    link = FakeLink()
    key, tag, refer = referred(link)
    link.send(make_response(refer, 202))
    assert notify(link, tag, b"SIP/2.0 503 Service Unavailable\r\n", "terminated") == 200
    assert link.take_events() == [TransferEnded(key, False, 503)]
    assert link.core.stats.transfers_failed == 1
    link.core.refer(key, TARGET, link.clock.now)  # another try is allowed
    link.pump()
    assert [r.method for r in link.requests] == ["REFER", "REFER"]


def test_subscription_terminated_without_a_final_status_fails() -> None:
    link = FakeLink()
    key, tag, _ = referred(link)
    assert notify(link, tag, b"SIP/2.0 180 Ringing\r\n", "terminated;reason=timeout") == 200
    assert link.take_events() == [TransferEnded(key, False, None)]


@pytest.mark.parametrize("status", [403, 405, 501])
def test_refer_refused(status: int) -> None:
    link = FakeLink()
    key, _, refer = referred(link)
    link.send(make_response(refer, status))
    assert link.take_events() == [TransferEnded(key, False, status)]


def test_refer_timeout_fails() -> None:
    link = FakeLink()
    key, _, _ = referred(link)
    link.advance(32.1)  # Timer F, 64·T1
    assert link.take_events() == [TransferEnded(key, False, None)]
    assert link.core.stats.transfers_failed == 1


def test_refer_sub_false_202_is_success_without_notify() -> None:
    link = FakeLink()
    key, _, refer = referred(link)
    accepted = make_response(refer, 202)
    accepted.headers.add("Refer-Sub", "false")
    link.send(accepted)
    assert link.take_events() == [TransferEnded(key, True, 202)]


@pytest.mark.parametrize("target", ["sip:", "tel:+15551234", "human@example.com",
                                    "sip:a@b>;x=<y", "sip:a@b\r\nVia: x"])
def test_malformed_target_refused_before_sending_and_counted(target: str) -> None:
    link = FakeLink()
    _, key = answered_call(link)
    with pytest.raises(LocalProtocolError, match="transfer target"):
        link.core.refer(key, target, link.clock.now)
    link.pump()
    assert link.requests == []
    assert link.core.stats.transfers_refused == 1


def test_refer_refused_before_answer_or_while_transferring() -> None:
    link = FakeLink()
    _, unanswered = start_call(link)
    with pytest.raises(LocalProtocolError, match="not answered"):
        link.core.refer(unanswered, TARGET, link.clock.now)
    other = FakeLink()
    key, _, _ = referred(other)
    with pytest.raises(LocalProtocolError, match="already"):
        other.core.refer(key, TARGET, other.clock.now)
    assert (link.core.stats.transfers_refused, other.core.stats.transfers_refused) == (1, 1)


def test_notify_without_our_refer_gets_481() -> None:
    link = FakeLink()
    _, _ = answered_call(link)
    tag = to_tag_of(link.responses[-1]) or ""
    assert notify(link, tag, b"SIP/2.0 200 OK\r\n") == 481
    assert link.take_events() == []
    outside = link.uac.request("NOTIFY", extra=[("Event", "refer")])
    link.send(outside)
    assert link.statuses()[-1] == 405  # no dialog: not a method we take


@pytest.mark.parametrize(("body", "status"), [
    (b"SIP/2.0 200 OK\r\n", 200), (b"SIP/2.0 486 Busy Here", 486),
    (b"SIP/2.0 100 Trying\r\nContent-Length: 0\r\n", 100), (b"", None),
    (b"garbage", None), (b"SIP/2.0 2000 OK", None), (b"SIP/2.0 099 x", None)])
def test_sipfrag_status(body: bytes, status: int | None) -> None:
    assert sipfrag_status(body) == status


def test_no_final_notify_within_transfer_timeout_s_fails_as_timeout() -> None:
    link = FakeLink()
    link.core.transfer_timeout_s = 10.0
    key, tag, refer = referred(link)
    link.send(make_response(refer, 202))
    assert notify(link, tag, b"SIP/2.0 100 Trying\r\n") == 200
    link.advance(9.9)
    assert link.take_events() == []
    link.advance(0.2)
    assert link.take_events() == [TransferEnded(key, False, 408, timed_out=True)]
    stats = link.core.stats
    assert (stats.transfers_timeout, stats.transfers_failed) == (1, 0)
    assert notify(link, tag, b"SIP/2.0 200 OK\r\n", "terminated") == 481  # too late
    assert link.take_events() == []
    link.run_timers_out()
    assert link.core.next_deadline() is None


def test_a_transfer_that_ended_leaves_no_deadline() -> None:
    link = FakeLink()
    key, tag, refer = referred(link)
    link.send(make_response(refer, 202))
    assert notify(link, tag, b"SIP/2.0 486 Busy Here\r\n", "terminated") == 200
    assert link.take_events() == [TransferEnded(key, False, 486)]
    link.run_timers_out()
    assert link.take_events() == [] and link.core.next_deadline() is None
    assert link.core.stats.transfers_timeout == 0


def test_forgetting_a_transferring_call_drops_its_deadline() -> None:
    link = FakeLink()
    key, _, refer = referred(link)
    link.send(make_response(refer, 202))
    link.core.forget(key)
    link.run_timers_out()
    assert link.take_events() == [] and link.core.next_deadline() is None
