"""Local agent benchmark: response latency and concurrent sessions per core.

Starts ``voxgated`` with ``[agent] kind = "local"`` pinned to one CPU, then
for 1, 2, 4 … concurrent calls has every caller talk to the built-in menu
(espeak-ng phrases as PCMU RTP: "balance", "one two three", "yes", …). For
each turn it measures, from the caller's side, the time from the end of the
caller's phrase to the first agent audio received (so it includes ``[vad]
stop_ms``, recognition, synthesis and the network), and prints p50/p95 per
level together with the daemon's own figure (``response_ms`` of its
``agent_turn`` lines). "Sessions per core" is the largest level whose p95
stays within ``[vad] stop_ms`` + 1 s. Figures only: never pass/fail.
"""

from __future__ import annotations

import sys
import tempfile
import threading
import time
from pathlib import Path

from tests.agents.speech import speak_ulaw
from tests.harness import missing_tools
from tests.harness.audio import decode_g711, rms_dbfs
from tests.harness.daemon import Daemon, running_daemon
from tests.harness.pcap import percentile
from tests.harness.phone import Phone, RtpPeer

LEVELS = (1, 4, 8, 16, 32)
TURNS_PER_CALL = 3
PHRASES = ("balance", "one two three", "yes")
"""What callers say, in turn; the built-in menu goes main → account → more → main."""
STOP_MS = 500
BUDGET_ABOVE_STOP_S = 1.0
SPEECH_DBFS = -40.0
QUIET_S = 0.6
POLL_S = 0.02


def speech_clip(text: str) -> tuple[bytes, float]:
    """The phrase as µ-law, and where its speech ends (seconds; espeak-ng adds silence)."""
    ulaw = speak_ulaw(text)
    loud = [i for i in range(0, len(ulaw), 160)
            if rms_dbfs(decode_g711(ulaw[i:i + 160], "PCMU")) > SPEECH_DBFS]
    return ulaw, (loud[-1] + 160) / 8000


def first_speech_after(peer: RtpPeer, since: float, timeout_s: float = 15.0) -> float | None:
    """When the agent's first speech after ``since`` arrived (monotonic s), None if none."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for packet in peer.received(since):
            if rms_dbfs(decode_g711(packet.payload, "PCMU")) > SPEECH_DBFS:
                return packet.at
        time.sleep(POLL_S)
    return None


def wait_quiet(peer: RtpPeer, since: float, timeout_s: float = 30.0) -> None:
    """Wait until the agent, heard after ``since``, has been quiet for ``QUIET_S``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        packets = peer.received(since)
        loud = [p.at for p in packets if rms_dbfs(decode_g711(p.payload, "PCMU")) > SPEECH_DBFS]
        if loud and time.monotonic() - loud[-1] >= QUIET_S:
            return
        time.sleep(0.1)


def _caller(phone: Phone, clips: dict[str, tuple[bytes, float]],
            latencies: dict[str, list[float]], failures: list[str]) -> None:
    peer = phone.rtp_peer()
    call = phone.call(media=peer)
    if call.final_status != 200:
        failures.append(f"INVITE answered {call.final_status}")
        return
    peer.resume()
    wait_quiet(peer, call.final_at or time.monotonic())
    for turn in range(TURNS_PER_CALL):
        phrase = PHRASES[turn % len(PHRASES)]
        clip, speech_s = clips[phrase]
        started = time.monotonic()
        peer.play(clip)
        spoken_end = started + speech_s
        first = first_speech_after(peer, spoken_end)
        if first is None:
            failures.append("no answer")
            break
        latencies[phrase].append(first - spoken_end)
        wait_quiet(peer, first)
    phone.hang_up(call)


def _level(daemon: Daemon, calls: int, clips: dict[str, tuple[bytes, float]]) -> list[float]:
    by_phrase: dict[str, list[float]] = {phrase: [] for phrase in PHRASES}
    failures: list[str] = []
    turns_before = len(daemon.events("agent_turn"))
    with Phone(daemon) as phone:
        threads = [threading.Thread(target=_caller, args=(phone, clips, by_phrase, failures))
                   for _ in range(calls)]
        for thread in threads:
            thread.start()
            time.sleep(0.05)
        for thread in threads:
            thread.join()
    latencies = [s for phrase in PHRASES for s in by_phrase[phrase]]
    daemon_ms = [float(t["response_ms"]) for t in daemon.events("agent_turn")[turns_before:]
                 if "response_ms" in t]
    line = f"{calls:3d} calls: {len(latencies):3d} turns"
    if latencies:
        line += (f", caller-side p50 {percentile(latencies, 50) * 1000:6.0f} ms "
                 f"p95 {percentile(latencies, 95) * 1000:6.0f} ms")
    if daemon_ms:
        line += (f"; daemon response_ms p50 {percentile(daemon_ms, 50):6.0f} "
                 f"p95 {percentile(daemon_ms, 95):6.0f}")
    if failures:
        line += f"; {len(failures)} failed ({failures[0]})"
    line += "\n      caller-side p50 per phrase: " + ", ".join(
        f"{phrase!r} {percentile(values, 50) * 1000:.0f} ms"
        for phrase, values in by_phrase.items() if values)
    print(line, flush=True)
    return latencies


def main() -> int:
    missing = missing_tools("espeak-ng", "taskset")
    if missing:
        print(f"agent_latency: missing {', '.join(missing)}", file=sys.stderr)
        return 1
    clips = {phrase: speech_clip(phrase) for phrase in PHRASES}
    per_core = 0
    with tempfile.TemporaryDirectory(prefix="voxgate-agent-bench-") as tmp, running_daemon(
        Path(tmp), {"agent": {"kind": "local"}, "vad": {"stop_ms": STOP_MS},
                    "rtp": {"jitter_buffer_ms": 100}, "limits": {"max_sessions": 200}},
        rtp_ports=400, cpu=0,
    ) as daemon:
        print(f"voxgated pid {daemon.pid} pinned to CPU 0, local agent, [vad] stop_ms "
              f"{STOP_MS}; {TURNS_PER_CALL} turns per call")
        for calls in LEVELS:
            latencies = _level(daemon, calls, clips)
            if not latencies or len(latencies) < calls * TURNS_PER_CALL:
                break
            if percentile(latencies, 95) > STOP_MS / 1000 + BUDGET_ABOVE_STOP_S:
                break
            per_core = calls
        print(f"concurrent local-agent sessions per core (p95 response within stop_ms + "
              f"{BUDGET_ABOVE_STOP_S:.0f} s, all turns answered): {per_core}"
              f"{'+' if per_core == LEVELS[-1] else ''}")
        daemon.terminate()
    return 0


if __name__ == "__main__":
    sys.exit(main())
