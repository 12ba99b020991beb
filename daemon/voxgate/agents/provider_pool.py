"""The Trio driver of a :class:`~voxgate.agents.providers.ProviderSet`, shared by the
stream agent's bot providers and the local agent's webhook URLs.

:class:`HealthPool` reads the clock and draws the random number for the sans-IO
state machine, runs the probes it hands out, logs every state change
(``event=provider_state``) and exports ``voxgate_provider_up``,
``voxgate_provider_ramp_share``, ``voxgate_provider_errors_total``,
``voxgate_provider_sessions_total`` and ``voxgate_provider_connect_seconds``
under each provider's name. How a provider is probed is its owner's business
(a ``probe`` callable); so is whether "every provider is down" gates admission
(``on_verdict``).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Awaitable, Callable, Sequence

import trio

from voxgate.agents.providers import UNHEALTHY, HealthSettings, ProviderSet
from voxgate.config import StreamConfig
from voxgate.logging import log_event
from voxgate.metrics import (
    PROVIDER_CONNECT,
    PROVIDER_ERRORS,
    PROVIDER_SESSIONS,
    PROVIDER_SHARE,
    PROVIDER_UP,
)

IDLE_WAKE_S = 60.0
"""How long :meth:`HealthPool.run` sleeps when nothing is due and nothing happens."""

Probe = Callable[[str], Awaitable[str]]
"""``await probe(name)``: "" when the provider answered, else why not (logged as the
error's detail). Bounds its own time; must not raise for an unreachable provider."""
Verdict = Callable[[bool, str], None]
"""``on_verdict(usable, detail)``: after every change; ``usable`` is False while every
provider is unhealthy, ``detail`` then names them."""


def health_settings(stream: StreamConfig) -> HealthSettings:
    """``[agent.stream]``'s health keys, which rule the webhook URLs too."""
    return HealthSettings(
        unhealthy_after_errors=stream.unhealthy_after_errors,
        probe_interval_s=stream.probe_interval_s, ramp_shares=stream.ramp_shares,
        ramp_step_s=stream.ramp_step_s, early_close_s=stream.early_close_s)


class HealthPool:
    """The providers' health for the whole daemon; a Trio service.

    Args:
        names: the providers in priority order (the metrics' ``provider`` label).
        settings: when a provider is taken out of rotation and brought back.
        probe: how an unhealthy provider is probed (see :data:`Probe`).
        on_verdict: told whether any provider is usable (see :data:`Verdict`).

    Raises:
        ValueError: as :class:`~voxgate.agents.providers.ProviderSet`.

    The methods other than :meth:`run` need the Trio clock (call them from
    inside ``trio.run``); sessions ask :meth:`order` and report back with
    :meth:`success`, :meth:`failure` and :meth:`session_result`.
    """

    def __init__(self, names: Sequence[str], settings: HealthSettings, probe: Probe,
                 on_verdict: Verdict | None = None) -> None:
        self.settings = settings
        self.health = ProviderSet(names, settings, 0.0)
        self._probe = probe
        self._on_verdict = on_verdict
        self._changed = trio.Event()
        self._random = random.Random()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Probe, advance ramps and publish until cancelled; every provider starts
        healthy. Cancellation also cancels the probes in flight."""
        self.health = ProviderSet(self.health.names, self.settings, trio.current_time())
        self._publish()
        task_status.started()
        async with trio.open_nursery() as nursery:
            while True:
                for name in self.health.probes_due(trio.current_time()):
                    nursery.start_soon(self._run_probe, name)
                self._publish()
                deadline = self.health.next_deadline()
                self._changed = trio.Event()
                wake_at = trio.current_time() + IDLE_WAKE_S if deadline is None else deadline
                with trio.move_on_at(wake_at):
                    await self._changed.wait()

    async def _run_probe(self, name: str) -> None:
        detail = await self._probe(name)
        if detail:
            PROVIDER_ERRORS.labels(name, "probe").inc()
        self.health.probe_result(name, not detail, trio.current_time(), detail)
        self._changed.set()

    def order(self) -> list[str]:
        """The providers a new session (or webhook turn) tries, in order; unhealthy
        ones left out (empty when all are)."""
        order = self.health.candidates(trio.current_time(), self._random.random())
        self._changed.set()
        return order

    def success(self, name: str, connect_s: float | None = None) -> None:
        """``name`` worked; ``connect_s`` (seconds, if measured) goes to the connect histogram."""
        if connect_s is not None:
            PROVIDER_CONNECT.labels(name).observe(connect_s)
        self.health.success(name, trio.current_time(), connect_s)
        self._changed.set()

    def failure(self, name: str, kind: str, detail: str) -> None:
        """``name`` failed with an error of ``kind`` (the metric's label)."""
        PROVIDER_ERRORS.labels(name, kind).inc()
        self.health.failure(name, kind, trio.current_time(), detail)
        self._changed.set()

    def session_result(self, name: str, result: str) -> None:
        """Count a finished session (or turn) of ``name`` by its ``result``."""
        PROVIDER_SESSIONS.labels(name, result).inc()
        self.health.record_session(name, result)

    def snapshot(self) -> list[dict[str, object]]:
        """One row per provider for ``voxgatectl providers``, in priority order."""
        return self.health.snapshot(trio.current_time())

    def verdict(self) -> tuple[bool, str]:
        """(False, which are down) while every provider is unhealthy, else (True, "")."""
        if not self.health.all_unhealthy:
            return True, ""
        return False, f"every provider is down: {', '.join(self.health.names)}"

    def _publish(self) -> None:
        for name, old, new, _ in self.health.take_changes():
            log_event(logging.WARNING if new == UNHEALTHY else logging.INFO,
                      "provider_state", f"provider {name}: {old} → {new}",
                      provider=name, state=new, previous=old)
        for name in self.health.names:
            PROVIDER_SHARE.labels(name).set(self.health.share(name))
            PROVIDER_UP.labels(name).set(0 if self.health.state(name) == UNHEALTHY else 1)
        if self._on_verdict is not None:
            self._on_verdict(*self.verdict())
