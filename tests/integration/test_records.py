"""Call records and post-call jobs against the real daemon.

Calls come from the raw test phone over 127.0.0.1; records are read back the
way an operator reads them (``voxgatectl calls --json``, ``voxgatectl show``);
``call.completed`` jobs go to a real HTTP server the test runs on loopback.
"""

from __future__ import annotations

import json
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from tests.harness.daemon import Daemon
from tests.harness.phone import Phone
from tests.integration.conftest import StartDaemon
from tests.integration.test_control import ctl_json, wait_until


def records_of(daemon: Daemon, *args: str) -> list[dict[str, Any]]:
    result: list[dict[str, Any]] = ctl_json(daemon, "calls", *args)
    return result


def test_sip_calls_leave_records_that_operators_can_list_and_show(
        start_daemon: StartDaemon) -> None:
    daemon = start_daemon()
    with Phone(daemon) as phone:
        first, second = phone.call(), phone.call()
        assert (first.final_status, second.final_status) == (200, 200)
        phone.hang_up(first)
        up = {r["call_id"]: r for r in records_of(daemon)}
        assert up[second.call_id]["state"] == "active"
        wait_until(lambda: records_of(daemon, "--reason", "bye"), "the ended call's record")
        phone.hang_up(second)
    wait_until(lambda: len(records_of(daemon, "--reason", "bye")) == 2, "both records")
    records = records_of(daemon)
    assert [r["call_id"] for r in records] == [second.call_id, first.call_id]  # newest first
    for record in records:
        assert record["transport"] == "sip" and record["state"] == "ended"
        assert record["tenant"] == "default" and record["codec"] in ("PCMU", "PCMA")
        assert record["duration_s"] >= 0 and record["started_at"].endswith("Z")
    shown = ctl_json(daemon, "show", first.call_id)
    assert shown["record"]["session_id"] == records[1]["session_id"]
    assert records_of(daemon, "--tenant", "nobody") == []
    assert records_of(daemon, "--limit", "1") == records[:1]


def test_sigkill_with_calls_up_leaves_interrupted_records(start_daemon: StartDaemon,
                                                          tmp_path: Path) -> None:
    path = str(tmp_path / "shared-calls.sqlite3")
    first = start_daemon({"records": {"path": path}})
    with Phone(first) as phone:
        calls = [phone.call() for _ in range(3)]
        assert [c.final_status for c in calls] == [200] * 3
        phone.hang_up(calls[0])
        wait_until(lambda: any(r["state"] == "ended" for r in records_of(first)),
                   "the ended call's record")
        wait_until(lambda: first.events("records_open"), "records open")
        first.proc.send_signal(signal.SIGKILL)
        first.proc.wait(timeout=10)
    second = start_daemon({"records": {"path": path}})
    records = {r["call_id"]: r for r in records_of(second)}
    assert sorted(records) == sorted(c.call_id for c in calls)  # exactly one record each
    assert (records[calls[0].call_id]["state"], records[calls[0].call_id]["reason"]) == \
        ("ended", "bye")
    for call in calls[1:]:
        assert (records[call.call_id]["state"], records[call.call_id]["reason"]) == \
            ("interrupted", "interrupted")
    (event,) = second.events("records_interrupted")
    assert event["count"] == "2"


class _Webhook(BaseHTTPRequestHandler):
    posts: list[dict[str, Any]]
    fail_first: int

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.posts.append(body)
        status = 500 if len(self.posts) <= self.fail_first else 204
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextmanager
def webhook_server(fail_first: int) -> Iterator[tuple[str, list[dict[str, Any]]]]:
    posts: list[dict[str, Any]] = []
    handler = type("Handler", (_Webhook,), {"posts": posts, "fail_first": fail_first})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/calls", posts
    finally:
        server.shutdown()
        server.server_close()


def test_call_completed_is_posted_with_retries(start_daemon: StartDaemon) -> None:
    with webhook_server(fail_first=1) as (url, posts):
        daemon = start_daemon({"postcall": {"webhook": url, "backoff_initial_s": 0.2,
                                            "backoff_max_s": 1.0}})
        with Phone(daemon) as phone:
            call = phone.call()
            phone.hang_up(call)
        wait_until(lambda: len(posts) >= 2, "the retried call.completed post")
        jobs = ctl_json(daemon, "jobs")
    assert [p["attempt"] for p in posts[:2]] == [1, 2]
    assert {p["event"] for p in posts} == {"call.completed"}
    assert posts[1]["data"]["call_id"] == call.call_id
    assert posts[1]["data"]["reason"] == "bye"
    assert jobs["done"] == 1 and jobs["pending"] == 0


def test_unwritable_records_degrade_health_but_never_calls(start_daemon: StartDaemon,
                                                           tmp_path: Path) -> None:
    daemon = start_daemon({"records": {"path": str(tmp_path / "missing" / "calls.sqlite3")}})
    with Phone(daemon) as phone:
        call = phone.call()
        assert call.final_status == 200
        phone.hang_up(call)
    health = ctl_json(daemon, "health")
    assert health["components"]["records"]["healthy"] is False
    assert len(daemon.events("records_unhealthy")) == 1
    (record,) = records_of(daemon)  # still held in memory, waiting for the disk
    assert record["call_id"] == call.call_id
