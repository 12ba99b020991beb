"""Logging straight to systemd-journald, one journal entry per record.

:class:`JournalHandler` turns a record made by :func:`voxgate.logging.log_event`
into a journal entry through ``systemd.journal.send`` (the native protocol,
``sd_journal_send(3)``): the event name becomes ``EVENT``, each field its
upper-case journal field, so an operator can filter with
``journalctl -u voxgate SESSION_ID=…``. ``MESSAGE``, what ``journalctl -f`` and
``systemctl status`` show, is the text followed by the record's essentials
(:func:`journal_message`: ``call ended: call_id=… reason=bye duration=12.3s
peer=… tenant=acme``). :func:`under_journald` tells whether
stderr already goes to the journal (``systemd.exec(5)``, ``$JOURNAL_STREAM``),
which is when ``[log] target = "auto"`` picks this handler.

While journald cannot be reached (stopped, crashed, restarting) records are not
lost: they go to stderr as logfmt lines, after one notice saying so, and the
handler returns to the journal by itself with the first record journald takes
again (it tries the journal first for every record).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import sys
import time
import traceback
from collections.abc import Mapping
from typing import Any, TextIO

import systemd.journal
from prometheus_client import Counter

from voxgate.logging import _FIELDS_ATTR, LogfmtFormatter, _quote
from voxgate.metrics import REGISTRY

JOURNAL_FALLBACK_RECORDS = Counter(
    "voxgate_log_journal_fallback_records",
    "Log records written to stderr because journald could not be reached",
    registry=REGISTRY,
)

SYSLOG_IDENTIFIER = "voxgate"
"""``SYSLOG_IDENTIFIER`` of every entry: ``journalctl -t voxgate`` selects them."""

_RESERVED = frozenset({
    "MESSAGE", "MESSAGE_ID", "PRIORITY", "SYSLOG_IDENTIFIER", "EVENT", "LOGGER",
    "CODE_FILE", "CODE_LINE", "CODE_FUNC", "EXCEPTION",
})
"""Journal fields the handler sets itself; a log field of that name is sent as ``FIELD_<NAME>``."""

MESSAGE_FIELDS = ("call_id", "reason", "status", "duration_s", "waited_s", "paused_s",
                  "peer", "tenant")
"""The fields ``MESSAGE`` repeats after the text, in this order, when a record has them:
the call (its Call-ID first, its tenant last) and what happened to it."""

_NOT_IN_FIELD_NAME = re.compile(r"[^A-Z0-9_]")
_FIELD_NAME_MAX = 64
"""journald ignores field names longer than this (``journal-file.h``)."""


def under_journald() -> bool:
    """True when systemd connected stderr (fd 2) to the journal.

    systemd sets ``$JOURNAL_STREAM`` to ``<st_dev>:<st_ino>`` of the stream it
    gives the service (``systemd.exec(5)``); it only counts when fd 2 is still
    that stream, not when a child inherited the variable with another stderr.
    """
    value = os.environ.get("JOURNAL_STREAM", "")
    dev, sep, ino = value.partition(":")
    if not sep or not dev.isdigit() or not ino.isdigit():
        return False
    try:
        st = os.fstat(2)
    except OSError:
        return False
    return (st.st_dev, st.st_ino) == (int(dev), int(ino))


def syslog_priority(levelno: int) -> int:
    """Map a :mod:`logging` level number to a syslog priority 0-7 (RFC 5424 §6.2.1).

    CRITICAL → 2 (crit), ERROR → 3 (err), WARNING → 4 (warning), INFO → 6
    (info), DEBUG and below → 7 (debug); levels in between take the lower one.
    """
    if levelno >= logging.CRITICAL:
        return 2
    if levelno >= logging.ERROR:
        return 3
    if levelno >= logging.WARNING:
        return 4
    if levelno >= logging.INFO:
        return 6
    return 7


def journal_field_name(name: str) -> str:
    """``session_id`` → ``SESSION_ID``: upper case, other characters as ``_``.

    The result is a valid journal field name (``[A-Z0-9_]``, not starting with
    ``_`` or a digit, at most 64 characters) that does not clash with the
    fields the handler sets itself (those get a ``FIELD_`` prefix).
    """
    upper = _NOT_IN_FIELD_NAME.sub("_", name.upper()).lstrip("_")
    if not upper or upper[0].isdigit() or upper in _RESERVED:
        upper = f"FIELD_{upper}"
    return upper[:_FIELD_NAME_MAX]


def journal_message(text: str, fields: Mapping[str, Any]) -> str:
    """``text`` followed by the :data:`MESSAGE_FIELDS` among ``fields``, as ``key=value``.

    A field in seconds (``duration_s``) is shown as ``duration=12.3s``; a value
    with spaces is quoted as in logfmt. ``call ended`` with a call's fields
    gives ``call ended: call_id=c1@x reason=bye duration=12.3s
    peer=127.0.0.1:5061 tenant=acme``; a record without any of them keeps its
    text alone.
    """
    parts = []
    for name in MESSAGE_FIELDS:
        value = fields.get(name)
        if value is None:
            continue
        if name.endswith("_s") and isinstance(value, int | float):
            parts.append(f"{name.removesuffix('_s')}={value:.1f}s")
        else:
            parts.append(f"{name}={_quote(value)}")
    return f"{text}: {' '.join(parts)}" if parts else text


class JournalHandler(logging.Handler):
    """Sends each record to journald with ``systemd.journal.send``.

    Fields of an entry: ``MESSAGE`` (the record's message and its essentials,
    :func:`journal_message`), ``PRIORITY``
    (:func:`syslog_priority`), ``SYSLOG_IDENTIFIER=voxgate``, ``LOGGER``,
    ``EVENT`` (``log`` for records not made by ``log_event``), one field per
    ``log_event`` field named by :func:`journal_field_name` (``session_id`` →
    ``SESSION_ID``, ``call_id`` → ``CALL_ID``, ``tenant``, ``transport``,
    ``reason`` …), ``CODE_FILE``/``CODE_LINE``/``CODE_FUNC`` of the logging
    call, and ``EXCEPTION`` with the formatted traceback when the record has
    one.

    When sending fails with an OSError (journald gone: ENOENT, ECONNREFUSED;
    its socket buffer full: EAGAIN) the record is written to ``fallback``
    (default: stderr at the time of the record) as a logfmt line and counted
    in ``voxgate_log_journal_fallback_records_total``; the first such record of
    an outage is preceded by one ``journal_unreachable`` notice there. Every
    record tries the journal first, so the first one journald takes again
    ends the outage: one ``journal_reachable`` notice goes to the fallback
    stream and one ``journal_reachable`` entry to the journal (with the
    number of records that went to stderr). Other failures (a field value
    the journal cannot take) go to :meth:`logging.Handler.handleError`.
    Nothing raises into the caller.
    """

    def __init__(self, fallback: TextIO | None = None) -> None:
        super().__init__()
        self._fallback = fallback
        self._formatter = LogfmtFormatter()
        self._down_since: float | None = None  # monotonic start of the outage
        self.fallback_records = 0
        """Records written to the fallback stream in the outage in progress."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._send(record)
        except OSError as exc:
            self._write_fallback(record, exc)
            return
        except Exception:
            self.handleError(record)
            return
        if self._down_since is not None:
            self._journal_back()

    def _send(self, record: logging.LogRecord) -> None:
        systemd.journal.send(
            journal_message(record.getMessage(), _event_fields(record)[1]),
            CODE_FILE=record.pathname,
            CODE_LINE=record.lineno,
            CODE_FUNC=record.funcName,
            **self._fields(record),
        )

    def _stream(self) -> TextIO:
        return self._fallback if self._fallback is not None else sys.stderr

    def _notice(self, level: int, event: str, message: str, **fields: Any) -> logging.LogRecord:
        notice = logging.LogRecord("voxgate", level, __file__, 0, message, None, None,
                                   func="emit")
        setattr(notice, _FIELDS_ATTR, (event, fields))
        return notice

    def _write_line(self, record: logging.LogRecord) -> None:
        stream = self._stream()
        try:
            stream.write(self._formatter.format(record) + "\n")
            stream.flush()
        except Exception:
            self.handleError(record)

    def _write_fallback(self, record: logging.LogRecord, exc: OSError) -> None:
        if self._down_since is None:
            self._down_since = time.monotonic()
            self.fallback_records = 0
            name = errno.errorcode.get(exc.errno or 0, type(exc).__name__)
            self._write_line(self._notice(
                logging.WARNING, "journal_unreachable",
                f"journald cannot be reached ({exc.strerror or exc}); logging to stderr "
                "until it takes records again", error=name))
        self.fallback_records += 1
        JOURNAL_FALLBACK_RECORDS.inc()
        self._write_line(record)

    def _journal_back(self) -> None:
        assert self._down_since is not None
        fields = {"stderr_records": self.fallback_records,
                  "down_s": round(time.monotonic() - self._down_since, 3)}
        self._down_since = None
        notice = self._notice(logging.INFO, "journal_reachable",
                              "journald takes records again; logging to the journal", **fields)
        self._write_line(notice)
        with contextlib.suppress(OSError):  # gone again: the next record starts an outage
            self._send(notice)

    def _fields(self, record: logging.LogRecord) -> dict[str, Any]:
        event, values = _event_fields(record)
        fields: dict[str, Any] = {
            journal_field_name(name): value for name, value in values.items()
        }
        fields.update(
            PRIORITY=syslog_priority(record.levelno),
            SYSLOG_IDENTIFIER=SYSLOG_IDENTIFIER,
            LOGGER=record.name,
            EVENT=event,
        )
        if record.exc_info and record.exc_info[1] is not None:
            fields["EXCEPTION"] = "".join(traceback.format_exception(record.exc_info[1]))
        return fields


def _event_fields(record: logging.LogRecord) -> tuple[str, dict[str, Any]]:
    """The event name and fields :func:`~voxgate.logging.log_event` attached to
    ``record`` (``log`` and none for a plain record)."""
    event, fields = getattr(record, _FIELDS_ATTR, ("log", {}))
    return event, fields
