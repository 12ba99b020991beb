"""``[records] recordings_dir``: one stereo WAV per call, written off the event loop.

Each call gets a :class:`Recorder` from :meth:`Recordings.start`. The media
clock's tick hands it the caller's inbound and the agent's outbound 20 ms
frame (:meth:`Recorder.frame`); it interleaves them (caller left, agent
right, :func:`interleave_stereo`) into a bounded bytearray with three
``audioop`` C calls and never touches the disk. One :class:`Recordings` task
per daemon (:meth:`Recordings.run`) wakes every ``flush_interval_s`` and, in a
worker thread behind one ``trio.CapacityLimiter(1)``, appends every buffer to
its file, closes finished recordings and keeps the directory under its disk
budget by deleting the oldest closed recordings.

The files are RIFF/WAVE PCM (2 channels, 16-bit, 8000 Hz), named
``<UTC yyyymmddTHHMMSSZ>-<session_id>.wav``, written with the stdlib
:mod:`wave` module on an unbuffered, seekable file: after each append
``Wave_write.writeframes`` patches the RIFF and ``data`` chunk sizes
(``wave._patchheader``), so a crash of the process leaves a playable file
holding the audio up to the last flush. The data is handed to the kernel but
not fsync'ed, so a power loss may lose more.

Failures stay inside the recording: any ``OSError`` creating, writing or
closing a file (ENOSPC, EROFS, EACCES, EMFILE …) stops that recording only
and is logged once (``recording_failed``); the call goes on.
"""

from __future__ import annotations

import contextlib
import errno
import io
import logging
import os
import re
import sys
import time
import warnings
import wave
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final, TypeVar

import trio
from prometheus_client import Counter, Gauge

from voxgate.errors import LocalProtocolError
from voxgate.logging import log_event
from voxgate.metrics import REGISTRY
from voxgate.pipeline.frames import PCM_FRAME_BYTES, RATE_HZ, SAMPLE_WIDTH_BYTES

with warnings.catch_warnings():
    # Python 3.11/3.12 deprecate audioop (PEP 594) with a DeprecationWarning at import.
    warnings.simplefilter("ignore", DeprecationWarning)
    import audioop

CHANNELS: Final = 2
"""Caller on channel 0 (left), agent on channel 1 (right)."""
STEREO_FRAME_BYTES: Final = CHANNELS * PCM_FRAME_BYTES
"""640 bytes: one 20 ms frame of the recording."""
WAV_HEADER_BYTES: Final = 44
"""RIFF header + ``fmt`` chunk + ``data`` chunk header that :mod:`wave` writes for PCM."""
FLUSH_GRACE_S: Final = 5.0
"""On cancellation, how long :meth:`Recordings.run` may spend flushing and closing."""
DIR_RETRY_S: Final = 5.0
"""How often an unusable recordings directory is tried again."""

BYTES_ON_DISK = Gauge(
    "voxgate_recordings_bytes_on_disk", "Bytes of *.wav in the recordings directory",
    registry=REGISTRY,
)
RECORDING_ERRORS = Counter(
    "voxgate_recording_errors", "OS errors creating, writing, closing or deleting recordings",
    registry=REGISTRY,
)
RECORDING_DROPPED_FRAMES = Counter(
    "voxgate_recording_dropped_frames",
    "20 ms frames left out of recordings because the recorder's buffer was full",
    registry=REGISTRY,
)

_NOT_IN_FILE_NAME = re.compile(r"[^A-Za-z0-9._-]")
_STEREO_SILENCE: Final = bytes(STEREO_FRAME_BYTES)
_NATIVE_IS_BIG_ENDIAN = sys.byteorder == "big"
_T = TypeVar("_T")


def interleave_stereo(left_pcm: bytes | None, right_pcm: bytes | None) -> bytes:
    """Two mono PCM16 signals as one stereo PCM16 signal (L R L R …).

    ``left_pcm``/``right_pcm`` are 16-bit signed little-endian mono samples
    (the pipeline's frames, :mod:`voxgate.pipeline.frames`); ``None`` is
    silence. The shorter side is padded with silence, a trailing odd byte is
    left out; both ``None`` gives one frame of silence (640 bytes). Samples
    are copied exactly (``audioop.tostereo`` with gains 1 and 0, then
    ``audioop.add``), so the byte order is kept whatever the machine's.
    Never raises.
    """
    if left_pcm is None:
        if right_pcm is None:
            return _STEREO_SILENCE
        return audioop.tostereo(_whole_samples(right_pcm), SAMPLE_WIDTH_BYTES, 0, 1)
    if right_pcm is None:
        return audioop.tostereo(_whole_samples(left_pcm), SAMPLE_WIDTH_BYTES, 1, 0)
    if len(left_pcm) != len(right_pcm) or len(left_pcm) & 1:
        size = max(len(left_pcm), len(right_pcm)) & ~1
        left_pcm = left_pcm[:size].ljust(size, b"\0")
        right_pcm = right_pcm[:size].ljust(size, b"\0")
    return audioop.add(audioop.tostereo(left_pcm, SAMPLE_WIDTH_BYTES, 1, 0),
                       audioop.tostereo(right_pcm, SAMPLE_WIDTH_BYTES, 0, 1),
                       SAMPLE_WIDTH_BYTES)


def _whole_samples(pcm: bytes) -> bytes:
    return pcm[:-1] if len(pcm) & 1 else pcm


def recording_file_name(session_id: str, started_at: float) -> str:
    """``<UTC yyyymmddTHHMMSSZ>-<session_id>.wav``; ``started_at`` in Unix seconds.

    Characters of ``session_id`` other than ``A-Z a-z 0-9 . _ -`` become
    ``_``, so the name never leaves the directory.
    """
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(started_at))
    return f"{stamp}-{_NOT_IN_FILE_NAME.sub('_', session_id)}.wav"


@dataclass(slots=True)
class RecordingStats:
    """Counters of one :class:`Recordings` service (plain ints, read live).

    Attributes:
        dropped_frames: 20 ms frames left out because a buffer was full.
        write_errors: OS errors creating, writing, closing or deleting files.
        deleted_files: recordings deleted to keep to ``max_bytes``.
        bytes_on_disk: size of the ``*.wav`` files as of the last flush.
    """

    dropped_frames: int = 0
    write_errors: int = 0
    deleted_files: int = 0
    bytes_on_disk: int = 0


class _WavSink:
    """The file side of one recording; only the writer thread touches it."""

    __slots__ = ("_file", "_wave", "closed", "data_bytes", "path", "size_bytes")

    def __init__(self, path: str) -> None:
        self.path = path
        self._file: io.FileIO | None = None
        self._wave: wave.Wave_write | None = None
        self.closed = False
        self.data_bytes = 0
        self.size_bytes = 0

    def write(self, stereo_pcm: bytes) -> None:
        """Append ``stereo_pcm`` (creating the file first); raises OSError."""
        if self._wave is None:
            # "x": never overwrite; unbuffered, so each writeframes reaches the kernel.
            self._file = open(self.path, "xb", buffering=0)  # noqa: SIM115 - closed in close()
            self._wave = wave.open(self._file, "wb")  # noqa: SIM115 - closed in close()
            self._wave.setnchannels(CHANNELS)
            self._wave.setsampwidth(SAMPLE_WIDTH_BYTES)
            self._wave.setframerate(RATE_HZ)
        if _NATIVE_IS_BIG_ENDIAN:  # wave swaps native samples to little-endian
            stereo_pcm = audioop.byteswap(stereo_pcm, SAMPLE_WIDTH_BYTES)
        self._wave.writeframes(stereo_pcm)
        self.data_bytes += len(stereo_pcm)
        self.size_bytes = WAV_HEADER_BYTES + self.data_bytes

    def close(self) -> None:
        """Patch the header and close; the file handle is released even on OSError."""
        if self.closed:
            return
        self.closed = True
        try:
            if self._wave is not None:
                self._wave.close()
        finally:
            if self._file is not None:
                self._file.close()

    def abort(self) -> None:
        """After an error: close quietly; a file with no audio in it is removed.

        ``size_bytes`` becomes what is really on disk (a failed write may have
        left part of its data after the last patched header).
        """
        with contextlib.suppress(OSError):
            self.close()
        if self._file is None:
            return
        with contextlib.suppress(OSError):
            if self.data_bytes:
                self.size_bytes = os.stat(self.path).st_size
            else:
                os.remove(self.path)
                self.size_bytes = 0


@dataclass(frozen=True, slots=True)
class _Job:
    sink: _WavSink
    stereo_pcm: bytes
    close: bool


@dataclass(frozen=True, slots=True)
class _Outcome:
    data_bytes: int
    size_bytes: int
    closed: bool
    error: OSError | None


def _write_jobs(jobs: Sequence[_Job]) -> list[_Outcome]:
    """Worker thread: append and close, one outcome per job; an OSError stops that sink."""
    outcomes = []
    for job in jobs:
        sink, error = job.sink, None
        try:
            if job.stereo_pcm and not sink.closed:
                sink.write(job.stereo_pcm)
            if job.close:
                sink.close()
        except OSError as exc:
            error = exc
            sink.abort()
        outcomes.append(_Outcome(sink.data_bytes, sink.size_bytes, sink.closed, error))
    return outcomes


def _scan_directory(directory: str) -> list[tuple[str, int]]:
    """Worker thread: create ``directory`` if missing; its ``*.wav`` as (path, bytes),
    oldest (modification time) first. Raises OSError when it cannot be written to."""
    os.makedirs(directory, exist_ok=True)
    if not os.access(directory, os.W_OK | os.X_OK):
        raise PermissionError(errno.EACCES, "not writable", directory)
    found = []
    with os.scandir(directory) as entries:
        for entry in entries:
            if entry.name.endswith(".wav") and entry.is_file(follow_symlinks=False):
                st = entry.stat(follow_symlinks=False)
                found.append((st.st_mtime, entry.path, st.st_size))
    found.sort()
    return [(path, size) for _, path, size in found]


def _delete_files(paths: Sequence[str]) -> list[OSError | None]:
    """Worker thread: remove each path; a file already gone counts as removed."""
    errors: list[OSError | None] = []
    for path in paths:
        try:
            os.remove(path)
        except FileNotFoundError:
            errors.append(None)
        except OSError as exc:
            errors.append(exc)
        else:
            errors.append(None)
    return errors


def _describe(exc: OSError) -> str:
    """``ENOSPC: No space left on device``."""
    name = errno.errorcode.get(exc.errno or 0, type(exc).__name__)
    return f"{name}: {exc.strerror or exc}"


class Recorder:
    """One call's recording; only touched from the event loop.

    Attributes:
        session_id: the call's session.
        path: the WAV file (created at the first flush that has audio).
        dropped_frames: frames left out because the buffer was full.
        failed: ``"ENOSPC: No space left on device"`` … once an OS error
            stopped the recording, else None.
        bytes_written: audio bytes (without the 44-byte header) in the file
            as of the last flush.
    """

    __slots__ = (
        "_buffer",
        "_closed",
        "_in_flight_bytes",
        "_max_buffer_bytes",
        "_open",
        "_sink",
        "_size_bytes",
        "_stats",
        "bytes_written",
        "dropped_frames",
        "failed",
        "path",
        "session_id",
        "tenant",
    )

    def __init__(self, session_id: str, path: str, max_buffer_bytes: int,
                 stats: RecordingStats, tenant: str = "default") -> None:
        self.session_id = session_id
        self.tenant = tenant
        self.path = path
        self.dropped_frames = 0
        self.failed: str | None = None
        self.bytes_written = 0
        self._max_buffer_bytes = max_buffer_bytes
        self._stats = stats
        self._buffer = bytearray()
        self._in_flight_bytes = 0
        """Taken from the buffer, not yet reported written: still counts against the bound."""
        self._size_bytes = 0
        """The file's size as of the last flush."""
        self._open = True
        """Takes frames: not finished, failed or shut down."""
        self._closed = False
        """The writer closed the file (or it was never created)."""
        self._sink = _WavSink(path)

    def frame(self, caller_pcm: bytes | None, agent_pcm: bytes | None) -> None:
        """One 20 ms tick: the caller's inbound and the agent's outbound frame.

        Each is PCM16 little-endian mono at 8 kHz (320 bytes); None where there
        was no frame is recorded as silence. When the buffer plus the bytes
        being written would exceed ``max_buffer_bytes`` the frame is dropped
        and counted, the buffer never grows past it. Ignored once the
        recording is finished or failed. Never raises, never blocks.
        """
        if not self._open:
            return
        stereo = interleave_stereo(caller_pcm, agent_pcm)
        if len(self._buffer) + self._in_flight_bytes + len(stereo) > self._max_buffer_bytes:
            self.dropped_frames += 1
            self._stats.dropped_frames += 1
            return
        self._buffer += stereo

    def _take(self) -> bytes:
        """The buffered audio, handed to the writer (counted as in flight)."""
        data = bytes(self._buffer)
        self._buffer = bytearray()
        self._in_flight_bytes += len(data)
        return data


class Recordings:
    """The recordings service, one per daemon: files, flushing and the disk budget.

    ``directory`` is created if missing; one directory per voxgate instance
    (a recording not opened by this process counts as closed and may be
    deleted). ``max_bytes`` bounds the ``*.wav`` in it: after each flush,
    while the total exceeds it, the oldest closed recordings (files found at
    start by modification time, then in the order they were closed) are
    deleted; open recordings are never deleted, so the total may stay above
    ``max_bytes`` while they alone exceed it. ``max_buffer_bytes`` bounds each
    recorder's buffer (stereo: 32 bytes per ms of call), ``flush_interval_s``
    is the period of the writes. The running total is kept in memory; the
    directory is listed only when it is (re)opened.

    Raises:
        LocalProtocolError: ``max_bytes`` ≤ 0, ``max_buffer_bytes`` smaller
            than one frame (640 bytes) or ``flush_interval_s`` ≤ 0.
    """

    def __init__(self, directory: str, *, max_bytes: int, max_buffer_bytes: int,
                 flush_interval_s: float = 1.0) -> None:
        if max_bytes <= 0:
            raise LocalProtocolError(f"recordings max_bytes must be > 0, got {max_bytes}")
        if max_buffer_bytes < STEREO_FRAME_BYTES:
            raise LocalProtocolError(
                f"recording max_buffer_bytes must be >= {STEREO_FRAME_BYTES}, "
                f"got {max_buffer_bytes}")
        if flush_interval_s <= 0:
            raise LocalProtocolError(f"flush_interval_s must be > 0, got {flush_interval_s}")
        self.directory = directory
        self.max_bytes = max_bytes
        self.max_buffer_bytes = max_buffer_bytes
        self.flush_interval_s = flush_interval_s
        self.stats = RecordingStats()
        self._recorders: list[Recorder] = []
        """Not yet closed: at most one per session plus those finished since the last flush."""
        self._closed_files: deque[tuple[str, int]] = deque()
        """(path, bytes) of closed recordings, oldest first; bounded by the disk budget."""
        self._closed_bytes = 0
        self._running = False
        self._usable = False
        self._unusable_logged = False
        self._retry_at = 0.0
        self._dropped_reported = 0
        self._limiter = trio.CapacityLimiter(1)
        self._flushing = trio.Lock()

    def start(self, session_id: str, started_at: float, *,
              tenant: str = "default") -> Recorder | None:
        """A recorder for a call (of ``tenant``) that started at ``started_at`` (Unix
        seconds, UTC).

        No I/O: the file is created by the next flush. Returns None when the
        service is off (:meth:`run` not started or ended) or the directory is
        unusable.
        """
        if not (self._running and self._usable):
            return None
        path = os.path.join(self.directory, recording_file_name(session_id, started_at))
        recorder = Recorder(session_id, path, self.max_buffer_bytes, self.stats, tenant)
        self._recorders.append(recorder)
        return recorder

    def finish(self, recorder: Recorder) -> str | None:
        """The call ended: stop taking frames; the next flush writes the rest and closes.

        Returns the file's path, or None when nothing usable was or will be
        written (no audio, or the recording failed before any reached the
        file). A write that fails after this returns leaves the file as of
        its last successful flush (or none). Idempotent, never raises.
        """
        recorder._open = False
        if recorder.bytes_written or (recorder.failed is None and (
                recorder._buffer or recorder._in_flight_bytes)):
            return recorder.path
        return None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Open the directory, report started, then :meth:`flush` every ``flush_interval_s``.

        An unusable directory is logged once (``recording_dir_unusable``) and
        tried again every :data:`DIR_RETRY_S`; meanwhile :meth:`start` returns
        None. On cancellation the service turns off (:meth:`start` returns
        None), then every buffer is written and every file closed within
        :data:`FLUSH_GRACE_S` (shielded); what does not fit in the grace is
        logged (``recording_flush_incomplete``) and its worker thread
        abandoned. OS errors of the recordings never propagate out of here.
        """
        self._running = True
        try:
            async with self._flushing:
                await self._open_directory()
            task_status.started()
            while True:
                await trio.sleep(self.flush_interval_s)
                await self.flush()
        finally:
            self._running = False
            with trio.move_on_after(FLUSH_GRACE_S, shield=True):
                async with self._flushing:
                    await self._write_all(close_all=True)
            if self._recorders:
                log_event(logging.WARNING, "recording_flush_incomplete",
                          f"{len(self._recorders)} recording(s) not closed within the grace",
                          directory=self.directory, grace_s=FLUSH_GRACE_S)

    async def flush(self) -> None:
        """Write every buffer, close finished recordings, keep to ``max_bytes``.

        What :meth:`run` does every ``flush_interval_s``; while the directory
        is unusable it is tried again instead, once :data:`DIR_RETRY_S` have
        passed since the last try. Serialized with other flushes; on
        cancellation the worker thread is abandoned and finishes its batch on
        its own (the next flush picks up the files' state).
        """
        async with self._flushing:
            if self._usable:
                await self._write_all(close_all=False)
                await self._enforce_budget()
            elif self._running and trio.current_time() >= self._retry_at:
                await self._open_directory()

    async def _in_thread(self, fn: Callable[..., _T], *args: Any) -> _T:
        return await trio.to_thread.run_sync(fn, *args, limiter=self._limiter,
                                             abandon_on_cancel=True)

    async def _open_directory(self) -> None:
        """List the directory (creating it); on OSError stay off until :data:`DIR_RETRY_S`."""
        try:
            files = await self._in_thread(_scan_directory, self.directory)
        except OSError as exc:
            self._usable = False
            self._retry_at = trio.current_time() + DIR_RETRY_S
            if not self._unusable_logged:
                self._unusable_logged = True
                log_event(logging.WARNING, "recording_dir_unusable",
                          f"no recordings until the directory is usable: {_describe(exc)}",
                          directory=self.directory, error=_describe(exc))
            return
        self._unusable_logged = False
        self._usable = True
        self._closed_files = deque(files)
        self._closed_bytes = sum(size for _, size in files)
        log_event(logging.INFO, "recording_dir_ready", "recordings on",
                  directory=self.directory, files=len(files), bytes_on_disk=self._closed_bytes)
        await self._enforce_budget()

    async def _write_all(self, *, close_all: bool) -> None:
        """Hand every buffer (and every finished recorder) to one worker-thread call."""
        recorders, jobs = [], []
        for recorder in self._recorders:
            if close_all:
                recorder._open = False
            if recorder._buffer or not recorder._open:
                recorders.append(recorder)
                jobs.append(_Job(recorder._sink, recorder._take(), not recorder._open))
        if jobs:
            try:
                outcomes = await self._in_thread(_write_jobs, jobs)
            except trio.Cancelled:
                # The abandoned thread still writes them; the next flush sees its results.
                for recorder, job in zip(recorders, jobs, strict=True):
                    recorder._in_flight_bytes -= len(job.stereo_pcm)
                raise
            for recorder, job, outcome in zip(recorders, jobs, outcomes, strict=True):
                self._settle(recorder, len(job.stereo_pcm), outcome)
            self._recorders = [r for r in self._recorders if not r._closed]
        self._update_totals()

    def _settle(self, recorder: Recorder, sent_bytes: int, outcome: _Outcome) -> None:
        """Apply one writer outcome to its recorder."""
        recorder._in_flight_bytes -= sent_bytes
        recorder.bytes_written = outcome.data_bytes
        recorder._size_bytes = outcome.size_bytes
        if outcome.error is not None:
            recorder.failed = _describe(outcome.error)
            recorder._open = False
            recorder._buffer = bytearray()
            self.stats.write_errors += 1
            RECORDING_ERRORS.inc()
            log_event(logging.WARNING, "recording_failed",
                      f"recording stopped, the call goes on: {recorder.failed}",
                      session_id=recorder.session_id, tenant=recorder.tenant, path=recorder.path,
                      error=recorder.failed, bytes_written=outcome.data_bytes)
        if outcome.closed and not recorder._closed:
            recorder._closed = True
            if outcome.size_bytes:
                self._closed_files.append((recorder.path, outcome.size_bytes))
                self._closed_bytes += outcome.size_bytes

    async def _enforce_budget(self) -> None:
        """Delete the oldest closed recordings while the directory is over ``max_bytes``."""
        self._update_totals()
        excess = self.stats.bytes_on_disk - self.max_bytes
        victims: list[tuple[str, int]] = []
        for path, size in self._closed_files:
            if excess <= 0:
                break
            victims.append((path, size))
            excess -= size
        if not victims:
            return
        # Forgotten only once the thread reports back: if cancelled, the next flush retries.
        errors = await self._in_thread(_delete_files, [path for path, _ in victims])
        for (path, size), error in zip(victims, errors, strict=True):
            # A file that cannot be deleted is left alone and no longer counted.
            self._closed_files.popleft()
            self._closed_bytes -= size
            if error is None:
                self.stats.deleted_files += 1
                log_event(logging.INFO, "recording_deleted", "over the recordings disk budget",
                          path=path, size_bytes=size, max_bytes=self.max_bytes)
            else:
                self.stats.write_errors += 1
                RECORDING_ERRORS.inc()
                log_event(logging.WARNING, "recording_delete_failed", _describe(error),
                          path=path, error=_describe(error))
        self._update_totals()

    def _update_totals(self) -> None:
        """``bytes_on_disk`` from the running totals; the metrics caught up."""
        stats = self.stats
        stats.bytes_on_disk = self._closed_bytes + sum(r._size_bytes for r in self._recorders)
        BYTES_ON_DISK.set(stats.bytes_on_disk)
        if stats.dropped_frames > self._dropped_reported:
            RECORDING_DROPPED_FRAMES.inc(stats.dropped_frames - self._dropped_reported)
            self._dropped_reported = stats.dropped_frames
