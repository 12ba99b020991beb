"""The real daemon's systemd life cycle: READY/STATUS, SIGHUP reload, SIGTERM drain, stop.

Notifications are read from the harness's ``NOTIFY_SOCKET`` (every line, in
order of arrival); SIPp places the calls that a drain or a stop has to deal
with. Timing assertions stay loose (a shared 2-core machine): they check the
presence and the order of events, and that a stop did not wait for a
deadline far beyond the test's own wait.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import tomllib
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from tests.harness import requires
from tests.harness.audio import SpeechClip
from tests.harness.daemon import (
    REPO_ROOT,
    Daemon,
    PortRange,
    TomlValue,
    _Notifications,
    daemon_command,
    default_config,
    free_udp_port,
    invite_request,
    options_request,
    render_toml,
    status_code,
)
from tests.harness.sipp import Sipp, SippResult
from tests.integration.conftest import StartDaemon

ReservePorts = Callable[[int], PortRange]

IDLE_STATUS = "STATUS=0 sessions, 0 queued, admitting"
DRAIN_STATUS = re.compile(
    r"STATUS=draining: (\d+) sessions? left, (\d+) s to the drain deadline"
)
WAIT_S = 10.0
EXIT_WAIT_S = 30.0
"""How long a stop may take here; the slow-drain tests use a longer drain_timeout_s."""
_POLL_S = 0.05
SIPP_SETTLE_S = 0.5


# -- helpers -----------------------------------------------------------------


def wait_until(check: Callable[[], bool], timeout_s: float, what: str) -> None:
    """Poll ``check`` until it holds; AssertionError naming ``what`` on timeout.

    Shared with ``test_watchdog``.
    """
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(_POLL_S)


def _wait_line(daemon: Daemon, pattern: str, *, after: int = 0,
               timeout_s: float = WAIT_S) -> int:
    """Index of the first notification line at index >= ``after`` fully matching ``pattern``."""
    regex = re.compile(pattern)
    found: list[int] = []

    def check() -> bool:
        lines = daemon.notifications
        found[:] = [i for i in range(after, len(lines)) if regex.fullmatch(lines[i])][:1]
        return bool(found)

    try:
        wait_until(check, timeout_s, f"notification {pattern!r}")
    except AssertionError as e:
        raise AssertionError(f"{e}; got {daemon.notifications}") from None
    return found[0]


def _edit_config(daemon: Daemon, changes: Mapping[str, Mapping[str, TomlValue]]) -> None:
    """Rewrite the daemon's config file with ``changes`` applied per section."""
    config: dict[str, dict[str, Any]] = tomllib.loads(daemon.config_path.read_text())
    for section, keys in changes.items():
        config.setdefault(section, {}).update(keys)
    daemon.config_path.write_text(render_toml(config))


def _final_response(daemon: Daemon, request_from: Callable[[int], bytes]) -> bytes:
    """Send ``request_from(source_port)`` and return the final response to it."""
    port = free_udp_port()
    responses = daemon.exchange(request_from(port), source_port=port, timeout_s=5.0,
                                until_final=True)
    assert responses, "no response"
    assert status_code(responses[-1]) >= 200, responses
    return responses[-1]


def _caller(scenario: str, daemon: Daemon, workdir: Path, media: PortRange,
            clip: SpeechClip, duration_ms: int = 1000) -> Sipp:
    return Sipp(scenario, daemon.sip_address, workdir=workdir, local_port=free_udp_port(),
                media_port=media.first, clip=clip, duration_ms=duration_ms, timeout_s=40.0)


def _assert_ok(result: SippResult, daemon: Daemon) -> None:
    why = f"{result.describe()}\ndaemon log tail:\n{daemon.log_text()[-3000:]}"
    assert result.returncode == 0, why
    assert result.successful_calls == 1, why


def _wait_answered(daemon: Daemon, count: int = 1) -> None:
    """Wait for the ``count``-th call_start, then give SIPp time to reach ``recv BYE``.

    SIPp aborts a call on an "unexpected BYE" that arrives while it still runs
    the ``nop`` (start of the RTP stream) after its ACK, so a BYE the daemon
    sends within a millisecond of the ACK would fail the call on SIPp's side.
    """
    daemon.wait_log(r"event=call_start\b", count=count)
    time.sleep(SIPP_SETTLE_S)


def _call_ends(daemon: Daemon) -> list[str]:
    return [e.get("reason", "") for e in daemon.events("call_end")]


# -- READY, STATUS, reload --------------------------------------------------------


@requires("sipp")
def test_ready_carries_status_and_status_follows_a_call(
    start_daemon: StartDaemon, reserve_ports: ReservePorts, clip: SpeechClip, tmp_path: Path
) -> None:
    daemon = start_daemon()
    # READY=1 and STATUS= travel in one datagram, the first one sent.
    assert daemon.notifications[:2] == ["READY=1", IDLE_STATUS]

    with _caller("uac_echo", daemon, tmp_path / "sipp", reserve_ports(4), clip,
                 duration_ms=3000) as call:
        busy = _wait_line(daemon, r"STATUS=1 session, 0 queued, admitting")
        result = call.wait()
    _assert_ok(result, daemon)
    _wait_line(daemon, re.escape(IDLE_STATUS), after=busy + 1)
    assert daemon.notifications.count("READY=1") == 1


def test_sighup_rereads_the_file_between_reloading_and_ready(start_daemon: StartDaemon) -> None:
    daemon = start_daemon()
    _edit_config(daemon, {"limits": {"max_sessions": 7}})
    start = len(daemon.notifications)
    before_us = time.monotonic_ns() // 1000
    daemon.proc.send_signal(signal.SIGHUP)
    reloading = _wait_line(daemon, "RELOADING=1", after=start)
    after_us = time.monotonic_ns() // 1000

    lines = daemon.notifications
    stamp = re.fullmatch(r"MONOTONIC_USEC=(\d+)", lines[reloading + 1])
    assert stamp is not None, lines[reloading:]
    # CLOCK_MONOTONIC is system-wide: the daemon's stamp lies between our two readings.
    assert before_us <= int(stamp.group(1)) <= after_us, (before_us, stamp.group(0), after_us)
    ready = _wait_line(daemon, "READY=1", after=reloading)
    assert daemon.notifications[ready + 1] == IDLE_STATUS
    assert not any(line.startswith("STATUS=reload failed") for line in daemon.notifications)
    daemon.wait_log(r"event=reloaded\b.*\bmax_sessions=7\b")


@requires("sipp")
def test_invalid_file_on_reload_keeps_the_old_limits(
    start_daemon: StartDaemon, reserve_ports: ReservePorts, clip: SpeechClip, tmp_path: Path
) -> None:
    daemon = start_daemon({"limits": {"max_sessions": 1, "drain_timeout_s": 1}})
    # A higher cap next to an out-of-range value: nothing of it may be applied.
    _edit_config(daemon, {"limits": {"max_sessions": 5}, "rtp": {"jitter_buffer_ms": 5000}})
    start = len(daemon.notifications)
    daemon.proc.send_signal(signal.SIGHUP)
    failed = _wait_line(daemon, r"STATUS=reload failed: .*\[rtp\] jitter_buffer_ms.*",
                        after=start)
    lines = daemon.notifications
    assert "RELOADING=1" in lines[start:failed]
    assert lines[failed - 1] == "READY=1"
    daemon.wait_log(r"event=reload_failed\b")
    assert not daemon.events("reloaded")

    media = reserve_ports(4)
    with _caller("uac_wait_bye", daemon, tmp_path / "sipp", media, clip) as call:
        _wait_answered(daemon)
        second = _final_response(daemon, lambda port: invite_request(
            daemon.sip_port, port, "over-the-old-cap", media.first + 2))
        assert status_code(second) == 503, second.decode(errors="replace")
        daemon.wait_log(r"event=call_refused\b.*\breason=full\b")
        assert daemon.terminate(EXIT_WAIT_S) == 0
        result = call.wait()
    _assert_ok(result, daemon)
    assert _call_ends(daemon) == ["drain-timeout"]


# -- SIGTERM drain, immediate stop -------------------------------------------------


@requires("sipp")
def test_drain_lets_short_calls_finish_and_ends_the_rest_at_the_deadline(
    start_daemon: StartDaemon, reserve_ports: ReservePorts, clip: SpeechClip, tmp_path: Path
) -> None:
    daemon = start_daemon({"limits": {"drain_timeout_s": 4}})
    media = reserve_ports(8)
    with contextlib.ExitStack() as stack:
        long_call = stack.enter_context(
            _caller("uac_wait_bye", daemon, tmp_path / "long", media, clip))
        _wait_answered(daemon)
        short_media = PortRange(media.first + 4, 4)
        short_call = stack.enter_context(
            _caller("uac_echo", daemon, tmp_path / "short", short_media, clip,
                    duration_ms=2000))
        _wait_answered(daemon, count=2)
        sigterm_at = time.monotonic()
        daemon.proc.send_signal(signal.SIGTERM)
        assert daemon.wait_notify("STOPPING=1")

        invite = _final_response(daemon, lambda port: invite_request(
            daemon.sip_port, port, "while-draining", media.first + 2))
        assert status_code(invite) == 503, invite.decode(errors="replace")
        assert re.search(rb"\r\nRetry-After: *\d+", invite, re.IGNORECASE), invite
        options = _final_response(daemon, lambda port: options_request(
            daemon.sip_port, port, "options-while-draining"))
        assert status_code(options) == 503, options.decode(errors="replace")

        short_result = short_call.wait()
        long_result = long_call.wait()
        code = daemon.wait_exit(EXIT_WAIT_S)
        drained_s = time.monotonic() - sigterm_at
    assert code == 0
    _assert_ok(short_result, daemon)
    _assert_ok(long_result, daemon)
    assert _call_ends(daemon) == ["bye", "drain-timeout"]
    assert drained_s >= 3.0, "exited before the drain deadline with a call still up"

    lines = daemon.notifications
    stopping = lines.index("STOPPING=1")
    countdown = [(i, DRAIN_STATUS.fullmatch(line)) for i, line in enumerate(lines)]
    drain = [(i, int(m.group(1)), int(m.group(2))) for i, m in countdown if m]
    assert drain, lines
    assert drain[0][0] > stopping
    sessions = [n for _, n, _ in drain]
    seconds = [s for _, _, s in drain]
    assert sessions[0] == 2 and 1 in sessions, sessions
    assert sessions == sorted(sessions, reverse=True), sessions
    assert seconds == sorted(seconds, reverse=True) and seconds[0] <= 4, seconds
    extends = [int(line.split("=", 1)[1]) for line in lines[stopping:]
               if line.startswith("EXTEND_TIMEOUT_USEC=")]
    assert len(extends) >= len(drain) and all(usec > 0 for usec in extends), extends
    assert "STATUS=stopping" in lines[drain[-1][0]:]
    assert "READY=1" not in lines[stopping:]
    assert len(daemon.events("drain_timeout")) == 1


@requires("sipp")
def test_drain_exits_as_soon_as_the_last_call_ends(
    start_daemon: StartDaemon, reserve_ports: ReservePorts, clip: SpeechClip, tmp_path: Path
) -> None:
    daemon = start_daemon({"limits": {"drain_timeout_s": 120}})
    with _caller("uac_echo", daemon, tmp_path / "sipp", reserve_ports(4), clip,
                 duration_ms=2000) as call:
        daemon.wait_log(r"event=call_start\b")
        daemon.proc.send_signal(signal.SIGTERM)
        assert daemon.wait_notify("STOPPING=1")
        result = call.wait()
        # Far less than drain_timeout_s: wait_exit raises if the daemon waits for it.
        assert daemon.wait_exit(EXIT_WAIT_S) == 0
    _assert_ok(result, daemon)
    assert _call_ends(daemon) == ["bye"]
    assert not daemon.events("drain_timeout")


@requires("sipp")
@pytest.mark.parametrize(
    "signals",
    [(signal.SIGTERM, signal.SIGTERM), (signal.SIGINT,)],
    ids=["second-sigterm", "sigint"],
)
def test_stop_now_ends_every_call_with_bye(
    start_daemon: StartDaemon,
    reserve_ports: ReservePorts,
    clip: SpeechClip,
    tmp_path: Path,
    signals: tuple[signal.Signals, ...],
) -> None:
    daemon = start_daemon({"limits": {"drain_timeout_s": 120}})
    with _caller("uac_wait_bye", daemon, tmp_path / "sipp", reserve_ports(4), clip) as call:
        _wait_answered(daemon)
        for sig in signals[:-1]:  # the first SIGTERM starts a drain
            daemon.proc.send_signal(sig)
            _wait_line(daemon, DRAIN_STATUS.pattern)
        daemon.proc.send_signal(signals[-1])
        assert daemon.wait_exit(EXIT_WAIT_S) == 0
        result = call.wait()
    _assert_ok(result, daemon)
    assert _call_ends(daemon) == ["shutdown"]
    assert "STOPPING=1" in daemon.notifications
    daemon.wait_log(rf"event=shutdown\b.*\bsignal={signals[-1].name}\b")
    assert not daemon.events("drain_timeout")


# -- NOTIFY_SOCKET absent or unreachable --------------------------------------------


@contextlib.contextmanager
def _daemon_with_notify_socket(
    workdir: Path, rtp: PortRange, notify_socket: str | None
) -> Iterator[Daemon]:
    """voxgated started here (not by the harness) with ``NOTIFY_SOCKET`` as given.

    The harness waits for READY=1 on its own socket; these daemons send it
    nowhere, so readiness is their ``event=ready`` log line. The harness's
    collector is bound at a path the daemon is never told about.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    sock_dir = Path(tempfile.mkdtemp(prefix="vg-life-"))  # AF_UNIX paths are <= 107 bytes
    unused = _Notifications(sock_dir / "unused.sock")
    proc: subprocess.Popen[bytes] | None = None
    try:
        sip_port = free_udp_port()
        config_path = workdir / "voxgate.toml"
        config_path.write_text(render_toml(default_config(
            sip_port, rtp, sock_dir / "control.sock", workdir / "calls.sqlite3")))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            p for p in (str(REPO_ROOT / "daemon"), os.environ.get("PYTHONPATH", "")) if p))
        env.pop("NOTIFY_SOCKET", None)
        if notify_socket is not None:
            env["NOTIFY_SOCKET"] = notify_socket
        log_path = workdir / "voxgated.log"
        with log_path.open("wb") as log:
            proc = subprocess.Popen([*daemon_command(), "--config", str(config_path)],
                                    stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                    env=env, cwd=workdir)
        daemon = Daemon(proc, sip_port, rtp, config_path, log_path, unused)
        wait_until(lambda: bool(daemon.events("ready")) or not daemon.alive(), 15.0,
                    "event=ready")
        assert daemon.alive(), f"voxgated exited {proc.poll()}:\n{daemon.log_text()[-3000:]}"
        yield daemon
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        unused.close()
        shutil.rmtree(sock_dir, ignore_errors=True)


def _exercise_and_stop(daemon: Daemon) -> None:
    """Every notify path: OPTIONS 200, STATUS refreshes, a reload, a SIGTERM stop."""
    options = _final_response(daemon, lambda port: options_request(
        daemon.sip_port, port, "notify-probe"))
    assert status_code(options) == 200, options.decode(errors="replace")
    daemon.proc.send_signal(signal.SIGHUP)
    daemon.wait_log(r"event=reloaded\b")
    time.sleep(1.5)  # at least one STATUS= check of the status loop
    assert daemon.alive()
    assert daemon.terminate(EXIT_WAIT_S) == 0


def test_without_notify_socket_nothing_is_said_about_it(
    reserve_ports: ReservePorts, tmp_path: Path
) -> None:
    with _daemon_with_notify_socket(tmp_path / "daemon", reserve_ports(10), None) as daemon:
        _exercise_and_stop(daemon)
    assert not daemon.events("notify_failed")
    lines = daemon.log_text().splitlines()
    assert not [line for line in lines if "NOTIFY_SOCKET" in line], lines
    assert not [line for line in lines if re.search(r"\blevel=(warning|error)\b", line)], lines


@pytest.mark.parametrize("kind", ["missing", "stale"])
def test_unreachable_notify_socket_warns_once_and_the_daemon_works(
    reserve_ports: ReservePorts, tmp_path: Path, kind: str
) -> None:
    sock_dir = Path(tempfile.mkdtemp(prefix="vg-dead-"))
    try:
        path = sock_dir / "notify.sock"
        if kind == "stale":  # a socket file whose listener is gone: ECONNREFUSED
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as gone:
                gone.bind(str(path))
        with _daemon_with_notify_socket(tmp_path / "daemon", reserve_ports(10),
                                        str(path)) as daemon:
            _exercise_and_stop(daemon)
    finally:
        shutil.rmtree(sock_dir, ignore_errors=True)
    warnings = daemon.events("notify_failed")
    assert len(warnings) == 1, daemon.log_text()
    assert warnings[0].get("level") == "warning"
    assert warnings[0].get("notify_socket") == str(path)
