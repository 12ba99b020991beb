"""``[agent] kind`` → the agent run on each call."""

from __future__ import annotations

from typing import TYPE_CHECKING

from voxgate.agents.base import Agent
from voxgate.agents.diagnostic import BabbleAgent, SilentAgent
from voxgate.agents.echo import EchoAgent
from voxgate.budget import SessionBudget
from voxgate.config import Config
from voxgate.errors import ConfigError, LocalProtocolError
from voxgate.pipeline.playout import Playout

if TYPE_CHECKING:
    from voxgate.agents.stream import ProviderPool

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
    if "local" not in agent_kinds(config):
        return
    from voxgate.agents.local import shared_runtime

    try:
        shared_runtime(config).recognizer.check_words()
    except ConfigError as e:
        raise ConfigError(f"{config.source}: {e}") from e


def agent_kinds(config: Config) -> set[str]:
    """Every agent kind the config runs: ``[agent]``'s and the tenants' own."""
    return {config.agent.kind} | {t.agent for t in config.tenants if t.agent}


def agent_kind(config: Config, tenant: str) -> str:
    """The agent kind ``tenant``'s calls run: its own ``agent``, else ``[agent] kind``."""
    own = next((t for t in config.tenants if t.name == tenant and t.agent), None)
    return config.agent.kind if own is None else own.agent


def make_agent(config: Config, playout: Playout, budget: SessionBudget, *,
               tenant: str = "default", providers: ProviderPool | None = None,
               kind: str | None = None) -> Agent:
    """A new agent of ``kind`` (one of :func:`agent_kinds`, e.g. ``voxgatectl call
    --agent``), else of the tenant's kind (its ``agent`` key, else ``[agent] kind``;
    validated by the config) speaking into ``playout``.

    ``budget`` holds the session's buffers (the local agent collects the
    caller's speech in its ``utterance`` buffer). The local agent and its
    recogniser, synthesiser and webhook client are imported on first use.

    The stream agent takes its providers (the tenant's ``providers``, else all)
    from ``providers``, the daemon's :class:`~voxgate.agents.stream.ProviderPool`.

    Raises:
        ConfigError: ``[agent] plugin`` cannot be loaded (local agent).
        LocalProtocolError: a stream agent without a provider pool.
    """
    own = next((t for t in config.tenants if t.name == tenant), None)
    kind = kind or agent_kind(config, tenant)
    if kind == "stream":
        from voxgate.agents.stream import StreamAgent

        if providers is None:
            raise LocalProtocolError("the stream agent needs the daemon's provider pool")
        return StreamAgent(playout, providers, own.providers if own is not None else (),
                           recovery_window_s=config.timers.recovery_window_s)
    if kind == "local":
        from voxgate.agents.local import LocalAgent, shared_runtime

        return LocalAgent(playout, budget, shared_runtime(config),
                          vad_start_ms=config.vad.start_ms)
    return AGENTS[kind](playout)
