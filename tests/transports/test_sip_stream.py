"""StreamListener over real loopback sockets: the connection limits and a peer that
does not read (RFC 3261 §18 transport, voxgate's bounds)."""

from __future__ import annotations

import socket

import trio

from tests.harness.daemon import free_tcp_port
from voxgate.metrics import REGISTRY
from voxgate.sip.ratelimit import FloodLimits
from voxgate.sip.uas import UasCore
from voxgate.transports.sip_stream import StreamLimits, StreamListener

TIMEOUT_S = 20.0


def closed(reason: str) -> float:
    value = REGISTRY.get_sample_value("voxgate_sip_stream_closed_total",
                                      {"transport": "TCP", "reason": reason})
    return value or 0.0


def options(n: int) -> bytes:
    return (f"OPTIONS sip:echo@127.0.0.1 SIP/2.0\r\n"
            f"Via: SIP/2.0/TCP 127.0.0.1:5999;branch=z9hG4bKo{n}\r\n"
            f"From: <sip:p@127.0.0.1>;tag=f{n}\r\nTo: <sip:echo@127.0.0.1>\r\n"
            f"Call-ID: c{n}\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n").encode()


async def serve(nursery: trio.Nursery, limits: StreamLimits,
                flood: FloodLimits | None = None) -> tuple[StreamListener, int]:
    port = free_tcp_port()
    core = UasCore(local_host="127.0.0.1", local_port=port, transport="TCP",
                   flood_limits=flood)
    listener: StreamListener

    def pump() -> None:
        while core.next_event() is not None:
            pass
        listener.flush()

    listener = StreamListener(core, ("127.0.0.1", port), limits, pump)
    await nursery.start(listener.run)
    return listener, port


async def closed_by_peer(stream: trio.SocketStream) -> bool:
    """Whether the listener closes ``stream`` (reads until EOF or reset)."""
    try:
        while await stream.receive_some(65_536):
            pass
    except trio.BrokenResourceError:
        pass
    return True


async def test_connections_beyond_the_total_are_closed_at_once() -> None:
    before = closed("limit-total")
    with trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            _, port = await serve(nursery, StreamLimits(2, 10, 60.0, 10.0))
            first = await trio.open_tcp_stream("127.0.0.1", port)
            second = await trio.open_tcp_stream("127.0.0.1", port)
            await trio.sleep(0.2)
            third = await trio.open_tcp_stream("127.0.0.1", port)
            assert await closed_by_peer(third)
            await first.send_all(options(1))  # the first two are served
            assert b"SIP/2.0 200 OK" in await first.receive_some(65_536)
            for stream in (first, second, third):
                await stream.aclose()
            nursery.cancel_scope.cancel()
    assert closed("limit-total") == before + 1


async def test_a_peer_that_does_not_read_is_disconnected() -> None:
    """Requests keep coming but the answers are never read: once a bounded amount
    of them waits to be sent, the connection is closed (send-queue-full)."""
    before = closed("send-queue-full")
    flood = FloodLimits(options_per_source_per_s=1e6, options_burst=10**6)
    with trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            _, port = await serve(nursery, StreamLimits(4, 4, 60.0, 10.0), flood)
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            try:
                for batch in range(1000):
                    await stream.send_all(b"".join(options(batch * 100 + n)
                                                   for n in range(100)))
                    if closed("send-queue-full") > before:
                        break
            except trio.BrokenResourceError:
                pass
            await stream.aclose()
            nursery.cancel_scope.cancel()
    assert closed("send-queue-full") == before + 1
