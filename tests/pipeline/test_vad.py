import math
import random
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from voxgate.pipeline.vad import (
    SpeechStarted,
    SpeechStopped,
    VadEvent,
    VadState,
    VoiceActivityDetector,
)

RATE_HZ = 8000
SAMPLES = 160  # 20 ms
SILENCE = bytes(2 * SAMPLES)


def tone(index: int, freq_hz: float = 440.0, amplitude: int = 10000) -> bytes:
    start = index * SAMPLES
    return struct.pack(
        f"<{SAMPLES}h",
        *(
            int(amplitude * math.sin(2 * math.pi * freq_hz * (start + n) / RATE_HZ))
            for n in range(SAMPLES)
        ),
    )


_rng = random.Random(3)


def white_noise(amplitude: int = 8000) -> bytes:
    return struct.pack(
        f"<{SAMPLES}h",
        *(max(-32768, min(32767, int(_rng.gauss(0, amplitude / 3)))) for _ in range(SAMPLES)),
    )


def frame_time(index: int, start: float = 100.0) -> float:
    """The `now` that `run` passes with frame `index`: frames are 20 ms apart."""
    return start + index * 0.02


def run(
    vad: VoiceActivityDetector, frames: list[bytes], start: float = 100.0
) -> list[tuple[int, VadEvent]]:
    """Feed frames 20 ms apart; return (frame index, event) pairs."""
    out = []
    for i, frame in enumerate(frames):
        event = vad.process(frame, frame_time(i, start))
        if event is not None:
            out.append((i, event))
    return out


def speech(count: int) -> list[bytes]:
    return [tone(i) for i in range(count)]


# The hysteresis tests script the per-frame decision, because webrtcvad adds its
# own hangover of a few frames after speech; the tests after them use the real one.
VOICED = b"\x01" + bytes(2 * SAMPLES - 1)


class ScriptedVad:
    """Stands in for webrtcvad.Vad: a frame is speech when its first byte is not 0."""

    def __init__(self, mode: int) -> None:
        self.mode = mode

    def is_speech(self, frame: bytes, sample_rate: int) -> bool:
        assert sample_rate == RATE_HZ
        return frame[0] != 0


@pytest.fixture
def scripted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("voxgate.pipeline.vad.webrtcvad.Vad", ScriptedVad)


def test_speech_starts_after_start_ms_and_stops_after_stop_ms(scripted: None):
    vad = VoiceActivityDetector(start_ms=200, stop_ms=600)
    frames = [SILENCE] * 5 + [VOICED] * 50 + [SILENCE] * 40
    events = run(vad, frames, start=100.0)
    assert events == [
        (14, SpeechStarted(at=frame_time(5))),
        (84, SpeechStopped(at=frame_time(55), duration_ms=1000)),
    ]
    assert vad.state is VadState.QUIET


def test_start_and_stop_round_up_to_whole_frames(scripted: None):
    vad = VoiceActivityDetector(start_ms=50, stop_ms=30)
    events = run(vad, [VOICED] * 3 + [SILENCE] * 2)
    assert [i for i, _ in events] == [2, 4]


def test_states_along_the_way(scripted: None):
    vad = VoiceActivityDetector(start_ms=60, stop_ms=60)
    states = []
    frames = [SILENCE, VOICED, SILENCE, *[VOICED] * 4, SILENCE, VOICED, *[SILENCE] * 4]
    for i, frame in enumerate(frames):
        vad.process(frame, i * 0.02)
        states.append(vad.state)
    q, st, sp, so = VadState.QUIET, VadState.STARTING, VadState.SPEAKING, VadState.STOPPING
    assert states == [q, st, q, st, st, sp, sp, so, sp, so, so, q, q]


def test_a_pause_shorter_than_stop_ms_is_part_of_the_speech(scripted: None):
    vad = VoiceActivityDetector(start_ms=100, stop_ms=300)
    frames = [VOICED] * 10 + [SILENCE] * 14 + [VOICED] * 10 + [SILENCE] * 15
    events = run(vad, frames)
    assert [type(e) for _, e in events] == [SpeechStarted, SpeechStopped]
    index, stopped = events[1]
    assert index == len(frames) - 1
    assert stopped == SpeechStopped(at=frame_time(34), duration_ms=34 * 20)


def test_several_talkspurts(scripted: None):
    vad = VoiceActivityDetector(start_ms=40, stop_ms=40)
    frames = ([VOICED] * 5 + [SILENCE] * 3) * 3
    events = run(vad, frames)
    assert [type(e) for _, e in events] == [SpeechStarted, SpeechStopped] * 3
    assert [e.at for _, e in events] == [frame_time(i) for i in (0, 5, 8, 13, 16, 21)]
    assert all(e.duration_ms == 100 for _, e in events if isinstance(e, SpeechStopped))


def test_pause_at_is_the_start_of_the_current_pause(scripted: None):
    vad = VoiceActivityDetector(start_ms=40, stop_ms=100)
    run(vad, [VOICED] * 3 + [SILENCE] * 2)
    assert vad.pause_at == frame_time(3)
    vad.process(VOICED, frame_time(5))
    assert vad.pause_at is None
    assert vad.end_pause_after(0) is None  # no pause: nothing to end


def test_end_pause_after_ends_the_speech_sooner_at_the_real_end(scripted: None):
    vad = VoiceActivityDetector(start_ms=40, stop_ms=600)
    run(vad, [VOICED] * 10 + [SILENCE] * 5)
    assert vad.end_pause_after(200) is None  # 5 frames of 10: not yet
    stopped = vad.end_pause_after(0)
    assert stopped == SpeechStopped(at=frame_time(10), duration_ms=200)
    assert vad.state is VadState.QUIET


def test_end_pause_after_makes_one_pause_longer(scripted: None):
    vad = VoiceActivityDetector(start_ms=40, stop_ms=100)
    frames = [VOICED] * 5 + [SILENCE] * 4
    assert [type(e) for _, e in run(vad, frames)] == [SpeechStarted]
    assert vad.end_pause_after(300) is None
    more = [vad.process(SILENCE, frame_time(9 + i)) for i in range(11)]
    assert [i for i, e in enumerate(more) if e is not None] == [10]  # 15 frames of pause
    again = run(vad, [VOICED] * 5 + [SILENCE] * 5, start=200.0)  # the next pause: stop_ms
    assert [type(e) for _, e in again] == [SpeechStarted, SpeechStopped]
    assert again[-1][0] == 9


def test_speech_resuming_brings_the_default_stop_back(scripted: None):
    vad = VoiceActivityDetector(start_ms=40, stop_ms=100)
    run(vad, [VOICED] * 5 + [SILENCE] * 2)
    vad.end_pause_after(1000)
    events = run(vad, [VOICED] * 2 + [SILENCE] * 5, start=200.0)
    assert [(i, type(e)) for i, e in events] == [(6, SpeechStopped)]


def test_zero_start_and_stop_react_on_one_frame(scripted: None):
    vad = VoiceActivityDetector(start_ms=0, stop_ms=0)
    events = run(vad, [VOICED, SILENCE, SILENCE])
    assert events == [
        (0, SpeechStarted(at=100.0)),
        (1, SpeechStopped(at=frame_time(1), duration_ms=20)),
    ]


def test_aggressiveness_reaches_webrtcvad(scripted: None):
    vad = VoiceActivityDetector(aggressiveness=3)
    assert isinstance(vad._vad, ScriptedVad)
    assert vad._vad.mode == 3


def test_real_vad_on_tone_and_silence():
    vad = VoiceActivityDetector(start_ms=200, stop_ms=600)
    frames = [SILENCE] * 10 + speech(50) + [SILENCE] * 60
    events = run(vad, frames, start=0.0)
    assert [type(e) for _, e in events] == [SpeechStarted, SpeechStopped]
    (start_index, started), (stop_index, stopped) = events
    assert start_index == 19
    assert started.at == frame_time(10, start=0.0)
    # webrtcvad keeps saying "speech" for a short hangover after the tone.
    assert 89 <= stop_index <= 89 + 15
    assert isinstance(stopped, SpeechStopped)
    assert 1000 <= stopped.duration_ms <= 1000 + 300


def test_real_vad_ignores_noise_bursts_shorter_than_start_ms():
    vad = VoiceActivityDetector(start_ms=400, stop_ms=600)
    frames: list[bytes] = []
    for _ in range(10):
        frames += [white_noise() for _ in range(5)] + [SILENCE] * 20  # 100 ms bursts
    assert run(vad, frames) == []
    assert vad.state is VadState.QUIET


def test_other_rates_and_frame_lengths():
    vad = VoiceActivityDetector(sample_rate_hz=16000, frame_ms=10, start_ms=10)
    loud = struct.pack(
        "<160h", *(int(9000 * math.sin(2 * math.pi * 300 * n / 16000)) for n in range(160))
    )
    assert isinstance(vad.process(loud, 0.0), SpeechStarted)
    with pytest.raises(ValueError, match="320"):
        vad.process(SILENCE + SILENCE, 0.01)


@pytest.mark.parametrize("length", [0, 318, 319, 321, 640])
def test_wrong_frame_length_raises(length):
    vad = VoiceActivityDetector()
    with pytest.raises(ValueError, match="expected 320"):
        vad.process(bytes(length), 0.0)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"sample_rate_hz": 11025},
        {"frame_ms": 25},
        {"aggressiveness": 4},
        {"aggressiveness": -1},
        {"start_ms": -1},
        {"stop_ms": -20},
    ],
)
def test_bad_settings_raise(kwargs):
    with pytest.raises(ValueError):
        VoiceActivityDetector(**kwargs)


@pytest.fixture
def spoken_hello(tmp_path: Path) -> bytes:
    if not (shutil.which("espeak-ng") and shutil.which("sox")):
        pytest.skip("espeak-ng and sox are needed for a real speech sample")
    wav = tmp_path / "hello.wav"
    raw = tmp_path / "hello.raw"
    subprocess.run(
        ["espeak-ng", "-w", str(wav), "hello, this is a test of the voice activity detector"],
        check=True,
    )
    sox_to_raw_8k = ["-r", "8000", "-c", "1", "-b", "16", "-e", "signed-integer", "-L"]
    subprocess.run(["sox", str(wav), *sox_to_raw_8k, str(raw)], check=True)
    return raw.read_bytes()


def test_real_speech(spoken_hello: bytes):
    pcm = bytes(6400) + spoken_hello + bytes(32000)  # 0.4 s before, 2 s after
    pcm = pcm[: len(pcm) - len(pcm) % 320]
    frames = [pcm[i : i + 320] for i in range(0, len(pcm), 320)]
    vad = VoiceActivityDetector(start_ms=200, stop_ms=600)
    events = [e for _, e in run(vad, frames, start=0.0)]
    assert isinstance(events[0], SpeechStarted)
    assert 0.3 <= events[0].at <= 0.6
    assert isinstance(events[-1], SpeechStopped)
    spoken_ms = len(spoken_hello) * 1000 // 16000
    assert spoken_ms // 2 <= events[-1].duration_ms <= spoken_ms + 200
    assert vad.state is VadState.QUIET


def test_vad_module_does_no_io():
    code = (
        "import sys\n"
        "import voxgate.pipeline.vad\n"
        "bad = {'trio', 'asyncio'} & set(sys.modules)\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
