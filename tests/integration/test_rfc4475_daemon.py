"""The 49 RFC 4475 torture messages sent to the running daemon over UDP.

Each ``.dat`` is rewritten to loopback as ``INDEX.md`` says (IPv4 literals,
same length) and sent from 127.0.0.1 at the port its top Via names (5060, or
5061 for TLS, when it names none) when that port is free, so that a
response sent per RFC 3261 §18.2.2 (``received`` address, Via port) comes
back to us. The first response carrying the request's Call-ID is compared
with the table in ``INDEX.md``.

Several messages share a top Via branch, sent-by and method (``cparam01`` and
``cparam02``, ``escnull`` and ``regescrt`` …), so to one daemon the second is a
retransmission of the first's server transaction (RFC 3261 §17.2.3) and gets
the first's cached response. Each message is therefore checked on a fresh
daemon; a last test sends all 49 in a row to one daemon, which must then
still be running and answer OPTIONS with 200.
"""

from __future__ import annotations

import contextlib
import re
import select
import socket
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.harness.daemon import (
    Daemon,
    free_udp_port,
    options_request,
    status_code,
)
from tests.integration.conftest import StartDaemon

CORPUS = Path(__file__).resolve().parents[3] / "shared" / "conformance" / "rfc4475"
ANSWER_TIMEOUT_S = 2.0
SILENCE_TIMEOUT_S = 0.5
# "process" in INDEX.md, per method: answers of the call path or of OPTIONS.
PROCESS_CODES = {
    "INVITE": frozenset({100, 180, 183, 200, 486, 503}),
    "OPTIONS": frozenset({200, 503}),
}
_REWRITES = ((b"192.0.2.", b"127.0.0."), (b"192.168.", b"127.168."), (b"135.", b"127."))
_ROW = re.compile(r"^\|\s*(\w+\.dat)\s*\|[^|]*\|\s*(.+?)\s*\|\s*$")
_TOP_VIA = re.compile(
    # header name, folded LWS allowed (RFC 3261 §25.1), sent-protocol, sent-by host[:port]
    rb"^(?:via|v)\s*:\s*SIP\s*/\s*[\d.]+\s*/\s*(\w+)\s+"
    rb"([A-Za-z0-9.\-\[\]:]+?)(?:\s*:\s*(\d+))?\s*[;,\r\n]",
    re.IGNORECASE | re.MULTILINE,
)
_CALL_ID = re.compile(rb"^(?:call-id|i)[ \t]*:[ \t]*(\S+)", re.IGNORECASE | re.MULTILINE)


@dataclass(frozen=True, slots=True)
class Expectation:
    """What INDEX.md says a UAS answers: a set of status codes, or None for silence."""

    answer_text: str
    codes: frozenset[int] | None


def load_index() -> dict[str, str]:
    """file name → the "UAS answer" column of INDEX.md."""
    rows = {}
    for line in (CORPUS / "INDEX.md").read_text().splitlines():
        match = _ROW.match(line)
        if match:
            rows[match.group(1)] = match.group(2)
    return rows


def expectation(answer_text: str, method: str) -> Expectation:
    """Turn INDEX.md's answer text into the acceptable status codes."""
    if answer_text.startswith("none"):
        return Expectation(answer_text, None)
    codes = {int(code) for code in re.findall(r"\b([1-6]\d\d)\b", answer_text)}
    if "process" in answer_text:
        codes |= PROCESS_CODES.get(method, frozenset({405}))
    return Expectation(answer_text, frozenset(codes))


def to_loopback(message: bytes) -> bytes:
    """INDEX.md's length-preserving rewrite of IPv4 literals to 127/8."""
    for old, new in _REWRITES:
        message = message.replace(old, new)
    return message


def via_reply_ports(message: bytes) -> list[int]:
    """Where a response to ``message`` goes per §18.2.2: the top Via port, else the default."""
    headers = message.split(b"\r\n\r\n", 1)[0]
    match = _TOP_VIA.search(headers)
    if match is None:
        return [5060]
    if match.group(3):
        return [int(match.group(3))]
    return [5061, 5060] if match.group(1).upper() == b"TLS" else [5060]


@contextlib.contextmanager
def reply_sockets(ports: list[int]) -> Iterator[list[socket.socket]]:
    """UDP sockets on 127.0.0.1 at each free port of ``ports``, plus one ephemeral one last."""
    with contextlib.ExitStack() as stack:
        sockets = []
        for port in [*ports, 0]:
            s = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            sockets.append(s)
        yield sockets


def first_response(sockets: list[socket.socket], call_id: bytes, timeout_s: float) -> bytes | None:
    """The first datagram on any socket whose Call-ID is ``call_id`` (others are stale)."""
    deadline = time.monotonic() + timeout_s
    while (remaining := deadline - time.monotonic()) > 0:
        ready, _, _ = select.select(sockets, [], [], remaining)
        for s in ready:
            data: bytes = s.recv(65536)
            found = _CALL_ID.search(data)
            if not call_id or found is None or found.group(1) == call_id:
                return data
    return None


INDEX = load_index()


def test_index_lists_every_message() -> None:
    assert len(INDEX) == 49
    assert sorted(INDEX) == sorted(p.name for p in CORPUS.glob("*.dat"))


def send_torture(daemon: Daemon, message: bytes, timeout_s: float) -> bytes | None:
    """Send ``message`` from the port its top Via names; the first response to it."""
    found = _CALL_ID.search(message.split(b"\r\n\r\n", 1)[0])
    call_id = found.group(1) if found else b""
    with reply_sockets(via_reply_ports(message)) as sockets:
        sockets[0].sendto(message, daemon.sip_address)
        return first_response(sockets, call_id, timeout_s)


@pytest.mark.parametrize("name", sorted(INDEX))
def test_torture_message(start_daemon: StartDaemon, name: str) -> None:
    daemon = start_daemon()
    message = to_loopback((CORPUS / name).read_bytes())
    method = message.split(b" ", 1)[0].decode("latin-1")
    expected = expectation(INDEX[name], method)
    timeout = ANSWER_TIMEOUT_S if expected.codes is not None else SILENCE_TIMEOUT_S
    response = send_torture(daemon, message, timeout)
    assert daemon.alive(), daemon.log_text()[-3000:]
    if expected.codes is None:
        assert response is None, f"{name}: expected no answer, got {response!r:.200}"
        return
    assert response is not None, f"{name}: no answer; expected {expected.answer_text}"
    status = status_code(response)
    assert status in expected.codes, f"{name}: got {status}, expected {expected.answer_text}"


def test_daemon_survives_the_corpus(start_daemon: StartDaemon) -> None:
    daemon = start_daemon()
    answered = 0
    for name in sorted(INDEX):
        message = to_loopback((CORPUS / name).read_bytes())
        answered += send_torture(daemon, message, SILENCE_TIMEOUT_S) is not None
        assert daemon.alive(), f"died after {name}:\n{daemon.log_text()[-3000:]}"
    assert answered >= 30, answered  # responses to earlier transactions are filtered out
    source_port = free_udp_port()
    replies = daemon.exchange(
        options_request(daemon.sip_port, source_port, uuid.uuid4().hex),
        source_port=source_port,
    )
    assert daemon.alive()
    assert [status_code(r) for r in replies] == [200], replies
