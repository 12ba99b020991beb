"""The control socket and the daemon's group, with real users: ``[control] group = ""``
(the packaged default) lets members of the daemon's own group in.

The test makes throwaway system users (removed at the end) and runs voxgated as
one of them, as the packaged unit runs it as ``voxgate:voxgate``: the socket sits
in a ``0750`` directory of the daemon's user and group, as ``/run/voxgate`` does.
A second user made a member with ``adduser USER GROUP`` (the README's step)
runs ``voxgatectl status``; a third, in no group of the daemon's, cannot.
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import secrets
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.harness import requires
from tests.harness.daemon import running_daemon, user_python, user_pythonpath

CTL_TIMEOUT_S = 30.0
EX_OK, EX_REFUSED, EX_UNAVAILABLE = 0, 1, 69
NOLOGIN = ["--system", "--no-create-home", "--home-dir", "/nonexistent",
           "--shell", "/usr/sbin/nologin"]


@dataclass(frozen=True)
class Users:
    """The daemon's user (and its group, same name), a member of that group, an outsider."""

    daemon: str
    member: str
    outsider: str


def _run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, timeout=60)


@pytest.fixture
def users() -> Iterator[Users]:
    """Three fresh system users; each is deleted (with its group) at teardown."""
    if os.geteuid() != 0:
        pytest.skip("needs root to add users")
    tag = secrets.token_hex(3)
    names = Users(daemon=f"vgd{tag}", member=f"vgm{tag}", outsider=f"vgo{tag}")
    made: list[str] = []
    try:
        _run("groupadd", "--system", names.daemon)
        made.append(names.daemon)
        _run("useradd", *NOLOGIN, "--gid", names.daemon, names.daemon)
        for name in (names.member, names.outsider):
            _run("useradd", *NOLOGIN, "--user-group", name)
            made.append(name)
        _run("adduser", "--quiet", names.member, names.daemon)
        yield names
    finally:
        for name in (names.member, names.outsider, names.daemon):
            with contextlib.suppress(KeyError):
                pwd.getpwnam(name)
                subprocess.run(["userdel", name], check=False, capture_output=True, timeout=60)
        for name in made:
            with contextlib.suppress(KeyError):
                grp.getgrnam(name)
                subprocess.run(["groupdel", name], check=False, capture_output=True, timeout=60)


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory under /tmp every user may enter (pytest's own tmp is root's, 0700)."""
    path = Path(tempfile.mkdtemp(prefix="vg-group-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def voxgatectl_as(user: str, socket_path: str, *args: str,
                  login_groups: bool = True) -> subprocess.CompletedProcess[str]:
    """``voxgatectl --socket socket_path ARGS`` run as ``user``."""
    env = {k: v for k, v in os.environ.items() if k != "VOXGATE_CONTROL_SOCKET"}
    env["PYTHONPATH"] = user_pythonpath()
    return subprocess.run(
        [*user_python(user, login_groups=login_groups), "-m", "voxgate.control.cli",
         "--socket", socket_path, *args],
        capture_output=True, text=True, timeout=CTL_TIMEOUT_S, env=env, cwd="/", check=False,
    )


@requires("setpriv", "useradd", "adduser")
def test_members_of_the_daemons_group_may_use_the_socket(users: Users,
                                                         shared_dir: Path) -> None:
    daemon_user = pwd.getpwnam(users.daemon)
    run_dir = shared_dir / "run"  # as /run/voxgate: voxgate:voxgate 0750
    run_dir.mkdir()
    os.chown(run_dir, daemon_user.pw_uid, daemon_user.pw_gid)
    run_dir.chmod(0o750)
    path = str(run_dir / "control.sock")
    overrides = {"control": {"socket": path, "group": ""}}
    with running_daemon(shared_dir / "daemon", overrides, rtp_ports=10,
                        user=users.daemon) as daemon:
        assert os.stat(f"/proc/{daemon.pid}").st_uid == daemon_user.pw_uid
        st = os.stat(path)
        assert (st.st_uid, st.st_gid) == (daemon_user.pw_uid, daemon_user.pw_gid), st
        assert stat.S_IMODE(st.st_mode) == 0o660, oct(st.st_mode)

        # A supplementary member, logged in after `adduser`: served.
        member = voxgatectl_as(users.member, path, "status")
        assert member.returncode == EX_OK, member.stderr
        assert member.stdout.startswith("state:     running"), member.stdout
        assert voxgatectl_as(users.member, path, "drain").returncode == EX_OK
        assert "draining" in voxgatectl_as(users.member, path, "status", "--json").stdout

        # An outsider cannot even reach the socket through the 0750 directory.
        outsider = voxgatectl_as(users.outsider, path, "status")
        assert outsider.returncode == EX_UNAVAILABLE, outsider
        assert "Permission denied" in outsider.stderr, outsider.stderr

        # With the filesystem opened up, the daemon's own check decides: the outsider is
        # refused, and the member is still known from the group database alone (no
        # supplementary groups in the process: as when ProtectProc= hides its /proc).
        run_dir.chmod(0o755)
        os.chmod(path, 0o666)
        outsider = voxgatectl_as(users.outsider, path, "status")
        assert outsider.returncode == EX_REFUSED, outsider
        assert "(forbidden)" in outsider.stderr, outsider.stderr
        uid = pwd.getpwnam(users.outsider).pw_uid
        assert f"uid={uid}" in daemon.wait_log(r"event=control_forbidden\b").string
        member = voxgatectl_as(users.member, path, "resume", login_groups=False)
        assert member.returncode == EX_OK, member.stderr
        assert len(daemon.events("control_forbidden")) == 1
