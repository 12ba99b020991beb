"""A real Pipecat bot that voxgate's stream-agent integration tests talk to.

Run with the bot virtualenv (``make bot-venv``), never with voxgate's own::

    .venv-bot/bin/python tests/bots/pipecat_bot.py --port 0 --protocol twilio --events ev.jsonl

It serves one WebSocket endpoint, ``/ws``, with Pipecat's ``FastAPIWebsocketTransport``
and the serializer of ``--protocol``: ``TwilioFrameSerializer`` (Twilio Media Streams,
auto hang-up off) or ``VonageFrameSerializer`` (Vonage audio connector, PCM16 at
``--sample-rate``). Each connection runs its own pipeline,
``transport.input() → CallerEcho → transport.output()``, where ``CallerEcho``:

* echoes every caller audio frame back as output audio;
* on DTMF ``1`` plays 1 s of a 1000 Hz tone, then sends a marker: a Twilio ``mark``
  (``{"event":"mark","streamSid":S,"mark":{"name":"mN"}}``) or a Vonage ``notify``
  (``{"action":"notify","payload":{"name":"mN"}}``), N counting the presses from 1;
* on ``#`` plays 3 s of a 440 Hz tone and interrupts 0.5 s later (Pipecat's
  ``InterruptionFrame``: the serializer sends Twilio ``clear`` / Vonage ``{"action":"clear"}``);
* on ``*`` ends the pipeline (``EndWorkerFrame``: queued audio is played out, Pipecat
  sends its end silence, then closes the WebSocket with 1000);
* on ``0`` cancels the pipeline (``CancelWorkerFrame``: the socket closes at once);
* with ``--transfer-key K --transfer-target URI``, on ``K`` (instead of the above)
  asks voxgate to transfer the caller: Twilio ``{"event":"transfer","streamSid":S,
  "transfer":{"target":URI}}`` or Vonage ``{"action":"transfer","target":URI}``
  (event ``transfer_asked``); voxgate's ``transfer_failed`` answer is logged as ``raw``.

Everything the tests may check goes to ``--events`` as JSON lines, each with ``event``,
``conn`` (connection number from 1) and ``t`` (Unix time): ``accepted``, ``start``
(Twilio handshake and ``customParameters``) or ``connected`` (Vonage content-type),
``raw`` for every message received from the peer (kind and metadata, never payloads),
``dtmf``, ``tone``, ``mark_queued``, ``interrupt``, ``hangup``, ``peer_disconnected``,
``summary`` (counts) and ``closed`` (``by``: ``bot``, ``peer`` or ``shutdown``, the last when
SIGTERM made uvicorn close the socket with 1012); ``handshake_failed`` when a Twilio
connection does not open with ``connected``/``start`` (the socket is closed with 1008).
Once listening it prints ``ready port=N`` (the real port when ``--port 0``).
"""

# pipecat is installed only in .venv-bot, so voxgate's mypy (in .venv) finds none of the
# bot's imports and sees them as Any ("misc": subclassing Any, untyped decorators; Pipecat's
# own event_handler decorator is untyped too). A full check against the real packages (no
# cache: it would clash with the one the normal run keeps):
#   .venv/bin/mypy --python-executable .venv-bot/bin/python --cache-dir /dev/null \
#       tests/bots/pipecat_bot.py
# mypy: disable-error-code="import-not-found,misc"

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import collections
import json
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO, cast

import numpy as np
import uvicorn
from fastapi import FastAPI, WebSocket
from loguru import logger
from pipecat.frames.frames import (
    CancelWorkerFrame,
    EndWorkerFrame,
    Frame,
    InputAudioRawFrame,
    InputDTMFFrame,
    OutputAudioRawFrame,
    OutputTransportMessageFrame,
)
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineParams, PipelineWorker
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.runner.utils import parse_telephony_websocket
from pipecat.serializers.base_serializer import FrameSerializer
from pipecat.serializers.twilio import TwilioFrameSerializer
from pipecat.serializers.vonage import VonageFrameSerializer
from pipecat.transports.websocket.fastapi import (
    FastAPIWebsocketParams,
    FastAPIWebsocketTransport,
)
from pipecat.workers.runner import WorkerRunner

WS_PATH = "/ws"
TWILIO_RATE = 8000
MARK_TONE_S = 1.0
MARK_TONE_HZ = 1000.0
CLEAR_TONE_S = 3.0
CLEAR_TONE_HZ = 440.0
CLEAR_AFTER_S = 0.5
TONE_AMPLITUDE = 0.25
VONAGE_PACKET_MS = 20
"""Vonage audio is cut into 20 ms binary messages, as Pipecat's Vonage example does."""


class EventLog:
    """JSON-lines event log, one object per line, flushed line by line."""

    def __init__(self, path: Path | None) -> None:
        self._out: TextIO = path.open("a", encoding="utf-8") if path else sys.stdout

    def write(self, event: str, conn: int | None = None, **fields: Any) -> None:
        record: dict[str, Any] = {"event": event}
        if conn is not None:
            record["conn"] = conn
        record["t"] = round(time.time(), 3)
        record.update(fields)
        self._out.write(json.dumps(record, separators=(",", ":"), default=str) + "\n")
        self._out.flush()


@dataclass
class Connection:
    """One peer connection: its number, the event log, and what was counted."""

    number: int
    log: EventLog
    protocol: str
    stream_sid: str | None = None
    raw_counts: collections.Counter[str] = field(default_factory=collections.Counter)
    audio_frames_in: int = 0
    audio_bytes_in: int = 0
    audio_frames_echoed: int = 0

    def event(self, event: str, **fields: Any) -> None:
        self.log.write(event, self.number, **fields)

    def raw(self, data: str | bytes) -> None:
        """Log one message received from the peer (without any audio payload)."""
        fields = (
            describe_twilio(data, self.stream_sid)
            if self.protocol == "twilio"
            else describe_vonage(data)
        )
        self.raw_counts[str(fields["kind"])] += 1
        self.event("raw", **fields)


def _json_object(data: str | bytes) -> dict[str, Any] | None:
    try:
        message = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return message if isinstance(message, dict) else None


def _sub(message: dict[str, Any], key: str) -> dict[str, Any]:
    value = message.get(key)
    return value if isinstance(value, dict) else {}


def describe_twilio(data: str | bytes, stream_sid: str | None) -> dict[str, Any]:
    """Kind and metadata of a Twilio Media Streams message (payload replaced by its size)."""
    if isinstance(data, bytes):
        return {"kind": "binary", "bytes": len(data)}
    message = _json_object(data)
    if message is None:
        return {"kind": "invalid", "chars": len(data)}
    kind = message.get("event")
    fields: dict[str, Any] = {"kind": kind if isinstance(kind, str) else "no-event"}
    if "sequenceNumber" in message:
        fields["seq"] = message["sequenceNumber"]
    if stream_sid is not None and kind != "connected":
        fields["stream_sid_ok"] = message.get("streamSid") == stream_sid
    if kind == "media":
        media = _sub(message, "media")
        payload = media.get("payload")
        try:
            size = len(base64.b64decode(payload, validate=True)) if payload else 0
        except (binascii.Error, TypeError, ValueError):
            size = -1
        fields.update(
            track=media.get("track"),
            chunk=media.get("chunk"),
            timestamp=media.get("timestamp"),
            bytes=size,
        )
    elif kind == "mark":
        fields["name"] = _sub(message, "mark").get("name")
    elif kind == "dtmf":
        dtmf = _sub(message, "dtmf")
        fields.update(digit=dtmf.get("digit"), track=dtmf.get("track"))
    elif kind == "connected":
        fields.update(protocol=message.get("protocol"), version=message.get("version"))
    elif kind in ("start", "stop"):
        fields[kind] = message.get(kind)
    elif kind == "transfer_failed":
        fields["transfer"] = message.get("transfer")
    return fields


def describe_vonage(data: str | bytes) -> dict[str, Any]:
    """Kind and metadata of a Vonage audio-connector message (audio replaced by its size)."""
    if isinstance(data, bytes):
        return {"kind": "audio", "bytes": len(data)}
    message = _json_object(data)
    if message is None:
        return {"kind": "invalid", "chars": len(data)}
    kind = message.get("event")
    fields: dict[str, Any] = {"kind": kind if isinstance(kind, str) else "no-event"}
    for key, value in message.items():
        if key != "event":
            fields[key.replace("-", "_")] = value
    return fields


def vonage_rate_of(content_type: object) -> int | None:
    """The rate of ``audio/l16;rate=N``, or None when it is not such a content-type."""
    if not isinstance(content_type, str):
        return None
    kind, _, params = content_type.replace(" ", "").partition(";")
    if kind.lower() != "audio/l16":
        return None
    for param in params.split(";"):
        name, _, value = param.partition("=")
        if name.lower() == "rate" and value.isdigit():
            return int(value)
    return None


class LoggingTwilioSerializer(TwilioFrameSerializer):
    """Pipecat's Twilio serializer, logging every message it is handed."""

    def __init__(self, conn: Connection, stream_sid: str, call_sid: str | None) -> None:
        super().__init__(
            stream_sid=stream_sid,
            call_sid=call_sid,
            params=TwilioFrameSerializer.InputParams(auto_hang_up=False),
        )
        self._conn = conn

    async def deserialize(self, data: str | bytes) -> Frame | None:
        self._conn.raw(data)
        return await super().deserialize(data)


class LoggingVonageSerializer(VonageFrameSerializer):
    """Pipecat's Vonage serializer, logging every message it is handed."""

    def __init__(self, conn: Connection, sample_rate: int) -> None:
        super().__init__(VonageFrameSerializer.InputParams(vonage_sample_rate=sample_rate))
        self._conn = conn
        self._sample_rate_expected = sample_rate

    async def deserialize(self, data: str | bytes) -> Frame | None:
        self._conn.raw(data)
        if isinstance(data, str):
            message = _json_object(data)
            if message is not None and message.get("event") == "websocket:connected":
                content_type = message.get("content-type")
                rate = vonage_rate_of(content_type)
                self._conn.event(
                    "connected",
                    content_type=content_type,
                    rate=rate,
                    rate_ok=rate == self._sample_rate_expected,
                )
        return await super().deserialize(data)


def tone(seconds: float, hz: float, sample_rate: int) -> bytes:
    """PCM16 mono sine, a whole number of 40 ms chunks long."""
    chunk = sample_rate // 25
    samples = max(chunk, round(seconds * sample_rate) // chunk * chunk)
    t = np.arange(samples) / sample_rate
    wave = TONE_AMPLITUDE * 32767 * np.sin(2 * np.pi * hz * t)
    return bytes(wave.astype("<i2").tobytes())


class CallerEcho(FrameProcessor):
    """Echo caller audio; act on DTMF as the module docstring says."""

    def __init__(self, conn: Connection, out_rate: int, transfer: tuple[str, str] | None) -> None:
        super().__init__(name="caller-echo")
        self._conn = conn
        self._out_rate = out_rate
        self._transfer = transfer  # (key, target)
        self._marks = 0
        self._interrupt_task: asyncio.Task[None] | None = None

    async def cleanup(self) -> None:
        await super().cleanup()  # type: ignore[no-untyped-call, unused-ignore]
        if self._interrupt_task is not None:
            await self.cancel_task(self._interrupt_task)
            self._interrupt_task = None

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if isinstance(frame, InputAudioRawFrame):
            self._conn.audio_frames_in += 1
            self._conn.audio_bytes_in += len(frame.audio)
            echo = OutputAudioRawFrame(
                audio=frame.audio, sample_rate=frame.sample_rate, num_channels=frame.num_channels
            )
            self._conn.audio_frames_echoed += 1
            await self.push_frame(echo)
        elif isinstance(frame, InputDTMFFrame):
            digit = str(frame.button.value)
            self._conn.event("dtmf", digit=digit)
            await self._on_digit(digit)
        else:
            await self.push_frame(frame, direction)

    async def _play(self, seconds: float, hz: float) -> None:
        self._conn.event("tone", seconds=seconds, hz=hz, sample_rate=self._out_rate)
        audio = tone(seconds, hz, self._out_rate)
        await self.push_frame(
            OutputAudioRawFrame(audio=audio, sample_rate=self._out_rate, num_channels=1)
        )

    async def _on_digit(self, digit: str) -> None:
        if self._transfer is not None and digit == self._transfer[0]:
            target = self._transfer[1]
            message: dict[str, Any]
            if self._conn.protocol == "twilio":
                message = {"event": "transfer", "streamSid": self._conn.stream_sid,
                           "transfer": {"target": target}}
            else:
                message = {"action": "transfer", "target": target}
            self._conn.event("transfer_asked", target=target)
            await self.push_frame(OutputTransportMessageFrame(message=message))
        elif digit == "1":
            await self._play(MARK_TONE_S, MARK_TONE_HZ)
            self._marks += 1
            name = f"m{self._marks}"
            if self._conn.protocol == "twilio":
                sid = self._conn.stream_sid
                message = {"event": "mark", "streamSid": sid, "mark": {"name": name}}
            else:
                message = {"action": "notify", "payload": {"name": name}}
            self._conn.event("mark_queued", name=name)
            await self.push_frame(OutputTransportMessageFrame(message=message))
        elif digit == "#":
            await self._play(CLEAR_TONE_S, CLEAR_TONE_HZ)
            if self._interrupt_task is not None:
                await self.cancel_task(self._interrupt_task)
            self._interrupt_task = self.create_task(self._interrupt_later(), name="interrupt-later")
        elif digit == "*":
            self._conn.event("hangup", how="end")
            await self.push_frame(EndWorkerFrame(reason="dtmf *"), FrameDirection.UPSTREAM)
        elif digit == "0":
            self._conn.event("hangup", how="cancel")
            await self.push_frame(CancelWorkerFrame(reason="dtmf 0"), FrameDirection.UPSTREAM)

    async def _interrupt_later(self) -> None:
        await asyncio.sleep(CLEAR_AFTER_S)
        self._conn.event("interrupt")
        await self.broadcast_interruption()  # type: ignore[no-untyped-call, unused-ignore]


class _RecordingSocket:
    """The WebSocket as ``parse_telephony_websocket`` sees it, keeping the texts it read."""

    def __init__(self, websocket: WebSocket) -> None:
        self._websocket = websocket
        self.texts: list[str] = []

    async def iter_text(self) -> AsyncIterator[str]:
        async for text in self._websocket.iter_text():
            self.texts.append(text)
            yield text


@dataclass
class BotConfig:
    protocol: str
    sample_rate: int
    log: EventLog
    transfer: tuple[str, str] | None = None
    """``--transfer-key`` and ``--transfer-target``, when given."""
    server: uvicorn.Server | None = None

    def shutting_down(self) -> bool:
        """uvicorn got SIGTERM/SIGINT: it closes every WebSocket with 1012."""
        return self.server is not None and self.server.should_exit


async def twilio_serializer(websocket: WebSocket, conn: Connection) -> FrameSerializer | None:
    """Read the Twilio handshake the way Pipecat's examples do; None when it is not one."""
    recorder = _RecordingSocket(websocket)
    try:
        transport_type, call_data = await parse_telephony_websocket(cast("WebSocket", recorder))
    except Exception as e:
        conn.event("handshake_failed", error=f"{type(e).__name__}: {e}")
        return None
    start: dict[str, Any] = {}
    for text in recorder.texts:
        conn.raw(text)
        message = _json_object(text)
        if message is not None and message.get("event") == "start":
            start = _sub(message, "start")
    conn.event(
        "start",
        detected=transport_type,
        stream_sid=call_data.stream_id,
        call_sid=call_data.call_id,
        account_sid=start.get("accountSid"),
        tracks=start.get("tracks"),
        media_format=start.get("mediaFormat"),
        custom_parameters=call_data.body,
    )
    if transport_type != "twilio" or not call_data.stream_id:
        conn.event("handshake_failed", error=f"not a Twilio handshake ({transport_type})")
        return None
    conn.stream_sid = call_data.stream_id
    return LoggingTwilioSerializer(conn, call_data.stream_id, call_data.call_id)


async def run_connection(websocket: WebSocket, conn: Connection, config: BotConfig) -> None:
    """Run one pipeline on an accepted WebSocket until it ends."""
    serializer: FrameSerializer | None
    if config.protocol == "twilio":
        rate = TWILIO_RATE
        serializer = await twilio_serializer(websocket, conn)
        if serializer is None:
            await websocket.close(code=1008)
            conn.event("closed", by="bot", code=1008)
            return
        packet_size = None
    else:
        rate = config.sample_rate
        serializer = LoggingVonageSerializer(conn, rate)
        packet_size = rate * 2 * VONAGE_PACKET_MS // 1000

    transport = FastAPIWebsocketTransport(
        websocket=websocket,
        params=FastAPIWebsocketParams(
            audio_in_enabled=True,
            audio_out_enabled=True,
            add_wav_header=False,
            serializer=serializer,
            fixed_audio_packet_size=packet_size,
            allowed_origins=[],
        ),
    )
    echo = CallerEcho(conn, rate, config.transfer)
    pipeline = Pipeline([transport.input(), echo, transport.output()])
    worker = PipelineWorker(
        pipeline,
        params=PipelineParams(audio_in_sample_rate=rate, audio_out_sample_rate=rate),
        enable_rtvi=False,
        enable_turn_tracking=False,
        idle_timeout_secs=None,
    )
    peer_left = False

    @transport.event_handler("on_client_connected")
    async def on_client_connected(_transport: Any, _websocket: Any) -> None:
        conn.event("pipeline_started")

    @transport.event_handler("on_client_disconnected")
    async def on_client_disconnected(_transport: Any, _websocket: Any) -> None:
        nonlocal peer_left
        peer_left = True
        conn.event("peer_disconnected")
        await worker.cancel()

    runner = WorkerRunner(handle_sigint=False)
    await runner.add_workers(worker)
    try:
        await runner.run()
    finally:
        conn.event(
            "summary",
            audio_frames_in=conn.audio_frames_in,
            audio_bytes_in=conn.audio_bytes_in,
            audio_frames_echoed=conn.audio_frames_echoed,
            raw_counts=dict(conn.raw_counts),
        )
        by = "peer" if peer_left else "bot"
        conn.event("closed", by="shutdown" if config.shutting_down() else by)


def build_app(config: BotConfig) -> FastAPI:
    app = FastAPI()
    numbers = iter(range(1, 1 << 30))

    @app.websocket(WS_PATH)
    async def stream(websocket: WebSocket) -> None:
        conn = Connection(next(numbers), config.log, config.protocol)
        await websocket.accept()
        client = websocket.client
        conn.event(
            "accepted",
            protocol=config.protocol,
            peer=f"{client.host}:{client.port}" if client else None,
            query=dict(websocket.query_params),
        )
        try:
            await run_connection(websocket, conn, config)
        except Exception as e:
            conn.event("error", error=f"{type(e).__name__}: {e}")
            raise

    return app


async def serve(host: str, port: int, config: BotConfig) -> None:
    server = uvicorn.Server(
        uvicorn.Config(
            build_app(config),
            host=host,
            port=port,
            ws="websockets-sansio",
            lifespan="off",
            log_level="warning",
            timeout_graceful_shutdown=3,
        )
    )
    config.server = server
    serving = asyncio.create_task(server.serve())
    while not server.started:
        if serving.done():
            await serving
            raise SystemExit("uvicorn stopped before listening")
        await asyncio.sleep(0.02)
    bound = server.servers[0].sockets[0].getsockname()[1]
    config.log.write("listening", port=bound, protocol=config.protocol)
    print(f"ready port={bound}", flush=True)
    await serving
    config.log.write("stopped")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--protocol", choices=["twilio", "vonage"], required=True)
    parser.add_argument(
        "--sample-rate", type=int, choices=[8000, 16000], default=16000, help="vonage only"
    )
    parser.add_argument("--events", type=Path, help="JSON-lines event log (default stdout)")
    parser.add_argument("--log-level", default="INFO", help="Pipecat (loguru) level on stderr")
    parser.add_argument("--transfer-key", help="DTMF key that asks voxgate for a transfer")
    parser.add_argument("--transfer-target", help="the SIP URI of that transfer")
    args = parser.parse_args(argv)

    logger.remove()
    logger.add(sys.stderr, level=args.log_level.upper())
    transfer = (args.transfer_key, args.transfer_target) if args.transfer_key else None
    config = BotConfig(args.protocol, args.sample_rate, EventLog(args.events), transfer)
    asyncio.run(serve(args.host, args.port, config))


if __name__ == "__main__":
    main()
