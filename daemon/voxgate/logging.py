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


def setup_logging(level: str) -> None:
    """Send voxgate's records to stderr as logfmt at ``level`` (debug … error)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(LogfmtFormatter())
    logger.handlers[:] = [handler]
    logger.setLevel(level.upper())
    logger.propagate = False
