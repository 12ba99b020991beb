"""Agent fallback, session memory budgets and the RSS gate against the real daemon.

Calls come from a :class:`~tests.harness.phone.Phone` whose RTP peer streams
the speech clip. The diagnostic agents make the deadmans fire on purpose:
``silent`` never answers (the fallback prompt plays after
``agent_response_s``), ``babble`` speaks five times faster than real time (the
playout queue hits its cap, drops are counted, and the session ends with
reason ``budget`` after the grace period). The RSS watermarks are set below
the daemon's real RSS by a config reload (SIGHUP), which the memory loop
applies at its next one-second sample.
"""

from __future__ import annotations

import signal
import subprocess
import time
import tomllib
from pathlib import Path
from typing import Any

import pytest

from tests.harness import missing_tools
from tests.harness.audio import SpeechClip, compare_echo, read_wav
from tests.harness.daemon import Daemon, parse_logfmt, render_toml
from tests.harness.phone import FRAME_BYTES, Phone, headers_of
from tests.integration.conftest import StartDaemon
from tests.integration.test_control import ctl_json, wait_until
from tests.integration.test_recovery import (
    LATE_S,
    hang_up_with_bye,
    live_call,
    metric,
    session_events,
    session_id,
    ulaw_clip,
    wait_echo,
    wait_event,
)

MIB = 1 << 20
PROMPT_TEXT = "Sorry, I did not catch that. Please say it again."
AGENT_RESPONSE_S = 1.0
VAD_STOP_S = 0.6
"""The daemon's default ``[vad] stop_ms``: the caller's turn ends this long after speech."""
JITTER_MAX_MS = 200
SESSION_BYTES = 4096
PLAYOUT_MS = 500
GRACE_MS = 3000
PLAYOUT_CAP_BYTES = PLAYOUT_MS * 16  # PCM16 at 8 kHz
JITTER_CAP_BYTES = JITTER_MAX_MS * 8  # G.711 at 8 kHz
PCM_FRAME_BYTES = 2 * FRAME_BYTES
RSS_GROWTH_LIMIT_BYTES = 4 * MIB
"""How far the daemon's RSS may rise while one babbling call runs into its budget."""
SHED_INTERVAL_S = 1.0
"""The memory loop samples RSS (and sheds at most one session) once a second."""


@pytest.fixture(scope="module")
def prompt_wav(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The fallback prompt: espeak-ng speech as 8 kHz mono 16-bit PCM WAV (sox)."""
    missing = missing_tools("espeak-ng", "sox")
    if missing:
        pytest.skip(f"missing {', '.join(missing)} (apt-get install espeak-ng sox)")
    directory = tmp_path_factory.mktemp("prompt")
    speech, prompt = directory / "espeak.wav", directory / "prompt.wav"
    for argv in (["espeak-ng", "-s", "165", "-w", str(speech), PROMPT_TEXT],
                 ["sox", str(speech), "-r", "8000", "-c", "1", "-b", "16", "-e", "signed-integer",
                  str(prompt), "gain", "-n", "-3"]):
        subprocess.run(argv, check=True, capture_output=True, timeout=30)
    return prompt


def rss_bytes(daemon: Daemon) -> int:
    """The daemon's resident set size (``VmRSS`` of ``/proc/PID/status``) in bytes."""
    for line in Path(f"/proc/{daemon.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {daemon.pid}")


def reload_budget(daemon: Daemon, **keys: int) -> None:
    """Set ``[budget]`` keys in the daemon's config file, SIGHUP it, wait for ``reloaded``."""
    config: dict[str, Any] = tomllib.loads(daemon.config_path.read_text())
    config.setdefault("budget", {}).update(keys)
    daemon.config_path.write_text(render_toml(config))
    reloads = len(daemon.events("reloaded"))
    daemon.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: len(daemon.events("reloaded")) > reloads, "the reload")


def test_silent_agent_gets_the_fallback_prompt(
    start_daemon: StartDaemon, clip: SpeechClip, prompt_wav: Path
) -> None:
    prompt = read_wav(prompt_wav).to_pcm16()
    prompt_s = len(prompt) / 2 / 8000
    daemon = start_daemon({
        "agent": {"kind": "silent", "fallback_prompt": str(prompt_wav)},
        "timers": {"agent_response_s": AGENT_RESPONSE_S},
    })
    with Phone(daemon) as phone:
        peer = phone.rtp_peer()
        peer.play(ulaw_clip(clip))  # the caller's turn, then silence
        call = phone.call(media=peer)
        assert call.final_status == 200, call.final
        peer.resume()
        sid = session_id(daemon, call)
        fallback = wait_event(daemon, "agent_fallback", sid,
                              clip.duration_s + VAD_STOP_S + AGENT_RESPONSE_S + 3 * LATE_S)
        seen_at = time.monotonic()
        assert int(fallback["prompt_frames"]) == -(-len(prompt) // PCM_FRAME_BYTES), fallback
        time.sleep(prompt_s + LATE_S / 2)
        match = compare_echo(peer.audio(since=seen_at - 0.5), prompt)
        assert match.segments_matched >= 0.7, match
        assert match.overlap_s >= prompt_s - 0.5, match
        assert 0.0 <= match.lag_s <= 1.0, match  # it started when the deadman fired
        assert ctl_json(daemon, "show", sid)["stats"]["agent_fallbacks"] == 1
        hang_up_with_bye(phone, daemon, call, sid)
    assert len(session_events(daemon, "agent_fallback", sid)) == 1
    assert metric(daemon, "voxgate_agent_fallbacks_total") == 1


def test_babbling_agent_is_bounded_then_ended_by_its_budget(
    start_daemon: StartDaemon, clip: SpeechClip
) -> None:
    daemon = start_daemon({
        "agent": {"kind": "babble"},
        "rtp": {"jitter_buffer_max_ms": JITTER_MAX_MS},
        "budget": {"session_bytes": SESSION_BYTES, "playout_ms": PLAYOUT_MS,
                   "budget_grace_ms": GRACE_MS},
    })
    time.sleep(1.0)  # the daemon settles after READY
    rss_before = rss_bytes(daemon)
    with Phone(daemon) as phone:
        peer = phone.rtp_peer()
        peer.play(ulaw_clip(clip), loop=True)
        call = phone.call(media=peer)
        assert call.final_status == 200, call.final
        peer.resume()
        sid = session_id(daemon, call)
        drops = wait_until(lambda: metric(daemon, 'voxgate_budget_drops_total{buffer="playout"}'),
                           "playout drops", GRACE_MS / 1000)
        info = ctl_json(daemon, "show", sid)
        assert call.bye is None and drops > 0, "the drops were counted while the call ran"
        budget, playout = info["budget"], info["budget"]["buffers"]["playout"]
        assert playout["cap_bytes"] == PLAYOUT_CAP_BYTES, budget
        assert 0 < playout["held_bytes"] <= PLAYOUT_CAP_BYTES, budget
        assert playout["drops_frames"] > 0 and playout["drops_bytes"] > 0, budget
        assert budget["session_bytes"] == SESSION_BYTES, budget
        assert budget["total_bytes"] > SESSION_BYTES, budget  # over, within its grace
        rss_peak = rss_before
        while call.bye is None and time.monotonic() - (call.final_at or 0) < 10:
            rss_peak = max(rss_peak, rss_bytes(daemon))
            time.sleep(0.1)
        bye = phone.wait_bye(call, GRACE_MS / 1000 + LATE_S)
        assert headers_of(bye)["x-voxgate-reason"] == ["budget"], bye
        assert call.bye_at is not None and call.final_at is not None
        assert GRACE_MS / 1000 <= call.bye_at - call.final_at <= GRACE_MS / 1000 + 2 * LATE_S
        end = wait_event(daemon, "call_end", sid, LATE_S)
    assert end["reason"] == "budget", end
    peak = int(end["peak_bytes"])
    assert SESSION_BYTES < peak <= PLAYOUT_CAP_BYTES + JITTER_CAP_BYTES + PCM_FRAME_BYTES, end
    assert rss_peak - rss_before <= RSS_GROWTH_LIMIT_BYTES, (rss_before, rss_peak)
    assert rss_bytes(daemon) - rss_before <= RSS_GROWTH_LIMIT_BYTES
    assert metric(daemon, 'voxgate_budget_drops_total{buffer="playout"}') >= drops


def test_soft_watermark_refuses_new_calls_and_keeps_the_live_one(
    start_daemon: StartDaemon, clip: SpeechClip
) -> None:
    daemon = start_daemon({"limits": {"retry_after_s": 7}})
    with Phone(daemon) as phone:
        call, peer, sid = live_call(phone, daemon, ulaw_clip(clip))
        reload_budget(daemon, rss_soft_bytes=1 * MIB, rss_hard_bytes=1 << 40)
        gate = wait_until(lambda: daemon.events("memory_gate"), "memory_gate",
                          SHED_INTERVAL_S + LATE_S)
        closed_at = time.monotonic()
        assert gate[0]["state"] == "soft", gate
        refused = phone.call()
        assert refused.final_status == 503, refused.final
        assert refused.header("Warning") == '399 voxgate "memory"', refused.final
        assert refused.header("Retry-After") == "7", refused.final
        wait_echo(peer, closed_at)  # the call in progress carries on
        status = ctl_json(daemon, "status")
        assert status["admitting"] is False and status["not_admitting_because"] == "memory"
        assert status["health"]["healthy"] is False, status["health"]
        assert status["health"]["components"]["memory"]["healthy"] is False, status["health"]
        assert [s["id"] for s in ctl_json(daemon, "sessions")] == [sid]
        hang_up_with_bye(phone, daemon, call, sid)
    assert not daemon.events("memory_shed")


def test_hard_watermark_sheds_the_newest_session_first(
    start_daemon: StartDaemon, clip: SpeechClip
) -> None:
    daemon = start_daemon()
    with Phone(daemon) as phone:
        older, _, older_sid = live_call(phone, daemon, ulaw_clip(clip))
        newer, _, newer_sid = live_call(phone, daemon, ulaw_clip(clip))
        reload_budget(daemon, rss_soft_bytes=1 * MIB, rss_hard_bytes=2 * MIB)
        for call in (newer, older):
            bye = phone.wait_bye(call, 2 * SHED_INTERVAL_S + LATE_S)
            assert headers_of(bye)["x-voxgate-reason"] == ["memory-shed"], bye
        assert newer.bye_at is not None and older.bye_at is not None
        assert newer.bye_at < older.bye_at, "the older session was shed first"
        for sid in (newer_sid, older_sid):
            wait_event(daemon, "call_end", sid, LATE_S)
    shed = [e["session_id"] for e in daemon.events("memory_shed")]
    assert shed == [newer_sid, older_sid], shed
    ends = [parse_logfmt(line) for line in daemon.log_text().splitlines()
            if "event=call_end " in line]
    assert [(e["session_id"], e["reason"]) for e in ends] == [
        (newer_sid, "memory-shed"), (older_sid, "memory-shed")]
    assert daemon.events("memory_gate")[0]["state"] == "hard"
