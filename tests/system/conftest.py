"""Fixtures of the system test: the .deb and a booted Debian 12 to install it in.

The system test runs only with ``VOXGATE_TEST_SYSTEM=1`` (``make
test-system``), as root, with debootstrap, systemd-nspawn (systemd-container),
nsenter and SIPp on the host; ``make test`` reports it skipped. A failing step
gets the container's journal attached to its report.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Generator, Iterator
from pathlib import Path

import pytest

from tests.harness.audio import SpeechClip, make_speech_clip
from tests.system.container import Container, cached_rootfs, deb_dependencies

REPO = Path(__file__).resolve().parents[2]
BUILD_TIMEOUT_S = 600
HOST_TOOLS = ("debootstrap", "systemd-nspawn", "nsenter", "mount", "sipp", "dpkg-deb",
              "espeak-ng", "sox")


@pytest.fixture(scope="session")
def host_ready() -> None:
    """Fail (not skip: the test was asked for) when the host cannot run it."""
    missing = [tool for tool in HOST_TOOLS if shutil.which(tool) is None]
    if os.geteuid() != 0 or missing:
        pytest.fail(f"the system test needs root and {', '.join(HOST_TOOLS)}; "
                    f"uid {os.geteuid()}, missing: {', '.join(missing) or 'none'} "
                    "(make setup installs them)")


@pytest.fixture(scope="session")
def deb(host_ready: None, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``packaging/build-deb.sh DIR``: the package under test.

    ``$VOXGATE_SYSTEM_DEB`` names an already built one to test instead.
    """
    if given := os.environ.get("VOXGATE_SYSTEM_DEB"):
        return Path(given).resolve()
    out = tmp_path_factory.mktemp("dist")
    done = subprocess.run(["bash", str(REPO / "packaging" / "build-deb.sh"), str(out)],
                          capture_output=True, text=True, timeout=BUILD_TIMEOUT_S,
                          check=False)
    assert done.returncode == 0, done.stderr[-1500:]
    (path,) = out.glob("voxgate_*.deb")
    return path


@pytest.fixture(scope="session")
def clip(host_ready: None, tmp_path_factory: pytest.TempPathFactory) -> SpeechClip:
    """The speech clip SIPp streams (espeak-ng + sox on the host)."""
    return make_speech_clip(tmp_path_factory.mktemp("clip"))


@pytest.fixture(scope="session")
def system(deb: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Container]:
    """Debian 12 booted under systemd-nspawn, with the .deb copied to /root."""
    workdir = tmp_path_factory.mktemp("container")
    lower = cached_rootfs(deb_dependencies(deb), workdir / "debootstrap.log")
    with Container(lower, workdir, name=f"voxgate-system-{os.getpid()}") as container:
        container.copy_in(deb, "/root")
        yield container


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Attach the container's journal (and console) to a failed step's report."""
    report = yield
    container = getattr(item, "funcargs", {}).get("system")
    if report.failed and isinstance(container, Container):
        report.sections.append(("container journal", container.journal()))
        report.sections.append(("container console", container.boot_log()[-4000:]))
    return report
