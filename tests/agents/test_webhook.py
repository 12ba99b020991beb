"""The integrator: reply parsing, the webhook over real HTTP, plugins, bounds and timeouts."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import trio
import trio.testing

from tests.agents.test_local import Heard, speak, turns_of
from tests.agents.test_local import make as make_local
from voxgate.agents.providers import HealthSettings
from voxgate.agents.webhook import (
    MAX_REPLY_BYTES,
    Ask,
    Outcome,
    PluginIntegrator,
    Reply,
    WebhookIntegrator,
    WebhookPool,
    integrator_for,
    load_plugin,
    parse_reply_untrusted,
)
from voxgate.config import AgentConfig, WebhookConfig
from voxgate.errors import ConfigError, RemoteProtocolError

REQUEST = {"session": "s1", "tenant": "default", "call": "c1", "step": "main",
           "transcript": "check my balance", "intent": "balance", "confidence": 0.9,
           "dtmf": None, "digits": None, "confirming": False}


@pytest.mark.parametrize(
    ("body", "reply"),
    [
        (b"", Reply()),
        (b"null", Reply()),
        (b"{}", Reply()),
        (b'{"say": "Hi.", "hangup": true, "next": "more"}', Reply("Hi.", True, "more")),
        (b'{"say": null, "extra": 1}', Reply()),
        (b'{"say": "One moment.", "transfer": "sip:human@192.0.2.7"}',
         Reply("One moment.", transfer="sip:human@192.0.2.7")),
    ],
)
def test_replies(body, reply):
    assert parse_reply_untrusted(body) == reply


@pytest.mark.parametrize("body", [b"{", b"[1]", b'{"say": 3}', b'{"hangup": "yes"}', b"\xff",
                                  b'{"transfer": 5}', b'{"transfer": "tel:+15551234"}',
                                  b'{"transfer": "sip:a@b c"}'])
def test_bad_replies(body):
    with pytest.raises(RemoteProtocolError):
        parse_reply_untrusted(body)


DEEP_ARRAY = b"[" * 30_000 + b"]" * 30_000
HOSTILE_REPLIES = [
    DEEP_ARRAY,
    b'{"say": ' + b"[" * 33 + b"]" * 33 + b"}",
    b"9" * 5000,
    b'{"say": "Hi.", "n": ' + b"1" * 5000 + b"}",
    b'{"say": NaN}',
    b'{"hangup": Infinity}',
    b'{"next": 1e400}',
    b'{"say": "\\ud800"}',
    b'{"say": "' + b"x" * MAX_REPLY_BYTES + b'"}',
]


@pytest.mark.parametrize("body", HOSTILE_REPLIES, ids=range(len(HOSTILE_REPLIES)))
def test_hostile_replies_are_remote_protocol_errors(body):
    with pytest.raises(RemoteProtocolError) as err:
        parse_reply_untrusted(body)
    assert err.value.status_hint is None


def test_empty_reply():
    assert Reply().empty and not Reply(next="x").empty and not Reply(transfer="sip:x").empty


class Hook(BaseHTTPRequestHandler):
    """A webhook; its class attributes say how it answers and collect what it got."""

    posts: list[dict[str, object]]
    reply: bytes = b'{"say": "From the hook."}'
    status = 200
    delay_s = 0.0
    """How long a POST waits before its answer."""
    head_status = 405
    heads = 0

    def do_POST(self):
        length = int(self.headers["Content-Length"])
        self.posts.append(json.loads(self.rfile.read(length)))
        time.sleep(self.delay_s)
        self.send_response(self.status)
        self.send_header("Content-Length", str(len(self.reply)))
        self.end_headers()
        self.wfile.write(self.reply)

    def do_HEAD(self):
        type(self).heads += 1
        self.send_response(self.head_status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


@contextmanager
def serving(**answers: object) -> Iterator[tuple[str, type[Hook]]]:
    """A :class:`Hook` with ``answers`` as class attributes, on 127.0.0.1 in a thread:
    its URL and its class."""
    handler = type("Hook", (Hook,), {"posts": [], **answers})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/hook", handler
    finally:
        server.shutdown()
        server.server_close()


def webhook(*urls: str, settings: HealthSettings | None = None, max_concurrent: int = 2,
            timeout_s: float = 5) -> WebhookIntegrator:
    """A webhook integrator on ``urls`` (in failover order) with a pool of its own."""
    pool = WebhookPool(WebhookConfig(urls=urls), settings or HealthSettings())
    return WebhookIntegrator(pool, max_concurrent=max_concurrent, timeout_s=timeout_s)


@pytest.fixture
def hook() -> Iterator[tuple[str, type[Hook]]]:
    with serving() as served:
        yield served


async def test_webhook_posts_json_and_reads_the_reply(hook):
    url, handler = hook
    integrator = webhook(url)
    async with integrator.connect() as ask:
        outcome = await ask(REQUEST)
    assert outcome.reply == Reply("From the hook.")
    assert handler.posts == [REQUEST]


async def test_webhook_error_status_is_an_error(hook):
    url, handler = hook
    handler.status = 500
    integrator = webhook(url)
    async with integrator.connect() as ask:
        outcome = await ask(REQUEST)
    assert outcome.reply is None and "HTTP 500" in outcome.error
    assert integrator.stats.errors == 1


async def test_hostile_reply_lets_the_menu_answer(hook):
    url, handler = hook
    handler.reply = DEEP_ARRAY
    integrator = webhook(url)
    async with integrator.connect() as ask:
        outcome = await ask(REQUEST)
        handler.reply = b'{"say": "Back."}'
        again = await ask(REQUEST)
    assert outcome.reply is None and "nested deeper" in outcome.error
    assert again.reply == Reply("Back.")
    assert integrator.stats.errors == 1


async def test_unreachable_webhook_is_an_error():
    integrator = webhook("http://127.0.0.1:9/", max_concurrent=1)
    async with integrator.connect() as ask:
        outcome = await ask(REQUEST)
    assert outcome.reply is None and "ConnectError" in outcome.error


async def _plugin(request: dict[str, object]) -> dict[str, object]:
    await trio.lowlevel.checkpoint()
    return {"say": f"You said {request['transcript']}."}


async def _slow_plugin(request: dict[str, object]) -> None:
    await trio.sleep(10)


async def _broken_plugin(request: dict[str, object]) -> None:
    raise ValueError("boom")


async def test_plugin_answers():
    async with PluginIntegrator(_plugin, max_concurrent=1, timeout_s=1).connect() as ask:
        assert (await ask(REQUEST)).reply == Reply("You said check my balance.")


async def test_plugin_exceptions_are_contained():
    integrator = PluginIntegrator(_broken_plugin, max_concurrent=1, timeout_s=1)
    async with integrator.connect() as ask:
        outcome = await ask(REQUEST)
    assert outcome.reply is None and "boom" in outcome.error


async def test_slow_plugin_times_out_and_concurrency_is_bounded(autojump_clock):
    integrator = PluginIntegrator(_slow_plugin, max_concurrent=1, timeout_s=2)
    outcomes: list[Outcome] = []
    async with integrator.connect() as ask, trio.open_nursery() as nursery:
        for _ in range(3):
            nursery.start_soon(_collect, ask, outcomes)
    assert [o.reply for o in outcomes] == [None, None, None]
    assert integrator.stats.timeouts == 3
    assert trio.current_time() == pytest.approx(2.0)


async def _collect(ask: Ask, outcomes: list[Outcome]) -> None:
    outcomes.append(await ask(REQUEST))


@pytest.fixture
def autojump_clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


def test_load_plugin():
    assert load_plugin("tests.agents.test_webhook:_plugin") is _plugin
    for spec, message in [("nocolon", "module:callable"), ("no.such.module:f", "cannot load"),
                          ("tests.agents.test_webhook:REQUEST", "not callable")]:
        with pytest.raises(ConfigError, match=message):
            load_plugin(spec)


def test_integrator_for_config():
    assert integrator_for(AgentConfig(), 5) is None
    hook = integrator_for(AgentConfig(webhook=WebhookConfig(url="http://x/", max_concurrent=3)), 0)
    assert isinstance(hook, WebhookIntegrator) and hook.timeout_s == 10.0
    plugin = integrator_for(AgentConfig(plugin="tests.agents.test_webhook:_plugin"), 2)
    assert isinstance(plugin, PluginIntegrator) and plugin.timeout_s == 2


async def test_the_webhook_hears_a_no_match_turn_and_its_answer_is_spoken(hook):
    url, handler = hook
    handler.reply = b'{"say": "I will call you back tomorrow.", "next": "more"}'
    agent, controls, recognizer = make_local()
    agent._runtime.integrator = webhook(url)
    answered = trio.Event()
    speak_turn = agent._speak

    async def speak_and_tell(*args: Any) -> None:
        await speak_turn(*args)
        if len(turns_of(agent)) == 2:
            answered.set()

    agent._speak = speak_and_tell  # type: ignore[method-assign,assignment]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(agent.run)
        await trio.testing.wait_all_tasks_blocked()
        recognizer.transcripts.append(Heard("can you call me back tomorrow", "", 0.0))
        speak(agent, 0, 10)
        with trio.fail_after(10):
            await answered.wait()
        nursery.cancel_scope.cancel()
    post, = handler.posts
    assert (post["transcript"], post["intent"], post["confidence"], post["step"]) == (
        "can you call me back tomorrow", "no-match", 0.0, "main")
    turn = turns_of(agent)[1]
    assert (turn["source"], turn["intent"], turn["next"]) == ("webhook", "no-match", "more")
    assert turn["say"] == "I will call you back tomorrow. Anything else? Say yes or no."
    assert controls.hangups == []
