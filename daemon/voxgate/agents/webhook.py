"""The integrator's logic behind the local agent: an HTTP webhook or an in-process plugin.

For each input of a step with ``webhook = true`` (every step, by default) the
agent asks the integrator with one JSON object::

    {"session": "…", "tenant": "default", "call": "<Call-ID>", "step": "main",
     "transcript": "balance" | null, "confidence": 0.93 | null, "dtmf": "1" | null}

and the integrator answers ``{"say": "…", "hangup": false, "next": "step"}`` (every
field optional). An empty answer (``{}``, ``null``, HTTP 204) lets the menu answer.

* ``[agent.webhook] url``: an HTTP POST with httpx on trio; a 2xx reply's body
  (at most :data:`MAX_REPLY_BYTES`) is the answer.
* ``[agent] plugin = "module:callable"``: ``async def callable(request: dict) ->
  dict | None``, imported at start, called in the session's task.

Either way at most ``[agent.webhook] max_concurrent`` requests run at once
(the process's, all calls together) and each gets ``[timers]
agent_response_s`` (waiting for its turn included); a late, failed or
malformed answer is counted and logged, and the menu answers instead.
"""

from __future__ import annotations

import abc
import importlib
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import trio

from voxgate.config import AgentConfig
from voxgate.errors import ConfigError, RemoteProtocolError
from voxgate.jsonbounds import loads_untrusted

MAX_REPLY_BYTES = 64 * 1024
MAX_REPLY_DEPTH = 32
"""Deepest nesting of arrays/objects in a reply (the fields used are 1 deep)."""
TIMEOUT_WHEN_DEADMAN_OFF_S = 10.0
"""The integrator's time when ``[timers] agent_response_s`` is 0 (off)."""

Request = Mapping[str, object]
Plugin = Callable[[dict[str, object]], Awaitable[object]]


@dataclass(frozen=True, slots=True)
class Reply:
    """An integrator's answer: ``say`` it, go to step ``next``, ``hangup`` after it."""

    say: str = ""
    hangup: bool = False
    next: str = ""

    @property
    def empty(self) -> bool:
        """Says nothing, moves nowhere, keeps the call: the menu answers instead."""
        return not (self.say or self.hangup or self.next)


def reply_from_untrusted(data: object) -> Reply:
    """A :class:`Reply` from a decoded JSON value (None → the empty reply).

    Raises:
        RemoteProtocolError: not an object, or a field of the wrong type.
    """
    if data is None:
        return Reply()
    if not isinstance(data, dict):
        raise RemoteProtocolError("reply is not a JSON object", status_hint=None)
    say = data.get("say") or ""
    hangup = data.get("hangup") or False
    next_step = data.get("next") or ""
    if not (isinstance(say, str) and isinstance(next_step, str) and isinstance(hangup, bool)):
        raise RemoteProtocolError("reply fields: say and next are strings, hangup a boolean",
                                  status_hint=None)
    return Reply(say, hangup, next_step)


def parse_reply_untrusted(body: bytes) -> Reply:
    """A webhook's response body (UTF-8 JSON, may be empty) → :class:`Reply`.

    Raises:
        RemoteProtocolError: over :data:`MAX_REPLY_BYTES`, not JSON or beyond
            its bounds (:func:`voxgate.jsonbounds.loads_untrusted` with
            :data:`MAX_REPLY_DEPTH`), or as :func:`reply_from_untrusted`.
    """
    if not body.strip():
        return Reply()
    data = loads_untrusted(body, max_bytes=MAX_REPLY_BYTES, max_depth=MAX_REPLY_DEPTH)
    return reply_from_untrusted(data)


@dataclass(frozen=True, slots=True)
class Outcome:
    """What asking gave: a reply (None when there is none to use) and why not."""

    reply: Reply | None
    error: str = ""


Ask = Callable[[Request], Awaitable[Outcome]]


class IntegratorStats:
    """Counters of one integrator, all calls together."""

    __slots__ = ("errors", "requests", "timeouts")

    def __init__(self) -> None:
        self.requests = 0
        self.timeouts = 0
        self.errors = 0
        """Failed requests, non-2xx statuses, malformed replies, plugin exceptions."""


class Integrator(abc.ABC):
    """Bounded, timed access to the integrator's logic; subclasses say how to reach it.

    Args:
        max_concurrent: most requests in flight, process-wide.
        timeout_s: each request's time, waiting for a slot included.
    """

    kind = ""

    def __init__(self, *, max_concurrent: int, timeout_s: float) -> None:
        self._limiter = trio.CapacityLimiter(max_concurrent)
        self.timeout_s = timeout_s or TIMEOUT_WHEN_DEADMAN_OFF_S
        self.stats = IntegratorStats()

    @abc.abstractmethod
    def connect(self) -> AbstractAsyncContextManager[Ask]:
        """One session's use of the integrator: ``async with integrator.connect() as ask``."""

    def _timed(self, call: Callable[[Request], Awaitable[Reply]]) -> Ask:
        async def ask(request: Request) -> Outcome:
            self.stats.requests += 1
            with trio.move_on_after(self.timeout_s):
                async with self._limiter:
                    try:
                        return Outcome(await call(request))
                    except (httpx.HTTPError, RemoteProtocolError) as e:
                        self.stats.errors += 1
                        return Outcome(None, f"{type(e).__name__}: {e}")
            self.stats.timeouts += 1
            return Outcome(None, f"no answer within {self.timeout_s} s")
        return ask


class WebhookIntegrator(Integrator):
    """POSTs each request as JSON to ``url`` (``[agent.webhook] url``)."""

    kind = "webhook"

    def __init__(self, url: str, *, max_concurrent: int, timeout_s: float) -> None:
        super().__init__(max_concurrent=max_concurrent, timeout_s=timeout_s)
        self.url = url
        self._tls: ssl.SSLContext | None = None

    def connect(self) -> AbstractAsyncContextManager[Ask]:
        """One HTTP client per session (keep-alive across its turns), closed at its end."""
        return self._session()

    @asynccontextmanager
    async def _session(self) -> AsyncIterator[Ask]:
        if self._tls is None:
            self._tls = ssl.create_default_context()
        async with httpx.AsyncClient(verify=self._tls, timeout=self.timeout_s,
                                     follow_redirects=False) as client:

            async def post(request: Request) -> Reply:
                return await self._post(client, request)

            yield self._timed(post)

    async def _post(self, client: httpx.AsyncClient, request: Request) -> Reply:
        async with client.stream("POST", self.url, json=dict(request)) as response:
            body = b""
            async for chunk in response.aiter_bytes():
                body += chunk
                if len(body) > MAX_REPLY_BYTES:
                    raise RemoteProtocolError(f"reply over {MAX_REPLY_BYTES} bytes",
                                              status_hint=None)
        if not response.is_success:
            raise RemoteProtocolError(f"HTTP {response.status_code}", status_hint=None)
        return parse_reply_untrusted(body)


class PluginIntegrator(Integrator):
    """Awaits ``plugin(request)`` in the session's task (``[agent] plugin``)."""

    kind = "plugin"

    def __init__(self, plugin: Plugin, *, max_concurrent: int, timeout_s: float) -> None:
        super().__init__(max_concurrent=max_concurrent, timeout_s=timeout_s)
        self._plugin = plugin

    def connect(self) -> AbstractAsyncContextManager[Ask]:
        return self._session()

    @asynccontextmanager
    async def _session(self) -> AsyncIterator[Ask]:
        yield self._timed(self._call)

    async def _call(self, request: Request) -> Reply:
        try:
            answer = await self._plugin(dict(request))
        except Exception as e:  # the integrator's code: contain it, the call goes on
            raise RemoteProtocolError(f"plugin raised {e!r}", status_hint=None) from e
        return reply_from_untrusted(answer)


def load_plugin(spec: str) -> Plugin:
    """Import ``module:callable`` (``[agent] plugin``).

    Raises:
        ConfigError: not ``module:callable``, not importable, or not callable.
    """
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"[agent] plugin: must be \"module:callable\", got {spec!r}")
    try:
        target: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            target = getattr(target, part)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"[agent] plugin: cannot load {spec!r}: {e}") from e
    if not callable(target):
        raise ConfigError(f"[agent] plugin: {spec!r} is not callable")
    plugin: Plugin = target
    return plugin


def integrator_for(agent: AgentConfig, timeout_s: float) -> Integrator | None:
    """The integrator ``agent`` configures (webhook or plugin), or None.

    Raises:
        ConfigError: as :func:`load_plugin`.
    """
    limit = agent.webhook.max_concurrent
    if agent.webhook.url:
        return WebhookIntegrator(agent.webhook.url, max_concurrent=limit, timeout_s=timeout_s)
    if agent.plugin:
        return PluginIntegrator(load_plugin(agent.plugin), max_concurrent=limit,
                                timeout_s=timeout_s)
    return None
