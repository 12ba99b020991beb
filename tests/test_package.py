"""packaging/build-deb.sh and the Kamailio dispatcher example.

Slow (about 15 s with pip's cache warm): the package is built once into a
temp dir, then inspected with dpkg-deb and unpacked with ``dpkg -x`` into a
scratch root; nothing is installed on the host.
"""

from __future__ import annotations

import contextlib
import marshal
import os
import re
import shutil
import signal
import socket
import subprocess
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BUILD_TIMEOUT_S = 180
_TIMEOUT_S = 60
PREFIX = "opt/voxgate"

pytestmark = pytest.mark.skipif(
    shutil.which("dpkg-deb") is None or not os.access("/usr/bin/python3", os.X_OK),
    reason="needs dpkg-deb and Debian's /usr/bin/python3 (a Debian host)",
)


def run(*args: str | Path, timeout: float = _TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True,
                          timeout=timeout, check=False)


@pytest.fixture(scope="module")
def deb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    done = run("bash", REPO / "packaging" / "build-deb.sh", out, timeout=BUILD_TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-4000:]
    (path,) = out.glob("voxgate_*.deb")
    assert done.stdout.strip() == str(path)
    return path


@pytest.fixture(scope="module")
def control_dir(deb: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    target = tmp_path_factory.mktemp("control") / "DEBIAN"
    done = run("dpkg-deb", "-e", deb, target)
    assert done.returncode == 0, done.stderr
    return target


@pytest.fixture(scope="module")
def root(deb: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    target = tmp_path_factory.mktemp("root")
    done = run("dpkg", "-x", deb, target)
    assert done.returncode == 0, done.stderr
    return target


def project_version() -> str:
    with (REPO / "pyproject.toml").open("rb") as f:
        version: str = tomllib.load(f)["project"]["version"]
    return version


def test_file_name(deb: Path) -> None:
    arch = run("dpkg", "--print-architecture").stdout.strip()
    assert deb.name == f"voxgate_{project_version()}_{arch}.deb"


def test_contents(deb: Path) -> None:
    listing = run("dpkg-deb", "-c", deb).stdout
    entries = {line.split()[5].removeprefix("."): line for line in listing.splitlines()}
    for path in (
        "/etc/voxgate/voxgate.toml",
        "/lib/systemd/system/voxgate.service",
        "/lib/systemd/system/voxgate@.service",
        "/usr/lib/sysusers.d/voxgate.conf",
        "/usr/share/doc/voxgate/examples/alsa.conf",
        "/usr/share/doc/voxgate/examples/kamailio/kamailio-dispatcher.cfg",
        "/usr/share/doc/voxgate/examples/kamailio/dispatcher.list",
        f"/{PREFIX}/bin/voxgated",
        f"/{PREFIX}/pyvenv.cfg",
        f"/{PREFIX}/lib/python3.11/site-packages/voxgate/supervisor.py",
        f"/{PREFIX}/lib/python3.11/site-packages/trio/__init__.py",
        f"/{PREFIX}/lib/python3.11/site-packages/systemd/journal.py",
        "/var/lib/voxgate/",
    ):
        assert path in entries, f"{path} not in the package"
    assert "/usr/bin/voxgated -> /opt/voxgate/bin/voxgated" in listing
    assert entries["/etc/voxgate/"].startswith("drwxr-x--- root/root")
    assert entries["/var/lib/voxgate/"].startswith("drwxr-x--- root/root")
    assert not any("/site-packages/pip/" in p for p in entries)
    assert not any(p.endswith("direct_url.json") for p in entries)


def test_control_fields(deb: Path) -> None:
    def field(name: str) -> str:
        return run("dpkg-deb", "-f", deb, name).stdout.strip()

    assert field("Package") == "voxgate"
    assert field("Version") == project_version()
    assert field("Architecture") == run("dpkg", "--print-architecture").stdout.strip()
    depends = [d.strip() for d in field("Depends").split(",")]
    assert "python3 (>= 3.11)" in depends
    assert "libsystemd0" in depends
    assert int(field("Installed-Size")) > 1000  # KiB: the venv is in there


def test_conffiles(control_dir: Path) -> None:
    assert (control_dir / "conffiles").read_text().split() == ["/etc/voxgate/voxgate.toml"]


@pytest.mark.parametrize("script", ["postinst", "prerm", "postrm"])
def test_maintainer_script(control_dir: Path, script: str) -> None:
    path = control_dir / script
    assert os.access(path, os.X_OK)
    done = run("sh", "-n", path)
    assert done.returncode == 0, done.stderr
    code = [line for line in path.read_text().splitlines()
            if line.strip() and not line.strip().startswith("#")]
    for line in code:
        assert not re.search(r"\b(enable|start)\b", line), f"{script} starts or enables: {line}"


def test_postinst_creates_user_and_owners(control_dir: Path) -> None:
    postinst = (control_dir / "postinst").read_text()
    assert "systemd-sysusers /usr/lib/sysusers.d/voxgate.conf" in postinst
    assert "adduser --system" in postinst
    assert "statoverride root voxgate 0750 /etc/voxgate" in postinst
    assert "statoverride voxgate voxgate 0750 /var/lib/voxgate" in postinst
    assert "daemon-reload" in postinst


def venv_python(root: Path) -> Path:
    return root / PREFIX / "bin" / "python"


def test_venv_paths_name_opt_voxgate(root: Path) -> None:
    venv = root / PREFIX
    assert (venv / "bin" / "voxgated").read_text().splitlines()[0] == "#!/opt/voxgate/bin/python"
    assert os.readlink(venv / "bin" / "python3") == "/usr/bin/python3"
    cfg = (venv / "pyvenv.cfg").read_text()
    assert "home = /usr/bin" in cfg
    assert "/opt/voxgate" in cfg
    (pyc,) = (venv / "lib/python3.11/site-packages/voxgate/__pycache__").glob("config.*.pyc")
    code = marshal.loads(pyc.read_bytes()[16:])
    assert code.co_filename == "/opt/voxgate/lib/python3.11/site-packages/voxgate/config.py"


def test_packaged_daemon_checks_config(root: Path, tmp_path: Path) -> None:
    python, voxgated = venv_python(root), root / PREFIX / "bin" / "voxgated"
    good = run(python, voxgated, "--check-config", root / "etc/voxgate/voxgate.toml")
    assert good.returncode == 0, good.stderr
    broken = tmp_path / "broken.toml"
    broken.write_text("[rtp]\nport_min = 1\n")
    bad = run(python, voxgated, "--check-config", broken)
    assert bad.returncode == 78, bad.stderr
    assert "[rtp] port_min" in bad.stderr


def test_packaged_voxgatectl_help(root: Path) -> None:
    voxgatectl = root / PREFIX / "bin" / "voxgatectl"
    if not voxgatectl.exists():
        pytest.skip("voxgatectl is not a console script of this version yet")
    done = run(venv_python(root), voxgatectl, "--help")
    assert done.returncode == 0, done.stderr
    assert (root / "usr/bin/voxgatectl").is_symlink()


# --- Kamailio dispatcher example ------------------------------------------------

KAMAILIO_CFG = REPO / "packaging" / "kamailio" / "kamailio-dispatcher.cfg"
DISPATCHER_LIST = REPO / "packaging" / "kamailio" / "dispatcher.list"
needs_kamailio = pytest.mark.skipif(shutil.which("kamailio") is None,
                                    reason="kamailio missing (apt-get install kamailio)")


@needs_kamailio
def test_kamailio_config_checks() -> None:
    done = run("kamailio", "-c", "-f", KAMAILIO_CFG)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "config file ok" in done.stdout + done.stderr


def test_dispatcher_list_lines() -> None:
    lines = [line.split() for line in DISPATCHER_LIST.read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert len(lines) >= 2
    for setid, uri, flags, priority, *_ in lines:
        assert (setid, flags, priority) == ("1", "0", "0")
        assert re.fullmatch(r"sip:[0-9.]+:\d+", uri)


@contextlib.contextmanager
def udp_socket() -> Iterator[socket.socket]:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        yield s


@needs_kamailio
def test_kamailio_probes_instances_with_options(tmp_path: Path) -> None:
    """Run the example for real (log to stderr) with a fake voxgate instance."""
    with udp_socket() as instance, udp_socket() as hold:
        kamailio_port = hold.getsockname()[1]
        hold.close()
        instance_port = instance.getsockname()[1]
        listing = tmp_path / "dispatcher.list"
        listing.write_text(f"1 sip:127.0.0.1:{instance_port} 0 0\n")
        cfg = KAMAILIO_CFG.read_text()
        cfg = cfg.replace("udp:127.0.0.1:5060", f"udp:127.0.0.1:{kamailio_port}")
        cfg = cfg.replace("/etc/kamailio/dispatcher.list", str(listing))
        cfg = re.sub(r'"ds_ping_interval", \d+', '"ds_ping_interval", 1', cfg)
        (tmp_path / "kamailio.cfg").write_text(cfg)
        log = (tmp_path / "kamailio.log").open("w")
        proc = subprocess.Popen(
            ["kamailio", "-DD", "-E", "-f", str(tmp_path / "kamailio.cfg"),
             "-Y", str(tmp_path), "-w", str(tmp_path)],
            stdout=log, stderr=subprocess.STDOUT,
        )
        try:
            instance.settimeout(10)
            data, _peer = instance.recvfrom(65536)
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
            log.close()
    text = data.decode(errors="replace")
    assert text.startswith(f"OPTIONS sip:127.0.0.1:{instance_port} SIP/2.0\r\n"), text
    assert "sip:dispatcher@kamailio.invalid" in text
    kamailio_log = (tmp_path / "kamailio.log").read_text()
    assert " ERROR: " not in kamailio_log, kamailio_log[-4000:]
