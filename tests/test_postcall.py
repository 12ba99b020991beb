"""The post-call job queue against a real SQLite file and a real local HTTP server."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from voxgate.backoff import backoff_delay_s as retry_delay_s
from voxgate.metrics import REGISTRY
from voxgate.postcall import Job, PostCallQueue, session_id_of
from voxgate.records import iso_utc

START = 1_700_000_000.5
UNREACHABLE = "http://127.0.0.1:9/hook"


class Hook:
    """What the test webhook received and how it answers."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.content_types: list[str] = []
        self.fail_first = 0
        self.reply = b""
        self.gate = threading.Event()
        self.gate.set()
        self.lock = threading.Lock()
        self.url = ""

    def hold(self) -> None:
        self.gate.clear()

    def release(self) -> None:
        self.gate.set()

    def attempts(self) -> list[int]:
        return [b["attempt"] for b in self.bodies]

    def indices(self) -> list[int]:
        return [b["data"]["n"] for b in self.bodies]


class _Handler(BaseHTTPRequestHandler):
    hook: Hook

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with self.hook.lock:
            self.hook.bodies.append(body)
            self.hook.content_types.append(self.headers["Content-Type"])
            failing = len(self.hook.bodies) <= self.hook.fail_first or body["data"].get("fail")
        self.hook.gate.wait(30)
        try:
            self.send_response(500 if failing else 200)
            self.send_header("Content-Length", str(len(self.hook.reply)))
            self.end_headers()
            self.wfile.write(self.hook.reply)
        except OSError:
            pass  # the queue gave up on this request (cancelled)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def hook() -> Iterator[Hook]:
    state = Hook()
    server = ThreadingHTTPServer(("127.0.0.1", 0), type("H", (_Handler,), {"hook": state}))
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}/hook"
    yield state
    state.release()
    server.shutdown()
    server.server_close()


class WallClock:
    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> float:
        return self.now


def make(tmp_path: Path, url: str, clock: Callable[[], float] | None = None,
         **overrides: Any) -> PostCallQueue:
    options: dict[str, Any] = {
        "webhook_url": url, "workers": 1, "max_pending": 100, "max_attempts": 3,
        "backoff_initial_s": 0.001, "backoff_max_s": 0.01, "timeout_s": 10.0,
        "wall_clock": clock or WallClock(), **overrides,
    }
    return PostCallQueue(str(tmp_path / "voxgate.sqlite"), **options)


async def until(predicate: Callable[[], bool]) -> None:
    with trio.fail_after(20):
        while not predicate():  # noqa: ASYNC110 - polls what the queue and server show
            await trio.sleep(0.005)


async def until_summary(queue: PostCallQueue,
                        predicate: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    with trio.fail_after(20):
        while not predicate(summary := await queue.summary()):  # noqa: ASYNC110 - polls
            await trio.sleep(0.005)
    return summary


def deliveries(result: str) -> float:
    value = REGISTRY.get_sample_value("voxgate_postcall_deliveries_total", {"result": result})
    return value or 0.0


def events(caplog: pytest.LogCaptureFixture, name: str) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    for record in caplog.records:
        event, fields = getattr(record, "voxgate_fields", ("", {}))
        if event == name:
            found.append(fields)
    return found


async def running(nursery: trio.Nursery, queue: PostCallQueue) -> None:
    await nursery.start(queue.run)
    await until_summary(queue, lambda s: s["pending"] is not None)


def call(n: int, **more: object) -> dict[str, object]:
    return {"session_id": f"s{n}", "n": n, **more}


# --- pure parts -----------------------------------------------------------------------------

def test_retry_delay_doubles_up_to_the_cap():
    assert [retry_delay_s(n, 0.5, 3.0) for n in (1, 2, 3, 4, 5)] == [0.5, 1.0, 2.0, 3.0, 3.0]
    assert retry_delay_s(10_000, 0.5, 30.0) == 30.0


def test_body_is_the_documented_json():
    job = Job(7, "call.completed", '{"session_id": "s1", "n": [1, 2]}', 0.25, 2)
    assert json.loads(job.body()) == {
        "event": "call.completed", "job_id": 7, "attempt": 3,
        "created_at": "1970-01-01T00:00:00.250000Z", "data": {"session_id": "s1", "n": [1, 2]}}


def test_session_id_of_payloads():
    assert session_id_of('{"session_id": "abc"}') == "abc"
    assert session_id_of('{"session_id": 3}') is None
    assert session_id_of("[1]") is None
    assert session_id_of("{") is None


def test_bad_sizes_are_refused(tmp_path):
    with pytest.raises(ValueError, match="at least 1"):
        make(tmp_path, UNREACHABLE, max_pending=0)


# --- delivery ---------------------------------------------------------------------------------

async def test_delivers_a_job_as_json(tmp_path, hook):
    queue = make(tmp_path, hook.url)
    ok = deliveries("ok")
    async with trio.open_nursery() as nursery:
        await running(nursery, queue)
        queue.enqueue("call.completed", call(1, reason="hangup"))
        summary = await until_summary(queue, lambda s: s["done"] == 1)
        nursery.cancel_scope.cancel()
    assert hook.bodies == [{
        "event": "call.completed", "job_id": 1, "attempt": 1, "created_at": iso_utc(START),
        "data": {"session_id": "s1", "n": 1, "reason": "hangup"}}]
    assert hook.content_types == ["application/json"]
    assert summary["pending"] == summary["in_flight"] == summary["failed"] == 0
    assert deliveries("ok") == ok + 1


async def test_retries_on_500_then_delivers(tmp_path, hook):
    hook.fail_first = 2
    queue = make(tmp_path, hook.url, time.time, max_attempts=5)
    retry = deliveries("retry")
    async with trio.open_nursery() as nursery:
        await running(nursery, queue)
        queue.enqueue("call.completed", call(1))
        summary = await until_summary(queue, lambda s: s["done"] == 1)
        nursery.cancel_scope.cancel()
    assert hook.attempts() == [1, 2, 3]
    assert {b["job_id"] for b in hook.bodies} == {1}
    assert summary["failed"] == 0 and summary["recent_failures"] == []
    assert deliveries("retry") == retry + 2


async def test_fails_after_max_attempts(tmp_path, hook, caplog):
    queue = make(tmp_path, hook.url, time.time, max_attempts=3)
    before = iso_utc(time.time())
    failed = deliveries("failed")
    async with trio.open_nursery() as nursery:
        await running(nursery, queue)
        queue.enqueue("call.completed", call(9, fail=True))
        summary = await until_summary(queue, lambda s: s["failed"] == 1)
        nursery.cancel_scope.cancel()
    assert hook.attempts() == [1, 2, 3]
    (failure,) = summary["recent_failures"]
    assert failure.pop("created_at") >= before
    assert failure == {"id": 1, "kind": "call.completed", "attempts": 3,
                       "last_error": "HTTP 500", "session_id": "s9"}
    assert events(caplog, "postcall_failed") == [{
        "job_id": 1, "kind": "call.completed", "session_id": "s9", "attempts": 3,
        "error": "HTTP 500"}]
    assert deliveries("failed") == failed + 1


async def test_unreachable_webhook_is_a_transport_error(tmp_path):
    queue = make(tmp_path, UNREACHABLE, max_attempts=1)
    async with trio.open_nursery() as nursery:
        await running(nursery, queue)
        queue.enqueue("call.completed", call(1))
        summary = await until_summary(queue, lambda s: s["failed"] == 1)
        nursery.cancel_scope.cancel()
    assert summary["recent_failures"][0]["last_error"].startswith("ConnectError")


async def test_a_large_reply_is_not_read_whole(tmp_path, hook):
    hook.reply = b"x" * (1024 * 1024)
    queue = make(tmp_path, hook.url)
    async with trio.open_nursery() as nursery:
        await running(nursery, queue)
        queue.enqueue("call.completed", call(1))
        await until_summary(queue, lambda s: s["done"] == 1)
        nursery.cancel_scope.cancel()


async def test_newest_first_under_a_backlog(tmp_path, hook):
    hook.hold()
    queue = make(tmp_path, hook.url, workers=1)
    async with trio.open_nursery() as nursery:
        await running(nursery, queue)
        queue.enqueue("call.completed", call(0))
        await until(lambda: len(hook.bodies) == 1)
        for n in range(1, 11):
            queue.enqueue("call.completed", call(n))
        await until_summary(queue, lambda s: s["pending"] == 10)
        hook.release()
        await until_summary(queue, lambda s: s["done"] == 11)
        nursery.cancel_scope.cancel()
    assert hook.indices() == [0, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1]


# --- persistence ------------------------------------------------------------------------------

async def test_a_job_cut_mid_delivery_is_delivered_again_after_a_restart(tmp_path, hook):
    hook.hold()
    first = make(tmp_path, hook.url)
    async with trio.open_nursery() as nursery:
        await running(nursery, first)
        first.enqueue("call.completed", call(0))
        await until(lambda: len(hook.bodies) == 1)
        first.enqueue("call.completed", call(1))
        await until_summary(first, lambda s: s["pending"] == 1 and s["in_flight"] == 1)
        nursery.cancel_scope.cancel()
    hook.release()
    second = make(tmp_path, hook.url)
    async with trio.open_nursery() as nursery:
        await running(nursery, second)
        await until_summary(second, lambda s: s["done"] == 2)
        nursery.cancel_scope.cancel()
    assert hook.indices() == [0, 1, 0]
    assert hook.attempts() == [1, 1, 1]


async def test_jobs_waiting_for_a_retry_survive_a_restart(tmp_path, hook):
    clock = WallClock()
    first = make(tmp_path, UNREACHABLE, clock, max_attempts=5, backoff_initial_s=3600.0,
                 backoff_max_s=3600.0)
    retry = deliveries("retry")
    async with trio.open_nursery() as nursery:
        await running(nursery, first)
        first.enqueue("call.completed", call(0))
        first.enqueue("call.completed", call(1))
        await until(lambda: deliveries("retry") == retry + 2)
        await until_summary(first, lambda s: s["pending"] == 2)
        nursery.cancel_scope.cancel()
    clock.now += 3600.0
    second = make(tmp_path, hook.url, clock)
    async with trio.open_nursery() as nursery:
        await running(nursery, second)
        await until_summary(second, lambda s: s["done"] == 2)
        nursery.cancel_scope.cancel()
    assert hook.indices() == [1, 0]
    assert hook.attempts() == [2, 2]


async def test_jobs_enqueued_as_run_is_cancelled_are_written(tmp_path, hook):
    first = make(tmp_path, hook.url)
    first.stop_claiming()
    async with trio.open_nursery() as nursery:
        await running(nursery, first)
        for n in range(3):
            first.enqueue("call.completed", call(n))
        nursery.cancel_scope.cancel()
    assert hook.bodies == []
    second = make(tmp_path, hook.url)
    async with trio.open_nursery() as nursery:
        await running(nursery, second)
        await until_summary(second, lambda s: s["done"] == 3)
        nursery.cancel_scope.cancel()
    assert hook.indices() == [2, 1, 0]


# --- bounds -----------------------------------------------------------------------------------

async def test_a_full_table_drops_the_oldest_pending(tmp_path, hook, caplog):
    hook.hold()
    queue = make(tmp_path, hook.url, max_pending=3)
    dropped = deliveries("dropped")
    async with trio.open_nursery() as nursery:
        await running(nursery, queue)
        queue.enqueue("call.completed", call(0))
        await until(lambda: len(hook.bodies) == 1)
        for n in (1, 2):
            queue.enqueue("call.completed", call(n))
        await until_summary(queue, lambda s: s["pending"] == 2)
        for n in (3, 4):
            queue.enqueue("call.completed", call(n))
        summary = await until_summary(queue, lambda s: s["intake"] == 0 and s["dropped"] == 1)
        assert summary["pending"] == 3
        hook.release()
        await until_summary(queue, lambda s: s["done"] == 4)
        nursery.cancel_scope.cancel()
    assert hook.indices() == [0, 4, 3, 2]
    assert deliveries("dropped") == dropped + 1
    assert [e["where"] for e in events(caplog, "postcall_dropped")] == ["table"]


async def test_a_full_intake_drops_the_oldest(tmp_path, hook):
    queue = make(tmp_path, hook.url, max_pending=3)
    dropped = deliveries("dropped")
    for n in range(5):
        queue.enqueue("call.completed", call(n))
    assert (await queue.summary())["intake"] == 3
    async with trio.open_nursery() as nursery:
        await running(nursery, queue)
        summary = await until_summary(queue, lambda s: s["done"] == 3)
        nursery.cancel_scope.cancel()
    assert hook.indices() == [4, 3, 2]
    assert summary["dropped"] == 2
    assert deliveries("dropped") == dropped + 2


async def test_only_the_newest_finished_jobs_are_kept(tmp_path, hook):
    queue = make(tmp_path, hook.url, keep_finished=2)
    async with trio.open_nursery() as nursery:
        await running(nursery, queue)
        for n in range(4):
            queue.enqueue("call.completed", call(n))
        await until(lambda: len(hook.bodies) == 4)
        summary = await until_summary(queue, lambda s: s["pending"] == s["in_flight"] == 0)
        nursery.cancel_scope.cancel()
    assert summary["done"] == 2


def test_a_payload_json_cannot_hold_is_dropped_and_counted(tmp_path):
    queue = make(tmp_path, UNREACHABLE)
    dropped = deliveries("dropped")
    queue.enqueue("call.completed", {"mos": float("nan")})
    assert deliveries("dropped") == dropped + 1
    assert len(queue._intake) == 0


# --- drain, health, summary -------------------------------------------------------------------

async def test_drain_waits_for_the_delivery_in_flight_not_the_backlog(tmp_path, hook):
    hook.hold()
    queue = make(tmp_path, hook.url, workers=1)
    idle = trio.Event()

    async def drain() -> None:
        await queue.wait_idle()
        idle.set()

    async with trio.open_nursery() as nursery:
        await running(nursery, queue)
        queue.enqueue("call.completed", call(0))
        await until(lambda: len(hook.bodies) == 1)
        for n in (1, 2, 3):
            queue.enqueue("call.completed", call(n))
        await until_summary(queue, lambda s: s["pending"] == 3)
        queue.stop_claiming()
        nursery.start_soon(drain)
        await trio.testing.wait_all_tasks_blocked()
        assert not idle.is_set()
        hook.release()
        with trio.fail_after(20):
            await idle.wait()
        summary = await queue.summary()
        nursery.cancel_scope.cancel()
    assert hook.indices() == [0]
    assert (summary["pending"], summary["in_flight"], summary["done"]) == (3, 0, 1)


async def test_an_unopenable_database_is_unhealthy_until_it_opens(tmp_path, hook, caplog):
    caplog.set_level(logging.INFO, logger="voxgate")
    directory = tmp_path / "later"
    queue = PostCallQueue(str(directory / "voxgate.sqlite"), webhook_url=hook.url, workers=1,
                          max_pending=10, max_attempts=1, backoff_initial_s=0.001,
                          backoff_max_s=0.01, timeout_s=10.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(queue.run)
        queue.enqueue("call.completed", call(1))
        await until(lambda: not queue.healthy)
        summary = await queue.summary()
        assert summary["healthy"] is False and summary["pending"] is None
        assert "unable to open" in str(queue.last_error)
        directory.mkdir()
        await until_summary(queue, lambda s: s["done"] == 1)
        nursery.cancel_scope.cancel()
    assert queue.healthy
    assert len(events(caplog, "postcall_unhealthy")) == 1
    assert len(events(caplog, "postcall_healthy")) == 1


async def test_summary_reports_the_backlog(tmp_path, hook):
    clock = WallClock()
    queue = make(tmp_path, hook.url, clock, max_attempts=1)
    async with trio.open_nursery() as nursery:
        await running(nursery, queue)
        queue.enqueue("call.completed", call(1))
        queue.enqueue("call.completed", call(2, fail=True))
        await until_summary(queue, lambda s: s["done"] == 1 and s["failed"] == 1)
        queue.stop_claiming()
        await queue.wait_idle()
        queue.enqueue("call.completed", call(3))
        clock.now += 1.0
        queue.enqueue("call.completed", call(4))
        await until_summary(queue, lambda s: s["pending"] == 2)
        clock.now += 9.0
        summary = await queue.summary()
        nursery.cancel_scope.cancel()
    assert summary == {
        "pending": 2, "in_flight": 0, "done": 1, "failed": 1, "intake": 0, "dropped": 0,
        "oldest_pending_age_s": 10.0, "healthy": True, "last_error": None, "enabled": True,
        "recent_failures": [{"id": 2, "kind": "call.completed", "attempts": 1,
                             "last_error": "HTTP 500", "session_id": "s2",
                             "created_at": iso_utc(START)}],
    }


async def test_no_webhook_turns_the_queue_off(tmp_path):
    queue = make(tmp_path, "")
    queue.enqueue("call.completed", call(1))
    async with trio.open_nursery() as nursery:
        await nursery.start(queue.run)
        summary = await queue.summary()
        nursery.cancel_scope.cancel()
    assert summary["enabled"] is False and summary["intake"] == 0
    assert not (tmp_path / "voxgate.sqlite").exists()
