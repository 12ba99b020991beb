"""A deliberately misbehaving Twilio Media Streams bot server, for voxgate's bad-bot tests.

Run with the bot virtualenv (``make bot-venv``; it has ``websockets``), never with voxgate's::

    .venv-bot/bin/python tests/bots/hostile_bot.py --port 0 --mode flood --events ev.jsonl

It is not an interoperability stand-in (that is ``tests/bots/pipecat_bot.py``): it is the
peer that breaks the protocol on purpose. It serves WebSocket connections on any path
(``websockets``' asyncio server, no compression, so sizes on the wire are the sizes
below). A connection first reads voxgate's ``connected`` and ``start``; its *mode* is
then the user part of ``customParameters.to`` when that names a mode (a call to
``sip:flood@…`` floods), else ``--mode``; a resumed connection (``customParameters.resumed
= "true"``) uses ``--resumed-mode`` instead (``echo`` by default: the bot behaves after a
reconnect). The modes:

* ``malformed``: ``--count`` messages that are not JSON (cut-off JSON text, then a
  binary message, alternating), 20 ms apart, then ``echo``;
* ``unknown``: ``--count`` well-formed JSON messages of events the protocol does not have,
  20 ms apart, then ``echo``;
* ``badmedia``: ``--count`` ``media`` messages whose payload is not base64, 20 ms apart,
  then ``echo``;
* ``oversize``: one valid ``media`` message of ``--max-message-bytes`` + 1024 bytes (the
  receiver's bound plus a margin), then ``echo`` (if the peer has not closed);
* ``flood``: ``--flood-count`` valid ``clear`` messages at once, with no pause (valid and
  without side effects beyond the first: whatever a receiver counts is the flood), then
  ``echo``;
* ``endless``: a tone as ``media`` faster than real time, without end: one message of
  ``--chunk-s`` seconds every ``--every-s`` seconds (defaults: 1 s every 0.1 s, ten seconds
  of audio per second), until the peer closes; caller audio is not echoed;
* ``echo``: every caller ``media`` payload is sent straight back (the well-behaved state
  the other modes end in, so a test can tell the call still works).

Everything a test checks goes to ``--events`` as JSON lines, each with ``event``,
``conn`` (connection number from 1) and ``t`` (Unix time): ``start`` (``mode``,
``resumed``, ``custom_parameters``), ``burst_done`` (``mode``, ``messages`` sent,
``bytes`` of the largest), ``closed`` (``code`` and ``reason`` of the close the peer sent or
that ended the connection, ``messages_in``, ``media_in``, ``messages_out``). Once listening
it prints ``ready port=N`` (the real port when ``--port 0``).
"""

# websockets is installed only in .venv-bot, so voxgate's mypy (in .venv) finds none of the
# bot's imports and sees them as Any. A full check against the real package:
#   .venv/bin/mypy --python-executable .venv-bot/bin/python --cache-dir /dev/null \
#       tests/bots/hostile_bot.py
# mypy: disable-error-code="import-not-found,misc"

from __future__ import annotations

import argparse
import asyncio
import base64
import itertools
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

MODES = ("malformed", "unknown", "badmedia", "oversize", "flood", "endless", "echo")
RATE_HZ = 8000
FRAME_S = 0.020
ULAW_SILENCE_FRAME = b"\xff" * 160
TONE_HZ = 440.0
TONE_AMPLITUDE = 0.25
OVERSIZE_MARGIN_BYTES = 1024
HANDSHAKE_TIMEOUT_S = 10.0


class EventLog:
    """JSON-lines event log, one object per line, flushed line by line."""

    def __init__(self, path: Path | None) -> None:
        self._out: TextIO = path.open("a", encoding="utf-8") if path else sys.stdout

    def write(self, event: str, conn: int, **fields: Any) -> None:
        record: dict[str, Any] = {"event": event, "conn": conn, "t": round(time.time(), 3)}
        record.update(fields)
        self._out.write(json.dumps(record, separators=(",", ":"), default=str) + "\n")
        self._out.flush()


def ulaw_encode_sample(sample: int) -> int:
    """One 16-bit linear sample to G.711 µ-law, as the classic reference encoder (Sun's
    ``g711.c``, which ``audioop`` follows) does it; the bot venv has no ``audioop``."""
    pcm = sample >> 2
    mask = 0x7F if pcm < 0 else 0xFF
    pcm = min(abs(pcm), 8159) + 0x21
    segment = max(0, pcm.bit_length() - 6)
    if segment > 7:
        return 0x7F ^ mask
    return ((segment << 4) | ((pcm >> (segment + 1)) & 0x0F)) ^ mask


def tone_ulaw(seconds: float) -> bytes:
    """``seconds`` of a :data:`TONE_HZ` sine as µ-law at 8 kHz (whole 20 ms frames)."""
    frames = max(1, round(seconds / FRAME_S))
    samples = frames * round(RATE_HZ * FRAME_S)
    return bytes(
        ulaw_encode_sample(round(TONE_AMPLITUDE * 32767 * math.sin(2 * math.pi * TONE_HZ * n
                                                                   / RATE_HZ)))
        for n in range(samples)
    )


@dataclass(frozen=True)
class Settings:
    """The command line: default modes and sizes."""

    mode: str
    resumed_mode: str
    count: int
    flood_count: int
    max_message_bytes: int
    chunk_s: float
    every_s: float
    log: EventLog


@dataclass
class Connection:
    """One accepted connection: its number, stream, and counters."""

    number: int
    ws: ServerConnection
    settings: Settings
    stream_sid: str = ""
    messages_in: int = 0
    media_in: int = 0
    messages_out: int = 0
    sequence: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    def event(self, event: str, **fields: Any) -> None:
        self.settings.log.write(event, self.number, **fields)

    def media(self, payload_b64: str) -> str:
        """A ``media`` message from the bot carrying ``payload_b64`` as its payload."""
        return json.dumps({"event": "media", "streamSid": self.stream_sid,
                           "sequenceNumber": str(next(self.sequence)),
                           "media": {"payload": payload_b64}}, separators=(",", ":"))

    async def send(self, message: str | bytes) -> None:
        await self.ws.send(message)
        self.messages_out += 1

    async def receive(self) -> dict[str, Any] | None:
        """The next message from voxgate as a JSON object (None for anything else)."""
        data = await self.ws.recv()
        self.messages_in += 1
        try:
            message = json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None
        if not isinstance(message, dict):
            return None
        if message.get("event") == "media":
            self.media_in += 1
        return message


def mode_of(params: dict[str, Any], settings: Settings) -> str:
    """This connection's mode (see the module docstring)."""
    if params.get("resumed") == "true":
        return settings.resumed_mode
    to = params.get("to")
    user = to.removeprefix("sip:").partition("@")[0] if isinstance(to, str) else ""
    return user if user in MODES else settings.mode


async def burst(conn: Connection, mode: str) -> None:
    """Send what ``mode`` sends before it echoes (nothing for ``echo``)."""
    settings = conn.settings
    count = settings.count
    pause_s = FRAME_S
    messages: list[str | bytes] = []
    if mode == "malformed":
        messages = [b"\x00\xffnot json" if i % 2 else '{"event":"media","media":{"payl'
                    for i in range(count)]
    elif mode == "unknown":
        messages = [json.dumps({"event": f"hostile-{i}", "streamSid": conn.stream_sid})
                    for i in range(count)]
    elif mode == "badmedia":
        messages = [conn.media("!!not*base64~~") for _ in range(count)]
    elif mode == "oversize":
        filler = OVERSIZE_MARGIN_BYTES + settings.max_message_bytes
        silence = ULAW_SILENCE_FRAME * (filler * 3 // 4 // len(ULAW_SILENCE_FRAME) + 1)
        messages = [conn.media(base64.b64encode(silence).decode())]
    elif mode == "flood":
        messages = [json.dumps({"event": "clear", "streamSid": conn.stream_sid})]
        messages *= settings.flood_count
        pause_s = 0.0  # a yield to the loop only
    if not messages:
        return
    for message in messages:
        await conn.send(message)
        await asyncio.sleep(pause_s)
    conn.event("burst_done", mode=mode, messages=len(messages),
               bytes=max(len(m) for m in messages))


async def endless(conn: Connection) -> None:
    """A tone faster than real time until the peer closes (ConnectionClosed ends it)."""
    settings = conn.settings
    chunk = conn.media(base64.b64encode(tone_ulaw(settings.chunk_s)).decode())
    conn.event("endless_started", chunk_s=settings.chunk_s, every_s=settings.every_s,
               bytes=len(chunk))
    loop = asyncio.get_running_loop()
    next_at = loop.time()
    while True:
        await conn.send(chunk)
        next_at += settings.every_s
        await asyncio.sleep(max(0.0, next_at - loop.time()))


async def echo(conn: Connection) -> None:
    """Send every caller ``media`` payload back until the peer closes."""
    while True:
        message = await conn.receive()
        if message is None or message.get("event") != "media":
            continue
        media = message.get("media")
        payload = media.get("payload") if isinstance(media, dict) else None
        if isinstance(payload, str):
            await conn.send(conn.media(payload))


async def drain(conn: Connection) -> None:
    """Read (and count) what voxgate sends, so its close is seen."""
    while True:
        await conn.receive()


async def handshake(conn: Connection) -> dict[str, Any]:
    """Read up to ``start``; returns its ``customParameters``."""
    async with asyncio.timeout(HANDSHAKE_TIMEOUT_S):
        while True:
            message = await conn.receive()
            if message is not None and message.get("event") == "start":
                start = message.get("start")
                start = start if isinstance(start, dict) else {}
                conn.stream_sid = str(message.get("streamSid", ""))
                params = start.get("customParameters")
                return params if isinstance(params, dict) else {}


async def serve_connection(conn: Connection) -> None:
    """Handshake, the mode's misbehaviour, then echo (or endless audio) until closed."""
    code: int | None = None
    reason = ""
    try:
        params = await handshake(conn)
        mode = mode_of(params, conn.settings)
        conn.event("start", mode=mode, resumed=params.get("resumed") == "true",
                   custom_parameters=params)
        if mode == "endless":
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(drain(conn))
                tasks.create_task(endless(conn))
        else:
            await burst(conn, mode)
            await echo(conn)
    except* ConnectionClosed as group:
        closed = group.exceptions[0]
        assert isinstance(closed, ConnectionClosed)
        frame = closed.rcvd or closed.sent
        if frame is not None:
            code, reason = frame.code, frame.reason
    except* TimeoutError:
        reason = "no start"
    conn.event("closed", code=code, reason=reason, messages_in=conn.messages_in,
               media_in=conn.media_in, messages_out=conn.messages_out)


async def main_async(host: str, port: int, settings: Settings) -> None:
    numbers = itertools.count(1)

    async def handler(ws: ServerConnection) -> None:
        await serve_connection(Connection(next(numbers), ws, settings))

    # max_size: the bot reads voxgate's messages whatever their size; no compression.
    async with serve(handler, host, port, compression=None, max_size=None,
                     ping_interval=None) as server:
        bound = next(iter(server.sockets)).getsockname()[1]
        print(f"ready port={bound}", flush=True)
        await server.serve_forever()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--mode", choices=MODES, default="echo",
                        help="when the call's 'to' user names no mode")
    parser.add_argument("--resumed-mode", choices=MODES, default="echo",
                        help="for resumed connections (after voxgate reconnected)")
    parser.add_argument("--count", type=int, default=20,
                        help="messages per malformed/unknown/badmedia burst")
    parser.add_argument("--flood-count", type=int, default=1000,
                        help="messages the flood sends at once")
    parser.add_argument("--max-message-bytes", type=int, default=65_536,
                        help="voxgate's [agent.stream] max_message_bytes (oversize exceeds it)")
    parser.add_argument("--chunk-s", type=float, default=1.0, help="endless: seconds per message")
    parser.add_argument("--every-s", type=float, default=0.1, help="endless: message interval")
    parser.add_argument("--events", type=Path, help="JSON-lines event log (default stdout)")
    args = parser.parse_args(argv)
    settings = Settings(args.mode, args.resumed_mode, args.count, args.flood_count,
                        args.max_message_bytes,
                        args.chunk_s, args.every_s, EventLog(args.events))
    asyncio.run(main_async(args.host, args.port, settings))


if __name__ == "__main__":
    main()
