"""The SIP UAS core (RFC 3261 §8.2, §12, §13.3, §15, §18.2), sans-IO, h11 shape.

Datagrams go in with :meth:`UasCore.receive_datagram`, events come out of
:meth:`UasCore.next_event`, datagrams to send out of
:meth:`UasCore.datagrams_to_send`; the application answers calls with the
action methods (``accept``, ``reject``, ``hangup`` …); requests outside a
call (our REGISTER) go out with ``send_request`` and end as
``RequestCompleted``. Time is always the caller's ``now`` (monotonic
seconds); timers are ``next_deadline()`` + ``handle_timer(now)``.

Transport (§18): one core serves one transport, ``"UDP"``, ``"TCP"`` or
``"TLS"``, named in our Via and Contact (``;transport=tcp`` or ``tls``; a
``sips:`` Contact to a ``sips:`` Request-URI, RFC 5630). "Datagrams" are then whole framed messages
(:mod:`voxgate.sip.framing`) and their address names the connection: over a
reliable transport responses go to the connection the request came on
(§18.2.2), in-dialog requests (our BYE, REFER) to the connection the call's
INVITE came on while the driver reports it open (:meth:`UasCore.connection_opened`,
:meth:`UasCore.connection_closed`), else to the next hop as over UDP (the
driver opens a connection there), and the transaction timers are the reliable
ones (§17).

Policy choices: Max-Forwards is not checked (a UAS consumes the request, so
``Max-Forwards: 0`` on OPTIONS is answered normally; §8.2 has no Max-Forwards
step). An INVITE whose To tag matches no dialog is taken as a new call that
re-creates the dialog with that tag (§12.2.2 allows it); other requests for
an unknown dialog get 481. We never resolve host names: a response goes to
the source address (we stamp ``received``), and our BYE goes to the remote
target or first route when that is an IP literal, else to where the INVITE
came from. Our REFER (blind transfer, RFC 3515) goes the same way; a NOTIFY
is taken only inside a dialog with a transfer running (else 481; outside any
dialog 405, as other methods we do not implement). The REFER's implicit
subscription is waited on for at most ``transfer_timeout_s``: then the
transfer ends as failed (``timed_out``) and a later NOTIFY gets 481.

Outbound calls (:meth:`UasCore.invite`, we are the UAC, :mod:`voxgate.sip.uac`)
go to an IP-literal target only; they report ``OutboundProgress``, then
``OutboundAnswered`` (the dialog is confirmed and the 2xx ACKed) or
``OutboundFailed``; once answered they are calls like the others (BYE either
way, re-INVITE from the callee). A 2xx from a second fork of the INVITE is
not taken (§13.2.2.4 would ACK and BYE it; it is dropped and counted in
``responses_dropped``).

Size: a response copies the request's Via, From, To, Call-ID, CSeq (§8.2.6.2)
and, in a dialog, Record-Route (§12.1.1); over UDP it must fit one datagram,
at most 65,535 bytes with the IP and UDP headers (§18.1.1), and we have no
congestion-controlled transport to move it to. A new request whose copied
header fields leave less than :data:`RESPONSE_HEADROOM_BYTES` of that gets a
stateless *minimal* 513 Message Too Large (§21.5.11): top Via, From, To,
Call-ID, CSeq and nothing else (a stateless answer like a bad message's, in
the source's "other requests" bucket). Any other response that would not fit
(an answer to a malformed request) is cut down the same way.
"""

from __future__ import annotations

import ipaddress
import re
import secrets
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from voxgate.cidr import IPNetwork, source_in
from voxgate.end_reasons import EndReason
from voxgate.errors import LocalProtocolError, RemoteProtocolError
from voxgate.sip.dialog import Dialog, DialogId, DialogState
from voxgate.sip.digest import AuthResult, Credential, DigestAuthenticator
from voxgate.sip.headers import (
    Via,
    parse_cseq,
    parse_name_addr,
    parse_token_list,
    parse_via,
    split_list_value,
)
from voxgate.sip.message import Headers, Request, Response, make_response
from voxgate.sip.parser import BadMessage, parse_message_untrusted
from voxgate.sip.ratelimit import FloodLimits, RequestClass, SourceRateLimiter, Verdict
from voxgate.sip.transaction import (
    MAGIC_COOKIE,
    ClientInviteTransaction,
    Outbox,
    ServerTransaction,
    State,
    TimerConfig,
    Transaction,
    TransactionTable,
)
from voxgate.sip.uac import (
    MAX_AUTH_FOLLOW_UPS,
    Outbound,
    build_cancel,
    build_invite,
    follow_up_invite,
)
from voxgate.sip.uri import format_host_port, parse_uri_untrusted

Address = tuple[str, int]

TRANSPORTS = ("UDP", "TCP", "TLS")
"""The transports a core can serve (RFC 3261 §18, RFC 5630)."""

ALLOWED_METHODS = ("INVITE", "ACK", "BYE", "CANCEL", "OPTIONS")
ALLOW = ", ".join(ALLOWED_METHODS)
KNOWN_UNSUPPORTED_METHODS = frozenset(
    {"REGISTER", "MESSAGE", "SUBSCRIBE", "NOTIFY", "PUBLISH", "REFER", "INFO", "UPDATE", "PRACK"}
)
"""Methods we recognise but do not implement: 405 with Allow (§8.2.1); others get 501."""

SUPPORTED_OPTION_TAGS: frozenset[str] = frozenset()
"""Option tags we implement (§8.2.2.3): none, so any Require gets 420."""

MAX_UDP_PAYLOAD_BYTES = 65_507
"""Largest UDP payload over IPv4: 65,535 bytes less the IPv4 (20) and UDP (8) headers
(RFC 791, RFC 768; RFC 3261 §18.1.1)."""
RESPONSE_HEADROOM_BYTES = 4096
"""Room our responses need beyond the header fields copied from the request:
status line, To tag, Contact, Allow, Server, Warning, Retry-After, Reason,
Content-Type/Length and an SDP answer (all together well under 2 KiB)."""
_COPIED_HEADERS = frozenset({"via", "from", "to", "call-id", "cseq", "record-route"})
"""What responses copy from the request (§8.2.6.2, §12.1.1), lower case."""

SDP = "application/sdp"
_SDP_RANGES = frozenset({SDP, "application/*", "*/*"})
WARN_AGENT = "voxgate"
_UNSAFE_TEXT_RE = re.compile(r"[^\w .,:;/+=@()-]")
_REQUEST_CLASSES = {"INVITE": RequestClass.INVITE, "OPTIONS": RequestClass.OPTIONS}
_RAW_REQUEST_CLASSES = {b"INVITE": RequestClass.INVITE, b"OPTIONS": RequestClass.OPTIONS}
"""Datagrams a flooding source sends that are dropped before parsing (by their first
token; ACK, BYE, CANCEL and responses are always parsed), unless their Call-ID is one
of our calls'."""
_RAW_CALL_ID = re.compile(rb"\n(?:call-id|i)[ \t]*:[ \t]*([^\r\n]*)", re.IGNORECASE)
"""The Call-ID header (§20.8, compact form ``i``) in raw bytes, for that check only."""
_MAX_REASON_CHARS = 100


# --- events -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class IncomingCall:
    """A new INVITE (100 Trying already sent); answer with accept/reject."""

    call_key: str
    call_id: str
    request: Request
    source: Address
    sdp_offer: bytes
    auth_user: str | None = None  # the digest username, when INVITEs must authenticate


@dataclass(frozen=True, slots=True)
class CallAcked:
    """The ACK for our 2xx to the initial INVITE arrived."""

    call_key: str


@dataclass(frozen=True, slots=True)
class CallCancelled:
    """The caller cancelled; 200 (CANCEL) and 487 (INVITE) were already sent."""

    call_key: str


@dataclass(frozen=True, slots=True)
class CallEnded:
    """``reason`` is ``"bye"`` (peer BYE, 200 sent) or ``"ack-timeout"``.

    After ``"ack-timeout"`` (no ACK for our 2xx within 64·T1, §13.3.1.4) the
    core sends no BYE by itself: call :meth:`UasCore.hangup`.
    """

    call_key: str
    reason: EndReason


@dataclass(frozen=True, slots=True)
class ReInvite:
    """A re-INVITE inside the dialog; answer with :meth:`UasCore.answer_reinvite`."""

    call_key: str
    request: Request
    sdp_offer: bytes


@dataclass(frozen=True, slots=True)
class HangupCompleted:
    """Our hangup finished: the BYE's final status, ``None`` on Timer F.

    A hangup of a call not yet answered reports the status it was rejected with (480).
    """

    call_key: str
    status: int | None


@dataclass(frozen=True, slots=True)
class RequestCompleted:
    """A request sent with :meth:`UasCore.send_request` ended: its first final
    response, or ``None`` when none came (Timer F, §17.1.2.2)."""

    branch: str
    response: Response | None


@dataclass(frozen=True, slots=True)
class TransferEnded:
    """Our blind transfer (:meth:`UasCore.refer`, RFC 3515) is over.

    ``succeeded`` when a NOTIFY's ``message/sipfrag`` status line reports a 2xx
    (or the REFER's 2xx carried ``Refer-Sub: false``, RFC 4488 §4: no NOTIFY
    follows). Otherwise ``status`` is the REFER's 3xx-6xx, the sipfrag's
    3xx-6xx, 408 with ``timed_out`` (no final NOTIFY within
    :attr:`UasCore.transfer_timeout_s`), or ``None`` (Timer F, or the
    subscription terminated without a final status). The call itself goes on
    either way: the app hangs up.
    """

    call_key: str
    succeeded: bool
    status: int | None
    timed_out: bool = False


@dataclass(frozen=True, slots=True)
class OutboundProgress:
    """Our INVITE got a provisional response (101-199: 180 Ringing, 183 …)."""

    call_key: str
    status: int


@dataclass(frozen=True, slots=True)
class OutboundAnswered:
    """Our INVITE was answered 2xx: the dialog is confirmed and the ACK sent
    (§13.2.2.4); ``sdp_answer`` is the 2xx's body."""

    call_key: str
    sdp_answer: bytes


@dataclass(frozen=True, slots=True)
class OutboundFailed:
    """Our INVITE ended without a call: its final 3xx-6xx (``status``, already
    ACKed, after any challenge answered), or ``None`` when no final response came
    (Timer B) or the 2xx could not make a dialog; ``reason`` says which."""

    call_key: str
    status: int | None
    reason: str


@dataclass(frozen=True, slots=True)
class BadMessageReceived:
    """A malformed message (for the log); any possible 4xx was already sent."""

    call_id: str | None
    reason: str
    source: Address


SipEvent = (
    IncomingCall
    | CallAcked
    | CallCancelled
    | CallEnded
    | ReInvite
    | HangupCompleted
    | RequestCompleted
    | TransferEnded
    | OutboundProgress
    | OutboundAnswered
    | OutboundFailed
    | BadMessageReceived
)


@dataclass(frozen=True, slots=True)
class UasStats:
    """Counters since start (a snapshot)."""

    messages_in: int
    bad_messages: int
    responses_dropped: int  # stray responses, matching no client transaction
    requests_absorbed: int  # retransmitted requests answered by their transaction
    transactions_refused: int  # transaction table full: answered 503
    dialogs_refused: int  # max_dialogs reached: answered 503
    retransmissions: int
    datagrams_dropped: int  # outbound queue full
    messages_dropped_backlog: int  # event queue full: datagram ignored, the peer retransmits
    late_actions: int  # an action on a call whose state had moved on (e.g. accept after CANCEL)
    transactions_refused_share: int  # the source held its share of the table: answered 503
    flood_refused_invite: int  # new INVITE over its source's bucket: stateless 503
    flood_refused_options: int  # new OPTIONS over its source's bucket: stateless 503
    flood_refused_other: int  # other new request over its source's bucket: stateless 503
    flood_dropped: int  # new or malformed request beyond flood_drop_factor: no answer
    flood_dropped_unparsed: int  # INVITE/OPTIONS of a source beyond that: dropped unparsed
    flood_sources_evicted: int  # least recently seen source forgotten by the bucket table
    untrusted_refused: int  # new request from outside trusted_networks: stateless 403
    failure_retransmissions_capped: int  # 3xx-6xx to a source that does not ACK: sent once
    responses_too_large: int  # answers that would not fit one UDP datagram: minimal 513 instead
    auth_ok: int  # new INVITEs with valid digest credentials (the rest got a stateless 401)
    auth_missing: int
    auth_bad_header: int
    auth_unknown_user: int
    auth_wrong_response: int
    auth_stale: int
    auth_replay: int
    auth_nonces_evicted: int  # replay table: least recently used nonce forgotten
    transfers_succeeded: int  # our REFER's NOTIFY reported 2xx (or 202 with Refer-Sub: false)
    transfers_failed: int  # REFER refused or timed out, or its NOTIFY reported 3xx-6xx
    transfers_refused: int  # refer() refused before sending: bad target, call not answered …
    transfers_timeout: int  # no final NOTIFY within transfer_timeout_s


# --- per-call state -----------------------------------------------------------------------


class _Incoming(NamedTuple):
    request: Request  # top Via already stamped with received/rport
    via: Via  # the top Via as received (transaction key)
    destination: Address  # §18.2.2
    source: Address
    auth_user: str | None = None  # set once a new INVITE authenticated


class _Call:
    __slots__ = (
        "awaiting_ack",
        "bye_txn",
        "dialog",
        "hangup_deferred",
        "hangup_reason",
        "invite_txn",
        "key",
        "merge_key",
        "outbound",
        "refer_txn",
        "reinvite_target",
        "reinvite_txn",
        "source",
        "transferring",
    )

    def __init__(
        self,
        key: str,
        dialog: Dialog,
        invite_txn: ServerTransaction | None,
        source: Address,
        merge_key: tuple[str, str, int],
        outbound: Outbound | None = None,
    ) -> None:
        self.key = key
        self.dialog = dialog
        self.invite_txn = invite_txn  # None for an outbound call
        self.outbound = outbound
        self.source = source
        self.merge_key = merge_key
        self.reinvite_txn: ServerTransaction | None = None
        self.reinvite_target: str | None = None
        self.awaiting_ack: ServerTransaction | None = None
        self.bye_txn: Transaction | None = None
        self.hangup_deferred = False
        self.hangup_reason: str | None = None
        self.refer_txn: Transaction | None = None
        self.transferring = False  # a REFER sent, its outcome not known yet

    @property
    def unacked_2xx(self) -> bool:
        """Our 2xx to the initial INVITE awaits its ACK."""
        return self.invite_txn is not None and self.awaiting_ack is self.invite_txn


class UasCore:
    """The whole UAS: transactions, dialogs, §8.2 checks, answers, BYE and REFER.

    Bounds: ``max_transactions`` live transactions (beyond: 503, counted),
    ``max_dialogs`` calls (beyond: INVITE answered 503, counted),
    ``flood_limits`` per source address (see :mod:`voxgate.sip.ratelimit`:
    new requests over the source's bucket get a stateless 503 + Retry-After
    or, beyond ``flood_drop_factor``, no answer; a source holds at most its
    share of the transaction table; the 3xx-6xx of a source that does not
    ACK them are not retransmitted; all counted; retransmissions, ACK and
    requests inside a known dialog or transaction are never limited),
    ``max_queued_events`` events (while full, incoming datagrams are dropped
    and counted; timer events can add at most one per transaction),
    ``max_queued_datagrams`` outbound datagrams (overflow dropped, counted),
    ``max_datagram_bytes`` per datagram (a request whose responses would not
    fit gets a minimal 513, counted in ``responses_too_large``).
    ``random_token`` makes tags and branches (default: 64 random bits, hex).
    """

    def __init__(
        self,
        *,
        local_host: str,
        local_port: int,
        user_agent: str = "voxgate",
        max_transactions: int = 4096,
        max_dialogs: int = 4096,
        random_token: Callable[[], str] | None = None,
        max_queued_events: int = 1024,
        max_queued_datagrams: int = 4096,
        timers: TimerConfig | None = None,
        flood_limits: FloodLimits | None = None,
        max_datagram_bytes: int = MAX_UDP_PAYLOAD_BYTES,
        transfer_timeout_s: float = 60.0,
        transport: str = "UDP",
    ) -> None:
        self.local_host = local_host
        self.local_port = local_port
        self.user_agent = user_agent
        self.available = True
        self.unavailable_reason = "unavailable"
        self.retry_after_s = 30
        if transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {TRANSPORTS}, got {transport!r}")
        self.transport = transport
        self.reliable = transport != "UDP"
        """Whether the transport is reliable (TCP, TLS): §17 timers, §18.2.2 answers."""
        self._hostport = format_host_port(local_host, local_port)
        self._contact = _contact_uri(transport, self._hostport)
        self._connections: set[Address] = set()  # open connections (reliable transports)
        self._token = random_token or (lambda: secrets.token_hex(8))
        self.max_dialogs = max_dialogs
        """Most calls (dialogs) held at once; the app may change it (reload)."""
        self.trusted_networks: tuple[IPNetwork, ...] = ()
        """Sources that may start requests (empty: every source); others get a
        stateless 403 after the flood limits. The app may change it (reload)."""
        self.digest = DigestAuthenticator()
        """Digest authentication of new INVITEs, off until the app configures it with
        credentials (reload); see :meth:`_authenticate`."""
        self.max_datagram_bytes = max_datagram_bytes
        """Largest datagram we send; a response that would not fit is cut down to a
        minimal 513 (see the module docstring)."""
        self.transfer_timeout_s = transfer_timeout_s
        """Longest wait (s) from our REFER to the NOTIFY with its final status; then the
        transfer has failed (:class:`TransferEnded` ``timed_out``). For REFERs sent from
        then on: the app may change it (reload)."""
        self._transfer_deadlines: dict[str, float] = {}  # call key → deadline, transferring
        self._max_queued_events = max_queued_events
        self._outbox = Outbox(max_queued_datagrams)
        self._transactions = TransactionTable(
            outbox=self._outbox, max_transactions=max_transactions,
            timers=timers or TimerConfig(reliable=self.reliable),
        )
        self._rate_limiter = SourceRateLimiter()
        self.flood_limits = flood_limits or FloodLimits()
        self._events: deque[SipEvent] = deque()
        self._calls: dict[str, _Call] = {}
        self._calls_by_id: dict[DialogId, _Call] = {}
        self._call_ids: Counter[str] = Counter()  # the Call-IDs of _calls
        self._merge_index: dict[tuple[str, str, int], str] = {}
        self._requests: set[str] = set()  # branches of send_request()'s transactions
        self._latest_now = float("-inf")  # the latest ``now`` seen, for forget()
        self._counts = dict.fromkeys(
            (
                "messages_in", "bad_messages", "responses_dropped", "requests_absorbed",
                "dialogs_refused", "messages_dropped_backlog", "late_actions",
                "flood_refused_invite", "flood_refused_options", "flood_refused_other",
                "flood_dropped", "flood_dropped_unparsed", "responses_too_large",
                "untrusted_refused", "transfers_succeeded", "transfers_failed",
                "transfers_refused", "transfers_timeout",
            ),
            0,
        )  # fmt: skip

    # --- h11-style surface ----------------------------------------------------------------

    def receive_datagram(self, data: bytes, source: Address, now: float) -> None:
        """Process one UDP datagram from ``source`` (untrusted bytes, never raises on them)."""
        self._counts["messages_in"] += 1
        self._latest_now = max(self._latest_now, now)
        if len(self._events) >= self._max_queued_events:
            self._counts["messages_dropped_backlog"] += 1
            return
        request_class = _RAW_REQUEST_CLASSES.get(data[:8].split(b" ", 1)[0])
        if (request_class is not None
                and self._rate_limiter.flooding(source[0], request_class, now)
                and not self._of_a_known_call_raw_untrusted(data)):
            self._counts["flood_dropped"] += 1
            self._counts["flood_dropped_unparsed"] += 1
            return
        try:
            message = parse_message_untrusted(data)
        except BadMessage as exc:
            self._refuse_bad(exc, exc.partial, source, now)
            return
        if isinstance(message, Response):
            self._receive_response(message, now)
            return
        try:
            self._receive_request(message, source, now)
        except RemoteProtocolError as exc:  # raised before any state was changed
            self._refuse_bad(exc, message, source, now)

    def reject_message(self, head: bytes, source: Address, now: float, reason: str,
                       status: int = 400) -> None:
        """Refuse a message the stream framer could not frame (no or a bad
        Content-Length, §18.3): answer ``status`` statelessly from its header
        section ``head`` when that holds a request with a Via, like any bad
        message (counted in ``bad_messages``, reported as BadMessageReceived).
        The caller closes the connection after sending the answer."""
        self._counts["messages_in"] += 1
        request: Request | Response | None
        try:
            request = parse_message_untrusted(head)
        except BadMessage as exc:
            request = exc.partial
        if not isinstance(request, Request):
            request = None
        self._refuse_bad(RemoteProtocolError(reason, status), request, source, now)

    def _of_a_known_call_raw_untrusted(self, data: bytes) -> bool:
        """Whether the raw datagram's Call-ID is one of our calls' (a retransmitted
        INVITE, a re-INVITE): such requests are parsed even from a flooding source."""
        found = _RAW_CALL_ID.search(data)
        return found is not None and found.group(1).strip().decode("latin-1") in self._call_ids

    def next_event(self) -> SipEvent | None:
        """The oldest pending event, or ``None``."""
        return self._events.popleft() if self._events else None

    def datagrams_to_send(self) -> list[tuple[bytes, Address]]:
        """Drain the outbound queue: ``[(datagram, (host, port)), …]``."""
        return self._outbox.drain()

    def next_deadline(self) -> float | None:
        """When :meth:`handle_timer` must next run (monotonic seconds), or ``None``."""
        deadline = self._transactions.next_deadline()
        if self._transfer_deadlines:
            transfers = min(self._transfer_deadlines.values())  # one per transferring call
            deadline = transfers if deadline is None else min(deadline, transfers)
        return deadline

    def handle_timer(self, now: float) -> None:
        """Run due transaction and transfer timers; may queue events and datagrams."""
        self._latest_now = max(self._latest_now, now)
        for key, deadline in list(self._transfer_deadlines.items()):
            if now >= deadline:
                self._transfer_ended(self._calls[key], False, 408, timed_out=True)
        for txn in self._transactions.handle_timer(now):
            branch = txn.key.branch or ""
            if branch in self._requests:  # ended without a final response
                self._requests.discard(branch)
                self._events.append(RequestCompleted(branch, None))
            call = self._call_of(txn)
            if call is None:
                continue
            out = call.outbound
            if out is not None and txn is out.txn and txn.outcome == "timeout":
                call.dialog.state = DialogState.TERMINATED
                self._outbound_ended(call, None, "no final response (Timer B)")
            elif txn.outcome == "ack-timeout" and txn is call.awaiting_ack:
                call.awaiting_ack = None
                if call.hangup_deferred:
                    self._send_bye(call, now)
                elif call.dialog.state is DialogState.CONFIRMED:
                    self._events.append(CallEnded(call.key, "ack-timeout"))
            elif txn is call.bye_txn and txn.outcome == "timeout":
                self._events.append(HangupCompleted(call.key, None))
            elif txn is call.refer_txn and txn.outcome == "timeout":
                self._transfer_ended(call, False, None)

    @property
    def active_transactions(self) -> int:
        """Live transactions (server and client)."""
        return len(self._transactions)

    def connection_opened(self, peer: Address) -> None:
        """The driver holds a connection with ``peer`` (reliable transports): our
        in-dialog requests for calls that came on it go on it."""
        self._connections.add(peer)

    def connection_closed(self, peer: Address) -> None:
        """The connection with ``peer`` is gone: in-dialog requests go to the next hop."""
        self._connections.discard(peer)

    def has_calls_from(self, source: Address) -> bool:
        """Whether a call not yet forgotten came from ``source`` (over a reliable
        transport: on that connection, which must then stay open). O(calls)."""
        return any(call.source == source for call in self._calls.values())

    @property
    def active_dialogs(self) -> int:
        """Calls not yet forgotten by the application."""
        return len(self._calls)

    @property
    def flood_limits(self) -> FloodLimits:
        """The per-source limits in force."""
        return self._rate_limiter.limits

    @flood_limits.setter
    def flood_limits(self, limits: FloodLimits) -> None:
        """Apply new per-source limits at once (reload); nothing in progress is ended."""
        self._rate_limiter.limits = limits
        self._transactions.transaction_share_per_source = limits.transaction_share_per_source
        self._transactions.unacked_failures_per_source = limits.unacked_failures_per_source

    @property
    def stats(self) -> UasStats:
        """A snapshot of the counters."""
        table = self._transactions
        return UasStats(
            **self._counts,
            transactions_refused=table.refused,
            transactions_refused_share=table.refused_share,
            failure_retransmissions_capped=table.failure_retransmissions_capped,
            flood_sources_evicted=self._rate_limiter.evicted,
            **{f"auth_{result}": n for result, n in self.digest.counts.items()},
            auth_nonces_evicted=self.digest.nonces_evicted,
            retransmissions=self._outbox.retransmissions,
            datagrams_dropped=self._outbox.dropped,
        )

    # --- application actions --------------------------------------------------------------

    def send_provisional(self, call_key: str, status: int, now: float) -> None:
        """Send a 101-199 (180 Ringing, 183 …) on a pending INVITE.

        Raises LocalProtocolError for another status or an unknown call_key.
        """
        if not 101 <= status <= 199:
            raise LocalProtocolError(f"{status} is not a provisional status")
        call = self._call(call_key)
        txn = call.invite_txn
        if txn is not None and self._pending(txn):
            txn.send_response(self._dialog_response(call, txn, status), now)

    def accept(self, call_key: str, sdp_answer: bytes, now: float) -> None:
        """Answer the INVITE with 200 OK, our Contact and ``sdp_answer`` (§13.3.1.4).

        The 200 is retransmitted until the ACK (CallAcked) or 64·T1
        (CallEnded "ack-timeout").
        """
        call = self._call(call_key)
        txn = call.invite_txn
        if txn is None or not self._pending(txn):
            return
        response = self._dialog_response(call, txn, 200, body=sdp_answer, extra=[("Allow", ALLOW)])
        txn.send_response(response, now)
        call.dialog.state = DialogState.CONFIRMED
        call.awaiting_ack = txn

    def reject(
        self,
        call_key: str,
        status: int,
        now: float,
        *,
        reason: str | None = None,
        retry_after_s: int | None = None,
        extra: Sequence[tuple[str, str]] = (),
    ) -> None:
        """Answer the INVITE with a 300-699 (§13.3.1.3).

        ``reason`` goes in ``Warning: 399 voxgate "<reason>"``,
        ``retry_after_s`` in Retry-After, ``extra`` headers are appended.
        Raises LocalProtocolError for another status or an unknown call_key.
        """
        if not 300 <= status <= 699:
            raise LocalProtocolError(f"{status} is not a 3xx-6xx status")
        call = self._call(call_key)
        self._reject(call, status, now, [*_warning_headers(reason, retry_after_s), *extra])

    def answer_reinvite(
        self, call_key: str, sdp_answer: bytes | None, status: int, now: float
    ) -> None:
        """Answer the pending re-INVITE: 2xx (with ``sdp_answer``) or 3xx-6xx.

        A 2xx applies the re-INVITE's Contact as the new remote target
        (§12.2.2) and is retransmitted until its ACK.
        """
        if not 200 <= status <= 699:
            raise LocalProtocolError(f"{status} is not a final status")
        call = self._call(call_key)
        txn = call.reinvite_txn
        if txn is None or not self._pending(txn):
            return
        call.reinvite_txn = None
        if status >= 300:
            txn.send_response(self._dialog_response(call, txn, status), now)
            return
        txn.send_response(self._dialog_response(call, txn, status, body=sdp_answer or b""), now)
        if call.reinvite_target is not None:
            call.dialog.remote_target = call.reinvite_target
        call.awaiting_ack = txn

    def hangup(self, call_key: str, now: float, *, reason: str | None = None) -> None:
        """End the call from our side (§15.1.1); completion comes as HangupCompleted.

        Answered: a BYE (client transaction, Timers E/F), deferred until the
        ACK or Timer H when the 2xx is not acknowledged yet. Not answered: the
        INVITE gets 480; our outbound INVITE is cancelled (§9.1: a CANCEL once a
        provisional response came; a 2xx arriving anyway is ACKed and BYEd) and
        HangupCompleted carries its final status (``None``: Timer B).
        ``reason`` goes in ``Reason: Q.850;cause=16;text=…`` and
        ``X-Voxgate-Reason``. Ended already: nothing happens.
        """
        call = self._call(call_key)
        call.hangup_reason = reason
        state = call.dialog.state
        if state is DialogState.TERMINATED:
            self._counts["late_actions"] += 1
        elif state is DialogState.EARLY and call.outbound is not None:
            out = call.outbound
            out.cancel_wanted = True
            if out.txn.state is State.PROCEEDING and not out.cancel_sent:
                self._send_cancel(out, now)
        elif state is DialogState.EARLY:
            self._reject(call, 480, now, _reason_headers(reason))
            self._events.append(HangupCompleted(call_key, 480))
        elif call.unacked_2xx:
            call.hangup_deferred = True
        else:
            self._send_bye(call, now)

    def send_request(self, request: Request, destination: Address, now: float) -> bool:
        """Send a non-INVITE request outside any call (a REGISTER) on a client
        transaction (§17.1.2: Timer E retransmits it, Timer F gives up).

        ``request`` must carry its top Via with an RFC 3261 branch; its outcome comes
        as :class:`RequestCompleted` with that branch. Returns False (and sends
        nothing) when the transaction table is full (counted in
        ``transactions_refused``). Raises LocalProtocolError for an INVITE or a
        request without such a branch.
        """
        branch = parse_via(request.headers.get("Via") or "").branch or ""
        if request.method == "INVITE" or not branch.startswith(MAGIC_COOKIE):
            raise LocalProtocolError("send_request takes non-INVITE requests with an "
                                     "RFC 3261 branch in their top Via")
        if self._transactions.create_client(request, branch, destination, now) is None:
            return False
        self._requests.add(branch)
        return True

    def invite(self, target: str, sdp_offer: bytes, now: float, *, from_user: str = "voxgate",
               credentials: Sequence[Credential] = (), call_id: str | None = None) -> str:
        """Place an outbound call to ``target`` (we are the UAC, §13.2.1) and return its
        call key.

        ``target`` is a ``sip:`` URI whose host is an IP literal (no name
        resolution); the INVITE goes there (port 5060 by default) with
        ``sdp_offer``, From ``sip:<from_user>@`` our address, on a client
        INVITE transaction (Timer A retransmits it, Timer B gives up, §17.1.1).
        A 401/407 is answered with ``credentials`` (RFC 7616, at most
        :data:`~voxgate.sip.uac.MAX_AUTH_FOLLOW_UPS` times). ``call_id``: the
        Call-ID to use (default: 128 random bits, hex). Outcomes come as
        OutboundProgress, then OutboundAnswered or OutboundFailed; after the
        answer the call is like an answered inbound one (``hangup``, CallEnded).
        Raises LocalProtocolError, sending nothing, for a ``target`` that is not
        such a URI, when ``max_dialogs`` calls are held or the transaction table
        is full (counted in ``transactions_refused``).
        """
        try:
            uri = parse_uri_untrusted(target)
            ipaddress.ip_address(uri.host)
        except (RemoteProtocolError, ValueError):
            raise LocalProtocolError(f"outbound target {target[:80]!r} is not a sip: URI "
                                     "with an IP address") from None
        if uri.scheme != "sip":
            raise LocalProtocolError(f"outbound target {target[:80]!r} is not a sip: URI")
        if len(self._calls) >= self.max_dialogs:
            self._counts["dialogs_refused"] += 1
            raise LocalProtocolError("outbound call refused: max_dialogs calls held")
        call_id = call_id or f"{self._token()}{self._token()}"
        local_tag = self._token()
        cseq = 1 + secrets.randbelow(2**31 - 2**20)
        branch = MAGIC_COOKIE + self._token()
        request = build_invite(
            target, from_uri=f"sip:{from_user}@{self._hostport}", local_tag=local_tag,
            call_id=call_id, cseq=cseq, via_host_port=self._hostport, branch=branch,
            contact=self._contact, user_agent=self.user_agent, allow=ALLOW, sdp_offer=sdp_offer)
        destination = (uri.host, uri.port or 5060)
        txn = self._transactions.create_client_invite(request, branch, destination, now)
        if txn is None:
            raise LocalProtocolError("outbound call refused: transaction table full")
        dialog = Dialog(  # early, until the 2xx makes the real one (§12.1.2)
            dialog_id=DialogId(call_id, local_tag, ""),
            local_party=request.headers.get("From") or "",
            remote_party=request.headers.get("To") or "", remote_target=target, route_set=(),
            strict_route=False, remote_cseq=0, local_cseq=cseq)
        key = f"{call_id};;{local_tag}"
        call = _Call(key, dialog, None, destination, (call_id, local_tag, cseq),
                     Outbound(request, txn, tuple(credentials)))
        txn.call_key = key
        self._calls[key] = call
        self._call_ids[call_id] += 1
        return key

    def refer(self, call_key: str, target: str, now: float) -> None:
        """Transfer the answered call blindly to ``target`` (RFC 3515 §2.4.1).

        Sends a REFER in the dialog (client transaction, Timers E/F) with
        ``Refer-To: <target>``, ``Referred-By`` (RFC 3892) and our Contact;
        the outcome comes as :class:`TransferEnded` (the REFER's answer, then
        the NOTIFYs' ``message/sipfrag``, RFC 3515 §2.4.4-5). Raises
        LocalProtocolError, sending nothing, when ``target`` is not a well-formed
        ``sip:``/``sips:`` URI, the call is unknown, not confirmed, or already
        transferring.
        """
        try:
            parse_uri_untrusted(target)
            call = self._call(call_key)
            if call.dialog.state is not DialogState.CONFIRMED or call.unacked_2xx:
                raise LocalProtocolError(f"call {call_key!r} is not answered and acknowledged")
            if call.transferring:
                raise LocalProtocolError(f"call {call_key!r} is already being transferred")
        except RemoteProtocolError as exc:
            self._counts["transfers_refused"] += 1
            raise LocalProtocolError(f"transfer target: {exc.reason}") from exc
        except LocalProtocolError:
            self._counts["transfers_refused"] += 1
            raise
        extra = [("Refer-To", f"<{target}>"), ("Referred-By", self._contact),
                 ("Contact", self._contact)]
        txn = self._send_in_dialog(call, "REFER", now, extra)
        call.transferring = True
        self._transfer_deadlines[call_key] = now + self.transfer_timeout_s
        if txn is None:
            self._transfer_ended(call, False, None)
        call.refer_txn = txn

    def forget(self, call_key: str) -> None:
        """Drop the call's dialog state (unknown keys are ignored).

        Its transactions run out their timers; they report no more events.
        An INVITE or re-INVITE still unanswered gets 480 (so that no
        transaction waits forever; the app should have answered it).
        """
        call = self._calls.pop(call_key, None)
        self._transfer_deadlines.pop(call_key, None)
        if call is not None:
            self._end_pending_invites(call, 480, self._latest_now)
            self._calls_by_id.pop(call.dialog.id, None)  # an unanswered outbound call: absent
            self._call_ids[call.dialog.id.call_id] -= 1
            if not self._call_ids[call.dialog.id.call_id]:
                del self._call_ids[call.dialog.id.call_id]
            self._merge_index.pop(call.merge_key, None)

    # --- receiving ------------------------------------------------------------------------

    def _receive_response(self, response: Response, now: float) -> None:
        try:
            txn = self._transactions.match_response(response)
        except RemoteProtocolError:
            txn = None
        if txn is None:
            self._counts["responses_dropped"] += 1
            return
        call = self._call_of(txn)
        if isinstance(txn, ClientInviteTransaction):
            if txn.receive_response(response, now) and call is not None:
                self._outbound_response(call, txn, response, now)
            return
        if not txn.receive_response(response, now):
            return
        if call is not None:
            if txn is not call.refer_txn:
                self._events.append(HangupCompleted(call.key, response.status))
            elif response.status >= 300:
                self._transfer_ended(call, False, response.status)
            elif (response.headers.get("Refer-Sub") or "").strip().lower() == "false":
                self._transfer_ended(call, True, response.status)  # RFC 4488 §4: no NOTIFY
            return
        branch = txn.key.branch or ""
        if branch in self._requests:
            self._requests.discard(branch)
            self._events.append(RequestCompleted(branch, response))

    def _outbound_response(
        self, call: _Call, txn: ClientInviteTransaction, response: Response, now: float
    ) -> None:
        """A response our outbound INVITE's transaction passed up (§13.2.2)."""
        out = call.outbound
        if out is None or txn is not out.txn:
            return  # an INVITE replaced after a challenge
        status = response.status
        if status < 200:
            if out.cancel_wanted and not out.cancel_sent:
                self._send_cancel(out, now)  # §9.1: now that a provisional came
            elif not out.cancel_wanted and status > 100:
                self._events.append(OutboundProgress(call.key, status))
            return
        if status < 300:
            self._outbound_2xx(call, out, response, now)
            return
        reason = f"{status} {response.reason}"[:_MAX_REASON_CHARS]
        if status in (401, 407) and not out.cancel_wanted:
            error = self._outbound_authorize(call, out, response, now)
            if error is None:
                return
            reason = error
        call.dialog.state = DialogState.TERMINATED
        self._outbound_ended(call, status, reason)

    def _outbound_ended(self, call: _Call, status: int | None, reason: str) -> None:
        """The outbound INVITE ended without a call: report it to whoever waits
        (a hangup that cancelled, or the call's start)."""
        out = call.outbound
        if out is not None and out.cancel_wanted:
            self._events.append(HangupCompleted(call.key, status))
        else:
            self._events.append(OutboundFailed(call.key, status, reason))

    def _outbound_2xx(self, call: _Call, out: Outbound, response: Response, now: float) -> None:
        """ACK every 2xx (§13.2.2.4); the first confirms the dialog (§12.1.2)."""
        to_tag = parse_name_addr(response.headers.get("To") or "").tag
        if out.ack is not None and out.ack_destination is not None:
            if to_tag == call.dialog.id.remote_tag:
                self._outbox.send(out.ack, out.ack_destination, retransmission=True)
            else:
                self._counts["responses_dropped"] += 1  # another fork's 2xx
            return
        try:
            dialog = Dialog.from_2xx_untrusted(out.request, response)
        except RemoteProtocolError as exc:
            call.dialog.state = DialogState.TERMINATED
            self._outbound_ended(call, None, f"unusable 2xx: {exc.reason}")
            return
        dialog.state = DialogState.CONFIRMED
        call.dialog = dialog
        self._calls_by_id[dialog.id] = call
        ack = dialog.build_ack(_cseq_number(out.request))
        ack.headers.set("Via", f"SIP/2.0/UDP {self._hostport};branch={MAGIC_COOKIE}"
                               f"{self._token()};rport")
        ack.headers.add("User-Agent", self.user_agent)
        out.ack, out.ack_destination = ack.serialize(), self._next_hop(call)
        self._outbox.send(out.ack, out.ack_destination)
        if out.cancel_wanted:  # the answer crossed our CANCEL: end it with a BYE
            self._send_bye(call, now)
        else:
            self._events.append(OutboundAnswered(call.key, response.body))

    def _outbound_authorize(
        self, call: _Call, out: Outbound, response: Response, now: float
    ) -> str | None:
        """Send the INVITE again with credentials for a 401/407 (§22.2); ``None``
        when sent, else why not."""
        if out.auth_follow_ups >= MAX_AUTH_FOLLOW_UPS:
            return f"{response.status} again after {MAX_AUTH_FOLLOW_UPS} answered challenges"
        name = "Proxy-Authenticate" if response.status == 407 else "WWW-Authenticate"
        answer = out.challenges.answer(response.status, response.headers.get_all(name),
                                       out.credentials, "INVITE", out.request.uri,
                                       cnonce=self._token())
        if isinstance(answer, str):
            return f"{response.status}: {answer}"
        branch = MAGIC_COOKIE + self._token()
        request = follow_up_invite(out.request, branch, answer)
        txn = self._transactions.create_client_invite(request, branch, out.txn.destination, now)
        if txn is None:
            return "transaction table full"
        txn.call_key = call.key
        out.request, out.txn = request, txn
        out.challenges.authorized = True
        out.auth_follow_ups += 1
        call.dialog.local_cseq = _cseq_number(request)
        return None

    def _send_cancel(self, out: Outbound, now: float) -> None:
        """CANCEL our INVITE (§9.1) on a client transaction of its own, with the
        INVITE's branch; its answer reports nothing (the INVITE's 487 does)."""
        out.cancel_sent = True
        branch = parse_via(out.request.headers.get("Via") or "").branch or ""
        self._transactions.create_client(build_cancel(out.request), branch,
                                         out.txn.destination, now)
        out.txn.cancel_sent(now)

    def _receive_request(self, request: Request, source: Address, now: float) -> None:
        via = parse_via(request.headers.get("Via") or "")
        inc = _Incoming(request, via, self._answer_to(request, via, source), source)
        if request.method == "ACK":
            self._receive_ack(inc, now)
            return
        txn = self._transactions.match_server(request, via)
        if txn is not None:
            self._counts["requests_absorbed"] += 1
            txn.receive_retransmission(now)
            return
        if not self._responses_fit(request):
            self._refuse_too_large(inc, now)
            return
        if not self._in_known_dialog(inc):
            if not self._admit_new(inc, now):
                return
            if request.method == "INVITE" and self.digest.enabled:
                auth_user = self._authenticate(inc, now)
                if auth_user is None:
                    return
                inc = inc._replace(auth_user=auth_user)
        if request.method == "NOTIFY" and self._dialog_call(request) is not None:
            self._receive_notify(inc, now)
            return
        rejection = _check_request(request)
        if rejection is not None:
            self._answer(inc, now, rejection[0], to_tag=self._token(), extra=rejection[1])
        elif request.method == "INVITE":
            self._receive_invite(inc, now)
        elif request.method == "BYE":
            self._receive_bye(inc, now)
        elif request.method == "CANCEL":
            self._receive_cancel(inc, now)
        else:
            self._receive_options(inc, now)

    def _in_known_dialog(self, inc: _Incoming) -> bool:
        """A request inside a call we hold, or a CANCEL of a live INVITE transaction."""
        if inc.request.method == "CANCEL":
            return self._transactions.match_cancelled_invite(inc.request, inc.via) is not None
        return self._dialog_call(inc.request) is not None

    def _admit_new(self, inc: _Incoming, now: float) -> bool:
        """Whether a new request is within its source's bucket and from a trusted
        source; else refuse (503 or 403, stateless) or drop it."""
        request_class = _REQUEST_CLASSES.get(inc.request.method, RequestClass.OTHER)
        verdict = self._rate_limiter.check(inc.source[0], request_class, now)
        if verdict is Verdict.ADMIT:
            if self.trusted_networks and not source_in(inc.source[0], self.trusted_networks):
                self._counts["untrusted_refused"] += 1
                forbidden = self._response(inc.request, 403, to_tag=self._token(),
                                           extra=_warning_headers("untrusted-source", None))
                self._outbox.send(forbidden.serialize(), inc.destination)
                return False
            return True
        if verdict is Verdict.REFUSE:
            self._counts[f"flood_refused_{request_class.value}"] += 1
            self._refuse_stateless(inc.request, inc.destination, "rate-limited")
        else:
            self._counts["flood_dropped"] += 1
        return False

    def _authenticate(self, inc: _Incoming, now: float) -> str | None:
        """A new INVITE's digest username (§22.4), or ``None`` after answering it a
        stateless 401 with fresh challenges (the caller retransmits the INVITE if the
        401 is lost; its ACK matches nothing and is absorbed). Checked before the §8.2
        method and header checks, as §8.2 orders it."""
        request = inc.request
        verdict = self.digest.check(
            request.method, request.uri, request.headers.get_all("Authorization"), now)
        if verdict.username is not None:
            return verdict.username
        stale = verdict.result is AuthResult.STALE
        challenges = [("WWW-Authenticate", c) for c in self.digest.challenges(now, stale=stale)]
        unauthorized = self._response(request, 401, to_tag=self._token(), extra=challenges)
        self._outbox.send(unauthorized.serialize(), inc.destination)
        return None

    def _receive_ack(self, inc: _Incoming, now: float) -> None:
        txn = self._transactions.match_server(inc.request, inc.via)
        if txn is not None and txn.receive_ack(now):
            return  # ACK for our 3xx-6xx (§17.2.1)
        call = self._dialog_call(inc.request)
        cseq = parse_cseq(inc.request.headers.get("CSeq") or "").number
        pending = call.awaiting_ack if call is not None else None
        if call is None or pending is None or _cseq_number(pending.request) != cseq:
            self._counts["requests_absorbed"] += 1  # ACK retransmission or stray ACK
            return
        call.awaiting_ack = None
        pending.confirm_2xx_ack(now)
        if pending is call.invite_txn:
            self._events.append(CallAcked(call.key))
        if call.hangup_deferred:
            self._send_bye(call, now)

    def _receive_invite(self, inc: _Incoming, now: float) -> None:
        request = inc.request
        to = parse_name_addr(request.headers.get("To") or "")
        remote_tag = parse_name_addr(request.headers.get("From") or "").tag or ""
        cseq = parse_cseq(request.headers.get("CSeq") or "").number
        if to.tag is not None:
            call = self._calls_by_id.get(DialogId(request.call_id, to.tag, remote_tag))
            if call is not None:
                self._receive_reinvite(call, inc, cseq, now)
                return
        merge_key = (request.call_id, remote_tag, cseq)
        if merge_key in self._merge_index:  # §8.2.2.2 merged request
            self._answer(inc, now, 482, to_tag=self._token())
            return
        if len(self._calls) >= self.max_dialogs:
            self._counts["dialogs_refused"] += 1
            extra = _warning_headers("full", self.retry_after_s)
            self._answer(inc, now, 503, to_tag=self._token(), extra=extra)
            return
        dialog = Dialog.from_invite_untrusted(
            request, local_tag=self._token(), local_cseq=secrets.randbelow(2**31 - 2**20)
        )
        txn = self._answer(inc, now, 100, to_tag=None)
        if txn is None:
            return
        key = f"{request.call_id};{dialog.id.remote_tag};{dialog.id.local_tag}"
        call = _Call(key, dialog, txn, inc.source, merge_key)
        txn.call_key = key
        self._calls[key] = call
        self._calls_by_id[dialog.id] = call
        self._call_ids[dialog.id.call_id] += 1
        self._merge_index[merge_key] = key
        self._events.append(IncomingCall(
            key, request.call_id, request, inc.source, request.body, inc.auth_user))

    def _receive_reinvite(self, call: _Call, inc: _Incoming, cseq: int, now: float) -> None:
        contact = inc.request.headers.get("Contact")
        target = parse_name_addr(contact).uri if contact else None
        tag = call.dialog.id.local_tag
        if call.dialog.state is DialogState.TERMINATED:
            self._answer(inc, now, 481, to_tag=tag)
            return
        try:
            call.dialog.update_remote_cseq(cseq)
        except RemoteProtocolError as exc:
            self._answer(inc, now, exc.status_hint or 500, to_tag=tag)
            return
        invite_txn = call.invite_txn
        if ((invite_txn is not None and self._pending(invite_txn, count=False))
                or call.reinvite_txn or call.awaiting_ack):
            # §14.2: an INVITE while one is unanswered (or unacknowledged) gets 500 + Retry-After
            extra = [("Retry-After", str(secrets.randbelow(11)))]
            self._answer(inc, now, 500, to_tag=tag, extra=extra)
            return
        txn = self._answer(inc, now, 100, to_tag=None)
        if txn is None:
            return
        txn.call_key = call.key
        call.reinvite_txn = txn
        call.reinvite_target = target
        self._events.append(ReInvite(call.key, inc.request, inc.request.body))

    def _receive_bye(self, inc: _Incoming, now: float) -> None:
        call = self._dialog_call(inc.request)
        cseq = parse_cseq(inc.request.headers.get("CSeq") or "").number
        if call is None or call.dialog.state is DialogState.TERMINATED:
            self._answer(inc, now, 481, to_tag=self._token())
            return
        try:
            call.dialog.update_remote_cseq(cseq)
        except RemoteProtocolError as exc:
            self._answer(inc, now, exc.status_hint or 500, to_tag=None)
            return
        if self._answer(inc, now, 200, to_tag=None) is None:
            return
        self._end_pending_invites(call, 487, now)  # §15.1.2
        call.dialog.state = DialogState.TERMINATED
        self._events.append(CallEnded(call.key, "bye"))

    def _receive_notify(self, inc: _Incoming, now: float) -> None:
        """A NOTIFY in one of our dialogs (RFC 6665 §4.1.3): our REFER's progress
        (RFC 3515 §2.4.5) answered 200, anything else 481 (no such subscription)."""
        request = inc.request
        call = self._dialog_call(request)
        event = (request.headers.get("Event") or "").split(";")[0]
        if call is None or not call.transferring or event.strip().lower() != "refer":
            self._answer(inc, now, 481, to_tag=None)
            return
        try:
            call.dialog.update_remote_cseq(_cseq_number(request))
        except RemoteProtocolError as exc:
            self._answer(inc, now, exc.status_hint or 500, to_tag=None)
            return
        if self._answer(inc, now, 200, to_tag=None) is None:
            return
        status = sipfrag_status(request.body)
        terminated = (request.headers.get("Subscription-State") or "").strip().lower()
        if status is not None and status >= 200:
            self._transfer_ended(call, 200 <= status < 300, status)
        elif terminated.startswith("terminated"):
            self._transfer_ended(call, False, None)

    def _transfer_ended(self, call: _Call, succeeded: bool, status: int | None, *,
                        timed_out: bool = False) -> None:
        """Report the transfer's outcome once."""
        if call.transferring:
            call.transferring = False
            del self._transfer_deadlines[call.key]
            outcome = "timeout" if timed_out else "succeeded" if succeeded else "failed"
            self._counts[f"transfers_{outcome}"] += 1
            self._events.append(TransferEnded(call.key, succeeded, status, timed_out))

    def _receive_cancel(self, inc: _Incoming, now: float) -> None:
        invite_txn = self._transactions.match_cancelled_invite(inc.request, inc.via)
        if invite_txn is None:
            self._answer(inc, now, 481, to_tag=self._token())
            return
        call = self._call_of(invite_txn)
        tag = call.dialog.id.local_tag if call is not None else self._token()
        if self._answer(inc, now, 200, to_tag=tag) is None:
            return
        if not self._pending(invite_txn, count=False):
            return  # §9.2: the final response already went; CANCEL has no effect
        invite_txn.send_response(self._response(invite_txn.request, 487, to_tag=tag), now)
        if call is None:
            return
        if invite_txn is call.invite_txn:
            call.dialog.state = DialogState.TERMINATED
            self._events.append(CallCancelled(call.key))
        else:
            call.reinvite_txn = None

    def _receive_options(self, inc: _Incoming, now: float) -> None:
        if self.available:
            extra = [("Allow", ALLOW), ("Accept", SDP), ("Supported", "")]
            self._answer(inc, now, 200, to_tag=self._token(), extra=extra)
            return
        extra = _warning_headers(self.unavailable_reason, self.retry_after_s)
        self._answer(inc, now, 503, to_tag=self._token(), extra=extra)

    def _refuse_bad(
        self, exc: RemoteProtocolError, request: Request | None, source: Address, now: float
    ) -> None:
        """Log a bad message and answer it statelessly when possible (§8.2, §18.2.2).

        The answer draws from the source's "other requests" bucket; over it
        the message gets no answer (counted in ``flood_dropped``).
        """
        self._counts["bad_messages"] += 1
        call_id = request.call_id or None if request is not None else None
        self._events.append(BadMessageReceived(call_id, exc.reason, source))
        if exc.status_hint is None or request is None or request.method == "ACK":
            return
        if "Via" not in request.headers:
            return
        if self._rate_limiter.check(source[0], RequestClass.OTHER, now) is not Verdict.ADMIT:
            self._counts["flood_dropped"] += 1
            return
        try:
            via = parse_via(request.headers.get("Via") or "")
            destination = self._answer_to(request, via, source)
        except RemoteProtocolError:
            destination = source
        response = self._response(request, exc.status_hint, to_tag=self._token())
        data = response.serialize()
        if len(data) > self.max_datagram_bytes:
            self._counts["responses_too_large"] += 1
            data = _minimal_response(request, 513, self._token()).serialize()
        self._outbox.send(data, destination)

    def _responses_fit(self, request: Request) -> bool:
        """Whether every response to ``request`` fits in one datagram: the header
        fields it copies plus :data:`RESPONSE_HEADROOM_BYTES` (§18.1.1)."""
        copied = sum(len(name) + len(value.encode("utf-8", "surrogateescape")) + 4
                     for name, value in request.headers if name.lower() in _COPIED_HEADERS)
        return copied + RESPONSE_HEADROOM_BYTES <= self.max_datagram_bytes

    def _refuse_too_large(self, inc: _Incoming, now: float) -> None:
        """A stateless minimal 513 (§21.5.11) within the source's "other" bucket,
        reported like a bad message."""
        request = inc.request
        self._counts["responses_too_large"] += 1
        self._events.append(BadMessageReceived(
            request.call_id or None, f"{request.method}: responses would exceed "
            f"{self.max_datagram_bytes} bytes; answered 513 Message Too Large", inc.source))
        if self._rate_limiter.check(inc.source[0], RequestClass.OTHER, now) is not Verdict.ADMIT:
            self._counts["flood_dropped"] += 1
            return
        self._outbox.send(_minimal_response(request, 513, self._token()).serialize(),
                          inc.destination)

    # --- helpers --------------------------------------------------------------------------

    def _answer(
        self,
        inc: _Incoming,
        now: float,
        status: int,
        *,
        to_tag: str | None,
        extra: Sequence[tuple[str, str]] = (),
    ) -> ServerTransaction | None:
        """Create the server transaction of ``inc`` and send ``status`` on it.

        When the table is full or the source holds its share of it, answer
        503 statelessly and return ``None``.
        """
        txn = self._transactions.create_server(
            inc.request, inc.via, inc.destination, now, source_host=inc.source[0]
        )
        if txn is None:
            self._refuse_stateless(inc.request, inc.destination, "full")
            return None
        txn.send_response(self._response(inc.request, status, to_tag=to_tag, extra=extra), now)
        return txn

    def _refuse_stateless(self, request: Request, destination: Address, reason: str) -> None:
        """503 + Retry-After with no transaction or dialog (§8.2.6 statelessly, §21.5.4)."""
        extra = _warning_headers(reason, self.retry_after_s)
        busy = self._response(request, 503, to_tag=self._token(), extra=extra)
        self._outbox.send(busy.serialize(), destination)

    def _response(
        self,
        request: Request,
        status: int,
        *,
        to_tag: str | None,
        extra: Sequence[tuple[str, str]] = (),
        body: bytes = b"",
    ) -> Response:
        headers = [*extra, ("Server", self.user_agent)]
        return make_response(request, status, to_tag=to_tag, extra=headers, body=body)

    def _dialog_response(
        self,
        call: _Call,
        txn: ServerTransaction,
        status: int,
        *,
        body: bytes = b"",
        extra: Sequence[tuple[str, str]] = (),
    ) -> Response:
        """A response to an INVITE of ``call``: our tag, Contact, Record-Route (§12.1.1)."""
        headers: list[tuple[str, str]] = []
        if txn is call.invite_txn:
            headers.extend(("Record-Route", v) for v in txn.request.headers.get_all("Record-Route"))
        if 101 <= status < 300:
            sips = self.transport == "TLS" and txn.request.uri[:5].lower() == "sips:"
            # RFC 5630 §3.1.3: a SIPS Request-URI gets a SIPS Contact.
            headers.append(("Contact", f"<sips:{self._hostport}>" if sips else self._contact))
        headers.extend(extra)
        if body:
            headers.append(("Content-Type", SDP))
        return self._response(
            txn.request, status, to_tag=call.dialog.id.local_tag, extra=headers, body=body
        )

    def _reject(
        self, call: _Call, status: int, now: float, extra: Sequence[tuple[str, str]]
    ) -> None:
        txn = call.invite_txn
        if txn is None or not self._pending(txn):
            return
        txn.send_response(self._dialog_response(call, txn, status, extra=extra), now)
        call.dialog.state = DialogState.TERMINATED

    def _end_pending_invites(self, call: _Call, status: int, now: float) -> None:
        """Answer ``status`` to the call's INVITE and re-INVITE if still unanswered."""
        for txn in (call.invite_txn, call.reinvite_txn):
            if txn is not None and self._pending(txn, count=False):
                txn.send_response(self._dialog_response(call, txn, status), now)
        call.reinvite_txn = None

    def _send_bye(self, call: _Call, now: float) -> None:
        call.hangup_deferred = False
        self._end_pending_invites(call, 487, now)
        call.dialog.state = DialogState.TERMINATED
        txn = self._send_in_dialog(call, "BYE", now, _reason_headers(call.hangup_reason))
        if txn is None:
            self._events.append(HangupCompleted(call.key, None))
            return
        call.bye_txn = txn

    def _send_in_dialog(
        self, call: _Call, method: str, now: float, extra: Sequence[tuple[str, str]]
    ) -> Transaction | None:
        """Send ``method`` in the call's dialog (§12.2.1.1) as a client non-INVITE
        transaction with our Via, User-Agent and ``extra``; ``None`` when the
        transaction table is full (nothing sent)."""
        request = call.dialog.build_request(method, now)
        branch = MAGIC_COOKIE + self._token()
        request.headers.set("Via",
                            f"SIP/2.0/{self.transport} {self._hostport};branch={branch};rport")
        request.headers.add("User-Agent", self.user_agent)
        for name, value in extra:
            request.headers.add(name, value)
        txn = self._transactions.create_client(request, branch, self._next_hop(call), now)
        if txn is not None:
            txn.call_key = call.key
        return txn

    def _answer_to(self, request: Request, via: Via, source: Address) -> Address:
        """Stamp the top Via (§18.2.1) and return where responses go: over a
        reliable transport the connection the request came on, else §18.2.2."""
        destination = _stamp_top_via(request, via, source)
        return source if self.reliable else destination

    def _next_hop(self, call: _Call) -> Address:
        """Where our in-dialog request goes (§8.1.2), without name resolution:
        over a reliable transport the connection the INVITE came on while it is
        open; else the remote target or first route when that is an IP literal
        (port 5060, 5061 for ``sips:``, §19.1.2), else where the INVITE came from."""
        if self.reliable and call.source in self._connections:
            return call.source
        try:
            uri = parse_uri_untrusted(call.dialog.next_hop_uri())
            ipaddress.ip_address(uri.host)
        except (RemoteProtocolError, ValueError):
            return call.source
        return (uri.host, uri.port or (5061 if uri.scheme == "sips" else 5060))

    def _pending(self, txn: ServerTransaction, *, count: bool = True) -> bool:
        """Whether ``txn`` still awaits its final response; else count a late action."""
        if txn.state is State.PROCEEDING:
            return True
        if count:
            self._counts["late_actions"] += 1
        return False

    def _call(self, call_key: str) -> _Call:
        call = self._calls.get(call_key)
        if call is None:
            raise LocalProtocolError(f"unknown or forgotten call {call_key!r}")
        return call

    def _call_of(self, txn: Transaction) -> _Call | None:
        return self._calls.get(txn.call_key) if txn.call_key is not None else None

    def _dialog_call(self, request: Request) -> _Call | None:
        """The call whose dialog ``request`` belongs to (§12.2.2), by Call-ID and tags."""
        to_tag = parse_name_addr(request.headers.get("To") or "").tag
        from_tag = parse_name_addr(request.headers.get("From") or "").tag or ""
        if to_tag is None:
            return None
        return self._calls_by_id.get(DialogId(request.call_id, to_tag, from_tag))


# --- §8.2 checks and §18.2 addressing (pure functions) -------------------------------------


def _check_request(request: Request) -> tuple[int, list[tuple[str, str]]] | None:
    """The §8.2 rejection of a new request as (status, extra headers), or ``None``.

    Order of §8.2: method (405/501), Request-URI scheme (416), Require (420),
    then for INVITE the body type (415) and Accept (406). Raises
    RemoteProtocolError(400) for an unparsable Require.
    """
    method = request.method
    if method in KNOWN_UNSUPPORTED_METHODS:
        return 405, [("Allow", ALLOW)]
    if method not in ALLOWED_METHODS:
        return 501, []
    try:
        parse_uri_untrusted(request.uri)
    except RemoteProtocolError as exc:
        return exc.status_hint or 400, []
    if method != "CANCEL":
        required = parse_token_list(request.headers.get_all("Require"))
        unknown = [tag for tag in required if tag not in SUPPORTED_OPTION_TAGS]
        if unknown:
            return 420, [("Unsupported", ", ".join(unknown))]
    if method != "INVITE":
        return None
    content_type = request.headers.get("Content-Type") or ""
    if request.body and _media_type(content_type) != SDP:
        return 415, [("Accept", SDP)]
    accepts = request.headers.get_all("Accept")
    if accepts and not any(
        _media_type(r) in _SDP_RANGES for value in accepts for r in split_list_value(value)
    ):
        return 406, []
    return None


_SIPFRAG_STATUS_RE = re.compile(rb"\s*SIP/2\.0[ \t]+([1-6][0-9][0-9])(?:[ \t\r\n]|$)")


def sipfrag_status(body: bytes) -> int | None:
    """The status of a ``message/sipfrag`` body's status line (RFC 3420, e.g.
    ``SIP/2.0 200 OK``), or ``None`` when it starts with no such line."""
    match = _SIPFRAG_STATUS_RE.match(body)
    return int(match[1]) if match else None


def _contact_uri(transport: str, hostport: str) -> str:
    """Our Contact for ``transport`` (§8.1.1.8, §19.1.1 transport parameter)."""
    if transport == "UDP":
        return f"<sip:{hostport}>"
    return f"<sip:{hostport};transport={transport.lower()}>"


def _minimal_response(request: Request, status: int, to_tag: str) -> Response:
    """``status`` with only the top Via, From, To (tagged), Call-ID and CSeq: the
    cut-down answer to a request whose full response would not fit in a datagram
    (the other Via values, Record-Route and our own header fields are left out)."""
    response = make_response(request, status, to_tag=to_tag)
    top_via = request.headers.get("Via")
    if top_via is not None:
        response.headers.set("Via", top_via)
    return response


def _media_type(value: str) -> str:
    return value.split(";", 1)[0].strip().lower()


def _cseq_number(request: Request) -> int:
    return parse_cseq(request.headers.get("CSeq") or "").number


def _stamp_top_via(request: Request, via: Via, source: Address) -> Address:
    """Add received/rport to the top Via (§18.2.1, RFC 3581) and return where to answer.

    The answer goes to ``received`` (else the sent-by host) at the rport
    (else the sent-by port, else 5060), §18.2.2. ``request.headers`` is
    replaced when the Via changes.
    """
    host, port = source
    params: dict[str, str | None] = {}
    if via.host.lower() != host.lower() or via.has_rport:
        params["received"] = host
    if via.has_rport and via.rport is None:
        params["rport"] = str(port)
    if params:
        via = via.with_params(**params)
        items = list(request.headers)
        top = next(i for i, (name, _) in enumerate(items) if name == "Via")
        items[top] = ("Via", via.serialize())
        request.headers = Headers(items)
    return (via.received or via.host, via.rport or via.port or 5060)


def _safe_text(text: str) -> str:
    """Local free text made safe for a header value (no quotes, CR/LF)."""
    return _UNSAFE_TEXT_RE.sub("_", text)[:_MAX_REASON_CHARS]


def _warning_headers(reason: str | None, retry_after_s: int | None) -> list[tuple[str, str]]:
    headers = []
    if reason:
        headers.append(("Warning", f'399 {WARN_AGENT} "{_safe_text(reason)}"'))
    if retry_after_s is not None:
        headers.append(("Retry-After", str(retry_after_s)))
    return headers


def _reason_headers(reason: str | None) -> list[tuple[str, str]]:
    """RFC 3326 Reason (Q.850 cause 16, normal clearing) plus X-Voxgate-Reason."""
    if not reason:
        return []
    text = _safe_text(reason)
    return [("Reason", f'Q.850;cause=16;text="{text}"'), ("X-Voxgate-Reason", text)]
