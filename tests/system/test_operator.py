"""The operator's first hour, on a real Debian 12 booted with systemd.

Each test is one step of the README's "Running voxgate as a service", run in
the container in this order (pytest keeps the file's order; a step relies on
the ones before it): install the .deb with apt, ``systemctl enable --now``,
a SIP call (SIPp on the container's network), ``voxgatectl status`` as a
member of the ``voxgate`` group, ``systemctl reload`` with a good and with an
invalid file, ``systemctl stop`` while a call is up (it drains: the call gets
BYE), the sandbox's ``systemd-analyze security`` score, ``apt purge``.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.harness.audio import SpeechClip
from tests.harness.sipp import Sipp
from tests.system.container import Container, describe

pytestmark = pytest.mark.skipif(
    os.environ.get("VOXGATE_TEST_SYSTEM") != "1",
    reason="the system test runs with `make test-system` (VOXGATE_TEST_SYSTEM=1)",
)

CONFIG = "/etc/voxgate/voxgate.toml"
SIP_TARGET = ("127.0.0.1", 5060)  # the packaged [sip] listen
SIPP_PORT = 5070
SIPP_MEDIA_PORT = 16000
MAX_SECURITY_EXPOSURE = 2.0
OPERATOR_LIMITS = {"drain_timeout_s": 5}
"""Set in the packaged file before the first start: a short drain keeps the stop step short."""
RELOADED_LIMITS = {"max_sessions": 7}
"""The good file for the reload step: the running one with these [limits]."""
WAIT_S = 30.0
APT_TIMEOUT_S = 300.0
STOP_TIMEOUT_S = 150.0


def sipp(system: Container, scenario: str, workdir: Path, clip: SpeechClip,
         **options: Any) -> Sipp:
    """SIPp (the host's) calling the daemon on the container's network namespace."""
    call = Sipp(scenario, SIP_TARGET, workdir=workdir, local_port=SIPP_PORT,
                media_port=SIPP_MEDIA_PORT, clip=clip, **options)
    call.argv = [*system.nsenter("-n"), *call.argv]
    return call


def status(system: Container) -> dict[str, Any]:
    """``voxgatectl --json status`` as root."""
    done = system.run("voxgatectl", "--json", "status")
    assert done.returncode == 0, describe(done)
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def unit_properties(system: Container, *names: str) -> dict[str, str]:
    """``systemctl show voxgate.service -p NAME…`` as a dict."""
    done = system.run("systemctl", "show", "voxgate.service", *(f"-p{n}" for n in names))
    return dict(line.split("=", 1) for line in done.stdout.splitlines() if "=" in line)


def wait_until(condition: Callable[[], bool], what: str, timeout_s: float = WAIT_S) -> None:
    """Poll ``condition`` until true; fail naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"not within {timeout_s:g} s: {what}")
        time.sleep(0.2)


def with_limits(config: str, limits: dict[str, Any]) -> str:
    """``config`` with each of ``limits`` set (each key must be there once)."""
    for key, value in limits.items():
        config, count = re.subn(rf"(?m)^{key} = .*$", f"{key} = {value}", config)
        assert count == 1, f"{key} appears {count} times in {CONFIG}"
    return config


def test_apt_install(system: Container) -> None:
    done = system.shell("cd /root && apt install -y ./voxgate_*.deb", timeout=APT_TIMEOUT_S)
    assert done.returncode == 0, describe(done)
    installed = system.run("dpkg-query", "-W", "-f=${Status}", "voxgate")
    assert installed.stdout == "install ok installed", describe(installed)
    for database in ("passwd", "group"):
        entry = system.run("getent", database, "voxgate")
        assert entry.returncode == 0, describe(entry)
    modes = system.run("stat", "-c", "%n %U:%G %a", "/etc/voxgate", CONFIG, "/var/lib/voxgate")
    assert modes.stdout.splitlines() == [
        "/etc/voxgate root:voxgate 750",
        f"{CONFIG} root:voxgate 640",
        "/var/lib/voxgate voxgate:voxgate 750",
    ], describe(modes)
    # Installing enables and starts nothing.
    assert unit_properties(system, "UnitFileState", "ActiveState") == {
        "UnitFileState": "disabled", "ActiveState": "inactive"}
    check = system.run("voxgated", "--check-config", CONFIG)
    assert check.returncode == 0, describe(check)


def test_enable_now(system: Container) -> None:
    packaged = system.run("cat", CONFIG).stdout
    system.write_file(CONFIG, with_limits(packaged, OPERATOR_LIMITS))
    done = system.run("systemctl", "enable", "--now", "voxgate")
    assert done.returncode == 0, describe(done)
    # Type=notify: the start job ends at READY=1, so the unit is active now.
    props = unit_properties(system, "ActiveState", "UnitFileState", "StatusText")
    assert props["ActiveState"] == "active", props
    assert props["UnitFileState"] == "enabled", props
    assert "admitting" in props["StatusText"], props
    ready = system.journal_records("-u", "voxgate", "EVENT=ready")
    assert ready and ready[-1].get("MEDIA_CORES") == "native", ready  # the .deb's mypyc build
    limits = status(system)["limits"]
    assert {key: limits[key] for key in OPERATOR_LIMITS} == OPERATOR_LIMITS, limits


def test_sip_call(system: Container, clip: SpeechClip, tmp_path: Path) -> None:
    result = sipp(system, "uac_echo", tmp_path, clip, duration_ms=2000, timeout_s=30).run()
    assert result.returncode == 0 and result.successful_calls == 1, result.describe()
    ends = system.journal_records("-u", "voxgate", "EVENT=call_end")
    assert len(ends) == 1, ends
    assert ends[0].get("REASON") == "bye", ends[0]
    assert int(ends[0].get("PACKETS_OUT", "0")) > 0, ends[0]  # the echo went back


def test_status_as_voxgate_group_member(system: Container) -> None:
    for user in ("alice", "bob"):
        done = system.run("adduser", "--disabled-password", "--gecos", "", user)
        assert done.returncode == 0, describe(done)
    done = system.run("adduser", "alice", "voxgate")
    assert done.returncode == 0, describe(done)
    member = system.run("runuser", "-u", "alice", "--", "voxgatectl", "status")
    assert member.returncode == 0, describe(member)
    assert "session" in member.stdout, describe(member)
    outsider = system.run("runuser", "-u", "bob", "--", "voxgatectl", "status")
    assert outsider.returncode != 0, describe(outsider)


def test_reload_good_file(system: Container) -> None:
    running = system.run("cat", CONFIG).stdout
    system.write_file(CONFIG, with_limits(running, RELOADED_LIMITS))
    done = system.run("systemctl", "reload", "voxgate")
    assert done.returncode == 0, describe(done)
    limits = status(system)["limits"]
    assert {key: limits[key] for key in RELOADED_LIMITS} == RELOADED_LIMITS, limits
    assert system.journal_records("-u", "voxgate", "EVENT=reloaded"), "no reloaded record"
    assert unit_properties(system, "ActiveState")["ActiveState"] == "active"


def test_reload_bad_file_fails(system: Container) -> None:
    good = system.run("cat", CONFIG).stdout
    limits = status(system)["limits"]
    cursor = system.journal_cursor()
    system.write_file(CONFIG, with_limits(good, {"max_sessions": '"seven"'}))
    try:
        done = system.run("systemctl", "reload", "voxgate")
        assert done.returncode != 0, \
            f"systemctl reload reported success on an invalid file\n{describe(done)}"
        assert unit_properties(system, "ActiveState")["ActiveState"] == "active"
        assert status(system)["limits"] == limits  # the running config is kept
        # The operator finds why in the unit's journal: the file and the key.
        messages = [str(r.get("MESSAGE")) for r in system.journal_records(
            "-u", "voxgate", f"--after-cursor={cursor}")]
        assert any("max_sessions" in m and CONFIG in m for m in messages), messages
    finally:
        system.write_file(CONFIG, good)
    # It failed for the file's sake: with the good file back, reload works.
    again = system.run("systemctl", "reload", "voxgate")
    assert again.returncode == 0, describe(again)


def test_stop_drains_live_call(system: Container, clip: SpeechClip, tmp_path: Path) -> None:
    with sipp(system, "uac_wait_bye", tmp_path, clip, timeout_s=60) as call:
        wait_until(lambda: status(system)["sessions"]["active"] == 1, "the call is up")
        stop = system.run("systemctl", "stop", "voxgate", timeout=STOP_TIMEOUT_S)
        result = call.wait()
    assert stop.returncode == 0, describe(stop)
    # uac_wait_bye succeeds only when the daemon's BYE came and was answered.
    assert result.returncode == 0 and result.successful_calls == 1, result.describe()
    assert system.journal_records("-u", "voxgate", "EVENT=drain"), "no drain record"
    reasons = [r.get("REASON") for r in system.journal_records(
        "-u", "voxgate", "EVENT=call_end")]
    assert reasons[-1] == "drain-timeout", reasons
    assert unit_properties(system, "ActiveState", "Result", "ExecMainStatus") == {
        "ActiveState": "inactive", "Result": "success", "ExecMainStatus": "0"}


def test_security_exposure(system: Container) -> None:
    done = system.run("systemd-analyze", "security", "--no-pager", "voxgate.service")
    match = re.search(r"Overall exposure level for voxgate\.service:\s*([0-9.]+)", done.stdout)
    assert match, describe(done)
    score = float(match.group(1))
    print(f"systemd-analyze security voxgate.service: {score}")
    assert score <= MAX_SECURITY_EXPOSURE, describe(done)


def test_apt_purge(system: Container) -> None:
    # Purge a running service: prerm stops it.
    start = system.run("systemctl", "start", "voxgate")
    assert start.returncode == 0, describe(start)
    shipped = system.run("dpkg", "-L", "voxgate").stdout
    # The package's own tree: /usr/bin/voxgated → <prefix>/bin/voxgated.
    voxgated = system.run("readlink", "-f", "/usr/bin/voxgated").stdout.strip()
    assert voxgated.endswith("/bin/voxgated"), voxgated
    done = system.run("apt", "purge", "-y", "voxgate", timeout=APT_TIMEOUT_S)
    assert done.returncode == 0, describe(done)
    assert system.run("dpkg", "-s", "voxgate").returncode != 0, "dpkg still knows voxgate"
    # Every file the package shipped, the directories that are its own, the enablement.
    paths = [*shipped.splitlines(), "/etc/voxgate", "/var/lib/voxgate", "/run/voxgate",
             os.path.dirname(os.path.dirname(voxgated)),
             "/etc/systemd/system/multi-user.target.wants/voxgate.service"]
    left = system.shell('for p; do [ -d "$p" ] && continue; '
                        '[ -e "$p" ] || [ -L "$p" ] && echo "$p"; done; true', *paths)
    assert left.stdout == "", f"left after purge:\n{left.stdout}"
    gone = system.shell('for p; do [ -e "$p" ] && echo "$p"; done; true', *paths[-5:])
    assert gone.stdout == "", f"directories left after purge:\n{gone.stdout}"
    overrides = system.run("dpkg-statoverride", "--list")
    assert "voxgate" not in overrides.stdout, overrides.stdout
    assert unit_properties(system, "LoadState", "ActiveState") == {
        "LoadState": "not-found", "ActiveState": "inactive"}
    processes = system.shell("grep -l voxgate[d] /proc/[0-9]*/cmdline || true")
    assert processes.stdout == "", f"voxgated still runs: {processes.stdout}"
