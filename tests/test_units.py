"""systemd/voxgate.service, voxgate@.service and the ALSA drop-in.

``systemd-analyze verify`` and ``systemd-analyze security --offline=true`` work
on unit files without a running systemd (PID 1 here is not systemd); verify
wants ExecStart= to exist, so it runs on copies in a temp dir whose ExecStart=
names this venv's ``voxgated``. Nothing is installed on the host.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from voxgate.config import LimitsConfig

REPO = Path(__file__).resolve().parents[1]
UNITS = REPO / "systemd"
MAIN = UNITS / "voxgate.service"
TEMPLATE = UNITS / "voxgate@.service"
ALSA_DROPIN = UNITS / "dropins" / "alsa.conf"
MAX_EXPOSURE = 2.0
_TIMEOUT_S = 60

needs_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None,
    reason="systemd-analyze missing (apt-get install systemd; `make setup` does)",
)

Unit = dict[str, list[tuple[str, str]]]


def parse_unit(path: Path) -> Unit:
    """Sections → ``(key, value)`` in file order (keys may repeat); comments dropped."""
    sections: Unit = {}
    current: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = pending + raw.strip()
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        pending = ""
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
            continue
        key, sep, value = line.partition("=")
        assert sep, f"{path}: not key=value: {line!r}"
        current.append((key.strip(), value.strip()))
    return sections


def values(unit: Unit, key: str, section: str = "Service") -> list[str]:
    return [v for k, v in unit.get(section, []) if k == key]


def one(unit: Unit, key: str, section: str = "Service") -> str:
    found = values(unit, key, section)
    assert len(found) == 1, f"{key}= appears {len(found)} times in [{section}]"
    return found[0]


def seconds(text: str) -> float:
    """A systemd time span without units (``90``) or with one unit (``90s``, ``2min``)."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(s|sec|min|m)?", text)
    assert match, f"unsupported time span {text!r}"
    return float(match.group(1)) * (60 if match.group(2) in ("min", "m") else 1)


def size_bytes(text: str) -> int:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([KMGT]?)", text)
    assert match, f"unsupported size {text!r}"
    return int(float(match.group(1)) * 1024 ** " KMGT".index(match.group(2) or " "))


def venv_voxgated() -> Path:
    script = Path(sys.executable).parent / "voxgated"
    if not script.exists():
        pytest.skip(f"{script} missing: run `make setup` (pip install -e .)")
    return script


def staged_units(tmp_path: Path, *, alsa: bool = False) -> Path:
    """Copies of both units whose ExecStart= names the venv's voxgated."""
    voxgated = venv_voxgated()
    for unit in (MAIN, TEMPLATE):
        text = unit.read_text().replace("/usr/bin/voxgated", str(voxgated))
        (tmp_path / unit.name).write_text(text)
    (tmp_path / "voxgate@0.service").symlink_to("voxgate@.service")
    if alsa:
        dropins = tmp_path / "voxgate.service.d"
        dropins.mkdir()
        shutil.copy(ALSA_DROPIN, dropins / "alsa.conf")
    return tmp_path


def analyze(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["systemd-analyze", *args], capture_output=True, text=True,
                          timeout=_TIMEOUT_S, check=False)


# --- systemd-analyze ---------------------------------------------------------------


@needs_analyze
@pytest.mark.parametrize("name", ["voxgate.service", "voxgate@.service", "voxgate@0.service"])
def test_verify_is_clean(tmp_path: Path, name: str) -> None:
    units = staged_units(tmp_path)
    done = analyze("verify", "--man=no", "--generators=no", str(units / name))
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip() == "", f"warnings for {name}:\n{done.stderr}"


@needs_analyze
def test_verify_with_alsa_dropin(tmp_path: Path) -> None:
    units = staged_units(tmp_path, alsa=True)
    done = analyze("verify", "--man=no", "--generators=no", str(units / "voxgate.service"))
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip() == "", done.stderr


def exposure(unit: Path) -> float:
    """The overall exposure ``systemd-analyze security --offline=true`` gives ``unit``."""
    done = analyze("security", "--offline=true", "--no-pager", str(unit))
    match = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", done.stdout)
    assert match, f"no score in:\n{done.stdout}\n{done.stderr}"
    return float(match.group(1))


@needs_analyze
@pytest.mark.parametrize("unit", [MAIN, TEMPLATE], ids=lambda p: p.name)
def test_security_exposure(unit: Path) -> None:
    score = exposure(unit)
    print(f"systemd-analyze security --offline=true {unit.name}: {score}")
    assert score <= MAX_EXPOSURE


@needs_analyze
def test_security_exposure_with_alsa_dropin(tmp_path: Path) -> None:
    score = exposure(staged_units(tmp_path, alsa=True) / "voxgate.service")
    print(f"systemd-analyze security --offline=true voxgate.service + alsa.conf: {score}")
    assert score <= MAX_EXPOSURE


# --- keys ----------------------------------------------------------------------------


@pytest.mark.parametrize("path", [MAIN, TEMPLATE], ids=lambda p: p.name)
def test_notify_watchdog_restart(path: Path) -> None:
    unit = parse_unit(path)
    assert one(unit, "Type") == "notify"
    assert one(unit, "NotifyAccess") == "main"
    assert seconds(one(unit, "WatchdogSec")) == 30
    assert one(unit, "Restart") == "on-failure"
    assert one(unit, "RestartPreventExitStatus") == "78 73"
    assert (one(unit, "User"), one(unit, "Group")) == ("voxgate", "voxgate")
    assert one(unit, "LimitNOFILE") == "65536"
    assert one(unit, "WantedBy", "Install") == "multi-user.target"


@pytest.mark.parametrize("path", [MAIN, TEMPLATE], ids=lambda p: p.name)
def test_reload_checks_the_started_file_before_signalling(path: Path) -> None:
    """``systemctl reload`` fails on an invalid file: the check runs first, then SIGHUP."""
    unit = parse_unit(path)
    start = one(unit, "ExecStart").split()
    assert start[:2] == ["/usr/bin/voxgated", "--config"] and len(start) == 3
    assert values(unit, "ExecReload") == [
        f"/usr/bin/voxgated --check-config {start[2]}",
        "/bin/kill -HUP $MAINPID",
    ]


@pytest.mark.parametrize("path", [MAIN, TEMPLATE], ids=lambda p: p.name)
def test_stop_timeout_outlasts_the_drain(path: Path) -> None:
    unit = parse_unit(path)
    assert seconds(one(unit, "TimeoutStopSec")) >= 2 * LimitsConfig().drain_timeout_s


@pytest.mark.parametrize("path", [MAIN, TEMPLATE], ids=lambda p: p.name)
def test_memory_limits(path: Path) -> None:
    unit = parse_unit(path)
    high, top = size_bytes(one(unit, "MemoryHigh")), size_bytes(one(unit, "MemoryMax"))
    assert 1 << 30 <= high < top


@pytest.mark.parametrize("path", [MAIN, TEMPLATE], ids=lambda p: p.name)
def test_sandbox_keys(path: Path) -> None:
    unit = parse_unit(path)
    expected = {
        "ProtectSystem": "strict", "ProtectHome": "yes", "PrivateTmp": "yes",
        "PrivateDevices": "yes", "DevicePolicy": "closed", "NoNewPrivileges": "yes",
        "CapabilityBoundingSet": "", "AmbientCapabilities": "",
        "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
        "SystemCallArchitectures": "native", "ProtectProc": "invisible",
        "ProcSubset": "pid", "MemoryDenyWriteExecute": "yes", "UMask": "0027",
        "RuntimeDirectoryMode": "0750",
    }
    assert {key: one(unit, key) for key in expected} == expected
    assert values(unit, "SystemCallFilter")[:2] == ["@system-service", "~@privileged @resources"]
    assert values(unit, "PrivateUsers") == []  # would unmap voxgatectl peers, see the unit
    assert values(unit, "IPAddressDeny") == []  # a network service


def test_main_unit_paths() -> None:
    unit = parse_unit(MAIN)
    assert one(unit, "ExecStart") == "/usr/bin/voxgated --config /etc/voxgate/voxgate.toml"
    assert one(unit, "RuntimeDirectory") == "voxgate"
    assert one(unit, "StateDirectory") == "voxgate"
    assert one(unit, "ConfigurationDirectory") == "voxgate"


def test_template_differs_only_by_instance() -> None:
    main, template = parse_unit(MAIN), parse_unit(TEMPLATE)
    assert one(template, "ExecStart") == "/usr/bin/voxgated --config /etc/voxgate/%i.toml"
    assert values(template, "ExecReload")[0] == \
        "/usr/bin/voxgated --check-config /etc/voxgate/%i.toml"
    assert one(template, "RuntimeDirectory") == "voxgate/%i"
    assert one(template, "StateDirectory") == "voxgate/%i"
    assert one(template, "Conflicts", "Unit") == "voxgate.service"
    per_instance = {"ExecStart", "RuntimeDirectory", "StateDirectory"}

    def shared(unit: Unit) -> list[tuple[str, str]]:
        return [(key, value.replace("/etc/voxgate/%i.toml", "/etc/voxgate/voxgate.toml"))
                for key, value in unit["Service"] if key not in per_instance]

    assert shared(template) == shared(main)
    assert template["Install"] == main["Install"]


def test_alsa_dropin_opens_sound_devices_only() -> None:
    dropin = parse_unit(ALSA_DROPIN)
    assert one(dropin, "PrivateDevices") == "no"
    assert one(dropin, "DevicePolicy") == "closed"
    assert one(dropin, "DeviceAllow") == "char-alsa rw"
    assert one(dropin, "SupplementaryGroups") == "audio"
    assert set(dropin) == {"Service"}


# --- MemoryDenyWriteExecute ---------------------------------------------------------

_UNDER_MDWE = """
import ctypes, sys
PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 65, 1
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0) != 0:
    sys.exit(77)
import trio
import voxgate.journal
from voxgate.supervisor import main  # imports everything the daemon runs

async def udp_round_trip():
    a, b = trio.socket.socket(type=2), trio.socket.socket(type=2)
    await a.bind(("127.0.0.1", 0)); await b.bind(("127.0.0.1", 0))
    await a.sendto(b"x", b.getsockname())
    return await b.recv(10)

assert trio.run(udp_round_trip) == b"x"
sys.exit(main(["--check-config", sys.argv[1]]))
"""


def test_daemon_runs_with_memory_deny_write_execute() -> None:
    """MemoryDenyWriteExecute=yes: the same rule (PR_SET_MDWE, Linux 6.3+) in a child."""
    done = subprocess.run(
        [sys.executable, "-c", _UNDER_MDWE, str(REPO / "config" / "voxgate.toml")],
        capture_output=True, text=True, timeout=_TIMEOUT_S, check=False,
    )
    if done.returncode == 77:
        pytest.skip("kernel without PR_SET_MDWE (Linux < 6.3)")
    assert done.returncode == 0, done.stderr
    assert "ok" in done.stdout
