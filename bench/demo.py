"""``make demo``: real conversations with the daemon's local voice agent, in about a minute.

Starts ``voxgated`` with ``[agent] kind = "local"`` (the built-in menu:
balance, agent, goodbye) on free loopback ports and places three SIP calls
from a test phone (:mod:`tests.harness.phone`). Each caller speaks
espeak-ng phrases as PCMU RTP, waiting for the agent's answer after each;
the last one talks over the greeting (barge-in). For each call the demo
prints what the caller said, what the agent recognised (with confidence)
and what it answered, with the response latency, and how the call ended.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from tests.agents.speech import speak_ulaw
from tests.harness import missing_tools
from tests.harness.audio import decode_g711, rms_dbfs
from tests.harness.daemon import Daemon, running_daemon
from tests.harness.phone import Phone, RtpPeer

CONVERSATIONS = (
    ("balance, an account number, no more", ("balance", "one two three", "no"), False),
    ("an agent, then goodbye", ("agent", "yes", "goodbye"), False),
    ("goodbye over the greeting", ("goodbye",), True),
)
SPEECH_DBFS = -40.0
QUIET_S = 0.8


def _wait_quiet(peer: RtpPeer, since: float, timeout_s: float = 20.0) -> None:
    """Until the agent has spoken after ``since`` and then been quiet for ``QUIET_S``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        loud = [p.at for p in peer.received(since)
                if rms_dbfs(decode_g711(p.payload, "PCMU")) > SPEECH_DBFS]
        if loud and time.monotonic() - loud[-1] >= QUIET_S:
            return
        time.sleep(0.1)


def _turns(daemon: Daemon, call_id: str) -> list[dict[str, str]]:
    return [turn for turn in daemon.events("agent_turn") if turn["call_id"] == call_id]


def _converse(daemon: Daemon, title: str, phrases: tuple[str, ...], barge_in: bool) -> None:
    print(f"\ncall: {title}")
    with Phone(daemon) as phone:
        peer = phone.rtp_peer()
        call = phone.call(media=peer)
        if call.final_status != 200:
            print(f"  INVITE answered {call.final_status}")
            return
        peer.resume()
        if barge_in:
            time.sleep(1.5)  # the greeting is playing
        else:
            _wait_quiet(peer, call.final_at or time.monotonic())
        for phrase in phrases:
            if call.bye is not None:
                break
            answered = len(_turns(daemon, call.call_id)) + 1
            print(f"  caller says: {phrase!r}")
            peer.play(speak_ulaw(phrase))
            deadline = time.monotonic() + 10
            while len(_turns(daemon, call.call_id)) < answered and time.monotonic() < deadline:
                time.sleep(0.05)
            _wait_quiet(peer, time.monotonic() - 0.5)
        if call.bye is None:
            phone.hang_up(call)
    for turn in _turns(daemon, call.call_id):
        if turn["input"] == "greeting":
            print(f"  agent greets: {turn['say']!r}")
            continue
        heard = (f"keys {turn['dtmf']!r}" if turn["input"] == "dtmf" else
                 f"heard {turn.get('transcript', '')!r} (confidence {turn.get('confidence')})")
        cut = ", after cutting the agent short" if turn.get("barged_in") == "True" else ""
        print(f"  agent {heard}{cut} -> says {turn['say']!r} "
              f"[{turn.get('source')}, response {turn.get('response_ms', '-')} ms, "
              f"recognition {turn.get('recognition_ms', '-')} ms, "
              f"synthesis {turn.get('synthesis_ms')} ms]")
    for end in daemon.events("call_end"):
        if end["call_id"] == call.call_id:
            print(f"  call ended: {end['reason']} after {float(end['duration_s']):.1f} s")


def main() -> int:
    missing = missing_tools("espeak-ng")
    if missing:
        print(f"demo: missing {', '.join(missing)}: run `make setup` as root", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="voxgate-demo-") as tmp, running_daemon(
        Path(tmp), {"agent": {"kind": "local"}, "vad": {"stop_ms": 500},
                    "rtp": {"jitter_buffer_ms": 100}},
    ) as daemon:
        print(f"voxgated pid {daemon.pid}: SIP {daemon.sip_address[0]}:{daemon.sip_port}, "
              f"local agent (pocketsphinx + espeak-ng, built-in menu)")
        for title, phrases, barge_in in CONVERSATIONS:
            _converse(daemon, title, phrases, barge_in)
        print(f"\nstopping voxgated: exit {daemon.terminate()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
