"""The diagnostic echo agent: every inbound frame goes straight back out.

Like a PBX echo-test extension, it makes the daemon's added latency and the
media path's health measurable (``bench/sip_load.py``).
"""

from __future__ import annotations

from voxgate.agents.base import Agent


class EchoAgent(Agent):
    """Queues each inbound 20 ms PCM16 frame for playout, unchanged."""

    def on_frame(self, pcm: bytes, now: float) -> None:
        self.playout.push(pcm)
