"""Trio driver for admission: one :class:`~voxgate.admission.Admission` for every transport.

Transports ask the desk; a call that is queued gets its answer later — a
slot freed by *any* transport's session, a reload raising a cap, or the
queue timeout — and the desk routes that answer to the callbacks of the
transport that queued it. The desk owns the queue-timeout timer (one task)
and tells its listeners (SIP OPTIONS availability, systemd STATUS) when
anything changed.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import trio

from voxgate.admission import (
    Admission,
    AdmissionLimits,
    Admitted,
    CallInfo,
    Decision,
    Queued,
    Refusal,
)
from voxgate.logging import log_event
from voxgate.metrics import QUEUE_WAIT

HEARTBEAT_S = 1.0


@dataclass
class _Waiter:
    on_admitted: Callable[[Admitted], None]
    on_refused: Callable[[Refusal], None]


class AdmissionDesk:
    """Routes the admission's decisions; see the module docstring."""

    def __init__(self, admission: Admission, check_in: Callable[[str], None]) -> None:
        self.admission = admission
        self._check_in = check_in
        self._waiters: dict[str, _Waiter] = {}  # bounded by [limits] queue_size
        self._listeners: list[Callable[[], None]] = []
        self._wake = trio.Event()

    def subscribe(self, listener: Callable[[], None]) -> None:
        """Call ``listener()`` after every change of counts, gates or limits."""
        self._listeners.append(listener)

    def request(self, ticket: str, call: CallInfo, now: float, *,
                on_admitted: Callable[[Admitted], None],
                on_refused: Callable[[Refusal], None]) -> Decision:
        """Decide now; a Queued call's answer comes later through the callbacks."""
        decision = self.admission.request(ticket, call, now)
        if isinstance(decision, Queued):
            self._waiters[ticket] = _Waiter(on_admitted, on_refused)
        self._changed()
        return decision

    def release(self, ticket: str, now: float) -> None:
        """An admitted session ended: its slot may go to a queued call."""
        self._admit(self.admission.release(ticket, now))

    def cancel(self, ticket: str, now: float) -> None:
        """A queued call gave up (SIP CANCEL, a closed stream)."""
        if self.admission.cancel(ticket, now):
            self._waiters.pop(ticket, None)
            self._changed()

    def update_limits(self, limits: AdmissionLimits, now: float) -> None:
        """A reload: new caps and tenants; calls in progress are untouched."""
        self._admit(self.admission.update_limits(limits, now))

    def set_draining(self, draining: bool) -> None:
        self.admission.set_draining(draining)
        self._changed()

    def set_health(self, component: str, healthy: bool, detail: str = "") -> None:
        """A component's health (see :meth:`Admission.set_health`)."""
        self.admission.set_health(component, healthy, detail)
        self._changed()

    def set_memory_ok(self, ok: bool, detail: str = "") -> None:
        self.admission.set_memory_ok(ok, detail)
        self._changed()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Refuse queued calls whose time is up (or whose gate closed); check in."""
        task_status.started()
        while True:
            self._check_in("admission")
            deadline = self.admission.next_deadline()
            with trio.move_on_at(math.inf if deadline is None else deadline), \
                    trio.move_on_after(HEARTBEAT_S):
                await self._wake.wait()
            self._wake = trio.Event()
            refusals = self.admission.handle_timer(trio.current_time())
            for refusal in refusals:
                QUEUE_WAIT.observe(refusal.waited_s)
                waiter = self._waiters.pop(refusal.ticket, None)
                if waiter is not None:
                    _call_safely(waiter.on_refused, refusal)
            if refusals:
                self._changed()

    def _admit(self, admitted: list[Admitted]) -> None:
        for grant in admitted:
            QUEUE_WAIT.observe(grant.waited_s)
            waiter = self._waiters.pop(grant.ticket, None)
            if waiter is not None:
                _call_safely(waiter.on_admitted, grant)
        self._changed()

    def _changed(self) -> None:
        self._wake.set()
        for listener in self._listeners:
            listener()


def _call_safely(callback: Callable[[Admitted], None] | Callable[[Refusal], None],
                 decision: Admitted | Refusal) -> None:
    """A transport's callback failing affects its own call only."""
    try:
        callback(decision)  # type: ignore[arg-type]
    except Exception as exc:
        log_event(logging.ERROR, "admission_callback_error", f"{exc!r}",
                  session_id=decision.ticket, tenant=decision.tenant, exc_info=exc)
