"""sd_notify(3): ``KEY=value`` datagrams to the service manager.

One ``AF_UNIX``/``SOCK_DGRAM`` socket is opened at start-up and kept, rather
than one per message (as ``systemd.daemon.notify`` does): when the process
runs out of file descriptors, ``WATCHDOG=1`` must still get through, or
systemd would kill a daemon that is only short of descriptors. The protocol
is the one sd_notify(3) documents: the datagram's text is the lines joined
by newlines, sent to ``$NOTIFY_SOCKET`` (a leading ``@`` names an abstract
socket).

Without ``$NOTIFY_SOCKET`` (run by hand) every call is silent. A socket that
cannot be reached is reported once as a warning and never raises.
"""

from __future__ import annotations

import logging
import os
import socket

from voxgate.logging import log_event


class Notifier:
    """Sends ``KEY=value`` lines to the service manager."""

    def __init__(self) -> None:
        address = os.environ.get("NOTIFY_SOCKET", "")
        self.enabled = bool(address)
        self._shown = address
        self._address = "\0" + address[1:] if address.startswith("@") else address
        self._sock: socket.socket | None = None
        if self.enabled:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.setblocking(False)
        self._warned = False

    def notify(self, *lines: str) -> None:
        """Send ``lines`` (e.g. ``"READY=1"``, ``"STATUS=…"``) as one datagram."""
        if self._sock is None:
            return
        try:
            self._sock.sendto("\n".join(lines).encode(), self._address)
        except OSError as e:
            if not self._warned:
                self._warned = True
                log_event(logging.WARNING, "notify_failed",
                          f"cannot reach $NOTIFY_SOCKET: {e}", notify_socket=self._shown)
