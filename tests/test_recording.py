"""Call recordings: stereo WAV per call, flushed off the loop, disk budget, failures."""

from __future__ import annotations

import errno
import io
import logging
import math
import os
import struct
import wave
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
import trio.testing

from voxgate import recording
from voxgate.errors import LocalProtocolError
from voxgate.metrics import REGISTRY
from voxgate.pipeline.frames import SAMPLES_PER_FRAME
from voxgate.recording import (
    DIR_RETRY_S,
    STEREO_FRAME_BYTES,
    WAV_HEADER_BYTES,
    Recordings,
    interleave_stereo,
    recording_file_name,
)

NEVER_S = 3600.0
"""A flush interval no test reaches: flushes happen when a test calls flush()."""
BIG_BUFFER_BYTES = 100 * STEREO_FRAME_BYTES


def pcm(samples: list[int]) -> bytes:
    return struct.pack(f"<{len(samples)}h", *samples)


def samples_of(data: bytes) -> list[int]:
    return list(struct.unpack(f"<{len(data) // 2}h", data))


def ramp(frame_index: int) -> bytes:
    """Caller: a sawtooth, different in every frame and sample."""
    start = frame_index * SAMPLES_PER_FRAME
    return pcm([(start + i) * 37 % 65536 - 32768 for i in range(SAMPLES_PER_FRAME)])


def tone(frame_index: int) -> bytes:
    """Agent: a 440 Hz sine at 8 kHz."""
    start = frame_index * SAMPLES_PER_FRAME
    return pcm([round(20000 * math.sin(2 * math.pi * 440 * (start + i) / 8000))
                for i in range(SAMPLES_PER_FRAME)])


def read_wav(path: str | Path) -> tuple[tuple[int, int, int], list[int], list[int]]:
    """(channels, sample width, rate), left samples, right samples."""
    with wave.open(str(path), "rb") as wav:
        params = (wav.getnchannels(), wav.getsampwidth(), wav.getframerate())
        data = wav.readframes(wav.getnframes())
    both = samples_of(data)
    return params, both[0::2], both[1::2]


def metric(name: str) -> float:
    return REGISTRY.get_sample_value(name) or 0.0


def events(caplog: pytest.LogCaptureFixture, name: str) -> list[dict[str, object]]:
    return [fields for event, fields in
            (getattr(r, "voxgate_fields", ("", {})) for r in caplog.records) if event == name]


@asynccontextmanager
async def running(directory: Path, **kwargs: int | float) -> AsyncIterator[Recordings]:
    options: dict[str, int | float] = {
        "max_bytes": 10**9, "max_buffer_bytes": BIG_BUFFER_BYTES, "flush_interval_s": NEVER_S}
    options.update(kwargs)
    service = Recordings(str(directory), **options)  # type: ignore[arg-type]
    async with trio.open_nursery() as nursery:
        await nursery.start(service.run)
        yield service
        nursery.cancel_scope.cancel()


# --- the interleave, alone ---------------------------------------------------

def test_interleave_puts_left_and_right_samples_exactly():
    left = pcm([-32768, -1, 0, 1, 32767, 1234])
    right = pcm([32767, 0, -32768, 5, -5, -1234])
    out = samples_of(interleave_stereo(left, right))
    assert out[0::2] == samples_of(left)
    assert out[1::2] == samples_of(right)


def test_interleave_none_is_silence_and_short_side_is_padded():
    left = pcm([100, -200, 300])
    assert samples_of(interleave_stereo(left, None)) == [100, 0, -200, 0, 300, 0]
    assert samples_of(interleave_stereo(None, left)) == [0, 100, 0, -200, 0, 300]
    assert interleave_stereo(None, None) == bytes(STEREO_FRAME_BYTES)
    assert samples_of(interleave_stereo(left, pcm([7]))) == [100, 7, -200, 0, 300, 0]
    assert samples_of(interleave_stereo(left + b"\x01", pcm([7]))) == [100, 7, -200, 0, 300, 0]


def test_file_name_is_utc_start_and_safe_session_id():
    assert recording_file_name("a1b2", 86400 + 3661.9) == "19700102T010101Z-a1b2.wav"
    assert recording_file_name("../etc/x y", 0) == "19700101T000000Z-.._etc_x_y.wav"


def test_bad_sizes_are_refused(tmp_path):
    with pytest.raises(LocalProtocolError):
        Recordings(str(tmp_path), max_bytes=0, max_buffer_bytes=BIG_BUFFER_BYTES)
    with pytest.raises(LocalProtocolError):
        Recordings(str(tmp_path), max_bytes=1, max_buffer_bytes=STEREO_FRAME_BYTES - 1)
    with pytest.raises(LocalProtocolError):
        Recordings(str(tmp_path), max_bytes=1, max_buffer_bytes=BIG_BUFFER_BYTES,
                   flush_interval_s=0)


# --- the service -------------------------------------------------------------

async def test_caller_left_agent_right_and_path_returned(tmp_path):
    directory = tmp_path / "rec"
    async with running(directory) as service:
        recorder = service.start("s1", 0.0)
        assert recorder is not None
        for i in range(25):
            recorder.frame(ramp(i), tone(i))
        assert service.finish(recorder) == recorder.path
        await service.flush()
        assert recorder.bytes_written == 25 * STEREO_FRAME_BYTES
        assert service.stats.bytes_on_disk == WAV_HEADER_BYTES + 25 * STEREO_FRAME_BYTES
    assert recorder.path == str(directory / "19700101T000000Z-s1.wav")
    params, left, right = read_wav(recorder.path)
    assert params == (2, 2, 8000)
    assert left == samples_of(b"".join(ramp(i) for i in range(25)))
    assert right == samples_of(b"".join(tone(i) for i in range(25)))


async def test_file_is_playable_while_the_call_is_recording(tmp_path):
    async with running(tmp_path) as service:
        recorder = service.start("live", 0.0)
        assert recorder is not None
        for i in range(10):
            recorder.frame(ramp(i), tone(i))
        await service.flush()
        _, left, right = read_wav(recorder.path)
        assert left == samples_of(b"".join(ramp(i) for i in range(10)))
        assert right == samples_of(b"".join(tone(i) for i in range(10)))
        for i in range(10, 15):
            recorder.frame(ramp(i), tone(i))
        await service.flush()
        _, left, _ = read_wav(recorder.path)
        assert left == samples_of(b"".join(ramp(i) for i in range(15)))
        assert os.path.getsize(recorder.path) == WAV_HEADER_BYTES + 15 * STEREO_FRAME_BYTES


async def test_missing_frames_are_silence(tmp_path):
    async with running(tmp_path) as service:
        recorder = service.start("gaps", 0.0)
        assert recorder is not None
        recorder.frame(None, tone(0))
        recorder.frame(ramp(1), None)
        recorder.frame(None, None)
        service.finish(recorder)
    _, left, right = read_wav(recorder.path)
    silence = [0] * SAMPLES_PER_FRAME
    assert left == silence + samples_of(ramp(1)) + silence
    assert right == samples_of(tone(0)) + silence + silence


async def test_full_buffer_drops_and_counts_frames(tmp_path):
    dropped_before = metric("voxgate_recording_dropped_frames_total")
    async with running(tmp_path, max_buffer_bytes=3 * STEREO_FRAME_BYTES) as service:
        recorder = service.start("slow-disk", 0.0)
        assert recorder is not None
        for i in range(5):
            recorder.frame(ramp(i), tone(i))
        assert recorder.dropped_frames == 2
        assert service.stats.dropped_frames == 2
        await service.flush()
        assert metric("voxgate_recording_dropped_frames_total") - dropped_before == 2
        recorder.frame(ramp(5), tone(5))  # room again after the flush
        assert recorder.dropped_frames == 2
        service.finish(recorder)
    _, left, _ = read_wav(recorder.path)
    assert left == samples_of(ramp(0) + ramp(1) + ramp(2) + ramp(5))


async def test_no_audio_means_no_file_and_no_path(tmp_path):
    async with running(tmp_path) as service:
        recorder = service.start("silent", 0.0)
        assert recorder is not None
        assert service.finish(recorder) is None
        await service.flush()
    assert not os.path.exists(recorder.path)


def old_wav(directory: Path, name: str, size: int, mtime: float) -> Path:
    path = directory / name
    path.write_bytes(bytes(size))
    os.utime(path, (mtime, mtime))
    return path


async def test_disk_budget_deletes_oldest_closed_never_open(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="voxgate")
    old1 = old_wav(tmp_path, "old1.wav", 1000, 1000)
    old2 = old_wav(tmp_path, "old2.wav", 1000, 3000)
    old3 = old_wav(tmp_path, "old3.wav", 1000, 2000)
    (tmp_path / "notes.txt").write_bytes(bytes(5000))  # not a recording: not counted
    audio_bytes = 10 * STEREO_FRAME_BYTES
    async with running(tmp_path, max_bytes=2500) as service:
        assert [p.exists() for p in (old1, old3, old2)] == [False, True, True]
        assert service.stats.bytes_on_disk == 2000

        first = service.start("first", 10.0)
        assert first is not None
        for i in range(10):
            first.frame(ramp(i), tone(i))
        await service.flush()
        assert not old3.exists() and not old2.exists()
        assert os.path.exists(first.path)  # open: over budget on its own, kept
        assert service.stats.bytes_on_disk == WAV_HEADER_BYTES + audio_bytes

        service.finish(first)
        second = service.start("second", 20.0)
        assert second is not None
        for i in range(10):
            second.frame(ramp(i), tone(i))
        await service.flush()
        assert not os.path.exists(first.path)
        assert os.path.exists(second.path)
        assert service.stats.deleted_files == 4
        assert service.stats.bytes_on_disk == WAV_HEADER_BYTES + audio_bytes
        assert metric("voxgate_recordings_bytes_on_disk") == WAV_HEADER_BYTES + audio_bytes
    deleted = [Path(str(e["path"])).name for e in events(caplog, "recording_deleted")]
    assert deleted == ["old1.wav", "old3.wav", "old2.wav", Path(first.path).name]


async def test_undeletable_file_is_counted_and_left_alone(tmp_path, monkeypatch, caplog):
    stuck = old_wav(tmp_path, "stuck.wav", 1000, 1000)
    old_wav(tmp_path, "next.wav", 1000, 2000)
    real_remove = os.remove

    def remove(path: str) -> None:
        if path == str(stuck):
            raise PermissionError(errno.EPERM, "Operation not permitted", path)
        real_remove(path)

    monkeypatch.setattr(os, "remove", remove)
    async with running(tmp_path, max_bytes=1500) as service:
        assert stuck.exists() and (tmp_path / "next.wav").exists()
        assert service.stats.write_errors == 1
        assert service.stats.deleted_files == 0
        await service.flush()  # given up on, not retried
        assert service.stats.write_errors == 1
    assert [e["error"] for e in events(caplog, "recording_delete_failed")] == [
        "EPERM: Operation not permitted"]


async def test_write_error_stops_that_recording_only(tmp_path, monkeypatch, caplog):
    real_write = recording._WavSink.write
    full: set[str] = set()

    def write(sink: recording._WavSink, stereo_pcm: bytes) -> None:
        if sink.path in full:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(sink, stereo_pcm)

    monkeypatch.setattr(recording._WavSink, "write", write)
    errors_before = metric("voxgate_recording_errors_total")
    async with running(tmp_path) as service:
        doomed, fine, stillborn = (service.start(name, 0.0) for name in ("a", "b", "c"))
        assert doomed is not None and fine is not None and stillborn is not None
        for rec in (doomed, fine, stillborn):
            rec.frame(ramp(0), tone(0))
        full.add(stillborn.path)
        await service.flush()
        full.add(doomed.path)
        for rec in (doomed, fine):
            rec.frame(ramp(1), tone(1))
        await service.flush()

        assert doomed.failed == "ENOSPC: No space left on device"
        assert stillborn.failed == "ENOSPC: No space left on device"
        assert fine.failed is None
        assert service.stats.write_errors == 2
        assert metric("voxgate_recording_errors_total") - errors_before == 2
        doomed.frame(ramp(2), tone(2))  # ignored, never raises
        fine.frame(ramp(2), tone(2))
        assert service.finish(doomed) == doomed.path  # what reached the file stays usable
        assert service.finish(stillborn) is None
        assert service.finish(fine) == fine.path
    assert not os.path.exists(stillborn.path)
    _, left, _ = read_wav(doomed.path)
    assert left == samples_of(ramp(0))
    _, left, _ = read_wav(fine.path)
    assert left == samples_of(ramp(0) + ramp(1) + ramp(2))
    failed = events(caplog, "recording_failed")
    assert sorted(str(e["session_id"]) for e in failed) == ["a", "c"]


async def test_unusable_directory_turns_recording_off_then_retries(tmp_path, caplog,
                                                                   mock_clock):
    blocker = tmp_path / "file"
    blocker.write_text("a regular file where a directory should be")
    directory = blocker / "rec"
    async with running(directory) as service:
        assert service.start("s1", 0.0) is None
        await service.flush()
        assert service.start("s2", 0.0) is None
        mock_clock.jump(DIR_RETRY_S)
        await service.flush()  # tried again, still unusable: not logged again
        assert service.start("s3", 0.0) is None
        assert len(events(caplog, "recording_dir_unusable")) == 1

        blocker.unlink()
        mock_clock.jump(DIR_RETRY_S)
        await service.flush()
        recorder = service.start("s4", 0.0)
        assert recorder is not None
        recorder.frame(ramp(0), tone(0))
        service.finish(recorder)
    assert read_wav(recorder.path)[1] == samples_of(ramp(0))


async def test_off_before_run_and_after_it(tmp_path):
    service = Recordings(str(tmp_path), max_bytes=10**6, max_buffer_bytes=BIG_BUFFER_BYTES)
    assert service.start("early", 0.0) is None
    async with trio.open_nursery() as nursery:
        await nursery.start(service.run)
        assert service.start("during", 0.0) is not None
        nursery.cancel_scope.cancel()
    assert service.start("late", 0.0) is None


async def test_cancellation_flushes_and_closes_open_recordings(tmp_path):
    async with running(tmp_path) as service:
        recorder = service.start("drained", 0.0)
        assert recorder is not None
        for i in range(20):
            recorder.frame(ramp(i), tone(i))
    recorder.frame(ramp(20), tone(20))  # after shutdown: ignored
    assert recorder.bytes_written == 20 * STEREO_FRAME_BYTES
    assert service.finish(recorder) == recorder.path
    _, left, right = read_wav(recorder.path)
    assert left == samples_of(b"".join(ramp(i) for i in range(20)))
    assert right == samples_of(b"".join(tone(i) for i in range(20)))


async def wait_until(check: Callable[[], object]) -> None:
    with trio.fail_after(30):  # a hang guard, not a timing assertion
        while not check():  # noqa: ASYNC110 - polls what the writer thread has done
            await trio.sleep(0.01)


async def test_run_flushes_every_interval(tmp_path):
    async with running(tmp_path, flush_interval_s=0.05) as service:
        recorder = service.start("periodic", 0.0)
        assert recorder is not None
        recorder.frame(ramp(0), tone(0))
        await wait_until(lambda: recorder.bytes_written == STEREO_FRAME_BYTES)
        assert read_wav(recorder.path)[2] == samples_of(tone(0))


def test_wav_header_size_is_what_wave_writes():
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as wav:
        wav.setnchannels(2)
        wav.setsampwidth(2)
        wav.setframerate(8000)
        wav.writeframes(bytes(STEREO_FRAME_BYTES))
    assert len(buffer.getvalue()) == WAV_HEADER_BYTES + STEREO_FRAME_BYTES
