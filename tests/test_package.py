"""packaging/build-deb.sh and the Kamailio dispatcher example.

Slow (the build takes about a minute with pip's cache warm, lintian about 40 s):
the package is built once into a temp dir, then inspected with dpkg-deb and
lintian and unpacked with ``dpkg -x`` into a scratch root; nothing is installed
on the host.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import subprocess
import tomllib
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.harness.kamailio import running_kamailio
from voxgate import supervisor
from voxgate.control import cli

REPO = Path(__file__).resolve().parents[1]
# Under load (two cores shared with the rest of the suite) a build took 3 minutes.
BUILD_TIMEOUT_S = 600
LINTIAN_TIMEOUT_S = 600
_TIMEOUT_S = 60
PREFIX = "usr/lib/voxgate"
SITE_PACKAGES = f"{PREFIX}/lib/python3.11/site-packages"

pytestmark = pytest.mark.skipif(
    shutil.which("dpkg-deb") is None or not os.access("/usr/bin/python3", os.X_OK),
    reason="needs dpkg-deb and Debian's /usr/bin/python3 (a Debian host)",
)
needs_lintian = pytest.mark.skipif(shutil.which("lintian") is None,
                                   reason="lintian missing (apt-get install lintian)")
needs_man = pytest.mark.skipif(shutil.which("man") is None,
                               reason="man missing (apt-get install man-db)")


def run(*args: str | Path, timeout: float = _TIMEOUT_S,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True,
                          timeout=timeout, check=False, env=env)


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
    """The package unpacked, plus what an installed system has: Debian's python3."""
    target = tmp_path_factory.mktemp("root")
    done = run("dpkg", "-x", deb, target)
    assert done.returncode == 0, done.stderr
    (target / "usr/bin/python3").symlink_to("/usr/bin/python3")
    return target


def project_version() -> str:
    with (REPO / "pyproject.toml").open("rb") as f:
        version: str = tomllib.load(f)["project"]["version"]
    return version


def changelog(field: str) -> str:
    done = run("dpkg-parsechangelog", "-l", REPO / "packaging/debian/changelog", "-S", field)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


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
        "/usr/share/doc/voxgate/copyright",
        "/usr/share/doc/voxgate/changelog.gz",
        "/usr/share/doc/voxgate/examples/alsa.conf",
        "/usr/share/doc/voxgate/examples/kamailio/kamailio-dispatcher.cfg",
        "/usr/share/doc/voxgate/examples/kamailio/dispatcher.list",
        "/usr/share/lintian/overrides/voxgate",
        "/usr/share/man/man8/voxgated.8.gz",
        "/usr/share/man/man8/voxgatectl.8.gz",
        f"/{PREFIX}/bin/voxgated",
        f"/{PREFIX}/pyvenv.cfg",
        f"/{SITE_PACKAGES}/voxgate/supervisor.py",
        f"/{SITE_PACKAGES}/trio/__init__.py",
        f"/{SITE_PACKAGES}/systemd/journal.py",
        "/var/lib/voxgate/",
    ):
        assert path in entries, f"{path} not in the package"
    assert "/usr/bin/voxgated -> ../lib/voxgate/bin/voxgated" in listing
    assert entries["/etc/voxgate/"].startswith("drwxr-x--- root/root")
    assert entries["/var/lib/voxgate/"].startswith("drwxr-x--- root/root")
    assert not any(p.startswith("/opt/") for p in entries)
    assert not any("/site-packages/pip/" in p for p in entries)
    assert not any("argparse_manpage" in p for p in entries)
    assert not any(p.endswith("direct_url.json") for p in entries)
    # Bytecode is compiled by postinst, not shipped.
    assert not any("__pycache__" in p or p.endswith(".pyc") for p in entries)
    for path, line in entries.items():
        if re.search(r"\.so(\.[\d.]+)?$", path):
            assert line.startswith("-rw-r--r--"), f"shared object with mode {line}"


def test_control_fields(deb: Path) -> None:
    def field(name: str) -> str:
        return run("dpkg-deb", "-f", deb, name).stdout.strip()

    assert field("Package") == "voxgate"
    assert field("Version") == project_version()
    assert field("Architecture") == run("dpkg", "--print-architecture").stdout.strip()
    assert field("Maintainer") == changelog("Maintainer")
    assert "localhost" not in field("Maintainer")
    depends = [d.strip() for d in field("Depends").split(",")]
    assert "python3 (>= 3.11)" in depends
    assert "systemd" in depends  # systemd-sysusers, the units
    # From dpkg-shlibdeps on the bundled shared objects:
    for library in ("libc6", "libsystemd0", "libasound2"):
        assert any(d.startswith(f"{library} (>= ") for d in depends), (library, depends)
    assert not any("|" in d for d in depends)
    assert int(field("Installed-Size")) > 1000  # KiB: the venv is in there


def test_changelog_and_copyright(root: Path) -> None:
    assert changelog("Version") == project_version()
    doc = root / "usr/share/doc/voxgate"
    unpacked = subprocess.run(["gzip", "-dc", str(doc / "changelog.gz")], capture_output=True,
                              check=True, timeout=_TIMEOUT_S).stdout
    assert unpacked == (REPO / "packaging/debian/changelog").read_bytes()
    copyright_text = (doc / "copyright").read_text()
    assert copyright_text.startswith(
        "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\n")
    files = " ".join(re.findall(r"^Files: (.*(?:\n .*)*)", copyright_text, re.MULTILINE))
    site = root / SITE_PACKAGES
    dist_infos = [p.name for p in site.glob("*.dist-info") if not p.name.startswith("voxgate-")]
    assert len(dist_infos) > 10
    for name in dist_infos:  # every bundled distribution has its paragraph
        assert f"{SITE_PACKAGES}/{name}/*" in files, name


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
    assert "systemd-sysusers ${DPKG_ROOT:+--root=\"$DPKG_ROOT\"} " \
           "/usr/lib/sysusers.d/voxgate.conf" in postinst
    assert "adduser" not in postinst
    assert "statoverride root voxgate 0750 /etc/voxgate" in postinst
    assert "statoverride voxgate voxgate 0750 /var/lib/voxgate" in postinst
    assert "daemon-reload" in postinst


def test_bytecode_compiled_by_postinst_removed_by_prerm(control_dir: Path) -> None:
    assert f"py3compile -p voxgate /{PREFIX}" in (control_dir / "postinst").read_text()
    assert "py3clean -p voxgate" in (control_dir / "prerm").read_text()


def test_postinst_compiles_every_module(root: Path) -> None:
    """What postinst's py3compile does on the installed tree succeeds (a module
    that does not compile would fail the installation)."""
    venv = root / PREFIX
    done = run("py3compile", venv, timeout=BUILD_TIMEOUT_S)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    (pyc,) = (venv / "lib/python3.11/site-packages/voxgate/__pycache__").glob("config.*.pyc")
    assert pyc.stat().st_size > 0


def venv_python(root: Path) -> Path:
    return root / PREFIX / "bin" / "python"


def test_venv_paths_name_usr_lib_voxgate(root: Path) -> None:
    venv = root / PREFIX
    assert (venv / "bin/voxgated").read_text().splitlines()[0] == f"#!/{PREFIX}/bin/python"
    assert os.readlink(venv / "bin/python3") == "../../../bin/python3"
    cfg = (venv / "pyvenv.cfg").read_text()
    assert "home = /usr/bin" in cfg
    assert f"/{PREFIX}" in cfg


def test_packaged_extensions_load(root: Path) -> None:
    """The stripped shared objects (and numpy's unstripped vendored ones) still load."""
    code = ("import numpy, soxr, systemd.journal, alsaaudio, webrtcvad, pocketsphinx\n"
            "print(numpy.linalg.inv(numpy.eye(3) * 2).trace(),"
            " soxr.resample(numpy.ones(160, dtype='float32'), 8000, 16000).shape)")
    done = run(venv_python(root), "-c", code)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["1.5", "(320,)"]


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
    done = run(venv_python(root), root / PREFIX / "bin/voxgatectl", "--help")
    assert done.returncode == 0, done.stderr
    assert (root / "usr/bin/voxgatectl").is_symlink()


@needs_lintian
def test_lintian_reports_no_errors(deb: Path) -> None:
    """Warnings that remain are overridden with a reason
    (packaging/debian/lintian-overrides) or listed in the README."""
    done = run("lintian", "--tag-display-limit", "0", deb, timeout=LINTIAN_TIMEOUT_S)
    tags = [line for line in done.stdout.splitlines() if re.match(r"[EW]: ", line)]
    assert not [t for t in tags if t.startswith("E: ")], "\n".join(tags)
    assert done.returncode == 0, done.stdout + done.stderr


def long_options(parser: argparse.ArgumentParser) -> set[str]:
    """Every long option of the parser and its subcommands but --help."""
    options: set[str] = set()
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        options.update(o for o in action.option_strings if o.startswith("--"))
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                options |= long_options(sub)
    return options


@needs_man
@pytest.mark.parametrize(("program", "parser", "summary"), [
    ("voxgated", supervisor._build_parser,
     "voxgated - telephony daemon that runs a voice agent on each call"),
    ("voxgatectl", cli._build_parser, "voxgatectl - control a running voxgated"),
])
def test_man_page_renders(root: Path, program: str,
                          parser: Callable[[], argparse.ArgumentParser], summary: str) -> None:
    """``man PROGRAM`` after installing: section 8, gzipped, rendered without
    warnings, every option of the command line in it."""
    page = root / f"usr/share/man/man8/{program}.8.gz"
    done = run("man", "--warnings", "-l", page, env={**os.environ, "MANWIDTH": "80"})
    assert done.returncode == 0, done.stderr
    assert done.stderr == "", done.stderr
    text = re.sub(r".\x08", "", done.stdout)  # no bold/underline overstrikes
    assert text.startswith(f"{program.upper()}(8)"), text[:200]
    assert summary in text
    assert f"voxgate {project_version()}" in text
    for option in long_options(parser()):
        assert option in text, f"{option} not in {program}(8)"
    for section in ("SYNOPSIS", "DESCRIPTION", "FILES", "SEE ALSO"):
        assert f"\n{section}\n" in text, section


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


@needs_kamailio
def test_kamailio_probes_instances_with_options(tmp_path: Path) -> None:
    """Run the example for real (:mod:`tests.harness.kamailio`) with a fake voxgate instance."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as instance:
        instance.bind(("127.0.0.1", 0))
        instance.settimeout(10)
        instance_port = instance.getsockname()[1]
        uri = f"sip:127.0.0.1:{instance_port}"
        with running_kamailio(tmp_path, [uri], ping_interval_s=1) as kamailio:
            data, _peer = instance.recvfrom(65536)
            kamailio_log = kamailio.log_text()
    text = data.decode(errors="replace")
    assert text.startswith(f"OPTIONS {uri} SIP/2.0\r\n"), text
    assert "sip:dispatcher@kamailio.invalid" in text
    assert " ERROR: " not in kamailio_log, kamailio_log[-4000:]
