"""Rebuild the seed corpus: ``python -m fuzz.seeds`` rewrites ``fuzz/corpus/<target>/``.

Seeds are real inputs: the RFC 4475 torture messages
(``../shared/conformance/rfc4475``), SIP calls built by the tests' scripted
UAC, the SDP offers of real phones and PBXes from ``tests/sip/test_sdp.py``,
RTP packets and media streams built with voxgate's own serializers, Twilio's
messages from ``tests/transports/test_media_stream.py`` and control lines
from ``voxgate.control.protocol.encode_request``. Kept small (about 100 KB).
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Iterable
from pathlib import Path

from tests.sip.fakelink import SDP_OFFER, FakeLink, to_tag_of
from tests.sip.test_sdp import (
    ASTERISK_OFFER,
    BARESIP_OFFER,
    FREESWITCH_OFFER,
    SIPP_OFFER,
    SRTP_OFFER,
)
from tests.transports.test_media_stream import SID, TWILIO_MEDIA, TWILIO_START

from fuzz.targets import CORPUS_DIR, TARGETS, sip
from fuzz.targets.framing import RECORD_SEPARATOR, DatagramRecord, join_datagrams
from voxgate.codec.g711 import PCMU
from voxgate.control.protocol import encode_request
from voxgate.rtp.packet import RtpPacket
from voxgate.sip.message import Request
from voxgate.sip.parser import BadMessage, parse_message_untrusted
from voxgate.sip.uas import IncomingCall
from voxgate.transports import media_stream as ms

RFC4475_DIR = CORPUS_DIR.parents[2] / "shared" / "conformance" / "rfc4475"
"""The RFC 4475 messages (``../shared/conformance/rfc4475`` from the repository)."""

Seeds = dict[str, bytes]

# Header name -> sip_headers kind byte (see fuzz.targets.sip.sip_headers).
_HEADER_KINDS = {"Via": 0, "From": 1, "To": 1, "Contact": 1, "Route": 1, "Record-Route": 1,
                 "CSeq": 2, "Supported": 3, "Require": 3, "Allow": 3, "Max-Forwards": 4,
                 "Expires": 4, "Content-Length": 4}
_EXTRA_URIS = ("sip:agent@127.0.0.1:5060",
               "sips:alice@[2001:db8::1]:5061;transport=tls?subject=x",
               "sip:%61lice@example.com;lr",
               "sip:+15551234567;phone-context=x@192.0.2.1;user=phone",
               "tel:+15551234567", "sip:[::1]")


def _records(*messages: bytes) -> bytes:
    return RECORD_SEPARATOR.join(messages)


def rfc4475() -> Seeds:
    """Every RFC 4475 torture message, by file name."""
    return {f"rfc4475-{path.stem}": path.read_bytes() for path in sorted(RFC4475_DIR.glob("*.dat"))}


def call_flows() -> Seeds:
    """Whole calls from the scripted UAC, against the core :func:`sip.sip_uas` builds."""
    flows: Seeds = {}
    for name in ("invite-ack-bye", "invite-cancel", "invite-ack-reinvite-ack"):
        link = FakeLink(core=sip.new_uas_core())
        invite = link.uac.invite()
        link.send(invite)
        (event,) = link.take_events()
        assert isinstance(event, IncomingCall), event
        link.core.accept(event.call_key, SDP_OFFER, link.clock.now)
        link.pump()
        ok = link.responses[-1]
        ack = link.uac.ack_for(invite, ok)
        if name == "invite-cancel":
            flows[name] = _records(invite.serialize(), link.uac.cancel_for(invite).serialize())
        elif name == "invite-ack-bye":
            bye = link.uac.request("BYE", to_tag=to_tag_of(ok))
            flows[name] = _records(invite.serialize(), ack.serialize(), bye.serialize())
        else:
            reinvite = link.uac.request("INVITE", to_tag=to_tag_of(ok), body=BARESIP_OFFER)
            flows[name] = _records(invite.serialize(), ack.serialize(), reinvite.serialize(),
                                   link.uac.request("ACK", to_tag=to_tag_of(ok)).serialize())
    uac = FakeLink().uac
    flows["options"] = uac.request("OPTIONS").serialize()
    flows["invite-no-common-codec"] = uac.invite(body=FREESWITCH_OFFER.replace(
        b"RTP/AVP 0 8 102 13 118", b"RTP/AVP 102 13 118")).serialize()
    return flows


def stream_reads(flows: Seeds) -> Seeds:
    """One TCP connection's reads: the call flows cut every 97 bytes, keep-alives
    (RFC 5626), and framing errors (no, a huge Content-Length)."""
    reads: Seeds = {}
    for name, data in flows.items():
        stream = b"".join(data.split(RECORD_SEPARATOR))
        reads[f"{name}-chunks"] = _records(*(stream[i:i + 97] for i in range(0, len(stream), 97)))
    options = FakeLink().uac.request("OPTIONS").serialize()
    head = options.split(b"Content-Length")[0]
    reads["pings-then-options"] = _records(b"\r\n\r\n", b"\r\n\r\n\r\n" + options, b"\r\n")
    reads["no-content-length"] = head + b"\r\n"
    reads["huge-content-length"] = head + b"Content-Length: 99999999\r\n\r\n"
    return reads


def sdp_offers() -> Seeds:
    """Offers of SIPp, baresip, Asterisk, FreeSWITCH and the tests' UAC, plus sdp01.dat's,
    and one with SDES keys (RFC 4568)."""
    sdp01 = (RFC4475_DIR / "sdp01.dat").read_bytes()
    return {"sipp": SIPP_OFFER, "baresip": BARESIP_OFFER, "asterisk": ASTERISK_OFFER,
            "freeswitch": FREESWITCH_OFFER, "fakelink": SDP_OFFER, "srtp": SRTP_OFFER,
            "rfc4475-sdp01": sdp01.split(b"\r\n\r\n", 1)[1],
            "ipv6-inactive": (SIPP_OFFER.replace(b"IN IP4 127.0.0.1", b"IN IP6 ::1")
                              + b"a=inactive\r\n")}


def _parsed(messages: Iterable[bytes]) -> list[Request]:
    requests = []
    for data in messages:
        try:
            message = parse_message_untrusted(data)
        except BadMessage:
            continue
        if isinstance(message, Request):
            requests.append(message)
    return requests


def uris_and_headers(messages: Iterable[bytes]) -> tuple[Seeds, Seeds]:
    """Request-URIs and header values of the well-formed requests among ``messages``."""
    uris: Seeds = {f"extra-{i}": uri.encode() for i, uri in enumerate(_EXTRA_URIS)}
    headers: Seeds = {}
    for i, request in enumerate(_parsed(messages)):
        uris[f"request-{i}"] = request.uri.encode("utf-8", "surrogateescape")
        for j, (name, value) in enumerate(request.headers):
            kind = _HEADER_KINDS.get(name)
            if kind is not None:
                encoded = value.encode("utf-8", "surrogateescape")
                headers[f"request-{i}-{j}-{name.lower()}"] = bytes([kind]) + encoded
    return uris, headers


def rtp_packets() -> Seeds:
    """Datagrams from ``RtpPacket.serialize``: audio, DTMF, CSRCs, plus padding, an
    extension and RTCP made from them."""
    audio = RtpPacket(0, 1, 160, 0x1234, PCMU.encode(_tone(1)), marker=True).serialize()
    event = RtpPacket(101, 2, 320, 0x1234, bytes([5, 0x8A, 0x03, 0x20])).serialize()
    csrcs = RtpPacket(8, 65535, 2**32 - 1, 1, b"\xd5" * 80, csrcs=(1, 2, 3)).serialize()
    padded = bytes([audio[0] | 0x20]) + audio[1:] + b"\x00\x00\x03"
    extended = bytes([audio[0] | 0x10]) + audio[1:12] + b"\xbe\xde\x00\x01abcd" + audio[12:]
    rtcp_rr = bytes.fromhex("81c90007") + bytes(28)
    return {"pcmu-20ms": audio, "telephone-event-end": event, "pcma-csrcs": csrcs,
            "padding": padded, "extension": extended, "rtcp-rr": rtcp_rr}


def _tone(frame: int) -> bytes:
    """20 ms of a loud 440 Hz + 880 Hz tone as PCM16 (speech to the VAD)."""
    samples = [int(12000 * math.sin(2 * math.pi * 440 * t / 8000)
                   + 6000 * math.sin(2 * math.pi * 880 * t / 8000))
               for t in range(frame * 160, (frame + 1) * 160)]
    return b"".join(s.to_bytes(2, "little", signed=True) for s in samples)


def rtp_streams() -> Seeds:
    """Inputs of ``rtp_pipeline``: a talkspurt, DTMF, reordering, a new SSRC, strangers."""
    def audio(seq: int, source: int = 0, ticks: int = 1, ssrc: int = 0x1234) -> DatagramRecord:
        payload = PCMU.encode(_tone(seq)) if seq % 50 < 30 else PCMU.silence(160)
        packet = RtpPacket(0, seq, seq * 160, ssrc, payload, marker=seq == 0)
        return DatagramRecord(ticks, source, packet.serialize())

    def dtmf(seq: int, end: bool, duration: int) -> DatagramRecord:
        payload = bytes([1, 0x8A if end else 0x0A]) + duration.to_bytes(2, "big")
        return DatagramRecord(1, 0, RtpPacket(101, seq, 40 * 160, 0x1234, payload).serialize())

    talk = [audio(seq) for seq in range(60)]
    reordered = [audio(seq) for seq in (0, 2, 1, 3, 5, 4, 4, 9, 6)]
    return {
        "pcmu-talkspurt": b"\x00" + join_datagrams(talk),
        "pcma-talkspurt": b"\x01" + join_datagrams(talk[:20]),
        "dtmf": b"\x00" + join_datagrams(
            [audio(seq) for seq in range(40)] + [dtmf(40, False, 160), dtmf(41, False, 320),
                                                 dtmf(42, True, 480), dtmf(43, True, 480)]),
        "reordered-late": b"\x00" + join_datagrams([*reordered, audio(7, ticks=6)]),
        "ssrc-change": b"\x00" + join_datagrams(
            [audio(seq) for seq in range(10)] + [audio(seq, ssrc=99) for seq in range(500, 510)]),
        "strangers": b"\x00" + join_datagrams(
            [audio(seq, source=seq % 4, ticks=seq % 3) for seq in range(30)]),
    }


def control_reads() -> Seeds:
    """voxgatectl's request lines, whole, batched, split across reads, and bad ones."""
    hello = encode_request(1, "hello", {})
    status = encode_request("a", "status", {})
    show = encode_request(3.5, "show", {"id": "s1"})
    return {
        "hello": hello,
        "batched": hello + status + show,
        "split": _records(show[:10], show[10:] + encode_request(None, "calls", {"limit": 5})),
        "errors": b'{"id": 7}\n["status"]\n{"id": 1e400, "cmd": "status"}\n{not json\n',
        "unknown-then-eof": encode_request(9, "reboot", {"now": True}) + b'{"id": 10',
    }


def media_streams() -> tuple[Seeds, Seeds]:
    """(media-server direction, voxgate direction) messages: Twilio's own examples and
    ``serialize`` of every event."""
    frame = PCMU.encode(_tone(0))
    media = [ms.serialize(ms.Media(SID, frame, "inbound", n, 20 * n), sequence_number=n + 2)
             for n in range(1, 4)]
    server = [ms.serialize(ms.Connected()), json.dumps(TWILIO_START), *media,
              json.dumps(TWILIO_MEDIA),
              ms.serialize(ms.Dtmf(SID, "5"), sequence_number=6),
              ms.serialize(ms.Mark(SID, "7"), sequence_number=7),
              ms.serialize(ms.Stop(SID, "AC123", "CA123"), sequence_number=8)]
    resume = dict(TWILIO_START)
    resume["start"] = {**TWILIO_START["start"],  # type: ignore[dict-item]
                       "customParameters": {ms.RECOVERY_TOKEN_PARAMETER: "0" * 32}}
    bot = {"media": ms.serialize(ms.Media(SID, frame)), "mark": ms.serialize(ms.Mark(SID, "1")),
           "clear": ms.serialize(ms.Clear(SID)),
           "recovery-mark": ms.serialize(ms.Mark(SID, ms.recovery_mark_name("f" * 32)))}
    return ({"twilio-call": _records(*(m.encode() for m in server)),
             "resume": _records(json.dumps(resume).encode(), media[0].encode())},
            {name: text.encode() for name, text in bot.items()})


def _bot_binary(data: bytes) -> bytes:
    return b"\x00" + data


def _bot_text(message: object) -> bytes:
    return b"\x01" + json.dumps(message).encode()


def vonage_bot_messages() -> Seeds:
    """What a Vonage bot sends (records as :func:`fuzz.targets.messages.vonage_bot`
    reads them): 20 ms of audio at 8 and 16 kHz, odd-length audio, ``notify``,
    ``clear`` and messages the wire refuses."""
    notify = _bot_text({"action": "notify", "payload": {"name": "m1"}})
    clear = _bot_text({"action": "clear"})
    audio_16khz = [_bot_binary(_tone(2 * n) + _tone(2 * n + 1)) for n in range(3)]
    return {
        "audio-notify-clear": _records(*audio_16khz, notify, *audio_16khz, clear),
        "audio-8khz": _records(*(_bot_binary(_tone(n)) for n in range(3))),
        "odd-lengths": _records(_bot_binary(_tone(0)[:333]), _bot_binary(_tone(1)[:1]),
                                _bot_binary(_tone(2)[:77])),
        "notify": notify,
        "notify-nested": _bot_text({"action": "notify",
                                    "payload": {"name": "m2", "turn": {"n": 2, "ok": True}}}),
        "clear": clear,
        "refused": _records(_bot_text({"action": "play"}), _bot_text({"event": "websocket:dtmf"}),
                            _bot_text({"action": "notify", "payload": "m1"}), b"\x01{"),
    }


def webhook_replies() -> Seeds:
    return {"say-next": b'{"say": "Your balance is 42.", "next": "more", "hangup": false}',
            "hangup": b'{"say": "Goodbye.", "hangup": true}', "empty": b"{}", "null": b"null",
            "no-body": b"", "wrong-type": b'{"say": 5}',
            "unicode": '{"say": "Grüß \\u00e9"}'.encode()}


def json_documents() -> Seeds:
    docs = {"twilio-start": json.dumps(TWILIO_START).encode(),
            "numbers": b'[0, -1, 1.5e10, 123456789012345678901234567890, -0.0, 1e-7]',
            "escapes": b'{"a": "\\ud83d\\ude00 \\n \\u0000", "b": [true, false, null]}',
            "lone-surrogate": b'"\\ud800"', "deep": b"[" * 40 + b"]" * 40, "nan": b"[NaN]"}
    return {f"{name}-{mode}": bytes([mode]) + doc for name, doc in docs.items() for mode in (0, 1)}


def corpus() -> dict[str, Seeds]:
    """Every target's seeds by file name."""
    torture = rfc4475()
    flows = call_flows()
    singles = {f"{name}-{i}": part for name, data in flows.items()
               for i, part in enumerate(data.split(RECORD_SEPARATOR))}
    uris, headers = uris_and_headers([*torture.values(), *singles.values()])
    server, bot = media_streams()
    seeds = {
        "sip_message": {**torture, **singles},
        "sip_uri": uris,
        "sip_headers": headers,
        "sip_uas": {**torture, **flows},
        "sip_stream": stream_reads(flows),
        "sdp": sdp_offers(),
        "rtp_packet": rtp_packets(),
        "rtp_pipeline": rtp_streams(),
        "control": control_reads(),
        "media_stream": server,
        "media_stream_bot": bot,
        "vonage_bot": vonage_bot_messages(),
        "webhook_reply": webhook_replies(),
        "json": json_documents(),
    }
    assert seeds.keys() == TARGETS.keys(), seeds.keys() ^ TARGETS.keys()
    return seeds


def write(root: Path = CORPUS_DIR) -> None:
    """Replace ``root/<target>/`` with the seeds of :func:`corpus`, one file per content."""
    for target, seeds in corpus().items():
        directory = root / target
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir(parents=True)
        written: set[bytes] = set()
        for name, data in seeds.items():
            if data not in written:
                written.add(data)
                (directory / name).write_bytes(data)


if __name__ == "__main__":
    write()
