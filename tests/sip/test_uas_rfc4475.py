"""The 49 RFC 4475 torture messages through a fresh UasCore each (INDEX.md answers).

Each message is rewritten to loopback IPv4 literals (same length, as INDEX.md
says), fed to a new core, and the status of the first response sent is
checked (or that none is sent). INVITEs that reach the call path are then
refused the way admission would (486) and forgotten; after all timers ran,
no transaction or dialog may be left.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from voxgate.sip.uas import BadMessageReceived, IncomingCall, UasCore

CORPUS = Path(__file__).resolve().parents[3] / "shared" / "conformance" / "rfc4475"
SOURCE = ("127.0.0.1", 5070)

PROCESS_INVITE = {100}
PROCESS_OPTIONS = {200}

# file -> acceptable first answers (empty set: nothing must be sent).
EXPECTED: dict[str, set[int]] = {
    # 3.1.1 valid messages
    "wsinv": PROCESS_INVITE,
    "intmeth": {501},
    "esc01": PROCESS_INVITE,
    "escnull": {405},
    "esc02": {501},
    "lwsdisp": PROCESS_OPTIONS,
    "longreq": PROCESS_INVITE,
    "dblreq": {405},
    "semiuri": PROCESS_OPTIONS,
    "transports": PROCESS_OPTIONS,
    "mpart01": {405},
    "unreason": set(),
    "noreason": set(),
    # 3.1.2 invalid messages
    "badinv01": {400},
    "clerr": {400},
    "ncl": {400},
    "scalar02": {400},
    "scalarlg": set(),
    "quotbal": {400},
    "ltgtruri": {400},
    "lwsruri": {400},
    "lwsstart": {400},
    "trws": {400} | PROCESS_OPTIONS,
    "escruri": {400} | PROCESS_INVITE,
    "baddate": {400} | PROCESS_INVITE,
    "regbadct": {400, 405},
    "badaspec": {400} | PROCESS_OPTIONS,
    "baddn": {400},
    "badvers": {505},
    "mismatch01": {400},
    "mismatch02": {400, 501},
    "bigcode": set(),
    # 3.2 transaction layer
    "badbranch": PROCESS_OPTIONS,
    # 3.3 application layer
    "insuf": {400},
    "unkscm": {416},
    "novelsc": {416},
    "unksm2": {405, 400},
    "bext01": {420},
    "invut": {415},
    "regaut01": {405},
    "multi01": {400},
    "mcl01": {400},
    "bcast": set(),
    "zeromf": PROCESS_OPTIONS | {483},
    "cparam01": {405},
    "cparam02": {405},
    "regescrt": {405},
    "sdp01": {406},
    # 3.4 backward compatibility
    "inv2543": PROCESS_INVITE,
}

REQUIRED_HEADER = {405: "Allow", 415: "Accept", 420: "Unsupported"}


def loopback(data: bytes) -> bytes:
    """INDEX.md's same-length rewrite of the documentation IPv4 literals."""
    return (
        data.replace(b"192.0.2.", b"127.0.0.")
        .replace(b"192.168.", b"127.168.")
        .replace(b"135.", b"127.")
    )


def corpus_files() -> list[Path]:
    if not CORPUS.is_dir():
        pytest.skip(f"RFC 4475 corpus not found at {CORPUS}")
    return sorted(CORPUS.glob("*.dat"))


def test_corpus_is_complete() -> None:
    assert {p.stem for p in corpus_files()} == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_uas_answer(name: str) -> None:
    path = CORPUS / f"{name}.dat"
    if not path.is_file():
        pytest.skip(f"RFC 4475 corpus not found at {CORPUS}")
    core = UasCore(local_host="127.0.0.1", local_port=5060)
    now = 0.0
    core.receive_datagram(loopback(path.read_bytes()), SOURCE, now)
    sent = core.datagrams_to_send()
    events = []
    while (event := core.next_event()) is not None:
        events.append(event)

    expected = EXPECTED[name]
    if not expected:
        assert sent == []
    else:
        assert sent, "no response sent"
        # Status line and headers only: a 400 echoes the defective header values (§8.2.6.2).
        data = sent[0][0]
        assert data.startswith(b"SIP/2.0 ")
        status = int(data.split(b" ", 2)[1])
        assert status in expected
        header = REQUIRED_HEADER.get(status)
        if header is not None:
            assert f"\r\n{header}: ".encode() in data
        if status == 400:  # the log names the defect
            assert any(isinstance(e, BadMessageReceived) and e.reason for e in events)
        for _, (host, _port) in sent:  # nothing leaves the machine
            assert ipaddress.ip_address(host).is_loopback

    for event in events:
        if isinstance(event, IncomingCall):  # the call path: admission refuses
            core.reject(event.call_key, 486, now)
            core.forget(event.call_key)
    for _ in range(1000):
        deadline = core.next_deadline()
        if deadline is None:
            break
        now = max(now, deadline)
        core.handle_timer(now)
    assert core.next_deadline() is None
    assert (core.active_transactions, core.active_dialogs) == (0, 0)
