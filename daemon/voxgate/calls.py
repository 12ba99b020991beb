"""The one call lifecycle, for every transport: admit, build, run, release, record.

A transport turns its wire into a :class:`CallRequest` and a :class:`CallSetup`
(its answers to the caller and how to build its media leg) and hands them to
:meth:`Calls.start`. From there one task in the *sessions nursery* owns the
call::

    admission ─ refused ─▶ setup.refused (SIP 486/503, WebSocket 1013 …)
        │ queued ─▶ setup.queued (SIP 180) … wait (cancel: Calls.end)
        ▼ admitted: record written
    build (SessionCore + setup.build) ─ raises ─▶ setup.failed (SIP 500, WS 1011)
        ▼
    registry ─▶ Session.run (its own nursery, its own error boundary)
        ▼ finally
    registry out, admission slot released, record completed, post-call job

Whatever happens inside — a setup failure, a session error, cancellation by a
drain deadline — the ``finally`` releases the slot and completes the record,
and nothing escapes to a listener. Drain is one deadline on the sessions
nursery (:meth:`Calls.drain`): sessions still up then are cancelled and end
with reason ``drain-timeout`` (``shutdown`` after :meth:`Calls.stop`), each
sending its BYE or close through its transport on the way out.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import trio

from voxgate.admission import Admitted, CallInfo, Queued, Refusal
from voxgate.admission_desk import AdmissionDesk
from voxgate.agents.factory import agent_kind
from voxgate.agents.stream import ProviderPool
from voxgate.config import Config
from voxgate.end_reasons import EndReason
from voxgate.logging import log_event
from voxgate.pipeline.clock import MediaClock
from voxgate.pipeline.pipeline import MediaLeg
from voxgate.postcall import PostCallQueue
from voxgate.recording import Recorder, Recordings
from voxgate.records import CallRecord, Records
from voxgate.registry import Entry, Registry
from voxgate.session import CallSignaling, Session, SessionCore

CALL_COMPLETED = "call.completed"
"""The post-call job every ended call leaves (the record as JSON)."""


class SetupRefused(Exception):
    """A transport cannot take an admitted call now (e.g. no free RTP port): the
    caller is answered as busy and it is logged without a traceback."""


@dataclass(frozen=True)
class CallRequest:
    """A call as its transport first sees it."""

    ticket: str
    """The session id, chosen by the transport (12 hex digits)."""
    call_id: str
    """SIP Call-ID, the stream's callSid, or ``<line>-<ticket>`` for an ALSA line."""
    info: CallInfo
    """What admission's tenant rules match on (its ``transport`` names the transport)."""
    from_uri: str = ""
    to_uri: str = ""
    peer: str = ""
    """Where the call comes from, for log records: the SIP peer's ``address:port``,
    the WebSocket client's, the ALSA capture device."""
    direction: str = "inbound"
    """``outbound`` for a call we place (``voxgatectl call``), for its record."""
    agent: str | None = None
    """The agent kind to run instead of the tenant's (``voxgatectl call --agent``)."""


@dataclass
class Leg:
    """What a transport builds for an admitted call."""

    media: MediaLeg
    signaling: CallSignaling
    codec: str
    remote: Callable[[], str | None]
    """Where the media comes from, for display."""
    counters: Callable[[], dict[str, int]]
    """The leg's counters by name (packets, drops by cause …)."""
    answer_delay_s: float = 0.0
    tasks: tuple[Callable[[], Awaitable[None]], ...] = ()
    """Media tasks that live in the session's nursery (e.g. an ALSA capture reader)."""
    details: Mapping[str, Any] = field(default_factory=dict)
    """The transport's own fields for the ``call_start`` log line (ports, line, pacing)."""
    connect: Callable[[], Awaitable[EndReason | None]] | None = None
    """An outbound call's dialling (see :class:`~voxgate.session.Session`): returns
    when the callee answered (``None``) or the end reason when it did not."""
    transfer: Callable[[str], None] | None = None
    """Blind transfer of the call to a SIP URI (SIP only; see ``Session(transfer_to=)``)."""


class CallSetup(Protocol):
    """A transport's side of one call's set-up. Methods run on the event loop and
    must not block; an exception from them is logged and ends only this call."""

    def queued(self, decision: Queued) -> None:
        """The call waits for a slot (SIP: 180 Ringing)."""

    def refused(self, refusal: Refusal) -> None:
        """Admission said no, now or after queueing: answer the caller."""

    def build(self, ticket: str, core: SessionCore, now: float) -> Leg:
        """The media leg and signaling for an admitted call; may raise."""

    def started(self, session: Session) -> None:
        """The session exists and is registered: keep it for the wire's events."""

    def failed(self, exc: Exception) -> None:
        """The session could not be built (``exc``): answer the caller (SIP 500 or
        503, WebSocket 1011)."""


class CallHandle:
    """One call in the lifecycle: its session once built, and its end. It names
    the call in log records (a :class:`~voxgate.logging.CallIdentity`)."""

    def __init__(self, request: CallRequest) -> None:
        self.request = request
        self.tenant = "default"
        """The tenant admission put the call in (set by its first decision)."""
        self.session: Session | None = None
        self.reason: str | None = None
        """The end reason once :attr:`ended` is set (``refused``, ``cancelled`` …)."""
        self.ended = trio.Event()
        self._answer: Admitted | Refusal | None = None
        self._woken = trio.Event()

    @property
    def session_id(self) -> str:
        """The session id (the request's ticket)."""
        return self.request.ticket

    @property
    def call_id(self) -> str:
        """The request's Call-ID."""
        return self.request.call_id

    def _decided(self, answer: Admitted | Refusal) -> None:
        self._answer = answer
        self._woken.set()


class Calls:
    """The sessions nursery and the lifecycle of every call; see the module docstring."""

    def __init__(self, config: Config, desk: AdmissionDesk, registry: Registry,
                 clock: MediaClock, *, records: Records | None = None,
                 postcall: PostCallQueue | None = None,
                 recordings: Recordings | None = None,
                 providers: ProviderPool | None = None) -> None:
        """``providers`` serves the stream agents (None when no agent is a stream)."""
        self.config = config
        self.desk = desk
        self.registry = registry
        self.records = records
        self.postcall = postcall
        self.recordings = recordings
        self.providers = providers
        self.fallback_prompt: tuple[bytes, ...] = ()
        """Frames of ``[agent] fallback_prompt`` (loaded and reloaded by the supervisor)."""
        self._clock = clock
        self._handles: dict[str, CallHandle] = {}  # bounded by admission's caps + queue
        self._recorders: dict[str, Recorder] = {}  # the calls being recorded
        self._nursery: trio.Nursery | None = None
        self._stop_reason: EndReason = "shutdown"

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Own the sessions nursery until cancelled or drained (see :meth:`drain`)."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    # -- transports -------------------------------------------------------------

    def start(self, request: CallRequest, setup: CallSetup) -> CallHandle:
        """Ask admission now; an admitted or queued call goes on in its own task.

        A refusal is answered at once (``setup.refused``) without a task, so a
        flood of refused calls costs no more than its answers. The returned
        handle's ``ended`` is set when the call is over, whatever happened.
        """
        handle = CallHandle(request)
        now = trio.current_time()
        nursery = self._nursery
        decision = self.desk.request(request.ticket, request.info, now,
                                     on_admitted=handle._decided, on_refused=handle._decided)
        handle.tenant = decision.tenant
        _log_admission(handle, decision, dequeued=False)
        if nursery is None and not isinstance(decision, Refusal):  # stopped: no sessions
            if isinstance(decision, Admitted):
                self.desk.release(request.ticket, now)
            else:
                self.desk.cancel(request.ticket, now)
            decision = Refusal(request.ticket, decision.tenant, "draining", 503,
                               self.config.limits.retry_after_s, 0.0)
        if isinstance(decision, Refusal):
            self._refuse(handle, setup, decision)
            return handle
        assert nursery is not None
        self._handles[request.ticket] = handle
        nursery.start_soon(self._call, handle, setup, decision, name=f"call {request.ticket}")
        return handle

    def end(self, ticket: str, reason: EndReason) -> bool:
        """End call ``ticket``: give up its place in the queue, or end its session
        with ``reason``; False when unknown."""
        handle = self._handles.get(ticket)
        if handle is None:
            return False
        if handle.session is not None:
            handle.session.end(reason)
        else:
            handle.reason = reason
            handle._woken.set()
        return True

    # -- the supervisor ------------------------------------------------------------

    def drain(self, deadline: float) -> None:
        """Sessions still up at ``deadline`` (trio time) end with ``drain-timeout``."""
        self._stop_reason = "drain-timeout"
        if self._nursery is not None:
            self._nursery.cancel_scope.deadline = deadline

    def stop(self, reason: EndReason = "shutdown") -> None:
        """End every call now with ``reason`` (a second SIGTERM, SIGINT)."""
        self._stop_reason = reason
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    # -- one call -----------------------------------------------------------------

    async def _call(self, handle: CallHandle, setup: CallSetup,
                    decision: Admitted | Queued) -> None:
        request = handle.request
        try:
            admitted = decision if isinstance(decision, Admitted) else \
                await self._wait_in_queue(handle, setup, decision)
            if isinstance(admitted, Refusal):
                self._refuse(handle, setup, admitted)
            elif admitted is not None:
                await self._run_admitted(handle, setup, admitted)
        except Exception as exc:  # a fault in the lifecycle itself: this call only
            log_event(logging.ERROR, "call_lifecycle_error", f"{exc!r}", call=handle,
                      transport=request.info.transport, exc_info=exc)
        finally:
            del self._handles[request.ticket]
            handle.ended.set()

    async def _wait_in_queue(self, handle: CallHandle, setup: CallSetup,
                             decision: Queued) -> Admitted | Refusal | None:
        """The admission's later answer; None when the caller gave up first."""
        request = handle.request
        _safely(handle, "queued", setup.queued, decision)
        gave_up = True
        try:
            while handle._answer is None and handle.reason is None:
                await handle._woken.wait()
                handle._woken = trio.Event()
            gave_up = handle.reason is not None
        finally:
            if gave_up:  # the caller left, or the sessions nursery was cancelled
                answer, now = handle._answer, trio.current_time()
                if answer is None:
                    self.desk.cancel(request.ticket, now)
                elif isinstance(answer, Admitted):  # admitted just as the caller left
                    self.desk.release(request.ticket, now)
                handle.reason = handle.reason or self._stop_reason
                log_event(logging.INFO, "call_cancelled", "gave up while queued", call=handle,
                          transport=request.info.transport, reason=handle.reason)
        if gave_up:
            return None
        _log_admission(handle, handle._answer, dequeued=True)
        return handle._answer

    def _refuse(self, handle: CallHandle, setup: CallSetup, refusal: Refusal) -> None:
        request = handle.request
        handle.reason = "refused"
        log_event(logging.INFO, "call_refused", f"refused: {refusal.reason}", call=handle,
                  status=refusal.sip_status, reason=refusal.reason,
                  transport=request.info.transport, peer=request.peer or None)
        _safely(handle, "refused", setup.refused, refusal)
        handle.ended.set()

    async def _run_admitted(self, handle: CallHandle, setup: CallSetup,
                            admitted: Admitted) -> None:
        request, cfg = handle.request, self.config
        record = CallRecord(
            session_id=request.ticket, call_id=request.call_id,
            transport=request.info.transport, tenant=admitted.tenant, admitted_at=time.time(),
            from_uri=request.from_uri, to_uri=request.to_uri,
            agent=request.agent or agent_kind(cfg, admitted.tenant),
            queue_wait_s=round(admitted.waited_s, 3), cost_per_minute=cfg.records.cost_per_minute,
            direction=request.direction,
        )
        if self.records is not None:
            self.records.admitted(record)
        session: Session | None = None
        try:
            if handle.reason is not None:  # the caller left between admission and now
                return
            session = self._build(handle, setup, record)
            if session is None:
                return
            handle.session = session
            _safely(handle, "started", setup.started, session)
            await session.run()
        finally:
            now = trio.current_time()
            if session is not None:
                self.registry.remove(request.ticket)
                handle.reason = session.end_reason
            self.desk.release(request.ticket, now)
            handle.reason = handle.reason or "error"
            self._complete(record, session, handle.reason, now)

    def _build(self, handle: CallHandle, setup: CallSetup, record: CallRecord) -> Session | None:
        """The session for an admitted call, registered; None when it cannot be built
        (the caller is answered, the error logged with the Call-ID)."""
        now = trio.current_time()
        request, tenant = handle.request, handle.tenant
        transport = request.info.transport
        try:
            core = SessionCore.build(self.config, transport, now, tenant=tenant,
                                     providers=self.providers, kind=request.agent)
            leg = setup.build(request.ticket, core, now)
        except Exception as exc:
            refused = isinstance(exc, SetupRefused)
            log_event(logging.WARNING if refused else logging.ERROR, "call_setup_failed",
                      f"cannot start the session: {exc!r}", call=handle, transport=transport,
                      exc_info=None if refused else exc)
            _safely(handle, "failed", setup.failed, exc)
            return None
        session = Session(
            session_id=request.ticket, call_id=request.call_id, transport=transport,
            codec=leg.codec, signaling=leg.signaling, media=leg.media, core=core,
            clock=self._clock, answer_delay_s=leg.answer_delay_s,
            fallback_prompt=self.fallback_prompt, tenant=tenant, from_uri=request.from_uri,
            to_uri=request.to_uri, peer=request.peer, tasks=leg.tasks,
            stop_reason=lambda: self._stop_reason, connect=leg.connect,
            transfer_to=leg.transfer,
        )
        record.codec = leg.codec
        if self.recordings is not None:
            recorder = self.recordings.start(request.ticket, record.admitted_at, tenant=tenant)
            if recorder is not None:
                core.pipeline.recorder = recorder
                record.recording_path = recorder.path
                self._recorders[request.ticket] = recorder
        self.registry.add(Entry(session, tenant, leg.remote, leg.counters))
        log_event(logging.INFO, "call_start", "call started", call=session, transport=transport,
                  codec=leg.codec, peer=request.peer or None, remote=leg.remote(),
                  **leg.details)
        return session

    def _complete(self, record: CallRecord, session: Session | None, reason: str,
                  now: float) -> None:
        """Fill in how the call went and hand the record on (never raises)."""
        wall_now = time.time()
        record.ended_at = wall_now
        record.reason = reason
        record.state = "ended"
        try:
            if session is not None:
                _fill_from_session(record, session, now, wall_now)
            recorder = self._recorders.pop(record.session_id, None)
            if recorder is not None and self.recordings is not None:
                record.recording_path = self.recordings.finish(recorder)
        except Exception as exc:  # a counter that failed must not lose the record
            log_event(logging.ERROR, "call_record_error", f"{exc!r}", call=record, exc_info=exc)
        if self.records is not None:
            self.records.completed(record)
        if self.postcall is not None:
            self.postcall.enqueue(CALL_COMPLETED, record.to_json())


def _fill_from_session(record: CallRecord, session: Session, now: float,
                       wall_now: float) -> None:
    if session.answered_at is not None:
        record.answered_at = wall_now - (now - session.answered_at)
    record.packets_in = session.media.packets_in
    record.packets_out = session.media.packets_out
    counters = session.counters()
    record.pauses = counters["session_pauses"]
    record.recoveries = counters["session_recoveries"]
    record.barge_ins = counters["barge_ins"]
    record.drops = {name: value for name, value in counters.items()
                    if name.startswith(("budget_drop_", "drop_", "srtp_drop_")) and value}
    agent = session.agent.describe()
    provider = agent.get("provider")
    if isinstance(provider, str) and provider:
        record.provider = provider
    turns = agent.get("turns")
    if isinstance(turns, list):
        record.turns = [dict(turn) for turn in turns if isinstance(turn, dict)]
        record.agent_requests = sum(1 for turn in record.turns if "logic_ms" in turn)


def _safely(handle: CallHandle, what: str, callback: Callable[..., None],
            *args: object) -> None:
    """A transport's callback failing affects its own call only."""
    try:
        callback(*args)
    except Exception as exc:
        log_event(logging.ERROR, "call_callback_error", f"{what} failed: {exc!r}",
                  call=handle, transport=handle.request.info.transport, exc_info=exc)


def _log_admission(handle: CallHandle, decision: Admitted | Queued | Refusal | None, *,
                   dequeued: bool) -> None:
    """One ``admission`` line per decision, alike for every transport."""
    if decision is None:
        return
    if isinstance(decision, Admitted):
        result = "dequeued" if dequeued else "admitted"
    else:
        result = "queued" if isinstance(decision, Queued) else "refused"
    request = handle.request
    log_event(logging.INFO, "admission", result, call=handle,
              transport=request.info.transport, reason=getattr(decision, "reason", None),
              waited_s=getattr(decision, "waited_s", None) if dequeued else None)

