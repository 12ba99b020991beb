"""An RTP leg's non-blocking UDP reads and writes (:func:`datagrams_for`).

The compiled build (setup.py) does them in ``_datagram.c``, a few lines of C
beside this module: the socket module's own ``recvfrom``/``sendto`` spend
more instructions around each 172-byte RTP datagram (formatting the source
address, building address tuples, a 2 KiB buffer shrunk per read, parsing
the destination, releasing the GIL) than the packet's parsing and jitter
buffering do (callgrind, ``bench/tick_cost.py``). The pure-Python build, and
anything that hands a leg its own socket-like object, uses
:class:`SocketDatagrams`, which behaves the same.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Final, Protocol

from voxgate.rtp.stream import Address


class Datagrams(Protocol):
    """One non-blocking UDP socket's reads and writes."""

    def recv(self) -> tuple[bytes, Address] | None:
        """One datagram (truncated to the maximum given at construction) and its
        source ``(host, port)``; None when none is waiting or the read failed
        (an ICMP error reported on the socket): try again at the next tick."""
        ...

    def send(self, datagram: bytes, addr: Address, /) -> None:
        """Send one datagram to ``addr``, an IP literal of the socket's family and
        a port. Raises OSError as :meth:`socket.socket.sendto` does."""
        ...


class SocketDatagrams:
    """:class:`Datagrams` by the socket module's ``recvfrom`` and ``sendto``."""

    __slots__ = ("_max_bytes", "_sock")

    def __init__(self, sock: socket.socket, max_datagram_bytes: int) -> None:
        self._sock = sock
        self._max_bytes = max_datagram_bytes

    def recv(self) -> tuple[bytes, Address] | None:
        try:
            data, source = self._sock.recvfrom(self._max_bytes)
        except OSError:  # BlockingIOError: none waiting; others (ICMP errors)
            return None
        return data, source[:2]

    def send(self, datagram: bytes, addr: Address, /) -> None:
        self._sock.sendto(datagram, addr)


def _compiled() -> Callable[[int, int, int], Datagrams] | None:
    try:
        from voxgate.transports._datagram import DatagramIo
    except ImportError:  # the pure-Python build
        return None
    return DatagramIo


_COMPILED: Final = _compiled()


def datagrams_for(sock: socket.socket, max_datagram_bytes: int) -> Datagrams:
    """The reads and writes of ``sock`` (non-blocking, ``AF_INET`` or
    ``AF_INET6``), in C when it was built; ``sock`` stays the caller's to close."""
    if _COMPILED is None:
        return SocketDatagrams(sock, max_datagram_bytes)
    return _COMPILED(sock.fileno(), sock.family, max_datagram_bytes)
