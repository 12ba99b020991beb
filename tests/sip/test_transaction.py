"""Transactions (RFC 3261 §17, RFC 6026) driven directly, with a hand-moved clock."""

from __future__ import annotations

from typing import Any

import pytest

from voxgate.errors import LocalProtocolError
from voxgate.sip.headers import parse_via
from voxgate.sip.message import Headers, Request, Response, make_response
from voxgate.sip.transaction import (
    TRANSITIONS,
    ClientTransaction,
    Outbox,
    ServerTransaction,
    State,
    TimerConfig,
    Transaction,
    TransactionTable,
    server_key,
)

DEST = ("127.0.0.2", 5070)


def request(
    method: str,
    *,
    via: str = "SIP/2.0/UDP 127.0.0.2:5070;branch=z9hG4bKabc",
    cseq: int = 1,
    uri: str = "sip:agent@127.0.0.1",
    to: str = "<sip:agent@127.0.0.1>",
) -> Request:
    return Request(
        method,
        uri,
        Headers(
            [
                ("Via", via),
                ("From", "<sip:caller@127.0.0.2>;tag=f1"),
                ("To", to),
                ("Call-ID", "c1"),
                ("CSeq", f"{cseq} {method}"),
            ]
        ),
    )


def top_via(req: Request):
    return parse_via(req.headers.get("Via") or "")


def server(req: Request, outbox: Outbox, now: float = 0.0, **timers: Any) -> ServerTransaction:
    return ServerTransaction(
        server_key(req, top_via(req)), req, DEST, outbox, TimerConfig(**timers), now
    )


def state_of(txn: Transaction) -> State:
    """The state, read through a call so that mypy does not narrow it between steps."""
    return txn.state


def run_until(txn, end: float) -> list[float]:
    """Fire the timers of ``txn`` up to ``end``; the times they fired at."""
    fired = []
    while (deadline := txn.next_deadline()) is not None and deadline <= end:
        txn.handle_timer(deadline)
        fired.append(deadline)
    return fired


def test_table_has_no_dead_ends() -> None:
    for kind, states in TRANSITIONS.items():
        for state, inputs in states.items():
            assert inputs, (kind, state)
            for target in inputs.values():
                assert target is State.TERMINATED or target in states, (kind, state, target)


def test_server_invite_error_retransmitted_until_timer_h() -> None:
    outbox = Outbox(100)
    invite = request("INVITE")
    txn = server(invite, outbox)
    assert state_of(txn) is State.PROCEEDING
    assert txn.next_deadline() is None  # no timers while Proceeding
    txn.send_response(make_response(invite, 100), 0.0)
    txn.send_response(make_response(invite, 486, to_tag="t"), 0.0)
    assert state_of(txn) is State.COMPLETED
    fired = run_until(txn, 100.0)
    # Timer G: 0.5, +1, +2, then T2 = 4 s steps; Timer H at 64·T1 = 32 s.
    assert fired[:5] == [0.5, 1.5, 3.5, 7.5, 11.5]
    assert fired[-1] == 32.0
    assert state_of(txn) is State.TERMINATED
    assert txn.outcome == "timeout"
    sent = outbox.drain()
    assert len(sent) == 2 + 10
    assert all(dest == DEST for _, dest in sent)
    assert sent[-1][0].startswith(b"SIP/2.0 486 ")
    assert outbox.retransmissions == 10


def test_server_invite_ack_confirms_then_timer_i() -> None:
    outbox = Outbox(100)
    invite = request("INVITE")
    txn = server(invite, outbox)
    txn.send_response(make_response(invite, 603, to_tag="t"), 0.0)
    assert txn.receive_ack(0.2)
    assert state_of(txn) is State.CONFIRMED
    assert txn.next_deadline() == pytest.approx(5.2)  # Timer I = T4
    outbox.drain()
    txn.receive_retransmission(1.0)
    assert txn.receive_ack(1.0)  # absorbed
    assert outbox.drain() == []
    txn.handle_timer(5.2)
    assert (state_of(txn), txn.outcome) == (State.TERMINATED, "completed")


def test_server_invite_2xx_accepted_until_dialog_ack() -> None:
    outbox = Outbox(100)
    invite = request("INVITE")
    txn = server(invite, outbox)
    txn.send_response(make_response(invite, 200, to_tag="t"), 0.0)
    assert state_of(txn) is State.ACCEPTED
    assert not txn.receive_ack(0.1)  # the 2xx ACK is matched by the dialog, not here
    run_until(txn, 1.5)
    assert len(outbox.drain()) == 3
    txn.receive_retransmission(1.6)  # absorbed in Accepted (RFC 6026)
    assert outbox.drain() == []
    assert txn.confirm_2xx_ack(2.0)
    assert not txn.confirm_2xx_ack(2.1)
    run_until(txn, 100.0)
    assert outbox.drain() == []
    assert txn.outcome == "completed"


def test_server_invite_2xx_without_ack_is_ack_timeout() -> None:
    txn = server(request("INVITE"), Outbox(100), t1_s=0.1)
    txn.send_response(make_response(txn.request, 200, to_tag="t"), 0.0)
    assert run_until(txn, 100.0)[-1] == pytest.approx(6.4)  # H = 64·T1 with T1 = 0.1
    assert txn.outcome == "ack-timeout"


def test_second_final_response_is_local_error() -> None:
    txn = server(request("INVITE"), Outbox(100))
    txn.send_response(make_response(txn.request, 486, to_tag="t"), 0.0)
    with pytest.raises(LocalProtocolError):
        txn.send_response(make_response(txn.request, 200, to_tag="t"), 0.0)


def test_server_non_invite() -> None:
    outbox = Outbox(100)
    bye = request("BYE")
    txn = server(bye, outbox)
    assert state_of(txn) is State.TRYING
    txn.receive_retransmission(0.1)  # Trying: absorbed, nothing to resend
    assert outbox.drain() == []
    txn.send_response(make_response(bye, 200), 0.2)
    assert state_of(txn) is State.COMPLETED
    txn.receive_retransmission(0.3)
    assert [d[:14] for d, _ in outbox.drain()] == [b"SIP/2.0 200 OK"] * 2
    assert run_until(txn, 100.0) == [pytest.approx(32.2)]  # Timer J
    assert state_of(txn) is State.TERMINATED


def test_client_non_invite_timer_e_then_f() -> None:
    outbox = Outbox(100)
    bye = request("BYE")
    txn = ClientTransaction(server_key(bye, top_via(bye)), bye, DEST, outbox, TimerConfig(), 0.0)
    assert outbox.drain()[0][0].startswith(b"BYE ")
    fired = run_until(txn, 100.0)
    assert fired[:6] == [0.5, 1.5, 3.5, 7.5, 11.5, 15.5]
    assert fired[-1] == 32.0
    assert (state_of(txn), txn.outcome) == (State.TERMINATED, "timeout")
    assert len(outbox.drain()) == 10


def test_client_non_invite_provisional_then_final() -> None:
    outbox = Outbox(100)
    bye = request("BYE")
    txn = ClientTransaction(server_key(bye, top_via(bye)), bye, DEST, outbox, TimerConfig(), 0.0)
    txn.handle_timer(0.5)  # E: next in 1 s
    assert not txn.receive_response(make_response(bye, 100), 0.6)
    assert state_of(txn) is State.PROCEEDING
    txn.handle_timer(1.5)
    assert txn.next_deadline() == 5.5  # Proceeding: E at T2
    assert txn.receive_response(make_response(bye, 200), 2.0)
    assert not txn.receive_response(make_response(bye, 200), 2.1)  # retransmission
    assert txn.final_status == 200
    assert txn.next_deadline() == 7.0  # Timer K = T4
    txn.handle_timer(7.0)
    assert (state_of(txn), txn.outcome) == (State.TERMINATED, "completed")


def test_matching_rfc3261() -> None:
    table = TransactionTable(outbox=Outbox(100), max_transactions=10)
    invite = request("INVITE")
    txn = table.create_server(invite, top_via(invite), DEST, 0.0, source_host=DEST[0])
    assert txn is not None
    ack = request("ACK")
    assert table.match_server(ack, top_via(ack)) is txn  # ACK matches its INVITE
    assert table.match_server(invite, top_via(invite)) is txn
    cancel = request("CANCEL")
    assert table.match_server(cancel, top_via(cancel)) is None  # CANCEL is its own
    assert table.match_cancelled_invite(cancel, top_via(cancel)) is txn
    other_host = request("INVITE", via="SIP/2.0/UDP 127.0.0.3:5070;branch=z9hG4bKabc")
    assert table.match_server(other_host, top_via(other_host)) is None
    default_port = request("INVITE", via="SIP/2.0/UDP 127.0.0.2;branch=z9hG4bKabc")
    assert table.match_server(default_port, top_via(default_port)) is None


@pytest.mark.parametrize("branch", ["", ";branch=z9hG4bK", ";branch=1234"])
def test_matching_rfc2543_fallback(branch: str) -> None:
    via = f"SIP/2.0/UDP gw.example.com{branch}"
    table = TransactionTable(outbox=Outbox(100), max_transactions=10)
    invite = request("INVITE", via=via, cseq=56)
    txn = table.create_server(invite, top_via(invite), DEST, 0.0, source_host=DEST[0])
    assert txn is not None
    assert txn.key.branch is None
    ack = request("ACK", via=via, cseq=56, to="<sip:agent@127.0.0.1>;tag=ours")
    assert table.match_server(ack, top_via(ack)) is txn
    cancel = request("CANCEL", via=via, cseq=56)
    assert table.match_cancelled_invite(cancel, top_via(cancel)) is txn
    later = request("INVITE", via=via, cseq=57)
    assert table.match_server(later, top_via(later)) is None
    elsewhere = request("INVITE", via=via, cseq=56, uri="sip:other@127.0.0.1")
    assert table.match_server(elsewhere, top_via(elsewhere)) is None


def test_table_bound_and_sweep() -> None:
    table = TransactionTable(outbox=Outbox(100), max_transactions=2)
    reqs = [request("OPTIONS", via=f"SIP/2.0/UDP 127.0.0.2;branch=z9hG4bK{i}") for i in range(3)]
    txns = [table.create_server(r, top_via(r), DEST, 0.0, source_host=DEST[0]) for r in reqs]
    assert txns[2] is None
    assert table.refused == 1
    assert len(table) == 2
    for txn, req in zip(txns[:2], reqs, strict=False):
        assert txn is not None
        txn.send_response(make_response(req, 200), 0.0)
    assert table.next_deadline() == 32.0
    ended = table.handle_timer(32.0)
    assert set(map(id, ended)) == set(map(id, txns[:2]))
    assert len(table) == 0
    assert table.next_deadline() is None


def test_match_response_by_branch_and_method() -> None:
    outbox = Outbox(100)
    table = TransactionTable(outbox=outbox, max_transactions=4)
    bye = request("BYE", via="SIP/2.0/UDP 127.0.0.1:5060;branch=z9hG4bKours")
    txn = table.create_client(bye, "z9hG4bKours", DEST, 0.0)
    assert txn is not None
    assert table.match_response(make_response(bye, 200)) is txn
    wrong_method = make_response(bye, 200)
    wrong_method.headers.set("CSeq", "1 INVITE")
    assert table.match_response(wrong_method) is None
    assert table.match_response(Response(200, "OK")) is None  # no Via / CSeq


def test_outbox_is_bounded() -> None:
    outbox = Outbox(1)
    outbox.send(b"a", DEST)
    outbox.send(b"b", DEST, retransmission=True)
    assert outbox.drain() == [(b"a", DEST)]
    assert (outbox.dropped, outbox.retransmissions) == (1, 1)
    assert outbox.drain() == []


def _invites(host: str, count: int, first: int = 0) -> list[Request]:
    return [request("INVITE", via=f"SIP/2.0/UDP {host}:5070;branch=z9hG4bK{host}-{i}")
            for i in range(first, first + count)]


def test_table_share_per_source() -> None:
    table = TransactionTable(outbox=Outbox(100), max_transactions=8,
                             transaction_share_per_source=0.25)
    assert table.max_per_source == 2
    flood = [table.create_server(r, top_via(r), DEST, 0.0, source_host="127.0.0.9")
             for r in _invites("127.0.0.9", 3)]
    assert [t is not None for t in flood] == [True, True, False]
    assert (table.refused_share, table.refused) == (1, 0)
    (other,) = _invites("127.0.0.2", 1)
    assert table.create_server(other, top_via(other), DEST, 0.0, source_host="127.0.0.2")
    # A terminated transaction gives its source room again.
    first = flood[0]
    assert first is not None
    first.send_response(make_response(first.request, 486, to_tag="t"), 0.0)
    assert first.receive_ack(0.1)
    table.handle_timer(10.0)  # Timer I (T4 = 5 s) ended it
    (again,) = _invites("127.0.0.9", 1, first=3)
    assert table.create_server(again, top_via(again), DEST, 10.0, source_host="127.0.0.9")


def test_table_share_never_below_one_transaction() -> None:
    table = TransactionTable(outbox=Outbox(10), max_transactions=2,
                             transaction_share_per_source=0.01)
    assert table.max_per_source == 1


def _rejected(table: TransactionTable, host: str, count: int, first: int = 0
              ) -> list[ServerTransaction]:
    txns = []
    for invite in _invites(host, count, first):
        txn = table.create_server(invite, top_via(invite), DEST, 0.0, source_host=host)
        assert txn is not None
        txn.send_response(make_response(invite, 503, to_tag="t"), 0.0)
        txns.append(txn)
    return txns


def test_failure_retransmissions_capped_for_source_that_never_acks() -> None:
    outbox = Outbox(1000)
    table = TransactionTable(outbox=outbox, max_transactions=100, unacked_failures_per_source=2)
    flood = _rejected(table, "127.0.0.9", 3)
    polite = _rejected(table, "127.0.0.2", 2)
    assert len(outbox.drain()) == 5  # every final response is sent once
    table.handle_timer(0.5)  # first Timer G
    resent = outbox.drain()
    assert len(resent) == 2  # only the source within its allowance
    assert table.failure_retransmissions_capped == 3
    assert [t.next_deadline() for t in flood] == [32.0] * 3  # only Timer H left
    assert all(t.next_deadline() == 1.5 for t in polite)
    # A retransmitted INVITE still gets the response again (§17.2.1).
    flood[0].receive_retransmission(1.0)
    assert len(outbox.drain()) == 1
    # ACKs bring the source back within its allowance: later failures are retransmitted.
    for txn in flood:
        assert txn.receive_ack(2.0)
    later = _rejected(table, "127.0.0.9", 1, first=3)
    outbox.drain()
    table.handle_timer(2.5)
    assert later[0].next_deadline() == 3.5
    assert table.failure_retransmissions_capped == 3


def test_2xx_retransmissions_never_capped() -> None:
    outbox = Outbox(1000)
    table = TransactionTable(outbox=outbox, max_transactions=100, unacked_failures_per_source=0)
    (invite,) = _invites("127.0.0.9", 1)
    txn = table.create_server(invite, top_via(invite), DEST, 0.0, source_host="127.0.0.9")
    assert txn is not None
    txn.send_response(make_response(invite, 200, to_tag="t"), 0.0)
    outbox.drain()
    table.handle_timer(0.5)
    assert len(outbox.drain()) == 1
    assert table.failure_retransmissions_capped == 0


def test_table_timers_follow_inputs_cancellations_and_firing() -> None:
    """The table's deadline heap sees timers an input arms (our 486, the ACK), drops
    the stale entry of a cancelled one (Timer G) and fires only what is due."""
    table = TransactionTable(outbox=Outbox(100), max_transactions=10)
    first, second = _invites("127.0.0.2", 2)
    txn = table.create_server(first, top_via(first), DEST, 0.0, source_host="127.0.0.2")
    idle = table.create_server(second, top_via(second), DEST, 0.0, source_host="127.0.0.2")
    assert txn is not None and idle is not None
    assert table.next_deadline() is None  # Proceeding runs no timer
    txn.send_response(make_response(first, 486, to_tag="t"), 1.0)
    assert table.next_deadline() == 1.5  # Timer G, armed by our response
    txn.stop_retransmitting()
    assert table.next_deadline() == 33.0  # Timer H once G's entry is found stale
    assert txn.receive_ack(2.0)
    assert table.next_deadline() == 7.0  # Timer I (T4) replaced Timer H
    assert table.handle_timer(6.9) == []
    assert table.handle_timer(7.0) == [txn]
    assert len(table) == 1 and table.next_deadline() is None
    assert table.handle_timer(100.0) == []  # the idle one has no timer to fire
