"""The fuzz targets: one function of one input's bytes per parser of untrusted input.

A target returns normally for every input, well-formed or not: it catches
the error type its parser documents (``RemoteProtocolError`` and its
subclasses ``BadMessage``, ``BadPacket``, ``ControlProtocolError``,
``MediaStreamError``, ``UntrustedJSONError``, ``BotWireError``) and feeds
what parsed to the code right behind the parser. A crash is any exception that leaves a target,
including ``AssertionError`` from the invariants a target checks. Targets
import neither atheris nor trio, so pytest runs them on the seed corpus
(``tests/test_fuzz_targets.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fuzz.targets import messages, rtp, sip

CORPUS_DIR = Path(__file__).resolve().parent.parent / "corpus"
"""``fuzz/corpus``: one directory of seed files per target, checked in."""

DEFAULT_MAX_LEN_BYTES = 4096
"""libFuzzer's ``-max_len`` for targets that do not need longer inputs."""


@dataclass(frozen=True, slots=True)
class Target:
    """A fuzz target: ``run`` takes one input; ``max_len_bytes`` bounds generated inputs."""

    name: str
    run: Callable[[bytes], None]
    about: str
    max_len_bytes: int = DEFAULT_MAX_LEN_BYTES

    @property
    def corpus_dir(self) -> Path:
        """``fuzz/corpus/<name>``: the target's seed files."""
        return CORPUS_DIR / self.name


TARGETS: dict[str, Target] = {
    target.name: target
    for target in (
        Target("sip_message", sip.sip_message,
               "sip.parser / sip.message: datagram -> message, answers built from it"),
        Target("sip_uri", sip.sip_uri, "sip.uri.parse_uri_untrusted"),
        Target("sip_headers", sip.sip_headers,
               "sip.headers: Via, name-addr, CSeq, lists and tokens, re-parsed after serialize"),
        Target("sip_uas", sip.sip_uas,
               "sip.uas.UasCore: datagrams -> transactions, dialogs, SDP answer, timers",
               max_len_bytes=16384),
        Target("sip_stream", sip.sip_stream,
               "sip.framing.StreamFramer -> TCP UasCore: reads -> messages, 400/413, timers",
               max_len_bytes=16384),
        Target("sdp", sip.sdp, "sip.sdp: parse, negotiate, build_answer, answer re-parsed"),
        Target("rtp_packet", rtp.rtp_packet,
               "rtp.packet + rtp.dtmf payload: parse, RTCP test, round trip"),
        Target("rtp_pipeline", rtp.rtp_pipeline,
               "rtp.stream -> jitter buffer -> DTMF / G.711 -> VAD -> Pipeline.step (echo)",
               max_len_bytes=16384),
        Target("control", messages.control,
               "control.protocol: ControlConnection lines -> requests -> replies"),
        Target("media_stream", messages.media_stream,
               "transports.media_stream: media-server messages through MediaStream"),
        Target("media_stream_bot", messages.media_stream_bot,
               "transports.media_stream: voxgate-direction messages (what a bot reads)"),
        Target("vonage_bot", messages.vonage_bot,
               "agents.bot_wire.VonageWire: a Vonage bot's messages at 8 and 16 kHz"),
        Target("webhook_reply", messages.webhook_reply,
               "agents.webhook.parse_reply_untrusted -> Dialogue.follow"),
        Target("json", messages.json_value, "jsonbounds.loads_untrusted"),
    )
}
"""Every target by name, in the order ``fuzz.run`` runs them."""
