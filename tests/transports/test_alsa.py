"""ALSA lines: the device wrapper, the media leg and the line driver.

The driver runs with a real MediaClock, AdmissionDesk and Registry. Devices
are either ALSA's ``file`` plugin (capture from a raw file, playback into
one; skipped without pyalsaaudio) or fakes that implement ``LinePcms``.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import socket
import struct
import sys
import types
from collections import deque
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from voxgate.admission import Admission, limits_from_config
from voxgate.admission_desk import AdmissionDesk
from voxgate.backoff import Backoff
from voxgate.calls import Calls
from voxgate.config import AlsaConfig, AlsaLineConfig, Config, LimitsConfig
from voxgate.control.cli import render_devices
from voxgate.control.devices import alsa_names, devices_command
from voxgate.control.server import CommandError
from voxgate.pipeline.clock import MediaClock
from voxgate.pipeline.frames import PCM_FRAME_BYTES as FRAME_BYTES
from voxgate.pipeline.playback import DRAINED
from voxgate.registry import Registry
from voxgate.session import SessionCore
from voxgate.transports.alsa import (
    DEVICE_LOST,
    AlsaLeg,
    AlsaLines,
)
from voxgate.transports.alsa_device import AlsaLineDevice, DeviceLost, LinePcms


def require_alsaaudio() -> None:
    pytest.importorskip("alsaaudio", reason="pyalsaaudio is not installed "
                        "(pip install pyalsaaudio; building it needs libasound2-dev)")


def numbered_clip(frames: int) -> bytes:
    """``frames`` 20 ms frames of 8 kHz PCM16; frame i holds the sample value 100 * (i + 1)."""
    return b"".join(struct.pack("<h", 100 * (i + 1)) * 160 for i in range(frames))


@pytest.fixture
def file_plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An asoundrc with ``voxcap`` (reads capture.raw) and ``voxplay`` (writes out.raw);
    their ``hint`` makes ``pyalsaaudio.pcms()`` list them."""
    require_alsaaudio()
    (tmp_path / "capture.raw").write_bytes(numbered_clip(150))
    rc = tmp_path / "asoundrc"
    rc.write_text(
        "pcm.voxcap {\n  type file\n  slave.pcm { type null }\n"
        f'  file "/dev/null"\n  infile "{tmp_path}/capture.raw"\n  format "raw"\n'
        "  hint { show on }\n}\n"
        "pcm.voxplay {\n  type file\n  slave.pcm { type null }\n"
        f'  file "{tmp_path}/out.raw"\n  format "raw"\n  hint {{ show on }}\n}}\n'
    )
    monkeypatch.setenv("ALSA_CONFIG_PATH", str(rc))
    return tmp_path


def make_config(*lines: AlsaLineConfig, retry_initial_s: float = 1.0,
                retry_max_s: float = 8.0, max_sessions: int = 10, queue_size: int = 0) -> Config:
    return Config(
        alsa=AlsaConfig(lines=lines, retry_initial_s=retry_initial_s, retry_max_s=retry_max_s),
        limits=LimitsConfig(max_sessions=max_sessions, queue_size=queue_size),
    )


def line(name: str = "door", mode: str = "always", **kw) -> AlsaLineConfig:
    return AlsaLineConfig(name=name, capture="voxcap", playback="voxplay", mode=mode, **kw)


class Harness:
    """A running AlsaLines with its clock, desk and registry."""

    def __init__(self, config: Config, open_device=None) -> None:
        self.clock = MediaClock()
        self.desk = AdmissionDesk(Admission(limits_from_config(config)), lambda task: None)
        self.registry = Registry()
        self.check_ins: list[str] = []
        self.calls = Calls(config, self.desk, self.registry, self.clock)
        self.lines = AlsaLines(config, self.calls, check_in=self.check_ins.append,
                               open_device=open_device)

    async def start(self, nursery: trio.Nursery) -> None:
        await nursery.start(self.clock.run)
        await nursery.start(self.desk.run)
        await nursery.start(self.calls.run)
        await nursery.start(self.lines.run)

    def line(self, name: str = "door") -> dict[str, Any]:
        return next(info for info in self.lines.lines() if info["name"] == name)

    async def wait_for(self, predicate, timeout_s: float = 5.0) -> None:
        with trio.fail_after(timeout_s):
            while not predicate():  # noqa: ASYNC110 - polls what the driver shows
                await trio.sleep(0.01)


class FakeDevice:
    """A LinePcms in memory: capture from a list of periods, playback into a list."""

    def __init__(self, rate_hz: int = 8000, period_ms: int = 20, poll_fd: int | None = None,
                 capture: list[bytes] | None = None) -> None:
        self.rate_hz = rate_hz
        self.period_bytes = rate_hz * period_ms // 1000 * 2
        self.xruns_capture = 0
        self.xruns_playback = 0
        self._poll_fd = poll_fd
        self.capture: deque[bytes] = deque(capture or ())
        self.endless = capture is None
        self.written: list[bytes] = []
        self.played_bytes: int | None = None  # None: drains at once
        self.clears = 0
        self.started = 0
        self.closed = False
        self.reads = 0

    @property
    def capture_poll_fd(self) -> int | None:
        return self._poll_fd

    def start(self) -> None:
        self.started += 1

    def read(self) -> bytes | None:
        self.reads += 1
        if self.capture:
            return self.capture.popleft()
        return bytes(self.period_bytes) if self.endless else None

    def write(self, pcm: bytes) -> int:
        self.written.append(pcm)
        return len(pcm)

    def playback_queued_bytes(self) -> int:
        written = sum(map(len, self.written))
        return 0 if self.played_bytes is None else written - self.played_bytes

    def clear_playback(self) -> None:
        self.clears += 1

    def close(self) -> None:
        self.closed = True


class FailingDevice:
    """Wraps a LinePcms; its ``fail_after``-th read raises DeviceLost (an unplug)."""

    def __init__(self, inner: LinePcms, fail_after: int) -> None:
        self.inner = inner
        self.fail_after = fail_after
        self.rate_hz = inner.rate_hz
        self.period_bytes = inner.period_bytes
        self.xruns_capture = self.xruns_playback = 0

    @property
    def capture_poll_fd(self) -> int | None:
        return self.inner.capture_poll_fd

    def start(self) -> None:
        self.inner.start()

    def read(self) -> bytes | None:
        self.fail_after -= 1
        if self.fail_after <= 0:
            raise DeviceLost("voxcap: No such device")
        return self.inner.read()

    def write(self, pcm: bytes) -> int:
        return self.inner.write(pcm)

    def playback_queued_bytes(self) -> int:
        return self.inner.playback_queued_bytes()

    def clear_playback(self) -> None:
        self.inner.clear_playback()

    def close(self) -> None:
        self.inner.close()


class SteppedLeg:
    """An AlsaLeg driven as its session drives it: ``tick`` is the pipeline's step."""

    def __init__(self, leg: AlsaLeg, core: SessionCore) -> None:
        self.leg = leg
        self.core = core

    def tick(self, now: float, frames_elapsed: int) -> bool:
        return self.core.pipeline.step(self.leg, now, frames_elapsed)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.leg, name)


def make_leg(device: LinePcms, period_ms: int = 20,
             lost: list[DeviceLost] | None = None) -> tuple[SteppedLeg, SessionCore]:
    core = SessionCore.build(Config(), "alsa", 0.0)
    leg = AlsaLeg(device=device, playback=core.pipeline.playback, budget=core.budget,
                  period_ms=period_ms, on_lost=(lost if lost is not None else []).append)
    return SteppedLeg(leg, core), core


def alsa_line_events(caplog: pytest.LogCaptureFixture) -> list[tuple[str, str | None]]:
    events = []
    for record in caplog.records:
        event, fields = getattr(record, "voxgate_fields", (None, {}))
        if event == "alsa_line":
            assert isinstance(fields, dict)
            events.append((fields["state"], fields.get("reason")))
    return events


# --- the device wrapper (AlsaLineDevice over fake pyalsaaudio PCMs) -----------------------

class FakeAlsaError(Exception):
    pass


FAKE_ALSAAUDIO = types.SimpleNamespace(ALSAAudioError=FakeAlsaError)


class FakePcm:
    def __init__(self, fd: int, reads: Any = (), writes: Any = (),
                 avail: tuple[int, ...] = (640,)) -> None:
        self.fd = fd
        self.reads = deque(reads)
        self.write_results = deque(writes)
        self.avails: deque[int] = deque(avail)
        self.written: list[bytes] = []
        self.drops = 0
        self.closed = 0

    def info(self) -> dict[str, int]:
        return {"buffer_size": 640}

    def polldescriptors(self) -> list[tuple[int, int]]:
        return [(self.fd, 1)]

    def cardname(self) -> str:
        return "fake"

    def read(self):
        result = self.reads.popleft()
        if isinstance(result, Exception):
            raise result
        return result

    def write(self, data: bytes) -> int:
        self.written.append(bytes(data))
        return int(self.write_results.popleft()) if self.write_results else len(data) // 2

    def avail(self) -> int:
        return self.avails.popleft() if len(self.avails) > 1 else self.avails[0]

    def drop(self) -> int:
        self.drops += 1
        return 0

    def close(self) -> None:
        self.closed += 1


@pytest.fixture
def null_fd():
    fd = os.open("/dev/null", os.O_RDONLY)
    yield fd
    os.close(fd)


def fake_device(capture: FakePcm, playback: FakePcm) -> AlsaLineDevice:
    return AlsaLineDevice(FAKE_ALSAAUDIO, capture, playback, rate_hz=8000, period_frames=160)


def test_device_counts_and_recovers_overruns(null_fd):
    capture = FakePcm(null_fd, reads=[(-errno.EPIPE, b""), (0, b""), (160, b"x" * 320)])
    device = fake_device(capture, FakePcm(null_fd))
    assert device.read() is None
    assert device.xruns_capture == 1
    assert device.read() is None
    assert device.xruns_capture == 1
    assert device.read() == b"x" * 320


def test_device_underrun_prefills_and_retries_the_write(null_fd):
    playback = FakePcm(null_fd, writes=[-errno.EPIPE])
    device = fake_device(FakePcm(null_fd), playback)
    assert device.write(b"\x01" * 320) == 320
    assert device.xruns_playback == 1
    assert playback.written == [b"\x01" * 320, bytes(640), b"\x01" * 320]


def test_device_full_buffer_takes_less(null_fd):
    playback = FakePcm(null_fd, writes=[0, 80])
    device = fake_device(FakePcm(null_fd), playback)
    assert device.write(b"\x01" * 320) == 0
    assert device.write(b"\x01" * 320) == 160


def test_device_errors_become_device_lost(null_fd):
    capture = FakePcm(null_fd, reads=[FakeAlsaError("No such device [hw:1,0]")])
    device = fake_device(capture, FakePcm(null_fd, avail=(-errno.ENODEV,)))
    with pytest.raises(DeviceLost, match="No such device"):
        device.read()
    with pytest.raises(DeviceLost, match="ENODEV"):
        device.playback_queued_bytes()


def test_device_queued_bytes_from_avail(null_fd):
    playback = FakePcm(null_fd, avail=(160, -errno.EPIPE, 640))
    device = fake_device(FakePcm(null_fd), playback)
    assert device.playback_queued_bytes() == (640 - 160) * 2
    assert device.playback_queued_bytes() == 0  # under-run: nothing left
    assert device.playback_queued_bytes() == 0


def test_device_start_clear_and_close(null_fd):
    capture, playback = FakePcm(null_fd), FakePcm(null_fd)
    device = fake_device(capture, playback)
    device.start()
    assert (capture.drops, playback.drops) == (1, 1)
    assert playback.written == [bytes(640)]
    device.clear_playback()
    assert playback.drops == 2
    device.close()
    assert (capture.closed, playback.closed) == (1, 1)


def test_poll_fd_only_when_epoll_accepts_it(null_fd):
    a, b = socket.socketpair()
    with a, b:
        assert fake_device(FakePcm(a.fileno()), FakePcm(null_fd)).capture_poll_fd == a.fileno()
    assert fake_device(FakePcm(null_fd), FakePcm(null_fd)).capture_poll_fd is None


def test_open_unknown_pcm_is_device_lost(file_plugin):
    with pytest.raises(DeviceLost, match="nosuch"):
        AlsaLineDevice.open("nosuch", "voxplay", 8000, 20)


def test_file_plugin_device_is_timer_paced(file_plugin):
    device = AlsaLineDevice.open("voxcap", "voxplay", 8000, 20)
    try:
        assert device.capture_poll_fd is None
        assert device.period_bytes == 320
        assert device.read() == numbered_clip(1)
        assert device.write(b"\x01\x00" * 160) == 320
        assert device.playback_queued_bytes() == 0  # the file plugin drains at once
    finally:
        device.close()
        device.close()


# --- the media leg -------------------------------------------------------------------------

def test_leg_feeds_one_period_per_tick_and_writes_one_frame():
    device = FakeDevice(capture=[numbered_clip(3)[i * 320:(i + 1) * 320] for i in range(3)])
    leg, core = make_leg(device)
    assert leg.timer_paced
    assert leg.tick(0.02, 1)
    assert device.reads == 1
    # The echo agent hands the frame straight back.
    assert device.written == [numbered_clip(1)]
    assert leg.tick(0.08, 3)  # late by two frames: reads and feeds three
    assert device.reads == 3 + 1
    assert leg.frames_in == 3
    assert not leg.tick(0.10, 1)  # nothing captured
    assert leg.counters()["frames_out"] == 3


def test_leg_catches_up_with_a_device_behind_the_clock():
    device = FakeDevice(capture=[])
    leg, _ = make_leg(device)
    assert not leg.tick(0.02, 1)
    device.capture.extend([bytes(320)] * 3)
    assert leg.tick(0.04, 1)
    assert leg.periods_in == 2  # this tick's period and the one missed


def test_leg_paces_other_periods_by_its_own_deadline():
    device = FakeDevice(period_ms=30)
    leg, _ = make_leg(device, period_ms=30)
    reads = []
    for i in range(6):
        leg.tick(0.02 * (i + 1), 1)
        reads.append(device.reads)
    assert reads == [0, 1, 2, 2, 3, 4]  # one 30 ms period per 30 ms of ticks
    assert leg.frames_in == 5  # one frame per tick from the second on
    assert leg.periods_in == 4


def test_leg_resamples_a_16khz_line():
    device = FakeDevice(rate_hz=16000)
    leg, _ = make_leg(device)
    for i in range(5):
        leg.tick(0.02 * (i + 1), 1)
    assert leg.frames_in >= 4
    assert all(630 <= len(w) <= 650 for w in device.written[1:])


def test_leg_completes_an_utterance_when_the_device_drained():
    device = FakeDevice(capture=[])
    leg, core = make_leg(device)
    core.playout.say([b"\x01\x00" * 160] * 2)  # 640 bytes
    device.played_bytes = 0
    for i in range(3):
        leg.tick(0.02 * (i + 1), 1)
    playback = core.pipeline.playback
    assert playback.playing  # written, but the device still holds it
    device.played_bytes = 639
    leg.tick(0.08, 1)
    assert playback.playing  # its last sample is not played yet
    device.played_bytes = 640
    leg.tick(0.10, 1)
    assert not playback.playing
    assert playback.completed == {DRAINED: 1}


def test_leg_clears_the_device_on_barge_in():
    device = FakeDevice(capture=[])
    leg, core = make_leg(device)
    core.pipeline.cleared = True
    leg.tick(0.02, 1)
    assert device.clears == 1
    assert not core.pipeline.cleared
    assert leg.counters()["playback_clears"] == 1


def test_leg_device_lost_closes_and_reports_once():
    lost: list[DeviceLost] = []
    device = FakeDevice()
    leg, _ = make_leg(FailingDevice(device, fail_after=2), lost=lost)
    assert leg.tick(0.02, 1)
    assert not leg.tick(0.04, 1)
    assert not leg.tick(0.06, 1)
    assert len(lost) == 1
    assert device.closed
    assert leg.lost is lost[0]


def test_leg_budget_holds_the_captured_backlog():
    device = FakeDevice(capture=[numbered_clip(4)])  # one read: four frames at once
    leg, core = make_leg(device)
    leg.tick(0.02, 1)
    assert core.budget.held_bytes["jitter"] == 3 * FRAME_BYTES
    leg.close()
    assert core.budget.held_bytes["jitter"] == 0


async def test_leg_reads_capture_on_poll_wakeups():
    a, b = socket.socketpair()
    with a, b:
        a.setblocking(False)

        class PolledDevice(FakeDevice):
            def read(self) -> bytes | None:
                try:
                    a.recv(1)
                except BlockingIOError:
                    return None
                return bytes(320)

        device = PolledDevice(poll_fd=a.fileno())
        leg, _ = make_leg(device)
        assert not leg.timer_paced
        async with trio.open_nursery() as nursery:
            nursery.start_soon(leg.run_capture)
            await trio.testing.wait_all_tasks_blocked()
            b.send(b"xx")
            await trio.testing.wait_all_tasks_blocked()
            assert leg.periods_in == 2
            assert leg.tick(0.02, 1)  # no read in the tick: the queue feeds it
            assert leg.frames_in == 1
            leg.close()
        assert device.closed


async def test_leg_falls_back_to_timer_when_epoll_refuses(null_fd):
    leg, _ = make_leg(FakeDevice(poll_fd=null_fd, capture=[]))
    assert not leg.timer_paced
    await leg.run_capture()
    assert leg.timer_paced


# --- the driver ------------------------------------------------------------------------------

def test_backoff_doubles_up_to_the_cap():
    backoff = Backoff()
    assert [backoff.delay_s(1.0, 8.0) for _ in range(6)] == [1, 2, 4, 8, 8, 8]
    backoff.reset()
    assert backoff.delay_s(0.5, 8.0) == 0.5


async def test_file_plugin_line_echoes_the_capture_paced(file_plugin):
    h = Harness(make_config(line()))
    out = file_plugin / "out.raw"
    async with trio.open_nursery() as nursery:
        await h.start(nursery)
        await h.wait_for(lambda: out.exists() and out.stat().st_size > 0)
        start_size, start = out.stat().st_size, trio.current_time()
        await trio.sleep(1.0)
        grown, elapsed = out.stat().st_size - start_size, trio.current_time() - start
        assert h.line()["state"] == "active"
        assert len(h.registry) == 1
        [summary] = h.registry.sessions()
        assert summary["transport"] == "alsa"
        nursery.cancel_scope.cancel()
    # Paced: about 16 000 bytes a second, not the whole clip at once.
    assert 0.8 * 16000 * elapsed <= grown <= 1.2 * 16000 * elapsed + 1280
    data = out.read_bytes()
    echoed = data.lstrip(b"\x00")
    frames = len(echoed) // FRAME_BYTES
    assert frames >= 40
    # Every frame came back whole and in order.
    assert echoed[:frames * FRAME_BYTES] == numbered_clip(150)[:frames * FRAME_BYTES]
    assert h.check_ins.count("alsa") >= 1
    assert len(h.registry) == 0


async def test_device_lost_ends_the_session_and_the_line_backs_off(
        file_plugin, autojump_clock, caplog):
    caplog.set_level(logging.INFO, logger="voxgate")
    opens: list[float] = []

    def open_device(cfg: AlsaLineConfig) -> LinePcms:
        opens.append(trio.current_time())
        if len(opens) == 1:
            return FailingDevice(AlsaLineDevice.open(cfg.capture, cfg.playback, 8000, 20), 10)
        if len(opens) <= 4:
            raise DeviceLost("cannot open voxcap/voxplay: No such device")
        return AlsaLineDevice.open(cfg.capture, cfg.playback, 8000, 20)

    h = Harness(make_config(line(), retry_initial_s=1.0, retry_max_s=4.0), open_device)
    async with trio.open_nursery() as nursery:
        await h.start(nursery)
        await h.wait_for(lambda: len(opens) == 5 and h.line()["state"] == "active", 60)
        nursery.cancel_scope.cancel()
    info = h.line()
    assert info["last_end_reason"] == DEVICE_LOST
    assert info["stats"]["device_lost"] == 1
    assert info["stats"]["open_failures"] == 3
    assert info["stats"]["retries"] == 4
    gaps = [round(b - a, 1) for a, b in itertools.pairwise(opens[1:])]
    assert gaps == [2.0, 4.0, 4.0]
    assert opens[1] - opens[0] == pytest.approx(0.2 + 1.0, abs=0.05)
    # Logged once per state change, not per try.
    assert alsa_line_events(caplog) == [
        ("active", None), ("retrying", DEVICE_LOST), ("retrying", "open-failed"), ("active", None),
    ]


async def test_on_demand_line_start_and_stop(autojump_clock):
    devices: list[FakeDevice] = []

    def open_device(cfg: AlsaLineConfig) -> LinePcms:
        devices.append(FakeDevice())
        return devices[-1]

    h = Harness(make_config(line(mode="on-demand"), line("lobby")), open_device)
    async with trio.open_nursery() as nursery:
        await h.start(nursery)
        await h.wait_for(lambda: h.line("lobby")["state"] == "active")
        assert h.line()["state"] == "idle"
        assert len(h.registry) == 1
        reply = await h.lines.line_command({"action": "start", "name": "door"})
        assert reply == {"message": "line door starting"}
        await h.wait_for(lambda: h.line()["state"] == "active")
        assert len(h.registry) == 2
        assert "already started" in h.lines.start_line("door")
        reply = await h.lines.line_command({"action": "stop", "name": "door"})
        assert reply == {"message": "line door stopping"}
        await h.wait_for(lambda: h.line()["state"] == "idle")
        assert h.line()["last_end_reason"] == "operator"
        assert len(h.registry) == 1
        assert h.lines.stop_line("door") == "line door is not started"
        await trio.sleep(5)
        assert h.line()["state"] == "idle"  # not restarted
        nursery.cancel_scope.cancel()
    assert all(d.closed for d in devices)
    assert devices[0].started == 1


async def test_on_demand_session_ends_when_the_agent_hangs_up(autojump_clock):
    h = Harness(make_config(line(mode="on-demand")), lambda cfg: FakeDevice())
    async with trio.open_nursery() as nursery:
        await h.start(nursery)
        h.lines.start_line("door")
        await h.wait_for(lambda: h.line()["state"] == "active")
        [summary] = h.registry.sessions()
        h.registry.hangup(str(summary["id"]), "agent-hangup")
        await h.wait_for(lambda: h.line()["state"] == "idle")
        nursery.cancel_scope.cancel()
    assert h.line()["last_end_reason"] == "agent-hangup"


async def test_line_command_errors():
    h = Harness(make_config(line(mode="on-demand"), line("lobby")), lambda cfg: FakeDevice())
    with pytest.raises(CommandError) as e:
        await h.lines.line_command({"action": "start", "name": "nope"})
    assert e.value.code == "not-found"
    with pytest.raises(CommandError) as e:
        await h.lines.line_command({"action": "stop", "name": "lobby"})
    assert e.value.code == "not-on-demand"
    with pytest.raises(CommandError) as e:
        await h.lines.line_command({"action": "pause", "name": "door"})
    assert e.value.code == "bad-args"
    with pytest.raises(CommandError) as e:
        await h.lines.line_command({"action": "start"})
    assert e.value.code == "bad-args"


async def test_refused_always_line_retries_with_backoff(autojump_clock):
    devices: list[FakeDevice] = []

    def open_device(cfg: AlsaLineConfig) -> LinePcms:
        devices.append(FakeDevice())
        return devices[-1]

    h = Harness(make_config(line()), open_device)
    h.desk.set_draining(True)
    async with trio.open_nursery() as nursery:
        await h.start(nursery)
        await trio.sleep(10)
        info = h.line()
        assert info["state"] == "retrying"
        assert info["reason"] == "refused"
        assert info["stats"]["refusals"] == 4  # at 0, 1, 3 and 7 s
        assert all(d.closed for d in devices)
        h.desk.set_draining(False)
        await h.wait_for(lambda: h.line()["state"] == "active", 20)
        nursery.cancel_scope.cancel()


async def test_queued_line_starts_when_a_slot_frees(autojump_clock):
    h = Harness(make_config(line("a", mode="on-demand"), line("b", mode="on-demand"),
                            max_sessions=1, queue_size=1), lambda cfg: FakeDevice())
    async with trio.open_nursery() as nursery:
        await h.start(nursery)
        h.lines.start_line("a")
        await h.wait_for(lambda: h.line("a")["state"] == "active")
        h.lines.start_line("b")
        await h.wait_for(lambda: h.line("b")["state"] == "queued")
        h.lines.stop_line("a")
        await h.wait_for(lambda: h.line("b")["state"] == "active")
        assert h.line("a")["state"] == "idle"
        # Stopped while queued: the queue forgets it.
        h.lines.start_line("a")
        await h.wait_for(lambda: h.line("a")["state"] == "queued")
        h.lines.stop_line("a")
        await h.wait_for(lambda: h.line("a")["state"] == "idle")
        assert h.desk.admission.statistics().queued == 0
        nursery.cancel_scope.cancel()


# --- voxgatectl devices (control/devices.py) -------------------------------------------------

def test_alsa_names_from_portaudio_names():
    assert alsa_names("HDA Intel PCH: ALC892 Analog (hw:0,0)", {0: "PCH"}) == (
        "hw:PCH,0", "plughw:PCH,0")
    assert alsa_names("USB Audio Device: - (hw:2,1)", {}) == ("hw:2,1", "plughw:2,1")
    assert alsa_names("default", {0: "PCH"}) == (None, None)


async def test_devices_lists_the_alsa_pcms(file_plugin):
    # PortAudio may abort its process on this minimal ALSA config: the probe's, not ours.
    rows = await devices_command({})
    pcms = {r["name"]: r for r in rows if r["kind"] == "pcm"}
    assert pcms["voxcap"]["capture"] and pcms["voxplay"]["playback"]
    for row in rows:
        assert row["kind"] in ("device", "pcm", "error")
        if row["kind"] == "device":
            assert {"name", "alsa", "alsa_plug", "inputs", "outputs"} <= row.keys()


async def test_always_line_restarts_at_once_unless_its_session_ended_at_once(autojump_clock):
    h = Harness(make_config(line()), lambda cfg: FakeDevice())
    async with trio.open_nursery() as nursery:
        await h.start(nursery)
        await h.wait_for(lambda: len(h.registry) == 1)
        await trio.sleep(5)
        [first] = h.registry.sessions()
        h.registry.hangup(str(first["id"]))
        ended_at = trio.current_time()
        await h.wait_for(lambda: len(h.registry) == 1
                         and h.registry.sessions()[0]["id"] != first["id"])
        assert trio.current_time() - ended_at < 0.1
        [second] = h.registry.sessions()
        h.registry.hangup(str(second["id"]))  # after no time at all: back off
        await h.wait_for(lambda: h.line()["state"] == "retrying")
        assert h.line()["reason"] == "operator"
        await h.wait_for(lambda: len(h.registry) == 1, 2)
        nursery.cancel_scope.cancel()
    assert h.line()["stats"]["sessions"] == 3


async def test_devices_survive_a_crashing_portaudio_probe(tmp_path, monkeypatch):
    crash = tmp_path / "crash"
    crash.write_text("#!/bin/sh\necho 'pcm.c:1: assertion failed' >&2\nkill -ABRT $$\n")
    crash.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(crash))
    rows = await devices_command({})
    [error] = [r for r in rows if r["kind"] == "error" and r["name"] == "sounddevice"]
    assert "SIGABRT" in error["detail"]
    assert "assertion failed" in error["detail"]


def test_voxgatectl_renders_an_empty_device_table_and_the_pcms():
    text = render_devices([
        {"kind": "pcm", "name": "null", "capture": True, "playback": True},
        {"kind": "error", "name": "sounddevice", "detail": "PortAudio library not found"},
    ])
    lines = text.splitlines()
    assert lines[0].split() == ["#", "NAME", "API", "IN", "OUT", "RATE", "ALSA", "ALSA",
                                "(CONVERTING)"]
    assert lines[1] == ""
    assert "null  yes      yes" in lines
    assert lines[-1] == "note: sounddevice: PortAudio library not found"
