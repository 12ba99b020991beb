"""Logging straight to systemd-journald, one journal entry per record.

:class:`JournalHandler` turns a record made by :func:`voxgate.logging.log_event`
into a journal entry through ``systemd.journal.send`` (the native protocol,
``sd_journal_send(3)``): the event name becomes ``EVENT``, each field its
upper-case journal field, so an operator can filter with
``journalctl -u voxgate SESSION_ID=…``. :func:`under_journald` tells whether
stderr already goes to the journal (``systemd.exec(5)``, ``$JOURNAL_STREAM``),
which is when ``[log] target = "auto"`` picks this handler.
"""

from __future__ import annotations

import logging
import os
import re
import traceback
from typing import Any

import systemd.journal

from voxgate.logging import _FIELDS_ATTR

SYSLOG_IDENTIFIER = "voxgate"
"""``SYSLOG_IDENTIFIER`` of every entry: ``journalctl -t voxgate`` selects them."""

_RESERVED = frozenset({
    "MESSAGE", "MESSAGE_ID", "PRIORITY", "SYSLOG_IDENTIFIER", "EVENT", "LOGGER",
    "CODE_FILE", "CODE_LINE", "CODE_FUNC", "EXCEPTION",
})
"""Journal fields the handler sets itself; a log field of that name is sent as ``FIELD_<NAME>``."""

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


class JournalHandler(logging.Handler):
    """Sends each record to journald with ``systemd.journal.send``.

    Fields of an entry: ``MESSAGE`` (the record's message), ``PRIORITY``
    (:func:`syslog_priority`), ``SYSLOG_IDENTIFIER=voxgate``, ``LOGGER``,
    ``EVENT`` (``log`` for records not made by ``log_event``), one field per
    ``log_event`` field named by :func:`journal_field_name` (``session_id`` →
    ``SESSION_ID``, ``call_id`` → ``CALL_ID``, ``tenant``, ``transport``,
    ``reason`` …), ``CODE_FILE``/``CODE_LINE``/``CODE_FUNC`` of the logging
    call, and ``EXCEPTION`` with the formatted traceback when the record has
    one. A failure to send (journald gone, socket buffer full) goes to
    :meth:`logging.Handler.handleError` and never raises into the caller.
    """

    def emit(self, record: logging.LogRecord) -> None:
        try:
            systemd.journal.send(
                record.getMessage(),
                CODE_FILE=record.pathname,
                CODE_LINE=record.lineno,
                CODE_FUNC=record.funcName,
                **self._fields(record),
            )
        except Exception:
            self.handleError(record)

    def _fields(self, record: logging.LogRecord) -> dict[str, Any]:
        event, values = getattr(record, _FIELDS_ATTR, ("log", {}))
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
