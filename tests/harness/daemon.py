"""Run the real ``voxgated`` for a test: config, free ports, readiness, logs.

:func:`running_daemon` writes a TOML config into the test's directory (the
defaults below, updated per section with ``overrides``), reserves a free SIP
port and an RTP port range, binds a ``NOTIFY_SOCKET`` datagram socket, starts
the daemon with its stderr (logfmt, one event per line) in ``voxgated.log``,
waits for ``READY=1`` and yields a :class:`Daemon`. The process is killed by
its PID on the way out whatever happened.

Port ranges are reserved with an ``flock`` on a per-range file in the temp
dir, so parallel test processes never share one, and are taken below the
kernel's ephemeral range so no ``bind(0)`` socket can land inside them.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import pwd
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import tomllib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

REPO_ROOT = Path(__file__).resolve().parents[2]
SYSTEM_PYTHON = "/usr/bin/python3"
READY_TIMEOUT_S = 15.0
TERMINATE_TIMEOUT_S = 40.0
_KILL_TIMEOUT_S = 10.0
_POLL_S = 0.05
_LOCK_DIR = Path(tempfile.gettempdir()) / "voxgate-test-ports"
_RANGE_FLOOR = 20000
_LOGFMT_PAIR = re.compile(r'([A-Za-z0-9_.\-]+)=("(?:[^"\\]|\\.)*"|\S*)')

TomlValue = str | int | float | bool | list[str]
TomlTable = Mapping[str, TomlValue]
ConfigOverrides = Mapping[str, TomlTable | Sequence[TomlTable]]
"""section → key → value; a sequence of tables is an array of tables (``[[tenants]]``)."""


@dataclass
class PortRange:
    """``count`` consecutive UDP ports from ``first``, held until :meth:`release`."""

    first: int
    count: int
    _lock: IO[bytes] | None = field(default=None, repr=False)

    @property
    def last(self) -> int:
        """Highest port of the range, inclusive."""
        return self.first + self.count - 1

    def release(self) -> None:
        """Drop the reservation (closing the lock file releases the flock)."""
        if self._lock is not None:
            self._lock.close()
            self._lock = None


def _free_port(kind: socket.SocketKind, host: str) -> int:
    """A port of ``kind`` the kernel says is free right now (bind to port 0, read, close)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, kind) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def free_udp_port(host: str = "127.0.0.1") -> int:
    """A UDP port the kernel says is free right now."""
    return _free_port(socket.SOCK_DGRAM, host)


def free_tcp_port(host: str = "127.0.0.1") -> int:
    """A TCP port the kernel says is free right now."""
    return _free_port(socket.SOCK_STREAM, host)


def _ephemeral_floor() -> int:
    try:
        text = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text()
        return int(text.split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _range_is_free(first: int, count: int, host: str) -> bool:
    with contextlib.ExitStack() as stack:
        for port in range(first, first + count):
            s = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
            try:
                s.bind((host, port))
            except OSError:
                return False
    return True


def reserve_port_range(count: int, host: str = "127.0.0.1") -> PortRange:
    """Reserve ``count`` free consecutive UDP ports below the ephemeral range.

    Raises:
        RuntimeError: no free range was found in 200 tries.
    """
    _LOCK_DIR.mkdir(exist_ok=True)
    ceiling = _ephemeral_floor() - count
    slots = list(range(_RANGE_FLOOR, ceiling, count))
    if not slots:
        raise RuntimeError(f"no room for {count} ports below the ephemeral range")
    for first in random.sample(slots, min(200, len(slots))):
        lock = (_LOCK_DIR / f"{first}.lock").open("wb")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock.close()
            continue
        if _range_is_free(first, count, host):
            return PortRange(first, count, lock)
        lock.close()
    raise RuntimeError(f"no free range of {count} UDP ports")


def render_toml(config: ConfigOverrides) -> str:
    """A TOML document of tables holding strings, numbers, booleans and string lists.

    A section given as a sequence of tables becomes an array of tables
    (``[[section]]`` once per table).
    """

    def value(v: TomlValue) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if isinstance(v, list):
            return "[" + ", ".join(value(item) for item in v) + "]"
        return repr(v)

    def table(header: str, keys: TomlTable) -> list[str]:
        return [header, *(f"{key} = {value(v)}" for key, v in keys.items()), ""]

    lines: list[str] = []
    for section, keys in config.items():
        if isinstance(keys, Mapping):
            lines += table(f"[{section}]", keys)
        else:
            for entry in keys:
                lines += table(f"[[{section}]]", entry)
    return "\n".join(lines)


def parse_logfmt(line: str) -> dict[str, str]:
    """``k=v k2="quoted \\" value"`` → dict; quotes and backslash escapes removed."""
    fields = {}
    for key, raw in _LOGFMT_PAIR.findall(line):
        if raw.startswith('"') and raw.endswith('"') and len(raw) >= 2:
            raw = re.sub(r"\\(.)", r"\1", raw[1:-1])
        fields[key] = raw
    return fields


def status_code(response: bytes) -> int:
    """The status code of a SIP response's status line; -1 when it is not one."""
    match = re.match(rb"SIP/2\.0 ([1-6][0-9][0-9]) ", response)
    return int(match.group(1)) if match else -1


def options_request(target_port: int, source_port: int, call_id: str) -> bytes:
    """A minimal OPTIONS request (RFC 3261 §11) from 127.0.0.1:``source_port``."""
    return (
        f"OPTIONS sip:echo@127.0.0.1:{target_port} SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP 127.0.0.1:{source_port};branch=z9hG4bK-{call_id};rport\r\n"
        "Max-Forwards: 70\r\n"
        f"From: <sip:probe@127.0.0.1:{source_port}>;tag=probe-{call_id}\r\n"
        f"To: <sip:echo@127.0.0.1:{target_port}>\r\n"
        f"Call-ID: {call_id}\r\n"
        "CSeq: 1 OPTIONS\r\n"
        "Accept: application/sdp\r\n"
        "Content-Length: 0\r\n\r\n"
    ).encode()


def invite_request(target_port: int, source_port: int, call_id: str, media_port: int) -> bytes:
    """A minimal INVITE with a PCMU offer (RFC 3264) from 127.0.0.1:``source_port``."""
    sdp = (
        "v=0\r\no=probe 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
        f"m=audio {media_port} RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n"
    )
    return (
        f"INVITE sip:echo@127.0.0.1:{target_port} SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP 127.0.0.1:{source_port};branch=z9hG4bK-{call_id};rport\r\n"
        "Max-Forwards: 70\r\n"
        f"From: <sip:probe@127.0.0.1:{source_port}>;tag=probe-{call_id}\r\n"
        f"To: <sip:echo@127.0.0.1:{target_port}>\r\n"
        f"Call-ID: {call_id}\r\n"
        "CSeq: 1 INVITE\r\n"
        f"Contact: <sip:probe@127.0.0.1:{source_port}>\r\n"
        "Content-Type: application/sdp\r\n"
        f"Content-Length: {len(sdp)}\r\n\r\n{sdp}"
    ).encode()


def daemon_command() -> list[str]:
    """The console script next to this interpreter, else ``python -m voxgate.supervisor``."""
    script = Path(sys.executable).parent / "voxgated"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "voxgate.supervisor"]


def user_python(user: str, *, login_groups: bool = True) -> list[str]:
    """argv prefix running Python as ``user`` (setpriv) with the supplementary groups a
    login gives it, or none, under :data:`SYSTEM_PYTHON`: this interpreter may sit where
    other users cannot reach (a venv under /root). Run it with ``PYTHONPATH=``
    :func:`user_pythonpath`."""
    pw = pwd.getpwnam(user)
    return ["setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}",
            "--init-groups" if login_groups else "--clear-groups", SYSTEM_PYTHON]


def user_pythonpath() -> str:
    """voxgate and this interpreter's packages, for :func:`user_python` (the same Python
    minor version, so compiled extensions load)."""
    paths = dict.fromkeys((str(REPO_ROOT / "daemon"), sysconfig.get_paths()["purelib"],
                           sysconfig.get_paths()["platlib"]))
    return os.pathsep.join(paths)


def _env(extra: Mapping[str, str]) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO_ROOT / "daemon"), env.get("PYTHONPATH", "")) if p
    )
    env.pop("NOTIFY_SOCKET", None)
    env.update(extra)
    return env


class _Notifications:
    """A bound ``NOTIFY_SOCKET``; a thread collects every datagram's lines."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(str(path))
        self._sock.settimeout(_POLL_S * 4)
        self._lines: list[str] = []
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._collect, daemon=True)
        self._thread.start()

    def _collect(self) -> None:
        while not self._closed:
            try:
                data = self._sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            with self._cond:
                self._lines += data.decode(errors="replace").splitlines()
                self._cond.notify_all()

    def wait_for(self, line: str, timeout_s: float, proc: subprocess.Popen[bytes]) -> bool:
        """Wait until ``line`` arrived; False on timeout or when ``proc`` exited first."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while line not in self._lines:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or proc.poll() is not None:
                    return False
                self._cond.wait(min(remaining, _POLL_S * 4))
        return True

    @property
    def lines(self) -> list[str]:
        with self._cond:
            return list(self._lines)

    def close(self) -> None:
        self._closed = True
        self._thread.join(timeout=5)
        self._sock.close()


def default_config(
    sip_port: int, rtp: PortRange, control_socket: Path, records_path: Path
) -> dict[str, dict[str, TomlValue]]:
    """The test configuration before overrides: loopback, short timers off, echo agent,
    call records in the test's directory."""
    return {
        "sip": {"listen": f"127.0.0.1:{sip_port}", "answer_delay_ms": 0},
        "rtp": {
            "address": "127.0.0.1",
            "port_min": rtp.first,
            "port_max": rtp.last,
            "codecs": ["PCMU", "PCMA"],
            "jitter_buffer_ms": 20,
            "jitter_buffer_max_ms": 200,
        },
        "limits": {"max_sessions": 100, "drain_timeout_s": 30},
        "timers": {"max_duration_s": 3600, "media_inactivity_s": 30},
        "agent": {"kind": "echo"},
        "control": {"socket": str(control_socket)},
        "log": {"level": "info"},
        "records": {"path": str(records_path)},
    }


class Daemon:
    """A running ``voxgated``. Logs are read from its stderr file."""

    def __init__(
        self,
        proc: subprocess.Popen[bytes],
        sip_port: int,
        rtp: PortRange,
        config_path: Path,
        log_path: Path,
        notifications: _Notifications,
    ) -> None:
        self.proc = proc
        self.sip_port = sip_port
        self.rtp = rtp
        self.config_path = config_path
        self.log_path = log_path
        self._notifications = notifications

    @property
    def control_socket(self) -> str:
        """The ``[control] socket`` path this daemon was configured with."""
        with self.config_path.open("rb") as f:
            path: str = tomllib.load(f)["control"]["socket"]
        return path

    @property
    def notifications(self) -> list[str]:
        """Every line received on NOTIFY_SOCKET so far, in order."""
        return self._notifications.lines

    def wait_notify(self, line: str, timeout_s: float = 10.0) -> bool:
        """Wait until ``line`` (exact, e.g. ``STOPPING=1``) arrived on NOTIFY_SOCKET."""
        return self._notifications.wait_for(line, timeout_s, self.proc)

    @property
    def pid(self) -> int:
        """Process id."""
        return self.proc.pid

    @property
    def sip_address(self) -> tuple[str, int]:
        """Where the SIP listener is: ``("127.0.0.1", port)``."""
        return ("127.0.0.1", self.sip_port)

    def alive(self) -> bool:
        """Still running."""
        return self.proc.poll() is None

    def log_text(self) -> str:
        """Everything the daemon wrote to stderr so far."""
        return self.log_path.read_text(errors="replace")

    def events(self, event: str) -> list[dict[str, str]]:
        """Parsed logfmt lines whose ``event`` field equals ``event``."""
        found = []
        for line in self.log_text().splitlines():
            fields = parse_logfmt(line)
            if fields.get("event") == event:
                found.append(fields)
        return found

    def wait_log(self, pattern: str, timeout_s: float = 10.0, count: int = 1) -> re.Match[str]:
        """Wait until ``pattern`` (a regex, searched per line) matched ``count`` lines.

        Returns the last match. Raises AssertionError with the log's tail on timeout.
        """
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout_s
        while True:
            matches = [m for m in map(regex.search, self.log_text().splitlines()) if m]
            if len(matches) >= count:
                return matches[count - 1]
            if time.monotonic() >= deadline:
                tail = "\n".join(self.log_text().splitlines()[-30:])
                raise AssertionError(
                    f"{len(matches)}/{count} log lines matched {pattern!r} "
                    f"in {timeout_s} s; log tail:\n{tail}"
                )
            time.sleep(_POLL_S)

    def terminate(self, timeout_s: float = TERMINATE_TIMEOUT_S) -> int:
        """SIGTERM (once), then :meth:`wait_exit`; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.wait_exit(timeout_s)

    def wait_exit(self, timeout_s: float = TERMINATE_TIMEOUT_S) -> int:
        """Wait for the process to exit; after ``timeout_s`` kill it and re-raise.

        Raises:
            subprocess.TimeoutExpired: it did not exit in time.
        """
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=_KILL_TIMEOUT_S)
            raise

    def exchange(
        self,
        message: bytes,
        *,
        source_port: int = 0,
        timeout_s: float = 2.0,
        until_final: bool = False,
    ) -> list[bytes]:
        """Send one UDP datagram to the SIP port from 127.0.0.1:``source_port``.

        Returns the datagrams received back within ``timeout_s``: the first
        one only, or with ``until_final`` every one up to the first final
        (status >= 200) response. An empty list means no answer.
        """
        received: list[bytes] = []
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind(("127.0.0.1", source_port))
            s.sendto(message, self.sip_address)
            deadline = time.monotonic() + timeout_s
            while (remaining := deadline - time.monotonic()) > 0:
                s.settimeout(remaining)
                try:
                    data = s.recv(65536)
                except TimeoutError:
                    break
                received.append(data)
                if not until_final or status_code(data) >= 200:
                    break
        return received

    def fd_count(self) -> int:
        """Open file descriptors (entries of ``/proc/PID/fd``)."""
        return len(os.listdir(f"/proc/{self.pid}/fd"))


@contextlib.contextmanager
def running_daemon(
    workdir: Path,
    overrides: ConfigOverrides | None = None,
    *,
    rtp_ports: int = 100,
    cpu: int | None = None,
    ready_timeout_s: float = READY_TIMEOUT_S,
    env: Mapping[str, str] | None = None,
    user: str | None = None,
) -> Iterator[Daemon]:
    """Start ``voxgated`` with a per-test config in ``workdir`` and wait for READY=1.

    ``overrides`` maps section → key → value and is applied over
    :func:`default_config`. ``cpu`` pins the daemon with ``taskset -c``.
    ``user`` runs it as that user (:func:`user_python`), who is given ``workdir``
    (its parents must let the user through) and the notify socket.

    Raises:
        RuntimeError: the daemon exited or sent no READY=1 within ``ready_timeout_s``.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    rtp = reserve_port_range(rtp_ports)
    sock_dir = Path(tempfile.mkdtemp(prefix="vg-notify-"))  # short: AF_UNIX paths are ≤ 107 B
    notifications = _Notifications(sock_dir / "notify.sock")
    proc: subprocess.Popen[bytes] | None = None
    try:
        sip_port = free_udp_port()
        config: dict[str, TomlTable | Sequence[TomlTable]] = dict(
            default_config(sip_port, rtp, sock_dir / "control.sock", workdir / "calls.sqlite3")
        )
        for section, keys in (overrides or {}).items():
            base = config.get(section)
            if isinstance(base, Mapping) and isinstance(keys, Mapping):
                config[section] = {**base, **keys}
            else:
                config[section] = keys
        config_path = workdir / "voxgate.toml"
        config_path.write_text(render_toml(config))
        log_path = workdir / "voxgated.log"
        argv = [*daemon_command(), "--config", str(config_path)]
        extra_env = {"NOTIFY_SOCKET": str(notifications.path)}
        if user is not None:
            argv = [*user_python(user), "-m", "voxgate.supervisor", "--config", str(config_path)]
            extra_env["PYTHONPATH"] = user_pythonpath()
            pw = pwd.getpwnam(user)
            for path in (workdir, sock_dir, notifications.path):
                os.chown(path, pw.pw_uid, pw.pw_gid)
        if cpu is not None:
            argv = ["taskset", "-c", str(cpu), *argv]
        with log_path.open("wb") as log, (workdir / "voxgated.stdout").open("wb") as out:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=log,
                env=_env({**extra_env, **(env or {})}),
                cwd=workdir,
            )
        daemon = Daemon(proc, sip_port, rtp, config_path, log_path, notifications)
        if not notifications.wait_for("READY=1", ready_timeout_s, proc):
            tail = "\n".join(daemon.log_text().splitlines()[-30:])
            raise RuntimeError(
                f"voxgated not ready in {ready_timeout_s} s (exit={proc.poll()}); log:\n{tail}"
            )
        yield daemon
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(timeout=_KILL_TIMEOUT_S)
        notifications.close()
        shutil.rmtree(sock_dir, ignore_errors=True)
        rtp.release()
