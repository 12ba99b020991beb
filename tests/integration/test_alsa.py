"""ALSA lines against the real daemon, through ALSA's ``file`` plugin.

The capture PCM reads the speech clip from a raw file, the playback PCM
writes into another; the echo agent must bring the clip back out, in order
and at the pace of real time. Also ``voxgatectl line start|stop`` and
``voxgatectl devices``.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.harness.audio import SpeechClip, compare_echo
from tests.harness.daemon import REPO_ROOT, Daemon
from tests.integration.conftest import StartDaemon
from tests.integration.test_control import control_socket, ctl_json, ctl_ok, voxgatectl, wait_until

pytest.importorskip("alsaaudio", reason="pyalsaaudio is not installed "
                    "(pip install pyalsaaudio; building it needs libasound2-dev)")
pytestmark = pytest.mark.skipif(
    "AlsaLines" not in (REPO_ROOT / "daemon/voxgate/supervisor.py").read_text(),
    reason="the supervisor does not run ALSA lines yet",
)

BYTES_PER_S = 16_000
"""8 kHz PCM16 mono."""
EX_REFUSED = 1


def file_plugin(directory: Path, capture: bytes, *names: str) -> dict[str, str]:
    """An asoundrc with ``NAMEcap`` (reads capture.raw) and ``NAMEplay`` (writes
    NAME.raw) per name; returns the env that points ALSA at it."""
    (directory / "capture.raw").write_bytes(capture)
    text = ""
    for name in names:
        text += (
            f"pcm.{name}cap {{\n  type file\n  slave.pcm {{ type null }}\n"
            f'  file "/dev/null"\n  infile "{directory}/capture.raw"\n  format "raw"\n'
            "  hint { show on }\n}\n"
            f"pcm.{name}play {{\n  type file\n  slave.pcm {{ type null }}\n"
            f'  file "{directory}/{name}.raw"\n  format "raw"\n  hint {{ show on }}\n}}\n'
        )
    (directory / "asoundrc").write_text(text)
    return {"ALSA_CONFIG_PATH": str(directory / "asoundrc")}


def line(name: str, mode: str) -> dict[str, str | int]:
    return {"name": name, "capture": f"{name}cap", "playback": f"{name}play", "rate": 8000,
            "mode": mode}


def start(start_daemon: StartDaemon, tmp_path: Path, capture: bytes,
          *lines: dict[str, str | int]) -> Daemon:
    env = file_plugin(tmp_path, capture, *(str(ln["name"]) for ln in lines))
    return start_daemon({"alsa": {"retry_initial_s": 0.5, "retry_max_s": 2.0},
                         "alsa.lines": list(lines)}, env=env)


def alsa_sessions(daemon: Daemon) -> list[dict[str, object]]:
    return [s for s in ctl_json(daemon, "sessions") if s["transport"] == "alsa"]


def test_line_echoes_the_clip_in_order_and_paced(start_daemon, tmp_path, clip: SpeechClip):
    daemon = start(start_daemon, tmp_path, clip.pcm16, line("door", "always"))
    out = tmp_path / "door.raw"
    wait_until(lambda: out.exists() and out.stat().st_size > 0, "playback output")
    size, at = out.stat().st_size, time.monotonic()
    time.sleep(1.0)
    grown, elapsed = out.stat().st_size - size, time.monotonic() - at
    assert 0.8 * BYTES_PER_S * elapsed <= grown <= 1.2 * BYTES_PER_S * elapsed + 1280, grown
    wait_until(lambda: out.stat().st_size >= (clip.duration_s + 0.5) * BYTES_PER_S,
               "the whole clip echoed", timeout_s=clip.duration_s + 10)
    match = compare_echo(out.read_bytes(), clip.pcm16)
    assert match.segments_matched >= 0.7, match
    assert 0 <= match.lag_s < 0.5, match
    [start_event] = [e for e in daemon.events("call_start") if e.get("transport") == "alsa"]
    assert start_event["line"] == "door"
    assert start_event["pacing"] == "timer"


def test_on_demand_line_start_and_stop(start_daemon, tmp_path, clip: SpeechClip):
    daemon = start(start_daemon, tmp_path, clip.pcm16, line("desk", "on-demand"),
                   line("lobby", "always"))
    wait_until(lambda: len(alsa_sessions(daemon)) == 1, "the always line's session")
    assert "line desk starting" in ctl_ok(daemon, "line", "start", "desk")
    wait_until(lambda: len(alsa_sessions(daemon)) == 2, "the on-demand line's session")
    assert ctl_json(daemon, "line", "stop", "desk") == {"message": "line desk stopping"}
    wait_until(lambda: len(alsa_sessions(daemon)) == 1, "the on-demand session ended")
    ended = [e for e in daemon.events("call_end") if e.get("transport") == "alsa"]
    assert [e["reason"] for e in ended] == ["operator"]
    records = ctl_json(daemon, "calls", "--reason", "operator")
    assert [(r["transport"], r["state"], r["call_id"]) for r in records] == [
        ("alsa", "ended", f"desk-{ended[0]['session_id']}")]
    refused = voxgatectl(control_socket(daemon), "line", "stop", "lobby")
    assert refused.returncode == EX_REFUSED
    assert "not-on-demand" in refused.stderr
    assert voxgatectl(control_socket(daemon), "line", "start", "nope").returncode == EX_REFUSED


def test_devices_lists_the_alsa_pcms(start_daemon, tmp_path, clip: SpeechClip):
    daemon = start(start_daemon, tmp_path, clip.pcm16, line("door", "on-demand"))
    text = ctl_ok(daemon, "devices")
    assert text.splitlines()[0].split()[:2] == ["#", "NAME"]
    rows = ctl_json(daemon, "devices")
    assert {"doorcap", "doorplay"} <= {r["name"] for r in rows if r["kind"] == "pcm"}
