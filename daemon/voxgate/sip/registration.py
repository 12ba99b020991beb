"""Registration of voxgate's contact with registrars (RFC 3261 §10.2), sans-IO.

Each binding (one ``[[sip.registrations]]`` entry) keeps one Call-ID and a
CSeq that rises by one per REGISTER (§10.2), and moves through
:class:`BindingState`::

    unregistered ─start─▶ registering ─200─▶ registered ─refresh 200─▶ registered
                              │  ▲                 │
                   failure ───┘  └── retry ◀─ failed ◀── refresh failure
    registered ─stop─▶ unregistering ─final response or timeout─▶ unregistered

A 401/407 is answered once with digest credentials (RFC 7616, qop=auth,
SHA-256 or MD5, a fresh cnonce and the nonce count); a second challenge to
the answer is a failure unless it says ``stale=true``. A 423 Interval Too
Brief is retried at once with its Min-Expires (at most :data:`MAX_EXPIRES_S`).
One try sends at most :data:`MAX_FOLLOW_UPS` such follow-up REGISTERs.
A 2xx grants the ``expires`` of our Contact in it, else its Expires header,
else what we asked (§10.2.4); the binding is refreshed at half of that. Any
other final status, or no final response (Timer F), is a failure: the next
try waits :func:`voxgate.backoff.backoff_delay_s` from the binding's
``retry_initial_s`` to ``retry_max_s``, or the response's Retry-After when
that is longer. :meth:`RegistrationClient.stop` removes every binding with
``Expires: 0`` for its own Contact (§10.2.2) and tries nothing more.

The transactions are not ours: :meth:`RegistrationClient.requests_to_send`
hands out each REGISTER (top Via and branch already set) for the UAS core's
client non-INVITE transaction (Timer E retransmissions, Timer F), and
:meth:`RegistrationClient.receive_response` takes its final response, or
``None`` when none came. Time is the caller's ``now`` (monotonic seconds).
"""

from __future__ import annotations

import enum
import secrets
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from voxgate.backoff import Backoff
from voxgate.errors import RemoteProtocolError
from voxgate.sip.digest import ChallengeAnswerer, Credential
from voxgate.sip.headers import parse_name_addr, parse_uint
from voxgate.sip.message import Headers, Request, Response
from voxgate.sip.transaction import MAGIC_COOKIE
from voxgate.sip.uri import parse_uri_untrusted

Address = tuple[str, int]

MAX_EXPIRES_S = 86_400
"""Longest registration we ask for, also after a 423's Min-Expires (seconds)."""
MAX_FOLLOW_UPS = 4
"""REGISTERs one try may send after its first (challenge answers, 423 re-asks): a
registrar that keeps answering stale=true or raising Min-Expires fails the try."""
_MAX_WARNING_CHARS = 100


class BindingState(enum.Enum):
    UNREGISTERED = "unregistered"
    REGISTERING = "registering"
    REGISTERED = "registered"
    FAILED = "failed"
    UNREGISTERING = "unregistering"


STATES = tuple(state.value for state in BindingState)
"""Every state's name, for the one-hot state gauge."""
RESULTS = ("ok", "challenge", "interval_too_brief", "rejected", "timeout")
"""How a REGISTER ended, as counted: a 2xx, a 401/407 challenge, a 423, another
final status, no final response."""


@dataclass(frozen=True, slots=True)
class BindingSettings:
    """One binding: REGISTER ``registrar_uri`` (sent to ``registrar``, an IP address
    and port) binding ``contact_uri`` to ``aor`` for ``expires_s`` seconds, with
    ``credentials`` (possibly none) for challenges; failures retried after
    ``retry_initial_s`` doubling up to ``retry_max_s``."""

    registrar_uri: str
    registrar: Address
    aor: str
    contact_uri: str
    credentials: tuple[Credential, ...]
    expires_s: int
    retry_initial_s: float
    retry_max_s: float


@dataclass(frozen=True, slots=True)
class OutgoingRequest:
    """A REGISTER to start a client transaction with; ``branch`` is its top Via's."""

    request: Request
    branch: str
    destination: Address


@dataclass(frozen=True, slots=True)
class BindingStatus:
    """A binding as ``voxgatectl registrations`` shows it; times in seconds from now
    (``None``: not registered, nothing planned)."""

    aor: str
    registrar: str
    contact: str
    state: str
    expires_in_s: float | None
    next_try_in_s: float | None
    last_status: int | None
    last_error: str
    failures: int


class _Binding:
    def __init__(self, settings: BindingSettings, call_id: str, from_tag: str) -> None:
        self.settings = settings
        self.call_id = call_id
        self.from_tag = from_tag
        self.cseq = 0
        self.state = BindingState.UNREGISTERED
        self.expires_s = settings.expires_s  # raised by a 423's Min-Expires
        self.registered_until: float | None = None
        self.next_try_at: float | None = None  # refresh or retry
        self.in_flight: str | None = None  # branch of the REGISTER awaiting its answer
        self.requested_expires = 0
        self.challenges = ChallengeAnswerer()  # its ``authorized``: the REGISTER in flight
        self.follow_ups = 0  # REGISTERs of this try after its first
        self.last_status: int | None = None
        self.last_error = ""
        self.backoff = Backoff()
        self.stopping = False


class RegistrationClient:
    """Every binding's REGISTER requests, refreshes, retries and removal.

    ``via_host_port`` is our ``host:port`` for the Via (the advertised SIP
    address); ``random_token`` makes Call-IDs, tags, branches and cnonces
    (default: 64 random bits, hex). ``counts`` holds the REGISTER outcomes by
    (registrar URI, aor, result in :data:`RESULTS`). At most one REGISTER per binding is in
    flight (§10.2: a UA does not send a new registration before the previous
    one's final response).
    """

    def __init__(
        self,
        bindings: Sequence[BindingSettings],
        *,
        via_host_port: str,
        user_agent: str = "voxgate",
        random_token: Callable[[], str] | None = None,
    ) -> None:
        self._token = random_token or (lambda: secrets.token_hex(8))
        self._via_host_port = via_host_port
        self._user_agent = user_agent
        self._bindings = [_Binding(s, f"{self._token()}{self._token()}", self._token())
                          for s in bindings]
        self._by_branch: dict[str, _Binding] = {}
        self._outgoing: list[OutgoingRequest] = []
        self.counts: Counter[tuple[str, str, str]] = Counter()

    # --- the driver's surface ------------------------------------------------------------

    def start(self, now: float) -> None:
        """Register every binding not registered or registering yet (and not stopped)."""
        for b in self._bindings:
            if b.in_flight is None and not b.stopping and b.state is BindingState.UNREGISTERED:
                b.state = BindingState.REGISTERING
                self._send(b, b.expires_s)

    def stop(self, now: float) -> None:
        """Remove every binding that may be registered (REGISTER with ``Expires: 0``) and
        plan nothing more; a REGISTER still in flight is followed by the removal when it
        succeeds. Done when :attr:`pending` is False."""
        for b in self._bindings:
            b.stopping = True
            b.next_try_at = None
            if b.in_flight is not None:
                continue
            if b.registered_until is not None and b.registered_until > now:
                self._unregister(b)
            else:
                b.state = BindingState.UNREGISTERED

    @property
    def pending(self) -> bool:
        """Whether a REGISTER is in flight or waiting to be sent."""
        return bool(self._outgoing) or any(b.in_flight is not None for b in self._bindings)

    def requests_to_send(self) -> list[OutgoingRequest]:
        """The REGISTER requests to start client transactions with, oldest first."""
        out, self._outgoing = self._outgoing, []
        return out

    def receive_response(self, branch: str, response: Response | None, now: float) -> None:
        """The final response to the REGISTER with top Via ``branch``, or ``None`` when
        none came (Timer F, or no transaction could be started). Unknown branches are
        ignored."""
        b = self._by_branch.pop(branch, None)
        if b is None:
            return
        b.in_flight = None
        if response is None:
            self._count(b, "timeout")
            b.last_status = None
            self._fail(b, now, "no final response (Timer F)")
            return
        status = response.status
        b.last_status = status
        if 200 <= status < 300:
            self._count(b, "ok")
            self._succeeded(b, response, now)
        elif status in (401, 407, 423):
            self._count(b, "interval_too_brief" if status == 423 else "challenge")
            if b.follow_ups >= MAX_FOLLOW_UPS:
                self._fail(b, now, f"{status} again after {MAX_FOLLOW_UPS} follow-up REGISTERs")
            elif status == 423:
                self._too_brief(b, response, now)
            else:
                self._challenged(b, response, now)
        else:
            self._count(b, "rejected")
            warning = response.headers.get("Warning") or ""
            detail = f"{status} {response.reason}" + (f" ({warning})" if warning else "")
            self._fail(b, now, detail[:_MAX_WARNING_CHARS], _retry_after_s(response))

    def next_deadline(self) -> float | None:
        """When :meth:`handle_timer` must next run (monotonic seconds), or ``None``."""
        return min((b.next_try_at for b in self._bindings if b.next_try_at is not None),
                   default=None)

    def handle_timer(self, now: float) -> None:
        """Refresh or retry the bindings whose time has come."""
        for b in self._bindings:
            if b.next_try_at is None or b.next_try_at > now or b.in_flight is not None:
                continue
            b.next_try_at = None
            if b.state is not BindingState.REGISTERED:
                b.state = BindingState.REGISTERING
            self._send(b, b.expires_s)

    def statuses(self, now: float) -> list[BindingStatus]:
        """Every binding's state, in configuration order."""
        return [BindingStatus(
            aor=b.settings.aor, registrar=b.settings.registrar_uri,
            contact=b.settings.contact_uri, state=b.state.value,
            expires_in_s=None if b.registered_until is None
            else max(0.0, b.registered_until - now),
            next_try_in_s=None if b.next_try_at is None else max(0.0, b.next_try_at - now),
            last_status=b.last_status, last_error=b.last_error, failures=b.backoff.failures,
        ) for b in self._bindings]

    # --- outcomes --------------------------------------------------------------------------

    def _count(self, b: _Binding, result: str) -> None:
        self.counts[b.settings.registrar_uri, b.settings.aor, result] += 1

    def _succeeded(self, b: _Binding, response: Response, now: float) -> None:
        if b.requested_expires == 0:  # our removal (§10.2.2)
            b.state, b.registered_until, b.last_error = BindingState.UNREGISTERED, None, ""
            return
        granted = _granted_expires_s(response, b.settings.contact_uri, b.requested_expires)
        if granted <= 0:
            self._fail(b, now, "the registrar kept no binding for our Contact")
            return
        b.state, b.registered_until, b.last_error = BindingState.REGISTERED, now + granted, ""
        b.backoff.reset()
        if b.stopping:
            self._unregister(b)
        else:
            b.next_try_at = now + granted / 2

    def _challenged(self, b: _Binding, response: Response, now: float) -> None:
        """Answer a 401/407 with credentials (§22.2, §22.3), once per challenge."""
        name = "Proxy-Authenticate" if response.status == 407 else "WWW-Authenticate"
        answer = b.challenges.answer(response.status, response.headers.get_all(name),
                                     b.settings.credentials, "REGISTER",
                                     b.settings.registrar_uri, cnonce=self._token())
        if isinstance(answer, str):
            self._fail(b, now, answer)
            return
        self._send(b, b.requested_expires, authorization=answer, follow_up=True)

    def _too_brief(self, b: _Binding, response: Response, now: float) -> None:
        """423: ask again for the registrar's Min-Expires (§10.2.8, §20.23)."""
        try:
            minimum = parse_uint(response.headers.get("Min-Expires") or "", MAX_EXPIRES_S,
                                 "Min-Expires")
        except RemoteProtocolError as e:
            self._fail(b, now, f"423 without a usable Min-Expires: {e.reason}")
            return
        if minimum <= b.requested_expires or b.requested_expires == 0:
            self._fail(b, now, f"423 with Min-Expires {minimum} not above "
                                    f"{b.requested_expires}")
            return
        b.expires_s = minimum
        self._send(b, minimum, follow_up=True)

    def _fail(self, b: _Binding, now: float, error: str, retry_after_s: int = 0) -> None:
        """The try failed: retry after the backoff delay, or ``retry_after_s`` (the
        registrar's Retry-After, §20.33) when that is longer; stopping: give up."""
        b.last_error = error
        if b.stopping:
            b.state, b.registered_until = BindingState.UNREGISTERED, None
            return
        b.state = BindingState.FAILED
        delay = b.backoff.delay_s(b.settings.retry_initial_s, b.settings.retry_max_s)
        b.next_try_at = now + max(delay, retry_after_s)

    # --- requests --------------------------------------------------------------------------

    def _unregister(self, b: _Binding) -> None:
        b.state = BindingState.UNREGISTERING
        self._send(b, 0)

    def _send(self, b: _Binding, expires_s: int, *,
              authorization: tuple[str, str] | None = None, follow_up: bool = False) -> None:
        """Queue the binding's next REGISTER (§10.2): same Call-ID, CSeq + 1, our
        Contact with ``expires_s`` (0: removal); ``follow_up``: in the same try (after a
        challenge or a 423), else a new try."""
        s = b.settings
        b.cseq += 1
        branch = MAGIC_COOKIE + self._token()
        headers = Headers([
            ("Via", f"SIP/2.0/UDP {self._via_host_port};branch={branch};rport"),
            ("Max-Forwards", "70"),
            ("From", f"<{s.aor}>;tag={b.from_tag}"),
            ("To", f"<{s.aor}>"),
            ("Call-ID", b.call_id),
            ("CSeq", f"{b.cseq} REGISTER"),
            ("Contact", f"<{s.contact_uri}>;expires={expires_s}"),
            ("Expires", str(expires_s)),
            ("User-Agent", self._user_agent),
        ])
        if authorization is not None:
            headers.add(*authorization)
        b.in_flight, b.requested_expires = branch, expires_s
        b.challenges.authorized = authorization is not None
        b.follow_ups = b.follow_ups + 1 if follow_up else 0
        self._by_branch[branch] = b
        self._outgoing.append(OutgoingRequest(Request("REGISTER", s.registrar_uri, headers),
                                              branch, s.registrar))


def _granted_expires_s(response: Response, contact_uri: str, requested: int) -> int:
    """The seconds a 2xx grants our Contact (§10.2.4): its ``expires`` parameter there,
    else the Expires header, else ``requested``. Unparsable values are skipped."""
    ours = _uri_key(contact_uri)
    for value in response.headers.get_all("Contact"):
        try:
            contact = parse_name_addr(value)
            if _uri_key(contact.uri) != ours:
                continue
            expires = contact.params.get("expires")
            if expires is not None:
                return parse_uint(expires, MAX_EXPIRES_S * 365, "Contact expires")
        except RemoteProtocolError:
            continue
    header = response.headers.get("Expires")
    if header is not None:
        try:
            return parse_uint(header, MAX_EXPIRES_S * 365, "Expires")
        except RemoteProtocolError:
            pass
    return requested


def _retry_after_s(response: Response) -> int:
    """The Retry-After delta-seconds (at most :data:`MAX_EXPIRES_S`; comment and
    parameters ignored), 0 when absent or unparsable."""
    value = (response.headers.get("Retry-After") or "").split("(", 1)[0].split(";", 1)[0]
    try:
        return parse_uint(value, MAX_EXPIRES_S, "Retry-After")
    except RemoteProtocolError:
        return 0


def _uri_key(uri: str) -> tuple[str, str | None, str, int]:
    """What makes two contact URIs the same binding here: scheme, user, host, port."""
    parsed = parse_uri_untrusted(uri)
    return (parsed.scheme, parsed.user, parsed.host.lower(), parsed.port or 5060)
