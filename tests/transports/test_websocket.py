"""The WebSocket media-stream driver against a trio-websocket client, in one trio run.

Real MediaClock, AdmissionDesk and Registry, built as the supervisor builds them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import Any, ClassVar

import pytest
import trio
from trio_websocket import (
    ConnectionClosed,
    ConnectionRejected,
    WebSocketConnection,
    wrap_client_stream,
)

from tests.harness.daemon import free_tcp_port
from voxgate.admission import Admission, limits_from_config
from voxgate.admission_desk import AdmissionDesk
from voxgate.agents.base import Agent
from voxgate.agents.factory import AGENTS
from voxgate.calls import Calls
from voxgate.codec.g711 import PCMU
from voxgate.config import Config, TenantConfig
from voxgate.metrics import REGISTRY
from voxgate.pipeline.clock import MediaClock
from voxgate.registry import Registry
from voxgate.transports import media_stream as ms
from voxgate.transports.media_stream import (
    Connected,
    Dtmf,
    Mark,
    Media,
    Start,
    Stop,
    parse_message_untrusted,
    serialize,
)
from voxgate.transports.websocket import WRITE_BATCH_CONNECTIONS, WebSocketEndpoint, _WriteBatch

SID = "MZ00000000000000000000000000000001"
SILENCE = PCMU.silence(160)
TONE = bytes(range(160)) * 2  # a PCM16 frame that is not silence


def make_config(**sections: dict[str, Any]) -> Config:
    cfg = Config()
    websocket = {"listen": f"127.0.0.1:{free_tcp_port()}", **sections.pop("websocket", {})}
    for name, values in {"websocket": websocket, **sections}.items():
        cfg = replace(cfg, **{name: replace(getattr(cfg, name), **values)})
    return cfg


def speech_frames(count: int, seed: int = 1) -> list[bytes]:
    """Noise the VAD takes for speech, as µ-law frames that survive decode → encode."""
    rng = random.Random(seed)
    frames: list[bytes] = []
    while len(frames) < count:
        pcm = b"".join(rng.randrange(-6000, 6000).to_bytes(2, "little", signed=True)
                       for _ in range(160))
        frame = PCMU.encode(pcm)
        if PCMU.encode(PCMU.decode(frame)) == frame:
            frames.append(frame)
    return frames


class Served:
    def __init__(self, endpoint: WebSocketEndpoint, registry: Registry, desk: AdmissionDesk,
                 checked_in: list[str]) -> None:
        self.endpoint = endpoint
        self.registry = registry
        self.desk = desk
        self.checked_in = checked_in

    @property
    def port(self) -> int:
        assert self.endpoint.port is not None
        return self.endpoint.port


@asynccontextmanager
async def serving(config: Config, **kwargs: Any) -> AsyncIterator[Served]:
    checked_in: list[str] = []
    clock = MediaClock(check_in=checked_in.append)
    desk = AdmissionDesk(Admission(limits_from_config(config)), checked_in.append)
    registry = Registry()
    calls = Calls(config, desk, registry, clock)
    calls.fallback_prompt = kwargs.pop("fallback_prompt", ())
    endpoint = WebSocketEndpoint(config, calls, check_in=checked_in.append, **kwargs)
    async with trio.open_nursery() as nursery:
        await nursery.start(clock.run)
        await nursery.start(desk.run)
        await nursery.start(calls.run)
        await nursery.start(endpoint.run)
        yield Served(endpoint, registry, desk, checked_in)
        nursery.cancel_scope.cancel()


class Client:
    """A media server: sends Twilio messages, collects what voxgate sends back."""

    def __init__(self, ws: WebSocketConnection, *, echo_marks: bool = True) -> None:
        self.ws = ws
        self.echo_marks = echo_marks
        self.media: list[bytes] = []
        self.marks: list[str] = []
        self.tokens: list[str] = []
        self.events: list[str] = []
        self.closed: tuple[int, str | None] | None = None
        self._chunk = 0

    async def read(self) -> None:
        try:
            while True:
                event = parse_message_untrusted(await self.ws.get_message(), ms.FROM_VOXGATE)
                self.events.append(type(event).__name__)
                if isinstance(event, Media):
                    self.media.append(event.payload)
                elif isinstance(event, Mark):
                    token = ms.recovery_token_of(event)
                    if token is not None:
                        self.tokens.append(token)
                        continue
                    self.marks.append(event.name)
                    if self.echo_marks:
                        await self.send(Mark(SID, event.name))
        except ConnectionClosed as e:
            assert e.reason is not None
            self.closed = (e.reason.code, e.reason.reason)

    async def send(self, event: ms.Event) -> None:
        await self.ws.send_message(serialize(event))

    async def start(self, **params: str) -> None:
        await self.send(Connected())
        await self.send(Start(SID, "CA1", "AC1", ("inbound",), params))

    async def stream(self, frames: list[bytes], frame_s: float = 0.02) -> None:
        """Send ``frames`` one per ``frame_s`` on an absolute schedule (until closed)."""
        next_at = trio.current_time()
        for frame in frames:
            self._chunk += 1
            try:
                await self.send(Media(SID, frame, "inbound", self._chunk, 20 * self._chunk))
            except ConnectionClosed:
                return
            next_at += frame_s
            await trio.sleep_until(next_at)


@asynccontextmanager
async def connect(port: int, path: str = "/media", **kwargs: Any) -> AsyncIterator[Client]:
    """A :class:`Client` on ``ws://127.0.0.1:port/path`` reading in the background."""
    # Our own TCP stream, closed on the way out whoever closed the WebSocket
    # (trio-websocket's client leaves it to the garbage collector after a server close).
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream, trio.open_nursery() as nursery:
        ws = await wrap_client_stream(nursery, stream, "127.0.0.1", path)
        client = Client(ws, **kwargs)
        nursery.start_soon(client.read)
        yield client
        await ws.aclose()
        nursery.cancel_scope.cancel()


async def handshake_status(port: int, path: str) -> int:
    """The HTTP status of the opening handshake (101 when accepted)."""
    status = 101
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        try:
            async with trio.open_nursery() as nursery:
                ws = await wrap_client_stream(nursery, stream, "127.0.0.1", path)
                await ws.aclose()
        except* ConnectionRejected as group:
            rejected = group.exceptions[0]
            assert isinstance(rejected, ConnectionRejected)
            status = rejected.status_code
    return status


async def wait_until(check: Callable[[], object], timeout_s: float = 5.0) -> None:
    with trio.fail_after(timeout_s):
        while not check():  # noqa: ASYNC110 - polls what the driver and client show
            await trio.sleep(0.01)


def completions(signal: str) -> float:
    value = REGISTRY.get_sample_value("voxgate_playback_completion_total",
                                      {"transport": "websocket", "signal": signal})
    return value or 0.0


class Talker(Agent):
    """Says one utterance of ``frames`` frames on the first inbound frame."""

    frames = 5
    done: ClassVar[list[tuple[int, str]]] = []

    def on_frame(self, pcm: bytes, now: float) -> None:
        if not self.playout.speaking and not Talker.done and self.playout.played_frames == 0:
            self.playout.say([TONE] * self.frames)

    def on_playback_done(self, utterance_id: int, signal: str) -> None:
        Talker.done.append((utterance_id, signal))


@pytest.fixture
def talker(monkeypatch: pytest.MonkeyPatch) -> type[Talker]:
    monkeypatch.setitem(AGENTS, "talker", Talker)
    Talker.done = []
    Talker.frames = 5
    return Talker


# -- the call ------------------------------------------------------------------


async def test_echo_stream_then_stop_ends_the_session_with_bye():
    async with serving(make_config()) as served, connect(served.port) as client:
        await client.start()
        await wait_until(lambda: client.tokens)
        assert client.events[0] == "Mark"  # the recovery mark comes first
        assert len(client.tokens[0]) == 32
        frames = speech_frames(25)
        await client.stream(frames)
        await wait_until(lambda: set(frames) <= set(client.media))
        positions = [client.media.index(frame) for frame in frames]
        assert positions == sorted(positions)  # in order (a silence may sit between two)
        await wait_until(lambda: client.media[-1] == SILENCE)  # the caller stopped: silence
        (summary,) = served.registry.sessions()
        assert summary["transport"] == "websocket" and summary["codec"] == "PCMU"
        assert summary["call_id"] == "CA1"
        stats = served.registry.describe(str(summary["id"]), 1)
        assert stats is not None
        counters: Any = stats["stats"]
        assert counters["ws_frames_in"] == 25
        assert counters["ws_frames_out"] >= 25
        await client.send(Stop(SID))
        await wait_until(lambda: client.closed is not None)
        assert client.closed == (1000, "stop")
        await wait_until(lambda: len(served.registry) == 0)
        assert served.desk.admission.statistics().active == 0
        assert len(served.endpoint.tokens) == 0
        assert "websocket" in served.checked_in


async def test_dtmf_reaches_the_pipeline():
    async with serving(make_config()) as served, connect(served.port) as client:
        await client.start()
        await wait_until(lambda: client.tokens)
        await client.send(Dtmf(SID, "5"))
        sid = str(served.registry.sessions()[0]["id"])

        def dtmf_events() -> object:
            described = served.registry.describe(sid, 1)
            assert described is not None
            stats: Any = described["stats"]
            return stats["dtmf_events"]

        await wait_until(lambda: dtmf_events() == 1)


async def test_operator_hangup_closes_the_stream_naming_the_reason():
    async with serving(make_config()) as served, connect(served.port) as client:
        await client.start()
        await wait_until(lambda: client.tokens)
        served.registry.hangup(str(served.registry.sessions()[0]["id"]), "operator")
        await wait_until(lambda: client.closed is not None)
        assert client.closed == (1000, "operator")
        await wait_until(lambda: len(served.registry) == 0)


# -- paths and tenants -------------------------------------------------------------


@pytest.mark.parametrize("path", ["/", "/other", "/media/a/b", "/mediax", "/media/%20"])
async def test_other_paths_get_404(path):
    async with serving(make_config()) as served:
        assert await handshake_status(served.port, path) == 404
        assert served.endpoint.counters()["rejected_path"] == 1


@pytest.mark.parametrize(("path", "params"), [
    ("/media/acme", {}), ("/media", {"tenant": "acme"}), ("/media/acme?x=1", {"tenant": "acme"}),
])
async def test_path_or_custom_parameter_names_the_tenant(path, params):
    config = make_config()
    config = replace(config, tenants=(TenantConfig(name="acme", max_sessions=5),))
    async with serving(config) as served, connect(served.port, path) as client:
        await client.start(**params)
        await wait_until(lambda: client.tokens)
        assert served.registry.sessions()[0]["tenant"] == "acme"


async def test_conflicting_tenants_are_refused():
    async with serving(make_config()) as served, connect(served.port, "/media/acme") as client:
        await client.start(tenant="other")
        await wait_until(lambda: client.closed is not None)
        assert client.closed is not None and client.closed[0] == 1008


# -- admission --------------------------------------------------------------------


async def test_refusal_at_capacity_closes_with_1013():
    config = make_config(limits={"max_sessions": 1})
    async with serving(config) as served, connect(served.port) as first:
        await first.start()
        await wait_until(lambda: first.tokens)
        async with connect(served.port) as second:
            await second.start()
            await wait_until(lambda: second.closed is not None)
            assert second.closed == (1013, "full")
        assert served.endpoint.counters()["refused_full"] == 1
        assert len(served.registry) == 1


async def test_queued_stream_waits_without_media_until_admitted():
    config = make_config(limits={"max_sessions": 1, "queue_size": 1, "queue_timeout_s": 10})
    async with serving(config) as served, connect(served.port) as first:
        await first.start()
        await wait_until(lambda: first.tokens)
        async with connect(served.port) as second:
            await second.start()
            await second.stream(speech_frames(10))
            assert second.events == []  # queued: nothing processed, nothing sent
            assert served.endpoint.counters()["media_dropped_not_admitted"] == 10
            await first.send(Stop(SID))
            await wait_until(lambda: second.tokens)
            frames = speech_frames(5, seed=2)
            await second.stream(frames)
            await wait_until(lambda: set(frames) <= set(second.media))
            assert served.registry.sessions()[0]["id"] != ""


async def test_queue_timeout_and_closing_while_queued():
    config = make_config(limits={"max_sessions": 1, "queue_size": 1, "queue_timeout_s": 0.3})
    async with serving(config) as served, connect(served.port) as first:
        await first.start()
        await wait_until(lambda: first.tokens)
        async with connect(served.port) as second:
            await second.start()
            await wait_until(lambda: second.closed is not None)
            assert second.closed == (1013, "queue-timeout")
        async with connect(served.port) as third:
            await third.start()
            await wait_until(lambda: served.desk.admission.statistics().queued == 1)
        await wait_until(lambda: served.desk.admission.statistics().queued == 0)
        assert served.desk.admission.statistics().active == 1


# -- bad input ---------------------------------------------------------------------


@pytest.mark.parametrize(("messages", "code"), [
    (["{nope"], 1007),
    (['{"event": "hello"}'], 1008),
    ([b"\x00\x01"], 1003),
    ([serialize(Media(SID, bytes(160), "inbound", 1, 20))], 1008),  # before start
    (['{"event": "start", "start": {"streamSid": "MZ1", "callSid": "CA1", '
      '"mediaFormat": {"encoding": "audio/l16", "sampleRate": 16000, "channels": 1}}}'], 1003),
    (["x" * 3000], 1009),
])
async def test_malformed_messages_close_the_stream_and_log_the_defect(messages, code, caplog):
    config = make_config(websocket={"max_message_bytes": 2048})
    async with serving(config) as served, connect(served.port) as client:
        for message in messages:
            await client.ws.send_message(message)
        await wait_until(lambda: client.closed is not None)
        assert client.closed is not None and client.closed[0] == code
    events = [getattr(r, "voxgate_fields", ("", {}))[0] for r in caplog.records]
    assert "websocket_bad_message" in events
    assert served.endpoint.counters()[f"bad_message_{code}"] == 1


async def test_bad_media_after_start_closes_with_1007():
    async with serving(make_config()) as served, connect(served.port) as client:
        await client.start()
        await wait_until(lambda: client.tokens)
        await client.ws.send_message(
            '{"event": "media", "streamSid": "' + SID + '", "media": {"track": "inbound", '
            '"chunk": "1", "timestamp": "0", "payload": "AAAA"}}')
        await wait_until(lambda: client.closed is not None)
        assert client.closed is not None and client.closed[0] == 1007
        # The session lost its stream: it waits for a resumption, it does not end.
        assert len(served.registry) == 1


async def test_message_rate_is_bounded():
    config = make_config(websocket={"max_messages_per_s": 10})
    async with serving(config) as served, connect(served.port) as client:
        await client.start()
        await client.stream(speech_frames(20), frame_s=0.001)
        await wait_until(lambda: client.closed is not None)
        assert client.closed is not None and client.closed[0] == 1008
        assert "per second" in (client.closed[1] or "")
        assert served.endpoint.counters()["bad_message_1008"] == 1


async def test_a_stream_without_start_is_closed():
    served_config = serving(make_config(), start_timeout_s=0.3)
    async with served_config as served, connect(served.port) as client:
        await client.send(Connected())
        await wait_until(lambda: client.closed is not None)
        assert client.closed == (1008, "no start message in time")


# -- playback completion and barge-in ----------------------------------------------


async def test_echoed_mark_completes_the_utterance(talker):
    config = make_config(agent={"kind": "talker"})
    before = completions("mark")
    async with serving(config) as served, connect(served.port) as client:
        await client.start()
        await client.stream(speech_frames(3))
        await wait_until(lambda: talker.done)
        assert talker.done == [(1, "mark")]
        assert client.marks == ["1"]
        assert client.media.count(PCMU.encode(TONE)) == 5
        assert completions("mark") == before + 1
        assert served.registry.describe(str(served.registry.sessions()[0]["id"]), 1)


async def test_unechoed_mark_is_completed_by_the_deadman(talker):
    config = make_config(agent={"kind": "talker"}, timers={"playback_deadman_ms": 100})
    before = completions("deadman")
    async with serving(config) as served, connect(served.port, echo_marks=False) as client:
        await client.start()
        await client.stream(speech_frames(3))
        await wait_until(lambda: talker.done)
        assert client.marks == ["1"]
        assert talker.done == [(1, "deadman")]
        assert completions("deadman") == before + 1


async def test_barge_in_sends_clear(talker):
    talker.frames = 150  # 3 s
    config = make_config(agent={"kind": "talker"})
    async with serving(config) as served, connect(served.port) as client:
        await client.start()
        await client.stream(speech_frames(30))  # 600 ms of "speech": the VAD starts at 200 ms
        await wait_until(lambda: "Clear" in client.events)
        assert talker.done == [(1, "cleared")]
        assert client.marks == []
        tone = PCMU.encode(TONE)
        after_clear = client.events.index("Clear")
        assert client.media.count(tone) < 30
        assert client.events[after_clear - 1] == "Media"


# -- recovery ------------------------------------------------------------------------


async def test_dropped_stream_resumes_the_same_session_with_its_token(caplog):
    caplog.set_level(logging.INFO, logger="voxgate")
    config = make_config(timers={"media_inactivity_s": 0.2, "recovery_window_s": 10})
    async with serving(config) as served:
        async with connect(served.port) as first:
            await first.start()
            await first.stream(speech_frames(5))
            await wait_until(lambda: first.tokens)
            token = first.tokens[0]
        (summary,) = served.registry.sessions()
        sid = str(summary["id"])
        await wait_until(lambda: served.registry.sessions()[0]["state"] == "paused")
        async with connect(served.port) as second:
            await second.start(recoveryToken=token)
            await wait_until(lambda: second.tokens)
            assert second.tokens[0] != token
            frames = speech_frames(5, seed=3)
            await second.stream(frames)
            await wait_until(lambda: set(frames) <= set(second.media))
            (summary,) = served.registry.sessions()
            assert summary["id"] == sid and summary["state"] == "active"
            described = served.registry.describe(sid, 1)
            assert described is not None
            stats: Any = described["stats"]
            assert stats["session_pauses"] == stats["session_recoveries"] == 1
            async with connect(served.port) as replay:
                await replay.start(recoveryToken=token)
                await wait_until(lambda: replay.closed is not None)
                assert replay.closed == (1008, "unknown, used or expired recovery token")
            await second.send(Stop(SID))
            await wait_until(lambda: len(served.registry) == 0)
    events = [getattr(r, "voxgate_fields", ("", {}))[0] for r in caplog.records]
    assert events.count("call_start") == 1
    assert "stream_dropped" in events and "stream_resumed" in events


async def test_a_resumption_takes_over_a_stream_still_open():
    async with serving(make_config()) as served, connect(served.port) as first:
        await first.start()
        await wait_until(lambda: first.tokens)
        async with connect(served.port) as second:
            await second.start(recoveryToken=first.tokens[0])
            await wait_until(lambda: second.tokens and first.closed is not None)
            assert first.closed == (1000, "replaced by a resumed stream")
            frames = speech_frames(3, seed=4)
            await second.stream(frames)
            await wait_until(lambda: set(frames) <= set(second.media))
            assert len(served.registry) == 1


async def test_no_resumption_in_the_window_ends_the_session():
    config = make_config(timers={"media_inactivity_s": 0.1, "recovery_window_s": 0.3})
    async with serving(config) as served:
        async with connect(served.port) as client:
            await client.start()
            await client.stream(speech_frames(3))
            await wait_until(lambda: client.tokens)
        await wait_until(lambda: len(served.registry) == 0)
        assert len(served.endpoint.tokens) == 0
        assert served.desk.admission.statistics().active == 0


# -- the wire: handshakes, the connection limit, protocol errors (raw TCP) ---------

UPGRADE = ("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
           "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
           "Sec-WebSocket-Version: 13\r\n\r\n")
HALF_REQUEST = b"GET /media HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgr"


def ws_frame(opcode: int, payload: bytes, *, rsv: int = 0, masked: bool = True) -> bytes:
    """One final client frame (RFC 6455 §5.2), payload under 64 KiB."""
    length = bytes([len(payload)]) if len(payload) < 126 else bytes([126]) + len(
        payload).to_bytes(2, "big")
    head = bytes([0x80 | rsv | opcode]) + length
    if not masked:
        return head + payload
    key = b"\x0f\xa5\x3c\x99"
    body = bytes(byte ^ key[i % 4] for i, byte in enumerate(payload))
    return bytes([head[0], head[1] | 0x80]) + head[2:] + key + body


def server_frames(data: bytes) -> list[tuple[int, bytes]]:
    """(opcode, payload) of the unmasked server frames in ``data``."""
    frames = []
    while data:
        opcode, length, start = data[0] & 0x0F, data[1] & 0x7F, 2
        if length == 126:
            length, start = int.from_bytes(data[2:4], "big"), 4
        elif length == 127:
            length, start = int.from_bytes(data[2:10], "big"), 10
        frames.append((opcode, data[start:start + length]))
        data = data[start + length:]
    return frames


async def read_to_eof(stream: trio.SocketStream, timeout_s: float = 5.0) -> bytes:
    """Everything the server sends until it closes (a reset counts as closed)."""
    received = b""
    with trio.fail_after(timeout_s):
        while True:
            try:
                data = await stream.receive_some()
            except trio.BrokenResourceError:
                return received
            if not data:
                return received
            received += data


async def open_upgraded(port: int) -> tuple[trio.SocketStream, bytes]:
    """A raw TCP stream after a 101 on ``/media``, and what followed the 101's head."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    await stream.send_all(UPGRADE.format(path="/media").encode())
    received = b""
    with trio.fail_after(5):
        while b"\r\n\r\n" not in received:
            received += await stream.receive_some()
    head, _, rest = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101 ")
    return stream, rest


def server_sockets(port: int, pid: int | str = "self") -> int:
    """Sockets process ``pid`` holds on local port ``port``, the listener left out."""
    inodes = set()
    for table in (f"/proc/{pid}/net/tcp", f"/proc/{pid}/net/tcp6"):
        with open(table) as lines:
            for line in list(lines)[1:]:
                fields = line.split()
                if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] != "0A":
                    inodes.add(f"socket:[{fields[9]}]")
    held = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            held += os.readlink(f"/proc/{pid}/fd/{fd}") in inodes
    return held


@pytest.mark.parametrize("path", ["/", "/other", "/mediax"])
async def test_a_wrong_path_is_answered_404_and_closed(path):
    async with serving(make_config()) as served:
        stream = await trio.open_tcp_stream("127.0.0.1", served.port)
        async with stream:
            await stream.send_all(UPGRADE.format(path=path).encode())
            answer = await read_to_eof(stream)  # the server closed its end
        assert answer.startswith(b"HTTP/1.1 404 ")
        assert served.endpoint.counters()["rejected_path"] == 1


async def test_a_request_that_is_no_upgrade_is_answered_400_and_closed():
    async with serving(make_config()) as served:
        stream = await trio.open_tcp_stream("127.0.0.1", served.port)
        async with stream:
            await stream.send_all(b"GET /media HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            assert (await read_to_eof(stream)).startswith(b"HTTP/1.1 400 ")
        assert served.endpoint.counters()["rejected_bad_request"] == 1


@pytest.mark.parametrize("host", [b"\xff\xfe", b"xn--zz"])  # neither ASCII nor IDNA
async def test_an_undecodable_host_is_answered_400_and_the_listener_lives_on(host):
    async with serving(make_config()) as served:
        stream = await trio.open_tcp_stream("127.0.0.1", served.port)
        async with stream:
            request = UPGRADE.format(path="/media").encode().replace(b"127.0.0.1", host, 1)
            await stream.send_all(request)
            assert (await read_to_eof(stream)).startswith(b"HTTP/1.1 400 ")
        assert served.endpoint.counters()["rejected_bad_request"] == 1
        async with connect(served.port) as client:
            await client.start()
            await wait_until(lambda: client.tokens)


async def test_half_a_request_is_closed_at_the_handshake_timeout():
    async with serving(make_config(), handshake_timeout_s=0.3) as served:
        stream = await trio.open_tcp_stream("127.0.0.1", served.port)
        async with stream:
            await stream.send_all(HALF_REQUEST)
            assert await read_to_eof(stream) == b""
        assert served.endpoint.counters()["rejected_handshake_timeout"] == 1
        assert server_sockets(served.port) == 0


async def test_connections_count_from_accept_and_the_one_over_the_limit_gets_503():
    config = make_config(limits={"max_sessions": 1, "queue_size": 0, "retry_after_s": 7})
    async with serving(config) as served, contextlib.AsyncExitStack() as held:
        limit = served.endpoint.max_connections
        assert limit == 66
        for _ in range(limit):  # stalled handshakes fill every place
            stream = await held.enter_async_context(
                await trio.open_tcp_stream("127.0.0.1", served.port))
            await stream.send_all(HALF_REQUEST)
        await wait_until(lambda: server_sockets(served.port) == limit)
        extra = await trio.open_tcp_stream("127.0.0.1", served.port)
        async with extra:
            await extra.send_all(UPGRADE.format(path="/media").encode())
            answer = await read_to_eof(extra)
        assert answer.startswith(b"HTTP/1.1 503 ")
        assert b"retry-after: 7\r\n" in answer
        assert served.endpoint.counters()["rejected_busy"] == 1
        assert server_sockets(served.port) == limit
        await held.aclose()  # the stalled clients give up: their places come back
        await wait_until(lambda: served.endpoint.counters()["handshake_abandoned"] == limit)
        assert server_sockets(served.port) == 0
        async with connect(served.port) as client:
            await client.start()
            await wait_until(lambda: client.tokens)


async def test_a_flood_of_wrong_paths_holds_no_sockets_and_leaves_room_for_a_call():
    config = make_config(limits={"max_sessions": 1, "queue_size": 0})
    flood = 100  # more than max_connections (66)
    async with serving(config) as served, contextlib.AsyncExitStack() as held:
        answers: list[bytes] = []

        async def knock() -> None:  # the client keeps its end open
            stream = await held.enter_async_context(
                await trio.open_tcp_stream("127.0.0.1", served.port))
            await stream.send_all(UPGRADE.format(path="/nope").encode())
            answers.append(await read_to_eof(stream))

        async with trio.open_nursery() as nursery:
            for _ in range(flood):
                nursery.start_soon(knock)
        statuses = Counter(answer[:12] for answer in answers)
        assert set(statuses) <= {b"HTTP/1.1 404", b"HTTP/1.1 503"}
        counters = served.endpoint.counters()
        assert counters["rejected_path"] == statuses[b"HTTP/1.1 404"]
        assert counters.get("rejected_busy", 0) == statuses[b"HTTP/1.1 503"]
        assert statuses.total() == flood
        await wait_until(lambda: server_sockets(served.port) == 0)
        async with connect(served.port) as client:
            await client.start()
            await wait_until(lambda: client.tokens)


@pytest.mark.parametrize(("frame", "code"), [
    pytest.param(ws_frame(0x1, b"{}", rsv=0x40), 1002, id="rsv1-without-extension"),
    pytest.param(ws_frame(0x1, b"{}", masked=False), 1002, id="unmasked"),
    pytest.param(ws_frame(0x3, b""), 1002, id="reserved-opcode"),
    pytest.param(ws_frame(0x1, b"\xff\xfe"), 1007, id="text-not-utf8"),
    pytest.param(ws_frame(0x8, (999).to_bytes(2, "big")), 1002, id="close-code-999"),
])
async def test_a_broken_frame_gets_its_close_frame_then_tcp_close(frame, code, caplog):
    async with serving(make_config()) as served:
        stream, _ = await open_upgraded(served.port)
        async with stream:
            await stream.send_all(frame)
            frames = server_frames(await read_to_eof(stream))
        assert frames[-1][0] == 0x8
        assert int.from_bytes(frames[-1][1][:2], "big") == code
        assert served.endpoint.counters()[f"bad_message_{code}"] == 1
    events = [getattr(r, "voxgate_fields", ("", {}))[0] for r in caplog.records]
    assert "websocket_bad_message" in events


def frames_in(served: Served) -> int:
    """The only session's ``ws_frames_in``."""
    (summary,) = served.registry.sessions()
    described = served.registry.describe(str(summary["id"]), 1)
    assert described is not None
    counters: Any = described["stats"]
    return int(counters["ws_frames_in"])


def media_message(frame: bytes, chunk: int) -> bytes:
    return serialize(Media(SID, frame, "inbound", chunk, 20 * chunk)).encode()


async def test_fragments_and_pings_after_whole_frames_reach_the_session():
    """Whole text frames take the fast path; a ping, a fragmented message and a
    non-minimal length that follow go to wsproto and mean the same as before."""
    frames = speech_frames(4)
    async with serving(make_config()) as served:
        stream, _ = await open_upgraded(served.port)
        async with stream:
            for event in (Connected(), Start(SID, "CA1", "AC1", ("inbound",), {})):
                await stream.send_all(ws_frame(0x1, serialize(event).encode()))
            await wait_until(lambda: len(served.registry) == 1)
            await stream.send_all(ws_frame(0x1, media_message(frames[0], 1)))
            await stream.send_all(ws_frame(0x9, b"hi"))  # a ping: wsproto from here on
            second = media_message(frames[1], 2)
            first_part = ws_frame(0x1, second[:100])
            await stream.send_all(bytes([first_part[0] & 0x7F]) + first_part[1:])  # no FIN
            await stream.send_all(ws_frame(0x0, second[100:]))
            await stream.send_all(ws_frame(0x1, media_message(frames[2], 3)))
            await wait_until(lambda: frames_in(served) == 3)
            await stream.send_all(ws_frame(0x1, serialize(Stop(SID)).encode()))
            received = server_frames(await read_to_eof(stream))
        assert (0xA, b"hi") in received  # the pong
        assert received[-1][0] == 0x8 and received[-1][1] == (1000).to_bytes(2, "big") + b"stop"
        assert served.endpoint.counters().get("connection_errors", 0) == 0


async def test_a_length_not_minimally_encoded_gets_1002():
    async with serving(make_config()) as served:
        stream, _ = await open_upgraded(served.port)
        async with stream:
            await stream.send_all(ws_frame(0x1, serialize(Connected()).encode()))
            key = b"\0\0\0\0"
            await stream.send_all(bytes([0x81, 0x80 | 126]) + (2).to_bytes(2, "big") + key + b"{}")
            frames = server_frames(await read_to_eof(stream))
        assert frames[-1][0] == 0x8 and frames[-1][1][:2] == (1002).to_bytes(2, "big")
        assert served.endpoint.counters()["bad_message_1002"] == 1


async def test_a_broken_frame_mid_call_leaves_the_session_waiting_for_a_resumption():
    async with serving(make_config()) as served:
        stream, after_101 = await open_upgraded(served.port)
        async with stream:
            for event in (Connected(), Start(SID, "CA1", "AC1", ("inbound",), {})):
                await stream.send_all(ws_frame(0x1, serialize(event).encode()))
            await wait_until(lambda: len(served.registry) == 1)
            await stream.send_all(ws_frame(0x1, b"{}", rsv=0x20))
            frames = server_frames(after_101 + await read_to_eof(stream))
        # the recovery mark and media, as many as the ticks sent meanwhile, then the close
        assert {opcode for opcode, _ in frames[:-1]} <= {0x1}
        assert frames[-1][0] == 0x8 and frames[-1][1][:2] == (1002).to_bytes(2, "big")
        await wait_until(lambda: served.endpoint.counters().get("streams_dropped") == 1)
        assert served.endpoint.counters()["bad_message_1002"] == 1
        assert len(served.registry) == 1  # it waits for a resumption, it does not end


async def test_write_batch_writes_in_bursts_and_the_rest_once_the_running_task_yields():
    written: list[int] = []

    class Conn:
        def __init__(self, n: int) -> None:
            self.n = n

        def write_queued(self) -> None:
            written.append(self.n)

    batch = _WriteBatch()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(batch.run)
        await trio.testing.wait_all_tasks_blocked()
        for n in range(WRITE_BATCH_CONNECTIONS + 3):
            batch.add(Conn(n))
        assert written == list(range(WRITE_BATCH_CONNECTIONS))  # one burst, no yield yet
        await trio.testing.wait_all_tasks_blocked()
        assert written == list(range(WRITE_BATCH_CONNECTIONS + 3))  # the rest, by the task
        nursery.cancel_scope.cancel()
