"""Structured logging: one event per line, fields carried with the record.

Components log through :func:`log_event`, which attaches an ``event`` name and
fields (``call_id``, ``session_id``, ``reason`` …) to the stdlib record. The
stderr handler writes logfmt (``ts=… level=info event=call_start call_id=…``);
the journald handler (:mod:`voxgate.journal`) maps the same fields to journal
fields. A per-call record passes its call (``call=``, a :class:`CallIdentity`)
so that it always carries ``session_id``, ``call_id`` and ``tenant``. Nothing
here logs per packet.

:class:`ResourceShortage` is how every loop reports running out of file
descriptors or kernel buffers: one line when an episode starts, one when it
ends, every failure counted in ``voxgate_resource_shortages_total``.
"""

from __future__ import annotations

import errno
import logging
import sys
import time
from typing import Any, Protocol

from prometheus_client import Counter

from voxgate.metrics import REGISTRY

RESOURCE_SHORTAGES = Counter(
    "voxgate_resource_shortages",
    "Operations that failed for lack of file descriptors or kernel buffers "
    "(EMFILE, ENFILE, ENOBUFS, ENOMEM, EAGAIN on a send), by component and errno name",
    ["component", "error"], registry=REGISTRY,
)

logger = logging.getLogger("voxgate")

_FIELDS_ATTR = "voxgate_fields"

SHORTAGE_BACKOFF_S = 0.1
"""How long an accept or receive loop pauses after a resource shortage (as trio's
``serve_listeners`` does), so that it neither spins nor gives up."""
TRIO_ACCEPT_LOGGER = "trio.serve_listeners"
"""The logger trio's ``serve_listeners`` (WebSocket and metrics listeners) reports
``accept returned EMFILE …`` on, ten times a second with a traceback."""
ACCEPT_QUIET_S = 10.0
"""trio reports no recovery: an accept failure this long after the previous one
starts a new episode."""


class CallIdentity(Protocol):
    """What names a call in its log records (a session, its agent's controls, a
    call record, a call in the lifecycle)."""

    @property
    def session_id(self) -> str:
        """The session id (12 hex digits): ``voxgatectl sessions``, ``SESSION_ID=``."""

    @property
    def call_id(self) -> str:
        """SIP Call-ID, a stream's callSid or an ALSA line's ``<line>-<session id>``."""

    @property
    def tenant(self) -> str:
        """The tenant admission put the call in (``default`` when none matched)."""


def log_event(
    level: int,
    event: str,
    message: str = "",
    *,
    call: CallIdentity | None = None,
    exc_info: BaseException | None = None,
    **fields: Any,
) -> None:
    """Log ``event`` with ``fields`` (None values are left out).

    ``call`` puts the call's ``session_id``, ``call_id`` and ``tenant`` first
    (every per-call record passes it, so ``journalctl TENANT=… EVENT=…`` finds
    them all). ``exc_info`` attaches an exception's traceback to the record.
    """
    if not logger.isEnabledFor(level):
        return
    clean = {k: v for k, v in fields.items() if v is not None}
    if call is not None:
        clean = {"session_id": call.session_id, "call_id": call.call_id,
                 "tenant": call.tenant, **clean}
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


class ResourceShortage:
    """Episodes of one component running short of descriptors or kernel buffers.

    :meth:`failed` counts every failure (:attr:`failures` and
    ``voxgate_resource_shortages_total{component, error}``) and logs only the
    first one of an episode: ERROR ``resource_shortage`` naming the component,
    what failed and the errno. :meth:`recovered` (call it after each success;
    it costs nothing outside an episode) ends the episode with one INFO
    ``resource_recovered`` line giving its failures and length in seconds.
    A component that cannot see its own recovery passes ``quiet_s``: a
    failure that long after the previous one starts a new, logged episode.
    The caller backs off (:data:`SHORTAGE_BACKOFF_S`) or drops and counts.
    """

    def __init__(self, component: str, action: str, *, quiet_s: float | None = None) -> None:
        self.component = component
        self.action = action
        self.quiet_s = quiet_s
        self.failures = 0
        """Failures since start, all episodes."""
        self._started_at: float | None = None  # monotonic start of the episode in progress
        self._episode_failures = 0
        self._last_failure_at = 0.0

    @property
    def active(self) -> bool:
        """Whether an episode is in progress."""
        return self._started_at is not None

    def failed(self, exc: OSError) -> None:
        """Count one failure; log it when it starts an episode."""
        now = time.monotonic()
        name = errno.errorcode.get(exc.errno or 0, type(exc).__name__)
        self.failures += 1
        RESOURCE_SHORTAGES.labels(self.component, name).inc()
        quiet = self.quiet_s is not None and now - self._last_failure_at > self.quiet_s
        self._last_failure_at = now
        if self._started_at is not None and not quiet:
            self._episode_failures += 1
            return
        self._started_at, self._episode_failures = now, 1
        log_event(logging.ERROR, "resource_shortage",
                  f"{self.action} failed: {exc.strerror or exc}; backing off and going on "
                  "(logged once until it recovers)", component=self.component, error=name)

    def recovered(self) -> None:
        """End the episode in progress, if any, with one line."""
        started_at = self._started_at
        if started_at is None:
            return
        self._started_at = None
        log_event(logging.INFO, "resource_recovered", f"{self.action} works again",
                  component=self.component, failures=self._episode_failures,
                  lasted_s=round(time.monotonic() - started_at, 3))


class _AcceptShortageHandler(logging.Handler):
    """Turns trio's ``accept returned EMFILE …`` records into shortage episodes.

    Records without an OSError go on to voxgate's own handlers unchanged.
    """

    def __init__(self) -> None:
        super().__init__()
        self.shortage = ResourceShortage("listener", "accept on a WebSocket or metrics "
                                         "listener", quiet_s=ACCEPT_QUIET_S)

    def emit(self, record: logging.LogRecord) -> None:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, OSError):
            self.shortage.failed(exc)
        else:
            logger.handle(record)


def setup_logging(level: str, target: str = "auto") -> None:
    """Send voxgate's records at ``level`` (debug … error) to ``target``.

    ``journal`` (or ``auto`` when systemd connected stderr to the journal):
    structured records through ``systemd.journal`` (logfmt on stderr while
    journald cannot be reached, see :class:`~voxgate.journal.JournalHandler`);
    ``stderr``: logfmt lines. Called again (reload), a journal handler is
    kept with its state. trio's accept-failure reports (WebSocket and
    metrics listeners) become :class:`ResourceShortage` episodes.
    """
    from voxgate.journal import JournalHandler, under_journald

    handler: logging.Handler
    current = logger.handlers[0] if logger.handlers else None
    if target == "journal" or (target == "auto" and under_journald()):
        # A reload keeps the handler: an outage in progress stays one outage.
        handler = current if isinstance(current, JournalHandler) else JournalHandler()
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(LogfmtFormatter())
    handler.filters[:] = [RateLimit()]
    logger.handlers[:] = [handler]
    logger.setLevel(level.upper())
    logger.propagate = False
    accept_logger = logging.getLogger(TRIO_ACCEPT_LOGGER)
    accept_logger.handlers[:] = [_AcceptShortageHandler()]
    accept_logger.propagate = False
