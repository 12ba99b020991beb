"""Run Kamailio for a test: the packaged dispatcher example, or a registrar.

:func:`running_kamailio` starts ``kamailio`` (Debian's package) in the
foreground (``-DD -E``) with ``packaging/kamailio/kamailio-dispatcher.cfg``
as shipped; only its defines are overridden with ``-A``: the listen address
(127.0.0.1, a free port), the dispatcher list (written in the test's
directory), the ``ctl`` socket that ``kamcmd`` talks to and the OPTIONS probe
interval. Its stderr goes to ``kamailio.log``. It is ready once ``kamcmd``
answers, and is stopped by its PID on the way out whatever happened.

:func:`running_registrar` starts it the same way with
``kamailio-registrar.cfg`` beside this file: REGISTER checked by ``auth_db``
against a db_text ``subscriber`` table written in the test's directory
(plaintext passwords), bindings in memory, INVITEs routed to them.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from tests.harness.daemon import REPO_ROOT, free_udp_port

CONFIG = REPO_ROOT / "packaging" / "kamailio" / "kamailio-dispatcher.cfg"
REGISTRAR_CONFIG = Path(__file__).resolve().parent / "kamailio-registrar.cfg"
SUBSCRIBER_TABLE_VERSION = 7  # Kamailio 5.x's subscriber schema
DISPATCHER_SET = 1
READY_TIMEOUT_S = 15.0
_STOP_TIMEOUT_S = 10.0
_KAMCMD_TIMEOUT_S = 10.0
_POLL_S = 0.1
_DESTINATION = re.compile(r"URI: (\S+)\s+FLAGS: (\S+)")


def dispatcher_uri(address: tuple[str, int]) -> str:
    """The dispatcher list's URI for a voxgate SIP listener: ``sip:HOST:PORT``."""
    return f"sip:{address[0]}:{address[1]}"


def write_dispatcher_list(path: Path, uris: Sequence[str]) -> None:
    """One active destination of set :data:`DISPATCHER_SET` per URI (flags 0, priority 0)."""
    path.write_text("".join(f"{DISPATCHER_SET} {uri} 0 0\n" for uri in uris))


class Kamailio:
    """A running Kamailio: its SIP address, ``kamcmd`` on its ctl socket, its log."""

    def __init__(
        self, proc: subprocess.Popen[bytes], port: int, ctl_socket: Path,
        list_path: Path | None, log_path: Path,
    ) -> None:
        self.proc = proc
        self.port = port
        self.ctl_socket = ctl_socket
        self.list_path = list_path
        self.log_path = log_path

    @property
    def address(self) -> tuple[str, int]:
        """Where callers send INVITEs: ``("127.0.0.1", port)``."""
        return ("127.0.0.1", self.port)

    def kamcmd(self, *args: str) -> subprocess.CompletedProcess[str]:
        """``kamcmd -s unix:CTL_SOCKET ARGS`` to completion; output captured as text."""
        return subprocess.run(
            ["kamcmd", "-s", f"unix:{self.ctl_socket}", *args],
            capture_output=True, text=True, timeout=_KAMCMD_TIMEOUT_S, check=False,
        )

    def destinations(self) -> dict[str, str]:
        """``kamcmd dispatcher.list`` as URI → FLAGS: the first letter is the state
        (``A`` active, ``I`` inactive, ``T`` trying, ``D`` disabled), then ``P``
        when the destination is marked for probing, else ``X``.

        Raises:
            AssertionError: kamcmd failed.
        """
        done = self.kamcmd("dispatcher.list")
        assert done.returncode == 0, f"kamcmd dispatcher.list: {done.stdout}{done.stderr}"
        return dict(_DESTINATION.findall(done.stdout))

    def reload(self, uris: Sequence[str]) -> str:
        """Rewrite the dispatcher list with ``uris`` and ``kamcmd dispatcher.reload``;
        returns kamcmd's answer.

        Raises:
            AssertionError: kamcmd failed.
        """
        assert self.list_path is not None, "not the dispatcher config"
        write_dispatcher_list(self.list_path, uris)
        done = self.kamcmd("dispatcher.reload")
        assert done.returncode == 0, f"kamcmd dispatcher.reload: {done.stdout}{done.stderr}"
        return done.stdout

    def wait_state(self, uri: str, state: str, timeout_s: float) -> dict[str, str]:
        """Wait until ``uri``'s FLAGS start with ``state`` (``A``, ``I``, ``T``).

        Returns every destination's flags then. Raises AssertionError on timeout.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            flags = self.destinations()
            if flags.get(uri, "").startswith(state):
                return flags
            if time.monotonic() >= deadline:
                raise AssertionError(f"{uri} not in state {state} after {timeout_s} s: {flags}")
            time.sleep(_POLL_S)

    def contacts(self) -> list[str]:
        """The registered contacts (``kamcmd ul.dump``'s ``Address`` lines).

        Raises:
            AssertionError: kamcmd failed.
        """
        done = self.kamcmd("ul.dump")
        assert done.returncode == 0, f"kamcmd ul.dump: {done.stdout}{done.stderr}"
        return re.findall(r"Address: (\S+)", done.stdout)

    def log_text(self) -> str:
        """Everything Kamailio wrote to stderr so far."""
        return self.log_path.read_text(errors="replace")

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while self.kamcmd("core.version").returncode != 0:
            if self.proc.poll() is not None or time.monotonic() >= deadline:
                tail = "\n".join(self.log_text().splitlines()[-30:])
                raise RuntimeError(
                    f"kamailio not ready in {timeout_s} s (exit={self.proc.poll()}); log:\n{tail}"
                )
            time.sleep(_POLL_S)

    def stop(self) -> None:
        """SIGTERM to the main process (it ends its children), SIGKILL to its process
        group if it has not exited in time."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=_STOP_TIMEOUT_S)


@contextlib.contextmanager
def running_kamailio(
    workdir: Path, uris: Sequence[str], *, ping_interval_s: int = 1,
) -> Iterator[Kamailio]:
    """Start Kamailio with the example config in front of ``uris`` and wait until
    ``kamcmd`` answers. ``ping_interval_s`` is ``ds_ping_interval``.

    Raises:
        RuntimeError: it exited or did not answer within :data:`READY_TIMEOUT_S`.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    list_path = workdir / "dispatcher.list"
    write_dispatcher_list(list_path, uris)
    defines = [f'DISPATCHER_LIST="{list_path}"', f"PING_INTERVAL_S={ping_interval_s}"]
    with _running(workdir, CONFIG, defines, list_path) as kamailio:
        yield kamailio


@contextlib.contextmanager
def running_registrar(
    workdir: Path, users: Mapping[str, str], domain: str = "127.0.0.1",
    algorithm: str = "MD5",
) -> Iterator[Kamailio]:
    """Start Kamailio as a registrar whose subscribers are ``users`` (username →
    plaintext password) of ``domain`` (also the digest realm; not matched: any
    domain's REGISTER of the username authenticates), challenging with digest
    ``algorithm`` (MD5 or SHA-256), and wait until ``kamcmd`` answers.

    Raises:
        RuntimeError: it exited or did not answer within :data:`READY_TIMEOUT_S`.
    """
    db_dir = workdir / "dbtext"
    db_dir.mkdir(parents=True, exist_ok=True)
    (db_dir / "version").write_text(
        "id(int,auto) table_name(string) table_version(int)\n"
        f"1:subscriber:{SUBSCRIBER_TABLE_VERSION}\n")
    rows = []
    for i, (user, password) in enumerate(users.items(), 1):
        # Checked against the password (calculate_ha1); the HA1 columns may not be empty.
        ha1 = hashlib.md5(f"{user}:{domain}:{password}".encode()).hexdigest()
        ha1b = hashlib.md5(f"{user}@{domain}:{domain}:{password}".encode()).hexdigest()
        rows.append(":".join([str(i), *map(_dbtext, (user, domain, password)), ha1, ha1b]))
    (db_dir / "subscriber").write_text(
        "id(int,auto) username(string) domain(string) password(string) ha1(string) "
        "ha1b(string)\n" + "".join(f"{row}\n" for row in rows))
    defines = [f'DB_URL="text://{db_dir}"', f'AUTH_ALGORITHM="{algorithm}"']
    with _running(workdir, REGISTRAR_CONFIG, defines, None) as kamailio:
        yield kamailio


def _dbtext(value: str) -> str:
    """A db_text field: ``:`` and ``\\`` escaped with a backslash."""
    return re.sub(r"([:\\])", r"\\\1", value)


@contextlib.contextmanager
def _running(
    workdir: Path, config: Path, defines: Sequence[str], list_path: Path | None,
) -> Iterator[Kamailio]:
    """``config`` with ``defines`` (``-A``) plus LISTEN on a free port and CTL_SOCKET."""
    run_dir = Path(tempfile.mkdtemp(prefix="vg-kam-"))  # short: AF_UNIX paths are ≤ 107 B
    port = free_udp_port()
    ctl_socket = run_dir / "kamailio_ctl"
    argv = [
        "kamailio", "-f", str(config), "-DD", "-E", "-Y", str(run_dir),
        "-A", f"LISTEN=udp:127.0.0.1:{port}",
        "-A", f'CTL_SOCKET="unix:{ctl_socket}"',
    ]
    for define in defines:
        argv += ["-A", define]
    log_path = workdir / "kamailio.log"
    kamailio: Kamailio | None = None
    try:
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                cwd=workdir, start_new_session=True,
            )
        kamailio = Kamailio(proc, port, ctl_socket, list_path, log_path)
        kamailio._wait_ready(READY_TIMEOUT_S)
        yield kamailio
    finally:
        if kamailio is not None:
            kamailio.stop()
        shutil.rmtree(run_dir, ignore_errors=True)
