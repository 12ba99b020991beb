"""``voxgated``: the supervisor that starts, reloads, drains and stops the daemon.

Start-up order inside one Trio nursery: the media clock, admission, the call
records and post-call jobs (which never hold up start: a bad disk makes them
unhealthy, not the daemon), the sessions nursery (:mod:`voxgate.calls`), the
SIP endpoint, the WebSocket listener, the control socket, the ALSA lines, the
optional metrics listener; ``READY=1`` goes to systemd only once every
listener has reported ``started``. Then:

- SIGHUP (or ``voxgatectl reload``): ``RELOADING=1`` + ``MONOTONIC_USEC``,
  re-read the config, apply limits and tenants without touching calls in
  progress, ``READY=1``. An invalid file keeps the old config; ``STATUS=``
  and the reply say why.
- SIGTERM: drain. ``STOPPING=1``, admission closes (INVITE and OPTIONS get
  503), every ``[[sip.registrations]]`` binding is removed (un-REGISTER; the
  answers are awaited at the end, at most ``SHUTDOWN_GRACE_S``), calls in
  progress carry on while ``STATUS=`` counts them down and
  ``EXTEND_TIMEOUT_USEC=`` keeps systemd patient; ``[limits]
  drain_timeout_s`` is one deadline on the sessions nursery: the rest end
  there with BYE (reason ``drain-timeout``); post-call deliveries in flight
  get until the same deadline (the backlog stays queued for the next start);
  exit 0 once idle. A second SIGTERM, or SIGINT, ends every call at once.
- The watchdog (when ``$WATCHDOG_USEC`` is set) pings at half the interval
  while the loop lag and the critical tasks' check-ins are fine.

Exit codes: 0 clean stop, 73 (EX_CANTCREAT) a listener could not be set up
(``[sip] listen``, ``[websocket] listen``, ``[control] socket``, ``[metrics]
listen``: address in use, permission denied, disk full …; one ``listen_failed``
line names the key), 78 (EX_CONFIG) an invalid configuration. The units do
not restart on either (``RestartPreventExitStatus=78 73``). ``voxgated
--check-config [PATH]`` loads and checks what the daemon would start with
(PATH, else the ``--config`` file or its default) and exits 0 or 78; the units'
``ExecReload=`` runs it before the SIGHUP, so an invalid file fails the reload.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import logging
import os
import signal
import sys
import time
from collections import Counter
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from voxgate import __version__, budget
from voxgate.admission import ADMISSION_STATES, Admission, limits_from_config
from voxgate.admission_desk import AdmissionDesk
from voxgate.agents.factory import agent_kinds, check_agent
from voxgate.agents.stream import ProviderPool
from voxgate.agents.webhook import WebhookPool, webhook_pool
from voxgate.budget import RssGate, RssLimits, choose_shed_victims, parse_statm_rss_bytes
from voxgate.calls import Calls
from voxgate.config import DEFAULT_PATH, Config, load_config, rss_limits
from voxgate.control.protocol import decode_reply, encode_request, plural
from voxgate.control.server import ControlServer, ControlSetupError
from voxgate.errors import (
    EX_CANTCREAT,
    EX_CONFIG,
    ConfigError,
    RemoteProtocolError,
    is_resource_shortage,
)
from voxgate.logging import log_event, setup_logging
from voxgate.metrics import (
    LOOP_LAG,
    REGISTRY,
    LiveCollector,
    LiveValues,
    admission_values,
    alsa_values,
    control_values,
    media_values,
    one_hot,
    precreate_sessions_ended,
    registration_values,
    sip_values,
    websocket_values,
)
from voxgate.metrics_http import serve_metrics
from voxgate.pipeline.clock import MediaClock
from voxgate.pipeline.media_load import MediaLoad
from voxgate.pipeline.prompt import load_prompt
from voxgate.postcall import PostCallQueue
from voxgate.recording import Recordings
from voxgate.records import Records
from voxgate.registry import Registry
from voxgate.sip.registration import STATES as REGISTRATION_STATES
from voxgate.systemd import Notifier
from voxgate.transports.alsa import AlsaLines
from voxgate.transports.sip_endpoint import HEARTBEAT_S, SipEndpoint
from voxgate.transports.sip_stream import tls_server_context
from voxgate.transports.websocket import WebSocketEndpoint
from voxgate.watchdog import Watchdog

if TYPE_CHECKING:
    from voxgate.agents.recognizer import RecognizerPool

SHUTDOWN_GRACE_S = 5.0
"""How long a stop waits for the BYEs it sent to be answered, and for the registrars
to answer the removal of our bindings."""
STATUS_REFRESH_S = 10.0
LAG_PROBE_S = 0.1
CRITICAL_TASKS = ("sip", "admission", "media", "control", "alsa", "websocket")
# Settings a reload cannot change in a running process (sockets are bound).
_RESTART_ONLY = ("sip.listen", "sip.listen_tcp", "sip.listen_tls", "sip.tls_certificate",
                 "sip.tls_private_key", "sip.tls_client_ca", "sip.advertise",
                 "sip.registrations", "rtp.address",
                 "rtp.port_min", "rtp.port_max", "control.socket", "control.group",
                 "metrics.listen", "websocket.listen",
                 "records.path", "records.keep_days", "records.max_rows", "records.queue_size",
                 "records.recordings_dir", "records.recordings_max_bytes", "postcall.webhook",
                 "postcall.workers", "postcall.max_pending", "postcall.max_attempts",
                 "postcall.backoff_initial_s", "postcall.backoff_max_s", "postcall.timeout_s",
                 "agent.providers", "agent.stream", "agent.recognizers",
                 "agent.recognizer_memory_bytes", "agent.recognizer_timeout_s")


_CHECK_CONFIGURED = object()
"""``--check-config`` given without PATH: check the file the daemon would load
(not a string, which argparse would turn into a Path)."""


def media_cores() -> str:
    """``native`` when the media tick runs the mypyc-compiled modules (setup.py's
    ``NATIVE_MODULES``, built by ``make setup`` and in the .deb), ``python`` when
    they were built with ``VOXGATE_PURE_PYTHON=1`` or not built."""
    return "python" if (budget.__file__ or "").endswith(".py") else "native"


class ReloadFailed(Exception):
    """The new config is invalid; the old one stays in force."""


class Supervisor:
    """The running daemon: its components, its state and its signals."""

    def __init__(self, config: Config, config_path: Path | None, notifier: Notifier) -> None:
        self.config = config
        self.config_path = config_path
        self.notifier = notifier
        self.watchdog = Watchdog(CRITICAL_TASKS, config.watchdog.max_loop_lag_ms / 1000)
        self.clock = MediaClock(check_in=self.check_in, load=MediaLoad(
            config.limits.media_utilisation_max, config.limits.media_lag_max_ms / 1000),
            on_load=self._media_load)
        self._media_healthy = True
        self._media_counters: Counter[str] = Counter()  # as refresh_metrics last summed them
        self.admission = Admission(limits_from_config(config))
        self.desk = AdmissionDesk(self.admission, self.check_in)
        self._media_load(self.clock.load)  # listed in `voxgatectl health` from the start
        self.registry = Registry()
        rec = config.records
        self.records = None if not rec.path else Records(
            rec.path, keep_days=rec.keep_days, max_rows=rec.max_rows, queue_size=rec.queue_size)
        post = config.postcall
        self.postcall = None if not post.webhook else PostCallQueue(
            rec.path, webhook_url=post.webhook, workers=post.workers,
            max_pending=post.max_pending, max_attempts=post.max_attempts,
            backoff_initial_s=post.backoff_initial_s, backoff_max_s=post.backoff_max_s,
            timeout_s=post.timeout_s)
        # Stereo PCM16 at 8 kHz: 32 bytes per millisecond.
        self.recordings = None if not rec.recordings_dir else Recordings(
            rec.recordings_dir, max_bytes=rec.recordings_max_bytes,
            max_buffer_bytes=32 * rec.recording_buffer_ms)
        self.providers = None if not config.agent.providers else ProviderPool(
            config.agent.providers, config.agent.stream, self._provider_health)
        self.calls = Calls(config, self.desk, self.registry, self.clock, records=self.records,
                           postcall=self.postcall, recordings=self.recordings,
                           providers=self.providers)
        self.calls.fallback_prompt = _prompt(config)
        self.endpoint = SipEndpoint(config, self.calls, check_in=self.check_in)
        self.desk.subscribe(self.endpoint.poke)
        self.desk.subscribe(self.status_changed)
        self.alsa = AlsaLines(config, self.calls, check_in=self.check_in)
        self.websocket = WebSocketEndpoint(config, self.calls, check_in=self.check_in)
        self.rss_gate = RssGate(RssLimits(*rss_limits(config)))
        self.started_at = time.time()
        self._control: ControlServer | None = None
        self._webhooks_scope = trio.CancelScope()
        self._recognizers_scope = trio.CancelScope()
        REGISTRY.register(LiveCollector(self.metrics_snapshot))
        transports = ["sip"]
        if config.websocket.listen:
            transports.append("websocket")
        if config.alsa.lines:
            transports.append("alsa")
        precreate_sessions_ended(transports)
        self.stopping = False
        self._status_changed = trio.Event()
        self._last_status = ""

    # -- state shown to operators -------------------------------------------

    @property
    def state(self) -> str:
        return "draining" if self.admission.statistics().draining else "running"

    def status_line(self) -> str:
        """The one-line summary for systemd's STATUS=."""
        stats = self.admission.statistics()
        admitting, why = self.admission.availability()
        word = "admitting" if admitting else f"not admitting ({why})"
        if stats.draining:
            word = "draining"
        return f"{plural(stats.active, 'session')}, {stats.queued} queued, {word}"

    async def refresh_metrics(self) -> None:
        """Before a scrape: sum the sessions' counters for the next
        :meth:`metrics_snapshot` without holding up the media clock
        (:meth:`Registry.summed_counters`)."""
        self._media_counters = await self.registry.summed_counters()

    def metrics_snapshot(self) -> LiveValues:
        """Live values for the metrics collector (read at scrape time only); the
        sessions' counters as :meth:`refresh_metrics` summed them just before."""
        stats = self.admission.statistics()
        rss = self.rss_gate.limits
        control = self._control
        return {
            **media_values(self._media_counters),
            **admission_values(stats.counters),
            **sip_values(dataclasses.asdict(self.endpoint.stats)),
            **self._registration_values(),
            **alsa_values(self.alsa.counters()),
            **websocket_values(self.websocket.counters()),
            **({} if control is None else control_values(
                {name: getattr(control.stats, name) for name in control.stats.__slots__})),
            "voxgate_max_sessions": {(): stats.max_sessions},
            "voxgate_admission_state": one_hot(ADMISSION_STATES, self.admission.state()),
            "voxgate_rss_watermark_bytes": {("soft",): rss.soft_bytes,
                                            ("hard",): rss.hard_bytes},
            "voxgate_sessions_active": {tuple(key): n for key, n
                                        in self.registry.active_by_tenant().items()},
            "voxgate_queue_depth": {(): stats.queued},
            "voxgate_watchdog_pings_withheld_total": {(): self.watchdog.withheld},
            "voxgate_media_clock_frames_skipped_total": {(): self.clock.frames_skipped},
            "voxgate_media_clock_utilisation_ratio": {(): self.clock.load.utilisation},
            "voxgate_media_clock_lag_p90_seconds": {(): self.clock.load.lag_p90_s},
            "voxgate_rtp_ports_exhausted_total": {(): self.endpoint.ports.exhausted},
            "voxgate_rtp_ports_free": {(): self.endpoint.ports.available},
        }

    def _registration_values(self) -> LiveValues:
        states = [(r.registrar, r.aor, r.state) for r in self.endpoint.registration_statuses()]
        return registration_values(states, self.endpoint.registrations.counts,
                                   REGISTRATION_STATES)

    def status_changed(self) -> None:
        self._status_changed.set()

    def check_in(self, task: str) -> None:
        """A critical task proves it is alive (see :mod:`voxgate.watchdog`)."""
        self.watchdog.check_in(task, trio.current_time())

    @property
    def webhooks(self) -> WebhookPool | None:
        """The health of the local agent's webhook URLs (None without a local agent or
        without ``[agent.webhook]`` URLs); never an admission gate."""
        if "local" not in agent_kinds(self.config):
            return None
        return webhook_pool(self.config.agent)

    @property
    def recognizers(self) -> RecognizerPool | None:
        """The local agent's recogniser worker processes (None without a local agent)."""
        if "local" not in agent_kinds(self.config):
            return None
        from voxgate.agents.recognizer import shared_pool

        return shared_pool(self.config.agent)

    def _media_load(self, load: MediaLoad) -> None:
        """Once a second: the media clock's figures; over a limit, new calls are refused."""
        if load.healthy != self._media_healthy:
            self._media_healthy = load.healthy
            log_event(logging.INFO if load.healthy else logging.WARNING, "media_clock_load",
                      f"media clock {'has headroom again' if load.healthy else 'overloaded'}: "
                      f"{load.detail}; {'admitting' if load.healthy else 'refusing'} new calls")
        self.desk.set_health("media_clock", load.healthy, load.detail)

    def _provider_health(self, component: str, healthy: bool, detail: str) -> None:
        """The provider pool's verdict gates admission while a stream agent is in use."""
        gating = "stream" in agent_kinds(self.config)
        self.desk.set_health(component, healthy or not gating, detail if gating else "")

    # -- operations ----------------------------------------------------------

    def reload(self) -> str:
        """Re-read the config file and apply it; raises ReloadFailed."""
        if not self.stopping:
            self.notifier.notify("RELOADING=1",
                                 f"MONOTONIC_USEC={time.monotonic_ns() // 1000}")
        try:
            if self.config_path is None:
                raise ReloadFailed("running on the embedded defaults: no file to re-read")
            try:
                new = load_config(self.config_path)
                prompt = _prompt(new)
            except ConfigError as e:
                raise ReloadFailed(str(e)) from e
        except ReloadFailed as e:
            log_event(logging.ERROR, "reload_failed", f"reload failed, old config kept: {e}")
            self._ready_again(f"STATUS=reload failed: {e}")
            raise
        pending = [key for key in _RESTART_ONLY if _get(new, key) != _get(self.config, key)]
        webhooks, recognizers = self.webhooks, self.recognizers
        self.config = new
        if self.webhooks is not webhooks:
            self._webhooks_scope.cancel()  # _run_webhooks goes on with the new URLs
        if self.recognizers is not recognizers:
            self._recognizers_scope.cancel()  # _run_recognizers starts or stops them
        setup_logging(new.log.level, new.log.target)
        self.watchdog.max_loop_lag_s = new.watchdog.max_loop_lag_ms / 1000
        self.clock.load.utilisation_max = new.limits.media_utilisation_max
        self.clock.load.lag_max_s = new.limits.media_lag_max_ms / 1000
        self.calls.config = new
        self.calls.fallback_prompt = prompt
        self.alsa.apply_config(new)
        self.websocket.apply_config(new)
        self.rss_gate.update(RssLimits(*rss_limits(new)))
        self.desk.update_limits(limits_from_config(new), trio.current_time())
        self.endpoint.apply_config(new)
        message = "config reloaded"
        if pending:
            message += f"; restart needed for {', '.join(pending)}"
        log_event(logging.INFO, "reloaded", message, config=new.source,
                  max_sessions=new.limits.max_sessions)
        self._ready_again(f"STATUS={self.status_line()}")
        self.status_changed()
        return message

    def _ready_again(self, status: str) -> None:
        """End a reload: READY=1, unless the daemon is stopping (then STATUS only)."""
        if self.stopping:
            self.notifier.notify(status)
        else:
            self.notifier.notify("READY=1", status)

    def drain(self) -> None:
        """Stop admitting new calls; calls in progress carry on."""
        self.desk.set_draining(True)

    def resume(self) -> None:
        """Admit again after a drain (not while stopping)."""
        if not self.stopping:
            self.desk.set_draining(False)

    # -- run -------------------------------------------------------------------

    async def run(self) -> int:
        """Run until stopped; returns the exit code."""
        config = self.config
        with trio.open_signal_receiver(*_signals(config)) as signals:
            async with trio.open_nursery() as nursery:
                await nursery.start(self.clock.run)
                await nursery.start(self.desk.run)
                for service in (self.records, self.postcall, self.recordings, self.providers):
                    if service is not None:
                        await nursery.start(service.run)
                nursery.start_soon(self._run_webhooks)
                nursery.start_soon(self._run_recognizers)
                await nursery.start(self.calls.run)
                listeners = [
                    ("[sip] listen", config.sip.listen, self.endpoint.run),
                    ("[websocket] listen", config.websocket.listen, self.websocket.run),
                    ("[control] socket", config.control.socket, self._control_server().run),
                    ("[alsa] lines", "", self.alsa.run),
                ]
                if config.metrics.listen:
                    listeners.append(("[metrics] listen", config.metrics.listen,
                                      partial(serve_metrics, config.metrics.listen,
                                              before_scrape=self.refresh_metrics)))
                for key, value, start in listeners:
                    try:
                        await nursery.start(start)
                    except (OSError, ControlSetupError) as e:
                        where = f"{key} {value}" if value else key
                        detail = str(e).removeprefix(f"{value}: ")
                        log_event(logging.ERROR, "listen_failed", f"cannot start: {where}: "
                                  f"{detail}", key=key, exit_code=EX_CANTCREAT)
                        nursery.cancel_scope.cancel()
                        return EX_CANTCREAT
                for task in (self._status_loop, self._lag_probe, self._watchdog,
                             self._memory_loop):
                    nursery.start_soon(task)
                self._last_status = self.status_line()
                self.notifier.notify("READY=1", f"STATUS={self._last_status}")
                log_event(logging.INFO, "ready", "voxgate ready", sip=config.sip.listen,
                          rtp=f"{config.rtp.address}:{config.rtp.port_min}-{config.rtp.port_max}",
                          control=config.control.socket, max_sessions=config.limits.max_sessions,
                          agent=config.agent.kind, config=config.source, version=__version__,
                          media_cores=media_cores())
                async for signum in signals:
                    await self._on_signal(signal.Signals(signum), nursery)
        log_event(logging.INFO, "stopped", "voxgate stopped")
        return 0

    def _control_server(self) -> ControlServer:
        from voxgate.control.commands import make_handlers

        self._control = ControlServer(self.config.control.socket, make_handlers(self),
                                      group=self.config.control.group or None,
                                      version=__version__)
        return self._control

    async def _on_signal(self, sig: signal.Signals, nursery: trio.Nursery) -> None:
        if sig == signal.SIGHUP:
            with contextlib.suppress(ReloadFailed):  # logged and in STATUS= already
                self.reload()
        elif sig == signal.SIGUSR2:
            block_s = self.config.watchdog.test_block_s
            log_event(logging.WARNING, "test_block_loop", f"blocking the event loop {block_s} s")
            time.sleep(block_s)  # noqa: ASYNC251 - the test hook blocks the loop on purpose
        elif sig == signal.SIGTERM and not self.stopping:
            self.stopping = True
            nursery.start_soon(self._drain_and_exit, nursery.cancel_scope)
        else:
            log_event(logging.INFO, "shutdown", "stopping now", signal=sig.name,
                      sessions=len(self.registry))
            self.stopping = True
            self.notifier.notify("STOPPING=1")
            self.desk.set_draining(True)
            self.endpoint.stop_registrations()
            self.calls.stop("shutdown")
            await self.registry.wait_empty(SHUTDOWN_GRACE_S)
            await self.endpoint.wait_idle(SHUTDOWN_GRACE_S)
            await self.endpoint.wait_registrations(SHUTDOWN_GRACE_S)
            nursery.cancel_scope.cancel()

    async def _drain_and_exit(self, scope: trio.CancelScope) -> None:
        timeout_s = self.config.limits.drain_timeout_s
        log_event(logging.INFO, "drain", "draining before exit",
                  sessions=len(self.registry), drain_timeout_s=timeout_s)
        self.notifier.notify("STOPPING=1")
        self.drain()
        self.endpoint.stop_registrations()  # registrars stop sending us calls
        deadline = trio.current_time() + timeout_s
        self.calls.drain(deadline)
        up = len(self.registry)
        while up:
            left = max(0.0, deadline - trio.current_time())
            self.notifier.notify(
                f"STATUS=draining: {plural(up, 'session')} left, "
                f"{left:.0f} s to the drain deadline",
                f"EXTEND_TIMEOUT_USEC={int((left + SHUTDOWN_GRACE_S + 5) * 1e6)}",
            )
            await self.registry.wait_empty(min(left, 1.0))
            # At the deadline the calls' own cancel scope ends the rest: they may be
            # gone before this task sees the registry again.
            if trio.current_time() >= deadline:
                log_event(logging.WARNING, "drain_timeout", "drain deadline: ending the rest",
                          sessions=up)
                await self.registry.wait_empty(SHUTDOWN_GRACE_S)
                break
            up = len(self.registry)
        self.notifier.notify("STATUS=stopping",
                             f"EXTEND_TIMEOUT_USEC={int((SHUTDOWN_GRACE_S + 5) * 1e6)}")
        await self.endpoint.wait_idle(SHUTDOWN_GRACE_S)
        await self.endpoint.wait_registrations(SHUTDOWN_GRACE_S)
        if self.postcall is not None:  # deliveries in flight, never the backlog
            self.postcall.stop_claiming()
            with trio.move_on_at(max(deadline, trio.current_time())):
                await self.postcall.wait_idle()
        scope.cancel()

    async def _run_webhooks(self) -> None:
        """Probe the webhook URLs of the config in force (:attr:`webhooks`), until
        cancelled; a reload that changes them switches to the new ones."""
        while True:
            pool = self.webhooks
            with trio.CancelScope() as self._webhooks_scope:
                if pool is None:
                    await trio.sleep_forever()
                else:
                    await pool.run()

    async def _run_recognizers(self) -> None:
        """Run the local agent's recogniser workers while the config in force has a
        local agent (they outlive calls; a reload may start or stop them)."""
        while True:
            pool = self.recognizers
            with trio.CancelScope() as self._recognizers_scope:
                if pool is None:
                    await trio.sleep_forever()
                else:
                    await pool.run()

    async def _status_loop(self) -> None:
        """STATUS= on change (checked every second) and at least every 10 s."""
        last_sent = -STATUS_REFRESH_S
        while True:
            with trio.move_on_after(1.0):
                await self._status_changed.wait()
            self._status_changed = trio.Event()
            if self.stopping:
                continue
            line = self.status_line()
            now = trio.current_time()
            if line != self._last_status or now - last_sent >= STATUS_REFRESH_S:
                self.notifier.notify(f"STATUS={line}")
                self._last_status, last_sent = line, now

    async def _lag_probe(self) -> None:
        """Measure how late a timer fires: the event loop's lag."""
        while True:
            expected = trio.current_time() + LAG_PROBE_S
            await trio.sleep_until(expected)
            lag_s = max(0.0, trio.current_time() - expected)
            LOOP_LAG.observe(lag_s)
            self.watchdog.record_lag(lag_s)

    async def _memory_loop(self) -> None:
        """Sample RSS every second: close admission above the soft mark, shed the
        newest sessions (reason ``memory-shed``) above the hard one."""
        page_size = os.sysconf("SC_PAGE_SIZE")
        failed = False
        while True:
            try:
                with open("/proc/self/statm") as f:  # noqa: ASYNC230 - procfs, never blocks
                    rss_bytes = parse_statm_rss_bytes(f.read(), page_size)
                recognizers = self.recognizers  # worker processes count as ours
                rss_bytes += 0 if recognizers is None else recognizers.rss_bytes()
            except OSError as e:  # EMFILE/ENFILE at the fd limit: skip this sample
                if not failed:
                    log_event(logging.ERROR, "memory_sample_failed",
                              f"cannot read /proc/self/statm: {e}; retrying every second")
                failed = True
                await trio.sleep(1.0)
                continue
            failed = False
            verdict = self.rss_gate.sample(rss_bytes, trio.current_time())
            stats = self.admission.statistics()
            if verdict.admit != stats.memory_ok:
                log_event(logging.WARNING if not verdict.admit else logging.INFO,
                          "memory_gate", verdict.detail, rss_bytes=rss_bytes,
                          state=verdict.state)
                self.desk.set_memory_ok(verdict.admit, verdict.detail)
            for victim in choose_shed_victims(self.registry.session_ages(), verdict.shed):
                entry = self.registry.find(victim)
                if entry is not None:
                    log_event(logging.WARNING, "memory_shed", "shedding the newest session",
                              call=entry.session, rss_bytes=rss_bytes)
                    entry.session.end("memory-shed")
            await trio.sleep(1.0)

    async def _watchdog(self) -> None:
        """WATCHDOG=1 at half of $WATCHDOG_USEC while the checks pass."""
        interval_s = _watchdog_interval_s()
        if interval_s is None:
            return
        period_s = interval_s / 2
        # Idle loops check in about once a second; allow two of those, or a period.
        window_s = max(period_s, 2 * HEARTBEAT_S)
        logged: tuple[str, ...] = ()
        while True:
            await trio.sleep(period_s)
            if await self._control_alive():
                self.check_in("control")
            verdict = self.watchdog.verdict(trio.current_time(), window_s)
            if verdict.ping:
                self.notifier.notify("WATCHDOG=1")
            elif verdict.failures != logged:
                log_event(logging.ERROR, "watchdog_withheld",
                          "not pinging the watchdog: " + "; ".join(verdict.failures))
            logged = verdict.failures

    async def _control_alive(self) -> bool:
        """Probe the control socket end to end with ``hello``.

        Short of file descriptors the probe cannot open its own socket: that
        is not a stuck control loop (the shortage is logged and counted), so
        it does not withhold the watchdog.
        """
        control = self._control
        if control is not None and control.accept_shortage.active:
            return True
        with trio.move_on_after(2.0):
            try:
                stream = await trio.open_unix_socket(self.config.control.socket)
                async with stream:
                    await stream.send_all(encode_request(0, "hello", {}))
                    line = await stream.receive_some(4096)
                return decode_reply(line.split(b"\n", 1)[0]).ok
            except OSError as e:
                return is_resource_shortage(e)
            except RemoteProtocolError:
                return False
        return False


def _prompt(config: Config) -> tuple[bytes, ...]:
    """The fallback prompt's frames; raises ConfigError naming the key."""
    if not config.agent.fallback_prompt:
        return ()
    return load_prompt(config.agent.fallback_prompt, f"{config.source}: [agent] fallback_prompt")


def _get(config: Config, dotted: str) -> object:
    section, key = dotted.split(".")
    return getattr(getattr(config, section), key)


def _signals(config: Config) -> list[signal.Signals]:
    signals: list[signal.Signals] = [signal.SIGTERM, signal.SIGINT, signal.SIGHUP]
    if config.watchdog.test_block_s > 0:
        signals.append(signal.SIGUSR2)
    return signals


def _watchdog_interval_s() -> float | None:
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0 or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 1e6


def _build_parser() -> argparse.ArgumentParser:
    """voxgated's command line; packaging/build-deb.sh also renders it as voxgated(8)."""
    parser = argparse.ArgumentParser(prog="voxgated", description="voxgate telephony daemon")
    parser.add_argument("--config", type=Path, default=None,
                        help=f"configuration file (default {DEFAULT_PATH}; the embedded "
                             "defaults when that file does not exist)")
    parser.add_argument("--check-config", type=Path, nargs="?", const=_CHECK_CONFIGURED,
                        metavar="PATH",
                        help="validate PATH (without PATH: the file --config names, or its "
                             "default) and exit: 0 valid, 78 (EX_CONFIG) invalid")
    parser.add_argument("--version", action="version", version=f"voxgated {__version__}")
    return parser


def _config_path(args: argparse.Namespace) -> Path | None:
    """The file to load: ``--check-config PATH``, else ``--config``, else
    :data:`~voxgate.config.DEFAULT_PATH`; None (the embedded defaults) only when
    that default file does not exist. A default file that cannot be looked at
    (a directory the user may not search) is returned, so that loading it
    reports why."""
    if isinstance(args.check_config, Path):
        return args.check_config
    if args.config is not None:
        return Path(args.config)
    try:
        DEFAULT_PATH.stat()
    except FileNotFoundError:
        return None
    except OSError:
        pass
    return DEFAULT_PATH


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``voxgated``; returns the process exit code."""
    args = _build_parser().parse_args(argv)
    path = _config_path(args)
    try:
        config = Config() if path is None else load_config(path)
        _prompt(config)
        check_agent(config)
        tls_server_context(config)
    except ConfigError as e:
        print(f"voxgated: config error: {e}", file=sys.stderr)
        return EX_CONFIG
    if args.check_config is not None:
        print(f"voxgated: {path}: ok" if path is not None else
              f"voxgated: {DEFAULT_PATH} does not exist: the embedded defaults apply: ok")
        return 0
    setup_logging(config.log.level, config.log.target)
    # What start-up built (modules, config) lives as long as the process: move it out
    # of the collector's reach, so a full collection under load scans only the calls.
    gc.collect()
    gc.freeze()
    return trio.run(Supervisor(config, path, Notifier()).run)


if __name__ == "__main__":
    sys.exit(main())
