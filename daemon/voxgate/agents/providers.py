"""Health of the bot providers a call can be bridged to: a sans-IO circuit breaker.

voxgate bridges each call to one of the WebSocket providers listed, in priority
order, in the config. :class:`ProviderSet` tracks whether each one works and
tells a new session in which order to try them. It follows the common
circuit-breaker pattern (closed → open → half-open) with a gradual ramp instead
of a single half-open trial::

    healthy ──(unhealthy_after_errors errors in a row)──▶ unhealthy
    unhealthy ──(probe ok, or a session connected)──▶ ramping at ramp_shares[0]
    ramping ──(ramp_step_s without an error)──▶ next share … ──▶ healthy
    ramping ──(unhealthy_after_errors errors in a row)──▶ unhealthy

Rules:

- Errors are counted per provider; their kind is a free string from the driver
  ("connect", "handshake", "early-close", "probe", …). A success resets the
  consecutive count; a failure while ramping also restarts the current step's
  timer, so only error-free time advances a ramp.
- A ramping provider moves to the next share ``ramp_step_s`` after its step
  began. Reaching a share >= 1.0, or running past the last share, makes it
  healthy: with the default ``(0.1, 0.5, 1.0)`` it serves 10 % for 30 s, 50 %
  for 30 s, then is healthy. Steps missed between calls are caught up exactly
  (each step starts when the previous one ended, not when it was noticed).
- Every method that takes ``now`` first advances the ramps to ``now``
  (:meth:`ProviderSet.tick` does only that); the methods without ``now``
  (:meth:`~ProviderSet.share`, :attr:`~ProviderSet.all_unhealthy`) report the
  state as of the last such call.
- An unhealthy provider gets no sessions. It is due for a probe
  ``probe_interval_s`` after it became unhealthy and after each failed probe
  (a fixed interval); :meth:`ProviderSet.probes_due` hands each due probe out
  once, until :meth:`ProviderSet.probe_result` reports it.

Pure code: no trio import and no clock reads. Every ``now`` is in monotonic
seconds; :meth:`ProviderSet.next_deadline` tells a driver when to call
:meth:`ProviderSet.tick` or :meth:`ProviderSet.probes_due` next.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

HEALTHY = "healthy"
UNHEALTHY = "unhealthy"
RAMPING = "ramping"

MAX_PENDING_CHANGES = 256
"""State changes kept for :meth:`ProviderSet.take_changes`; older ones are dropped and counted."""


@dataclass(frozen=True)
class HealthSettings:
    """When a provider is taken out of rotation and how it is brought back.

    Raises ValueError for a count below 1, a non-positive interval, or ramp
    shares that are not non-decreasing values in (0, 1].
    """

    unhealthy_after_errors: int = 3
    """Consecutive errors that make a provider unhealthy."""
    probe_interval_s: float = 5.0
    """Seconds between probes of an unhealthy provider."""
    ramp_shares: tuple[float, ...] = (0.1, 0.5, 1.0)
    """Shares of new sessions a recovering provider takes, one per step."""
    ramp_step_s: float = 30.0
    """Error-free seconds a ramp step lasts."""
    early_close_s: float = 5.0
    """An abnormal close this many seconds after connecting counts as an error (driver's rule)."""

    def __post_init__(self) -> None:
        if self.unhealthy_after_errors < 1:
            raise ValueError("unhealthy_after_errors must be at least 1")
        for name in ("probe_interval_s", "ramp_step_s", "early_close_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive")
        shares = self.ramp_shares
        if any(not 0.0 < s <= 1.0 for s in shares) or list(shares) != sorted(shares):
            raise ValueError("ramp_shares must be non-decreasing values in (0, 1]")


class StateChange(NamedTuple):
    """A provider changed state at ``at`` (monotonic seconds)."""

    name: str
    old: str
    new: str
    at: float


@dataclass
class _Provider:
    name: str
    state: str
    state_since: float
    consecutive_errors: int = 0
    last_error: tuple[str, str, float] | None = None  # kind, detail, when
    step: int = 0  # index into ramp_shares while ramping
    step_since: float = 0.0
    next_probe_at: float = 0.0
    probe_out: bool = False
    last_connect_s: float | None = None
    sessions: dict[str, int] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)


class ProviderSet:
    """The providers in priority order and their health (see the module docstring).

    Raises ValueError for an empty or duplicated list of names. Methods taking a
    ``name`` raise KeyError for a name that is not in the set.
    """

    def __init__(self, names: Sequence[str], settings: HealthSettings, now: float) -> None:
        if not names:
            raise ValueError("at least one provider is needed")
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate provider names in {list(names)!r}")
        self.settings = settings
        self._providers = {n: _Provider(n, HEALTHY, now) for n in names}
        self._changes: deque[StateChange] = deque(maxlen=MAX_PENDING_CHANGES)
        self.changes_dropped = 0
        """State changes lost because :meth:`take_changes` was not called in time."""

    # -- queries -------------------------------------------------------------

    @property
    def names(self) -> list[str]:
        """All providers in configured (priority) order."""
        return list(self._providers)

    @property
    def all_unhealthy(self) -> bool:
        """True when no provider may take a session."""
        return all(p.state == UNHEALTHY for p in self._providers.values())

    def state(self, name: str) -> str:
        """HEALTHY, UNHEALTHY or RAMPING."""
        return self._providers[name].state

    def share(self, name: str) -> float:
        """Share of new sessions offered first: 1.0 healthy, 0.0 unhealthy, else the ramp's."""
        p = self._providers[name]
        if p.state == HEALTHY:
            return 1.0
        if p.state == UNHEALTHY:
            return 0.0
        return self.settings.ramp_shares[p.step]

    def candidates(self, now: float, draw: float) -> list[str]:
        """The order in which a new session tries the providers.

        Configured order, unhealthy ones left out. A ramping provider keeps its
        place when ``draw < share``; otherwise it goes after every healthy one.
        ``draw`` is uniform in [0, 1), one per session (the same draw decides
        for every ramping provider). Empty when all are unhealthy. Raises
        ValueError for a draw outside [0, 1).
        """
        if not 0.0 <= draw < 1.0:
            raise ValueError(f"draw must be in [0, 1), got {draw!r}")
        self.tick(now)
        first: list[str] = []
        fallback: list[str] = []
        for p in self._providers.values():
            if p.state == HEALTHY or (p.state == RAMPING and draw < self.share(p.name)):
                first.append(p.name)
            elif p.state == RAMPING:
                fallback.append(p.name)
        return first + fallback

    def next_deadline(self) -> float | None:
        """The earliest time (monotonic seconds) a probe falls due or a ramp steps; None
        if nothing will change by itself. Probes already handed out do not count."""
        times = [
            p.next_probe_at for p in self._providers.values()
            if p.state == UNHEALTHY and not p.probe_out
        ]
        times += [
            p.step_since + self.settings.ramp_step_s
            for p in self._providers.values() if p.state == RAMPING
        ]
        return min(times, default=None)

    def snapshot(self, now: float) -> list[dict[str, object]]:
        """JSON-ready rows for ``voxgatectl providers``, in configured order; ages in seconds."""
        self.tick(now)
        rows: list[dict[str, object]] = []
        for p in self._providers.values():
            last_error: dict[str, object] | None = None
            if p.last_error is not None:
                kind, detail, at = p.last_error
                last_error = {"kind": kind, "detail": detail, "age_s": now - at}
            rows.append({
                "name": p.name,
                "state": p.state,
                "share": self.share(p.name),
                "consecutive_errors": p.consecutive_errors,
                "last_error": last_error,
                "state_since_s": now - p.state_since,
                "last_connect_s": p.last_connect_s,
                "sessions": dict(p.sessions),
                "errors": dict(p.errors),
            })
        return rows

    def take_changes(self) -> list[StateChange]:
        """State changes since the last call, oldest first (at most MAX_PENDING_CHANGES)."""
        changes = list(self._changes)
        self._changes.clear()
        return changes

    # -- events --------------------------------------------------------------

    def tick(self, now: float) -> None:
        """Advance every ramp whose step time has elapsed by ``now``."""
        step_s = self.settings.ramp_step_s
        for p in self._providers.values():
            while p.state == RAMPING and now >= p.step_since + step_s:
                p.step_since += step_s
                p.step += 1
                if self._ramp_done(p.step):
                    self._set_state(p, HEALTHY, p.step_since)

    def success(self, name: str, now: float, connect_s: float | None = None) -> None:
        """A session connected to ``name`` after ``connect_s`` seconds (if measured).

        Resets the consecutive errors; an unhealthy provider starts ramping.
        """
        p = self._providers[name]
        self.tick(now)
        p.consecutive_errors = 0
        if connect_s is not None:
            p.last_connect_s = connect_s
        if p.state == UNHEALTHY:
            self._start_ramp(p, now)

    def failure(self, name: str, kind: str, now: float, detail: str = "") -> None:
        """``name`` failed with an error of ``kind``; see the module docstring for the rules."""
        p = self._providers[name]
        self.tick(now)
        p.consecutive_errors += 1
        p.last_error = (kind, detail, now)
        p.errors[kind] = p.errors.get(kind, 0) + 1
        if p.state == UNHEALTHY:
            return
        if p.consecutive_errors >= self.settings.unhealthy_after_errors:
            self._set_state(p, UNHEALTHY, now)
            p.next_probe_at = now + self.settings.probe_interval_s
            p.probe_out = False
        elif p.state == RAMPING:
            p.step_since = now

    def record_session(self, name: str, result: str) -> None:
        """Count a finished session of ``name`` by its ``result`` ("ok", "failover", …)."""
        p = self._providers[name]
        p.sessions[result] = p.sessions.get(result, 0) + 1

    def probes_due(self, now: float) -> list[str]:
        """Unhealthy providers whose probe time has come, in configured order.

        Each is returned once; it is due again only after :meth:`probe_result`.
        """
        self.tick(now)
        due = [
            p for p in self._providers.values()
            if p.state == UNHEALTHY and not p.probe_out and now >= p.next_probe_at
        ]
        for p in due:
            p.probe_out = True
        return [p.name for p in due]

    def probe_result(self, name: str, ok: bool, now: float, detail: str = "") -> None:
        """The probe of ``name`` succeeded (→ ramping) or failed (an error of kind
        "probe"; next probe ``probe_interval_s`` from ``now``). Ignored unless the
        provider is unhealthy (a session may have brought it back meanwhile).
        """
        p = self._providers[name]
        self.tick(now)
        if p.state != UNHEALTHY:
            return
        p.probe_out = False
        if ok:
            p.consecutive_errors = 0
            self._start_ramp(p, now)
        else:
            self.failure(name, "probe", now, detail)
            p.next_probe_at = now + self.settings.probe_interval_s

    # -- internals -----------------------------------------------------------

    def _ramp_done(self, step: int) -> bool:
        shares = self.settings.ramp_shares
        return step >= len(shares) or shares[step] >= 1.0

    def _start_ramp(self, p: _Provider, now: float) -> None:
        p.probe_out = False
        p.step = 0
        p.step_since = now
        self._set_state(p, HEALTHY if self._ramp_done(0) else RAMPING, now)

    def _set_state(self, p: _Provider, new: str, at: float) -> None:
        if len(self._changes) == self._changes.maxlen:
            self.changes_dropped += 1
        self._changes.append(StateChange(p.name, p.state, new, at))
        p.state = new
        p.state_since = at
