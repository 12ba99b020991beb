"""Structured logging: one event per line, fields carried with the record.

Components log through :func:`log_event`, which attaches an ``event`` name and
fields (``call_id``, ``session_id``, ``reason`` …) to the stdlib record. The
stderr handler writes logfmt (``ts=… level=info event=call_start call_id=…``);
the systemd issue adds a journald handler that maps the same fields to
journal fields. Nothing here logs per packet.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

logger = logging.getLogger("voxgate")

_FIELDS_ATTR = "voxgate_fields"


def log_event(
    level: int,
    event: str,
    message: str = "",
    *,
    exc_info: BaseException | None = None,
    **fields: Any,
) -> None:
    """Log ``event`` with ``fields`` (None values are left out).

    ``exc_info`` attaches an exception's traceback to the record.
    """
    if not logger.isEnabledFor(level):
        return
    clean = {k: v for k, v in fields.items() if v is not None}
    logger.log(
        level,
        message or event.replace("_", " "),
        exc_info=exc_info,
        extra={_FIELDS_ATTR: (event, clean)},
        stacklevel=2,
    )


def _quote(value: Any) -> str:
    text = value if isinstance(value, str) else (
        f"{value:.3f}" if isinstance(value, float) else str(value)
    )
    if text and not any(c in text for c in ' "=\\') and text.isprintable():
        return text
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'


class LogfmtFormatter(logging.Formatter):
    """``ts=<ISO 8601 UTC> level=<name> event=<name> msg=<text> key=value …``."""

    def format(self, record: logging.LogRecord) -> str:
        event, fields = getattr(record, _FIELDS_ATTR, ("log", {}))
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        parts = [
            f"ts={ts}.{int(record.msecs):03d}Z",
            f"level={record.levelname.lower()}",
            f"event={event}",
            f"msg={_quote(record.getMessage())}",
        ]
        parts.extend(f"{k}={_quote(v)}" for k, v in fields.items())
        if record.exc_info:
            parts.append(f"exc={_quote(self.formatException(record.exc_info))}")
        return " ".join(parts)


class RateLimit(logging.Filter):
    """At most ``burst`` warnings per event name every ``window_s`` seconds.

    What is held back is counted; the first record of that event let through
    afterwards carries ``suppressed=N``. Info and debug records pass freely
    (they are one per call, never per packet).
    """

    def __init__(self, burst: int = 5, window_s: float = 10.0) -> None:
        super().__init__()
        self.burst = burst
        self.window_s = window_s
        self._windows: dict[str, tuple[float, int, int]] = {}  # event → (start, sent, held)

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        event, fields = getattr(record, _FIELDS_ATTR, ("log", {}))
        now = time.monotonic()
        start, sent, held = self._windows.get(event, (now, 0, 0))
        if now - start >= self.window_s:
            start, sent = now, 0
        if sent >= self.burst:
            self._windows[event] = (start, sent, held + 1)
            return False
        if held:
            setattr(record, _FIELDS_ATTR, (event, {**fields, "suppressed": held}))
        if len(self._windows) < 1024 or event in self._windows:
            self._windows[event] = (start, sent + 1, 0)
        return True


def setup_logging(level: str, target: str = "auto") -> None:
    """Send voxgate's records at ``level`` (debug … error) to ``target``.

    ``journal`` (or ``auto`` when systemd connected stderr to the journal):
    structured records through ``systemd.journal``; ``stderr``: logfmt lines.
    """
    from voxgate.journal import JournalHandler, under_journald

    handler: logging.Handler
    if target == "journal" or (target == "auto" and under_journald()):
        handler = JournalHandler()
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(LogfmtFormatter())
    handler.addFilter(RateLimit())
    logger.handlers[:] = [handler]
    logger.setLevel(level.upper())
    logger.propagate = False
