"""SIP transactions over UDP, TCP and TLS (RFC 3261 §17, RFC 6026), sans-IO.

Every state transition lives in :data:`TRANSITIONS` below (the h11
``_state.py`` idea): ``(kind, state, input) -> next state``. Handlers feed
inputs; the table decides. Timers are absolute deadlines in monotonic seconds
(``now`` is always passed in); outputs go to a shared bounded :class:`Outbox`
of ``(datagram, (host, port))`` pairs that the driver drains.

Over UDP the unreliable-transport timer values apply (Timer A/G/E
retransmissions, Timer I = T4, Timer J = 64·T1, Timer K = T4, Timer D =
64·T1, i.e. 32 s with the default T1). With ``TimerConfig(reliable=True)``
(TCP, TLS) Timers A and E and the Timer G of a 3xx-6xx are not used and
Timers D, I, J and K are 0 (§17.1.1.2, §17.1.2.2, §17.2.1, §17.2.2); the 2xx
to an INVITE is still retransmitted until its ACK (§13.3.1.4 applies to
every transport).
"""

from __future__ import annotations

import enum
import heapq
import itertools
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TypeVar

from voxgate.errors import LocalProtocolError
from voxgate.sip.headers import Via, parse_cseq, parse_name_addr, parse_via
from voxgate.sip.message import Headers, Request, Response

Address = tuple[str, int]

MAGIC_COOKIE = "z9hG4bK"
"""RFC 3261 §8.1.1.7: a branch starting with this is an RFC 3261 transaction id."""


class Kind(enum.Enum):
    SERVER_INVITE = "server-invite"  # §17.2.1 + RFC 6026 Accepted
    SERVER_NON_INVITE = "server-non-invite"  # §17.2.2
    CLIENT_NON_INVITE = "client-non-invite"  # §17.1.2
    CLIENT_INVITE = "client-invite"  # §17.1.1 + RFC 6026 Accepted


class State(enum.Enum):
    CALLING = "Calling"
    TRYING = "Trying"
    PROCEEDING = "Proceeding"
    COMPLETED = "Completed"
    ACCEPTED = "Accepted"
    CONFIRMED = "Confirmed"
    TERMINATED = "Terminated"


class Input(enum.Enum):
    SEND_1XX = "send 1xx"
    SEND_2XX = "send 2xx"
    SEND_FINAL = "send 3xx-6xx"
    RECV_REQUEST = "request retransmission"
    RECV_ACK = "ACK (non-2xx)"
    ACK_2XX = "ACK for 2xx (matched by dialog)"
    RECV_1XX = "receive 1xx"
    RECV_FINAL = "receive final"
    RECV_2XX = "receive 2xx"
    TIMER_A = "Timer A"
    TIMER_B = "Timer B"
    TIMER_D = "Timer D"
    TIMER_E = "Timer E"
    TIMER_F = "Timer F"
    TIMER_G = "Timer G"
    TIMER_H = "Timer H"
    TIMER_I = "Timer I"
    TIMER_J = "Timer J"
    TIMER_K = "Timer K"
    TIMER_M = "Timer M"


_SI, _SN, _CN = Kind.SERVER_INVITE, Kind.SERVER_NON_INVITE, Kind.CLIENT_NON_INVITE
_CI = Kind.CLIENT_INVITE
_K, _T, _P, _C = State.CALLING, State.TRYING, State.PROCEEDING, State.COMPLETED
_A, _F, _X = State.ACCEPTED, State.CONFIRMED, State.TERMINATED

# The whole state machine. A pair missing from this table is an input that
# does not apply in that state: ignored when it came from the network,
# LocalProtocolError when it is our own send.
TRANSITIONS: dict[Kind, dict[State, dict[Input, State]]] = {
    # §17.2.1, with RFC 6026: a 2xx moves to Accepted, where Timer G
    # retransmits it until the dialog layer reports the ACK (ACK_2XX); Timer H
    # there means "no ACK" (it doubles as RFC 6026 Timer L, also 64·T1).
    _SI: {
        _P: {
            Input.SEND_1XX: _P,
            Input.SEND_2XX: _A,
            Input.SEND_FINAL: _C,
            Input.RECV_REQUEST: _P,  # resend the last provisional
        },
        _C: {
            Input.RECV_REQUEST: _C,  # resend the final response
            Input.TIMER_G: _C,
            Input.RECV_ACK: _F,
            Input.TIMER_H: _X,
        },
        _A: {
            Input.RECV_REQUEST: _A,  # absorbed
            Input.TIMER_G: _A,
            Input.ACK_2XX: _F,
            Input.TIMER_H: _X,
        },
        _F: {
            Input.RECV_REQUEST: _F,  # absorbed
            Input.RECV_ACK: _F,  # absorbed
            Input.TIMER_I: _X,
        },
    },
    # §17.2.2
    _SN: {
        _T: {
            Input.SEND_1XX: _P,
            Input.SEND_2XX: _C,
            Input.SEND_FINAL: _C,
            Input.RECV_REQUEST: _T,  # absorbed
        },
        _P: {
            Input.SEND_1XX: _P,
            Input.SEND_2XX: _C,
            Input.SEND_FINAL: _C,
            Input.RECV_REQUEST: _P,  # resend the last provisional
        },
        _C: {
            Input.RECV_REQUEST: _C,  # resend the final response
            Input.TIMER_J: _X,
        },
    },
    # §17.1.2
    _CN: {
        _T: {
            Input.TIMER_E: _T,
            Input.RECV_1XX: _P,
            Input.RECV_FINAL: _C,
            Input.TIMER_F: _X,
        },
        _P: {
            Input.TIMER_E: _P,
            Input.RECV_1XX: _P,
            Input.RECV_FINAL: _C,
            Input.TIMER_F: _X,
        },
        _C: {
            Input.RECV_1XX: _C,  # absorbed
            Input.RECV_FINAL: _C,  # absorbed
            Input.TIMER_K: _X,
        },
    },
    # §17.1.1, with RFC 6026: a 2xx moves to Accepted, where retransmitted 2xx
    # still match (the UAC core ACKs each again, §13.2.2.4) until Timer M.
    # Timer B also runs in Proceeding once we sent a CANCEL (§9.1: no final
    # response 64·T1 after it ends the transaction).
    _CI: {
        _K: {
            Input.TIMER_A: _K,
            Input.TIMER_B: _X,
            Input.RECV_1XX: _P,
            Input.RECV_2XX: _A,
            Input.RECV_FINAL: _C,
        },
        _P: {
            Input.RECV_1XX: _P,
            Input.RECV_2XX: _A,
            Input.RECV_FINAL: _C,
            Input.TIMER_B: _X,
        },
        _C: {
            Input.RECV_FINAL: _C,  # resend the ACK
            Input.TIMER_D: _X,
        },
        _A: {
            Input.RECV_2XX: _A,  # passed up for a new ACK
            Input.TIMER_M: _X,
        },
    },
}

# Timers armed on entering a state (replacing every running timer), as
# ``timer -> name of the TimerConfig duration``. States not listed keep theirs.
ON_ENTER: dict[tuple[Kind, State], dict[Input, str]] = {
    (_SI, _C): {Input.TIMER_G: "t1_s", Input.TIMER_H: "timeout_s"},
    (_SI, _A): {Input.TIMER_G: "t1_s", Input.TIMER_H: "timeout_s"},
    (_SI, _F): {Input.TIMER_I: "t4_s"},
    (_SN, _C): {Input.TIMER_J: "timeout_s"},
    (_CN, _T): {Input.TIMER_E: "t1_s", Input.TIMER_F: "timeout_s"},
    (_CN, _C): {Input.TIMER_K: "t4_s"},
    (_CI, _K): {Input.TIMER_A: "t1_s", Input.TIMER_B: "timeout_s"},
    (_CI, _P): {},
    (_CI, _C): {Input.TIMER_D: "timeout_s"},
    (_CI, _A): {Input.TIMER_M: "timeout_s"},
}

# How a transaction ends when it ends by these inputs (otherwise "completed").
TIMEOUT_OUTCOMES: dict[tuple[State, Input], str] = {
    (_C, Input.TIMER_H): "timeout",  # no ACK for our 3xx-6xx
    (_A, Input.TIMER_H): "ack-timeout",  # no ACK for our 2xx (§13.3.1.4)
    (_T, Input.TIMER_F): "timeout",
    (_P, Input.TIMER_F): "timeout",
    (_K, Input.TIMER_B): "timeout",
    (_P, Input.TIMER_B): "timeout",
}

_RETRANSMIT_TIMERS = frozenset({Input.TIMER_A, Input.TIMER_E, Input.TIMER_G})
_UNUSED_WHEN_RELIABLE = frozenset({(_SI, _C, Input.TIMER_G), (_CN, _T, Input.TIMER_E),
                                   (_CI, _K, Input.TIMER_A)})
"""Retransmission timers a reliable transport does not run (§17.1.1.2, §17.1.2.2, §17.2.1)."""
_ZERO_WHEN_RELIABLE = frozenset({Input.TIMER_D, Input.TIMER_I, Input.TIMER_J, Input.TIMER_K})
"""Wait timers that are 0 over a reliable transport (§17.1.1.2, §17.1.2.2, §17.2.1, §17.2.2)."""
_RESEND_STATES = frozenset({_P, _C})  # a retransmitted request gets the last response again


@dataclass(frozen=True, slots=True)
class TimerConfig:
    """RFC 3261 §17.1.1.1 timer values in seconds (Table 4); ``reliable`` for
    TCP and TLS (no request or 3xx-6xx retransmissions, Timers I/J/K 0)."""

    t1_s: float = 0.5
    t2_s: float = 4.0
    t4_s: float = 5.0
    reliable: bool = False

    def armed(self, kind: Kind, state: State) -> dict[Input, float]:
        """The timers started on entering ``state`` of a ``kind`` transaction,
        as ``timer -> duration in seconds``."""
        armed = {}
        for timer, duration in ON_ENTER.get((kind, state), {}).items():
            if self.reliable and (kind, state, timer) in _UNUSED_WHEN_RELIABLE:
                continue
            zero = self.reliable and timer in _ZERO_WHEN_RELIABLE
            armed[timer] = 0.0 if zero else float(getattr(self, duration))
        return armed

    @property
    def timeout_s(self) -> float:
        """64·T1: Timers B, F, H and J."""
        return 64 * self.t1_s


@dataclass(frozen=True, slots=True)
class TransactionKey:
    """Identifies a transaction (§17.2.3, §17.1.3).

    ``branch`` is the RFC 3261 branch, or ``None`` for an RFC 2543 peer whose
    key is then ``legacy`` = (Request-URI, From tag, Call-ID, CSeq number,
    top Via). ``method`` is the request method, with ACK folded into INVITE.
    """

    branch: str | None
    sent_by: str
    method: str
    legacy: tuple[str, ...] = ()


def server_key(request: Request, via: Via, method: str | None = None) -> TransactionKey:
    """The §17.2.3 matching key of ``request`` whose top Via is ``via``.

    ``method`` overrides the request's method (CANCEL looks up its INVITE
    with ``"INVITE"``, §9.2). Raises RemoteProtocolError(400) when the
    RFC 2543 fallback needs a CSeq or From that does not parse.
    """
    method = method or ("INVITE" if request.method == "ACK" else request.method)
    sent_by = f"{via.host.lower()}:{via.port or 5060}"
    branch = via.branch
    if branch is not None and branch.startswith(MAGIC_COOKIE) and len(branch) > len(MAGIC_COOKIE):
        return TransactionKey(branch, sent_by, method)
    cseq = parse_cseq(request.headers.get("CSeq") or "")
    from_tag = parse_name_addr(request.headers.get("From") or "").tag or ""
    legacy = (request.uri, from_tag, request.call_id, str(cseq.number), via.serialize())
    return TransactionKey(None, sent_by, method, legacy)


class Outbox:
    """A bounded queue of datagrams to send; overflow is dropped and counted.

    Dropping is safe: UDP loses datagrams anyway and the transactions
    retransmit.
    """

    def __init__(self, max_datagrams: int) -> None:
        self.max_datagrams = max_datagrams
        self._queue: list[tuple[bytes, Address]] = []
        self.dropped = 0
        self.retransmissions = 0

    def send(self, data: bytes, destination: Address, *, retransmission: bool = False) -> None:
        """Queue one datagram (``retransmission`` only feeds the counter)."""
        if retransmission:
            self.retransmissions += 1
        if len(self._queue) >= self.max_datagrams:
            self.dropped += 1
            return
        self._queue.append((data, destination))

    def drain(self) -> list[tuple[bytes, Address]]:
        """Every queued datagram, oldest first; the queue is left empty."""
        out, self._queue = self._queue, []
        return out


class Transaction:
    """State, timers and table-driven transitions shared by every kind.

    ``call_key`` is an opaque label for the transaction user (the UAS core).
    ``outcome`` is set on termination: ``"completed"``, ``"timeout"``
    (Timer H on a 3xx-6xx, Timer F, Timer B) or ``"ack-timeout"`` (Timer H on a 2xx).
    """

    def __init__(
        self,
        kind: Kind,
        key: TransactionKey,
        request: Request,
        destination: Address,
        outbox: Outbox,
        timers: TimerConfig,
        initial: State,
        now: float,
    ) -> None:
        self.kind = kind
        self.key = key
        self.request = request
        self.destination = destination
        self.call_key: str | None = None
        self.outcome: str | None = None
        self.state = initial
        self._outbox = outbox
        self._config = timers
        self._deadlines: dict[Input, float] = {}
        self._intervals: dict[Input, float] = {}
        self._last_sent: bytes | None = None
        self.on_armed: Callable[[Transaction], None] = lambda txn: None
        """Called when an input (not a timer) armed a timer: the table schedules it."""
        self._enter(initial, now)

    @property
    def terminated(self) -> bool:
        return self.state is State.TERMINATED

    def next_deadline(self) -> float | None:
        """The earliest running timer (monotonic seconds), ``None`` when idle."""
        return min(self._deadlines.values(), default=None)

    def handle_timer(self, now: float) -> None:
        """Fire every timer due at ``now``, earliest first."""
        due = sorted((d, t.value, t) for t, d in self._deadlines.items() if d <= now)
        for deadline, _, timer in due:
            if self._deadlines.get(timer) != deadline:
                continue  # cancelled or re-armed by an earlier timer
            del self._deadlines[timer]
            outcome = TIMEOUT_OUTCOMES.get((self.state, timer))
            if outcome is not None:
                self.outcome = outcome  # kept by _enter(TERMINATED)
            if self._fire(timer, now) and timer in _RETRANSMIT_TIMERS:
                self._retransmit(timer, now)

    def _retransmit(self, timer: Input, now: float) -> None:
        if self._last_sent is not None:
            self._outbox.send(self._last_sent, self.destination, retransmission=True)
        interval = self._intervals.get(timer, self._config.t1_s)
        if timer is Input.TIMER_A:  # §17.1.1.2: doubling without the T2 cap
            interval = 2 * interval
        elif self.state is State.PROCEEDING:  # §17.1.2.2: Timer E at T2 once provisional
            interval = self._config.t2_s
        else:
            interval = min(2 * interval, self._config.t2_s)
        self._intervals[timer] = interval
        self._deadlines[timer] = now + interval

    def _fire(self, event: Input, now: float) -> bool:
        """Apply ``event`` per TRANSITIONS; False when it does not apply."""
        new_state = TRANSITIONS[self.kind].get(self.state, {}).get(event)
        if new_state is None:
            return False
        if new_state is not self.state:
            self._enter(new_state, now)
        return True

    def _enter(self, state: State, now: float) -> None:
        self.state = state
        if state is State.TERMINATED:
            self._deadlines.clear()
            if self.outcome is None:
                self.outcome = "completed"
            return
        if (self.kind, state) in ON_ENTER:
            armed = self._config.armed(self.kind, state)
            self._deadlines = {t: now + d for t, d in armed.items()}
            self._intervals = dict(armed)
            self.on_armed(self)

    def _send(self, data: bytes) -> None:
        self._last_sent = data
        self._outbox.send(data, self.destination)


def _response_input(status: int) -> Input:
    if status < 200:
        return Input.SEND_1XX
    return Input.SEND_2XX if status < 300 else Input.SEND_FINAL


class ServerTransaction(Transaction):
    """A server transaction (§17.2): INVITE or non-INVITE, chosen by method.

    ``source_host`` is the IP address the request came from (the per-source
    accounting of :class:`TransactionTable`).
    """

    def __init__(
        self,
        key: TransactionKey,
        request: Request,
        destination: Address,
        outbox: Outbox,
        timers: TimerConfig,
        now: float,
        *,
        source_host: str = "",
    ) -> None:
        invite = request.method == "INVITE"
        super().__init__(
            Kind.SERVER_INVITE if invite else Kind.SERVER_NON_INVITE,
            key,
            request,
            destination,
            outbox,
            timers,
            State.PROCEEDING if invite else State.TRYING,
            now,
        )
        self.last_response: Response | None = None
        self.source_host = source_host

    @property
    def awaiting_failure_ack(self) -> bool:
        """An INVITE transaction whose 3xx-6xx is not acknowledged yet (Completed, §17.2.1)."""
        return self.kind is Kind.SERVER_INVITE and self.state is State.COMPLETED

    def failure_retransmission_due(self, now: float) -> bool:
        """Whether Timer G would retransmit our 3xx-6xx at ``now``."""
        deadline = self._deadlines.get(Input.TIMER_G)
        return self.awaiting_failure_ack and deadline is not None and deadline <= now

    def stop_retransmitting(self) -> None:
        """Cancel Timer G: the 3xx-6xx was sent once and is not retransmitted.

        Timer H still runs, so the ACK and retransmitted INVITEs are still
        matched (the latter get the response again, §17.2.1).
        """
        self._deadlines.pop(Input.TIMER_G, None)

    def send_response(self, response: Response, now: float) -> None:
        """Send ``response`` (to ``destination``, §18.2.2) and advance the state.

        Raises LocalProtocolError when the state does not allow it (e.g. a
        second final response).
        """
        if not self._fire(_response_input(response.status), now):
            raise LocalProtocolError(
                f"cannot send {response.status} in {self.kind.value} state {self.state.value}"
            )
        self.last_response = response
        self._send(response.serialize())

    def receive_retransmission(self, now: float) -> None:
        """A retransmission of our request arrived: absorb it or answer again."""
        resend = self._fire(Input.RECV_REQUEST, now) and self.state in _RESEND_STATES
        if resend and self._last_sent is not None:
            self._outbox.send(self._last_sent, self.destination, retransmission=True)

    def receive_ack(self, now: float) -> bool:
        """The ACK for our 3xx-6xx (§17.2.1); False when not applicable."""
        return self._fire(Input.RECV_ACK, now)

    def confirm_2xx_ack(self, now: float) -> bool:
        """The dialog layer matched the ACK for our 2xx: stop retransmitting it.

        Returns False when no 2xx is awaiting its ACK.
        """
        return self._fire(Input.ACK_2XX, now)


class _Client(Transaction):
    """What both client transactions share: the request is sent on construction,
    ``final_status`` is the first final response's status (``None`` until then)."""

    KIND: Kind
    INITIAL: State

    def __init__(
        self,
        key: TransactionKey,
        request: Request,
        destination: Address,
        outbox: Outbox,
        timers: TimerConfig,
        now: float,
    ) -> None:
        super().__init__(
            self.KIND, key, request, destination, outbox, timers, self.INITIAL, now
        )
        self.final_status: int | None = None
        self._send(request.serialize())


class ClientTransaction(_Client):
    """A client non-INVITE transaction (§17.1.2), used for our BYE, REFER and REGISTER.

    The request is sent on construction; Timer E retransmits it.
    """

    KIND, INITIAL = Kind.CLIENT_NON_INVITE, State.TRYING

    def receive_response(self, response: Response, now: float) -> bool:
        """Feed a matching response; True when it is the first final one."""
        first_final = response.status >= 200 and self.final_status is None
        if not self._fire(Input.RECV_1XX if response.status < 200 else Input.RECV_FINAL, now):
            return False
        if first_final:
            self.final_status = response.status
        return first_final


class ClientInviteTransaction(_Client):
    """A client INVITE transaction (§17.1.1, RFC 6026), used for our outbound calls.

    The INVITE is sent on construction; Timer A retransmits it (T1, doubling)
    until a provisional, Timer B (64·T1) gives up in Calling. A 3xx-6xx is
    acknowledged here (§17.1.1.3, again for each retransmission of it) and
    Timer D absorbs retransmissions; a 2xx moves to Accepted, where Timer M
    (64·T1) keeps matching retransmitted 2xx for the UAC core to ACK
    (§13.2.2.4: the 2xx ACK is the core's, not the transaction's).
    """

    KIND, INITIAL = Kind.CLIENT_INVITE, State.CALLING

    def receive_response(self, response: Response, now: float) -> bool:
        """Feed a matching response; True when the transaction user must see it:
        a 1xx before the final response, every 2xx (retransmissions too, each
        needs its ACK), the first 3xx-6xx (already ACKed)."""
        status = response.status
        first_final = self.final_status is None
        if status < 200:
            return self._fire(Input.RECV_1XX, now)
        if not self._fire(Input.RECV_2XX if status < 300 else Input.RECV_FINAL, now):
            return False
        if first_final:
            self.final_status = status
        if status >= 300:
            if first_final:
                self._send(non_2xx_ack(self.request, response).serialize())
            elif self._last_sent is not None:
                self._outbox.send(self._last_sent, self.destination, retransmission=True)
            return first_final
        return True

    def cancel_sent(self, now: float) -> None:
        """Our CANCEL of this INVITE went out: without a final response within
        64·T1 the transaction ends with outcome ``"timeout"`` (§9.1)."""
        if self.state is State.PROCEEDING:
            self._deadlines[Input.TIMER_B] = now + self._config.timeout_s
            self.on_armed(self)


def non_2xx_ack(invite: Request, response: Response) -> Request:
    """The ACK for a 3xx-6xx to ``invite`` (§17.1.1.3): the INVITE's Request-URI,
    top Via, Route, From, Call-ID and CSeq number, the response's To (its tag)."""
    cseq = parse_cseq(invite.headers.get("CSeq") or "")
    headers = Headers([
        ("Via", invite.headers.get("Via") or ""),
        ("Max-Forwards", "70"),
        *(("Route", r) for r in invite.headers.get_all("Route")),
        ("From", invite.headers.get("From") or ""),
        ("To", response.headers.get("To") or ""),
        ("Call-ID", invite.call_id),
        ("CSeq", f"{cseq.number} ACK"),
    ])
    return Request("ACK", invite.uri, headers)


ClientTransactionType = ClientTransaction | ClientInviteTransaction
_ClientT = TypeVar("_ClientT", ClientTransaction, ClientInviteTransaction)


class TransactionTable:
    """Every live transaction, bounded by ``max_transactions``, fair across sources.

    One source address may hold at most ``transaction_share_per_source`` of
    ``max_transactions`` server transactions (at least one). ``refused``
    counts new requests turned away because the table was full,
    ``refused_share`` those whose source held its share (the caller answers
    both 503). While a source has more than ``unacked_failures_per_source``
    3xx-6xx to INVITE awaiting their ACK, :meth:`handle_timer` sends none of
    them again by Timer G (RFC 3261 §17.2.1; ``None``: no cap), counted in
    ``failure_retransmissions_capped``. Terminated transactions are removed
    by :meth:`handle_timer`. The limits may be changed at any time.
    """

    def __init__(
        self,
        *,
        outbox: Outbox,
        max_transactions: int,
        timers: TimerConfig | None = None,
        transaction_share_per_source: float = 1.0,
        unacked_failures_per_source: int | None = None,
    ) -> None:
        self.max_transactions = max_transactions
        self.timers = timers or TimerConfig()
        self.transaction_share_per_source = transaction_share_per_source
        self.unacked_failures_per_source = unacked_failures_per_source
        self.refused = 0
        self.refused_share = 0
        self.failure_retransmissions_capped = 0
        self._outbox = outbox
        self._server: dict[TransactionKey, ServerTransaction] = {}
        self._client: dict[tuple[str, str], ClientTransactionType] = {}
        self._held: Counter[str] = Counter()  # source host → server transactions held
        # Timers: (deadline, tie-break, transaction), a min-heap. An entry goes stale
        # when its timer fires or is cancelled; it is dropped (and the transaction's
        # next deadline pushed) once it reaches the top, so a wake-up costs
        # O(log n) per due transaction instead of a scan of the table.
        self._timers: list[tuple[float, int, Transaction]] = []
        self._timer_order = itertools.count()

    def __len__(self) -> int:
        return len(self._server) + len(self._client)

    def match_server(self, request: Request, via: Via) -> ServerTransaction | None:
        """The server transaction ``request`` belongs to (§17.2.3; ACK → its INVITE)."""
        return self._server.get(server_key(request, via))

    def match_cancelled_invite(self, cancel: Request, via: Via) -> ServerTransaction | None:
        """The INVITE transaction a CANCEL targets (§9.2: same key, method INVITE)."""
        return self._server.get(server_key(cancel, via, "INVITE"))

    def match_response(self, response: Response) -> ClientTransactionType | None:
        """The client transaction of ``response`` (§17.1.3: branch + CSeq method)."""
        via_value = response.headers.get("Via")
        cseq_value = response.headers.get("CSeq")
        if via_value is None or cseq_value is None:
            return None
        branch = parse_via(via_value).branch
        if branch is None:
            return None
        return self._client.get((branch, parse_cseq(cseq_value).method))

    @property
    def max_per_source(self) -> int:
        """Server transactions one source may hold: its share of the table, at least 1."""
        return max(1, int(self.max_transactions * self.transaction_share_per_source))

    def create_server(
        self, request: Request, via: Via, destination: Address, now: float, *, source_host: str
    ) -> ServerTransaction | None:
        """A new server transaction for a request from ``source_host``, or ``None``.

        ``None`` when the table is full (counted in ``refused``) or the source
        holds its share (counted in ``refused_share``).
        """
        if not self._has_room():
            return None
        if self._held[source_host] >= self.max_per_source:
            self.refused_share += 1
            return None
        txn = ServerTransaction(
            server_key(request, via), request, destination, self._outbox, self.timers, now,
            source_host=source_host,
        )
        self._server[txn.key] = txn
        self._held[source_host] += 1
        self._watch(txn)
        return txn

    def create_client(
        self, request: Request, branch: str, destination: Address, now: float
    ) -> ClientTransaction | None:
        """Start a client non-INVITE transaction (sends ``request`` at once).

        ``branch`` must be the branch of the Via the caller put in ``request``.
        Returns ``None`` (counted in ``refused``) when the table is full.
        """
        return self._start_client(ClientTransaction, request, branch, destination, now)

    def create_client_invite(
        self, request: Request, branch: str, destination: Address, now: float
    ) -> ClientInviteTransaction | None:
        """Start a client INVITE transaction (sends ``request`` at once), like
        :meth:`create_client`; ``None`` (counted in ``refused``) when full."""
        return self._start_client(ClientInviteTransaction, request, branch, destination, now)

    def _start_client(self, kind: type[_ClientT], request: Request, branch: str,
                      destination: Address, now: float) -> _ClientT | None:
        if not self._has_room():
            return None
        key = TransactionKey(branch, "", request.method)
        txn = kind(key, request, destination, self._outbox, self.timers, now)
        self._client[(branch, request.method)] = txn
        self._watch(txn)
        return txn

    def _has_room(self) -> bool:
        if len(self) >= self.max_transactions:
            self.refused += 1
            return False
        return True

    def next_deadline(self) -> float | None:
        """The earliest timer of any transaction (stale heap entries are dropped)."""
        timers = self._timers
        while timers:
            deadline, _, txn = timers[0]
            current = txn.next_deadline()
            if current == deadline:
                return deadline
            heapq.heappop(timers)  # fired, cancelled or replaced by a later timer
            if current is not None:
                self._schedule(txn)
        return None

    def handle_timer(self, now: float) -> list[Transaction]:
        """Fire due timers; remove and return the transactions that terminated."""
        timers = self._timers
        due: dict[int, Transaction] = {}
        while timers and timers[0][0] <= now:
            txn = heapq.heappop(timers)[2]
            due[id(txn)] = txn
        self._cap_failure_retransmissions(due.values(), now)
        ended: list[Transaction] = []
        for txn in due.values():
            txn.handle_timer(now)
            if not txn.terminated:
                self._schedule(txn)
            elif self._remove(txn):
                ended.append(txn)
        return ended

    def _watch(self, txn: Transaction) -> None:
        """Schedule a new transaction's timers, and those its inputs arm later."""
        txn.on_armed = self._schedule
        self._schedule(txn)

    def _schedule(self, txn: Transaction) -> None:
        deadline = txn.next_deadline()
        if deadline is not None:
            heapq.heappush(self._timers, (deadline, next(self._timer_order), txn))

    def _cap_failure_retransmissions(self, due: Iterable[Transaction], now: float) -> None:
        """Cancel the due Timer G of sources with too many un-ACKed 3xx-6xx."""
        limit = self.unacked_failures_per_source
        if limit is None:
            return
        retransmitting = [t for t in due if isinstance(t, ServerTransaction)
                          and t.failure_retransmission_due(now)]
        if not retransmitting:
            return
        unacked = Counter(t.source_host for t in self._server.values() if t.awaiting_failure_ack)
        for txn in retransmitting:
            if unacked[txn.source_host] > limit:
                txn.stop_retransmitting()
                self.failure_retransmissions_capped += 1

    def _remove(self, txn: Transaction) -> bool:
        """Forget a terminated transaction; False when it was already forgotten."""
        if isinstance(txn, ServerTransaction):
            if self._server.get(txn.key) is not txn:
                return False
            del self._server[txn.key]
            self._held[txn.source_host] -= 1
            if not self._held[txn.source_host]:
                del self._held[txn.source_host]  # the counter holds live sources only
            return True
        client_key = (txn.key.branch or "", txn.key.method)
        if self._client.get(client_key) is not txn:
            return False
        del self._client[client_key]
        return True
