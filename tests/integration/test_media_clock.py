"""The media clock late by whole frames: each call loses those frames once, no lasting delay.

``[watchdog] test_block_s`` arms the test-only hook: SIGUSR2 blocks the
event loop for that long (see ``test_watchdog.py``). A call from a
:class:`~tests.harness.phone.Phone` streams the looped clip and measures the
echo's delay in 20 ms frames from RTP timestamps (both sides stamp by their
clock, not by when their thread ran), so the figures are free of this
machine's scheduling: before the block, after it, and the frames skipped.
"""

from __future__ import annotations

import signal
import statistics
import time

from tests.harness.audio import SpeechClip
from tests.harness.phone import Phone
from tests.integration.conftest import StartDaemon
from tests.integration.test_control import ctl_json
from tests.integration.test_recovery import session_id, ulaw_clip

BLOCK_S = 0.2
SETTLE_S = 2.0


def test_a_blocked_loop_costs_each_call_its_missed_frames_once_not_lasting_delay(
    start_daemon: StartDaemon, clip: SpeechClip
) -> None:
    daemon = start_daemon({"watchdog": {"test_block_s": BLOCK_S}})
    with Phone(daemon) as phone:
        peer = phone.rtp_peer()
        peer.play(ulaw_clip(clip), loop=True)
        call = phone.call(media=peer)
        assert call.final_status == 200, call.final
        peer.resume()
        sid = session_id(daemon, call)
        time.sleep(SETTLE_S)
        before = statistics.median(peer.echo_delays_frames(since=time.monotonic() - 1.0))
        daemon.proc.send_signal(signal.SIGUSR2)
        daemon.wait_log(r"event=test_block_loop\b")
        time.sleep(SETTLE_S)  # the jitter buffer gives back what it grew within 1 s
        after = statistics.median(peer.echo_delays_frames(since=time.monotonic() - 0.5))
        stats = ctl_json(daemon, "show", sid)["stats"]
    # Unfixed, every frame missed during the block stayed queued: +10 frames for good.
    assert after - before <= 1, (before, after, stats)
    assert stats["playout_skipped"] >= 5, stats  # ~10 frames' ticks passed while blocked
