"""Fuzz targets for SIP (RFC 3261) and SDP (RFC 4566, RFC 3264).

Each target documents what a crash is for it; the error type every SIP/SDP
parser documents is :class:`~voxgate.errors.RemoteProtocolError` (the
message parser's :class:`~voxgate.sip.parser.BadMessage` is one).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from functools import partial

from fuzz.targets.framing import split_records
from voxgate.config import RtpConfig
from voxgate.errors import RemoteProtocolError
from voxgate.sip import uas
from voxgate.sip.framing import FramingError, StreamFramer
from voxgate.sip.headers import (
    parse_cseq,
    parse_name_addr,
    parse_token_list,
    parse_uint,
    parse_via,
    split_list_value,
)
from voxgate.sip.message import Request, make_response
from voxgate.sip.parser import (
    MAX_DELTA_SECONDS,
    MAX_MESSAGE_BYTES,
    BadMessage,
    parse_message_untrusted,
)
from voxgate.sip.sdes import KEY_SALT_BYTES
from voxgate.sip.sdp import build_answer, negotiate, parse_sdp_untrusted
from voxgate.sip.uri import parse_uri_untrusted

UAS_HOST = "127.0.0.1"
UAS_PORT = 5060
PEER = ("127.0.0.2", 5070)
"""Where every datagram of :func:`sip_uas` comes from."""
DATAGRAM_INTERVAL_S = 0.25
"""Time between two datagrams of one :func:`sip_uas` input (Timer A/E fire in between)."""
MAX_TIMER_ROUNDS = 64
"""Timer runs after the last datagram, each at the core's next deadline."""
RTP_ADDRESS = "192.0.2.1"
RTP_PORT = 30000
TO_TAG = "fuzztag"


def _text(data: bytes) -> str:
    """Header or URI text as the message parser hands it on (UTF-8, surrogate escapes)."""
    return data.decode("utf-8", "surrogateescape")


def sip_message(data: bytes) -> None:
    """One datagram through :func:`~voxgate.sip.parser.parse_message_untrusted`.

    Crash: anything but ``BadMessage`` from the parser; any error answering
    a request (``make_response`` of the request or of ``BadMessage.partial``,
    serialized); a parsed message whose serialization does not parse again.
    """
    try:
        message = parse_message_untrusted(data)
    except BadMessage as exc:
        if exc.partial is not None and exc.status_hint is not None:
            make_response(exc.partial, exc.status_hint, to_tag=TO_TAG).serialize()
        return
    parse_message_untrusted(message.serialize())
    if isinstance(message, Request):
        make_response(message, 200, to_tag=TO_TAG).serialize()


def sip_uri(data: bytes) -> None:
    """``parse_uri_untrusted`` on the input as text. Crash: anything but
    ``RemoteProtocolError``, or an error decoding the user part."""
    try:
        uri = parse_uri_untrusted(_text(data))
    except RemoteProtocolError:
        return
    _ = uri.user_unescaped


def sip_headers(data: bytes) -> None:
    """One header value through the typed parser its first byte picks (mod 5): Via,
    name-addr, CSeq, list/token list, unsigned integer.

    Crash: anything but ``RemoteProtocolError``; a parsed Via or name-addr whose
    serialization (with ``received``/``rport`` stamped on a Via, as the UAS does)
    does not parse again.
    """
    if not data:
        return
    try:
        reparse = _parse_header(data[0] % 5, _text(data[1:]))
    except RemoteProtocolError:
        return
    if reparse is not None:
        parse, serialized = reparse
        parse(serialized)


def _parse_header(kind: int, text: str) -> tuple[Callable[[str], object], str] | None:
    """Parse ``text`` as header kind ``kind``; the parser and text to re-parse, if any."""
    if kind == 0:
        via = parse_via(text).with_params(received="192.0.2.9", rport="5070")
        return parse_via, via.serialize()
    if kind == 1:
        return parse_name_addr, parse_name_addr(text).serialize()
    if kind == 2:
        parse_cseq(text)
    elif kind == 3:
        split_list_value(text)
        parse_token_list([text])
    else:
        parse_uint(text, MAX_DELTA_SECONDS, "Expires")
    return None


def sdp(data: bytes) -> None:
    """An SDP offer through parse, negotiate (``[rtp] codecs`` default, ``[rtp]
    srtp = "offer"``) and ``build_answer`` (with a fixed key of ours for SRTP).

    Crash: anything but ``RemoteProtocolError`` (``NotAcceptable`` is one) from
    parse and negotiate; any error building the answer; an answer that does not
    parse, or does not negotiate to the codec and the crypto it names.
    """
    try:
        offer = parse_sdp_untrusted(data)
        negotiated = negotiate(offer, preference=RtpConfig().codecs, srtp="offer")
    except RemoteProtocolError:
        return
    ours = None if negotiated.crypto is None else negotiated.crypto.answer(b"k" * KEY_SALT_BYTES)
    answer = build_answer(offer, negotiated, local_address=RTP_ADDRESS, local_port=RTP_PORT,
                          session_id=1, session_version=1, local_crypto=ours)
    again = negotiate(parse_sdp_untrusted(answer), preference=(negotiated.codec.name,),
                      srtp="offer")
    assert again.codec == negotiated.codec, (again, negotiated)
    assert again.crypto == ours, (again, negotiated)


def new_uas_core(transport: str = "UDP") -> uas.UasCore:
    """The :func:`sip_uas` core at ``UAS_HOST:UAS_PORT``: tags and branches count up
    (``t0``, ``t1`` …), so seeds can hold the To tag of the answer to their INVITE."""
    counter = itertools.count()
    return uas.UasCore(local_host=UAS_HOST, local_port=UAS_PORT, transport=transport,
                       random_token=lambda: f"t{next(counter)}")


def sip_uas(data: bytes) -> None:
    """Datagrams (cut by :func:`~fuzz.targets.framing.split_records`) into a fresh
    :class:`~voxgate.sip.uas.UasCore`, driven like ``transports/sip_endpoint.py``:
    every new call's offer is negotiated and accepted (or refused with the
    error's status), every re-INVITE answered, every call still up at the end
    hung up, then timers run until none is left.

    Crash: any exception (``receive_datagram`` never raises on the peer's bytes,
    and the app's actions are legal at the moment they are taken).
    """
    core = new_uas_core()
    _drive(core, [partial(core.receive_datagram, datagram, PEER)
                  for datagram in split_records(data)])


def sip_stream(data: bytes) -> None:
    """The reads of one TCP connection (cut by
    :func:`~fuzz.targets.framing.split_records`) through a
    :class:`~voxgate.sip.framing.StreamFramer` into a TCP
    :class:`~voxgate.sip.uas.UasCore`, driven like :func:`sip_uas`; a framing
    error is answered from its header section as ``transports/sip_stream.py``
    does, and the connection's later reads are ignored.

    Crash: any exception but FramingError leaving the framer, a message longer
    than the bound, or a framer still buffering more than the bound.
    """
    core = new_uas_core("TCP")
    core.connection_opened(PEER)
    framer = StreamFramer(MAX_MESSAGE_BYTES)

    def read(chunk: bytes, now: float) -> None:
        if framer.failed:
            return
        framer.receive_data(chunk)
        try:
            while (message := framer.next_message()) is not None:
                assert len(message) <= MAX_MESSAGE_BYTES, len(message)
                core.receive_datagram(message, PEER, now)
        except FramingError as exc:
            if exc.head:
                core.reject_message(exc.head, PEER, now, exc.reason, exc.status_hint or 400)
        assert framer.buffered_bytes <= MAX_MESSAGE_BYTES + len(chunk), framer.buffered_bytes

    _drive(core, [partial(read, chunk) for chunk in split_records(data)])


def _drive(core: uas.UasCore, steps: list[Callable[[float], None]]) -> None:
    """Run each input step at its time, answering events and running timers as
    the SIP endpoint does; hang up what is left, run the timers out."""
    calls: set[str] = set()
    now = 1000.0
    for step in steps:
        step(now)
        _answer_events(core, calls, now)
        core.datagrams_to_send()
        now += DATAGRAM_INTERVAL_S
        core.handle_timer(now)
        _answer_events(core, calls, now)
    for call_key in sorted(calls):
        core.hangup(call_key, now, reason="fuzz")
    for _ in range(MAX_TIMER_ROUNDS):
        deadline = core.next_deadline()
        if deadline is None:
            break
        now = max(now, deadline)
        core.handle_timer(now)
        _answer_events(core, calls, now)
        core.datagrams_to_send()


def _answer_events(core: uas.UasCore, calls: set[str], now: float) -> None:
    """Act on every pending event as the SIP endpoint does."""
    while (event := core.next_event()) is not None:
        if isinstance(event, uas.IncomingCall | uas.ReInvite):
            try:
                offer = parse_sdp_untrusted(event.sdp_offer)
                negotiated = negotiate(offer, preference=RtpConfig().codecs)
            except RemoteProtocolError as exc:
                status = exc.status_hint or 400
                if isinstance(event, uas.IncomingCall):
                    core.reject(event.call_key, status, now, reason=exc.reason)
                else:
                    core.answer_reinvite(event.call_key, None, status, now)
                continue
            answer = build_answer(offer, negotiated, local_address=RTP_ADDRESS,
                                  local_port=RTP_PORT, session_id=1, session_version=1)
            if isinstance(event, uas.IncomingCall):
                calls.add(event.call_key)
                core.accept(event.call_key, answer, now)
            else:
                core.answer_reinvite(event.call_key, answer, 200, now)
        elif isinstance(event, uas.CallEnded | uas.CallCancelled | uas.HangupCompleted):
            calls.discard(event.call_key)
