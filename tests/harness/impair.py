"""A userspace UDP impairment proxy for RTP on 127.0.0.1 (this kernel has no netem).

:class:`ImpairProxy` sits between a test phone's :class:`~tests.harness.phone.RtpPeer`
and the daemon's RTP port. It binds two sockets: the *outer* one (:attr:`ImpairProxy.port`)
is what the caller's SDP offers, so the daemon sends to it and, under strict
symmetric RTP, accepts media only from it; the *inner* one
(:attr:`ImpairProxy.inner_address`) is where the peer sends. Every datagram is
forwarded to the other side after :class:`Impairment` has had its way with it:

- loss: dropped with probability ``loss_pct`` %;
- jitter: delayed by a uniform random 0..``jitter_ms`` ms;
- reordering: with probability ``reorder_pct`` % held ``reorder_hold_ms`` more,
  so the packets behind it overtake it;
- duplication: with probability ``duplicate_pct`` % sent twice, each copy with
  its own jitter.

Bounded: at most ``max_held_packets`` datagrams wait at once (beyond that a
datagram is dropped and counted as ``overflow``) and no datagram waits longer
than ``jitter_ms + reorder_hold_ms`` (each at most :data:`MAX_DELAY_MS`).
Reproducible: each direction draws from its own ``random.Random`` seeded from
``seed``, so the same traffic gets the same fate (what arrives when still
depends on the machine's scheduling).

:func:`impaired_call` places a :class:`~tests.harness.phone.Phone` call through a proxy.
"""

from __future__ import annotations

import heapq
import itertools
import random
import re
import selectors
import socket
import threading
import time
from dataclasses import dataclass, field
from types import TracebackType

from tests.harness.phone import Call, Phone, RtpPeer

MAX_DELAY_MS = 1000.0
"""Largest ``jitter_ms`` or ``reorder_hold_ms`` an :class:`Impairment` accepts."""
MAX_HELD_PACKETS = 1000
"""Default bound of the datagrams waiting in one proxy (both directions): 10 s of one
call's RTP both ways."""
MAX_DATAGRAM_BYTES = 2048
POLL_S = 0.05
"""Longest sleep of the forwarding thread, so :meth:`ImpairProxy.close` is seen quickly."""
_JOIN_TIMEOUT_S = 5.0
_LOOPBACK = "127.0.0.1"
_CONTENT_LENGTH = re.compile(rb"Content-Length: \d+")

Address = tuple[str, int]


@dataclass(frozen=True, slots=True)
class Impairment:
    """What happens to the datagrams of one direction; the default forwards them as they are.

    Raises:
        ValueError: a percentage outside 0..100 or a delay outside 0..MAX_DELAY_MS.
    """

    loss_pct: float = 0.0
    jitter_ms: float = 0.0
    reorder_pct: float = 0.0
    reorder_hold_ms: float = 40.0
    duplicate_pct: float = 0.0

    def __post_init__(self) -> None:
        for name in ("loss_pct", "reorder_pct", "duplicate_pct"):
            if not 0.0 <= getattr(self, name) <= 100.0:
                raise ValueError(f"{name} must be within 0..100, got {getattr(self, name)}")
        for name in ("jitter_ms", "reorder_hold_ms"):
            if not 0.0 <= getattr(self, name) <= MAX_DELAY_MS:
                raise ValueError(
                    f"{name} must be within 0..{MAX_DELAY_MS}, got {getattr(self, name)}")


@dataclass(slots=True)
class ImpairStats:
    """Counters of one direction: every datagram received is forwarded, lost or an overflow."""

    received: int = 0
    forwarded: int = 0
    lost: int = 0
    duplicated: int = 0
    reordered: int = 0
    overflow: int = 0
    """Dropped because ``max_held_packets`` were already waiting."""
    unrouted: int = 0
    """Dropped because :meth:`ImpairProxy.connect` had not been called yet."""
    send_errors: int = 0


@dataclass(slots=True)
class ImpairSchedule:
    """The pure part: for one datagram received at ``now_s``, when its copies go out.

    ``plan(now_s)`` returns the send times (monotonic seconds): none when the
    datagram is lost, two when it is duplicated. It counts into :attr:`stats`
    (``received``, ``lost``, ``duplicated``, ``reordered``).
    """

    impairment: Impairment
    rng: random.Random
    stats: ImpairStats = field(default_factory=ImpairStats)

    def plan(self, now_s: float) -> list[float]:
        """Send times of the copies of one datagram received at ``now_s`` (seconds)."""
        imp = self.impairment
        self.stats.received += 1
        if self.rng.random() * 100.0 < imp.loss_pct:
            self.stats.lost += 1
            return []
        copies = 1
        if self.rng.random() * 100.0 < imp.duplicate_pct:
            self.stats.duplicated += 1
            copies = 2
        hold_s = 0.0
        if self.rng.random() * 100.0 < imp.reorder_pct:
            self.stats.reordered += 1
            hold_s = imp.reorder_hold_ms / 1000.0
        return [now_s + hold_s + self.rng.uniform(0.0, imp.jitter_ms) / 1000.0
                for _ in range(copies)]


def _bound_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((_LOOPBACK, 0))
    sock.setblocking(False)
    return sock


class ImpairProxy:
    """Forward UDP between the daemon (outer socket) and a peer (inner socket), impaired.

    ``to_daemon`` applies to the peer's datagrams, ``to_peer`` to the daemon's.
    Use as a context manager: the forwarding thread starts on entry and is
    stopped, and both sockets closed, on exit (datagrams still waiting are
    discarded). Counters are in :attr:`to_daemon_stats` and :attr:`to_peer_stats`;
    read them after the traffic stopped or accept a moment's staleness.
    """

    def __init__(self, to_daemon: Impairment, to_peer: Impairment | None = None, *,
                 seed: int = 0, max_held_packets: int = MAX_HELD_PACKETS) -> None:
        self._outer = _bound_socket()
        self._inner = _bound_socket()
        self._towards_daemon = ImpairSchedule(to_daemon, random.Random(seed))
        self._towards_peer = ImpairSchedule(to_peer or Impairment(), random.Random(seed + 1))
        self._max_held = max_held_packets
        self._held: list[tuple[float, int, socket.socket, Address, bytes, ImpairStats]] = []
        self._order = itertools.count()
        self._daemon: Address | None = None
        self._peer: Address | None = None
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._forward, daemon=True)

    @property
    def port(self) -> int:
        """The outer port: offer it in the caller's SDP."""
        port: int = self._outer.getsockname()[1]
        return port

    @property
    def inner_address(self) -> Address:
        """Where the peer sends its RTP."""
        host, port = self._inner.getsockname()
        return host, port

    @property
    def to_daemon_stats(self) -> ImpairStats:
        """Counters of the peer → daemon direction."""
        return self._towards_daemon.stats

    @property
    def to_peer_stats(self) -> ImpairStats:
        """Counters of the daemon → peer direction."""
        return self._towards_peer.stats

    def connect(self, daemon: Address, peer: Address) -> None:
        """Forward to ``daemon`` (its RTP address from the SDP answer) and to ``peer``."""
        with self._lock:
            self._daemon, self._peer = daemon, peer

    def __enter__(self) -> ImpairProxy:
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        """Stop forwarding, join the thread, close both sockets (idempotent)."""
        self._closed.set()
        if self._thread.is_alive():
            self._thread.join(timeout=_JOIN_TIMEOUT_S)
        self._outer.close()
        self._inner.close()

    def _forward(self) -> None:
        with selectors.DefaultSelector() as selector:
            selector.register(self._outer, selectors.EVENT_READ)
            selector.register(self._inner, selectors.EVENT_READ)
            while not self._closed.is_set():
                now = time.monotonic()
                wait_s = POLL_S if not self._held else min(POLL_S, self._held[0][0] - now)
                for key, _ in selector.select(max(0.0, wait_s)):
                    self._receive(key.fileobj)  # type: ignore[arg-type]
                self._send_due(time.monotonic())

    def _receive(self, sock: socket.socket) -> None:
        from_daemon = sock is self._outer
        schedule = self._towards_peer if from_daemon else self._towards_daemon
        out = self._inner if from_daemon else self._outer
        while True:
            try:
                data = sock.recv(MAX_DATAGRAM_BYTES)
            except OSError:  # BlockingIOError once drained
                return
            with self._lock:
                destination = self._peer if from_daemon else self._daemon
            if destination is None:
                schedule.stats.unrouted += 1
                continue
            for due in schedule.plan(time.monotonic()):
                if len(self._held) >= self._max_held:
                    schedule.stats.overflow += 1
                    continue
                heapq.heappush(self._held,
                               (due, next(self._order), out, destination, data, schedule.stats))

    def _send_due(self, now: float) -> None:
        while self._held and self._held[0][0] <= now:
            _, _, sock, destination, data, stats = heapq.heappop(self._held)
            try:
                sock.sendto(data, destination)
            except OSError:
                stats.send_errors += 1
            else:
                stats.forwarded += 1


def impaired_call(phone: Phone, peer: RtpPeer, proxy: ImpairProxy, user: str = "echo") -> Call:
    """Place a call whose media runs through ``proxy``; returns it once answered (or refused).

    The INVITE offers the proxy's outer port instead of ``peer``'s (RFC 4566
    ``m=`` line, Content-Length fixed). On a 2xx the proxy is connected to the
    daemon's RTP address from the answer and to ``peer``, and ``peer`` is aimed
    at the proxy. ``peer`` sends nothing until :meth:`RtpPeer.resume`.

    Raises:
        AssertionError: no final response within the phone's answer timeout.
    """
    call, invite = phone.prepare(user, media=peer)
    head, body = invite.split(b"\r\n\r\n", 1)
    body = body.replace(b"m=audio %d " % peer.port, b"m=audio %d " % proxy.port)
    head = _CONTENT_LENGTH.sub(b"Content-Length: %d" % len(body), head)
    phone.send(head + b"\r\n\r\n" + body)
    phone.wait_final([call])
    daemon = peer.remote
    if call.final_status == 200 and daemon is not None:
        proxy.connect(daemon, (_LOOPBACK, peer.port))
        peer.remote = proxy.inner_address
    return call
