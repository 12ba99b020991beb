"""Speech clip and echo comparison for the real-peer tests.

The clip is synthesised speech (espeak-ng, resampled by sox) at 8 kHz mono,
written twice: as µ-law WAV for SIPp's ``rtp_stream`` (SIPp skips the RIFF
header and sends the bytes as they are, 160 per 20 ms packet) and as 16-bit
WAV for baresip's ``aufile`` source. Its length is one sample more than a
whole number of 20 ms frames, so that when SIPp loops it every pass is cut
into different packets and no payload repeats (echo latency matching in
:mod:`tests.harness.pcap` needs unique payloads).

The echo check answers "is what came back *the caller's speech*": the
normalized cross-correlation of the received samples with the clip at the
best lag, plus the correlation of their per-frame energy envelopes.
"""

from __future__ import annotations

import math
import shutil
import struct
import subprocess
import warnings
from dataclasses import dataclass
from pathlib import Path

with warnings.catch_warnings():
    # audioop is deprecated (PEP 594) but it is the C G.711 and RMS code we need.
    warnings.simplefilter("ignore", DeprecationWarning)
    import audioop

SAMPLE_RATE_HZ = 8000
FRAME_SAMPLES = 160  # 20 ms at 8 kHz
SAMPLE_WIDTH_BYTES = 2
CLIP_TEXT = (
    "Voxgate answers the call and echoes every frame. "
    "The quick brown fox jumps over the lazy dog."
)
ULAW_CLIP_NAME = "voxgate_clip_ulaw.wav"
PCM16_CLIP_NAME = "voxgate_clip_pcm16.wav"
SILENCE_FLOOR_DBFS = -70.0
VOICED_DBFS = -45.0  # a 20 ms frame or segment above this carries speech
SEGMENT_S = 0.25  # short: a frame a jitter buffer inserts or drops breaks one segment
SEGMENT_SLACK_S = 0.25
SEGMENT_NCC = 0.9
_FULL_SCALE = 32768.0
_TOOL_TIMEOUT_S = 30.0

# WAVE format tags (RFC 2361 appendix A).
WAVE_FORMAT_PCM = 0x0001
WAVE_FORMAT_ALAW = 0x0006
WAVE_FORMAT_MULAW = 0x0007
WAVE_FORMAT_EXTENSIBLE = 0xFFFE
# fmt chunk: format tag, channels, sample rate, byte rate, block align, bits per sample.
_FMT = struct.Struct("<HHIIHH")
_CHUNK = struct.Struct("<4sI")


class AudioFormatError(Exception):
    """A WAV file this module cannot read."""


@dataclass(frozen=True, slots=True)
class WavAudio:
    """One WAV file: its format and the bytes of its ``data`` chunk."""

    format_tag: int
    channels: int
    rate_hz: int
    bits_per_sample: int
    data: bytes

    def to_pcm16(self) -> bytes:
        """Mono 16-bit little-endian samples; G.711 is decoded.

        Raises:
            AudioFormatError: more than one channel or an unknown encoding.
        """
        if self.channels != 1:
            raise AudioFormatError(f"expected mono, got {self.channels} channels")
        if self.format_tag == WAVE_FORMAT_MULAW:
            return decode_g711(self.data, "PCMU")
        if self.format_tag == WAVE_FORMAT_ALAW:
            return decode_g711(self.data, "PCMA")
        if self.format_tag == WAVE_FORMAT_PCM and self.bits_per_sample == 16:
            return self.data[: len(self.data) - len(self.data) % 2]
        raise AudioFormatError(
            f"unsupported WAV encoding tag={self.format_tag:#x} bits={self.bits_per_sample}"
        )


@dataclass(frozen=True, slots=True)
class SpeechClip:
    """The test clip. ``pcm16`` is the µ-law file decoded: what the wire carries."""

    ulaw_wav: Path
    pcm16_wav: Path
    pcm16: bytes

    @property
    def duration_s(self) -> float:
        """Length in seconds."""
        return len(self.pcm16) / SAMPLE_WIDTH_BYTES / SAMPLE_RATE_HZ


@dataclass(frozen=True, slots=True)
class EchoMatch:
    """How well received audio matches the reference.

    ``lag_s``: where reference sample 0 sits in the received audio (negative
    when the received audio starts inside the reference). ``ncc``: normalized
    cross-correlation of the samples at that lag, -1..1. ``envelope_corr``:
    Pearson correlation of the per-frame energy (dB) envelopes at the frame lag,
    -1..1. ``overlap_s``: length compared. ``segments_matched``: fraction of
    the reference's voiced ``SEGMENT_S`` segments that each, fitted on their own
    within ±``SEGMENT_SLACK_S`` of the overall lag, correlate at
    ``SEGMENT_NCC`` or better, 0..1: the echo is the caller's speech in order
    even when a jitter buffer under load concealed or skipped a frame (which
    shifts everything after it and so lowers ``ncc`` and ``envelope_corr``).
    Measured on ten echoes through the Pipecat bot while the unit tests ran
    beside them, the lag moved within four (40 ms, then 60, then 40 again as
    the jitter buffer grew a frame and gave it back; in one, 60 then 120);
    with 0.5 s segments they matched 0.73-0.91, with 0.25 s 0.87-0.96. The
    same received audio reversed, or cut into 0.2 s pieces and shuffled,
    matches 0.0 and 0.09.
    """

    lag_s: float
    ncc: float
    envelope_corr: float
    overlap_s: float
    segments_matched: float = 0.0


def make_speech_clip(directory: Path) -> SpeechClip:
    """Synthesise the clip into ``directory`` (espeak-ng + sox) and load it.

    Raises:
        FileNotFoundError: espeak-ng or sox is not installed.
        subprocess.CalledProcessError, subprocess.TimeoutExpired: a tool failed.
    """
    for tool in ("espeak-ng", "sox"):
        if shutil.which(tool) is None:
            raise FileNotFoundError(tool)
    directory.mkdir(parents=True, exist_ok=True)
    speech = directory / "espeak.wav"
    trimmed = directory / "trimmed.raw"
    _run(["espeak-ng", "-s", "165", "-w", str(speech), CLIP_TEXT])
    # Resample to 8 kHz mono 16-bit, trim leading/trailing silence, normalize to -3 dBFS.
    _run(
        ["sox", str(speech), "-r", str(SAMPLE_RATE_HZ), "-c", "1", "-b", "16",
         "-e", "signed-integer", "-t", "raw", str(trimmed),
         "silence", "1", "0.02", "0.5%", "reverse", "silence", "1", "0.02", "0.5%", "reverse",
         "gain", "-n", "-3"]
    )
    samples = trimmed.read_bytes()
    wanted = (len(samples) // SAMPLE_WIDTH_BYTES // FRAME_SAMPLES) * FRAME_SAMPLES + 1
    samples = samples[: wanted * SAMPLE_WIDTH_BYTES]
    pcm16_wav = directory / PCM16_CLIP_NAME
    ulaw_wav = directory / ULAW_CLIP_NAME
    write_wav(pcm16_wav, WavAudio(WAVE_FORMAT_PCM, 1, SAMPLE_RATE_HZ, 16, samples))
    write_wav(ulaw_wav, WavAudio(WAVE_FORMAT_MULAW, 1, SAMPLE_RATE_HZ, 8, encode_ulaw(samples)))
    return SpeechClip(ulaw_wav=ulaw_wav, pcm16_wav=pcm16_wav, pcm16=read_wav(ulaw_wav).to_pcm16())


def _run(argv: list[str]) -> None:
    subprocess.run(argv, check=True, capture_output=True, timeout=_TOOL_TIMEOUT_S)


def write_wav(path: Path, audio: WavAudio) -> None:
    """Write a canonical 44-byte-header WAV (a plain 16-byte ``fmt`` chunk)."""
    block_align = audio.channels * audio.bits_per_sample // 8
    fmt = _FMT.pack(
        audio.format_tag, audio.channels, audio.rate_hz,
        audio.rate_hz * block_align, block_align, audio.bits_per_sample,
    )
    body = (
        b"WAVE" + _CHUNK.pack(b"fmt ", len(fmt)) + fmt
        + _CHUNK.pack(b"data", len(audio.data)) + audio.data
    )
    path.write_bytes(_CHUNK.pack(b"RIFF", len(body)) + body)


def read_wav(path: Path) -> WavAudio:
    """Read a RIFF/WAVE file: PCM, A-law, µ-law or WAVE_FORMAT_EXTENSIBLE.

    A ``data`` chunk whose size field overruns the file (a writer killed
    before it patched the header) is cut at the end of the file.

    Raises:
        AudioFormatError: not RIFF/WAVE, or no ``fmt``/``data`` chunk.
    """
    blob = path.read_bytes()
    if len(blob) < 12 or blob[:4] != b"RIFF" or blob[8:12] != b"WAVE":
        raise AudioFormatError(f"{path}: not a RIFF/WAVE file")
    offset = 12
    fmt: tuple[int, int, int, int, int, int] | None = None
    while offset + _CHUNK.size <= len(blob):
        chunk_id, size = _CHUNK.unpack_from(blob, offset)
        offset += _CHUNK.size
        if chunk_id == b"fmt ":
            if size < _FMT.size:
                raise AudioFormatError(f"{path}: short fmt chunk")
            fmt = _FMT.unpack_from(blob, offset)
            if fmt[0] == WAVE_FORMAT_EXTENSIBLE and size >= 26:
                # The sub-format GUID starts with the real format tag (offset 24 of fmt).
                fmt = (struct.unpack_from("<H", blob, offset + 24)[0], *fmt[1:])
        elif chunk_id == b"data":
            if fmt is None:
                raise AudioFormatError(f"{path}: data chunk before fmt chunk")
            tag, channels, rate_hz, _, _, bits = fmt
            return WavAudio(tag, channels, rate_hz, bits, blob[offset : offset + size])
        offset += size + (size & 1)
    raise AudioFormatError(f"{path}: no data chunk")


def decode_g711(payload: bytes, codec: str) -> bytes:
    """G.711 bytes (``"PCMU"`` or ``"PCMA"``) to 16-bit little-endian samples."""
    if codec == "PCMU":
        return audioop.ulaw2lin(payload, SAMPLE_WIDTH_BYTES)
    if codec == "PCMA":
        return audioop.alaw2lin(payload, SAMPLE_WIDTH_BYTES)
    raise AudioFormatError(f"not a G.711 codec: {codec}")


def encode_ulaw(pcm16: bytes) -> bytes:
    """16-bit little-endian samples to G.711 µ-law bytes."""
    return audioop.lin2ulaw(pcm16, SAMPLE_WIDTH_BYTES)


def rms_dbfs(pcm16: bytes) -> float:
    """RMS level of 16-bit samples in dBFS, floored at ``SILENCE_FLOOR_DBFS``."""
    if len(pcm16) < SAMPLE_WIDTH_BYTES:
        return SILENCE_FLOOR_DBFS
    rms = audioop.rms(pcm16, SAMPLE_WIDTH_BYTES)
    if rms == 0:
        return SILENCE_FLOOR_DBFS
    return max(SILENCE_FLOOR_DBFS, 20.0 * math.log10(rms / _FULL_SCALE))


def frame_energy_dbfs(pcm16: bytes, frame_samples: int = FRAME_SAMPLES) -> list[float]:
    """Per-frame RMS level (dBFS) of 16-bit samples; a trailing partial frame is dropped."""
    step = frame_samples * SAMPLE_WIDTH_BYTES
    return [rms_dbfs(pcm16[i : i + step]) for i in range(0, len(pcm16) - step + 1, step)]


def active_ratio(pcm16: bytes, threshold_dbfs: float = VOICED_DBFS) -> float:
    """Fraction of 20 ms frames louder than ``threshold_dbfs`` (0 for no frames)."""
    energy = frame_energy_dbfs(pcm16)
    return sum(e > threshold_dbfs for e in energy) / len(energy) if energy else 0.0


def pearson(xs: list[float], ys: list[float]) -> float:
    """Pearson correlation of two equal-length series; 0 when either is constant."""
    n = len(xs)
    if n == 0 or n != len(ys):
        return 0.0
    mx = sum(xs) / n
    my = sum(ys) / n
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True))
    sxx = sum((x - mx) ** 2 for x in xs)
    syy = sum((y - my) ** 2 for y in ys)
    if sxx <= 0.0 or syy <= 0.0:
        return 0.0
    return sxy / math.sqrt(sxx * syy)


def _best_envelope_lag(
    received: list[float], reference: list[float], min_overlap: int
) -> tuple[int, float]:
    """Frame lag k maximizing corr(received[i + k], reference[i]) with >= min_overlap frames."""
    best = (0, -2.0)
    for lag in range(-(len(reference) - min_overlap), len(received) - min_overlap + 1):
        start = max(0, -lag)
        stop = min(len(reference), len(received) - lag)
        corr = pearson(received[start + lag : stop + lag], reference[start:stop])
        if corr > best[1]:
            best = (lag, corr)
    return best


def compare_echo(received: bytes, reference: bytes, min_overlap_s: float = 2.0) -> EchoMatch:
    """Find the reference in the received audio and say how well it matches.

    Both are mono 16-bit 8 kHz samples. The lag is searched coarsely on the
    20 ms energy envelopes (any lag with at least ``min_overlap_s`` of
    overlap, capped at the reference length), then to the sample within
    ±one frame with ``audioop.findfit``.
    """
    env_rx = frame_energy_dbfs(received)
    env_ref = frame_energy_dbfs(reference)
    min_overlap = min(len(env_ref), len(env_rx), round(min_overlap_s * 1000 / 20))
    if min_overlap < 2:
        return EchoMatch(lag_s=0.0, ncc=0.0, envelope_corr=0.0, overlap_s=0.0)
    frame_lag, env_corr = _best_envelope_lag(env_rx, env_ref, min_overlap)
    coarse = frame_lag * FRAME_SAMPLES
    # Reference part that overlaps the received audio at the coarse lag, less one
    # frame at each end so the fine search window of ±1 frame stays inside.
    ref_start = max(0, -coarse) + FRAME_SAMPLES
    ref_stop = min(len(reference) // 2, len(received) // 2 - coarse) - FRAME_SAMPLES
    if ref_stop - ref_start < FRAME_SAMPLES:
        return EchoMatch(frame_lag * 0.02, 0.0, env_corr, 0.0)
    ref_part = reference[ref_start * 2 : ref_stop * 2]
    window_start = ref_start + coarse - FRAME_SAMPLES
    window = received[window_start * 2 : (ref_stop + coarse + FRAME_SAMPLES) * 2]
    offset, _ = audioop.findfit(window, ref_part)
    rx_part = window[offset * 2 : offset * 2 + len(ref_part)]
    lag_samples = window_start + offset - ref_start
    return EchoMatch(
        lag_s=lag_samples / SAMPLE_RATE_HZ,
        ncc=normalized_correlation(rx_part, ref_part),
        envelope_corr=env_corr,
        overlap_s=len(ref_part) / 2 / SAMPLE_RATE_HZ,
        segments_matched=_segments_matched(received, reference, lag_samples),
    )


def _segments_matched(received: bytes, reference: bytes, lag_samples: int) -> float:
    """Fraction of the reference's voiced ``SEGMENT_S`` segments found in
    ``received`` at ``SEGMENT_NCC`` or better, each within ±``SEGMENT_SLACK_S``
    of ``lag_samples`` (see :class:`EchoMatch`)."""
    step = round(SEGMENT_S * SAMPLE_RATE_HZ)
    slack = round(SEGMENT_SLACK_S * SAMPLE_RATE_HZ)
    voiced = matched = 0
    for start in range(0, len(reference) // 2 - step + 1, step):
        segment = reference[start * 2 : (start + step) * 2]
        if rms_dbfs(segment) < VOICED_DBFS:
            continue  # a pause between words correlates with nothing
        voiced += 1
        lo = max(0, start + lag_samples - slack)
        window = received[lo * 2 : (start + lag_samples + step + slack) * 2]
        if len(window) < len(segment):
            continue
        offset, _ = audioop.findfit(window, segment)
        fitted = window[offset * 2 : offset * 2 + len(segment)]
        matched += normalized_correlation(fitted, segment) >= SEGMENT_NCC
    return matched / voiced if voiced else 0.0


def normalized_correlation(a: bytes, b: bytes) -> float:
    """sum(a·b) / sqrt(sum(a²)·sum(b²)) of two equal-length 16-bit sample strings."""
    rms_a = audioop.rms(a, SAMPLE_WIDTH_BYTES)
    rms_b = audioop.rms(b, SAMPLE_WIDTH_BYTES)
    if rms_a == 0 or rms_b == 0:
        return 0.0
    # findfactor(a, b) = sum(a·b)/sum(b²), hence the correlation is factor·rms(b)/rms(a).
    return float(audioop.findfactor(a, b)) * rms_b / rms_a
