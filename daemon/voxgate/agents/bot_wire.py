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

Inside voxgate audio is 20 ms frames of 8 kHz PCM16
(:mod:`voxgate.pipeline.frames`); a wire converts from and to its own
format. Every method that reads the bot's bytes raises :class:`BotWireError`
and nothing else.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final, Protocol

from voxgate.codec.g711 import PCMU
from voxgate.errors import RemoteProtocolError
from voxgate.pipeline.frames import FRAME_MS
from voxgate.transports import media_stream as ms

INBOUND_TRACK: Final = "inbound"
DTMF_TRACK: Final = "inbound_track"


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


BotEvent = BotAudio | BotMark | BotClear


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

    def receive_untrusted(self, data: str | bytes) -> BotEvent | None:
        """One message from the bot; None for one that needs no action.

        Raises:
            BotWireError: malformed, unknown or not allowed here.
        """


class TwilioWire:
    """The Twilio Media Streams message set, voxgate in Twilio's part."""

    __slots__ = ("_chunk", "_max_bytes", "_meta", "_sequence", "stream_sid")

    def __init__(self, meta: CallMeta, *, max_message_bytes: int) -> None:
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
        return BotClear()


WIRES: Final[Mapping[str, type[TwilioWire]]] = {"twilio": TwilioWire}
