"""Diagnostic agents for testing a box's deadman timers and memory budgets.

- ``silent`` never speaks: after each caller turn the agent-response deadman
  fires and the fallback prompt plays.
- ``babble`` speaks without end, five times faster than real time, so its
  playout queue hits the budget: drops are counted and the session ends with
  reason ``budget`` after ``[budget] budget_grace_ms``.
"""

from __future__ import annotations

import math
import struct

from voxgate.agents.base import Agent

BABBLE_FRAMES_PER_TICK = 5
_TONE = struct.pack(
    "<160h", *(int(8000 * math.sin(2 * math.pi * 440 * n / 8000)) for n in range(160))
)


class SilentAgent(Agent):
    """Listens and never answers."""


class BabbleAgent(Agent):
    """Queues five 20 ms frames of a 440 Hz tone per inbound frame."""

    def on_frame(self, pcm: bytes, now: float) -> None:
        for _ in range(BABBLE_FRAMES_PER_TICK):
            self.playout.push(_TONE)
