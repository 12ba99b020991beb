"""The integrator's logic behind the local agent: an HTTP webhook or an in-process plugin.

For each input of a step with ``webhook = true`` (every step, by default),
no-matches included, the agent asks the integrator with one JSON object::

    {"session": "…", "tenant": "default", "call": "<Call-ID>", "step": "main",
     "transcript": "can you call me back tomorrow" | null, "intent": "no-match",
     "confidence": 0.0 | null, "dtmf": "1" | null, "digits": "456" | null,
     "confirming": false}

* ``transcript``: what the caller said, free-form (general English model;
  "" when nothing was heard); null for keys.
* ``intent``: the menu's reading of the input: the choice taken (its
  ``intent`` key, else its first phrase, ``digits`` for a digit string, ``key
  N`` for a key-only choice), ``no-match`` when no choice took it (out of the
  step's grammar, or below ``[agent.menu] min_confidence``), ``yes``/``no``
  when ``confirming`` (the input answers the agent's "Is that right?" or "Do
  you want to end the call?").
* ``confidence``: 0..1, how sure the recogniser is of the grammar match behind
  ``intent``; null for keys (exact).
* ``dtmf``: the keys pressed; ``digits``: the digit string the menu takes
  with this input (keyed, or spoken and sure or confirmed), else null.

The integrator answers ``{"say": "…", "hangup": false, "next": "step"}`` (every
field optional), which wins over the menu's answer (a no-match's too: the
integrator handles what the menu does not know). ``{"say": "…", "transfer":
"sip:…"}`` says ``say`` and then transfers the caller to that SIP URI (it wins
over ``next`` and ``hangup``; a target that is not a ``sip:``/``sips:`` URI
makes the reply malformed). An empty answer (``{}``,
``null``, HTTP 204) lets the menu answer.

* ``[agent.webhook] url`` (or ``urls``, several): an HTTP POST with httpx on
  trio; a 2xx reply's body (at most :data:`MAX_REPLY_BYTES`) is the answer.
* ``[agent] plugin = "module:callable"``: ``async def callable(request: dict) ->
  dict | None``, imported at start, called in the session's task.

Either way at most ``[agent.webhook] max_concurrent`` requests run at once
(the process's, all calls together) and each gets ``[timers]
agent_response_s`` (waiting for its turn included); a late, failed or
malformed answer is counted and logged, and the menu answers instead.

Webhook failover: the URLs are providers of a :class:`WebhookPool` (the
stream agent's health state machine, :mod:`voxgate.agents.providers`, named
``webhook-1``, ``webhook-2`` … in configured order, with ``[agent.stream]``'s
health keys). A turn tries them in the pool's order, all within the one
deadline; a connection error, a timeout or a 5xx status counts against that
URL and the next one is tried (the request may then reach two integrators).
Any other status is the integrator's answer, not a sign of health: a 2xx is
used, a 3xx or 4xx (a bad request, a refused token) is an error of the turn
that would fail the same on every URL. Unhealthy URLs get no requests; the
pool probes them with ``HEAD`` (see :func:`probe_alive`). All of them down
never gates admission: the menu answers.
"""

from __future__ import annotations

import abc
import functools
import importlib
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from typing import Any, Final

import httpx
import trio

from voxgate.agents.provider_pool import HealthPool, health_settings
from voxgate.agents.providers import HealthSettings
from voxgate.agents.transfer import target_problem
from voxgate.config import AgentConfig, WebhookConfig
from voxgate.errors import ConfigError, RemoteProtocolError
from voxgate.jsonbounds import loads_untrusted

MAX_REPLY_BYTES = 64 * 1024
MAX_REPLY_DEPTH = 32
"""Deepest nesting of arrays/objects in a reply (the fields used are 1 deep)."""
TIMEOUT_WHEN_DEADMAN_OFF_S = 10.0
"""The integrator's time when ``[timers] agent_response_s`` is 0 (off)."""
PROBE_TIMEOUT_S: Final = 5.0
"""How long a probe of an unhealthy webhook URL may take."""
GATEWAY_DOWN: Final = frozenset({502, 503, 504})
"""Statuses by which a proxy says the service behind it is not there."""

Request = Mapping[str, object]
Plugin = Callable[[dict[str, object]], Awaitable[object]]


@dataclass(frozen=True, slots=True)
class Reply:
    """An integrator's answer: ``say`` it, go to step ``next``, ``hangup`` after it, or
    ``transfer`` the caller to that SIP URI after it."""

    say: str = ""
    hangup: bool = False
    next: str = ""
    transfer: str = ""

    @property
    def empty(self) -> bool:
        """Says nothing, moves nowhere, keeps the call: the menu answers instead."""
        return not (self.say or self.hangup or self.next or self.transfer)


def reply_from_untrusted(data: object) -> Reply:
    """A :class:`Reply` from a decoded JSON value (None → the empty reply).

    Raises:
        RemoteProtocolError: not an object, a field of the wrong type, or a
            ``transfer`` that is not a ``sip:``/``sips:`` URI.
    """
    if data is None:
        return Reply()
    if not isinstance(data, dict):
        raise RemoteProtocolError("reply is not a JSON object", status_hint=None)
    say = data.get("say") or ""
    hangup = data.get("hangup") or False
    next_step = data.get("next") or ""
    transfer = data.get("transfer") or ""
    if not (isinstance(say, str) and isinstance(next_step, str) and isinstance(hangup, bool)
            and isinstance(transfer, str)):
        raise RemoteProtocolError("reply fields: say, next and transfer are strings, hangup "
                                  "a boolean", status_hint=None)
    problem = target_problem(transfer) if transfer else None
    if problem is not None:
        raise RemoteProtocolError(f"reply transfer: {problem}", status_hint=None)
    return Reply(say, hangup, next_step, transfer)


def counts_against_url(status_code: int) -> bool:
    """Whether a POST's HTTP status is the URL's failure (5xx: try the next URL)
    rather than the integrator's answer (any other)."""
    return status_code >= 500


def probe_alive(status_code: int) -> bool:
    """Whether a probe's HTTP status shows the URL alive: any status but 502, 503 and
    504 (a ``HEAD`` on a POST endpoint may well get 405 or 501: it answered)."""
    return status_code not in GATEWAY_DOWN


def transport_error_kind(exc: httpx.TransportError) -> str:
    """The ``kind`` (metric label) of a failed request: connect, timeout or transport."""
    if isinstance(exc, httpx.ConnectError):
        return "connect"
    if isinstance(exc, httpx.TimeoutException):
        return "timeout"
    return "transport"


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

    def _timed(self, call: Callable[[Request, float], Awaitable[Reply]]) -> Ask:
        """``call(request, deadline)`` bounded: ``deadline`` is when the request's time
        (waiting for a slot included) is up, in Trio clock seconds."""
        async def ask(request: Request) -> Outcome:
            self.stats.requests += 1
            deadline = trio.current_time() + self.timeout_s
            with trio.move_on_at(deadline):
                async with self._limiter:
                    try:
                        return Outcome(await call(request, deadline))
                    except (httpx.HTTPError, RemoteProtocolError) as e:
                        self.stats.errors += 1
                        return Outcome(None, f"{type(e).__name__}: {e}")
            self.stats.timeouts += 1
            return Outcome(None, f"no answer within {self.timeout_s} s")
        return ask


@functools.cache
def _tls() -> ssl.SSLContext:
    return ssl.create_default_context()


class WebhookPool(HealthPool):
    """The health of the webhook URLs, process-wide; a Trio service (see
    :class:`~voxgate.agents.provider_pool.HealthPool`; not an admission gate).

    Args:
        webhook: its URLs in failover order, and their names (``webhook-1`` …).
        settings: when a URL is taken out of rotation and brought back.

    Raises:
        ValueError: no URL.
    """

    def __init__(self, webhook: WebhookConfig, settings: HealthSettings) -> None:
        self.urls = dict(zip(webhook.names, webhook.all_urls, strict=True))
        super().__init__(list(self.urls), settings, self._probe)

    async def _probe(self, name: str) -> str:
        """``HEAD`` within :data:`PROBE_TIMEOUT_S`: "" when :func:`probe_alive`, else why not."""
        with trio.move_on_after(PROBE_TIMEOUT_S):
            try:
                async with httpx.AsyncClient(verify=_tls(), timeout=PROBE_TIMEOUT_S,
                                             follow_redirects=False) as client:
                    response = await client.head(self.urls[name])
            except httpx.HTTPError as e:
                return f"{type(e).__name__}: {e}"[:200]
            return "" if probe_alive(response.status_code) else f"HTTP {response.status_code}"
        return f"no answer within {PROBE_TIMEOUT_S} s"


_pool: WebhookPool | None = None


def webhook_pool(agent: AgentConfig) -> WebhookPool | None:
    """The process's :class:`WebhookPool` for ``agent``'s webhook URLs (None without any).

    The same pool while the URLs and ``[agent.stream]``'s health keys stay the
    same (so reloads keep the health); a new one, all healthy, once they change.

    Raises:
        ValueError: as :class:`~voxgate.agents.providers.HealthSettings` (the config
            check rules it out).
    """
    global _pool
    urls = agent.webhook.all_urls
    if not urls:
        return None
    settings = health_settings(agent.stream)
    if _pool is None or (tuple(_pool.urls.values()), _pool.settings) != (urls, settings):
        _pool = WebhookPool(agent.webhook, settings)
    return _pool


class _FailedOver(Exception):
    """This URL failed (counted against it); the next one is tried."""


class WebhookIntegrator(Integrator):
    """POSTs each request as JSON to the URLs of ``pool``, in its order, until one answers
    (see the module docstring). A request cancelled before its deadline (the call
    ended) is abandoned without counting against the URL it was at."""

    kind = "webhook"

    def __init__(self, pool: WebhookPool, *, max_concurrent: int, timeout_s: float) -> None:
        super().__init__(max_concurrent=max_concurrent, timeout_s=timeout_s)
        self.pool = pool

    def connect(self) -> AbstractAsyncContextManager[Ask]:
        """One HTTP client per session (keep-alive across its turns), closed at its end."""
        return self._session()

    @asynccontextmanager
    async def _session(self) -> AsyncIterator[Ask]:
        async with httpx.AsyncClient(verify=_tls(), timeout=self.timeout_s,
                                     follow_redirects=False) as client:

            async def ask(request: Request, deadline: float) -> Reply:
                return await self._ask(client, request, deadline)

            yield self._timed(ask)

    async def _ask(self, client: httpx.AsyncClient, request: Request, deadline: float) -> Reply:
        """The first answer of the URLs in the pool's order.

        Raises:
            RemoteProtocolError: every URL failed or is down, the answer is not 2xx,
                or as :func:`parse_reply_untrusted`.
        """
        order = self.pool.order()
        failures: list[str] = []
        for name in order:
            try:
                status, body = await self._attempt(client, name, request, deadline)
            except _FailedOver as e:
                failures.append(f"{name}: {e}")
                continue
            if name != order[0]:
                self.pool.session_result(order[0], "failover")
            if not 200 <= status < 300:
                raise RemoteProtocolError(f"{name}: HTTP {status}", status_hint=None)
            return parse_reply_untrusted(body)
        raise RemoteProtocolError("; ".join(failures) or "every webhook URL is down",
                                  status_hint=None)

    async def _attempt(self, client: httpx.AsyncClient, name: str, request: Request,
                       deadline: float) -> tuple[int, bytes]:
        """POST to URL ``name`` and report its health; returns the status and body.

        Raises:
            _FailedOver: a connection error or a 5xx status.
            RemoteProtocolError: a body over :data:`MAX_REPLY_BYTES` (the URL is alive).
            trio.Cancelled: as ever; the URL is charged a timeout when ``deadline``
                passed while it had the request.
        """
        started = trio.current_time()
        try:
            status, body = await self._post(client, self.pool.urls[name], request)
        except trio.Cancelled:
            if started < deadline <= trio.current_time():
                self.pool.failure(name, "timeout", "no answer before the turn's deadline")
            raise
        except RemoteProtocolError:
            self.pool.success(name)
            raise
        except httpx.TransportError as e:
            detail = f"{type(e).__name__}: {e}"[:200]
            self.pool.failure(name, transport_error_kind(e), detail)
            raise _FailedOver(detail) from e
        if counts_against_url(status):
            self.pool.failure(name, "http-5xx", f"HTTP {status}")
            raise _FailedOver(f"HTTP {status}")
        self.pool.success(name)
        self.pool.session_result(name, "ok")
        return status, body

    async def _post(self, client: httpx.AsyncClient, url: str,
                    request: Request) -> tuple[int, bytes]:
        """The status and body (unread when it counts against the URL); raises
        RemoteProtocolError for a body over :data:`MAX_REPLY_BYTES`."""
        async with client.stream("POST", url, json=dict(request)) as response:
            body = b""
            if counts_against_url(response.status_code):
                return response.status_code, body
            async for chunk in response.aiter_bytes():
                body += chunk
                if len(body) > MAX_REPLY_BYTES:
                    raise RemoteProtocolError(f"reply over {MAX_REPLY_BYTES} bytes",
                                              status_hint=None)
        return response.status_code, body


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

    async def _call(self, request: Request, deadline: float) -> Reply:
        """Awaits the plugin (``deadline`` is enforced by the caller's cancel scope)."""
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
    """The integrator ``agent`` configures (webhook, on the shared :func:`webhook_pool`,
    or plugin), or None.

    Raises:
        ConfigError: as :func:`load_plugin`.
    """
    limit = agent.webhook.max_concurrent
    pool = webhook_pool(agent)
    if pool is not None:
        return WebhookIntegrator(pool, max_concurrent=limit, timeout_s=timeout_s)
    if agent.plugin:
        return PluginIntegrator(load_plugin(agent.plugin), max_concurrent=limit,
                                timeout_s=timeout_s)
    return None
