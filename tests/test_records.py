"""Call records: real SQLite files, the Trio driver, recovery and retention."""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, closing
from pathlib import Path
from typing import Any

import pytest
import trio

from voxgate import records as records_module
from voxgate.metrics import REGISTRY
from voxgate.records import CallRecord, CallStore, RecordRow, Records

T0 = 1_700_000_000.0  # 2023-11-14T22:13:20Z


def make(session_id: str, *, call_id: str | None = None, tenant: str = "acme",
         admitted_at: float = T0, **changes: object) -> CallRecord:
    record = CallRecord(session_id=session_id, call_id=call_id or f"call-{session_id}",
                        transport="sip", tenant=tenant, admitted_at=admitted_at)
    for key, value in changes.items():
        setattr(record, key, value)
    return record


def end(record: CallRecord, reason: str = "bye", after_s: float = 30.0) -> CallRecord:
    record.ended_at = record.admitted_at + after_s
    record.reason = reason
    record.state = "ended"
    return record


def rows(path: Path) -> dict[str, tuple[str, str | None, dict[str, object]]]:
    """session_id -> (state, reason, record JSON), straight from the file."""
    with closing(sqlite3.connect(path)) as conn:
        return {sid: (state, reason, json.loads(text)) for sid, state, reason, text in
                conn.execute("SELECT session_id, state, reason, record FROM calls")}


def events(caplog: pytest.LogCaptureFixture, name: str) -> list[dict[str, object]]:
    found: list[dict[str, object]] = []
    for record in caplog.records:
        event, fields = getattr(record, "voxgate_fields", ("", {}))
        if event == name:
            found.append(fields)
    return found


async def wait_until(check: Callable[[], object], timeout_s: float = 10.0) -> None:
    with trio.fail_after(timeout_s):
        while not check():  # noqa: ASYNC110 - polls what the writer thread has done
            await trio.sleep(0.005)


@asynccontextmanager
async def running(records: Records) -> AsyncIterator[Records]:
    async with trio.open_nursery() as nursery:
        await nursery.start(records.run)
        yield records
        nursery.cancel_scope.cancel()


def new(path: Path, **options: float) -> Records:
    settings: dict[str, float] = {"keep_days": 0, "max_rows": 0, "queue_size": 100}
    settings.update(options)
    return Records(str(path), keep_days=settings["keep_days"],
                   max_rows=int(settings["max_rows"]), queue_size=int(settings["queue_size"]))


@pytest.fixture
def fast_retry(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(records_module, "RETRY_INITIAL_S", 0.01)
    monkeypatch.setattr(records_module, "RETRY_MAX_S", 0.04)


def test_json_shape_has_iso_times_and_derived_figures():
    record = make("s1", answered_at=T0 + 2.0, cost_per_minute=0.5, drops={"late": 3},
                  turns=[{"text": "hello", "latency_s": 0.8}])
    end(record, after_s=62.0)
    out = record.to_json()
    assert out["started_at"] == "2023-11-14T22:13:20.000000Z"
    assert out["ended_at"] == "2023-11-14T22:14:22.000000Z"
    assert out["duration_s"] == 62.0
    assert out["talk_s"] == 60.0
    assert out["media_s"] == 60.0
    assert out["cost"] == 0.5
    assert {"session_id", "call_id", "transport", "tenant", "reason", "state"} <= out.keys()
    assert "admitted_at" not in out
    assert CallRecord.from_json(json.loads(json.dumps(out))) == record


def test_json_of_a_call_still_up_has_null_durations():
    out = make("s1").to_json()
    assert (out["ended_at"], out["duration_s"], out["talk_s"]) == (None, None, None)
    assert (out["media_s"], out["cost"], out["state"]) == (0.0, 0.0, "active")


@pytest.mark.parametrize("broken", [
    {"session_id": 7}, {"started_at": None}, {"started_at": "2023-11-14T22:13:20"},
    {"drops": {"late": "x"}}, {"packets_in": "3"},
])
def test_from_json_rejects_wrong_shapes(broken):
    good = make("s1").to_json()
    with pytest.raises(ValueError):
        CallRecord.from_json({**good, **broken})


async def test_a_record_json_cannot_hold_is_dropped_without_raising(tmp_path):
    records = new(tmp_path / "calls.db")
    records.admitted(make("a", turns=[{("not", "a", "key"): 1}]))
    records.completed(make("b", admitted_at=1e300))
    assert (records.stats.dropped, records.stats.pending) == (2, 0)


async def test_admit_then_complete_leaves_one_row(tmp_path):
    path = tmp_path / "calls.db"
    written = REGISTRY.get_sample_value("voxgate_records_writes_total", {"result": "ok"}) or 0
    async with running(new(path)) as records:
        record = make("s1", from_uri="sip:alice@example.com", codec="PCMU")
        records.admitted(record)
        await wait_until(lambda: records.stats.written == 1)
        assert rows(path)["s1"][:2] == ("active", None)
        records.completed(end(record, "bye"))
        await wait_until(lambda: records.stats.written == 2)
    table = rows(path)
    assert list(table) == ["s1"]
    state, reason, stored = table["s1"]
    assert (state, reason) == ("ended", "bye")
    assert stored == record.to_json()
    assert records.healthy and records.stats.pending == 0
    assert REGISTRY.get_sample_value("voxgate_records_writes_total", {"result": "ok"}) \
        == written + 2
    with closing(sqlite3.connect(path)) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA user_version").fetchone()[0] == records_module.SCHEMA_VERSION


async def test_list_filters_and_get_by_session_or_call_id(tmp_path):
    async with running(new(tmp_path / "calls.db")) as records:
        records.completed(end(make("a", tenant="acme", admitted_at=T0), "bye"))
        records.completed(end(make("b", tenant="acme", admitted_at=T0 + 10), "error"))
        records.completed(end(make("c", tenant="zeta", admitted_at=T0 + 20,
                                   call_id="call-a"), "bye"))
        records.admitted(make("d", tenant="acme", admitted_at=T0 + 30))
        await wait_until(lambda: records.stats.pending == 0)

        async def ids(**filters: Any) -> list[object]:
            return [r["session_id"] for r in await records.list_calls(**filters)]

        assert await ids() == ["d", "c", "b", "a"]
        assert await ids(limit=2) == ["d", "c"]
        assert await ids(since=T0 + 10) == ["d", "c", "b"]
        assert await ids(tenant="acme") == ["d", "b", "a"]
        assert await ids(reason="bye") == ["c", "a"]
        assert await ids(tenant="acme", reason="bye") == ["a"]
        call = await records.get_call("a")
        assert call is not None and call["session_id"] == "a"
        newest = await records.get_call("call-a")  # Call-ID of a and c: the newest wins
        assert newest is not None and newest["session_id"] == "c"
        assert await records.get_call("nobody") is None
        with pytest.raises(ValueError):
            await records.list_calls(limit=0)


async def test_pending_records_are_read_before_they_are_written(tmp_path):
    records = new(tmp_path / "calls.db")  # not running: nothing is ever written
    records.admitted(make("a", admitted_at=T0))
    records.admitted(make("b", admitted_at=T0 + 5, call_id="shared"))
    records.completed(end(make("b", admitted_at=T0 + 5, call_id="shared"), "bye"))
    assert [r["session_id"] for r in await records.list_calls()] == ["b", "a"]
    assert [r["session_id"] for r in await records.list_calls(reason="bye")] == ["b"]
    shared = await records.get_call("shared")
    assert shared is not None and shared["state"] == "ended"
    assert records.stats.pending == 2
    assert not (tmp_path / "calls.db").exists()


async def test_pending_updates_are_merged_over_stored_rows(tmp_path, monkeypatch, fast_retry):
    async with running(new(tmp_path / "calls.db")) as records:
        records.admitted(make("a", admitted_at=T0))
        records.completed(end(make("b", admitted_at=T0 + 1), "bye"))
        await wait_until(lambda: records.stats.written == 2)
        release = trio.Event()

        async def stalled() -> bool:
            await release.wait()
            return False

        monkeypatch.setattr(records, "_write_pending", stalled)  # the writer holds no thread
        records.completed(end(make("a", admitted_at=T0), "error"))
        records.completed(end(make("b", admitted_at=T0 + 1), "error"))
        records.admitted(make("c", admitted_at=T0 + 2))
        listed = await records.list_calls()
        assert [(r["session_id"], r["reason"]) for r in listed] == [
            ("c", None), ("b", "error"), ("a", "error")]
        assert await records.list_calls(reason="bye") == []
        assert [r["session_id"] for r in await records.list_calls(reason="error", limit=1)] \
            == ["b"]
        stored_a = await records.get_call("a")
        assert stored_a is not None and stored_a["state"] == "ended"
        monkeypatch.delattr(records, "_write_pending")
        release.set()
        await wait_until(lambda: records.stats.pending == 0)


async def test_calls_up_at_a_crash_are_marked_interrupted_and_ended_ones_kept(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="voxgate")
    path = tmp_path / "calls.db"
    async with running(new(path)) as first:
        first.admitted(make("a", from_uri="sip:alice@example.com", answered_at=T0 + 1))
        first.admitted(make("b"))
        first.admitted(make("c"))
        first.completed(end(make("c"), "bye"))
        await wait_until(lambda: first.stats.pending == 0)
        # The process dies here: a and b were up, nothing more reaches the file.
    async with running(new(path)) as second:
        assert second.stats.interrupted == 2
    table = rows(path)
    assert {sid: row[:2] for sid, row in table.items()} == {
        "a": ("interrupted", "interrupted"), "b": ("interrupted", "interrupted"),
        "c": ("ended", "bye")}
    kept = CallRecord.from_json(table["a"][2])
    assert (kept.state, kept.from_uri, kept.answered_at) == (
        "interrupted", "sip:alice@example.com", T0 + 1)
    assert [e["count"] for e in events(caplog, "records_interrupted")] == [2]


def test_prune_by_age_and_by_row_cap_never_deletes_active_rows(tmp_path):
    day_s = 86_400.0
    with closing(CallStore.open(str(tmp_path / "calls.db"))) as store:
        store.upsert_batch([
            RecordRow.of(end(make("old"), after_s=1)),
            RecordRow.of(make("old-active")),
            RecordRow.of(end(make("recent-1", admitted_at=T0 + 5 * day_s), after_s=1)),
            RecordRow.of(end(make("recent-2", admitted_at=T0 + 6 * day_s), after_s=1)),
            RecordRow.of(end(make("recent-3", admitted_at=T0 + 7 * day_s), after_s=1)),
        ])
        now_s = T0 + 8 * day_s
        assert store.prune(now_s, keep_days=0, max_rows=0) == 0
        assert store.prune(now_s, keep_days=4, max_rows=0) == 1
        ids = {r.session_id for r in store.query(since=None, tenant=None, reason=None, limit=9)}
        assert ids == {"old-active", "recent-1", "recent-2", "recent-3"}
        assert store.prune(now_s, keep_days=4, max_rows=2) == 2
        ids = {r.session_id for r in store.query(since=None, tenant=None, reason=None, limit=9)}
        assert ids == {"old-active", "recent-3"}
        assert store.prune(now_s, keep_days=0.5, max_rows=1) == 1
        ids = {r.session_id for r in store.query(since=None, tenant=None, reason=None, limit=9)}
        assert ids == {"old-active"}


async def test_service_prunes_once_opened(tmp_path):
    path = tmp_path / "calls.db"
    with closing(CallStore.open(str(path))) as store:
        store.upsert_batch([RecordRow.of(end(make("ancient"))),
                            RecordRow.of(end(make("recent", admitted_at=time.time())))])
    async with running(new(path, keep_days=1)) as records:
        await wait_until(lambda: records.stats.pruned == 1)
    assert set(rows(path)) == {"recent"}


async def test_unwritable_database_is_unhealthy_once_and_recovers(tmp_path, caplog, fast_retry):
    caplog.set_level(logging.INFO, logger="voxgate")
    state_dir = tmp_path / "state"
    state_dir.write_text("a regular file where the directory should be")
    path = state_dir / "calls.db"
    async with running(new(path)) as records:
        records.admitted(make("a"))
        await wait_until(lambda: records.stats.write_errors >= 3)
        records.completed(end(make("a"), "bye"))
        records.admitted(make("b", admitted_at=T0 + 1))
        assert not records.healthy
        assert records.last_error is not None and "File exists" in records.last_error
        assert REGISTRY.get_sample_value("voxgate_records_up") == 0
        assert [r["session_id"] for r in await records.list_calls()] == ["b", "a"]
        assert len(events(caplog, "records_unhealthy")) == 1
        state_dir.unlink()  # the directory can now be made
        await wait_until(lambda: records.healthy and records.stats.pending == 0)
        assert REGISTRY.get_sample_value("voxgate_records_up") == 1
    assert {sid: row[:2] for sid, row in rows(path).items()} == {
        "a": ("ended", "bye"), "b": ("active", None)}
    assert len(events(caplog, "records_unhealthy")) == 1
    assert len(events(caplog, "records_recovered")) == 1


async def test_newer_schema_is_unhealthy_and_stopping_gives_up_after_the_grace(
        tmp_path, fast_retry, monkeypatch, caplog):
    monkeypatch.setattr(records_module, "FLUSH_GRACE_S", 0.1)
    path = tmp_path / "calls.db"
    with closing(sqlite3.connect(path)) as conn:
        conn.execute(f"PRAGMA user_version={records_module.SCHEMA_VERSION + 1}")
    async with running(new(path)) as records:
        records.admitted(make("a"))
        await wait_until(lambda: records.stats.write_errors >= 1)
        assert not records.healthy
        assert records.last_error is not None and "RecordsSchemaError" in records.last_error
    assert [e["count"] for e in events(caplog, "records_unflushed")] == [1]
    assert records.stats.pending == 1


async def test_full_queue_drops_the_oldest_and_counts(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="voxgate")
    path = tmp_path / "calls.db"
    records = new(path, queue_size=2)
    for n, session_id in enumerate("abcd"):
        records.admitted(make(session_id, admitted_at=T0 + n))
    records.completed(end(make("c", admitted_at=T0 + 2)))  # replaces its admit: no drop
    assert records.stats.dropped == 2
    assert records.stats.pending == 2
    assert [r["session_id"] for r in await records.list_calls()] == ["d", "c"]
    assert len(events(caplog, "records_dropped")) == 1
    async with running(records):
        await wait_until(lambda: records.stats.pending == 0)
    assert set(rows(path)) == {"c", "d"}


async def test_a_slow_disk_does_not_stall_the_event_loop(tmp_path, monkeypatch):
    inside_write = threading.Event()
    write = CallStore.upsert_batch

    def slow_write(store: CallStore, batch: list[RecordRow]) -> None:
        inside_write.set()
        time.sleep(0.3)
        write(store, batch)
        inside_write.clear()

    monkeypatch.setattr(CallStore, "upsert_batch", slow_write)
    ticks_during_write = 0
    async with running(new(tmp_path / "calls.db")) as records:
        records.admitted(make("a"))
        while records.stats.written == 0:
            await trio.sleep(0.01)
            ticks_during_write += inside_write.is_set()
    assert ticks_during_write > 0
    assert records.stats.written == 1


async def test_stopping_flushes_what_is_pending(tmp_path):
    path = tmp_path / "calls.db"
    records = new(path)
    async with trio.open_nursery() as nursery:
        await nursery.start(records.run)
        records.admitted(make("a"))
        records.completed(end(make("b"), "bye"))
        nursery.cancel_scope.cancel()  # before the writer saw either
    assert records.stats.pending == 0
    assert {sid: row[0] for sid, row in rows(path).items()} == {"a": "active", "b": "ended"}
