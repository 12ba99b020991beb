"""The stream agent's wire protocols towards a bot server; sans-IO.

voxgate plays the media server's part and the bot is the WebSocket server,
so a bot written for a cloud media-streams gateway works unchanged:

- ``twilio`` (:class:`TwilioWire`): the Twilio Media Streams message set as
  Twilio sends it to a bot ("Media Streams - WebSocket Messages"):
  ``connected``, ``start`` (``mediaFormat`` audio/x-mulaw 8000 mono,
  ``customParameters``), ``media`` every 20 ms with ``sequenceNumber``,
  ``chunk``, ``timestamp`` and ``track``, ``dtmf``, ``mark`` and ``stop``; the
  bot sends ``media`` (µ-law in chunks of any length), ``mark`` and ``clear``.
  The layouts are :mod:`voxgate.transports.media_stream`'s.
- ``vonage`` (:class:`VonageWire`): the Vonage Voice API WebSocket audio
  connector as Vonage sends it to a bot (Vonage Voice API guide
  "WebSockets": first message, binary audio messages, DTMF events, writing
  audio, ``clear`` and ``notify``). One text message
  ``{"event": "websocket:connected", "content-type": "audio/l16;rate=R"}``
  opens the stream, with the call's metadata (:meth:`CallMeta.parameters`) as
  extra top-level string fields, as Vonage sends the NCCO's ``headers``; then
  binary messages of 20 ms of 16-bit little-endian PCM at R = 8000 or 16000
  (``[[agent.providers]] sample_rate_hz``: 320 or 640 bytes) and key presses
  as ``{"event": "websocket:dtmf", "digit": "5", "duration": 100}``. The bot
  sends binary PCM at R of any length, ``{"action": "clear"}`` and
  ``{"action": "notify", "payload": {...}}``, answered once the audio before
  it has played with ``{"event": "websocket:notify", "payload": {...}}``.
  Nothing closes the stream but the socket's close.

Transfer to a human (voxgate's extension of both): the bot sends ``twilio``
``{"event": "transfer", "streamSid": S, "transfer": {"target": "sip:…"}}`` or
``vonage`` ``{"action": "transfer", "target": "sip:…"}`` (:class:`BotTransfer`);
a failed transfer is answered ``{"event": "transfer_failed", "streamSid": S,
"transfer": {"target", "status", "reason"}}`` or ``{"event":
"websocket:transfer_failed", "target", "status", "reason"}``
(:class:`~voxgate.agents.transfer.TransferFailure`).

Inside voxgate audio is 20 ms frames of 8 kHz PCM16
(:mod:`voxgate.pipeline.frames`); a wire converts from and to its own
format. Every method that reads the bot's bytes raises :class:`BotWireError`
and nothing else.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final, Protocol

import numpy as np
import numpy.typing as npt
import soxr

from voxgate.agents.transfer import MAX_TARGET_CHARS, TransferFailure
from voxgate.codec.g711 import PCMU
from voxgate.errors import RemoteProtocolError
from voxgate.jsonbounds import UntrustedJSONError, loads_untrusted
from voxgate.pipeline.frames import FRAME_MS, RATE_HZ, SAMPLE_WIDTH_BYTES
from voxgate.transports import media_stream as ms

INBOUND_TRACK: Final = "inbound"
DTMF_TRACK: Final = "inbound_track"
VONAGE_RATES_HZ: Final = (8000, 16000)
"""The rates of Vonage's ``audio/l16`` (its WebSockets guide allows no other)."""
VONAGE_MAX_DEPTH: Final = 8
"""Most arrays/objects nested in a Vonage message from the bot (the ``notify``
payload gets seven levels)."""
MAX_NOTIFY_PAYLOAD_BYTES: Final = 1024
"""Largest ``notify`` payload, in UTF-8 bytes of its compact JSON (the
:attr:`BotMark.name` it becomes is kept until the audio before it has played)."""
DTMF_DURATION_MS: Final = 100
"""The ``duration`` of a Vonage ``websocket:dtmf``: the wire is given the digit
only, so a nominal press length (Vonage: fixed on most digital phone systems)."""
RESAMPLE_QUALITY: Final = "HQ"
"""libsoxr's quality recipe for 8 <-> 16 kHz (python-soxr's default). Its
streaming resampler works in blocks of about 100 ms, the delay a 16 kHz
connection adds: the caller's audio reaches the bot 120 ms later than at
8 kHz, the bot's audio the playout 13 to 135 ms later (74 on average)."""


class BotWireError(RemoteProtocolError):
    """The bot sent something its protocol does not allow (the message is dropped)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason, status_hint=None)


@dataclass(frozen=True, slots=True)
class BotAudio:
    """Agent audio: 8 kHz PCM16 mono of any whole number of samples."""

    pcm: bytes


@dataclass(frozen=True, slots=True)
class BotMark:
    """Report ``name`` back once the audio sent before it has played."""

    name: str


@dataclass(frozen=True, slots=True)
class BotClear:
    """Drop the agent audio not played yet (the bot's barge-in)."""


@dataclass(frozen=True, slots=True)
class BotTransfer:
    """Blind-transfer the caller to ``target`` (checked by the session, not here)."""

    target: str


BotEvent = BotAudio | BotMark | BotClear | BotTransfer


@dataclass(frozen=True, slots=True)
class CallMeta:
    """What the bot is told of the call in its opening messages."""

    call_id: str
    session_id: str
    tenant: str
    transport: str
    from_uri: str
    to_uri: str
    resumed: bool = False

    def parameters(self) -> dict[str, str]:
        """The ``customParameters`` (strings only, Twilio's way)."""
        params = {"from": self.from_uri, "to": self.to_uri, "tenant": self.tenant,
                  "transport": self.transport, "session_id": self.session_id,
                  "call_id": self.call_id}
        if self.resumed:
            params["resumed"] = "true"
        return {k: v[:ms.MAX_ID_CHARS] for k, v in params.items()}


class BotWire(Protocol):
    """One bot connection's protocol: messages are ``str`` (text) or ``bytes`` (binary)."""

    def opening(self) -> list[str | bytes]:
        """The messages that open the stream."""

    def media(self, pcm: bytes) -> str | bytes:
        """One 20 ms frame of caller audio (320 bytes of 8 kHz PCM16)."""

    def dtmf(self, digit: str) -> str | bytes | None:
        """A key press, or None where the protocol cannot carry it."""

    def mark(self, name: str) -> str | bytes | None:
        """The acknowledgement of a bot's mark, or None where there are no marks."""

    def closing(self) -> list[str | bytes]:
        """The messages that end the stream."""

    def transfer_failed(self, failure: TransferFailure) -> str | bytes:
        """The message telling the bot its transfer failed."""

    def receive_untrusted(self, data: str | bytes) -> BotEvent | None:
        """One message from the bot; None for one that needs no action.

        Raises:
            BotWireError: malformed, unknown or not allowed here.
        """


class WireFactory(Protocol):
    """How the stream agent makes a connection's wire: every wire class has this
    constructor, ``max_message_bytes`` bounding what it reads from the bot and
    ``sample_rate_hz`` the provider's ``sample_rate_hz``."""

    def __call__(self, meta: CallMeta, /, *, max_message_bytes: int,
                 sample_rate_hz: int) -> BotWire: ...


class TwilioWire:
    """The Twilio Media Streams message set, voxgate in Twilio's part."""

    __slots__ = ("_chunk", "_max_bytes", "_meta", "_sequence", "stream_sid")

    def __init__(self, meta: CallMeta, *, max_message_bytes: int,
                 sample_rate_hz: int = RATE_HZ) -> None:
        """``sample_rate_hz`` is ignored: Twilio's audio is always 8 kHz µ-law."""
        self._meta = meta
        self._max_bytes = max_message_bytes
        self.stream_sid = "MZ" + secrets.token_hex(16)
        self._sequence = 0
        self._chunk = 0

    def _next(self) -> int:
        self._sequence += 1
        return self._sequence

    def opening(self) -> list[str | bytes]:
        meta = self._meta
        start = ms.Start(stream_sid=self.stream_sid, call_sid=meta.call_id[:ms.MAX_ID_CHARS],
                         account_sid="AC" + "0" * 32, tracks=(INBOUND_TRACK,),
                         custom_parameters=meta.parameters())
        return [ms.serialize(ms.Connected()),
                ms.serialize(start, sequence_number=self._next())]

    def media(self, pcm: bytes) -> str:
        self._chunk += 1
        event = ms.Media(self.stream_sid, PCMU.encode(pcm), INBOUND_TRACK, self._chunk,
                         (self._chunk - 1) * FRAME_MS)
        return ms.serialize(event, sequence_number=self._next())

    def dtmf(self, digit: str) -> str:
        return ms.serialize(ms.Dtmf(self.stream_sid, digit, DTMF_TRACK),
                            sequence_number=self._next())

    def mark(self, name: str) -> str:
        return ms.serialize(ms.Mark(self.stream_sid, name), sequence_number=self._next())

    def closing(self) -> list[str | bytes]:
        meta = self._meta
        return [ms.serialize(ms.Stop(self.stream_sid, "AC" + "0" * 32, meta.call_id),
                             sequence_number=self._next())]

    def receive_untrusted(self, data: str | bytes) -> BotEvent | None:
        try:
            event = ms.parse_message_untrusted(data, ms.FROM_BOT, max_bytes=self._max_bytes)
        except ms.MediaStreamError as e:
            raise BotWireError(str(e)) from None
        if isinstance(event, ms.Media):
            return BotAudio(PCMU.decode(event.payload))
        if isinstance(event, ms.Mark):
            return BotMark(event.name)
        if isinstance(event, ms.Transfer):
            return BotTransfer(event.target)
        return BotClear()

    def transfer_failed(self, failure: TransferFailure) -> str:
        event = ms.TransferFailed(self.stream_sid, failure.target, failure.status,
                                  failure.reason)
        return ms.serialize(event, sequence_number=self._next())


def _compact_json(value: object) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


class _Resampler:
    """A stream of PCM16LE mono from ``in_hz`` to ``out_hz`` (python-soxr's
    ``ResampleStream``, int16), fed in pieces of any whole number of samples."""

    __slots__ = ("_stream",)

    def __init__(self, in_hz: int, out_hz: int) -> None:
        self._stream = soxr.ResampleStream(in_hz, out_hz, 1, dtype="int16",
                                           quality=RESAMPLE_QUALITY)

    def convert(self, pcm: bytes) -> bytes:
        """The output ``pcm`` makes ready: none while a block fills, then a block."""
        samples = np.frombuffer(pcm, dtype="<i2").astype(np.int16)
        out: npt.NDArray[np.int16] = self._stream.resample_chunk(samples)
        return out.astype("<i2").tobytes()

    def reset(self) -> None:
        """Drop what is held inside: the next input starts a new stream."""
        self._stream.clear()


class VonageWire:
    """The Vonage Voice API WebSocket audio connector, voxgate in Vonage's part.

    At 16 kHz each direction has its own streaming resampler: the caller's
    frames go out as 640-byte messages (silence until the resampler's first
    block is out, then 20 ms behind it, so none runs short), and the bot's
    audio comes in as soon as a block is out; up to one block of the bot's
    latest audio waits inside until more follows (a ``notify`` is answered
    when what came out before it has played). ``clear`` drops that too.

    :attr:`BotMark.name` is the ``notify`` payload as compact JSON (an object
    of at most :data:`MAX_NOTIFY_PAYLOAD_BYTES`), decoded again for the answer.
    """

    __slots__ = ("_caller", "_caller_started", "_from_bot", "_max_bytes", "_message_bytes",
                 "_meta", "_odd", "_to_bot", "sample_rate_hz")

    def __init__(self, meta: CallMeta, *, max_message_bytes: int,
                 sample_rate_hz: int = RATE_HZ) -> None:
        """``sample_rate_hz``: the rate of the audio on the wire, the provider's.

        Raises:
            ValueError: ``sample_rate_hz`` is not one of :data:`VONAGE_RATES_HZ`.
        """
        if sample_rate_hz not in VONAGE_RATES_HZ:
            raise ValueError(f"Vonage audio is 8000 or 16000 Hz, not {sample_rate_hz}")
        self._meta = meta
        self._max_bytes = max_message_bytes
        self.sample_rate_hz = sample_rate_hz
        self._message_bytes = sample_rate_hz * FRAME_MS // 1000 * SAMPLE_WIDTH_BYTES
        resample = sample_rate_hz != RATE_HZ
        self._to_bot = _Resampler(RATE_HZ, sample_rate_hz) if resample else None
        self._from_bot = _Resampler(sample_rate_hz, RATE_HZ) if resample else None
        self._caller = bytearray()  # resampled caller audio not sent yet
        self._caller_started = False  # the resampler's first block is out
        self._odd = b""  # the bot's audio short of a whole sample

    def opening(self) -> list[str | bytes]:
        """``websocket:connected`` with the content-type and the call's parameters."""
        return [_compact_json({"event": "websocket:connected",
                               "content-type": f"audio/l16;rate={self.sample_rate_hz}",
                               **self._meta.parameters()})]

    def media(self, pcm: bytes) -> bytes:
        """One binary message of 20 ms at :attr:`sample_rate_hz` (320 or 640 bytes)."""
        if self._to_bot is None:
            return pcm
        out = self._to_bot.convert(pcm)
        if out and not self._caller_started:
            # The first block: one message of silence ahead of it keeps the
            # blocks to come ahead of the messages they fill.
            self._caller_started = True
            self._caller += bytes(self._message_bytes)
        self._caller += out
        message = bytes(self._caller[:self._message_bytes]).ljust(self._message_bytes, b"\0")
        del self._caller[:self._message_bytes]
        return message

    def dtmf(self, digit: str) -> str:
        """``websocket:dtmf`` with a nominal :data:`DTMF_DURATION_MS`."""
        return _compact_json({"event": "websocket:dtmf", "digit": digit,
                              "duration": DTMF_DURATION_MS})

    def mark(self, name: str) -> str | None:
        """``websocket:notify`` with the payload ``name`` holds; None for a name
        that holds none (a Twilio mark from before a failover to this bot)."""
        try:
            payload = json.loads(name)
        except ValueError:
            return None
        if not isinstance(payload, dict):
            return None
        return _compact_json({"event": "websocket:notify", "payload": payload})

    def closing(self) -> list[str | bytes]:
        """Nothing: Vonage has no closing message, the socket's close ends the stream."""
        return []

    def transfer_failed(self, failure: TransferFailure) -> str:
        """``websocket:transfer_failed`` with the target, status and reason."""
        return _compact_json({"event": "websocket:transfer_failed", "target": failure.target,
                              "status": failure.status, "reason": failure.reason})

    def receive_untrusted(self, data: str | bytes) -> BotEvent | None:
        """Binary: audio (None while no whole 8 kHz sample is out); text:
        ``clear``, ``notify`` or ``transfer``.

        Raises:
            BotWireError: over ``max_message_bytes``; text that is not a JSON
                object (bounded: :func:`~voxgate.jsonbounds.loads_untrusted`,
                :data:`VONAGE_MAX_DEPTH` deep); an unknown ``action``; a
                ``notify`` whose payload is not an object of at most
                :data:`MAX_NOTIFY_PAYLOAD_BYTES`; a ``transfer`` whose
                ``target`` is not a string of at most
                :data:`~voxgate.agents.transfer.MAX_TARGET_CHARS`.
        """
        if isinstance(data, bytes):
            return self._audio(data)
        try:
            msg = loads_untrusted(data, max_bytes=self._max_bytes, max_depth=VONAGE_MAX_DEPTH)
        except UntrustedJSONError as e:
            raise BotWireError(f"message is not valid JSON: {e.reason}") from None
        if not isinstance(msg, dict):
            raise BotWireError("message is not a JSON object")
        action = msg.get("action")
        if action == "clear":
            self._odd = b""
            if self._from_bot is not None:
                self._from_bot.reset()
            return BotClear()
        if action == "notify":
            payload = msg.get("payload")
            if not isinstance(payload, dict):
                raise BotWireError("notify.payload missing or not an object")
            name = _compact_json(payload)
            if len(name.encode()) > MAX_NOTIFY_PAYLOAD_BYTES:
                raise BotWireError(f"notify.payload over {MAX_NOTIFY_PAYLOAD_BYTES} bytes")
            return BotMark(name)
        if action == "transfer":
            target = msg.get("target")
            if not isinstance(target, str) or len(target) > MAX_TARGET_CHARS:
                raise BotWireError(f"transfer.target missing, not a string or over "
                                   f"{MAX_TARGET_CHARS} characters")
            return BotTransfer(target)
        raise BotWireError(f"unknown action {str(action)[:40]!r}")

    def _audio(self, data: bytes) -> BotAudio | None:
        if len(data) > self._max_bytes:
            raise BotWireError(f"audio message of {len(data)} bytes, over {self._max_bytes}")
        pcm = self._odd + data
        whole = len(pcm) - len(pcm) % SAMPLE_WIDTH_BYTES
        self._odd = pcm[whole:]
        pcm = pcm[:whole]
        if self._from_bot is not None:
            pcm = self._from_bot.convert(pcm)
        return BotAudio(pcm) if pcm else None


WIRES: Final[Mapping[str, WireFactory]] = {"twilio": TwilioWire, "vonage": VonageWire}
"""The wire of each ``[[agent.providers]] protocol``."""
