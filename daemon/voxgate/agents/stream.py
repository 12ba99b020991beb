"""The stream agent: each call bridged to the integrator's bot over a WebSocket.

For every admitted call (``[agent] kind = "stream"``) voxgate opens one
WebSocket *client* connection to a provider (``[[agent.providers]]``) and
plays the media server's part of the provider's protocol
(:mod:`voxgate.agents.bot_wire`): the caller's audio goes to the bot every
20 ms, key presses as ``dtmf``; the bot's audio is played through the
session's playout (bounded by the session budget), its ``mark`` is echoed
once the audio before it has played (the transport's playback-completion
signal, :mod:`voxgate.pipeline.playback`), its ``clear`` flushes the
playout (the bot does barge-in, so voxgate's own is off for this agent).

Providers are tried at session creation in the order :class:`ProviderPool`
gives (health, failover and ramp-back: :mod:`voxgate.agents.providers`),
each within ``[agent.stream] connect_timeout_s``; the call is never switched
mid-sentence. The bot closing its socket normally (1000/1001) hangs up the
call (``agent-hangup``). Any other loss plays ``[agent] fallback_prompt`` and
reconnects (same provider first) within ``[timers] recovery_window_s`` with a
new ``start`` whose ``customParameters`` carry ``resumed = "true"``;
otherwise the call ends with ``provider-lost``. No provider at all at the
start ends it with ``provider-unavailable``.

Bounds: ``[agent.stream] max_message_bytes`` (a larger message closes the
connection with 1009, then the reconnect rule applies),
``max_messages_per_s`` (beyond it messages are dropped), ``send_queue_frames``
(caller audio waiting for the socket; beyond it frames are dropped).
Malformed bot messages are counted (``voxgate_bot_messages_dropped_total``),
logged once per call with the Call-ID, and dropped.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from typing import Final
from urllib.parse import urlsplit

import trio
from trio_websocket import (
    ConnectionClosed,
    ConnectionRejected,
    HandshakeError,
    WebSocketConnection,
    wrap_client_stream,
)

from voxgate.agents.base import Agent
from voxgate.agents.bot_wire import (
    WIRES,
    BotAudio,
    BotClear,
    BotMark,
    BotTransfer,
    BotWire,
    BotWireError,
    CallMeta,
)
from voxgate.agents.provider_pool import HealthPool, health_settings
from voxgate.agents.transfer import TransferFailure
from voxgate.config import ProviderConfig, StreamConfig
from voxgate.logging import log_event
from voxgate.metrics import BOT_MESSAGES_DROPPED, RESPONSE_LATENCY
from voxgate.pipeline.frames import PCM_FRAME_BYTES
from voxgate.pipeline.playout import Playout
from voxgate.pipeline.vad import SpeechStarted, SpeechStopped
from voxgate.rtp.dtmf import DtmfEvent

HEALTH_COMPONENT: Final = "providers"
"""The admission health gate's component name (``voxgatectl health``)."""
NORMAL_CLOSES: Final = frozenset({1000, 1001})
"""Close codes that mean the bot hung up (RFC 6455 §7.4.1)."""
CLOSE_TIMEOUT_S: Final = 1.0
"""How long ``stop`` and the closing handshake may take at the end of a call."""
RECONNECT_PAUSE_S: Final = 0.5
"""Between two rounds of reconnect attempts after a drop."""

_CONNECT_ERRORS = (OSError, HandshakeError, trio.TooSlowError, ssl.SSLError)


class _EndWatch(trio.abc.Stream):
    """The bot's stream as trio-websocket uses it, calling ``on_end`` once it ends (EOF,
    or broken: then kept in ``broken``).

    trio-websocket 0.12.2 does not end a client's wait for the handshake's answer when
    its reader sees the stream end, so without this a bot that crashed (a reconnect can
    reach its listening socket in the instant before the kernel closes it) or a TLS
    failure would cost the whole connect timeout.
    """

    def __init__(self, stream: trio.abc.Stream, on_end: Callable[[], None]) -> None:
        self._stream = stream
        self._on_end = on_end
        self.broken: trio.BrokenResourceError | None = None

    def _ended(self, broken: trio.BrokenResourceError | None) -> None:
        self.broken = self.broken or broken
        self._on_end()

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        try:
            await self._stream.send_all(data)
        except trio.BrokenResourceError as exc:
            self._ended(exc)
            raise

    async def wait_send_all_might_not_block(self) -> None:
        await self._stream.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        try:
            data = await self._stream.receive_some(max_bytes)
        except trio.BrokenResourceError as exc:
            self._ended(exc)
            raise
        if not data:
            self._ended(None)
        return data

    async def aclose(self) -> None:
        await self._stream.aclose()


def _handshake_broken(broken: trio.BrokenResourceError | None) -> OSError | ssl.SSLError:
    """The connect error of a stream that ended before the handshake's answer."""
    if broken is not None and isinstance(broken.__cause__, ssl.SSLError):
        return broken.__cause__
    return ConnectionResetError("the bot closed the connection during the WebSocket handshake")


@asynccontextmanager
async def bot_socket(provider: ProviderConfig, max_message_bytes: int,
                     connect_timeout_s: float) -> AsyncIterator[WebSocketConnection]:
    """One WebSocket client connection to ``provider`` (``ws://`` or ``wss://``, TLS
    verified against ``ca_file`` or the system store).

    The TCP connect, TLS and WebSocket handshakes get ``connect_timeout_s``
    together. On the way out the closing handshake gets :data:`CLOSE_TIMEOUT_S`
    (shielded) and the TCP stream is closed whoever closed first: we own it,
    because trio-websocket 0.12.2's ``open_websocket_url`` leaves it open when
    the server closes first (one leaked socket per bot hang-up). A server that
    closes or resets the connection (or fails TLS) before answering the
    WebSocket handshake fails it at once (:class:`_EndWatch`), not at the
    deadline.

    Raises:
        OSError, HandshakeError, trio.TooSlowError, ssl.SSLError: the connection
            could not be made; always the bare exception, never the exception
            group the handshake's nursery wraps it in.
    """
    url = urlsplit(provider.url)
    secure = url.scheme == "wss"
    host = url.hostname or ""
    port = url.port or (443 if secure else 80)
    resource = (url.path or "/") + (f"?{url.query}" if url.query else "")
    connect_by = trio.current_time() + connect_timeout_s
    with trio.fail_at(connect_by):
        tcp = await trio.open_tcp_stream(host, port)
    stream: trio.SocketStream | trio.SSLStream[trio.SocketStream] = tcp
    if secure:
        context = ssl.create_default_context(cafile=provider.ca_file or None)
        stream = trio.SSLStream(tcp, context, server_hostname=host, https_compatible=True)
    connected = False
    try:
        async with trio.open_nursery() as nursery:
            with trio.fail_at(connect_by), trio.CancelScope() as handshake:
                watched = _EndWatch(stream, handshake.cancel)
                # Typed for trio's two socket streams, it takes any trio.abc.Stream
                # (only its `local`/`remote`, unused here, become the stream's repr).
                ws = await wrap_client_stream(
                    nursery, watched,  # type: ignore[arg-type]
                    host if url.port is None else f"{host}:{port}", resource,
                    max_message_size=max_message_bytes)
            if handshake.cancelled_caught:
                raise _handshake_broken(watched.broken)
            connected = True
            try:
                yield ws
            finally:
                with trio.move_on_after(CLOSE_TIMEOUT_S) as scope:
                    scope.shield = True
                    await ws.aclose()
    except BaseExceptionGroup as group:
        # Trio's strict exception groups wrap the handshake's failure (the deadline in
        # the body, a rejection in trio-websocket's reader task): unwrap it for callers.
        failures, others = group.split(_CONNECT_ERRORS)
        if connected or failures is None or others is not None:
            raise
        failure: BaseException = failures
        while isinstance(failure, BaseExceptionGroup):  # nested nurseries nest groups
            failure = failure.exceptions[0]
        raise failure from None
    finally:
        await trio.aclose_forcefully(stream)


def _error_kind(exc: BaseException) -> str:
    if isinstance(exc, trio.TooSlowError):
        return "timeout"
    if isinstance(exc, ConnectionRejected):
        return "rejected"
    if isinstance(exc, HandshakeError):
        return "handshake"
    if isinstance(exc, ssl.SSLError):
        return "tls"
    return "connect"


def _close_code(closed: ConnectionClosed) -> int | None:
    return None if closed.reason is None else closed.reason.code


class ProviderPool(HealthPool):
    """The bot providers' health for the whole daemon; a Trio service
    (:class:`~voxgate.agents.provider_pool.HealthPool`).

    A probe is a WebSocket connect within ``[agent.stream] connect_timeout_s``.
    ``set_health`` (the admission health gate, component :data:`HEALTH_COMPONENT`)
    is closed while every provider is unhealthy. Sessions ask :meth:`candidates`
    for their order and report back.
    """

    def __init__(self, providers: tuple[ProviderConfig, ...], stream: StreamConfig,
                 set_health: Callable[[str, bool, str], None]) -> None:
        self.providers = {p.name: p for p in providers}
        self.stream = stream
        super().__init__(list(self.providers), health_settings(stream), self._probe,
                         partial(set_health, HEALTH_COMPONENT))

    async def _probe(self, name: str) -> str:
        try:
            async with bot_socket(self.providers[name], self.stream.max_message_bytes,
                                  self.stream.connect_timeout_s):
                pass
        except (*_CONNECT_ERRORS, ConnectionClosed) as exc:
            return repr(exc)[:200]
        return ""

    def candidates(self, names: tuple[str, ...]) -> list[ProviderConfig]:
        """The providers a new session tries, in order; ``names`` restricts them to a
        tenant's (empty: all)."""
        return [self.providers[n] for n in self.order() if not names or n in names]


class StreamAgent(Agent):
    """One call's bot connection (see the module docstring)."""

    def __init__(self, playout: Playout, pool: ProviderPool, tenant_providers: tuple[str, ...],
                 *, recovery_window_s: float) -> None:
        """``tenant_providers`` restricts the call to those providers (empty: all);
        after a drop, reconnecting may take ``recovery_window_s``."""
        super().__init__(playout)
        self._pool = pool
        self._stream = pool.stream
        self._tenant_providers = tenant_providers
        self._recovery_window_s = recovery_window_s
        self._out: trio.MemorySendChannel[str | bytes] | None = None
        self._wire: BotWire | None = None
        self._pending = b""  # bot audio short of a whole frame
        self._marks: dict[int, list[str]] = {}  # utterance id → the bot's marks after it
        self._rate_second = -1
        self._rate_count = 0
        self._turn_ended_at: float | None = None
        self._connected_at = 0.0
        self.provider = ""
        self.failovers = 0
        self.resumes = 0
        self.marks_received = 0
        self.marks_acknowledged = 0
        self.frames_dropped = 0
        self.dropped: dict[str, int] = {}
        self._logged_bad = False

    # -- the media tick's hooks (no blocking, no await) ---------------------------

    def on_frame(self, pcm: bytes, now: float) -> None:
        if self._wire is not None:
            self._send(self._wire.media(pcm))

    def on_speech(self, event: SpeechStarted | SpeechStopped) -> None:
        self._turn_ended_at = event.at if isinstance(event, SpeechStopped) else None

    def on_dtmf(self, event: DtmfEvent) -> None:
        if self._wire is not None:
            message = self._wire.dtmf(event.digit)
            if message is not None:
                self._send(message)

    def on_playback_done(self, utterance_id: int, signal: str) -> None:
        for name in self._marks.pop(utterance_id, ()):
            self._acknowledge(name)

    def transfer_failed(self, failure: TransferFailure) -> None:
        """Tell the connected bot; dropped and counted (``send_queue``, ``no_bot``) when
        the send queue is full or no bot is connected (a reconnection)."""
        if self._wire is not None:
            self._send(self._wire.transfer_failed(failure))
        else:
            BOT_MESSAGES_DROPPED.labels(self.provider, "no_bot").inc()

    def describe(self) -> dict[str, object]:
        return {"provider": self.provider, "failovers": self.failovers, "resumes": self.resumes,
                "marks_received": self.marks_received,
                "marks_acknowledged": self.marks_acknowledged,
                "frames_dropped": self.frames_dropped, "messages_dropped": dict(self.dropped)}

    def _send(self, message: str | bytes) -> None:
        out = self._out
        if out is None:
            return
        try:
            out.send_nowait(message)
        except trio.WouldBlock:
            self.frames_dropped += 1
            BOT_MESSAGES_DROPPED.labels(self.provider, "send_queue").inc()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self._out = None

    def _acknowledge(self, name: str) -> None:
        if self._wire is not None:
            message = self._wire.mark(name)
            if message is not None:
                self.marks_acknowledged += 1
                self._send(message)

    # -- the connection's task ------------------------------------------------------

    async def run(self) -> None:
        """Connect, bridge, reconnect after a drop; hang up when it cannot go on.

        Cancelled at call end: ``stop`` is sent and the socket closed, shielded,
        within :data:`CLOSE_TIMEOUT_S`.
        """
        controls = self.controls
        controls.set_barge_in(False)
        try:
            await self._connections()
        finally:
            log_event(logging.INFO, "bot_session", "bot connection ended", call=controls,
                      provider=self.provider or None, failovers=self.failovers,
                      resumes=self.resumes, marks_received=self.marks_received,
                      marks_acknowledged=self.marks_acknowledged,
                      frames_dropped=self.frames_dropped,
                      messages_dropped=sum(self.dropped.values()))

    async def _connections(self) -> None:
        controls = self.controls
        resumed = False
        give_up_at = float("inf")
        while True:
            outcome = await self._one_connection(resumed, give_up_at)
            if outcome == "hangup":
                self._pool.session_result(self.provider, "ok")
                controls.hangup("agent-hangup")
                return
            if outcome == "dropped":
                self._pool.session_result(self.provider, "dropped")
                if not resumed or trio.current_time() >= self._connected_at + \
                        self._stream.early_close_s:
                    controls.fallback()
                    resumed = True
                    give_up_at = trio.current_time() + self._recovery_window_s
                    continue
                # dropped again soon after a reconnect: pace it, within the same window
            if trio.current_time() >= give_up_at or not resumed:
                controls.hangup("provider-lost" if resumed else "provider-unavailable")
                return
            await trio.sleep(RECONNECT_PAUSE_S)

    async def _one_connection(self, resumed: bool, give_up_at: float) -> str:
        """Try the candidates in order until one connects, then bridge it.

        Returns ``hangup`` (the bot closed normally), ``dropped`` (the connection
        was lost) or ``none`` (no provider could be reached).
        """
        candidates = self._pool.candidates(self._tenant_providers)
        if resumed and self.provider in self._pool.providers:
            same = self._pool.providers[self.provider]
            candidates = [same] + [c for c in candidates if c.name != self.provider]
        for attempt, provider in enumerate(candidates):
            timeout = min(self._stream.connect_timeout_s, give_up_at - trio.current_time())
            if timeout <= 0:
                break
            if attempt:
                self.failovers += 1
            started = trio.current_time()
            connected_at: float | None = None
            try:
                async with bot_socket(provider, self._stream.max_message_bytes,
                                      timeout) as ws:
                    connected_at = self._connected_at = trio.current_time()
                    self._pool.success(provider.name, connected_at - started)
                    if attempt:
                        self._pool.session_result(candidates[0].name, "failover")
                    self.provider = provider.name
                    if resumed:
                        self.resumes += 1
                    code = await self._bridge(provider, ws, resumed)
            except _CONNECT_ERRORS as exc:
                if connected_at is not None:
                    raise
                self._pool.failure(provider.name, _error_kind(exc), repr(exc)[:200])
                continue
            if code in NORMAL_CLOSES:
                return "hangup"
            if trio.current_time() - connected_at < self._stream.early_close_s:
                self._pool.failure(provider.name, "early-close", f"close code {code}")
            return "dropped"
        return "none"

    async def _bridge(self, provider: ProviderConfig, ws: WebSocketConnection,
                      resumed: bool) -> int | None:
        """Pump both ways until the bot's side closes; returns its close code."""
        c = self.controls
        wire: BotWire = WIRES[provider.protocol](
            CallMeta(c.call_id, c.session_id, c.tenant, c.transport, c.from_uri, c.to_uri,
                     resumed=resumed),
            max_message_bytes=self._stream.max_message_bytes,
            sample_rate_hz=provider.sample_rate_hz)
        send, receive = trio.open_memory_channel[str | bytes](self._stream.send_queue_frames)
        self._pending = b""
        try:
            async with trio.open_nursery() as nursery:
                for message in wire.opening():
                    await ws.send_message(message)
                self._wire, self._out = wire, send
                nursery.start_soon(self._sender, ws, receive)
                try:
                    while True:
                        self._on_message(provider.name, await ws.get_message())
                except ConnectionClosed as closed:
                    nursery.cancel_scope.cancel()
                    return _close_code(closed)
        except ConnectionClosed as closed:  # while sending the opening or audio
            return _close_code(closed)
        finally:
            self._wire, self._out = None, None
            send.close()
            if ws.closed is None:
                with trio.move_on_after(CLOSE_TIMEOUT_S) as scope:
                    scope.shield = True
                    try:
                        for message in wire.closing():
                            await ws.send_message(message)
                    except ConnectionClosed:
                        pass

    async def _sender(self, ws: WebSocketConnection,
                      receive: trio.MemoryReceiveChannel[str | bytes]) -> None:
        """Send the queued messages; a closed connection ends it quietly (the receive
        loop sees the close and returns its code)."""
        async with receive:
            try:
                async for message in receive:
                    await ws.send_message(message)
            except ConnectionClosed:
                return

    def _on_message(self, provider: str, data: str | bytes) -> None:
        now = trio.current_time()
        second = int(now)
        if second != self._rate_second:
            self._rate_second, self._rate_count = second, 0
        self._rate_count += 1
        if self._rate_count > self._stream.max_messages_per_s:
            self._drop(provider, "rate", "over [agent.stream] max_messages_per_s")
            return
        wire = self._wire
        if wire is None:
            return
        try:
            event = wire.receive_untrusted(data)
        except BotWireError as e:
            self._drop(provider, "malformed", str(e))
            return
        if isinstance(event, BotAudio):
            self._play(event.pcm, now)
        elif isinstance(event, BotMark):
            self.marks_received += 1
            utterance_id = self.playout.mark()
            if utterance_id is None:
                self._acknowledge(event.name)
            else:
                self._marks.setdefault(utterance_id, []).append(event.name)
        elif isinstance(event, BotClear):
            self._pending = b""
            self.controls.clear_playout()
        elif isinstance(event, BotTransfer):
            log_event(logging.INFO, "bot_transfer", "the bot asks for a transfer",
                      call=self.controls, provider=provider, target=event.target[:200])
            self.controls.transfer(event.target)

    def _play(self, pcm: bytes, now: float) -> None:
        if self._turn_ended_at is not None:
            RESPONSE_LATENCY.labels("stream").observe(now - self._turn_ended_at)
            self._turn_ended_at = None
        pcm = self._pending + pcm
        whole = len(pcm) - len(pcm) % PCM_FRAME_BYTES
        for i in range(0, whole, PCM_FRAME_BYTES):
            self.playout.push(pcm[i:i + PCM_FRAME_BYTES])
        self._pending = pcm[whole:]

    def _drop(self, provider: str, reason: str, detail: str) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1
        BOT_MESSAGES_DROPPED.labels(provider, reason).inc()
        if not self._logged_bad:
            self._logged_bad = True
            log_event(logging.WARNING, "bot_message_dropped",
                      f"bot message dropped ({reason}): {detail}", call=self.controls,
                      provider=provider)
