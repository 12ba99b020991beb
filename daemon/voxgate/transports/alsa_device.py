"""One ALSA line's PCMs: a thin, non-blocking wrapper over pyalsaaudio.

A line is a capture PCM and a playback PCM (any ALSA PCM name: ``hw:1,0``,
``plughw:CARD=Device,DEV=0``, a plugin from an asoundrc) opened in
non-blocking mode as signed 16-bit little-endian mono at the line's rate,
with a period of ``period_ms`` and a buffer of :data:`PERIODS` periods.

What this module hides from the Trio driver (:mod:`voxgate.transports.alsa`):

- pyalsaaudio's return conventions: ``read()`` gives ``(-EPIPE, b"")`` on an
  over-run and ``(0, b"")`` when nothing is ready; ``write()`` gives
  ``-EPIPE`` on an under-run (it has already re-prepared the PCM) and 0 when
  the buffer is full; ``avail()`` gives a negative errno on error.
- xrun recovery: over-runs are counted and the next read goes on; under-runs
  are counted, the buffer is pre-filled with silence again and the write is
  retried once.
- a device that fails (a USB device unplugged: ``ALSAAudioError`` with
  ENODEV or EBADFD, a negative ``avail()``; or an open that fails) raises
  :class:`DeviceLost`, whatever the call.
- whether the capture PCM's poll descriptor can be waited on (real
  ``/dev/snd`` devices) or not (the ``null`` and ``file`` plugins hand out
  ``/dev/null``-like descriptors that epoll refuses with EPERM).

pyalsaaudio is imported when a line is opened, so the daemon runs without it
when no line is configured.
"""

from __future__ import annotations

import contextlib
import errno
import importlib
import select
from typing import Any, Protocol

from voxgate.errors import VoxgateError

SAMPLE_WIDTH_BYTES = 2
"""Signed 16-bit little-endian mono: two bytes per frame."""
PERIODS = 4
"""The device buffer holds this many periods."""
PREFILL_PERIODS = 2
"""Periods of silence written ahead at start and after an under-run or a clear,
so that the 20 ms tick's jitter does not starve the device."""


class DeviceLost(VoxgateError):
    """A line's PCM cannot be opened or failed; the message names the PCM."""


class LinePcms(Protocol):
    """What the driver needs of a line's device (implemented by :class:`AlsaLineDevice`)."""

    rate_hz: int
    period_bytes: int
    xruns_capture: int
    xruns_playback: int

    @property
    def capture_poll_fd(self) -> int | None:
        """The capture PCM's one descriptor when epoll accepts it, else None (pace by timer)."""

    def start(self) -> None:
        """Flush both directions and pre-fill playback. Raises DeviceLost."""

    def read(self) -> bytes | None:
        """Up to one period of capture, or None when none is ready. Raises DeviceLost."""

    def write(self, pcm: bytes) -> int:
        """Queue ``pcm`` (whole frames) for playback; returns the bytes the device
        took (fewer when its buffer is full). Raises DeviceLost."""

    def playback_queued_bytes(self) -> int:
        """Bytes written but not yet played (buffer size minus avail). Raises DeviceLost."""

    def clear_playback(self) -> None:
        """Drop what the device holds (barge-in) and pre-fill again. Raises DeviceLost."""

    def close(self) -> None:
        """Close both PCMs (idempotent)."""


def load_alsaaudio() -> Any:
    """The ``alsaaudio`` module (pyalsaaudio); raises DeviceLost when it is missing."""
    try:
        return importlib.import_module("alsaaudio")
    except ImportError as e:
        raise DeviceLost(f"pyalsaaudio is not installed: {e}") from None


def _epoll_accepts(fd: int) -> bool:
    """Whether ``fd`` can be registered with epoll (``/dev/null`` cannot: EPERM)."""
    with select.epoll() as probe:
        try:
            probe.register(fd, select.EPOLLIN)
        except OSError:
            return False
    return True


class AlsaLineDevice:
    """A line's capture and playback PCMs; see the module docstring.

    Attributes:
        rate_hz: the PCMs' sample rate.
        period_bytes: bytes of one period (``rate_hz * period_ms / 1000 * 2``).
        xruns_capture / xruns_playback: over-runs and under-runs recovered.
    """

    def __init__(self, alsaaudio: Any, capture: Any, playback: Any, *, rate_hz: int,
                 period_frames: int) -> None:
        self._error: type[Exception] = alsaaudio.ALSAAudioError
        self._capture: Any = capture
        self._playback: Any = playback
        self.rate_hz = rate_hz
        self.period_bytes = period_frames * SAMPLE_WIDTH_BYTES
        self.xruns_capture = 0
        self.xruns_playback = 0
        self._buffer_frames = int(playback.info()["buffer_size"])
        self._prefill = bytes(self.period_bytes * PREFILL_PERIODS)
        fds = capture.polldescriptors()
        self._poll_fd = fds[0][0] if len(fds) == 1 and _epoll_accepts(fds[0][0]) else None
        self._name = f"{capture.cardname()}/{playback.cardname()}"

    @classmethod
    def open(cls, capture: str, playback: str, rate_hz: int, period_ms: int) -> AlsaLineDevice:
        """Open ``capture`` and ``playback`` non-blocking, S16_LE mono at ``rate_hz``.

        Raises:
            DeviceLost: pyalsaaudio is missing, or a PCM cannot be opened or
                set up (unknown name, busy, unplugged, rate not supported).
        """
        alsaaudio = load_alsaaudio()
        period_frames = rate_hz * period_ms // 1000
        opened: list[Any] = []
        try:
            for kind, name in ((alsaaudio.PCM_CAPTURE, capture),
                               (alsaaudio.PCM_PLAYBACK, playback)):
                opened.append(alsaaudio.PCM(
                    type=kind, mode=alsaaudio.PCM_NONBLOCK, rate=rate_hz, channels=1,
                    format=alsaaudio.PCM_FORMAT_S16_LE, periodsize=period_frames,
                    periods=PERIODS, device=name))
            return cls(alsaaudio, opened[0], opened[1], rate_hz=rate_hz,
                       period_frames=period_frames)
        except alsaaudio.ALSAAudioError as e:
            for pcm in opened:
                pcm.close()
            raise DeviceLost(f"cannot open {capture}/{playback}: {e}") from None

    @property
    def capture_poll_fd(self) -> int | None:
        return self._poll_fd

    def start(self) -> None:
        """Flush both directions and pre-fill playback. Raises DeviceLost."""
        try:
            self._capture.drop()
            self._playback.drop()
        except self._error as e:
            raise self._lost(e) from None
        self.write(self._prefill)

    def read(self) -> bytes | None:
        """Up to one period of capture, or None when none is ready. Raises DeviceLost."""
        try:
            frames, data = self._capture.read()
        except self._error as e:
            raise self._lost(e) from None
        if frames > 0:
            return bytes(data)
        if frames == -errno.EPIPE:
            self.xruns_capture += 1
        return None

    def write(self, pcm: bytes) -> int:
        """Queue ``pcm`` for playback; bytes taken. Raises DeviceLost."""
        frames = self._write(pcm)
        if frames == -errno.EPIPE:
            self.xruns_playback += 1
            self._write(self._prefill)
            frames = self._write(pcm)
        return max(frames, 0) * SAMPLE_WIDTH_BYTES

    def _write(self, pcm: bytes) -> int:
        try:
            return int(self._playback.write(pcm))
        except self._error as e:
            raise self._lost(e) from None

    def playback_queued_bytes(self) -> int:
        """Bytes not yet played. Raises DeviceLost."""
        try:
            avail = int(self._playback.avail())
        except self._error as e:
            raise self._lost(e) from None
        if avail == -errno.EPIPE:  # under-run: nothing left; the next write recovers
            return 0
        if avail < 0:
            raise DeviceLost(f"{self._name}: {errno.errorcode.get(-avail, avail)}")
        return max(self._buffer_frames - avail, 0) * SAMPLE_WIDTH_BYTES

    def clear_playback(self) -> None:
        """Drop the queued playback and pre-fill again. Raises DeviceLost."""
        try:
            self._playback.drop()
        except self._error as e:
            raise self._lost(e) from None
        self.write(self._prefill)

    def close(self) -> None:
        """Close both PCMs (idempotent); queued playback is dropped, not drained."""
        with contextlib.suppress(self._error):  # closed already, or unplugged
            self._playback.drop()
        self._capture.close()
        self._playback.close()

    def _lost(self, error: Exception) -> DeviceLost:
        return DeviceLost(f"{self._name}: {error}")
