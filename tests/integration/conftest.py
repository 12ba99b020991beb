"""Fixtures for the tests that drive the real daemon with real peers."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.harness import missing_tools
from tests.harness.audio import SpeechClip, make_speech_clip
from tests.harness.daemon import ConfigOverrides, Daemon, PortRange, running_daemon
from tests.harness.daemon import reserve_port_range as _reserve

StartDaemon = Callable[..., Daemon]
"""``start_daemon(overrides=None, *, rtp_ports=100, env=None)`` → a ready :class:`Daemon`."""


@pytest.fixture(scope="session")
def clip(tmp_path_factory: pytest.TempPathFactory) -> SpeechClip:
    """The speech clip, synthesised once per test session."""
    missing = missing_tools("espeak-ng", "sox")
    if missing:
        pytest.skip(f"missing {', '.join(missing)} (apt-get install espeak-ng sox)")
    return make_speech_clip(tmp_path_factory.mktemp("clip"))


@pytest.fixture
def start_daemon(tmp_path: Path) -> Iterator[StartDaemon]:
    """Runs voxgated for this test; every one started is killed at teardown."""
    started = 0
    with contextlib.ExitStack() as stack:

        def start(
            overrides: ConfigOverrides | None = None,
            *,
            rtp_ports: int = 100,
            env: dict[str, str] | None = None,
        ) -> Daemon:
            nonlocal started
            started += 1
            workdir = tmp_path / f"daemon{started}"
            return stack.enter_context(
                running_daemon(workdir, overrides, rtp_ports=rtp_ports, env=env)
            )

        yield start


@pytest.fixture
def reserve_ports() -> Iterator[Callable[[int], PortRange]]:
    """``reserve_ports(count)``: a free UDP port range, released after the test."""
    ranges: list[PortRange] = []

    def reserve(count: int) -> PortRange:
        ranges.append(_reserve(count))
        return ranges[-1]

    yield reserve
    for r in ranges:
        r.release()
