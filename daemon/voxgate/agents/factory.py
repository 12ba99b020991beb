"""``[agent] kind`` → the agent class run on each call."""

from __future__ import annotations

from voxgate.agents.base import Agent
from voxgate.agents.diagnostic import BabbleAgent, SilentAgent
from voxgate.agents.echo import EchoAgent
from voxgate.pipeline.playout import Playout

AGENTS: dict[str, type[Agent]] = {
    "echo": EchoAgent,
    "silent": SilentAgent,
    "babble": BabbleAgent,
}


def make_agent(kind: str, playout: Playout) -> Agent:
    """A new agent of ``kind`` (validated by the config) speaking into ``playout``."""
    return AGENTS[kind](playout)
