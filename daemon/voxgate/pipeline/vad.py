"""Voice activity detection with hysteresis; sans-IO.

webrtcvad classifies each 20 ms frame as speech or not; single frames flip
on clicks and breaths, so the detector only changes its mind after a run of
frames (pipecat's idea, with ``start_ms``/``stop_ms``)::

    QUIET --speech--> STARTING --speech for start_ms--> SPEAKING  (SpeechStarted)
      ^                  | non-speech                    | non-speech
      +------------------+                               v
      +---------- non-speech for stop_ms ----------- STOPPING     (SpeechStopped)
                                                         | speech: back to SPEAKING

Times in events are the ``now`` given with the frame that began the run
(monotonic seconds), lengths are whole frames in ms.

Endpointing: while STOPPING, :attr:`VoiceActivityDetector.pause_at` says when
the pause began, and :meth:`VoiceActivityDetector.end_pause_after` lets the
listener end this pause's speech sooner or later than ``stop_ms`` (the
listener decides, e.g. from what the speech so far means; the detector keeps
no clock of its own). ``SpeechStopped.at`` stays the real end of speech.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

import _webrtcvad
import webrtcvad

_SAMPLE_RATES_HZ: Final = (8000, 16000, 32000, 48000)
_FRAME_LENGTHS_MS: Final = (10, 20, 30)
_BYTES_PER_SAMPLE: Final = 2


class VadState(enum.Enum):
    """Where the detector stands (see the module diagram)."""

    QUIET = "quiet"
    STARTING = "starting"
    SPEAKING = "speaking"
    STOPPING = "stopping"


# Read every frame through module globals: on Python 3.11 ``VadState.QUIET`` goes
# through ``EnumType.__getattr__`` (about 130 ns, 14 times a global).
QUIET: Final = VadState.QUIET
STARTING: Final = VadState.STARTING
SPEAKING: Final = VadState.SPEAKING
STOPPING: Final = VadState.STOPPING


@dataclass(frozen=True, slots=True)
class SpeechStarted:
    """Speech has lasted ``start_ms``; ``at`` is the ``now`` of its first speech frame."""

    at: float


@dataclass(frozen=True, slots=True)
class SpeechStopped:
    """Non-speech has lasted ``stop_ms``.

    ``at`` is the ``now`` of the first non-speech frame (when speech ended),
    ``duration_ms`` the speech from its first to its last speech frame.
    """

    at: float
    duration_ms: int


VadEvent = SpeechStarted | SpeechStopped


def _classifier(vad: webrtcvad.Vad, sample_rate_hz: int,
                frame_bytes: int) -> Callable[[bytes], bool]:
    """``vad``'s speech decision on one ``frame_bytes`` PCM frame.

    webrtcvad's C binding (``_webrtcvad``, webrtcvad-wheels 2.0.14) is called
    directly: ``Vad.is_speech`` is a Python method around it that only
    re-checks the length, 3,000 of the 14,400 instructions a frame took
    (callgrind); this closure saves 1,900 of them. A stand-in without the
    binding's handle is asked through ``is_speech``.
    """
    handle = getattr(vad, "_vad", None)
    if handle is None:
        return lambda pcm: bool(vad.is_speech(pcm, sample_rate_hz))
    process, samples = _webrtcvad.process, frame_bytes // _BYTES_PER_SAMPLE
    return lambda pcm: bool(process(handle, sample_rate_hz, pcm, samples))


class VoiceActivityDetector:
    """Turns 20 ms PCM frames into :class:`SpeechStarted` / :class:`SpeechStopped`.

    Args:
        sample_rate_hz: 8000, 16000, 32000 or 48000.
        frame_ms: 10, 20 or 30.
        aggressiveness: webrtcvad mode 0 (least) to 3 (most eager to call non-speech).
        start_ms: speech needed before SpeechStarted (rounded up to whole frames).
        stop_ms: non-speech needed before SpeechStopped (rounded up to whole frames).

    Raises:
        ValueError: an unsupported rate, frame length or aggressiveness, or a
            negative ``start_ms``/``stop_ms``.
    """

    __slots__ = (
        "_frame_bytes",
        "_frame_ms",
        "_is_speech",
        "_pause_frames",
        "_run_at",
        "_run_frames",
        "_sample_rate_hz",
        "_speech_at",
        "_speech_frames",
        "_start_frames",
        "_stop_frames",
        "_vad",
        "state",
    )

    def __init__(
        self,
        *,
        sample_rate_hz: int = 8000,
        frame_ms: int = 20,
        aggressiveness: int = 2,
        start_ms: int = 200,
        stop_ms: int = 600,
    ) -> None:
        if sample_rate_hz not in _SAMPLE_RATES_HZ:
            raise ValueError(f"sample_rate_hz must be one of {_SAMPLE_RATES_HZ}")
        if frame_ms not in _FRAME_LENGTHS_MS:
            raise ValueError(f"frame_ms must be one of {_FRAME_LENGTHS_MS}")
        if not 0 <= aggressiveness <= 3:
            raise ValueError(f"aggressiveness must be 0-3, got {aggressiveness}")
        if start_ms < 0 or stop_ms < 0:
            raise ValueError(f"start_ms ({start_ms}) and stop_ms ({stop_ms}) must be >= 0")
        self._vad = webrtcvad.Vad(aggressiveness)
        self._sample_rate_hz = sample_rate_hz
        self._frame_ms = frame_ms
        self._frame_bytes = sample_rate_hz * frame_ms // 1000 * _BYTES_PER_SAMPLE
        self._is_speech = _classifier(self._vad, sample_rate_hz, self._frame_bytes)
        self._start_frames = max(1, -(-start_ms // frame_ms))
        self._stop_frames = max(1, -(-stop_ms // frame_ms))
        self._pause_frames = self._stop_frames  # what ends the current pause
        self.state = QUIET
        """Current state; read it, do not set it."""
        self._run_frames = 0  # length of the current STARTING or STOPPING run
        self._run_at = 0.0  # now of the first frame of that run
        self._speech_at = 0.0  # now of the first speech frame of the talkspurt
        self._speech_frames = 0  # frames from that one through the last speech frame

    def process(self, pcm_frame: bytes, now: float) -> VadEvent | None:
        """Classify one frame of 16-bit signed little-endian mono PCM, ``frame_ms`` long.

        Returns the event this frame completes, if any.

        Raises:
            ValueError: the frame is not exactly ``sample_rate_hz * frame_ms / 1000 * 2`` bytes.
        """
        if len(pcm_frame) != self._frame_bytes:
            raise ValueError(f"PCM frame of {len(pcm_frame)} bytes, expected {self._frame_bytes}")
        speech = self._is_speech(pcm_frame)
        state = self.state
        if state is SPEAKING:
            if speech:
                self._speech_frames += 1
            else:
                return self._enter_stopping(now)
        elif state is STOPPING:
            if speech:
                self._speech_frames += self._run_frames + 1
                self.state = SPEAKING
            else:
                self._run_frames += 1
                return self._stopped_if_long_enough()
        elif state is STARTING:
            if speech:
                self._run_frames += 1
                return self._started_if_long_enough()
            self.state = QUIET
        elif speech:
            self.state = STARTING
            self._run_frames = 1
            self._run_at = now
            return self._started_if_long_enough()
        return None

    @property
    def pause_at(self) -> float | None:
        """When the current pause in speech began (the ``now`` of its first non-speech
        frame) while STOPPING; None otherwise."""
        return self._run_at if self.state is STOPPING else None

    def end_pause_after(self, stop_ms: int) -> SpeechStopped | None:
        """End the current pause's speech after ``stop_ms`` of non-speech (rounded up to
        whole frames; 0 or less: at once) instead of the constructor's ``stop_ms``.

        Applies to this pause only: speech that resumes brings the default back.
        Returns the :class:`SpeechStopped` when the pause is already that long,
        None otherwise and when there is no pause.
        """
        if self.state is not STOPPING:
            return None
        self._pause_frames = max(1, -(-stop_ms // self._frame_ms))
        return self._stopped_if_long_enough()

    def _started_if_long_enough(self) -> SpeechStarted | None:
        if self._run_frames < self._start_frames:
            return None
        self.state = SPEAKING
        self._speech_at = self._run_at
        self._speech_frames = self._run_frames
        return SpeechStarted(self._speech_at)

    def _enter_stopping(self, now: float) -> SpeechStopped | None:
        self.state = STOPPING
        self._pause_frames = self._stop_frames
        self._run_frames = 1
        self._run_at = now
        return self._stopped_if_long_enough()

    def _stopped_if_long_enough(self) -> SpeechStopped | None:
        if self._run_frames < self._pause_frames:
            return None
        self.state = QUIET
        return SpeechStopped(self._run_at, self._speech_frames * self._frame_ms)
