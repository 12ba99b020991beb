"""voxgate.journal: field and priority mapping with systemd.journal.send faked."""

from __future__ import annotations

import ast
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import systemd.journal
import trio.testing

from tests.harness.daemon import parse_logfmt
from tests.test_session import FakeMedia, run_with_clock
from tests.test_session import make as make_session
from voxgate.journal import (
    JournalHandler,
    journal_field_name,
    journal_message,
    syslog_priority,
    under_journald,
)
from voxgate.logging import TRIO_ACCEPT_LOGGER, log_event, logger, setup_logging
from voxgate.metrics import REGISTRY
from voxgate.pipeline.clock import MediaClock

REPO = Path(__file__).resolve().parents[1]


class Sent:
    """What the fake ``systemd.journal.send`` received, one dict per call."""

    def __init__(self) -> None:
        self.entries: list[dict[str, Any]] = []
        self.fail_with: Exception | None = None

    def __call__(self, MESSAGE: str, **fields: Any) -> None:
        if self.fail_with is not None:
            raise self.fail_with
        self.entries.append({"MESSAGE": MESSAGE, **fields})


@pytest.fixture
def sent(monkeypatch: pytest.MonkeyPatch) -> Iterator[Sent]:
    fake = Sent()
    monkeypatch.setattr(systemd.journal, "send", fake)
    handler = JournalHandler()
    handlers, level, propagate = logger.handlers[:], logger.level, logger.propagate
    logger.handlers[:] = [handler]
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    yield fake
    logger.handlers[:] = handlers
    logger.setLevel(level)
    logger.propagate = propagate


def test_log_event_fields_become_journal_fields(sent: Sent) -> None:
    log_event(logging.INFO, "call_start", "call started", session_id="abc123",
              call_id="c1@x", tenant="default", transport="sip", reason=None,
              rtp_port=20002, remote="127.0.0.1:5062")
    (entry,) = sent.entries
    assert entry["MESSAGE"] == "call started: call_id=c1@x tenant=default"
    assert entry["PRIORITY"] == 6
    assert entry["SYSLOG_IDENTIFIER"] == "voxgate"
    assert entry["EVENT"] == "call_start"
    assert entry["LOGGER"] == "voxgate"
    assert entry["SESSION_ID"] == "abc123"
    assert entry["CALL_ID"] == "c1@x"
    assert entry["TENANT"] == "default"
    assert entry["TRANSPORT"] == "sip"
    assert entry["RTP_PORT"] == 20002
    assert entry["REMOTE"] == "127.0.0.1:5062"
    assert "REASON" not in entry  # None values are left out by log_event
    assert "EXCEPTION" not in entry


def test_message_carries_the_essentials_and_the_fields_stay(sent: Sent) -> None:
    """``journalctl -f`` and ``systemctl status`` show MESSAGE only: the call's
    essentials are in its text, and still in their own fields."""
    log_event(logging.INFO, "call_end", "call ended", session_id="abc123", call_id="c1@x",
              tenant="acme", transport="sip", reason="bye", duration_s=12.345,
              peer="127.0.0.1:5061", talk_s=12.0, codec="PCMU")
    (entry,) = sent.entries
    assert entry["MESSAGE"] == ("call ended: call_id=c1@x reason=bye duration=12.3s "
                                "peer=127.0.0.1:5061 tenant=acme")
    assert (entry["CALL_ID"], entry["REASON"], entry["DURATION_S"], entry["PEER"],
            entry["TENANT"], entry["SESSION_ID"]) == (
        "c1@x", "bye", 12.345, "127.0.0.1:5061", "acme", "abc123")


@pytest.mark.parametrize(("text", "fields", "expected"), [
    ("voxgate ready", {"sip": "0.0.0.0:5060"}, "voxgate ready"),
    ("refused: capacity", {"tenant": "acme", "status": 503, "reason": "capacity",
                           "call_id": "k"}, "refused: capacity: call_id=k reason=capacity "
                                            "status=503 tenant=acme"),
    ("dequeued", {"waited_s": 2, "call_id": "k"}, "dequeued: call_id=k waited=2.0s"),
    ("media is back", {"paused_s": 0.04, "call_id": "a b"},
     'media is back: call_id="a b" paused=0.0s'),
])
def test_journal_message(text: str, fields: dict[str, Any], expected: str) -> None:
    assert journal_message(text, fields) == expected


class _Call:
    session_id = "abc123"
    call_id = "c1@x"
    tenant = "acme"


def test_a_call_names_itself_in_every_record(sent: Sent) -> None:
    log_event(logging.INFO, "session_paused", "media stopped", call=_Call())
    log_event(logging.INFO, "stream_dropped", "dropped", call=_Call(), session_id=None,
              remote="10.0.0.1:4000")
    paused, dropped = sent.entries
    assert (paused["SESSION_ID"], paused["CALL_ID"], paused["TENANT"]) == (
        "abc123", "c1@x", "acme")
    assert paused["MESSAGE"] == "media stopped: call_id=c1@x tenant=acme"
    assert dropped["SESSION_ID"] == "abc123"  # a None field does not hide the call's
    assert dropped["REMOTE"] == "10.0.0.1:4000"


async def test_session_records_carry_tenant_and_essentials(
    sent: Sent, autojump_clock: trio.testing.MockClock,
) -> None:
    """A real session that pauses, recovers and ends: TENANT on every record."""
    clock = MediaClock()
    media = FakeMedia(silent_ticks=range(10, 110))  # a 2 s gap: paused, then back
    session, _ = make_session(clock, media, max_s=4)
    session.tenant, session.peer = "acme", "127.0.0.1:5061"
    await run_with_clock(session, clock)
    by_event = {entry["EVENT"]: entry for entry in sent.entries}
    assert list(by_event) == ["session_paused", "session_recovered", "call_end"]
    for entry in sent.entries:
        assert (entry["SESSION_ID"], entry["CALL_ID"], entry["TENANT"]) == ("s1", "c1", "acme")
    assert re.fullmatch(r"call ended: call_id=c1 reason=max-duration duration=4\.\ds "
                        r"peer=127\.0\.0\.1:5061 tenant=acme", by_event["call_end"]["MESSAGE"])
    assert by_event["call_end"]["PEER"] == "127.0.0.1:5061"
    assert re.fullmatch(r"media is back: call_id=c1 paused=\d\.\ds tenant=acme",
                        by_event["session_recovered"]["MESSAGE"])


_BEFORE_ADMISSION = {
    "call_refused": "sip_endpoint.py",  # an unusable SDP offer, answered before admission
    "sip_bad_message": "sip_endpoint.py",  # a SIP message, maybe no call at all
    "sip_event_error": "sip_endpoint.py",  # a fault handling a SIP event
}
"""Records that name a Call-ID before admission has placed the call in a tenant."""


def test_every_per_call_record_names_its_tenant() -> None:
    """Every ``log_event`` that names a call (``session_id=``/``call_id=``) passes the
    call (``call=``) or its ``tenant=``, so ``journalctl TENANT=… EVENT=…`` finds it."""
    missing = []
    for path in sorted((REPO / "daemon" / "voxgate").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                    and node.func.id == "log_event"):
                continue
            names = {kw.arg for kw in node.keywords}
            event = ast.unparse(node.args[1]).strip("'\"")
            if (names & {"session_id", "call_id"} and not names & {"call", "tenant"}
                    and _BEFORE_ADMISSION.get(event) != path.name):
                missing.append(f"{path.relative_to(REPO)}:{node.lineno} {event}")
    assert missing == []


def test_code_location_is_the_log_event_caller(sent: Sent) -> None:
    log_event(logging.WARNING, "budget_soft", reason="rss")
    (entry,) = sent.entries
    assert entry["CODE_FILE"] == __file__
    assert entry["CODE_FUNC"] == "test_code_location_is_the_log_event_caller"
    assert isinstance(entry["CODE_LINE"], int)
    assert entry["REASON"] == "rss"
    assert entry["MESSAGE"] == "budget soft: reason=rss"


def test_plain_records_get_event_log(sent: Sent) -> None:
    logging.getLogger("voxgate.sip").error("plain %s", "text")
    (entry,) = sent.entries
    assert entry["MESSAGE"] == "plain text"
    assert entry["EVENT"] == "log"
    assert entry["PRIORITY"] == 3
    assert entry["LOGGER"] == "voxgate.sip"


def test_exception_traceback_is_sent(sent: Sent) -> None:
    try:
        raise RuntimeError("agent exploded")
    except RuntimeError as e:
        log_event(logging.ERROR, "session_crashed", session_id="s1", exc_info=e)
    (entry,) = sent.entries
    assert entry["EXCEPTION"].startswith("Traceback (most recent call last):")
    assert "RuntimeError: agent exploded" in entry["EXCEPTION"]
    assert entry["SESSION_ID"] == "s1"


def test_field_names_that_clash_are_prefixed(sent: Sent) -> None:
    odd_names: dict[str, Any] = {"peer.addr": "x", "9lives": 1}
    log_event(logging.INFO, "odd", exception="e", priority="p", logger="l", **odd_names)
    (entry,) = sent.entries
    assert entry["MESSAGE"] == "odd"
    assert entry["EVENT"] == "odd"
    assert entry["FIELD_EXCEPTION"] == "e"
    assert "EXCEPTION" not in entry
    assert entry["LOGGER"] == "voxgate"
    assert entry["FIELD_LOGGER"] == "l"
    assert entry["PRIORITY"] == 6
    assert entry["FIELD_PRIORITY"] == "p"
    assert entry["PEER_ADDR"] == "x"
    assert entry["FIELD_9LIVES"] == 1


@pytest.mark.parametrize(("name", "expected"), [
    ("session_id", "SESSION_ID"),
    ("Call-ID", "CALL_ID"),
    ("_private", "PRIVATE"),
    ("", "FIELD_"),
    ("code_file", "FIELD_CODE_FILE"),
    ("x" * 80, "X" * 64),
])
def test_journal_field_name(name: str, expected: str) -> None:
    assert journal_field_name(name) == expected


@pytest.mark.parametrize(("levelno", "priority"), [
    (logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4),
    (logging.INFO, 6), (logging.DEBUG, 7), (logging.INFO + 5, 6), (1, 7), (60, 2),
])
def test_syslog_priority(levelno: int, priority: int) -> None:
    assert syslog_priority(levelno) == priority


def test_other_send_failures_go_to_handle_error(
    sent: Sent, monkeypatch: pytest.MonkeyPatch,
) -> None:
    sent.fail_with = TypeError("a field value journald cannot take")
    handled: list[logging.LogRecord] = []
    monkeypatch.setattr(JournalHandler, "handleError",
                        lambda self, record: handled.append(record))
    log_event(logging.INFO, "call_end", session_id="abc")  # must not raise
    assert [r.getMessage() for r in handled] == ["call end"]


def _lines(text: str) -> list[dict[str, str]]:
    return [parse_logfmt(line) for line in text.splitlines()]


def test_journald_down_records_go_to_stderr_after_one_notice(
    sent: Sent, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setattr(logging, "raiseExceptions", True)
    before = REGISTRY.get_sample_value("voxgate_log_journal_fallback_records_total") or 0.0
    sent.fail_with = ConnectionRefusedError(111, "Connection refused")
    log_event(logging.INFO, "call_start", "call started", session_id="abc")
    log_event(logging.WARNING, "call_end", session_id="abc", reason="bye")
    err = capsys.readouterr().err
    assert "--- Logging error ---" not in err
    lines = _lines(err)
    assert [line["event"] for line in lines] == ["journal_unreachable", "call_start", "call_end"]
    assert lines[0]["level"] == "warning" and lines[0]["error"] == "ECONNREFUSED"
    assert "stderr" in lines[0]["msg"]
    assert (lines[1]["session_id"], lines[1]["msg"]) == ("abc", "call started")
    assert lines[2]["reason"] == "bye"
    assert sent.entries == []
    after = REGISTRY.get_sample_value("voxgate_log_journal_fallback_records_total")
    assert after == before + 2


def test_journald_back_takes_records_again_with_one_notice(
    sent: Sent, capsys: pytest.CaptureFixture[str],
) -> None:
    sent.fail_with = FileNotFoundError(2, "No such file or directory")
    log_event(logging.INFO, "call_start", session_id="abc")
    sent.fail_with = None
    log_event(logging.INFO, "call_end", session_id="abc")
    log_event(logging.INFO, "call_end", session_id="def")
    lines = _lines(capsys.readouterr().err)
    assert [line["event"] for line in lines] == [
        "journal_unreachable", "call_start", "journal_reachable"]
    assert lines[2]["stderr_records"] == "1"
    assert [e["EVENT"] for e in sent.entries] == ["call_end", "journal_reachable", "call_end"]
    assert sent.entries[1]["STDERR_RECORDS"] == 1
    sent.fail_with = BlockingIOError(11, "Resource temporarily unavailable")
    log_event(logging.INFO, "call_start", session_id="ghi")  # a new outage: a new notice
    assert [line["event"] for line in _lines(capsys.readouterr().err)] == [
        "journal_unreachable", "call_start"]


def _stderr_stream() -> str:
    st = os.fstat(2)
    return f"{st.st_dev}:{st.st_ino}"


def test_under_journald_when_stream_matches_stderr(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JOURNAL_STREAM", _stderr_stream())
    assert under_journald()


@pytest.mark.parametrize("value", ["", "1:2:3", "abc", "12", ":", "-1:5"])
def test_not_under_journald_with_malformed_stream(
    monkeypatch: pytest.MonkeyPatch, value: str,
) -> None:
    monkeypatch.setenv("JOURNAL_STREAM", value)
    assert not under_journald()


def test_not_under_journald_when_stream_is_another_file(monkeypatch: pytest.MonkeyPatch) -> None:
    dev, ino = _stderr_stream().split(":")
    monkeypatch.setenv("JOURNAL_STREAM", f"{dev}:{int(ino) + 1}")
    assert not under_journald()


def test_not_under_journald_without_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    assert not under_journald()


def test_reload_keeps_the_journal_handler_and_its_outage(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    handlers, level, propagate = logger.handlers[:], logger.level, logger.propagate
    accept_logger = logging.getLogger(TRIO_ACCEPT_LOGGER)
    accept_handlers, accept_propagate = accept_logger.handlers[:], accept_logger.propagate
    fake = Sent()
    fake.fail_with = ConnectionRefusedError(111, "Connection refused")
    monkeypatch.setattr(systemd.journal, "send", fake)
    try:
        setup_logging("info", "journal")
        first = logger.handlers[0]
        log_event(logging.INFO, "reloaded")
        setup_logging("info", "journal")  # what a reload does
        assert logger.handlers == [first]
        log_event(logging.INFO, "reloaded")
    finally:
        logger.handlers[:] = handlers
        logger.setLevel(level)
        logger.propagate = propagate
        accept_logger.handlers[:] = accept_handlers
        accept_logger.propagate = accept_propagate
    assert [line["event"] for line in _lines(capsys.readouterr().err)] == [
        "journal_unreachable", "reloaded", "reloaded"]
