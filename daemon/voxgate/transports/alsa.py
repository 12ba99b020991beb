"""Trio driver for ALSA lines: analog or intercom lines on sound devices.

Each ``[[alsa.lines]]`` entry is one line with one task: open its PCMs
(:mod:`voxgate.transports.alsa_device`), ask admission like any call
(``transport="alsa"``, the line's ``tenant`` as hint) and run a session on
it through the call lifecycle (:mod:`voxgate.calls`), and start over. An ``always`` line
runs a session whenever the daemon runs; an ``on-demand`` line waits for
``voxgatectl line start NAME`` and goes idle when ``line stop NAME`` or the
agent ends the call. A line whose device cannot be opened, fails mid-call
(reason ``device-lost``) or is refused admission retries with exponential
backoff from ``[alsa] retry_initial_s`` to ``retry_max_s``; each change of a
line's state is logged once (``event=alsa_line``) and counted.

Pacing. The shared 20 ms :class:`~voxgate.pipeline.clock.MediaClock` ticks
the session, whose pipeline takes the line's captured frames from its
:class:`AlsaLeg` and has it write one 20 ms frame of playback per tick. Capture is read
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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Final

import trio

from voxgate.admission import CallInfo, Queued, Refusal
from voxgate.backoff import Backoff
from voxgate.budget import BoundedAudioQueue, SessionBudget
from voxgate.calls import CallRequest, Calls, Leg
from voxgate.config import AlsaLineConfig, Config
from voxgate.control.server import CommandError
from voxgate.logging import log_event
from voxgate.pipeline.frames import FRAME_MS, PCM_FRAME_BYTES, PCM_SILENCE, RATE_HZ
from voxgate.pipeline.playback import DRAINED, PlaybackTracker
from voxgate.session import Session, SessionCore
from voxgate.transports.alsa_device import AlsaLineDevice, DeviceLost, LinePcms

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
DEVICE_LOST: Final = "device-lost"
"""The end reason of a session whose device failed."""
STOP_REASON: Final = "operator"
"""The end reason of a session ended by ``voxgatectl line stop``."""

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
    """One line's media for one session; a :class:`~voxgate.pipeline.pipeline.MediaLeg`.

    ``on_lost(error)`` is called once when the device fails (the driver ends
    the session with ``device-lost``). Captured audio waits in the session's
    ``jitter`` budget buffer; over its cap the oldest frames are dropped and
    counted by the budget.
    """

    def __init__(self, *, device: LinePcms, playback: PlaybackTracker, budget: SessionBudget,
                 period_ms: int, on_lost: Callable[[DeviceLost], object]) -> None:
        self._device: LinePcms | None = device
        self._pcms = device
        self._playback = playback
        self._period_ms = period_ms
        self._on_lost = on_lost
        self._inbound = BoundedAudioQueue(budget, "jitter")
        self._partial = bytearray()  # captured audio short of a whole frame
        self._to_pipeline = _Resampler(device.rate_hz, RATE_HZ)
        self._to_device = _Resampler(RATE_HZ, device.rate_hz)
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

    def receive(self, now: float, frames_elapsed: int) -> tuple[bool, list[bytes]]:
        """Capture (when timer-paced) and the frames due now; True when captured
        audio is handed on."""
        device = self._device
        if device is None:
            return False, []
        if self.timer_paced:
            max_credit_ms = self._period_ms * MAX_READS_PER_WAKEUP
            self._credit_ms = min(self._credit_ms + FRAME_MS * frames_elapsed, max_credit_ms)
            while self._credit_ms >= self._period_ms:
                try:
                    data = device.read()
                except DeviceLost as e:
                    self._lose(e)
                    return False, []
                if data is None:  # a device behind the clock: catch up next tick
                    break
                self._credit_ms -= self._period_ms
                self._capture(data)
        inbound = self._inbound
        due = frames_elapsed + (len(inbound) > frames_elapsed + BACKLOG_FRAMES)
        frames = []
        for _ in range(due):
            frame = inbound.pop()
            if frame is None:
                break
            frames.append(frame)
        self.frames_in += len(frames)
        return bool(frames), frames

    def send(self, pcm: bytes | None, finished: Sequence[int], now: float) -> None:
        """Write one frame; an utterance completes once the device's buffer has
        played everything written up to its last frame."""
        device = self._device
        if device is None:
            return
        data = self._to_device.convert(PCM_SILENCE if pcm is None else pcm)
        try:
            taken = device.write(data)
            self._written_bytes += taken
            self.frames_out += 1
            if taken < len(data):
                self.drop_playback_full += 1
            draining = self._draining
            for utterance_id in finished:
                draining.append((utterance_id, self._written_bytes))
            if draining:
                played = self._written_bytes - device.playback_queued_bytes()
                while draining and draining[0][1] <= played:
                    self._playback.complete(draining.popleft()[0], DRAINED, now)
        except DeviceLost as e:
            self._lose(e)

    def clear(self) -> None:
        """Drop what the device still has queued for playback."""
        device = self._device
        if device is None:
            return
        self.clears += 1
        try:
            device.clear_playback()
        except DeviceLost as e:
            self._lose(e)

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
        while len(partial) >= PCM_FRAME_BYTES:
            self._inbound.push(bytes(partial[:PCM_FRAME_BYTES]))
            del partial[:PCM_FRAME_BYTES]

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
        self.settle()

    def settle(self) -> None:
        """Forget the pokes so far (the call they were about is over; ``wanted`` stays)."""
        self._changed = trio.Event()


class _LineCall:
    """One session's try on a line: its :class:`~voxgate.calls.CallSetup` and its
    :class:`~voxgate.session.CallSignaling` (a line has no signaling but release)."""

    def __init__(self, lines: AlsaLines, line: _Line, device: LinePcms, ticket: str) -> None:
        self._lines = lines
        self._line = line
        self.device = device
        self.ticket = ticket
        self.leg: AlsaLeg | None = None
        self.refusal: Refusal | None = None
        self.error: Exception | None = None

    # -- CallSetup --

    def queued(self, decision: Queued) -> None:
        self._lines.set_state(self._line, "queued", f"position {decision.position}")

    def refused(self, refusal: Refusal) -> None:
        self.refusal = refusal
        self._line.poke()

    def build(self, ticket: str, core: SessionCore, now: float) -> Leg:
        line = self._line
        cfg = line.config
        calls = self._lines.calls
        leg = AlsaLeg(device=self.device, playback=core.pipeline.playback, budget=core.budget,
                      period_ms=cfg.period_ms, on_lost=lambda e: calls.end(ticket, DEVICE_LOST))
        self.leg = line.leg = leg
        leg.start()
        capture = () if leg.timer_paced or leg.lost is not None else (leg.run_capture,)
        return Leg(media=leg, signaling=self, codec=f"L16/{cfg.rate}",
                   remote=lambda: f"{cfg.capture}|{cfg.playback}", counters=leg.counters,
                   tasks=capture,
                   details={"line": cfg.name, "capture": cfg.capture, "playback": cfg.playback,
                            "rate_hz": cfg.rate,
                            "pacing": "timer" if leg.timer_paced else "poll"})

    def started(self, session: Session) -> None:
        line = self._line
        line.session = session
        line.stats.sessions += 1
        self._lines.set_state(line, "active")
        if self.leg is not None and self.leg.lost is not None:
            session.end(DEVICE_LOST)

    def failed(self, exc: Exception) -> None:
        self.error = exc
        if self.leg is not None:
            self.leg.close()
        self._line.poke()

    # -- CallSignaling --

    def ring(self) -> None:
        pass

    def answer(self) -> None:
        pass

    def refuse(self, reason: str) -> None:
        pass

    def hangup(self, reason: str) -> None:
        pass

    def release(self) -> None:
        """The session is gone: keep its xrun counts, wake the line's task."""
        line, leg = self._line, self.leg
        if leg is not None:
            leg.close()
            counters = leg.counters()
            line.stats.xruns_capture += counters["xruns_capture"]
            line.stats.xruns_playback += counters["xruns_playback"]
        line.session = line.leg = None
        line.poke()


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
        calls: Calls,
        *,
        check_in: Callable[[str], None] = lambda task: None,
        open_device: Callable[[AlsaLineConfig], LinePcms] | None = None,
    ) -> None:
        self.config = config
        self.calls = calls
        self._check_in = check_in
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

    def counters(self) -> dict[str, dict[str, int]]:
        """Each line's :class:`LineStats` by line name (xruns of ended sessions only)."""
        return {name: asdict(line.stats) for name, line in self._lines.items()}

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
                self.set_state(line, "idle")
                await line.wait_changed(math.inf)
                continue
            failure = await self._attempt(line)
            if failure is None:
                line.backoff.reset()
                continue
            alsa = self.config.alsa
            delay_s = line.backoff.delay_s(alsa.retry_initial_s, alsa.retry_max_s)
            line.stats.retries += 1
            self.set_state(line, "retrying", failure[0], detail=failure[1])
            await line.wait_changed(delay_s)

    async def _attempt(self, line: _Line) -> _Failure | None:
        """Open, then one call through the lifecycle; the failure to back off from, or None."""
        cfg = line.config
        self.set_state(line, "opening")
        try:
            device = self._open(cfg)
        except DeviceLost as e:
            line.stats.open_failures += 1
            return "open-failed", str(e)
        ticket = uuid.uuid4().hex[:12]
        call = _LineCall(self, line, device, ticket)
        info = CallInfo(ruri_user=cfg.name, ruri_host=None, headers={}, source_ip=None,
                        transport=TRANSPORT, tenant_hint=cfg.tenant or None)
        started = trio.current_time()
        try:
            handle = self.calls.start(CallRequest(ticket, f"{cfg.name}-{ticket}", info,
                                                  from_uri=cfg.capture, to_uri=cfg.name,
                                                  peer=cfg.capture), call)
            while not handle.ended.is_set():
                if not line.wanted and handle.session is None:  # stopped while queued
                    self.calls.end(ticket, STOP_REASON)
                    await handle.ended.wait()
                    break
                await line.wait_changed(HEARTBEAT_S)
        finally:
            line.settle()
            if call.leg is None:  # never reached a session: the device is still ours
                device.close()
        if call.refusal is not None:
            line.stats.refusals += 1
            if cfg.mode == ON_DEMAND:
                line.wanted = False
                return None
            return "refused", call.refusal.reason
        if call.error is not None:
            return "error", repr(call.error)
        if call.leg is None:  # stopped while queued
            return None
        reason = handle.reason or "error"
        line.last_end_reason = reason
        if reason == DEVICE_LOST:
            line.stats.device_lost += 1
            return DEVICE_LOST, str(call.leg.lost)
        if cfg.mode == ON_DEMAND:
            line.wanted = False
            return None
        # An always line restarts at once, unless its sessions fail or end at once.
        if reason == "error" or trio.current_time() - started < self.config.alsa.retry_initial_s:
            return reason, "the session ended within [alsa] retry_initial_s"
        return None

    def set_state(self, line: _Line, state: str, reason: str | None = None,
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


def _open_line(line: AlsaLineConfig) -> LinePcms:
    return AlsaLineDevice.open(line.capture, line.playback, line.rate, line.period_ms)
