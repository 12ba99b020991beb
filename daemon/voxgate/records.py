"""Durable call records: one SQLite row per call, written off the event loop.

A record is written when a call is admitted (:meth:`Records.admitted`) and
completed when it ends (:meth:`Records.completed`). Both calls are sync, never
block and never raise: they put a snapshot of the record in a bounded pending
table keyed by session id, and the :class:`Records` service writes what is
pending in one transaction per batch, in a worker thread, so a slow disk never
stalls the media clock.

Durability (SQLite ``journal_mode=WAL``, ``synchronous=FULL``; see
https://sqlite.org/wal.html and https://sqlite.org/pragma.html#pragma_synchronous):
a committed record survives power loss. Rows still ``active`` when the
service next opens the database belong to calls that were up when the
process died; they are marked ``interrupted`` with what was known.

A full disk or an unwritable database makes the component unhealthy (one
``records_unhealthy`` warning per outage), keeps the pending writes and
retries with backoff; calls never wait for records.

The SQL lives in :class:`CallStore` (plain ``sqlite3``, no trio, no clock);
:class:`Records` is the Trio driver that owns the thread, timing and health.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields, replace
from datetime import UTC, datetime
from typing import Any, TypeVar

import trio
from prometheus_client import Counter, Gauge

from voxgate.backoff import Backoff
from voxgate.errors import VoxgateError
from voxgate.logging import log_event
from voxgate.metrics import REGISTRY

RECORDS_UP = Gauge(
    "voxgate_records_up", "1 while the call-records database is writable, else 0",
    registry=REGISTRY,
)
RECORDS_WRITES = Counter(
    "voxgate_records_writes", "Call-record writes: ok and dropped count records, "
    "error counts failed write attempts", ["result"], registry=REGISTRY,
)
RECORDS_PENDING = Gauge(
    "voxgate_records_pending", "Call records waiting to be written", registry=REGISTRY,
)

SCHEMA_VERSION = 1
"""``PRAGMA user_version`` of the ``calls`` schema this module writes."""
FLUSH_GRACE_S = 5.0
"""How long a stopping :meth:`Records.run` keeps trying to write what is pending."""
RETRY_INITIAL_S = 1.0
"""First delay before retrying a failed open or write; doubles per failure …"""
RETRY_MAX_S = 30.0
"""… up to this delay."""
BUSY_TIMEOUT_S = 5.0
"""How long SQLite waits for a lock held by another connection (``voxgatectl``)."""
LIST_LIMIT_MAX = 10_000
"""Most records one :meth:`Records.list_calls` returns."""

ACTIVE = "active"
ENDED = "ended"
INTERRUPTED = "interrupted"

_DB_ERRORS = (sqlite3.Error, OSError)
_SECONDS_PER_DAY = 86_400.0
_ISO_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"
_T = TypeVar("_T")


class RecordsSchemaError(VoxgateError):
    """The database carries a schema version newer than :data:`SCHEMA_VERSION`."""


def iso_utc(epoch_s: float) -> str:
    """UNIX epoch seconds → ISO 8601 UTC with microseconds (``…T12:00:00.000000Z``)."""
    return datetime.fromtimestamp(epoch_s, UTC).strftime(_ISO_FORMAT)


def _iso(ts: float | None) -> str | None:
    return None if ts is None else iso_utc(ts)


def _epoch(value: object, key: str) -> float | None:
    """ISO 8601 string (or null) of :func:`_iso` → UNIX epoch seconds."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError(f"{key}: expected an ISO 8601 string")
    stamp = datetime.fromisoformat(value)
    if stamp.tzinfo is None:
        raise ValueError(f"{key}: timestamp without a time zone")
    return stamp.timestamp()


def _typed(d: Mapping[str, object], key: str, kind: type[_T], default: _T) -> _T:
    value = d.get(key, default)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind):
        raise ValueError(f"{key}: expected {kind.__name__}")
    return value


def _optional(d: Mapping[str, object], key: str, kind: type[_T]) -> _T | None:
    return None if d.get(key) is None else _typed(d, key, kind, kind())


@dataclass
class CallRecord:
    """What is known about one call; the call lifecycle fills it in as it goes.

    Times are UNIX epoch seconds (``time.time()``); ``state`` is ``active``,
    ``ended`` or ``interrupted``; ``drops`` counts dropped frames/packets by
    cause; ``turns`` holds the transcripts and timings of each turn (JSON
    values only; anything else is written as its ``str()``).
    """

    session_id: str
    call_id: str
    """SIP Call-ID, WebSocket callSid, or ALSA ``<line>-<session>``."""
    transport: str
    """``sip``, ``websocket`` or ``alsa``."""
    tenant: str
    admitted_at: float
    from_uri: str = ""
    to_uri: str = ""
    agent: str = ""
    """The ``[agent] kind``."""
    provider: str | None = None
    codec: str = ""
    queue_wait_s: float = 0.0
    answered_at: float | None = None
    ended_at: float | None = None
    reason: str | None = None
    """End reason (``bye``, ``error``, ``interrupted`` …)."""
    state: str = ACTIVE
    packets_in: int = 0
    packets_out: int = 0
    drops: dict[str, int] = field(default_factory=dict)
    pauses: int = 0
    recoveries: int = 0
    barge_ins: int = 0
    agent_requests: int = 0
    turns: list[dict[str, object]] = field(default_factory=list)
    recording_path: str | None = None
    cost_per_minute: float = 0.0
    direction: str = "inbound"
    """``inbound`` (the peer called us) or ``outbound`` (``voxgatectl call``)."""

    def to_json(self) -> dict[str, object]:
        """THE JSON shape of a call (``voxgatectl calls --json``/``show``, ``call.completed``).

        Every field, except that ``admitted_at`` is given as ``started_at``;
        ``started_at``, ``answered_at`` and ``ended_at`` are ISO 8601 UTC strings
        (null while unknown). Derived: ``duration_s`` (ended - started, null
        while up), ``talk_s`` (ended - answered, null unless both are known),
        ``media_s`` (``talk_s`` or 0) and ``cost`` (``media_s`` / 60 *
        ``cost_per_minute``, 6 decimals). ``drops`` and ``turns`` are copies.
        Raises ValueError/OverflowError/OSError for a timestamp out of range.
        """
        out: dict[str, object] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "admitted_at":
                out["started_at"] = _iso(value)
            elif f.name in ("answered_at", "ended_at"):
                out[f.name] = _iso(value)
            elif f.name == "drops":
                out[f.name] = dict(value)
            elif f.name == "turns":
                out[f.name] = [dict(turn) for turn in value]
            else:
                out[f.name] = value
        duration_s = None if self.ended_at is None else self.ended_at - self.admitted_at
        talk_s = (None if self.ended_at is None or self.answered_at is None
                  else self.ended_at - self.answered_at)
        media_s = talk_s or 0.0
        out.update(duration_s=duration_s, talk_s=talk_s, media_s=media_s,
                   cost=round(media_s / 60.0 * self.cost_per_minute, 6))
        return out

    @classmethod
    def from_json(cls, d: Mapping[str, object]) -> CallRecord:
        """Read back a :meth:`to_json` dict (derived and unknown keys are ignored).

        Times come back to the microsecond (the precision of the ISO strings).

        Raises ValueError when ``session_id``, ``call_id``, ``transport``,
        ``tenant`` or ``started_at`` is missing or a value has the wrong type.
        """
        admitted_at = _epoch(d.get("started_at"), "started_at")
        if admitted_at is None:
            raise ValueError("started_at: missing")
        drops = _typed(d, "drops", dict, {})
        turns = _typed(d, "turns", list, [])
        if not all(isinstance(k, str) and isinstance(v, int) for k, v in drops.items()):
            raise ValueError("drops: expected {cause: count}")
        if not all(isinstance(turn, dict) for turn in turns):
            raise ValueError("turns: expected a list of objects")
        required = {key: _typed(d, key, str, "") for key in
                    ("session_id", "call_id", "transport", "tenant")}
        if not all(required.values()):
            raise ValueError(f"missing one of {', '.join(required)}")
        return cls(
            **required,
            admitted_at=admitted_at,
            from_uri=_typed(d, "from_uri", str, ""),
            to_uri=_typed(d, "to_uri", str, ""),
            agent=_typed(d, "agent", str, ""),
            provider=_optional(d, "provider", str),
            codec=_typed(d, "codec", str, ""),
            queue_wait_s=_typed(d, "queue_wait_s", float, 0.0),
            answered_at=_epoch(d.get("answered_at"), "answered_at"),
            ended_at=_epoch(d.get("ended_at"), "ended_at"),
            reason=_optional(d, "reason", str),
            direction=_typed(d, "direction", str, "inbound"),
            state=_typed(d, "state", str, ACTIVE),
            packets_in=_typed(d, "packets_in", int, 0),
            packets_out=_typed(d, "packets_out", int, 0),
            drops=dict(drops),
            pauses=_typed(d, "pauses", int, 0),
            recoveries=_typed(d, "recoveries", int, 0),
            barge_ins=_typed(d, "barge_ins", int, 0),
            agent_requests=_typed(d, "agent_requests", int, 0),
            turns=[dict(turn) for turn in turns],
            recording_path=_optional(d, "recording_path", str),
            cost_per_minute=_typed(d, "cost_per_minute", float, 0.0),
        )


@dataclass(frozen=True)
class RecordRow:
    """One ``calls`` row: the indexed columns and the :meth:`CallRecord.to_json` text.

    A frozen snapshot: what the lifecycle changes afterwards does not reach it.
    """

    session_id: str
    call_id: str
    transport: str
    tenant: str
    reason: str | None
    state: str
    started_at: float
    ended_at: float | None
    record_json: str

    @classmethod
    def of(cls, record: CallRecord) -> RecordRow:
        """Snapshot ``record``; raises ValueError/OverflowError/OSError (bad timestamp)
        or TypeError (a ``turns`` key JSON cannot hold)."""
        text = json.dumps(record.to_json(), default=str, separators=(",", ":"))
        return cls(record.session_id, record.call_id, record.transport, record.tenant,
                   record.reason, record.state, record.admitted_at, record.ended_at, text)

    def matches(self, since: float | None, tenant: str | None, reason: str | None) -> bool:
        """The :meth:`Records.list_calls` filter, applied in memory."""
        return ((since is None or self.started_at >= since)
                and (tenant is None or self.tenant == tenant)
                and (reason is None or self.reason == reason))

    def record(self) -> dict[str, object]:
        """A fresh copy of the record's JSON dict."""
        value: dict[str, object] = json.loads(self.record_json)
        return value


_COLUMNS = "session_id, call_id, transport, tenant, reason, state, started_at, ended_at, record"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS calls (
    session_id TEXT PRIMARY KEY, call_id TEXT NOT NULL, transport TEXT NOT NULL,
    tenant TEXT NOT NULL, reason TEXT, state TEXT NOT NULL,
    started_at REAL NOT NULL, ended_at REAL, record TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS calls_call_id ON calls (call_id);
CREATE INDEX IF NOT EXISTS calls_started_at ON calls (started_at);
"""


class CallStore:
    """The ``calls`` table over one ``sqlite3`` connection: plain sync code, no clock.

    Not thread-safe by itself: the caller serializes every use (the
    :class:`Records` driver runs each call in a worker thread behind one
    ``CapacityLimiter(1)``). Methods raise ``sqlite3.Error`` or ``OSError``
    when the database cannot be read or written; a failed write is rolled back.
    """

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    @classmethod
    def open(cls, path: str) -> CallStore:
        """Connect to ``path`` (the file is created, never its directory) with WAL and
        ``synchronous=FULL``, then create or check the schema (:meth:`schema`)."""
        conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT_S, isolation_level=None,
                               check_same_thread=False)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            store = cls(conn)
            store.schema()
        except BaseException:
            conn.close()
            raise
        return store

    @property
    def journal_mode(self) -> str:
        """``wal``, or what SQLite fell back to where WAL is not possible."""
        return str(self.conn.execute("PRAGMA journal_mode").fetchone()[0])

    def schema(self) -> None:
        """Create the table and indexes if missing; raise RecordsSchemaError if the
        file's ``user_version`` is newer than :data:`SCHEMA_VERSION`."""
        version = int(self.conn.execute("PRAGMA user_version").fetchone()[0])
        if version > SCHEMA_VERSION:
            raise RecordsSchemaError(
                f"schema version {version} is newer than this voxgate's {SCHEMA_VERSION}")
        self.conn.executescript(f"BEGIN; {_SCHEMA} PRAGMA user_version={SCHEMA_VERSION}; COMMIT;")

    def close(self) -> None:
        self.conn.close()

    def _transaction(self, work: Callable[[], _T]) -> _T:
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            result = work()
        except BaseException:
            self.conn.rollback()
            raise
        self.conn.execute("COMMIT")
        return result

    def upsert_batch(self, rows: Iterable[RecordRow]) -> None:
        """Insert or replace every row (by session id) in one transaction."""
        values = [(r.session_id, r.call_id, r.transport, r.tenant, r.reason, r.state,
                   r.started_at, r.ended_at, r.record_json) for r in rows]
        self._transaction(lambda: self.conn.executemany(
            f"INSERT OR REPLACE INTO calls ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            values))

    def mark_interrupted(self) -> int:
        """Mark every ``active`` row ``interrupted`` (reason ``interrupted``, the rest as
        it was) and return how many there were."""
        def work() -> int:
            active = self.conn.execute(
                "SELECT session_id, record FROM calls WHERE state = ?", (ACTIVE,)).fetchall()
            for session_id, text in active:
                record = json.loads(text)
                record.update(state=INTERRUPTED, reason=INTERRUPTED)
                self.conn.execute(
                    "UPDATE calls SET state = ?, reason = ?, record = ? WHERE session_id = ?",
                    (INTERRUPTED, INTERRUPTED, json.dumps(record, separators=(",", ":")),
                     session_id))
            return len(active)
        return self._transaction(work)

    def prune(self, now_s: float, keep_days: float, max_rows: int) -> int:
        """Delete non-active rows started before ``now_s`` - ``keep_days`` (0: keep all),
        then the oldest non-active rows while the table holds more than ``max_rows``
        (0: no cap). Returns the number of rows deleted."""
        def work() -> int:
            deleted = 0
            if keep_days > 0:
                deleted += self.conn.execute(
                    "DELETE FROM calls WHERE state != ? AND started_at < ?",
                    (ACTIVE, now_s - keep_days * _SECONDS_PER_DAY)).rowcount
            if max_rows > 0:
                excess = self.conn.execute("SELECT COUNT(*) FROM calls").fetchone()[0] - max_rows
                if excess > 0:
                    deleted += self.conn.execute(
                        "DELETE FROM calls WHERE session_id IN (SELECT session_id FROM calls "
                        "WHERE state != ? ORDER BY started_at LIMIT ?)", (ACTIVE, excess)).rowcount
            return deleted
        return self._transaction(work)

    def query(self, *, since: float | None, tenant: str | None, reason: str | None,
              limit: int) -> list[RecordRow]:
        """Rows matching every filter given, newest ``started_at`` first, at most ``limit``."""
        where, args = ["1"], list[Any]()
        for clause, value in (("started_at >= ?", since), ("tenant = ?", tenant),
                              ("reason = ?", reason)):
            if value is not None:
                where.append(clause)
                args.append(value)
        cursor = self.conn.execute(
            f"SELECT {_COLUMNS} FROM calls WHERE {' AND '.join(where)} "
            "ORDER BY started_at DESC LIMIT ?", (*args, limit))
        return [RecordRow(*row) for row in cursor]

    def get(self, key: str) -> RecordRow | None:
        """The row whose session id is ``key``, else the newest whose call id is ``key``."""
        row = self.conn.execute(
            f"SELECT {_COLUMNS} FROM calls WHERE session_id = ?", (key,)).fetchone()
        if row is None:
            row = self.conn.execute(
                f"SELECT {_COLUMNS} FROM calls WHERE call_id = ? ORDER BY started_at DESC "
                "LIMIT 1", (key,)).fetchone()
        return None if row is None else RecordRow(*row)


@dataclass
class RecordsStats:
    """Counters of one :class:`Records` since it was made (a copy; see ``Records.stats``).

    ``written``: records committed; ``write_errors``: failed open/write/prune
    attempts; ``dropped``: records pushed out of the full pending table (or
    whose snapshot failed); ``pending``: records waiting now;
    ``interrupted``: rows marked interrupted at start; ``pruned``: rows
    deleted by retention.
    """

    written: int = 0
    write_errors: int = 0
    dropped: int = 0
    pending: int = 0
    interrupted: int = 0
    pruned: int = 0


class Records:
    """The Trio service writing call records; one per daemon.

    ``path`` is the SQLite file (its directory must exist); ``keep_days`` and
    ``max_rows`` bound what is kept (0: no bound); ``queue_size`` bounds the
    pending records; retention runs every ``prune_interval_s`` seconds.
    Raises ValueError for a negative bound, a ``queue_size`` < 1 or an interval <= 0.
    :meth:`admitted`, :meth:`completed` and the properties must be used from
    the Trio thread.
    """

    def __init__(self, path: str, *, keep_days: float, max_rows: int, queue_size: int,
                 prune_interval_s: float = 600.0) -> None:
        if keep_days < 0 or max_rows < 0 or queue_size < 1 or prune_interval_s <= 0:
            raise ValueError("records: keep_days and max_rows must be >= 0, queue_size >= 1, "
                             "prune_interval_s > 0")
        self.path = path
        self.keep_days = keep_days
        self.max_rows = max_rows
        self.queue_size = queue_size
        self.prune_interval_s = prune_interval_s
        self.last_error: str | None = None
        """The last failure (``ExceptionType: text``); kept after recovery."""
        self._healthy = True
        self._stats = RecordsStats()
        self._pending: dict[str, RecordRow] = {}
        self._drops_logged = False
        self._wakeup = trio.Event()
        self._limiter = trio.CapacityLimiter(1)
        self._store: CallStore | None = None
        self._interrupted_marked = False
        RECORDS_UP.set_function(lambda: 1.0 if self._healthy else 0.0)
        RECORDS_PENDING.set_function(lambda: float(len(self._pending)))

    @property
    def healthy(self) -> bool:
        """False from a failed open/write until the next successful write."""
        return self._healthy

    @property
    def stats(self) -> RecordsStats:
        """A copy of the counters, ``pending`` filled in."""
        return replace(self._stats, pending=len(self._pending))

    def admitted(self, record: CallRecord) -> None:
        """Queue the record of a call just admitted. Never blocks, never raises."""
        self._put(record)

    def completed(self, record: CallRecord) -> None:
        """Queue the final record of a call that ended (it replaces a pending admit).

        Never blocks, never raises; ``state`` and ``reason`` are as the caller set them.
        """
        self._put(record)

    def _put(self, record: CallRecord) -> None:
        try:
            row = RecordRow.of(record)
        except (TypeError, ValueError, OverflowError, OSError) as exc:
            self._drop(1, f"bad record: {exc}", session_id=record.session_id)
            return
        self._pending.pop(row.session_id, None)
        if len(self._pending) >= self.queue_size:
            del self._pending[next(iter(self._pending))]
            self._drop(1, "pending records full", queue_size=self.queue_size)
        self._pending[row.session_id] = row
        self._wakeup.set()

    def _drop(self, count: int, why: str, **fields: Any) -> None:
        self._stats.dropped += count
        RECORDS_WRITES.labels("dropped").inc(count)
        if not self._drops_logged:
            self._drops_logged = True
            log_event(logging.WARNING, "records_dropped", f"call records dropped: {why}",
                      path=self.path, **fields)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Open the database, recover interrupted rows, then write and prune until cancelled.

        Reports started after the first open attempt, whether or not it worked
        (calls never wait for records); a failed open is retried with backoff
        (:data:`RETRY_INITIAL_S` doubling to :data:`RETRY_MAX_S`), like a failed
        write. Never raises but ``trio.Cancelled``. On cancellation it keeps
        writing what is pending for up to :data:`FLUSH_GRACE_S` seconds
        (shielded; a write already running in a thread is waited for), logs
        ``records_unflushed`` if some is left, and closes the database.
        """
        try:
            await self._ensure_open()
            task_status.started()
            await self._serve()
        finally:
            with trio.move_on_after(FLUSH_GRACE_S, shield=True):
                await self._flush()
            if self._pending:
                log_event(logging.WARNING, "records_unflushed", "call records not written",
                          count=len(self._pending), path=self.path)
            with trio.CancelScope(shield=True):
                await self._close_store()

    async def _serve(self) -> None:
        backoff = Backoff()
        next_prune = trio.current_time()
        while True:
            ok = await self._ensure_open()
            if ok and trio.current_time() >= next_prune:
                ok = await self._prune()
                if ok:
                    next_prune = trio.current_time() + self.prune_interval_s
            if ok and self._pending:
                ok = await self._write_pending()
            if not ok:
                await _back_off(backoff)
                continue
            backoff.reset()
            if not self._pending:
                with trio.move_on_at(next_prune):
                    await self._wakeup.wait()
                self._wakeup = trio.Event()

    async def _flush(self) -> None:
        backoff = Backoff()
        while self._pending:
            if not (await self._ensure_open() and await self._write_pending()):
                await _back_off(backoff)

    async def _in_thread(self, work: Callable[[], _T]) -> _T:
        return await trio.to_thread.run_sync(work, limiter=self._limiter)

    async def _ensure_open(self) -> bool:
        """Open the store if needed (marking interrupted rows once); False on failure."""
        if self._store is not None:
            return True
        mark = not self._interrupted_marked
        try:
            store, count, journal_mode = await self._in_thread(
                lambda: _open_store(self.path, mark_interrupted=mark))
        except (*_DB_ERRORS, RecordsSchemaError) as exc:
            self._failed(exc)
            return False
        self._store = store
        self._interrupted_marked = True
        self._stats.interrupted += count
        if count:
            log_event(logging.WARNING, "records_interrupted",
                      "calls that were up when voxgate stopped marked interrupted",
                      count=count, path=self.path)
        log_event(logging.INFO, "records_open", "call records open", path=self.path,
                  journal_mode=journal_mode)
        return True

    async def _write_pending(self) -> bool:
        """Write a snapshot of the pending rows in one transaction; False on failure.

        Rows replaced or dropped while the write runs stay as they are now.
        """
        store = self._store
        assert store is not None
        batch = list(self._pending.values())
        try:
            await self._in_thread(lambda: store.upsert_batch(batch))
        except _DB_ERRORS as exc:
            await self._lost(exc)
            return False
        for row in batch:
            if self._pending.get(row.session_id) is row:
                del self._pending[row.session_id]
        self._stats.written += len(batch)
        RECORDS_WRITES.labels("ok").inc(len(batch))
        self._drops_logged = False
        if not self._healthy:
            self._healthy = True
            log_event(logging.INFO, "records_recovered", "call records writable again",
                      path=self.path, pending=len(self._pending))
        return True

    async def _prune(self) -> bool:
        store = self._store
        assert store is not None
        now_s = time.time()
        try:
            pruned = await self._in_thread(
                lambda: store.prune(now_s, self.keep_days, self.max_rows))
        except _DB_ERRORS as exc:
            await self._lost(exc)
            return False
        self._stats.pruned += pruned
        if pruned:
            log_event(logging.INFO, "records_pruned", "old call records deleted",
                      count=pruned, path=self.path)
        return True

    async def _lost(self, exc: BaseException) -> None:
        """A failure on an open store: count it and close the store (reopened on retry)."""
        self._failed(exc)
        await self._close_store()

    async def _close_store(self) -> None:
        store, self._store = self._store, None
        if store is not None:
            with contextlib.suppress(*_DB_ERRORS):
                await self._in_thread(store.close)

    def _failed(self, exc: BaseException) -> None:
        self._stats.write_errors += 1
        RECORDS_WRITES.labels("error").inc()
        self.last_error = f"{type(exc).__name__}: {exc}"
        if self._healthy:
            self._healthy = False
            log_event(logging.WARNING, "records_unhealthy", "call records cannot be written",
                      path=self.path, error=self.last_error, pending=len(self._pending))

    async def list_calls(self, *, since: float | None = None, tenant: str | None = None,
                         reason: str | None = None, limit: int = 50) -> list[dict[str, object]]:
        """Call records (:meth:`CallRecord.to_json` dicts), newest ``started_at`` first.

        Filters: ``since`` (epoch seconds, lower bound on ``started_at``),
        ``tenant``, end ``reason``; at most ``limit`` (clamped to
        :data:`LIST_LIMIT_MAX`; ValueError if < 1). Pending records are merged
        over the database rows; when the database cannot be read, only pending
        records are returned (and ``records_read_failed`` is logged).
        Cancellation waits for a query already running in its thread.
        """
        if limit < 1:
            raise ValueError("limit must be >= 1")
        limit = min(limit, LIST_LIMIT_MAX)
        before = dict(self._pending)
        stored = await self._read(lambda store: store.query(
            since=since, tenant=tenant, reason=reason, limit=limit + len(before)))
        rows = {r.session_id: r for r in before.values() if r.matches(since, tenant, reason)}
        rows.update((r.session_id, r) for r in stored or ())
        for row in self._pending.values():
            if row.matches(since, tenant, reason):
                rows[row.session_id] = row
            else:
                rows.pop(row.session_id, None)
        newest = sorted(rows.values(), key=lambda r: r.started_at, reverse=True)[:limit]
        return [row.record() for row in newest]

    async def get_call(self, key: str) -> dict[str, object] | None:
        """The record (:meth:`CallRecord.to_json` dict) whose session id is ``key``, else
        the newest whose Call-ID is ``key``, pending records first; None if unknown.

        When the database cannot be read, only pending records are searched.
        """
        if key in self._pending:
            return self._pending[key].record()
        stored = await self._read(lambda store: store.get(key))
        if key in self._pending:
            return self._pending[key].record()
        if stored is not None and stored.session_id == key:
            return stored.record()
        candidates = [r for r in self._pending.values() if r.call_id == key]
        if stored is not None and stored.session_id not in self._pending:
            candidates.append(stored)
        if not candidates:
            return None
        return max(candidates, key=lambda r: r.started_at).record()

    async def _read(self, work: Callable[[CallStore], _T]) -> _T | None:
        """``work(store)`` in the DB thread; None (and a warning) if it cannot be read.

        A failed read leaves health to the writer, which finds out on its own.
        """
        store = self._store
        if store is None:
            return None
        try:
            return await self._in_thread(lambda: work(store))
        except _DB_ERRORS as exc:
            log_event(logging.WARNING, "records_read_failed", "call records cannot be read",
                      path=self.path, error=f"{type(exc).__name__}: {exc}")
            return None


async def _back_off(backoff: Backoff) -> None:
    """Sleep after one more failure: RETRY_INITIAL_S doubling, at most RETRY_MAX_S."""
    await trio.sleep(backoff.delay_s(RETRY_INITIAL_S, RETRY_MAX_S))


def _open_store(path: str, *, mark_interrupted: bool) -> tuple[CallStore, int, str]:
    """Open ``path`` (creating its directory, mode 0750, if missing), mark interrupted
    rows if asked; (store, rows marked, journal mode). Raises OSError, sqlite3.Error."""
    os.makedirs(os.path.dirname(path) or ".", mode=0o750, exist_ok=True)
    store = CallStore.open(path)
    try:
        count = store.mark_interrupted() if mark_interrupted else 0
        return store, count, store.journal_mode
    except BaseException:
        store.close()
        raise
