"""Trio driver for WebSocket media streams (the Twilio Media Streams message set).

A media server connects to ``ws://[websocket] listen[websocket] path``
(``/media``; ``/media/<tenant>`` names the tenant, as does
``start.customParameters.tenant``; any other path gets HTTP 404). The
messages and close codes are :mod:`voxgate.transports.media_stream`'s
(sans-IO), the WebSocket framing :mod:`voxgate.transports.ws_server`'s; this
module owns the sockets and the sessions:

- Every TCP connection counts against ``max_connections`` from its accept
  until its socket is closed. One over the limit is answered 503 with
  ``Retry-After`` and closed without being read; the others have
  ``handshake_timeout_s`` to complete the opening handshake (a wrong path is
  answered 404 and closed at once). Each refusal is counted in ``stats``
  (``rejected_busy``, ``rejected_path``, ``rejected_handshake_timeout``,
  ``rejected_bad_request``, ``handshake_abandoned``).
- One handler task per connection reads messages into the connection's
  :class:`~voxgate.transports.media_stream.MediaStream` until its stream is
  attached to a session. From then on the handler sleeps and the media
  clock's tick reads the socket (:meth:`_Connection.pump`, one non-blocking
  read per tick, no task wake-up per message): ``media`` goes straight to the
  leg; any other message, a control frame, an error or TCP ending wakes the
  handler, which handles it as before and sleeps again.
- The session's messages wait on the connection's bounded outbound queue (a
  full queue drops and counts) and are written without a task switch in
  bursts: once :data:`WRITE_BATCH_CONNECTIONS` connections have some, and the
  rest when the tick is over (one task wake-up per tick). A burst keeps a
  peer's reader that the first write woke busy through the others instead of
  waking it once a write (on loopback the writer pays for that wake-up), and a
  connection's messages of one tick go out in one write. Only when the socket
  does not take them does the connection's writer task send them.
- A frame that breaks RFC 6455 (or a message over ``max_message_bytes``) is
  answered with the close frame of its code (1002, 1007, 1009), then TCP
  closes; it is counted as ``bad_message_<code>`` and its session, if any,
  lost its stream (as below).
- ``start`` hands the stream to the call lifecycle (:mod:`voxgate.calls`),
  as SIP does: a refusal closes with 1013 (try again later) and the reason, a
  session that cannot be built with 1011; a queued stream waits, its media
  dropped and counted, until admitted or refused; a stream that closes while
  queued gives its place up.
- The media path is :class:`WebSocketLeg`, ticked every 20 ms by the shared
  :class:`~voxgate.pipeline.clock.MediaClock` like the RTP leg: inbound
  frames wait in a queue held against the session budget's ``jitter`` buffer
  (oldest dropped and counted); each tick the session's pipeline takes the
  frames due and the leg queues one ``media`` message (silence when the agent
  is quiet).
- Playback completion is the echoed ``mark``: after an utterance's last
  chunk the leg sends a mark named after the utterance id; the echo resolves
  it (``mark``), the session's playback deadman covers a far end that never
  echoes. Barge-in sends ``clear`` and discards the audio still queued.
- Recovery: right after ``start`` voxgate sends the mark
  ``voxgate-recovery:<token>`` (see the sans-IO module). A stream that closes
  without ``stop`` leaves its session running without media: the deadman
  timers pause it (``[timers] media_inactivity_s``) and end it after
  ``recovery_window_s``; a connection whose ``start`` carries
  ``customParameters.recoveryToken`` is attached to that session instead.
  ``stop`` ends the session with reason ``bye``.
"""

from __future__ import annotations

import logging
import math
import re
import uuid
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import trio

from voxgate import admission as adm
from voxgate.budget import BoundedAudioQueue, SessionBudget
from voxgate.calls import CallRequest, Calls, Leg
from voxgate.codec.g711 import PCMU
from voxgate.config import Config, split_host_port
from voxgate.end_reasons import EndReason
from voxgate.logging import log_event
from voxgate.pipeline.playback import MARK, MAX_PENDING, PlaybackTracker
from voxgate.rtp.dtmf import DtmfEvent
from voxgate.session import Session, SessionCore
from voxgate.transports import media_stream as ms
from voxgate.transports.ws_server import (
    ConnectionClosed,
    HandshakeError,
    Request,
    ServerWebSocket,
    refuse_unread,
    text_frame,
)

HEARTBEAT_S = 1.0
"""The listener task checks in with the watchdog this often."""
OUTBOUND_QUEUE_MESSAGES = 32
"""Messages queued for one connection's writer: 640 ms of media, then drops."""
WRITE_BATCH_CONNECTIONS = 32
"""Connections whose queued messages are written in one burst (see the module docstring)."""
HANDSHAKE_TIMEOUT_S = 10.0
"""How long an accepted TCP connection has to complete the opening handshake."""
CLOSE_TIMEOUT_S = 2.0
"""How long a close (or a refusal) waits for the peer before closing TCP."""
_TENANT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_SILENCE = PCMU.silence(ms.FRAME_BYTES)
# Session end reason → close code (default 1000 with the reason).
_END_CLOSE = {"shutdown": ms.CLOSE_GOING_AWAY, "drain-timeout": ms.CLOSE_GOING_AWAY,
              "error": ms.CLOSE_INTERNAL_ERROR}


class _QueuedWriter(Protocol):
    """What :class:`_WriteBatch` writes: a connection (:class:`_Connection`) with
    messages queued."""

    def write_queued(self) -> None: ...


class _WriteBatch:
    """The connections with messages queued, written in bursts (see the module
    docstring): at most :data:`WRITE_BATCH_CONNECTIONS` at once, the rest by
    :meth:`run` once the running task (the media clock's tick) lets it run."""

    def __init__(self) -> None:
        self._conns: list[_QueuedWriter] = []
        self._wake = trio.Event()

    def add(self, conn: _QueuedWriter) -> None:
        """``conn`` has messages queued: write them with the next burst."""
        conns = self._conns
        conns.append(conn)
        if len(conns) >= WRITE_BATCH_CONNECTIONS:
            self.flush()
        elif len(conns) == 1:
            self._wake.set()

    def flush(self) -> None:
        """Write every added connection's queue now (see :meth:`_Connection.write_queued`)."""
        conns, self._conns = self._conns, []
        for conn in conns:
            conn.write_queued()

    async def run(self) -> None:
        """Flush whenever connections wait, until cancelled."""
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            self.flush()


class _Connection:
    """One accepted WebSocket: its stream state, its outbound queue and its close."""

    def __init__(self, ws: ServerWebSocket, stream: ms.MediaStream, path_tenant: str | None,
                 headers: dict[str, str], stats: Counter[str], batch: _WriteBatch) -> None:
        self.ws = ws
        self.stream = stream
        self.stats = stats
        """The endpoint's connection-level counters."""
        self.remote = ws.remote
        self.source_ip = ws.source_ip
        self.path_tenant = path_tenant
        self.headers = headers
        self.ticket: str | None = None
        """The session id it carries (admitted, queued or resumed)."""
        self.scope = trio.CancelScope()
        self.closing = False
        self.close_code = ms.CLOSE_GOING_AWAY
        self.close_reason = "shutting down"
        self.dropped = 0
        self.leg: WebSocketLeg | None = None
        """The leg whose stream this is; while set, the media clock reads the socket."""
        self._queue: deque[tuple[bool, bytes]] = deque()
        """Frames waiting (media or not), at most OUTBOUND_QUEUE_MESSAGES."""
        self._batch = batch
        self._batched = False  # added to the batch, not written yet
        self._writer_wake = trio.Event()
        self._parked = False
        self._handler_wake = trio.Event()
        self._handed_over: ms.Event | ms.MediaStreamError | None = None

    def send_nowait(self, message: str | bytes, *, media: bool) -> bool:
        """Queue ``message`` (JSON text, ``bytes`` as UTF-8) for the next burst; False
        (counted) when the queue is full. On a closed connection it is dropped
        silently: the stream is ending."""
        queue = self._queue
        if len(queue) >= OUTBOUND_QUEUE_MESSAGES:
            self.dropped += 1
            return False
        queue.append((media, text_frame(message if isinstance(message, bytes)
                                        else message.encode())))
        if not self._batched:
            self._batched = True
            self._batch.add(self)
        return True

    def write_queued(self) -> None:
        """Write the queued frames in one write, without waiting; what the socket does
        not take, or everything while a send is in progress, is the writer's."""
        self._batched = False
        queue = self._queue
        if not queue:  # barge-in discarded it
            return
        data = queue[0][1] if len(queue) == 1 else b"".join(frame for _, frame in queue)
        try:
            if self.ws.send_nowait(data):
                queue.clear()
                if not self.ws.backlogged:
                    return
        except ConnectionClosed:  # the stream is ending
            queue.clear()
            return
        self._writer_wake.set()

    def discard_media(self) -> None:
        """Barge-in: drop the queued ``media`` messages, keep the marks in order."""
        keep = [item for item in self._queue if not item[0]]
        self._queue.clear()
        self._queue.extend(keep)

    def pump(self, now: float) -> None:
        """The media clock's read, while the handler sleeps: the messages the socket
        holds now; ``media`` goes to the leg, anything else (and errors, control
        frames, TCP ending) is handed to the handler, which it wakes."""
        if not self._parked:
            return
        ws, stream, leg = self.ws, self.stream, self.leg
        ws.receive_nowait()
        while (data := ws.message_nowait()) is not None:
            try:
                if leg is not None and (
                        payload := stream.inbound_media_untrusted(data, now)) is not None:
                    leg.receive_media_untrusted(payload, now)
                    continue
                event = stream.receive_message_untrusted(data, now)
            except ms.MediaStreamError as e:
                self._hand_over(e)
                return
            if type(event) is not ms.Media or leg is None:
                self._hand_over(event)
                return
            _media_in(self.stats, leg, event, now)
        if ws.needs_attention:
            self._hand_over(None)

    def _hand_over(self, item: ms.Event | ms.MediaStreamError | None) -> None:
        self._handed_over = item
        self.wake()

    def wake(self) -> None:
        """Wake the sleeping handler: the tick stops reading until it sleeps again."""
        self._parked = False
        self._handler_wake.set()

    async def park(self) -> ms.Event | ms.MediaStreamError | None:
        """Sleep while the media clock reads; what it handed over when woken."""
        self._handler_wake = trio.Event()
        self._parked = True
        try:
            await self._handler_wake.wait()
        finally:
            self._parked = False
        item, self._handed_over = self._handed_over, None
        return item

    def close(self, code: int, reason: str) -> None:
        """Close with ``code`` and ``reason`` (the first close asked for wins)."""
        if not self.closing:
            self.closing = True
            self.close_code, self.close_reason = code, reason
        self.scope.cancel()

    async def write_loop(self) -> None:
        """Write what :meth:`write_queued` could not, whenever it asks."""
        ws, queue = self.ws, self._queue
        try:
            while True:
                await self._writer_wake.wait()
                self._writer_wake = trio.Event()
                await ws.flush()
                while queue:
                    await ws.send_frame(queue.popleft()[1])
        except ConnectionClosed:
            return


class WebSocketLeg:
    """One session's media over its current stream; a :class:`~voxgate.pipeline.pipeline.MediaLeg`.

    Between streams (a drop, before a resumption) nothing is sent and the
    utterances finished meanwhile are left to the playback deadman.
    """

    __slots__ = ("_arrived", "_closed", "_conn", "_inbound", "_marks", "_playback", "clears_sent",
                 "drops_send_queue", "frames_in", "frames_out", "marks_echoed", "marks_sent",
                 "marks_unknown", "on_dtmf")

    def __init__(self, playback: PlaybackTracker, on_dtmf: Callable[[DtmfEvent], None],
                 budget: SessionBudget) -> None:
        self._playback = playback
        self.on_dtmf = on_dtmf
        self._inbound = BoundedAudioQueue(budget, "jitter")
        self._conn: _Connection | None = None
        self._marks: dict[str, int] = {}  # mark name → utterance id, oldest first
        self._arrived = False
        self._closed = False
        self.frames_in = 0
        self.frames_out = 0
        self.marks_sent = 0
        self.marks_echoed = 0
        self.marks_unknown = 0
        self.clears_sent = 0
        self.drops_send_queue = 0

    @property
    def packets_in(self) -> int:
        return self.frames_in

    @property
    def packets_out(self) -> int:
        return self.frames_out

    def attach(self, conn: _Connection | None) -> None:
        """Read and send on ``conn`` from the next tick on (None: the stream dropped)."""
        old = self._conn
        self._conn = None if self._closed else conn
        if old is not None and old is not self._conn:
            old.leg = None
            old.wake()
        if self._conn is not None:
            self._conn.leg = self

    def receive_media_untrusted(self, payload: bytes, now: float) -> None:
        """Queue a checked ``media`` payload (whole 160-byte frames of µ-law)."""
        if self._closed:
            return
        step = ms.FRAME_BYTES
        if len(payload) == step:  # the usual message: one frame
            self._inbound.push(payload)
        else:
            for start in range(0, len(payload), step):
                self._inbound.push(payload[start:start + step])
        self.frames_in += len(payload) // step
        self._arrived = True

    def receive_mark(self, name: str, now: float) -> None:
        """The far end echoed mark ``name``: the utterance it closes has played."""
        utterance_id = self._marks.pop(name, None)
        if utterance_id is None:
            self.marks_unknown += 1  # our recovery marks, or marks from before a resumption
            return
        self.marks_echoed += 1
        self._playback.complete(utterance_id, MARK, now)

    def receive(self, now: float, frames_elapsed: int) -> tuple[bool, list[bytes]]:
        """Read the stream, then the frames due now, decoded; True when caller media
        arrived since the last tick."""
        conn = self._conn
        if conn is not None:
            conn.pump(now)
        arrived, self._arrived = self._arrived, False
        inbound = self._inbound
        frames = []
        for _ in range(frames_elapsed):
            payload = inbound.pop()
            if payload is None:
                break
            frames.append(PCMU.decode(payload))
        return arrived, frames

    def send(self, pcm: bytes | None, finished: Sequence[int], now: float) -> None:
        """Queue one ``media`` message, then a ``mark`` after each finished utterance
        (it completes when the far end echoes the mark). Nothing once the stream has
        stopped (its ``stop``, read by this tick, waits for the handler)."""
        conn = self._conn
        if conn is None or conn.stream.state != ms.STREAMING:
            return
        message = conn.stream.media(_SILENCE if pcm is None else PCMU.encode(pcm))
        if conn.send_nowait(message, media=True):
            self.frames_out += 1
        else:
            self.drops_send_queue += 1
        for utterance_id in finished:
            name = str(utterance_id)
            if len(self._marks) >= MAX_PENDING:
                del self._marks[next(iter(self._marks))]
            self._marks[name] = utterance_id
            if self._send(conn, conn.stream.mark(name)):
                self.marks_sent += 1

    def clear(self) -> None:
        """Drop the media still queued for the far end and send ``clear``."""
        conn = self._conn
        if conn is not None and conn.stream.state == ms.STREAMING:
            conn.discard_media()
            self._send(conn, conn.stream.clear())
            self.clears_sent += 1

    def _send(self, conn: _Connection, message: str) -> bool:
        if conn.send_nowait(message, media=False):
            return True
        self.drops_send_queue += 1
        return False

    def counters(self) -> dict[str, int]:
        """This leg's counters by name; budget drops are the session's."""
        return {
            "ws_frames_in": self.frames_in,
            "ws_frames_out": self.frames_out,
            "ws_marks_sent": self.marks_sent,
            "ws_marks_echoed": self.marks_echoed,
            "ws_marks_unknown": self.marks_unknown,
            "ws_clears_sent": self.clears_sent,
            "drop_ws_send_queue_full": self.drops_send_queue,
        }

    def close(self) -> None:
        """Stop sending and give the queued inbound audio back to the budget (idempotent)."""
        self.attach(None)
        self._closed = True
        self._inbound.clear()


@dataclass
class _Call:
    """A stream handed to the lifecycle (its :class:`~voxgate.calls.CallSetup`):
    the connection it uses now, then its leg and session once admitted."""

    endpoint: WebSocketEndpoint
    ticket: str
    conn: _Connection | None
    leg: WebSocketLeg | None = None
    session: Session | None = None

    def queued(self, decision: adm.Queued) -> None:
        """The stream waits; its media is dropped and counted meanwhile."""

    def refused(self, refusal: adm.Refusal) -> None:
        self.endpoint.refuse(self, ms.CLOSE_TRY_AGAIN_LATER, f"refused_{refusal.reason}",
                             refusal.reason)

    def build(self, ticket: str, core: SessionCore, now: float) -> Leg:
        leg = WebSocketLeg(core.pipeline.playback, core.pipeline.dtmf, core.budget)
        self.leg = leg
        start = None if self.conn is None else self.conn.stream.start
        return Leg(media=leg, signaling=_Signaling(self.endpoint, ticket), codec=PCMU.name,
                   remote=lambda: None if self.conn is None else self.conn.remote,
                   counters=leg.counters,
                   details={"stream_sid": None if start is None else start.stream_sid})

    def started(self, session: Session) -> None:
        self.session = session
        if self.conn is not None:
            self.endpoint.attach(self, self.conn)

    def failed(self, exc: Exception) -> None:
        self.endpoint.refuse(self, ms.CLOSE_INTERNAL_ERROR, "setup_failed", "internal error")


class _Signaling:
    """:class:`~voxgate.session.CallSignaling` for one media stream."""

    def __init__(self, endpoint: WebSocketEndpoint, ticket: str) -> None:
        self._endpoint = endpoint
        self._ticket = ticket

    def ring(self) -> None:
        """A media stream has no ringing."""

    def answer(self) -> None:
        """The stream flows already: nothing to send."""

    def refuse(self, reason: str) -> None:
        self._endpoint.close_call(self._ticket, reason)

    def hangup(self, reason: str) -> None:
        self._endpoint.close_call(self._ticket, reason)

    def release(self) -> None:
        self._endpoint.release(self._ticket)


class WebSocketEndpoint:
    """The media-stream server on ``[websocket] listen``; owns its streams' sessions.

    ``counters()`` gives the connection-level counts (refusals, bad messages,
    media dropped while queued …); the sessions' counters are in the registry.
    ``max_connections`` bounds the TCP connections held, handshakes included:
    ``2 * ([limits] max_sessions + queue_size) + 64``.
    """

    def __init__(
        self,
        config: Config,
        calls: Calls,
        check_in: Callable[[str], None] = lambda task: None,
        *,
        start_timeout_s: float = ms.START_TIMEOUT_S,
        handshake_timeout_s: float = HANDSHAKE_TIMEOUT_S,
    ) -> None:
        self.config = config
        self.calls = calls
        self._check_in = check_in
        self._start_timeout_s = start_timeout_s
        self._handshake_timeout_s = handshake_timeout_s
        limits = config.limits
        self.max_connections = 2 * (limits.max_sessions + limits.queue_size) + 64
        self.tokens = ms.RecoveryTokens(self.max_connections)
        self.stats: Counter[str] = Counter()
        self.port: int | None = None
        """The bound TCP port once :meth:`run` reported started (None: not listening)."""
        self._calls: dict[str, _Call] = {}  # ticket → call; bounded by max_connections
        self._connections = 0
        """TCP connections held: from their accept until their socket is closed."""
        self._batch = _WriteBatch()

    # -- life cycle -------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen on ``[websocket] listen`` (nothing when it is empty), report started,
        serve and check in as ``websocket`` until cancelled.

        Raises OSError when the address cannot be bound. Cancellation closes
        every connection (1001 to the streams, bounded by ``CLOSE_TIMEOUT_S``).
        """
        listen = self.config.websocket.listen
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._batch.run)
            if listen:
                host, port = split_host_port(listen)
                listeners = await trio.open_tcp_listeners(port, host=host)
                self.port = listeners[0].socket.getsockname()[1]
                nursery.start_soon(trio.serve_listeners, self._serve, listeners)
                log_event(logging.INFO, "websocket_listening", "media streams listening",
                          listen=f"{host}:{self.port}", path=self.config.websocket.path)
            task_status.started()
            while True:
                self._check_in("websocket")
                await trio.sleep(HEARTBEAT_S)

    def apply_config(self, config: Config) -> None:
        """A reload: new streams use ``config`` (path, limits, timers); ``listen`` stays."""
        self.config = config

    def counters(self) -> dict[str, int]:
        """Connection-level counts by name (see the class docstring)."""
        return dict(self.stats)

    # -- actions from sessions -------------------------------------------

    def close_call(self, ticket: str, reason: str) -> None:
        """End the stream of session ``ticket``: close its WebSocket naming ``reason``."""
        call = self._calls.get(ticket)
        if call is not None and call.conn is not None:
            call.conn.close(_END_CLOSE.get(reason, ms.CLOSE_NORMAL), reason)

    def release(self, ticket: str) -> None:
        """The session is gone: free its token and connection."""
        call = self._calls.pop(ticket, None)
        if call is None:
            return
        self.tokens.forget(ticket)
        if call.conn is not None:
            reason = None if call.session is None else call.session.end_reason
            call.conn.close(ms.CLOSE_NORMAL, reason or "ended")

    def refuse(self, call: _Call, close_code: int, stat: str, reason: str) -> None:
        """A stream that got no session: count, close with ``close_code``, forget it."""
        self._calls.pop(call.ticket, None)
        self.stats[stat] += 1
        if call.conn is not None:
            call.conn.close(close_code, reason)

    # -- connections ----------------------------------------------------------

    async def _serve(self, tcp: trio.SocketStream) -> None:
        """One accepted TCP connection, counted against ``max_connections`` until its
        socket is closed: refused (busy, bad handshake, wrong path) or served as a
        media stream. Always closes the socket, bounded even when cancelled."""
        if self._connections >= self.max_connections:
            self.stats["rejected_busy"] += 1
            log_event(logging.WARNING, "websocket_busy", "too many connections: 503",
                      connections=self._connections)
            retry = str(self.config.limits.retry_after_s).encode()
            await refuse_unread(tcp, 503, [(b"retry-after", retry)], CLOSE_TIMEOUT_S)
            return
        self._connections += 1
        ws = ServerWebSocket(tcp, max_message_bytes=self.config.websocket.max_message_bytes,
                             close_timeout_s=CLOSE_TIMEOUT_S)
        close_code, close_reason = ms.CLOSE_GOING_AWAY, "shutting down"
        try:
            opened = await self._handshake(ws)
            if opened is not None:
                await self._run_stream(ws, *opened)
        except Exception as exc:  # one connection's fault never takes the listener down
            close_code, close_reason = ms.CLOSE_INTERNAL_ERROR, "internal error"
            self.stats["connection_errors"] += 1
            log_event(logging.ERROR, "websocket_error", f"connection failed: {exc!r}",
                      remote=ws.remote, exc_info=exc)
        finally:
            with trio.CancelScope(shield=True):  # a no-op once the stream closed itself
                await ws.aclose(close_code, close_reason)
            self._connections -= 1

    async def _handshake(self, ws: ServerWebSocket) -> tuple[Request, str | None] | None:
        """The opening handshake within ``handshake_timeout_s``: the request and the
        tenant its path names, or None (refused and counted; the caller closes)."""
        try:
            with trio.fail_after(self._handshake_timeout_s):
                request = await ws.receive_request()
                found, path_tenant = _match_path(request.path, self.config.websocket.path)
                if not found:
                    self.stats["rejected_path"] += 1
                    await ws.reject(404)
                    return None
                await ws.accept()
        except trio.TooSlowError:
            self.stats["rejected_handshake_timeout"] += 1
            return None
        except HandshakeError as e:
            self.stats["rejected_bad_request" if e.status else "handshake_abandoned"] += 1
            return None
        except ConnectionClosed:
            self.stats["handshake_abandoned"] += 1
            return None
        return request, path_tenant

    async def _run_stream(self, ws: ServerWebSocket, request: Request,
                          path_tenant: str | None) -> None:
        cfg = self.config.websocket
        stream = ms.MediaStream(trio.current_time(), max_message_bytes=cfg.max_message_bytes,
                                max_messages_per_s=cfg.max_messages_per_s,
                                start_timeout_s=self._start_timeout_s)
        headers: dict[str, str] = {}
        for name, value in request.headers:
            headers.setdefault(name, value)
        conn = _Connection(ws, stream, path_tenant, headers, self.stats, self._batch)
        self.stats["connections"] += 1
        try:
            with conn.scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(conn.write_loop)
                    await self._read_loop(conn)
                    nursery.cancel_scope.cancel()
        finally:
            self._gone(conn)
            with trio.CancelScope(shield=True):
                await ws.aclose(conn.close_code, conn.close_reason)

    async def _read_loop(self, conn: _Connection) -> None:
        """Read until the peer closes, sends ``stop`` or breaks the protocol."""
        stream = conn.stream
        try:
            while True:
                if conn.leg is not None:
                    item = await conn.park()
                    if isinstance(item, ms.MediaStreamError):
                        raise item
                    if item is not None:
                        if self._on_event(conn, item, trio.current_time()):
                            return
                        continue
                    # Woken for the socket (a control frame, TCP ending) or detached:
                    # get_message handles it, then the next message, then we sleep again.
                deadline = stream.next_deadline()
                with trio.move_on_at(math.inf if deadline is None else deadline) as timeout:
                    data = await conn.ws.get_message()
                    if self._on_message(conn, data, trio.current_time()):
                        return
                if timeout.cancelled_caught:
                    stream.handle_timer(trio.current_time())
        except ConnectionClosed as e:
            if e.failed:  # a broken frame or an oversized message: the close frame is sent
                self._bad_message(conn, ms.MediaStreamError(e.code, e.reason))
        except ms.MediaStreamError as error:  # compiled (setup.py): one name per type
            self._bad_message(conn, error)
            conn.close(error.close_code, error.reason)
        except Exception as exc:
            log_event(logging.ERROR, "websocket_error", f"media stream failed: {exc!r}",
                      call=self._session_of(conn), session_id=conn.ticket, remote=conn.remote,
                      exc_info=exc)
            conn.close(ms.CLOSE_INTERNAL_ERROR, "internal error")

    def _bad_message(self, conn: _Connection, error: ms.MediaStreamError) -> None:
        self.stats[f"bad_message_{error.close_code}"] += 1
        log_event(logging.WARNING, "websocket_bad_message", error.reason,
                  call=self._session_of(conn), session_id=conn.ticket,
                  close_code=error.close_code, remote=conn.remote)

    def _session_of(self, conn: _Connection) -> Session | None:
        """The session of the call ``conn`` carries, once admitted: its records name it."""
        call = None if conn.ticket is None else self._calls.get(conn.ticket)
        return None if call is None else call.session

    def _on_message(self, conn: _Connection, data: str | bytes, now: float) -> bool:
        """Handle one message; True when the stream has stopped."""
        return self._on_event(conn, conn.stream.receive_message_untrusted(data, now), now)

    def _on_event(self, conn: _Connection, event: ms.Event, now: float) -> bool:
        """Handle one message's event; True when the stream has stopped."""
        call = self._calls.get(conn.ticket) if conn.ticket is not None else None
        if call is not None and call.conn is not conn:
            call = None
        leg = None if call is None else call.leg
        if isinstance(event, ms.Media):
            if leg is None:
                self.stats["media_dropped_not_admitted"] += 1
            else:
                _media_in(self.stats, leg, event, now)
        elif isinstance(event, ms.Mark):
            if leg is not None:
                leg.receive_mark(event.name, now)
        elif isinstance(event, ms.Dtmf):
            if leg is not None:
                leg.on_dtmf(DtmfEvent(event.digit, 0, now))
        elif isinstance(event, ms.Start):
            self._on_start(conn, event)
        elif isinstance(event, ms.Stop):
            self._on_stop(conn, call)
            return True
        return False

    def _on_start(self, conn: _Connection, start: ms.Start) -> None:
        token = start.custom_parameters.get(ms.RECOVERY_TOKEN_PARAMETER)
        if token is not None:
            self._resume(conn, token)
            return
        params = start.custom_parameters
        hint = params.get(ms.TENANT_PARAMETER)
        if conn.path_tenant is not None and hint is not None and hint != conn.path_tenant:
            raise ms.MediaStreamError(ms.CLOSE_POLICY_VIOLATION,
                                      "the path and customParameters.tenant name other tenants")
        call = _Call(self, uuid.uuid4().hex[:12], conn)
        conn.ticket = call.ticket
        self._calls[call.ticket] = call
        info = adm.CallInfo(ruri_user=None, ruri_host=None, headers=conn.headers,
                            source_ip=conn.source_ip, transport="websocket",
                            tenant_hint=conn.path_tenant or hint)
        self.calls.start(CallRequest(call.ticket, start.call_sid, info,
                                     from_uri=params.get("from", ""), to_uri=params.get("to", ""),
                                     peer=conn.remote), call)

    def _on_stop(self, conn: _Connection, call: _Call | None) -> None:
        if call is not None:
            self._leave(call, "bye")
        conn.close(ms.CLOSE_NORMAL, "stop")

    def _gone(self, conn: _Connection) -> None:
        """The connection has ended: give up its queue place, or detach it from its session."""
        call = None if conn.ticket is None else self._calls.get(conn.ticket)
        if call is None or call.conn is not conn:
            return
        if call.session is None or call.session.end_reason is not None:
            self._leave(call, "cancel")
            return
        self._leave(call, None)
        self.stats["streams_dropped"] += 1
        log_event(logging.INFO, "stream_dropped", "stream closed without stop: the "
                  "session waits for a resumption until its recovery window ends",
                  call=call.session, remote=conn.remote)

    def _leave(self, call: _Call, reason: EndReason | None) -> None:
        """Detach the call's connection; end the call with ``reason`` unless None."""
        call.conn = None
        if call.leg is not None:
            call.leg.attach(None)
        if reason is None:
            return
        self.calls.end(call.ticket, reason)
        if call.session is None:  # it was queued: the lifecycle gave its place up
            self._calls.pop(call.ticket, None)

    def _resume(self, conn: _Connection, token: str) -> None:
        ticket = self.tokens.redeem_untrusted(token)
        call = None if ticket is None else self._calls.get(ticket)
        if call is None or call.session is None or call.session.end_reason is not None:
            self.stats["resume_refused"] += 1
            raise ms.MediaStreamError(ms.CLOSE_POLICY_VIOLATION,
                                      "unknown, used or expired recovery token")
        self.attach(call, conn)
        self.stats["streams_resumed"] += 1
        log_event(logging.INFO, "stream_resumed", "stream resumed with its recovery token",
                  call=call.session, remote=conn.remote, stream_sid=conn.stream.stream_sid)

    def attach(self, call: _Call, conn: _Connection) -> None:
        """Make ``conn`` the call's stream and hand it a new recovery token."""
        old = call.conn
        if old is not None and old is not conn:
            old.close(ms.CLOSE_NORMAL, "replaced by a resumed stream")
        call.conn = conn
        conn.ticket = call.ticket
        if call.leg is not None:
            call.leg.attach(conn)
        token = self.tokens.issue(call.ticket)
        conn.send_nowait(conn.stream.mark(ms.recovery_mark_name(token)), media=False)


def _media_in(stats: Counter[str], leg: WebSocketLeg, event: ms.Media, now: float) -> None:
    """A ``media`` message for ``leg``: queued when inbound, else counted and ignored."""
    if event.track != ms.INBOUND_TRACK:
        stats["media_ignored_outbound_track"] += 1
    else:
        leg.receive_media_untrusted(event.payload, now)


def _match_path(target: str, base: str) -> tuple[bool, str | None]:
    """Whether ``target`` (query ignored) is ``base`` or ``base/<tenant>``; the tenant."""
    path = target.split("?", 1)[0]
    base = base.rstrip("/") or "/"
    if path == base:
        return True, None
    prefix = base if base.endswith("/") else base + "/"
    tenant = path.removeprefix(prefix)
    if tenant != path and _TENANT_NAME.fullmatch(tenant):
        return True, tenant
    return False, None

