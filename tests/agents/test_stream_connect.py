"""The stream agent's connect: a provider failing in the WebSocket handshake is a
connect error (logged against it, next provider tried), never a crashed call; one
closing the connection unanswered fails at once, not at the connect deadline.

The failing providers are local TCP servers that accept and then stall or reject the
handshake; the working one is a trio-websocket server that records what it is sent.
"""

from __future__ import annotations

import contextlib
import json
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

import pytest
import trio
from trio_websocket import ConnectionRejected, WebSocketRequest, serve_websocket

from tests.agents.test_local import Controls
from tests.harness.certs import self_signed
from voxgate.agents.stream import ProviderPool, StreamAgent, bot_socket
from voxgate.budget import BufferCaps, SessionBudget
from voxgate.config import ProviderConfig, StreamConfig
from voxgate.pipeline.playout import Playout

CONNECT_TIMEOUT_S = 0.3
STREAM = StreamConfig(connect_timeout_s=CONNECT_TIMEOUT_S, unhealthy_after_errors=2)


@asynccontextmanager
async def tcp_server(handler: Callable[[trio.SocketStream], Awaitable[None]],
                     ) -> AsyncIterator[str]:
    """A ws:// URL whose TCP server runs ``handler`` on each accepted connection."""
    async with trio.open_nursery() as nursery:
        (listener,) = await nursery.start(partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
        yield f"ws://127.0.0.1:{listener.socket.getsockname()[1]}/ws"
        nursery.cancel_scope.cancel()


async def stall(stream: trio.SocketStream) -> None:
    """Accept the TCP connection, never answer the WebSocket handshake."""
    await trio.sleep_forever()


async def forbid(stream: trio.SocketStream) -> None:
    """Answer the WebSocket handshake with HTTP 403."""
    await stream.receive_some()
    await stream.send_all(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
    await trio.sleep_forever()


async def hang_up(stream: trio.SocketStream) -> None:
    """Accept the TCP connection and close it unanswered (a bot dying as it accepts)."""
    await stream.aclose()


@pytest.mark.parametrize(("handler", "error"), [(stall, trio.TooSlowError),
                                                (forbid, ConnectionRejected),
                                                (hang_up, ConnectionResetError)])
async def test_a_failed_handshake_raises_the_bare_connect_error(
        handler: Callable[[trio.SocketStream], Awaitable[None]], error: type[Exception]) -> None:
    async with tcp_server(handler) as url:
        with pytest.raises(error):
            async with bot_socket(ProviderConfig("bot", url), 65_536, CONNECT_TIMEOUT_S):
                pass


async def test_a_certificate_the_bot_cannot_verify_fails_at_once(tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)

    async def tls(stream: trio.SocketStream) -> None:
        with contextlib.suppress(trio.BrokenResourceError):
            await trio.SSLStream(stream, context, server_side=True).do_handshake()
        await trio.sleep_forever()

    async with tcp_server(tls) as url:
        with pytest.raises(ssl.SSLCertVerificationError):
            async with bot_socket(ProviderConfig("bot", url.replace("ws:", "wss:")), 65_536,
                                  CONNECT_TIMEOUT_S):
                pass


async def test_a_provider_stalling_in_the_handshake_fails_over_to_the_next() -> None:
    started = trio.Event()
    sent: list[dict[str, object]] = []

    async def bot(request: WebSocketRequest) -> None:
        ws = await request.accept()
        while not started.is_set():
            sent.append(json.loads(await ws.get_message()))
            if sent[-1]["event"] == "start":
                started.set()
        await trio.sleep_forever()

    async with tcp_server(stall) as stalled_url, trio.open_nursery() as nursery:
        server = await nursery.start(serve_websocket, bot, "127.0.0.1", 0, None)
        providers = (ProviderConfig("bot-1", stalled_url),
                     ProviderConfig("bot-2", f"ws://127.0.0.1:{server.port}/ws"))
        pool = ProviderPool(providers, STREAM, lambda *_: None)
        await nursery.start(pool.run)
        budget = SessionBudget(BufferCaps.from_ms({"playout": 1000}, 1 << 20, 500))
        agent = StreamAgent(Playout(budget), pool, (), recovery_window_s=5.0)
        controls = Controls()
        agent.controls = controls
        nursery.start_soon(agent.run)
        with trio.fail_after(5):
            await started.wait()
        assert (agent.provider, agent.failovers) == ("bot-2", 1)
        assert pool.snapshot()[0]["errors"] == {"timeout": 1}
        assert controls.hangups == []
        nursery.cancel_scope.cancel()
