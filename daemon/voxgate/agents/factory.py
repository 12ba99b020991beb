"""``[agent] kind`` → the agent run on each call."""

from __future__ import annotations

from voxgate.agents.base import Agent
from voxgate.agents.diagnostic import BabbleAgent, SilentAgent
from voxgate.agents.echo import EchoAgent
from voxgate.budget import SessionBudget
from voxgate.config import Config
from voxgate.errors import ConfigError
from voxgate.pipeline.playout import Playout

AGENTS: dict[str, type[Agent]] = {
    "echo": EchoAgent,
    "silent": SilentAgent,
    "babble": BabbleAgent,
}
"""The agents that need nothing but their playout; ``local`` is built below."""


def check_agent(config: Config) -> None:
    """Load now what would otherwise fail on the first call: the local agent's
    ``[agent] plugin`` import and its menu's words in the recogniser's dictionary.

    Raises:
        ConfigError: naming the file and the key.
    """
    if config.agent.kind != "local":
        return
    from voxgate.agents.local import shared_runtime

    try:
        shared_runtime(config).recognizer.check_words()
    except ConfigError as e:
        raise ConfigError(f"{config.source}: {e}") from e


def make_agent(config: Config, playout: Playout, budget: SessionBudget) -> Agent:
    """A new agent of ``[agent] kind`` (validated by the config) speaking into ``playout``.

    ``budget`` holds the session's buffers (the local agent collects the
    caller's speech in its ``utterance`` buffer). The local agent and its
    recogniser, synthesiser and webhook client are imported on first use.

    Raises:
        ConfigError: ``[agent] plugin`` cannot be loaded (local agent).
    """
    if config.agent.kind == "local":
        from voxgate.agents.local import LocalAgent, shared_runtime

        return LocalAgent(playout, budget, shared_runtime(config),
                          vad_start_ms=config.vad.start_ms)
    return AGENTS[config.agent.kind](playout)
