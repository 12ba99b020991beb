"""Offline speech synthesis for the local agent: espeak-ng, then 20 ms frames at 8 kHz.

``espeak-ng`` runs as a child process (``trio.run_process``, the text on its
stdin so that no text can pass for an option) behind a
``trio.CapacityLimiter`` of ``[agent] synthesizers`` processes; its WAV
(22 050 Hz mono PCM16) is resampled to the pipeline's 8 kHz PCM16 and cut
into 320-byte frames. The transport encodes them for the call's codec
(G.711 µ-law or A-law on SIP/RTP).

Menu prompts come back again and again, so synthesised texts are kept in a
small LRU cache bounded in bytes (:data:`CACHE_BYTES`).
"""

from __future__ import annotations

import io
import subprocess
import warnings
import wave
from collections import OrderedDict

import trio

from voxgate.errors import LocalProtocolError
from voxgate.pipeline.frames import PCM_FRAME_BYTES, RATE_HZ, split_frames

with warnings.catch_warnings():
    # Python 3.11/3.12 deprecate audioop (PEP 594) with a DeprecationWarning at import.
    warnings.simplefilter("ignore", DeprecationWarning)
    import audioop

MAX_TEXT_CHARS = 1000
"""Longer texts are cut here (a webhook's ``say`` is not ours to trust)."""
MAX_SPEECH_S = 60
CACHE_BYTES = 4 << 20
"""Most bytes of synthesised audio kept for reuse (~4 minutes of speech)."""
SYNTH_TIMEOUT_S = 10.0


class SynthesisError(LocalProtocolError):
    """espeak-ng failed, timed out, or produced no usable audio."""


class Synthesizer:
    """Text → 20 ms PCM16 frames at 8 kHz, shared by every session of a process.

    Args:
        voice: espeak-ng voice (``espeak-ng --voices``), e.g. ``en-us``.
        rate_wpm: speaking rate in words per minute.
        processes: most espeak-ng processes at once.
        cache_bytes: most bytes of audio the cache keeps.
    """

    def __init__(self, voice: str, rate_wpm: int, *, processes: int,
                 cache_bytes: int = CACHE_BYTES) -> None:
        self._argv = ("espeak-ng", "-v", voice, "-s", str(rate_wpm), "--stdout")
        self._limiter = trio.CapacityLimiter(processes)
        self._cache: OrderedDict[str, tuple[bytes, ...]] = OrderedDict()
        self._cache_bytes = cache_bytes
        self._cached_bytes = 0
        self.cache_hits = 0
        self.processes_run = 0

    async def frames(self, text: str) -> tuple[bytes, ...]:
        """``text`` spoken, as 320-byte frames (the last one zero-padded); () for no words.

        Raises:
            SynthesisError: espeak-ng failed or timed out (``SYNTH_TIMEOUT_S``).
        """
        text = " ".join(text.split())[:MAX_TEXT_CHARS]
        if not text:
            return ()
        cached = self._cache.get(text)
        if cached is not None:
            self._cache.move_to_end(text)
            self.cache_hits += 1
            return cached
        async with self._limiter:
            self.processes_run += 1
            try:
                with trio.fail_after(SYNTH_TIMEOUT_S):
                    done = await trio.run_process(
                        self._argv, stdin=text.encode(), capture_stdout=True,
                        capture_stderr=True, check=False)
            except trio.TooSlowError as e:
                raise SynthesisError(f"espeak-ng took over {SYNTH_TIMEOUT_S} s") from e
            except OSError as e:
                raise SynthesisError(f"cannot run espeak-ng: {e}") from e
        frames = _check_output(done)
        self._remember(text, frames)
        return frames

    def _remember(self, text: str, frames: tuple[bytes, ...]) -> None:
        size = len(frames) * PCM_FRAME_BYTES
        if size > self._cache_bytes:
            return
        self._cache[text] = frames
        self._cached_bytes += size
        while self._cached_bytes > self._cache_bytes:
            _, old = self._cache.popitem(last=False)
            self._cached_bytes -= len(old) * PCM_FRAME_BYTES


def _check_output(done: subprocess.CompletedProcess[bytes]) -> tuple[bytes, ...]:
    if done.returncode != 0:
        detail = done.stderr.decode(errors="replace").strip()[:200]
        raise SynthesisError(f"espeak-ng exit {done.returncode}: {detail}")
    return wav_to_frames(done.stdout)


def wav_to_frames(wav_bytes: bytes) -> tuple[bytes, ...]:
    """A mono PCM16 WAV at any rate → 8 kHz PCM16 frames of 320 bytes (last one padded).

    espeak-ng's ``--stdout`` WAV has a placeholder length; what is there is read.

    Raises:
        SynthesisError: not a mono 16-bit PCM WAV, or longer than ``MAX_SPEECH_S``.
    """
    try:
        with wave.open(io.BytesIO(wav_bytes), "rb") as wav:
            if wav.getnchannels() != 1 or wav.getsampwidth() != 2:
                raise SynthesisError("espeak-ng audio is not mono 16-bit PCM")
            rate_hz = wav.getframerate()
            pcm = wav.readframes(rate_hz * MAX_SPEECH_S + 1)
    except (EOFError, wave.Error) as e:
        raise SynthesisError(f"unreadable WAV from espeak-ng: {e}") from e
    if len(pcm) > rate_hz * MAX_SPEECH_S * 2:
        raise SynthesisError(f"speech longer than {MAX_SPEECH_S} s")
    if rate_hz != RATE_HZ:
        pcm, _ = audioop.ratecv(pcm, 2, 1, rate_hz, RATE_HZ, None)
    return split_frames(pcm)
