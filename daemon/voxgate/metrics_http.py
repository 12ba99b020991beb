"""``[metrics] listen``: serve ``GET /metrics`` for a Prometheus scraper (Trio).

A deliberately small HTTP/1.1 responder: one request per connection,
request head bounded to 8 KiB and 5 s, the body produced by
prometheus-client's exposition. Anything but ``GET /metrics`` gets 404/405.
"""

from __future__ import annotations

import logging

import trio

from voxgate.config import split_host_port
from voxgate.logging import log_event
from voxgate.metrics import exposition

MAX_HEAD_BYTES = 8192
REQUEST_TIMEOUT_S = 5.0
MAX_CONNECTIONS = 16
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


async def serve_metrics(listen: str, *,
                        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Bind ``listen`` (HOST:PORT), report started, serve until cancelled."""
    host, port = split_host_port(listen)
    listeners = await trio.open_tcp_listeners(port, host=host)
    limiter = trio.CapacityLimiter(MAX_CONNECTIONS)

    async def handle(stream: trio.SocketStream) -> None:
        async with limiter:
            await _answer(stream)

    async with trio.open_nursery() as nursery:
        task_status.started()
        await trio.serve_listeners(handle, listeners, handler_nursery=nursery)


async def _answer(stream: trio.SocketStream) -> None:
    head = b""
    try:
        with trio.move_on_after(REQUEST_TIMEOUT_S):
            while b"\r\n\r\n" not in head and len(head) < MAX_HEAD_BYTES:
                chunk = await stream.receive_some(MAX_HEAD_BYTES)
                if not chunk:
                    break
                head += chunk
        method, _, rest = head.partition(b" ")
        path = rest.split(b" ", 1)[0]
        if method != b"GET":
            status, body = "405 Method Not Allowed", "only GET\n"
        elif path.split(b"?", 1)[0] != b"/metrics":
            status, body = "404 Not Found", "try /metrics\n"
        else:
            status, body = "200 OK", exposition()
        data = body.encode()
        await stream.send_all(
            f"HTTP/1.1 {status}\r\nContent-Type: {CONTENT_TYPE}\r\n"
            f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n".encode() + data
        )
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as e:
        log_event(logging.DEBUG, "metrics_client_error", str(e))
    finally:
        await stream.aclose()
