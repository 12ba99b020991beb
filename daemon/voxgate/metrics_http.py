"""``[metrics] listen``: ``/metrics`` over HTTP/1.1 for a Prometheus scraper.

h11 parses and frames HTTP; this module only decides and drives it with Trio
(the shape of h11's own Trio example server):

- ``GET`` and ``HEAD`` of ``/metrics`` (a query string is ignored) get the
  registry: OpenMetrics 1.0 when ``Accept`` names
  ``application/openmetrics-text``, else the text format 0.0.4; gzip when
  ``Accept-Encoding`` names it (prometheus-client's ``choose_encoder`` and
  ``gzip_accepted``). ``HEAD`` gets the headers a ``GET`` would.
- Other paths get 404, other methods 405 with ``Allow: GET, HEAD``.
- Connections are kept alive (HTTP/1.1 rules, as h11 applies them).

Bounds: :data:`MAX_CONNECTIONS` at once (one more is answered 503 and
closed); a request head of :data:`MAX_HEAD_BYTES` (431; h11 checks what it
buffers of an incomplete head, so one read of :data:`RECEIVE_BYTES` more may
complete it) and a body of :data:`MAX_BODY_BYTES` (413);
:data:`REQUEST_TIMEOUT_S` to receive a whole request once its first byte came,
:data:`IDLE_TIMEOUT_S` between requests, :data:`SEND_TIMEOUT_S` to send an
answer; then the connection is closed.
"""

from __future__ import annotations

import gzip
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from http import HTTPStatus

import h11
import trio
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder, gzip_accepted

from voxgate.config import split_host_port
from voxgate.logging import log_event
from voxgate.metrics import METRICS_HTTP_REFUSED, REGISTRY

MAX_CONNECTIONS = 16
MAX_HEAD_BYTES = 8192
MAX_BODY_BYTES = 8192
RECEIVE_BYTES = 8192
REQUEST_TIMEOUT_S = 5.0
IDLE_TIMEOUT_S = 30.0
SEND_TIMEOUT_S = 10.0
PATH = b"/metrics"
ALLOWED_METHODS = (b"GET", b"HEAD")

Headers = list[tuple[bytes, bytes]]


@dataclass(frozen=True, slots=True)
class Answer:
    """One response: status, headers and body (the body of a GET, also for HEAD)."""

    status: int
    headers: Headers
    body: bytes

    @classmethod
    def text(cls, status: int, message: str, extra: Sequence[tuple[bytes, bytes]] = ()) -> Answer:
        """A short ``text/plain`` answer (errors)."""
        return cls(status, [(b"content-type", b"text/plain; charset=utf-8"), *extra],
                   message.encode() + b"\n")


async def _nothing_before() -> None:
    pass


async def serve_metrics(listen: str, *, registry: CollectorRegistry = REGISTRY,
                        before_scrape: Callable[[], Awaitable[None]] = _nothing_before,
                        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Bind ``listen`` (HOST:PORT), report started, serve ``registry`` until cancelled;
    ``before_scrape`` is awaited before each request is answered (the supervisor sums
    the sessions' counters there, in pieces: :meth:`Supervisor.refresh_metrics`).

    Raises OSError when the address cannot be bound.
    """
    host, port = split_host_port(listen)
    listeners = await trio.open_tcp_listeners(port, host=host)
    limiter = trio.CapacityLimiter(MAX_CONNECTIONS)

    async def handle(stream: trio.SocketStream) -> None:
        try:
            limiter.acquire_nowait()
        except trio.WouldBlock:
            await _refuse_busy(stream)
            return
        try:
            await _serve_connection(stream, registry, before_scrape)
        finally:
            limiter.release()

    async with trio.open_nursery() as nursery:
        task_status.started()
        await trio.serve_listeners(handle, listeners, handler_nursery=nursery)


def answer(method: bytes, target: bytes, headers: Sequence[tuple[bytes, bytes]],
           registry: CollectorRegistry = REGISTRY) -> Answer:
    """What to answer one request (``headers`` as h11 gives them: lower-case names)."""
    if target.split(b"?", 1)[0] != PATH:
        return Answer.text(404, f"not found: try {PATH.decode()}")
    if method not in ALLOWED_METHODS:
        return Answer.text(405, "method not allowed: GET or HEAD",
                           [(b"allow", b", ".join(ALLOWED_METHODS))])
    accept = b", ".join(value for name, value in headers if name == b"accept")
    encodings = b", ".join(value for name, value in headers if name == b"accept-encoding")
    encoder, content_type = choose_encoder(accept.decode("latin-1"))
    body = encoder(registry)
    out: Headers = [(b"content-type", content_type.encode()), (b"vary", b"Accept, Accept-Encoding")]
    if gzip_accepted(encodings.decode("latin-1")):
        body = gzip.compress(body)
        out.append((b"content-encoding", b"gzip"))
    return Answer(200, out, body)


async def _serve_connection(stream: trio.SocketStream, registry: CollectorRegistry,
                            before_scrape: Callable[[], Awaitable[None]]) -> None:
    """Requests on one connection, in turn, until it closes, breaks the protocol or
    a timeout passes; always closes the stream."""
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES)
    try:
        while True:
            try:
                request = await _receive_request(stream, conn)
            except h11.RemoteProtocolError as e:
                METRICS_HTTP_REFUSED.labels("bad-request").inc()
                if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                    await _send(stream, conn, b"", Answer.text(e.error_status_hint, str(e)))
                return
            if request is None:
                return
            try:
                await before_scrape()
                reply = answer(request.method, request.target, request.headers, registry)
            except Exception as e:  # a collector's bug: say so, keep serving
                log_event(logging.ERROR, "metrics_failed", "cannot produce the metrics",
                          exc_info=e)
                reply = Answer.text(500, "internal error")
            await _send(stream, conn, request.method, reply)
            if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                return
            conn.start_next_cycle()
    except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError,
            OSError) as e:
        log_event(logging.DEBUG, "metrics_client_error", f"metrics connection closed: {e!r}")
    finally:
        await trio.aclose_forcefully(stream)


async def _receive_request(stream: trio.SocketStream, conn: h11.Connection) -> h11.Request | None:
    """The next request, its body (if any) read and discarded; None when the client
    closed the connection or a timeout passed.

    Raises:
        h11.RemoteProtocolError: a malformed or oversized request (with a status hint).
    """
    request: h11.Request | None = None
    body_bytes = 0
    with trio.move_on_after(IDLE_TIMEOUT_S) as scope:
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await stream.receive_some(RECEIVE_BYTES)
                conn.receive_data(data)
                if data:  # the request has begun: it has REQUEST_TIMEOUT_S to complete
                    scope.deadline = min(scope.deadline, trio.current_time() + REQUEST_TIMEOUT_S)
            elif isinstance(event, h11.Request):
                request = event
            elif isinstance(event, h11.Data):
                body_bytes += len(event.data)
                if body_bytes > MAX_BODY_BYTES:
                    raise h11.RemoteProtocolError("request body too large", 413)
            elif isinstance(event, h11.EndOfMessage):
                return request
            elif isinstance(event, h11.ConnectionClosed):
                return None
    return None


async def _send(stream: trio.SocketStream, conn: h11.Connection, method: bytes,
                reply: Answer) -> None:
    """Send ``reply`` through ``conn`` within :data:`SEND_TIMEOUT_S` (no body for HEAD:
    h11 frames it; the headers stay those of a GET)."""
    headers = [*reply.headers, (b"content-length", str(len(reply.body)).encode())]
    events: list[h11.Event] = [
        h11.Response(status_code=reply.status, headers=headers,
                     reason=HTTPStatus(reply.status).phrase.encode()),
    ]
    if method != b"HEAD" and reply.body:
        events.append(h11.Data(data=reply.body))
    events.append(h11.EndOfMessage())
    with trio.fail_after(SEND_TIMEOUT_S):
        for event in events:
            data = conn.send(event)
            if data:
                await stream.send_all(data)


async def _refuse_busy(stream: trio.SocketStream) -> None:
    """One connection too many: 503 without reading the request (counted), then close."""
    METRICS_HTTP_REFUSED.labels("busy").inc()
    conn = h11.Connection(h11.SERVER)
    reply = Answer.text(503, f"busy: {MAX_CONNECTIONS} metrics connections open",
                         [(b"retry-after", b"1"), (b"connection", b"close")])
    try:
        await _send(stream, conn, b"", reply)
    except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError,
            OSError) as e:
        log_event(logging.DEBUG, "metrics_client_error", f"metrics connection closed: {e!r}")
    finally:
        await trio.aclose_forcefully(stream)
