"""RTP ports from ``[rtp] port_min..port_max``, handed out at random.

Randomised allocation (RFC 3550 §8.2 and the RTP security practice of
unpredictable ports) means a stranger cannot guess the port of the next call
from the last one, and a caller of a previous daemon process that is still
sending to a port is unlikely to land on a new call.
"""

from __future__ import annotations

import errno
import logging
import random
import socket

from voxgate.errors import is_resource_shortage
from voxgate.logging import ResourceShortage, log_event


class PortPool:
    """RTP ports from ``[rtp] port_min..port_max``: even ports (RFC 3550 §11).

    :meth:`open_socket` binds a non-blocking UDP socket on a free port chosen
    at random or returns None when every port is taken, or when the process
    is out of descriptors or kernel buffers (EMFILE, ENFILE, ENOBUFS, ENOMEM:
    one log line per episode, every failure counted by :attr:`shortage`); the
    caller answers 503. Ports another process holds are skipped and tried
    again later.
    """

    def __init__(self, address: str, port_min: int, port_max: int) -> None:
        self.address = address
        self.family = socket.AF_INET6 if ":" in address else socket.AF_INET
        first = port_min + (port_min % 2)
        self._free: list[int] = list(range(first, port_max + 1, 2))
        self._random = random.SystemRandom()
        self.capacity = len(self._free)
        self.exhausted = 0
        self.shortage = ResourceShortage("rtp", "opening an RTP socket")

    @property
    def available(self) -> int:
        return len(self._free)

    def open_socket(self) -> socket.socket | None:
        """A bound, non-blocking UDP socket, or None when the pool is exhausted or
        the process is short of descriptors or buffers.

        Raises OSError for any other failure of socket(2) or bind(2) (EACCES,
        EADDRNOTAVAIL …).
        """
        free = self._free
        untried = len(free)
        while untried:
            # Pick among the ports not tried yet, move it out of that range.
            i = self._random.randrange(untried)
            untried -= 1
            free[i], free[untried] = free[untried], free[i]
            port = free[untried]
            try:
                sock = socket.socket(self.family, socket.SOCK_DGRAM)
                try:
                    sock.setblocking(False)
                    sock.bind((self.address, port))
                except OSError:
                    sock.close()
                    raise
            except OSError as e:
                if e.errno == errno.EADDRINUSE:
                    continue  # held by another process: stays free, tried again next time
                if not is_resource_shortage(e):
                    raise
                self.shortage.failed(e)
                return None
            self.shortage.recovered()
            free[untried] = free[-1]
            free.pop()
            return sock
        self.exhausted += 1
        log_event(logging.WARNING, "rtp_ports_exhausted", "no free RTP port",
                  capacity=self.capacity)
        return None

    def release(self, sock: socket.socket) -> None:
        """Close ``sock`` and return its port to the pool (call once per socket)."""
        port = sock.getsockname()[1]
        sock.close()
        self._free.append(port)
