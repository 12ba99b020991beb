"""Webhook failover: the order of the URLs, what counts against one, probes, ramp-back.

The health driver (:class:`voxgate.agents.provider_pool.HealthPool`) runs on
trio's MockClock with a scripted probe; the integrator's failover talks real
HTTP to webhooks served by the test (:func:`tests.agents.test_webhook.serving`).
"""

from __future__ import annotations

import socket
from collections.abc import Callable

import httpx
import pytest
import trio
import trio.testing

from tests.agents.test_webhook import REQUEST, serving, webhook
from voxgate.agents.provider_pool import HealthPool
from voxgate.agents.providers import HEALTHY, RAMPING, UNHEALTHY, HealthSettings
from voxgate.agents.webhook import (
    Reply,
    WebhookIntegrator,
    counts_against_url,
    integrator_for,
    probe_alive,
    transport_error_kind,
    webhook_pool,
)
from voxgate.config import AgentConfig, StreamConfig, WebhookConfig

FAST = HealthSettings(unhealthy_after_errors=2, probe_interval_s=5.0, ramp_shares=(0.5, 1.0),
                      ramp_step_s=10.0)


@pytest.fixture
def autojump_clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


def closed_url() -> str:
    """An http:// URL on a local port nobody listens on (connection refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/hook"


async def polled(predicate: Callable[[], bool], timeout_s: float = 5.0) -> None:
    """Wait until ``predicate`` holds (the servers' threads have no trio event to wait on)."""
    for _ in range(round(timeout_s / 0.02)):
        if predicate():
            return
        await trio.sleep(0.02)
    raise AssertionError(f"not within {timeout_s} s")


def states(pool: HealthPool) -> dict[str, str]:
    return {str(row["name"]): str(row["state"]) for row in pool.snapshot()}


def last_error_detail(pool: HealthPool, index: int) -> object:
    last_error = pool.snapshot()[index]["last_error"]
    assert isinstance(last_error, dict)
    return last_error["detail"]


# -- the rules, pure -------------------------------------------------------------------


@pytest.mark.parametrize(("status", "against"), [
    (200, False), (204, False), (302, False), (400, False), (404, False), (429, False),
    (500, True), (502, True), (503, True), (504, True)])
def test_only_5xx_counts_against_a_url(status, against):
    assert counts_against_url(status) is against


@pytest.mark.parametrize(("status", "alive"), [
    (200, True), (405, True), (501, True), (500, True), (502, False), (503, False),
    (504, False)])
def test_a_probe_answered_by_the_service_is_alive(status, alive):
    assert probe_alive(status) is alive


def test_transport_error_kinds():
    request = httpx.Request("POST", "http://x/")
    assert transport_error_kind(httpx.ConnectError("refused", request=request)) == "connect"
    assert transport_error_kind(httpx.ConnectTimeout("slow", request=request)) == "timeout"
    assert transport_error_kind(httpx.ReadTimeout("slow", request=request)) == "timeout"
    assert transport_error_kind(httpx.ReadError("reset", request=request)) == "transport"


# -- the health driver on a mock clock --------------------------------------------------


class ScriptedProbe:
    """Probe answers by name ("" = alive), and when each probe ran."""

    def __init__(self) -> None:
        self.answers: dict[str, str] = {}
        self.calls: list[tuple[str, float]] = []

    async def __call__(self, name: str) -> str:
        self.calls.append((name, trio.current_time()))
        await trio.sleep(0.1)
        return self.answers.get(name, "")


async def test_failover_order_probes_and_ramp_back(autojump_clock):
    probe = ScriptedProbe()
    verdicts: list[tuple[bool, str]] = []
    pool = HealthPool(["webhook-1", "webhook-2"], FAST, probe,
                      lambda ok, detail: verdicts.append((ok, detail)))
    async with trio.open_nursery() as nursery:
        await nursery.start(pool.run)
        start = trio.current_time()
        assert pool.order() == ["webhook-1", "webhook-2"]
        pool.failure("webhook-1", "connect", "refused")
        assert pool.order() == ["webhook-1", "webhook-2"]  # one error: still first
        pool.failure("webhook-1", "connect", "refused")
        assert pool.order() == ["webhook-2"]
        assert states(pool) == {"webhook-1": UNHEALTHY, "webhook-2": HEALTHY}
        assert pool.verdict() == (True, "")

        probe.answers["webhook-1"] = "ConnectError: refused"
        await trio.sleep(5.2)  # the first probe is due 5 s after the breakdown: it fails
        assert [name for name, _ in probe.calls] == ["webhook-1"]
        assert probe.calls[0][1] == pytest.approx(start + 5.0)
        assert states(pool)["webhook-1"] == UNHEALTHY
        row = pool.snapshot()[0]
        assert row["errors"] == {"connect": 2, "probe": 1}
        assert last_error_detail(pool, 0) == "ConnectError: refused"

        del probe.answers["webhook-1"]
        await trio.sleep(5.1)  # the next, 5 s after that failed, finds it alive: 50 %
        assert [t for _, t in probe.calls] == [pytest.approx(start + 5.0),
                                               pytest.approx(start + 10.1)]
        assert states(pool)["webhook-1"] == RAMPING
        assert pool.snapshot()[0]["share"] == 0.5
        assert set(pool.order()) == {"webhook-1", "webhook-2"}  # ramping URLs are tried
        await trio.sleep(10.0)
        assert states(pool)["webhook-1"] == HEALTHY
        assert pool.order() == ["webhook-1", "webhook-2"]
        nursery.cancel_scope.cancel()
    assert all(ok for ok, _ in verdicts)  # one URL was always up


async def test_every_url_down_is_reported_not_gated(autojump_clock):
    probe = ScriptedProbe()
    probe.answers = {"webhook-1": "down", "webhook-2": "down"}
    verdicts: list[tuple[bool, str]] = []
    pool = HealthPool(["webhook-1", "webhook-2"], FAST, probe,
                      lambda ok, detail: verdicts.append((ok, detail)))
    async with trio.open_nursery() as nursery:
        await nursery.start(pool.run)
        for name in ("webhook-1", "webhook-2"):
            for _ in range(FAST.unhealthy_after_errors):
                pool.failure(name, "http-5xx", "HTTP 500")
        assert pool.order() == []
        await trio.sleep(0.01)  # the driver publishes
        assert pool.verdict() == (False, "every provider is down: webhook-1, webhook-2")
        assert verdicts[-1] == pool.verdict()
        nursery.cancel_scope.cancel()


# -- the integrator over real HTTP ------------------------------------------------------


async def test_a_dead_first_url_fails_over_then_is_skipped():
    dead = closed_url()
    with serving() as (url, handler):
        integrator = webhook(dead, url, settings=FAST)
        pool = integrator.pool
        async with integrator.connect() as ask:
            first = await ask(REQUEST)
            second = await ask(REQUEST)
            assert states(pool) == {"webhook-1": UNHEALTHY, "webhook-2": HEALTHY}
            third = await ask(REQUEST)
    assert [o.reply for o in (first, second, third)] == [Reply("From the hook.")] * 3
    assert len(handler.posts) == 3
    one, two = pool.snapshot()
    assert one["errors"] == {"connect": 2}  # the third turn went straight to webhook-2
    assert one["sessions"] == {"failover": 2}
    assert two["sessions"] == {"ok": 3}
    assert integrator.stats.errors == 0


async def test_a_5xx_fails_over_a_4xx_is_the_answer():
    with serving(status=500) as (broken, broken_hook), serving() as (good, good_hook):
        integrator = webhook(broken, good, settings=FAST)
        async with integrator.connect() as ask:
            outcome = await ask(REQUEST)
            assert outcome.reply == Reply("From the hook.")
            assert integrator.pool.snapshot()[0]["errors"] == {"http-5xx": 1}
            broken_hook.status = 404
            refused = await ask(REQUEST)
    assert refused.reply is None and "webhook-1: HTTP 404" in refused.error
    assert len(broken_hook.posts) == 2 and len(good_hook.posts) == 1  # 404: not retried
    one = integrator.pool.snapshot()[0]
    assert (one["state"], one["consecutive_errors"]) == (HEALTHY, 0)  # it answered


async def test_every_url_failing_lets_the_menu_answer():
    with serving(status=503) as (url, handler):
        integrator = webhook(closed_url(), url, settings=FAST)
        async with integrator.connect() as ask:
            failed = await ask(REQUEST)
            assert "webhook-1: ConnectError" in failed.error
            assert "webhook-2: HTTP 503" in failed.error
            await ask(REQUEST)
            assert integrator.pool.order() == []
            down = await ask(REQUEST)
    assert down.reply is None and "every webhook URL is down" in down.error
    assert len(handler.posts) == 2
    assert integrator.stats.errors == 3


async def test_a_hung_url_is_charged_the_timeout_within_the_one_deadline():
    with serving(delay_s=2.0) as (slow, _), serving() as (good, good_hook):
        integrator = webhook(slow, good, settings=FAST, timeout_s=0.5)
        async with integrator.connect() as ask:
            started = trio.current_time()
            outcome = await ask(REQUEST)
            took_s = trio.current_time() - started
    assert outcome.reply is None and "no answer within 0.5 s" in outcome.error
    assert took_s < 1.5
    assert good_hook.posts == []  # the deadline covers every attempt
    row = integrator.pool.snapshot()[0]
    assert row["errors"] == {"timeout": 1}
    assert integrator.stats.timeouts == 1


async def test_a_cancelled_turn_is_not_charged():
    with serving(delay_s=2.0) as (slow, _):
        integrator = webhook(slow, settings=FAST, timeout_s=5)
        async with integrator.connect() as ask:
            with trio.move_on_after(0.3):
                await ask(REQUEST)
    assert integrator.pool.snapshot()[0]["errors"] == {}


async def test_probes_bring_a_url_back_and_gateway_errors_do_not():
    quick = HealthSettings(unhealthy_after_errors=1, probe_interval_s=0.05, ramp_shares=(1.0,))
    with serving(head_status=503) as (behind_proxy, proxy), serving() as (url, hook):
        integrator = webhook(behind_proxy, url, settings=quick)
        pool = integrator.pool
        async with trio.open_nursery() as nursery:
            await nursery.start(pool.run)
            pool.failure("webhook-1", "connect", "refused")
            pool.failure("webhook-2", "connect", "refused")
            await polled(lambda: states(pool)["webhook-2"] == HEALTHY)  # HEAD → 405: alive
            assert hook.heads >= 1
            await polled(lambda: proxy.heads >= 2)
            assert states(pool)["webhook-1"] == UNHEALTHY
            assert last_error_detail(pool, 0) == "HTTP 503"
            nursery.cancel_scope.cancel()


def test_one_pool_per_url_list_and_health_settings():
    both = AgentConfig(webhook=WebhookConfig(urls=("http://a/", "http://b/")))
    pool = webhook_pool(both)
    assert pool is not None and pool.urls == {"webhook-1": "http://a/",
                                              "webhook-2": "http://b/"}
    assert webhook_pool(AgentConfig(webhook=both.webhook, voice="en-gb")) is pool
    hook = integrator_for(both, 1)
    assert isinstance(hook, WebhookIntegrator) and hook.pool is pool
    faster = AgentConfig(webhook=both.webhook, stream=StreamConfig(probe_interval_s=1))
    assert webhook_pool(faster) is not pool
    assert webhook_pool(AgentConfig()) is None
