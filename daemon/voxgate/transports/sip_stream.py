"""Trio driver for SIP over TCP and TLS (RFC 3261 §18, RFC 5630): listeners and connections.

A :class:`StreamListener` serves ``[sip] listen_tcp`` or ``listen_tls`` for
one :class:`~voxgate.sip.uas.UasCore` (transport ``"TCP"`` or ``"TLS"``). Each
accepted connection is keyed by the peer's address: its bytes go through a
:class:`~voxgate.sip.framing.StreamFramer` and every whole message into the
core as if it were a datagram from that address; what the core sends to an
address goes out on that connection (responses on the connection the request
came on, §18.2.2; our in-dialog requests on the one the call came on). When
that connection is gone the core sends to the call's remote target instead,
and for a message to an address without a connection we open one (within
``stream_message_timeout_s``, the limits below; over TLS the server's
certificate must verify against the system CAs or ``tls_client_ca``); one
that cannot be opened drops what waited for it, counted in
``voxgate_sip_stream_messages_dropped_total{reason="connect-failed"}``, and
its transaction times out. The core learns which connections are open.

Bounds, each refusal or closure counted in
``voxgate_sip_stream_closed_total{transport,reason}``:
``stream_max_connections`` in total and ``stream_max_connections_per_source``
per source IP (beyond: closed at once, ``limit-total``/``limit-source``); the
TLS handshake and every started message must complete within
``stream_message_timeout_s`` (slow-loris: ``message-timeout``,
``tls-handshake``); a connection idle for ``stream_idle_timeout_s`` is closed
(``idle-timeout``) unless a call came on it (its in-dialog requests need
it); a framing error (:mod:`voxgate.sip.framing`) gets a 400/413 when its
header section allows one, then the connection is closed (``framing``); a
peer that does not read what we send (more than
:data:`MAX_QUEUED_BYTES_FACTOR` messages' worth queued) is closed
(``send-queue-full``). Cancellation closes every connection without a TLS
close_notify.
"""

from __future__ import annotations

import logging
import ssl
from collections import Counter as Tally
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import trio
from prometheus_client import Counter, Gauge

from voxgate.config import Config
from voxgate.errors import ConfigError
from voxgate.logging import log_event
from voxgate.metrics import REGISTRY
from voxgate.sip.framing import FramingError, StreamFramer
from voxgate.sip.parser import MAX_MESSAGE_BYTES
from voxgate.sip.uas import Address, UasCore

RECEIVE_BYTES = 16_384
"""Most bytes read from a connection at once."""
MAX_QUEUED_BYTES_FACTOR = 4
"""A connection may have this many largest messages' worth of bytes waiting to be sent."""
MAX_WAITING_MESSAGES = 16
"""Messages that may wait for a connection being opened; more are dropped."""

STREAM_CONNECTIONS = Gauge(
    "voxgate_sip_stream_connections", "Open SIP connections, by transport",
    ["transport"], registry=REGISTRY,
)
STREAM_CLOSED = Counter(
    "voxgate_sip_stream_closed",
    "SIP connections closed or refused, by transport and reason",
    ["transport", "reason"], registry=REGISTRY,
)
STREAM_DROPPED = Counter(
    "voxgate_sip_stream_messages_dropped",
    "SIP messages not sent on a stream transport, by transport and reason",
    ["transport", "reason"], registry=REGISTRY,
)


@dataclass(frozen=True)
class StreamLimits:
    """The ``[sip] stream_*`` bounds (see the module docstring)."""

    max_connections: int
    max_connections_per_source: int
    idle_timeout_s: float
    message_timeout_s: float
    max_message_bytes: int = MAX_MESSAGE_BYTES

    @classmethod
    def from_config(cls, config: Config) -> StreamLimits:
        sip = config.sip
        return cls(sip.stream_max_connections, sip.stream_max_connections_per_source,
                   sip.stream_idle_timeout_s, sip.stream_message_timeout_s)


def tls_client_context(config: Config) -> ssl.SSLContext | None:
    """The TLS client context for connections we open on ``[sip] listen_tls``'s
    behalf (TLS 1.2 or later; the server's certificate must verify against the
    system CAs, or ``tls_client_ca`` when set, and name its IP address), or
    ``None`` when TLS is off. Presents our certificate (``tls_certificate``).
    Raises ConfigError like :func:`tls_server_context`."""
    sip = config.sip
    if not sip.listen_tls:
        return None
    try:
        context = ssl.create_default_context(cafile=sip.tls_client_ca or None)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(sip.tls_certificate, sip.tls_private_key)
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(f"{config.source}: [sip] tls_client_ca/tls_certificate: cannot "
                          f"load them for outgoing connections: {e}") from e
    return context


def tls_server_context(config: Config) -> ssl.SSLContext | None:
    """The TLS server context of ``[sip] listen_tls`` (TLS 1.2 or later), or ``None``
    when TLS is off. ``tls_client_ca`` set: clients must present a certificate it
    signed. Raises ConfigError naming the key and file when a PEM file cannot be
    loaded."""
    sip = config.sip
    if not sip.listen_tls:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(sip.tls_certificate, sip.tls_private_key)
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(f"{config.source}: [sip] tls_certificate/tls_private_key: "
                          f"cannot load {sip.tls_certificate} / {sip.tls_private_key}: "
                          f"{e}") from e
    if sip.tls_client_ca:
        try:
            context.load_verify_locations(cafile=sip.tls_client_ca)
        except (OSError, ssl.SSLError) as e:
            raise ConfigError(f"{config.source}: [sip] tls_client_ca: cannot load "
                              f"{sip.tls_client_ca}: {e}") from e
        context.verify_mode = ssl.CERT_REQUIRED
    return context


@dataclass(eq=False)
class _Connection:
    """One open connection: what waits to be sent, and why it is closing."""

    peer: Address
    stream: trio.abc.Stream
    scope: trio.CancelScope
    queue: deque[bytes] = field(default_factory=deque)
    queued_bytes: int = 0
    queued: trio.Event = field(default_factory=trio.Event)
    flushed: trio.Event = field(default_factory=trio.Event)
    close_reason: str | None = None


class StreamListener:
    """``[sip] listen_tcp`` or ``listen_tls`` with its UAS ``core`` (transport
    ``"TCP"`` or ``"TLS"``); ``on_input`` runs after each message fed to the core
    (the endpoint's pump, which calls :meth:`flush`)."""

    def __init__(self, core: UasCore, listen: tuple[str, int], limits: StreamLimits,
                 on_input: Callable[[], None], tls_context: ssl.SSLContext | None = None,
                 tls_client_context: ssl.SSLContext | None = None) -> None:
        self.core = core
        self.transport = core.transport
        self.listen = listen
        self.limits = limits
        self._on_input = on_input
        self._tls = tls_context
        self._tls_client = tls_client_context
        self._connections: dict[Address, _Connection] = {}
        self._connecting: dict[Address, list[bytes]] = {}  # outbound, not open yet
        self._nursery: trio.Nursery | None = None
        self._per_source: Tally[str] = Tally()
        self._gauge = STREAM_CONNECTIONS.labels(self.transport)
        self._gauge.set(0)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen, report started, serve until cancelled. Raises OSError when the
        address cannot be bound."""
        host, port = self.listen
        try:
            listeners = await trio.open_tcp_listeners(port, host=host)
        except OSError as e:
            key = f"listen_{self.transport.lower()}"
            raise OSError(e.errno, f"{key} {host}:{port}: {e.strerror}") from e
        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners, self._serve, listeners)
            self._nursery = nursery
            task_status.started()

    def flush(self) -> None:
        """Queue every message the core produced on its connection (none: one is
        opened); a connection whose queue would overflow is closed."""
        for data, addr in self.core.datagrams_to_send():
            conn = self._connections.get(addr)
            if conn is not None:
                self._queue(conn, data)
            elif addr in self._connecting:
                waiting = self._connecting[addr]
                if len(waiting) >= MAX_WAITING_MESSAGES:
                    STREAM_DROPPED.labels(self.transport, "send-queue-full").inc()
                else:
                    waiting.append(data)
            elif self._nursery is None or self._refusal(addr) is not None:
                STREAM_DROPPED.labels(self.transport, "no-connection").inc()
            else:
                self._connecting[addr] = [data]
                self._nursery.start_soon(self._connect, addr)

    def set_limits(self, limits: StreamLimits) -> None:
        """New bounds (reload) for new connections and the next deadlines."""
        self.limits = limits

    # -- per connection ------------------------------------------------------

    def _queue(self, conn: _Connection, data: bytes) -> None:
        limit = MAX_QUEUED_BYTES_FACTOR * self.limits.max_message_bytes
        if conn.queued_bytes + len(data) > limit:
            STREAM_DROPPED.labels(self.transport, "send-queue-full").inc()
            self._close(conn, "send-queue-full")
            return
        conn.queue.append(data)
        conn.queued_bytes += len(data)
        conn.queued.set()

    def _close(self, conn: _Connection, reason: str) -> None:
        if conn.close_reason is None:
            conn.close_reason = reason
        conn.scope.cancel()

    def _refusal(self, peer: Address) -> str | None:
        if len(self._connections) + len(self._connecting) >= self.limits.max_connections:
            return "limit-total"
        if self._per_source[peer[0]] >= self.limits.max_connections_per_source:
            return "limit-source"
        return None

    async def _serve(self, stream: trio.SocketStream) -> None:
        """One accepted connection, from the limit check to the close."""
        try:
            name = stream.socket.getpeername()
        except OSError:
            await trio.aclose_forcefully(stream)
            return
        peer: Address = (name[0], name[1])
        reason = self._refusal(peer)
        if reason is not None:
            STREAM_CLOSED.labels(self.transport, reason).inc()
            await trio.aclose_forcefully(stream)
            return
        await self._run(_Connection(peer, stream, trio.CancelScope()), self._tls is not None)

    async def _connect(self, peer: Address) -> None:
        """Open a connection to ``peer`` for the messages waiting for it (TLS: the
        client side of the handshake), then serve it like an accepted one."""
        stream: trio.SocketStream | None = None
        with trio.move_on_after(self.limits.message_timeout_s):
            try:
                stream = await trio.open_tcp_stream(*peer)
            except OSError as e:
                log_event(logging.INFO, "sip_stream_connect_failed", str(e),
                          peer=f"{peer[0]}:{peer[1]}", transport=self.transport)
        waiting = self._connecting.pop(peer)
        if stream is None or peer in self._connections or self._refusal(peer) is not None:
            STREAM_DROPPED.labels(self.transport, "connect-failed").inc(len(waiting))
            if stream is not None:
                await trio.aclose_forcefully(stream)
            return
        conn = _Connection(peer, stream, trio.CancelScope())
        if self._tls_client is not None:
            conn.stream = trio.SSLStream(stream, self._tls_client, server_hostname=peer[0])
        for data in waiting:
            self._queue(conn, data)
        await self._run(conn, self._tls_client is not None)

    async def _run(self, conn: _Connection, handshake: bool) -> None:
        """A connection from its registration to its close (within ``conn.scope``):
        the TLS handshake if ``handshake``, then reading and writing."""
        peer = conn.peer
        self._connections[peer] = conn
        self._per_source[peer[0]] += 1
        self._gauge.set(len(self._connections))
        self.core.connection_opened(peer)
        try:
            with conn.scope:
                if handshake and not await self._handshake(conn):
                    return
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._write_loop, conn)
                    await self._read_loop(conn)
                    conn.queued.set()  # the writer sends what is queued, then ends
                    with trio.move_on_after(self.limits.message_timeout_s):
                        await conn.flushed.wait()
                    nursery.cancel_scope.cancel()
        finally:
            self.core.connection_closed(peer)
            del self._connections[peer]
            self._per_source[peer[0]] -= 1
            if not self._per_source[peer[0]]:
                del self._per_source[peer[0]]
            self._gauge.set(len(self._connections))
            STREAM_CLOSED.labels(self.transport, conn.close_reason or "closed").inc()
            await trio.aclose_forcefully(conn.stream)

    async def _handshake(self, conn: _Connection) -> bool:
        """The TLS handshake within ``message_timeout_s`` (``conn.stream`` becomes the
        TLS stream, server side for accepted connections); False after a failure or
        timeout (``close_reason`` ``tls-handshake``)."""
        tls = conn.stream
        if not isinstance(tls, trio.SSLStream):
            assert self._tls is not None
            tls = conn.stream = trio.SSLStream(conn.stream, self._tls, server_side=True)
        with trio.move_on_after(self.limits.message_timeout_s):
            try:
                await tls.do_handshake()
                return True
            except trio.BrokenResourceError as e:
                log_event(logging.INFO, "sip_tls_handshake_failed", repr(e.__cause__ or e),
                          peer=f"{conn.peer[0]}:{conn.peer[1]}")
        conn.close_reason = "tls-handshake"
        return False

    async def _read_loop(self, conn: _Connection) -> None:
        """Frame and feed messages until the peer closes, a deadline passes or the
        framing fails; sets ``close_reason``."""
        framer = StreamFramer(self.limits.max_message_bytes)
        idle_since = started = trio.current_time()
        while True:
            if framer.partial:
                deadline, why = started + self.limits.message_timeout_s, "message-timeout"
            else:
                deadline, why = idle_since + self.limits.idle_timeout_s, "idle-timeout"
            data = None
            with trio.move_on_at(deadline):
                try:
                    data = await conn.stream.receive_some(RECEIVE_BYTES)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    data = b""
            if data is None:
                if why == "idle-timeout" and self.core.has_calls_from(conn.peer):
                    idle_since = trio.current_time()  # the calls' BYE comes this way
                    continue
                conn.close_reason = why
                return
            if not data:
                conn.close_reason = "peer-closed"
                return
            now = trio.current_time()
            if not framer.partial:
                started = now
            idle_since = now
            framer.receive_data(data)
            if not self._feed(conn, framer, now):
                return

    def _feed(self, conn: _Connection, framer: StreamFramer, now: float) -> bool:
        """Every whole message of ``framer`` into the core; False after a framing
        error (answered when possible, ``close_reason`` set)."""
        try:
            while (message := framer.next_message()) is not None:
                self.core.receive_datagram(message, conn.peer, now)
        except FramingError as exc:
            conn.close_reason = "framing"
            log_event(logging.INFO, "sip_stream_framing", exc.reason,
                      peer=f"{conn.peer[0]}:{conn.peer[1]}", transport=self.transport)
            if exc.head:
                self.core.reject_message(exc.head, conn.peer, now, exc.reason,
                                         exc.status_hint or 400)
        except Exception as exc:  # a bug in the core ends this connection only
            conn.close_reason = "error"
            log_event(logging.ERROR, "sip_core_error", f"UAS core failed: {exc!r}",
                      source=f"{conn.peer[0]}:{conn.peer[1]}", exc_info=exc)
        finally:
            if framer.pongs_due:
                self._queue(conn, b"\r\n" * framer.pongs_due)  # RFC 5626 §4.4.1 pongs
                framer.pongs_due = 0
            self._on_input()
        return conn.close_reason is None

    async def _write_loop(self, conn: _Connection) -> None:
        """Send queued messages in order; after the reader ended, send the rest and
        set ``flushed``. A failed send closes the connection."""
        while True:
            while conn.queue:
                data = conn.queue.popleft()
                conn.queued_bytes -= len(data)
                try:
                    await conn.stream.send_all(data)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    self._close(conn, "send-failed")
                    return
            if conn.close_reason is not None:
                conn.flushed.set()
                return
            conn.queued = trio.Event()
            await conn.queued.wait()
