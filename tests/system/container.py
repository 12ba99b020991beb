"""A Debian 12 system booted with systemd-nspawn, driven with nsenter.

:func:`cached_rootfs` debootstraps Debian 12 (minbase plus systemd, dbus and
the packages the .deb depends on) once per package list into
``/var/cache/voxgate-test-system/<key>`` (``$VOXGATE_SYSTEM_CACHE``); the key
is a hash of the suite and the package list, so a change of the package's
``Depends``/``Recommends`` builds a new tree. :class:`Container` boots an
overlay of that tree (the cache stays clean) with

    systemd-nspawn --boot --register=no --keep-unit --console=pipe --private-network

(the flags that work on a host whose PID 1 is not systemd: no machined, no
scope unit), finds the container's PID 1 and runs commands in it with
``nsenter -t PID -a``. The container has its own network namespace (loopback
only), so its port 5060 collides with nothing on the host; everything apt
needs is in the cached tree. On the way out the container is powered off
(``systemctl poweroff``, then SIGKILL to its PID 1 and to nspawn, by PID) and
the overlay is unmounted and removed, whatever happened.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType

SUITE = "bookworm"
VARIANT = "minbase"
BASE_PACKAGES = ("systemd", "systemd-sysv", "dbus", "adduser")
"""What the test needs in the container besides the package's own dependencies."""
CACHE_FORMAT = 1
"""Bumped when the way the tree is made changes, so old trees are not reused."""
DEFAULT_CACHE_DIR = Path("/var/cache/voxgate-test-system")
DEFAULT_MIRROR = "http://deb.debian.org/debian"
DEBOOTSTRAP_TIMEOUT_S = 1200.0
BOOT_TIMEOUT_S = 90.0
POWEROFF_TIMEOUT_S = 30.0
COMMAND_TIMEOUT_S = 120.0
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_APT_SOURCES = (Path("/etc/apt/sources.list"), Path("/etc/apt/sources.list.d"))


class ContainerError(Exception):
    """The tree could not be built or the container did not boot or answer."""


def cache_dir() -> Path:
    """Where debootstrapped trees are kept: ``$VOXGATE_SYSTEM_CACHE`` or the default."""
    return Path(os.environ.get("VOXGATE_SYSTEM_CACHE") or DEFAULT_CACHE_DIR)


def dependency_names(field: str) -> list[str]:
    """Package names of a Depends/Recommends field: the first of each alternative.

    ``"python3 (>= 3.11), systemd | adduser"`` → ``["python3", "systemd"]``.
    """
    names = []
    for relation in field.split(","):
        first = relation.split("|")[0].strip()
        name = re.split(r"[\s(:\[]", first, maxsplit=1)[0]
        if name:
            names.append(name)
    return names


def deb_dependencies(deb: Path) -> list[str]:
    """The packages ``deb`` depends on or recommends (what ``apt install`` would fetch)."""
    fields = subprocess.run(
        ["dpkg-deb", "-f", str(deb), "Depends", "Recommends", "Pre-Depends"],
        capture_output=True, text=True, check=True, timeout=COMMAND_TIMEOUT_S,
    ).stdout
    names: list[str] = []
    for line in fields.splitlines():
        _, _, value = line.partition(":")
        names.extend(dependency_names(value))
    return names


def host_mirror(sources: Iterable[Path] = _APT_SOURCES) -> str:
    """The Debian mirror this host's apt uses for the suite, else deb.debian.org.

    ``$VOXGATE_SYSTEM_MIRROR`` overrides. Reads one-line (``deb URI SUITE …``)
    and deb822 (``URIs:`` / ``Suites:``) source files.
    """
    if mirror := os.environ.get("VOXGATE_SYSTEM_MIRROR"):
        return mirror
    files: list[Path] = []
    for source in sources:
        if source.is_dir():
            files.extend(sorted(source.glob("*.list")) + sorted(source.glob("*.sources")))
        elif source.is_file():
            files.append(source)
    for path in files:
        text = path.read_text(errors="replace")
        if path.suffix == ".sources":
            for stanza in re.split(r"\n\s*\n", text):
                fields = dict(re.findall(r"^([\w-]+):[ \t]*(.*)$", stanza, re.MULTILINE))
                if "deb" in fields.get("Types", "").split() and \
                        SUITE in fields.get("Suites", "").split() and fields.get("URIs"):
                    uri: str = fields["URIs"].split()[0]
                    return uri
        for match in re.finditer(r"^deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+(\S+)", text, re.MULTILINE):
            if match.group(2) == SUITE:
                return match.group(1)
    return DEFAULT_MIRROR


def cache_key(packages: Iterable[str]) -> str:
    """The cached tree's name: a hash of the suite, variant and package list."""
    spec = {"format": CACHE_FORMAT, "suite": SUITE, "variant": VARIANT,
            "packages": sorted(set(packages))}
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()
    return f"{SUITE}-{digest[:16]}"


def cached_rootfs(packages: Iterable[str], log: Path) -> Path:
    """A Debian tree holding ``BASE_PACKAGES`` and ``packages``; built once, then reused.

    The tree is debootstrapped beside its final name and renamed into place
    only once complete, so an interrupted build is never taken for a cached
    one. debootstrap's output goes to ``log``.
    """
    wanted = sorted(set(BASE_PACKAGES) | set(packages))
    root = cache_dir() / cache_key(wanted)
    if root.is_dir():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    building = root.with_name(f"{root.name}.building-{os.getpid()}")
    argv = ["debootstrap", f"--variant={VARIANT}", f"--include={','.join(wanted)}",
            SUITE, str(building), host_mirror()]
    try:
        with log.open("w") as out:
            done = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=out,
                                  stderr=subprocess.STDOUT, timeout=DEBOOTSTRAP_TIMEOUT_S,
                                  check=False)
        if done.returncode != 0:
            tail = log.read_text(errors="replace")[-3000:]
            raise ContainerError(f"{' '.join(argv)} exited {done.returncode}:\n{tail}")
        try:
            building.rename(root)
        except OSError:
            if not root.is_dir():  # else another run built the same tree meanwhile
                raise
    finally:
        shutil.rmtree(building, ignore_errors=True)
    return root


def _process_table() -> dict[int, tuple[int, list[str]]]:
    """pid → (parent pid, NSpid entries) for every process on the host."""
    table = {}
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            lines = status.read_text().splitlines()
        except OSError:  # the process ended meanwhile
            continue
        fields = {}
        for line in lines:
            key, sep, value = line.partition(":\t")
            if sep:
                fields[key] = value
        table[int(status.parent.name)] = (int(fields.get("PPid", "0")),
                                          fields.get("NSpid", "").split())
    return table


def find_container_init(nspawn_pid: int) -> int | None:
    """The host PID of the container's PID 1: a descendant of nspawn that is 1 inside."""
    table = _process_table()
    parents = {nspawn_pid}
    while parents:
        children = {pid for pid, (ppid, _) in table.items() if ppid in parents}
        for pid in children:
            nspid = table[pid][1]
            if len(nspid) >= 2 and nspid[-1] == "1":
                return pid
        parents = children
    return None


class Container:
    """Debian booted from an overlay of ``lower`` in ``workdir``, driven with nsenter.

    Use as a context manager: entering boots it and waits until systemd has
    finished starting up; leaving powers it off and removes the overlay.
    """

    def __init__(self, lower: Path, workdir: Path, name: str) -> None:
        self.lower = lower
        self.workdir = workdir
        self.name = name
        self.root = workdir / "merged"
        self.log_path = workdir / "nspawn.log"
        self._nspawn: subprocess.Popen[bytes] | None = None
        self._mounted = False
        self.pid: int | None = None

    # -- lifecycle -------------------------------------------------------------

    def boot(self) -> None:
        """Mount the overlay, start nspawn and wait for ``is-system-running``."""
        upper, work = self.workdir / "upper", self.workdir / "work"
        for d in (upper, work, self.root):
            d.mkdir(parents=True)
        subprocess.run(
            ["mount", "-t", "overlay", "overlay", "-o",
             f"lowerdir={self.lower},upperdir={upper},workdir={work}", str(self.root)],
            check=True, capture_output=True, timeout=COMMAND_TIMEOUT_S,
        )
        self._mounted = True
        with self.log_path.open("wb") as log:
            self._nspawn = subprocess.Popen(
                ["systemd-nspawn", "--boot", "--register=no", "--keep-unit",
                 "--console=pipe", "--private-network", f"--machine={self.name}",
                 "-D", str(self.root)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + BOOT_TIMEOUT_S
        while self.pid is None:
            if self._nspawn.poll() is not None:
                raise ContainerError(f"systemd-nspawn exited {self._nspawn.returncode}:\n"
                                     f"{self.boot_log()}")
            if time.monotonic() > deadline:
                raise ContainerError(f"no container PID 1 after {BOOT_TIMEOUT_S:g} s")
            self.pid = find_container_init(self._nspawn.pid)
            time.sleep(0.1)
        state = ""
        while time.monotonic() < deadline:
            # Fails ("Failed to connect to bus") until systemd has its private socket.
            done = self.run("systemctl", "is-system-running", "--wait",
                            timeout=max(1.0, deadline - time.monotonic()))
            state = done.stdout.strip()
            if state in ("running", "degraded"):
                return
            time.sleep(0.2)
        raise ContainerError(f"system state {state!r} after {BOOT_TIMEOUT_S:g} s:\n"
                             f"{self.run('systemctl', '--failed', '--no-pager').stdout}")

    def shutdown(self) -> None:
        """Power off (SIGKILL by PID if that hangs), unmount and remove the overlay."""
        nspawn, self._nspawn = self._nspawn, None
        if nspawn is not None:
            if self.pid is not None and nspawn.poll() is None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.run("systemctl", "poweroff", "--no-block", timeout=10)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    nspawn.wait(POWEROFF_TIMEOUT_S)
            if nspawn.poll() is None:
                # Killing the namespace's PID 1 ends every process in it.
                if self.pid is not None:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(self.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    nspawn.wait(10)
                if nspawn.poll() is None:
                    nspawn.kill()
                nspawn.wait(10)
        self.pid = None
        if self._mounted:
            done = subprocess.run(["umount", str(self.root)], capture_output=True,
                                  timeout=COMMAND_TIMEOUT_S, check=False)
            if done.returncode != 0:  # still busy: detach it so the files can go
                subprocess.run(["umount", "--lazy", str(self.root)], capture_output=True,
                               timeout=COMMAND_TIMEOUT_S, check=False)
            self._mounted = False
        for d in ("upper", "work", "merged"):
            shutil.rmtree(self.workdir / d, ignore_errors=True)

    def __enter__(self) -> Container:
        try:
            self.boot()
        except BaseException:
            self.shutdown()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.shutdown()

    # -- driving it ------------------------------------------------------------

    def nsenter(self, *namespaces: str) -> list[str]:
        """The argv prefix that runs a host program in the container's ``namespaces``.

        No names means all of them (``-a``); ``"-n"`` alone runs a host tool
        (SIPp) on the container's network.
        """
        assert self.pid is not None, "boot() first"
        return ["nsenter", "-t", str(self.pid), *(namespaces or ("-a",))]

    def run(
        self,
        *argv: str,
        input: str | None = None,
        timeout: float = COMMAND_TIMEOUT_S,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` in the container as root with a clean environment; never raises
        on a non-zero exit (the caller asserts), raises TimeoutExpired when too slow."""
        env = ["env", "-i", f"PATH={PATH}", "LANG=C.UTF-8", "HOME=/root", "TERM=dumb",
               "DEBIAN_FRONTEND=noninteractive"]
        done = subprocess.run(
            [*self.nsenter(), *env, *argv], input=input, capture_output=True, text=True,
            timeout=timeout, check=False,
            stdin=subprocess.DEVNULL if input is None else None,
        )
        done.args = list(argv)  # what assertion messages show
        return done

    def shell(self, script: str, *args: str,
              timeout: float = COMMAND_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
        """``sh -c script sh args…`` in the container: for ``cd``, globs, redirections."""
        return self.run("sh", "-c", script, "sh", *args, timeout=timeout)

    def write_file(self, path: str, text: str) -> None:
        """Overwrite ``path`` in place (its owner and mode stay), as an editor would."""
        done = self.run("sh", "-c", 'cat > "$1"', "sh", path, input=text)
        if done.returncode != 0:
            raise ContainerError(f"writing {path}: {done.stderr}")

    def copy_in(self, source: Path, directory: str) -> str:
        """Copy a host file into ``directory`` of the container; its path there."""
        target = self.root / directory.lstrip("/") / source.name
        shutil.copyfile(source, target)
        return f"{directory.rstrip('/')}/{source.name}"

    def journal(self, *args: str, lines: int = 400) -> str:
        """The last ``lines`` of the container's journal (``args`` filter it)."""
        if self.pid is None:
            return "(the container is not running)"
        try:
            done = self.run("journalctl", "--no-pager", "-o", "short-precise",
                            "-n", str(lines), *args, timeout=30)
        except subprocess.TimeoutExpired as e:
            return f"(no journal: {e})"
        return done.stdout + done.stderr

    def journal_records(self, *matches: str) -> list[dict[str, str]]:
        """The journal entries matching ``matches`` (``FIELD=value``, options), as dicts."""
        done = self.run("journalctl", "--no-pager", "-o", "json", *matches, timeout=30)
        return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]

    def journal_cursor(self) -> str:
        """The journal's current end, for ``--after-cursor=``."""
        done = self.run("journalctl", "--no-pager", "-q", "-n", "0", "--show-cursor",
                        timeout=30)
        _, found, cursor = done.stdout.partition("-- cursor: ")
        if not found:
            raise ContainerError(f"no journal cursor: {done.stdout}{done.stderr}")
        return cursor.strip()

    def boot_log(self) -> str:
        """nspawn's own output and the container's console."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def describe(done: subprocess.CompletedProcess[str]) -> str:
    """A command's outcome for an assertion message: argv, exit code, output."""
    argv = done.args if isinstance(done.args, list) else [done.args]
    return (f"$ {' '.join(map(str, argv))}\nexit {done.returncode}\n"
            f"{done.stdout[-3000:]}{done.stderr[-3000:]}")
