"""Trio driver for ALSA lines: analog or intercom lines on sound devices.

Each ``[[alsa.lines]]`` entry is one line with one task: open its PCMs
(:mod:`voxgate.transports.alsa_device`), ask admission like any call
(``transport="alsa"``, the line's ``tenant`` as hint), run a
:class:`~voxgate.session.Session` on it, and start over. An ``always`` line
runs a session whenever the daemon runs; an ``on-demand`` line waits for
``voxgatectl line start NAME`` and goes idle when ``line stop NAME`` or the
agent ends the call. A line whose device cannot be opened, fails mid-call
(reason ``device-lost``) or is refused admission retries with exponential
backoff from ``[alsa] retry_initial_s`` to ``retry_max_s``; each change of a
line's state is logged once (``event=alsa_line``) and counted.

Pacing. The shared 20 ms :class:`~voxgate.transports.rtp_media.MediaClock`
ticks the line's :class:`AlsaLeg`, which feeds the captured frames to the
pipeline and writes one 20 ms frame of playback per tick. Capture is read
either when the PCM's poll descriptor says so (real ``/dev/snd`` devices: a
capture task waits with ``trio.lowlevel.wait_readable``) or, where epoll
refuses the descriptor (ALSA's ``null`` and ``file`` plugins, which deliver
unpaced), by the tick itself: one period per ``period_ms`` of elapsed tick
time, which for 20 ms periods is one period per tick.

Playback completion (ARCHITECTURE.md): an utterance's last frame was written
at a position of the device's stream; it has played once the device's
position (bytes written minus the bytes the buffer still holds, i.e. buffer
size minus avail) reaches it → ``DRAINED``. The ``file``/``null`` plugins
drain at once, so there it completes as soon as the frame is written.
Barge-in drops what the device holds.
"""

from __future__ import annotations

import logging
import math
import uuid
import warnings
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import trio

from voxgate.admission import Admitted, CallInfo, Queued, Refusal
from voxgate.admission_desk import AdmissionDesk
from voxgate.budget import BoundedAudioQueue, SessionBudget
from voxgate.config import AlsaLineConfig, Config
from voxgate.control.server import CommandError
from voxgate.logging import log_event
from voxgate.pipeline.pipeline import Pipeline
from voxgate.pipeline.playback import DRAINED
from voxgate.registry import Entry, Registry
from voxgate.session import Session, SessionCore
from voxgate.transports.alsa_device import AlsaLineDevice, DeviceLost, LinePcms
from voxgate.transports.rtp_media import MediaClock

with warnings.catch_warnings():
    # Python 3.11/3.12 deprecate audioop (PEP 594) with a DeprecationWarning at import.
    warnings.simplefilter("ignore", DeprecationWarning)
    import audioop

TRANSPORT = "alsa"
TASK_NAME = "alsa"
"""The watchdog's name for the driver's heartbeat (checks in every :data:`HEARTBEAT_S`)."""
HEARTBEAT_S = 1.0
ALWAYS = "always"
ON_DEMAND = "on-demand"
DEVICE_LOST = "device-lost"
"""The end reason of a session whose device failed."""
STOP_REASON = "operator"
"""The end reason of a session ended by ``voxgatectl line stop``."""

PIPELINE_RATE_HZ = 8000
FRAME_MS = 20
FRAME_BYTES = 320
"""One pipeline frame: 20 ms of 8 kHz PCM16 mono."""
MAX_READS_PER_WAKEUP = 8
"""Capture periods read at most per tick or poll wake-up."""
BACKLOG_FRAMES = 3
"""Captured frames beyond this many after a tick's share are fed one extra per tick."""
MAX_EMPTY_WAKEUPS = 50
"""Poll wake-ups in a row without capture before the leg paces by timer instead."""
MAX_DRAINING = 64
"""Utterances awaiting the device's drain per leg (older ones: the deadman decides)."""

# Control command error codes.
BAD_ARGS = "bad-args"
NOT_FOUND = "not-found"
NOT_ON_DEMAND = "not-on-demand"


class _Resampler:
    """PCM16 mono from ``from_hz`` to ``to_hz`` as a stream (``audioop.ratecv`` state)."""

    __slots__ = ("_from_hz", "_state", "_to_hz")

    def __init__(self, from_hz: int, to_hz: int) -> None:
        self._from_hz = from_hz
        self._to_hz = to_hz
        self._state: Any = None

    def convert(self, pcm: bytes) -> bytes:
        if self._from_hz == self._to_hz:
            return pcm
        out, self._state = audioop.ratecv(pcm, 2, 1, self._from_hz, self._to_hz, self._state)
        return out


class AlsaLeg:
    """One line's media for one session; implements :class:`~voxgate.session.SessionMedia`.

    ``on_lost(error)`` is called once when the device fails (the driver ends
    the session with ``device-lost``). Captured audio waits in the session's
    ``jitter`` budget buffer; over its cap the oldest frames are dropped and
    counted by the budget.
    """

    def __init__(self, *, device: LinePcms, pipeline: Pipeline, budget: SessionBudget,
                 period_ms: int, on_lost: Callable[[DeviceLost], None]) -> None:
        self._device: LinePcms | None = device
        self._pcms = device
        self.pipeline = pipeline
        self._period_ms = period_ms
        self._on_lost = on_lost
        self._inbound = BoundedAudioQueue(budget, "jitter")
        self._partial = bytearray()  # captured audio short of a whole frame
        self._to_pipeline = _Resampler(device.rate_hz, PIPELINE_RATE_HZ)
        self._to_device = _Resampler(PIPELINE_RATE_HZ, device.rate_hz)
        self._poll_fd = device.capture_poll_fd
        self.timer_paced = self._poll_fd is None
        """Capture is read by the tick (True) or by :meth:`run_capture` on poll wake-ups."""
        self._credit_ms = 0
        self._written_bytes = 0
        self._draining: deque[tuple[int, int]] = deque(maxlen=MAX_DRAINING)
        self.lost: DeviceLost | None = None
        self.frames_in = 0
        self.frames_out = 0
        self.periods_in = 0
        self.clears = 0
        self.drop_playback_full = 0

    @property
    def packets_in(self) -> int:
        return self.frames_in

    @property
    def packets_out(self) -> int:
        return self.frames_out

    def start(self) -> None:
        """Flush the device and pre-fill playback before the session starts."""
        if self._device is not None:
            try:
                self._device.start()
            except DeviceLost as e:
                self._lose(e)

    def tick(self, now: float, frames_elapsed: int) -> bool:
        """One 20 ms step: capture (timer-paced), frames to the pipeline, one frame out.

        Returns whether captured audio reached the pipeline since the last tick.
        """
        device = self._device
        if device is None:
            return False
        try:
            if self.timer_paced:
                max_credit_ms = self._period_ms * MAX_READS_PER_WAKEUP
                self._credit_ms = min(self._credit_ms + FRAME_MS * frames_elapsed, max_credit_ms)
                while self._credit_ms >= self._period_ms:
                    data = device.read()
                    if data is None:  # a device behind the clock: catch up next tick
                        break
                    self._credit_ms -= self._period_ms
                    self._capture(data)
            fed = self._feed(now, frames_elapsed)
            self._play(device, now)
        except DeviceLost as e:
            self._lose(e)
            return False
        return fed

    def pump_capture(self) -> int:
        """Read what the device has captured (up to :data:`MAX_READS_PER_WAKEUP` periods);
        returns how many reads gave audio. Raises DeviceLost."""
        device = self._device
        got = 0
        if device is not None:
            for _ in range(MAX_READS_PER_WAKEUP):
                data = device.read()
                if data is None:
                    break
                self._capture(data)
                got += 1
        return got

    async def run_capture(self) -> None:
        """Read capture whenever the poll descriptor is readable, until closed.

        Falls back to timer pacing when epoll refuses the descriptor (OSError)
        or it keeps waking without audio.
        """
        fd = self._poll_fd
        empty = 0
        while fd is not None and self._device is not None and not self.timer_paced:
            try:
                empty = 0 if self.pump_capture() else empty + 1
            except DeviceLost as e:
                self._lose(e)
                return
            if empty > MAX_EMPTY_WAKEUPS:
                self._pace_by_timer("poll descriptor wakes without audio")
                return
            try:
                await trio.lowlevel.wait_readable(fd)
            except trio.ClosedResourceError:
                return
            except OSError as e:
                self._pace_by_timer(f"cannot wait on the poll descriptor: {e}")
                return

    def _pace_by_timer(self, why: str) -> None:
        self.timer_paced = True
        log_event(logging.INFO, "alsa_timer_pacing", f"capture paced by the media clock: {why}")

    def _capture(self, data: bytes) -> None:
        self.periods_in += 1
        partial = self._partial
        partial += self._to_pipeline.convert(data)
        while len(partial) >= FRAME_BYTES:
            self._inbound.push(bytes(partial[:FRAME_BYTES]))
            del partial[:FRAME_BYTES]

    def _feed(self, now: float, frames_elapsed: int) -> bool:
        inbound = self._inbound
        frames = frames_elapsed + (len(inbound) > frames_elapsed + BACKLOG_FRAMES)
        fed = False
        for _ in range(frames):
            frame = inbound.pop()
            if frame is None:
                break
            self.pipeline.inbound(frame, now)
            self.frames_in += 1
            fed = True
        return fed

    def _play(self, device: LinePcms, now: float) -> None:
        pipeline = self.pipeline
        if pipeline.cleared:
            pipeline.cleared = False
            self.clears += 1
            device.clear_playback()
        out = pipeline.outbound(now)
        data = self._to_device.convert(bytes(FRAME_BYTES) if out is None else out)
        taken = device.write(data)
        self._written_bytes += taken
        self.frames_out += 1
        if taken < len(data):
            self.drop_playback_full += 1
        draining = self._draining
        for utterance_id in pipeline.playout.take_sent():
            draining.append((utterance_id, self._written_bytes))
        if draining:
            played = self._written_bytes - device.playback_queued_bytes()
            while draining and draining[0][1] <= played:
                pipeline.playback.complete(draining.popleft()[0], DRAINED, now)

    def _lose(self, error: DeviceLost) -> None:
        if self.lost is None:
            self.lost = error
            self.close()
            self._on_lost(error)

    def counters(self) -> dict[str, int]:
        """This leg's counters by name (frames, periods, xruns, drops by cause)."""
        return {
            "frames_in": self.frames_in,
            "frames_out": self.frames_out,
            "periods_in": self.periods_in,
            "xruns_capture": self._pcms.xruns_capture,
            "xruns_playback": self._pcms.xruns_playback,
            "drop_playback_full": self.drop_playback_full,
            "playback_clears": self.clears,
            "speech_turns": self.pipeline.speech_turns,
        }

    def close(self) -> None:
        """Close the device (idempotent)."""
        device = self._device
        if device is None:
            return
        self._device = None
        if self._poll_fd is not None:
            trio.lowlevel.notify_closing(self._poll_fd)
        device.close()
        self._inbound.clear()


@dataclass
class LineStats:
    """What happened to one line since the daemon started."""

    sessions: int = 0
    open_failures: int = 0
    device_lost: int = 0
    refusals: int = 0
    retries: int = 0
    xruns_capture: int = 0
    xruns_playback: int = 0


class Backoff:
    """Retry delays: ``initial_s``, doubling per failure, capped at ``max_s``."""

    def __init__(self) -> None:
        self.failures = 0

    def delay_s(self, initial_s: float, max_s: float) -> float:
        """The delay before the next try, counting one more failure."""
        delay = min(initial_s * 2.0 ** self.failures, max_s)
        if delay < max_s:
            self.failures += 1
        return delay

    def reset(self) -> None:
        self.failures = 0


class _Line:
    """One configured line and where it is."""

    def __init__(self, config: AlsaLineConfig) -> None:
        self.config = config
        self.wanted = config.mode == ALWAYS
        self.state = "idle"
        self.reason: str | None = None
        self._logged: tuple[str, str | None] | None = None
        self.session: Session | None = None
        self.leg: AlsaLeg | None = None
        self.last_end_reason: str | None = None
        self.stats = LineStats()
        self.backoff = Backoff()
        self._changed = trio.Event()

    def poke(self) -> None:
        """Wake the line's task (start, stop, an admission decision)."""
        self._changed.set()

    async def wait_changed(self, timeout_s: float) -> None:
        with trio.move_on_after(timeout_s):
            await self._changed.wait()
        self._changed = trio.Event()


class _LineSignaling:
    """:class:`~voxgate.session.CallSignaling` for a line: no signaling but release."""

    def __init__(self, lines: AlsaLines, line: _Line, ticket: str) -> None:
        self._lines = lines
        self._line = line
        self._ticket: str | None = ticket

    def ring(self) -> None:
        pass

    def answer(self) -> None:
        pass

    def refuse(self, reason: str) -> None:
        pass

    def hangup(self, reason: str) -> None:
        pass

    def release(self) -> None:
        ticket, self._ticket = self._ticket, None
        if ticket is not None:
            self._lines._release(self._line, ticket)


_Failure = tuple[str, str]
"""(reason, detail) of a try that failed: the line backs off."""


class AlsaLines:
    """Every ``[[alsa.lines]]`` line; see the module docstring.

    ``open_device(line)`` opens a line's PCMs (default
    :meth:`AlsaLineDevice.open`); it raises
    :class:`~voxgate.transports.alsa_device.DeviceLost` when it cannot.
    """

    def __init__(
        self,
        config: Config,
        clock: MediaClock,
        desk: AdmissionDesk,
        registry: Registry,
        *,
        check_in: Callable[[str], None] = lambda task: None,
        fallback_prompt: tuple[bytes, ...] = (),
        open_device: Callable[[AlsaLineConfig], LinePcms] | None = None,
    ) -> None:
        self.config = config
        self._clock = clock
        self.desk = desk
        self.registry = registry
        self._check_in = check_in
        self.fallback_prompt = fallback_prompt
        """Frames of ``[agent] fallback_prompt``; the supervisor refreshes it on reload."""
        self._open = open_device or _open_line
        self._lines = {line.name: _Line(line) for line in config.alsa.lines}

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve every line until cancelled; reports started at once (lines come up
        in the background), then checks in as :data:`TASK_NAME` every second."""
        async with trio.open_nursery() as nursery:
            for line in self._lines.values():
                nursery.start_soon(self._serve, line)
            task_status.started()
            while True:
                self._check_in(TASK_NAME)
                await trio.sleep(HEARTBEAT_S)

    def apply_config(self, config: Config) -> None:
        """A reload: timers, retry delays and tenants apply from the next session on.

        The lines themselves (``[[alsa.lines]]``) change only with a restart.
        """
        self.config = config

    # -- operators ------------------------------------------------------------

    def start_line(self, name: str) -> str:
        """Start an on-demand line; returns the message for the operator.

        Raises:
            CommandError: ``not-found`` (no such line), ``not-on-demand``.
        """
        line = self._on_demand(name)
        if line.wanted:
            return f"line {name} is already started ({line.state})"
        line.wanted = True
        line.poke()
        return f"line {name} starting"

    def stop_line(self, name: str) -> str:
        """Stop an on-demand line: its session ends with reason ``operator``.

        Raises:
            CommandError: ``not-found`` (no such line), ``not-on-demand``.
        """
        line = self._on_demand(name)
        if not line.wanted and line.session is None:
            return f"line {name} is not started"
        line.wanted = False
        if line.session is not None:
            line.session.end(STOP_REASON)
        line.poke()
        return f"line {name} stopping"

    async def line_command(self, args: Mapping[str, Any]) -> dict[str, str]:
        """The control command ``line``: ``{"action": "start"|"stop", "name": NAME}``
        → ``{"message": …}``. Raises CommandError (``bad-args`` and as above)."""
        action, name = args.get("action"), args.get("name")
        if not isinstance(name, str) or not name:
            raise CommandError(BAD_ARGS, "args.name must be a line name ([[alsa.lines]] name)")
        if action == "start":
            return {"message": self.start_line(name)}
        if action == "stop":
            return {"message": self.stop_line(name)}
        raise CommandError(BAD_ARGS, 'args.action must be "start" or "stop"')

    def lines(self) -> list[dict[str, object]]:
        """One summary dict per line: its config, state, session and counters."""
        return [{
            "name": line.config.name, "mode": line.config.mode, "state": line.state,
            "reason": line.reason, "capture": line.config.capture,
            "playback": line.config.playback, "rate_hz": line.config.rate,
            "session_id": None if line.session is None else line.session.session_id,
            "last_end_reason": line.last_end_reason, "stats": asdict(line.stats),
        } for line in self._lines.values()]

    def counters(self) -> dict[str, int]:
        """:class:`LineStats` summed over the lines (xruns of ended sessions only)."""
        total: dict[str, int] = dict.fromkeys(asdict(LineStats()), 0)
        for line in self._lines.values():
            for key, value in asdict(line.stats).items():
                total[key] += value
        return total

    def _on_demand(self, name: str) -> _Line:
        line = self._lines.get(name)
        if line is None:
            raise CommandError(NOT_FOUND, f"no line {name!r} (see [[alsa.lines]])")
        if line.config.mode != ON_DEMAND:
            raise CommandError(NOT_ON_DEMAND, f"line {name} is mode {line.config.mode!r}: "
                                              "it runs whenever the daemon runs")
        return line

    # -- one line's task --------------------------------------------------------

    async def _serve(self, line: _Line) -> None:
        while True:
            if not line.wanted:
                self._set_state(line, "idle")
                await line.wait_changed(math.inf)
                continue
            failure = await self._attempt(line)
            if failure is None:
                line.backoff.reset()
                continue
            alsa = self.config.alsa
            delay_s = line.backoff.delay_s(alsa.retry_initial_s, alsa.retry_max_s)
            line.stats.retries += 1
            self._set_state(line, "retrying", failure[0], detail=failure[1])
            await line.wait_changed(delay_s)

    async def _attempt(self, line: _Line) -> _Failure | None:
        """Open, admit, run one session; the failure to back off from, or None."""
        cfg = line.config
        self._set_state(line, "opening")
        try:
            device = self._open(cfg)
        except DeviceLost as e:
            line.stats.open_failures += 1
            return "open-failed", str(e)
        ticket = uuid.uuid4().hex[:12]
        try:
            decision = await self._admit(line, ticket)
            if decision is None:
                device.close()
                return None
            if isinstance(decision, Refusal):
                device.close()
                line.stats.refusals += 1
                if cfg.mode == ON_DEMAND:
                    line.wanted = False
                    return None
                return "refused", decision.reason
        except BaseException:
            device.close()
            raise
        return await self._run_session(line, device, ticket, decision.tenant)

    async def _admit(self, line: _Line, ticket: str) -> Admitted | Refusal | None:
        """Admission for a new session on ``line``; None when the line was stopped
        while queued."""
        cfg = line.config
        answers: list[Admitted | Refusal] = []

        def decided(answer: Admitted | Refusal) -> None:
            answers.append(answer)
            line.poke()

        info = CallInfo(ruri_user=cfg.name, ruri_host=None, headers={}, source_ip=None,
                        transport=TRANSPORT, tenant_hint=cfg.tenant or None)
        decision = self.desk.request(ticket, info, trio.current_time(),
                                     on_admitted=decided, on_refused=decided)
        _log_admission(cfg.name, decision, queued=False)
        if isinstance(decision, Queued):
            self._set_state(line, "queued", f"position {decision.position}")
            try:
                while not answers and line.wanted:
                    await line.wait_changed(math.inf)
            finally:
                if not answers:
                    self.desk.cancel(ticket, trio.current_time())
            if not answers:
                return None
            decision = answers[0]
            _log_admission(cfg.name, decision, queued=True)
            if isinstance(decision, Admitted) and not line.wanted:
                self.desk.release(ticket, trio.current_time())
                return None
        return decision

    async def _run_session(self, line: _Line, device: LinePcms, ticket: str,
                           tenant: str) -> _Failure | None:
        cfg = line.config
        now = trio.current_time()
        core = SessionCore.build(self.config, TRANSPORT, now)
        leg = AlsaLeg(device=device, pipeline=core.pipeline, budget=core.budget,
                      period_ms=cfg.period_ms, on_lost=lambda e: session.end(DEVICE_LOST))
        session = Session(
            session_id=ticket, call_id=f"{cfg.name}-{ticket}", transport=TRANSPORT,
            codec=f"L16/{cfg.rate}", signaling=_LineSignaling(self, line, ticket), media=leg,
            core=core, clock=self._clock, answer_delay_s=0.0,
            fallback_prompt=self.fallback_prompt, tenant=tenant,
        )
        line.session, line.leg = session, leg
        self.registry.add(Entry(session, tenant, lambda: f"{cfg.capture}|{cfg.playback}",
                                leg.counters))
        line.stats.sessions += 1
        self._set_state(line, "active")
        log_event(logging.INFO, "call_start", "call started", session_id=ticket,
                  call_id=session.call_id, tenant=tenant, transport=TRANSPORT, line=cfg.name,
                  capture=cfg.capture, playback=cfg.playback, rate_hz=cfg.rate,
                  pacing="timer" if leg.timer_paced else "poll")
        leg.start()
        async with trio.open_nursery() as nursery:
            if not leg.timer_paced and leg.lost is None:
                nursery.start_soon(leg.run_capture)
            await session.run()
            nursery.cancel_scope.cancel()
        reason = session.end_reason or "error"
        line.last_end_reason = reason
        if reason == DEVICE_LOST:
            line.stats.device_lost += 1
            return DEVICE_LOST, str(leg.lost)
        if cfg.mode == ON_DEMAND:
            line.wanted = False
            return None
        # An always line restarts at once, unless its sessions fail or end at once.
        if reason == "error" or trio.current_time() - now < self.config.alsa.retry_initial_s:
            return reason, "the session ended within [alsa] retry_initial_s"
        return None

    def _release(self, line: _Line, ticket: str) -> None:
        """The session on ``line`` is gone: free its slot, registry entry and device."""
        leg = line.leg
        if leg is not None:
            leg.close()
            counters = leg.counters()
            line.stats.xruns_capture += counters["xruns_capture"]
            line.stats.xruns_playback += counters["xruns_playback"]
        line.session = line.leg = None
        self.registry.remove(ticket)
        self.desk.release(ticket, trio.current_time())

    def _set_state(self, line: _Line, state: str, reason: str | None = None,
                   detail: str | None = None) -> None:
        """Set ``line``'s state; log it when it differs from the last one logged
        (``opening`` is transient and never logged, so a retry loop logs once)."""
        line.state, line.reason = state, reason
        if state == "opening" or line._logged == (state, reason):
            return
        line._logged = (state, reason)
        level = logging.WARNING if state == "retrying" else logging.INFO
        log_event(level, "alsa_line", f"line {line.config.name}: {state}",
                  line=line.config.name, state=state, reason=reason, detail=detail,
                  transport=TRANSPORT)


def _log_admission(line: str, decision: Admitted | Queued | Refusal, *, queued: bool) -> None:
    """One ``admission`` line, worded like the SIP endpoint's."""
    if isinstance(decision, Admitted):
        result = "dequeued" if queued else "admitted"
    else:
        result = "queued" if isinstance(decision, Queued) else "refused"
    log_event(logging.INFO, "admission", result, session_id=decision.ticket,
              tenant=decision.tenant, transport=TRANSPORT, line=line,
              reason=getattr(decision, "reason", None),
              waited_s=getattr(decision, "waited_s", None) if queued else None)


def _open_line(line: AlsaLineConfig) -> LinePcms:
    return AlsaLineDevice.open(line.capture, line.playback, line.rate, line.period_ms)
