"""Call records and post-call jobs against the real daemon.

Calls come from the raw test phone over 127.0.0.1; records are read back the
way an operator reads them (``voxgatectl calls --json``, ``voxgatectl show``);
``call.completed`` jobs go to a real HTTP server the test runs on loopback.
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import threading
import warnings
import wave
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.harness.daemon import Daemon, free_tcp_port
from tests.harness.phone import Phone
from tests.integration.conftest import StartDaemon
from tests.integration.test_control import ctl_json, health_json, wait_until

with warnings.catch_warnings():
    # Python 3.11/3.12 deprecate audioop (PEP 594) with a DeprecationWarning at import.
    warnings.simplefilter("ignore", DeprecationWarning)
    import audioop


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
    (tmp_path / "state").write_text("a regular file where the directory should be")
    daemon = start_daemon({"records": {"path": str(tmp_path / "state" / "calls.sqlite3")}})
    with Phone(daemon) as phone:
        call = phone.call()
        assert call.final_status == 200
        phone.hang_up(call)
    health = health_json(daemon)
    assert health["components"]["records"]["healthy"] is False
    assert len(daemon.events("records_unhealthy")) == 1
    (record,) = records_of(daemon)  # still held in memory, waiting for the disk
    assert record["call_id"] == call.call_id


def test_full_records_disk_degrades_health_but_never_calls(start_daemon: StartDaemon,
                                                           tmp_path: Path) -> None:
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs",
                              str(mount_point)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        daemon = start_daemon({"records": {"path": str(mount_point / "calls.sqlite3")}})
        wait_until(lambda: daemon.events("records_open"), "records open")
        filler = mount_point / "filler"
        with filler.open("wb", buffering=0) as f, contextlib.suppress(OSError):
            while True:
                f.write(bytes(4096))
        with Phone(daemon) as phone:
            calls = [phone.call() for _ in range(3)]
            assert [c.final_status for c in calls] == [200] * 3
            for call in calls:
                phone.hang_up(call)
        wait_until(lambda: not health_json(daemon)["components"]["records"]["healthy"],
                   "records reported unhealthy")
        assert daemon.alive()
        assert len(daemon.events("records_unhealthy")) == 1
        assert {r["call_id"] for r in records_of(daemon)} == {c.call_id for c in calls}
        filler.unlink()  # space again: the records written, healthy again
        wait_until(lambda: health_json(daemon)["components"]["records"]["healthy"],
                   "records healthy again", timeout_s=60)
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def test_post_call_jobs_survive_a_restart(start_daemon: StartDaemon, tmp_path: Path) -> None:
    path = str(tmp_path / "shared-calls.sqlite3")
    with webhook_server(fail_first=0) as (url, posts):
        dead_url = url.rsplit(":", 1)[0] + f":{free_tcp_port()}/calls"  # nothing listens
        first = start_daemon({"records": {"path": path},
                              "postcall": {"webhook": dead_url, "backoff_initial_s": 60,
                                           "backoff_max_s": 60}})
        with Phone(first) as phone:
            call = phone.call()
            phone.hang_up(call)
        wait_until(lambda: ctl_json(first, "jobs")["pending"] == 1, "the job pending a retry")
        first.proc.send_signal(signal.SIGTERM)
        assert first.proc.wait(timeout=30) == 0
        assert posts == []
        second = start_daemon({"records": {"path": path},
                               "postcall": {"webhook": url, "backoff_initial_s": 0.1}})
        # Its retry time (60 s) has not come: a restart keeps it; a new call's job goes first.
        with Phone(second) as phone:
            newer = phone.call()
            phone.hang_up(newer)
        wait_until(lambda: posts, "the new call's job")
    assert posts[0]["data"]["call_id"] == newer.call_id
    assert ctl_json(second, "jobs")["pending"] == 1  # the old one waits for its retry time


def test_recordings_are_stereo_wavs_named_in_the_record(start_daemon: StartDaemon,
                                                        tmp_path: Path) -> None:
    recordings = tmp_path / "recordings"
    daemon = start_daemon({"records": {"recordings_dir": str(recordings)}})
    with Phone(daemon) as phone:
        peer = phone.rtp_peer()
        peer.play(bytes(range(0, 256, 2)) * 100, loop=True)
        call = phone.call(media=peer)
        peer.resume()
        wait_until(lambda: len(peer.echoed()) >= 50, "a second of echo")
        phone.hang_up(call)
    (record,) = records_of(daemon)
    path = Path(record["recording_path"])
    assert path.parent == recordings and path.name.endswith(f"-{record['session_id']}.wav")
    with wave.open(str(path)) as wav:
        assert (wav.getnchannels(), wav.getsampwidth(), wav.getframerate()) == (2, 2, 8000)
        frames = wav.readframes(wav.getnframes())
    left, right = audioop.tomono(frames, 2, 1, 0), audioop.tomono(frames, 2, 0, 1)
    assert audioop.rms(left, 2) > 0 and audioop.rms(right, 2) > 0  # caller and echo
