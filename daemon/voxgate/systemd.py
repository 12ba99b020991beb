"""sd_notify(3) through systemd-python's ``systemd.daemon.notify``.

Without ``$NOTIFY_SOCKET`` (run by hand) every call is silent. A socket that
cannot be reached is reported once as a warning and never raises.
"""

from __future__ import annotations

import logging
import os

import systemd.daemon

from voxgate.logging import log_event


class Notifier:
    """Sends ``KEY=value`` lines to the service manager."""

    def __init__(self) -> None:
        self.enabled = bool(os.environ.get("NOTIFY_SOCKET"))
        self._warned = False

    def notify(self, *lines: str) -> None:
        """Send ``lines`` (e.g. ``"READY=1"``, ``"STATUS=…"``) as one datagram."""
        if not self.enabled:
            return
        try:
            sent = systemd.daemon.notify("\n".join(lines))
        except OSError:
            sent = False
        if not sent and not self._warned:
            self._warned = True
            log_event(logging.WARNING, "notify_failed", "cannot reach $NOTIFY_SOCKET",
                      notify_socket=os.environ.get("NOTIFY_SOCKET"))
