"""Call admission: whether a call is taken, before any work is spent on it; sans-IO.

Every transport (SIP now; WebSocket and ALSA later) asks one :class:`Admission`
with a caller-chosen ticket and a :class:`CallInfo`. The answer is a
:class:`Decision`: :class:`Admitted` (go on), :class:`Queued` (wait; the
answer comes later from :meth:`Admission.release`, :meth:`Admission.update_limits`
or :meth:`Admission.handle_timer`) or :class:`Refusal` (answer it with
``sip_status`` and ``Retry-After: retry_after_s``).

A call belongs to the first configured tenant whose rules all match it, else
to :data:`DEFAULT_TENANT`. Gates are checked in this order::

    any component unhealthy   -> refuse "unhealthy"      503 + Retry-After
    draining                  -> refuse "draining"       503 + Retry-After
    memory gate closed        -> refuse "memory"         503 + Retry-After
    tenant at its cap         -> queue, or "tenant-full" 486 (RFC 3261 §21.4.24)
    global max_sessions hit   -> queue, or "full"        503 + Retry-After (§21.5.4, §20.33)
    otherwise                 -> admit

Queued calls wait FIFO within a tenant and round-robin across tenants, until
their deadline (``queue_timeout_s`` after arrival, fixed when queued). One
that times out blocked by its tenant cap is refused ``tenant-full``, one
blocked by the global cap ``queue-timeout``. When a gate closes, every
queued call becomes due at once and :meth:`Admission.handle_timer` refuses it
with that gate's reason (``next_deadline`` then returns a time in the past).

The object never lets the admitted count (granted, not yet released) grow
past ``max_sessions`` or a tenant's cap, whatever the call order; lowering a
cap ends nobody. Times are monotonic seconds passed in as ``now``.
"""

from __future__ import annotations

import math
from collections import Counter, deque
from collections.abc import Mapping
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import Final

from voxgate.cidr import IPNetwork, parse_networks, source_in
from voxgate.config import Config
from voxgate.errors import LocalProtocolError

DEFAULT_TENANT: Final = "default"
"""The tenant of a call that matches no configured tenant."""

# Refusal reasons.
TENANT_FULL: Final = "tenant-full"
FULL: Final = "full"
UNHEALTHY: Final = "unhealthy"
DRAINING: Final = "draining"
MEMORY: Final = "memory"
QUEUE_TIMEOUT: Final = "queue-timeout"

REFUSAL_ANSWERS: Final[Mapping[str, tuple[int, bool]]] = MappingProxyType({
    # reason: (SIP status, Retry-After sent)
    TENANT_FULL: (486, False),   # Busy Here: this tenant, not the box, is busy
    FULL: (503, True),           # Service Unavailable: a proxy may try another box
    UNHEALTHY: (503, True),
    DRAINING: (503, True),
    MEMORY: (503, True),
    QUEUE_TIMEOUT: (503, True),
})
"""Refusal reason → (SIP status, whether ``Retry-After`` is sent)."""

ADMITTING: Final = "admitting"
ADMISSION_STATES: Final = (ADMITTING, DRAINING, FULL, UNHEALTHY)
"""What :meth:`Admission.state` returns (the metric ``voxgate_admission_state``)."""

# Counter key results; the reason of admitted/dequeued is OK, of queued the
# cap it waits on, of cancelled CANCEL.
ADMITTED: Final = "admitted"
QUEUED: Final = "queued"
REFUSED: Final = "refused"
DEQUEUED: Final = "dequeued"
CANCELLED: Final = "cancelled"
OK: Final = "ok"
CANCEL: Final = "cancel"


def _check_cap(what: str, value: int | None) -> None:
    if value is not None and value < 0:
        raise LocalProtocolError(f"{what} must be >= 0, not {value}")


@dataclass(frozen=True, slots=True)
class CallInfo:
    """What admission may look at in a call.

    ``ruri_user`` is the request-URI's user part, unescaped; ``headers`` maps
    lower-case header names to their first value; ``source_ip`` is the
    packet's source address as text (IPv4 or IPv6).
    """

    ruri_user: str | None
    ruri_host: str | None
    headers: Mapping[str, str]
    source_ip: str | None
    transport: str = "sip"
    tenant_hint: str | None = None
    """A tenant named by the transport itself (an ALSA line's ``tenant``, a
    WebSocket stream's ``customParameters.tenant``); used when configured."""


@dataclass(frozen=True, slots=True)
class TenantRule:
    """One tenant: its cap and the rules that put a call in it.

    Every rule given must match (AND); a tenant with no rules never matches.
    ``ruri_user`` and the header value match exactly and case-sensitively;
    ``ruri_host`` and the header name case-insensitively; ``source_cidrs``
    matches if the source address lies in any of them (an IPv4-mapped IPv6
    address also counts as its IPv4 address). ``max_sessions`` None: no cap of
    its own below the global one.

    Raises:
        LocalProtocolError: empty or reserved (``default``) name, negative cap.
    """

    name: str
    max_sessions: int | None = None
    ruri_user: str | None = None
    ruri_host: str | None = None
    header: tuple[str, str] | None = None
    source_cidrs: tuple[IPNetwork, ...] = ()

    def __post_init__(self) -> None:
        if not self.name or self.name == DEFAULT_TENANT:
            raise LocalProtocolError(f"tenant name {self.name!r} is empty or reserved")
        _check_cap(f"tenant {self.name} max_sessions", self.max_sessions)

    def matches(self, call: CallInfo) -> bool:
        """True if this tenant has rules and every one of them holds for ``call``."""
        checks: list[bool] = []
        if self.ruri_user is not None:
            checks.append(call.ruri_user == self.ruri_user)
        if self.ruri_host is not None:
            host = call.ruri_host
            checks.append(host is not None and host.casefold() == self.ruri_host.casefold())
        if self.header is not None:
            name, value = self.header
            checks.append(call.headers.get(name.lower()) == value)
        if self.source_cidrs:
            checks.append(source_in(call.source_ip, self.source_cidrs))
        return bool(checks) and all(checks)


@dataclass(frozen=True, slots=True)
class AdmissionLimits:
    """Limits and tenants (``[limits]`` and ``[[tenants]]`` of the config).

    ``max_sessions``: admitted calls at once; ``queue_size``: waiting calls,
    summed over tenants (0: no queue); ``queue_timeout_s``: longest wait;
    ``retry_after_s``: the 503 ``Retry-After`` value (RFC 3261 §20.33);
    ``default_tenant_max_sessions``: cap of :data:`DEFAULT_TENANT` (None: only
    the global cap). Tenant caps may add up to more than ``max_sessions``.

    Raises:
        LocalProtocolError: a negative size, a non-positive timeout, or two
            tenants with one name.
    """

    max_sessions: int
    queue_size: int = 0
    queue_timeout_s: float = 10.0
    retry_after_s: int = 5
    default_tenant_max_sessions: int | None = None
    tenants: tuple[TenantRule, ...] = ()

    def __post_init__(self) -> None:
        for what, value in (("max_sessions", self.max_sessions),
                            ("queue_size", self.queue_size),
                            ("retry_after_s", self.retry_after_s),
                            ("default_tenant_max_sessions", self.default_tenant_max_sessions)):
            _check_cap(what, value)
        if not (self.queue_timeout_s > 0 and math.isfinite(self.queue_timeout_s)):
            raise LocalProtocolError(f"queue_timeout_s must be > 0, not {self.queue_timeout_s}")
        names = [tenant.name for tenant in self.tenants]
        if len(set(names)) != len(names):
            raise LocalProtocolError(f"tenant names are not unique: {names}")


@dataclass(frozen=True, slots=True)
class Admitted:
    """Go on with the call; ``waited_s``: seconds it spent queued (0.0 if never)."""

    ticket: str
    tenant: str
    waited_s: float


@dataclass(frozen=True, slots=True)
class Queued:
    """The call waits; ``position``: 1-based place in its tenant's queue."""

    ticket: str
    tenant: str
    position: int


@dataclass(frozen=True, slots=True)
class Refusal:
    """Refuse the call: answer ``sip_status``, with ``Retry-After: retry_after_s`` unless None.

    ``reason`` is a key of :data:`REFUSAL_ANSWERS`; ``waited_s``: seconds it
    spent queued (0.0 if never).
    """

    ticket: str
    tenant: str
    reason: str
    sip_status: int
    retry_after_s: int | None
    waited_s: float


Decision = Admitted | Queued | Refusal


@dataclass(frozen=True, slots=True)
class ComponentHealth:
    """A component's last health report."""

    healthy: bool
    detail: str = ""


@dataclass(frozen=True, slots=True)
class TenantStatistics:
    """One tenant's admitted and queued calls, and its cap (None: none of its own)."""

    active: int
    queued: int
    max_sessions: int | None


@dataclass(frozen=True, slots=True)
class AdmissionStatistics:
    """A snapshot for ``voxgatectl status``; the dicts are copies.

    ``by_tenant`` holds every configured tenant and :data:`DEFAULT_TENANT`,
    plus any tenant removed by a reload that still has admitted calls.
    ``counters``: (result, reason, tenant) → decisions taken.
    """

    active: int
    queued: int
    max_sessions: int
    queue_size: int
    draining: bool
    health: dict[str, ComponentHealth]
    memory_ok: bool
    memory_detail: str
    by_tenant: dict[str, TenantStatistics]
    counters: dict[tuple[str, str, str], int]


@dataclass(frozen=True, slots=True, eq=False)
class _Waiter:
    ticket: str
    call: CallInfo
    tenant: str
    enqueued_at: float
    deadline: float


class Admission:
    """Admission control for every transport; sans-IO, single-threaded.

    Tables are bounded: admitted calls by ``max_sessions`` (or the higher cap
    they were admitted under), queued calls by ``queue_size``, counters by the
    (result, reason, tenant) combinations, tenant names coming from config only.
    """

    __slots__ = ("_active", "_active_by_tenant", "_caps", "_counters", "_draining", "_due",
                 "_health", "_limits", "_memory", "_queues", "_waiting")

    def __init__(self, limits: AdmissionLimits) -> None:
        self._active: dict[str, str] = {}  # ticket -> tenant it was admitted under
        self._active_by_tenant: Counter[str] = Counter()
        # tenant -> its waiters, FIFO; dict order is the round-robin order.
        self._queues: dict[str, deque[_Waiter]] = {}
        self._waiting: dict[str, _Waiter] = {}  # ticket -> waiter, in arrival order
        self._due: dict[str, tuple[_Waiter, str]] = {}  # queued when a gate closed -> reason
        self._health: dict[str, ComponentHealth] = {}
        self._draining = False
        self._memory = ComponentHealth(True)
        self._counters: Counter[tuple[str, str, str]] = Counter()
        self._set_limits(limits)

    def _set_limits(self, limits: AdmissionLimits) -> None:
        self._limits = limits
        self._caps: dict[str, int | None] = {t.name: t.max_sessions for t in limits.tenants}
        self._caps[DEFAULT_TENANT] = limits.default_tenant_max_sessions

    @property
    def limits(self) -> AdmissionLimits:
        """The limits in force."""
        return self._limits

    @property
    def counters(self) -> Mapping[tuple[str, str, str], int]:
        """(result, reason, tenant) → decisions taken; a live read-only view."""
        return MappingProxyType(self._counters)

    def classify(self, call: CallInfo) -> str:
        """The tenant ``call`` names (when configured), else the first configured tenant
        matching it, else ``default``."""
        if call.tenant_hint is not None and (
            call.tenant_hint == DEFAULT_TENANT
            or any(t.name == call.tenant_hint for t in self._limits.tenants)
        ):
            return call.tenant_hint
        return next((t.name for t in self._limits.tenants if t.matches(call)), DEFAULT_TENANT)

    def request(self, ticket: str, call: CallInfo, now: float) -> Decision:
        """Decide on a new call, in the gate order of the module docstring.

        Raises:
            LocalProtocolError: ``ticket`` is admitted, queued or due already.
        """
        if ticket in self._active or ticket in self._waiting or ticket in self._due:
            raise LocalProtocolError(f"admission ticket {ticket!r} is in use")
        tenant = self.classify(call)
        closed = self._closed_by()
        if closed is not None:
            return self._refuse(ticket, tenant, closed, 0.0)
        cap = self._blocking_cap(tenant)
        if cap is None:
            return self._admit(ticket, tenant, 0.0, ADMITTED)
        if len(self._waiting) >= self._limits.queue_size:
            return self._refuse(ticket, tenant, cap, 0.0)
        waiter = _Waiter(ticket, call, tenant, now, now + self._limits.queue_timeout_s)
        self._enqueue(waiter)
        self._counters[QUEUED, cap, tenant] += 1
        return Queued(ticket, tenant, len(self._queues[tenant]))

    def release(self, ticket: str, now: float) -> list[Admitted]:
        """An admitted call ended; returns the queued calls admitted in its place.

        Raises:
            LocalProtocolError: ``ticket`` is not admitted.
        """
        tenant = self._active.pop(ticket, None)
        if tenant is None:
            raise LocalProtocolError(f"admission ticket {ticket!r} is not admitted")
        self._active_by_tenant[tenant] -= 1
        if not self._active_by_tenant[tenant]:
            del self._active_by_tenant[tenant]
        return self._pump(now)

    def cancel(self, ticket: str, now: float) -> bool:
        """A queued call was cancelled (SIP CANCEL); True if it was queued or due.

        An admitted or unknown ticket is left alone (False): CANCEL races the
        answer (RFC 3261 §9.2). ``now`` is the time of the CANCEL.
        """
        waiter = self._waiting.get(ticket)
        if waiter is not None:
            self._dequeue(waiter)
        elif ticket in self._due:
            waiter = self._due.pop(ticket)[0]
        else:
            return False
        self._counters[CANCELLED, CANCEL, waiter.tenant] += 1
        return True

    def next_deadline(self) -> float | None:
        """When :meth:`handle_timer` is next due (in the past: at once); None if never."""
        deadlines = [waiter.enqueued_at for waiter, _ in self._due.values()]
        deadlines.extend(waiter.deadline for waiter in self._waiting.values())
        return min(deadlines, default=None)

    def handle_timer(self, now: float) -> list[Refusal]:
        """Refuse the queued calls due by ``now``, oldest first; answer each one."""
        refused = [self._refuse(waiter.ticket, waiter.tenant, reason, now - waiter.enqueued_at)
                   for waiter, reason in self._due.values()]
        self._due.clear()
        for waiter in [w for w in self._waiting.values() if w.deadline <= now]:
            self._dequeue(waiter)
            at_tenant_cap = self._blocking_cap(waiter.tenant) == TENANT_FULL
            reason = TENANT_FULL if at_tenant_cap else QUEUE_TIMEOUT
            refused.append(self._refuse(waiter.ticket, waiter.tenant, reason,
                                        now - waiter.enqueued_at))
        return refused

    def update_limits(self, limits: AdmissionLimits, now: float) -> list[Admitted]:
        """Apply reloaded limits and tenants; returns the queued calls admitted now.

        Admitted calls keep their tenant and are never ended; a lowered cap
        admits nobody until the count is below it. Queued calls are classified
        again under the new tenants, keeping their arrival order and deadline;
        a lowered ``queue_size`` only stops new calls from queueing.
        """
        self._set_limits(limits)
        waiters = list(self._waiting.values())
        self._waiting.clear()
        self._queues.clear()
        for waiter in waiters:
            self._enqueue(replace(waiter, tenant=self.classify(waiter.call)))
        return self._pump(now)

    def set_health(self, component: str, healthy: bool, detail: str = "") -> None:
        """Record a component's health; while any is unhealthy, refuse ``unhealthy``."""
        self._health[component] = ComponentHealth(healthy, detail)
        self._close_queue_if_gated()

    def set_draining(self, draining: bool) -> None:
        """Open or close the drain gate (SIGTERM: refuse ``draining``)."""
        self._draining = draining
        self._close_queue_if_gated()

    def set_memory_ok(self, ok: bool, detail: str = "") -> None:
        """Open or close the memory gate (set by the budget; closed: refuse ``memory``)."""
        self._memory = ComponentHealth(ok, detail)
        self._close_queue_if_gated()

    def availability(self) -> tuple[bool, str | None]:
        """(admitting?, reason when not) for SIP OPTIONS probes.

        Not admitting when a gate is closed (``unhealthy``/``draining``/
        ``memory``) or when ``max_sessions`` is reached and the queue has no
        room (``full``). Tenant caps are not considered.
        """
        closed = self._closed_by()
        if closed is not None:
            return False, closed
        if len(self._active) >= self._limits.max_sessions \
                and len(self._waiting) >= self._limits.queue_size:
            return False, FULL
        return True, None

    def state(self) -> str:
        """One of :data:`ADMISSION_STATES`, for dashboards and alerts: ``draining``
        while the drain gate is closed (whatever else holds), else what
        :meth:`availability` says, the memory gate counting as ``full``."""
        if self._draining:
            return DRAINING
        admitting, why = self.availability()
        if admitting:
            return ADMITTING
        return UNHEALTHY if why == UNHEALTHY else FULL

    def statistics(self) -> AdmissionStatistics:
        """A frozen snapshot of counts, limits, gates and counters."""
        names = dict.fromkeys([*self._caps, *self._active_by_tenant])
        by_tenant = {
            name: TenantStatistics(self._active_by_tenant[name],
                                   len(self._queues.get(name, ())), self._caps.get(name))
            for name in names
        }
        return AdmissionStatistics(
            active=len(self._active), queued=len(self._waiting),
            max_sessions=self._limits.max_sessions, queue_size=self._limits.queue_size,
            draining=self._draining, health=dict(self._health),
            memory_ok=self._memory.healthy, memory_detail=self._memory.detail,
            by_tenant=by_tenant, counters=dict(self._counters),
        )

    def _closed_by(self) -> str | None:
        """The first closed gate's refusal reason, or None when all are open."""
        if not all(health.healthy for health in self._health.values()):
            return UNHEALTHY
        if self._draining:
            return DRAINING
        if not self._memory.healthy:
            return MEMORY
        return None

    def _blocking_cap(self, tenant: str) -> str | None:
        """The cap that stops ``tenant`` from admitting one more call, or None."""
        cap = self._caps.get(tenant)
        if cap is not None and self._active_by_tenant[tenant] >= cap:
            return TENANT_FULL
        if len(self._active) >= self._limits.max_sessions:
            return FULL
        return None

    def _admit(self, ticket: str, tenant: str, waited_s: float, result: str) -> Admitted:
        self._active[ticket] = tenant
        self._active_by_tenant[tenant] += 1
        self._counters[result, OK, tenant] += 1
        return Admitted(ticket, tenant, waited_s)

    def _refuse(self, ticket: str, tenant: str, reason: str, waited_s: float) -> Refusal:
        self._counters[REFUSED, reason, tenant] += 1
        status, sends_retry_after = REFUSAL_ANSWERS[reason]
        retry_after_s = self._limits.retry_after_s if sends_retry_after else None
        return Refusal(ticket, tenant, reason, status, retry_after_s, waited_s)

    def _enqueue(self, waiter: _Waiter) -> None:
        self._waiting[waiter.ticket] = waiter
        self._queues.setdefault(waiter.tenant, deque()).append(waiter)

    def _dequeue(self, waiter: _Waiter) -> None:
        del self._waiting[waiter.ticket]
        queue = self._queues[waiter.tenant]
        queue.remove(waiter)
        if not queue:
            del self._queues[waiter.tenant]

    def _pump(self, now: float) -> list[Admitted]:
        """Admit queued calls while caps allow: FIFO per tenant, round-robin across.

        No gate check: while a gate is closed the queue is empty (all due).
        """
        admitted: list[Admitted] = []
        while (tenant := next((t for t in self._queues if self._blocking_cap(t) is None),
                              None)) is not None:
            waiter = self._queues[tenant][0]
            self._dequeue(waiter)
            if tenant in self._queues:  # served: to the back of the round
                self._queues[tenant] = self._queues.pop(tenant)
            admitted.append(self._admit(waiter.ticket, tenant, now - waiter.enqueued_at,
                                        DEQUEUED))
        return admitted

    def _close_queue_if_gated(self) -> None:
        """A gate closed: every queued call becomes due, to be refused with its reason."""
        closed = self._closed_by()
        if closed is None:
            return
        for waiter in self._waiting.values():
            self._due[waiter.ticket] = (waiter, closed)
        self._waiting.clear()
        self._queues.clear()


def limits_from_config(config: Config) -> AdmissionLimits:
    """The ``[limits]`` and ``[[tenants]]`` of a validated config as AdmissionLimits.

    In the file, 0 means "no cap of its own" and "" means "no such rule".
    """
    limits = config.limits
    return AdmissionLimits(
        max_sessions=limits.max_sessions,
        queue_size=limits.queue_size,
        queue_timeout_s=limits.queue_timeout_s,
        retry_after_s=limits.retry_after_s,
        default_tenant_max_sessions=limits.default_tenant_max_sessions or None,
        tenants=tuple(
            TenantRule(
                name=t.name,
                max_sessions=t.max_sessions or None,
                ruri_user=t.ruri_user or None,
                ruri_host=t.ruri_host or None,
                header=(t.header_name, t.header_value) if t.header_name else None,
                source_cidrs=parse_networks(t.source_cidrs),
            )
            for t in config.tenants
        ),
    )
