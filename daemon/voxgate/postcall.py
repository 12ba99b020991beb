"""The persistent post-call job queue: each ended call's record POSTed to a webhook.

When a call ends the daemon calls :meth:`PostCallQueue.enqueue` with a
``call.completed`` job (the call record). The job is kept in the table
``postcall_jobs`` of the records' SQLite file (this module's own connection,
WAL journal, ``busy_timeout`` so it and the call records' writer wait for each
other) and ``[postcall] workers`` tasks deliver it to ``[postcall] webhook``
as one JSON POST (RFC 9110 §9.3.3, RFC 8259)::

    {"event": "call.completed", "job_id": 42, "attempt": 1,
     "created_at": "2024-05-01T12:00:00.000000Z", "data": {…the record…}}

* Newest first: a worker claims the most recent due job, so when a backlog
  builds the calls that just ended are reported first.
* A 2xx answer delivers the job. Any other status, a transport error or no
  answer within ``timeout_s`` is retried after :func:`~voxgate.backoff.backoff_delay_s` until
  ``max_attempts`` attempts, then the job is ``failed`` with its last error.
* Bounded: at most ``max_pending`` jobs wait in memory and as many in the
  table; beyond that the oldest pending one is dropped and counted. At most
  ``keep_finished`` done/failed rows are kept.
* At-least-once: a job is ``done`` only after a 2xx. Jobs ``in_flight`` when
  the process stopped are pending again at the next start, so a crash
  mid-delivery delivers that job again; receivers deduplicate on ``job_id``.
* Drain: :meth:`PostCallQueue.stop_claiming` then
  :meth:`PostCallQueue.wait_idle` waits for the POSTs in flight, never for the
  backlog, which stays in the table for the next start.

Database work runs in worker threads (``trio.to_thread.run_sync``), one call
at a time behind a ``CapacityLimiter(1)``; :class:`JobStore` is that blocking
part, with no Trio in it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import sqlite3
import ssl
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar, TypeVarTuple

import httpx
import trio
from prometheus_client import Counter, Gauge, Histogram

from voxgate.backoff import backoff_delay_s
from voxgate.logging import log_event
from voxgate.metrics import REGISTRY
from voxgate.records import iso_utc

QUEUE_DEPTH = Gauge(
    "voxgate_postcall_queue_depth", "Post-call jobs pending in the database",
    registry=REGISTRY,
)
DELIVERIES = Counter(
    "voxgate_postcall_deliveries", "Post-call job outcomes: ok (delivered), retry (an "
    "attempt failed, another follows), failed (gave up), dropped (queue full)",
    ["result"], registry=REGISTRY,
)
DELIVERY_SECONDS = Histogram(
    "voxgate_postcall_delivery_seconds", "Duration of one post-call webhook POST attempt",
    registry=REGISTRY, buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, float("inf")),
)
OLDEST_PENDING = Gauge(
    "voxgate_postcall_oldest_pending_seconds", "Age of the oldest pending post-call job",
    registry=REGISTRY,
)

PENDING, IN_FLIGHT, DONE, FAILED = "pending", "in_flight", "done", "failed"
BUSY_TIMEOUT_MS = 5000
"""How long a statement waits for the other writer of the file (SQLite ``busy_timeout``)."""
MAX_RESPONSE_BYTES = 64 * 1024
"""Largest reply body read (and ignored), when its Content-Length says so; a larger or
chunked one is not read and its connection is closed instead of kept alive."""
RECENT_FAILURES = 20
"""Failed jobs listed by :meth:`PostCallQueue.summary`, newest first."""
FINAL_FLUSH_S = 5.0
"""Time given, when :meth:`PostCallQueue.run` is cancelled, to write jobs not yet saved."""

_T = TypeVar("_T")
_Ts = TypeVarTuple("_Ts")

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS postcall_jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,
    payload TEXT NOT NULL,
    created_at REAL NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('{PENDING}', '{IN_FLIGHT}', '{DONE}', '{FAILED}')),
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,
    last_error TEXT,
    finished_at REAL
);
CREATE INDEX IF NOT EXISTS postcall_jobs_by_created ON postcall_jobs (state, created_at);
CREATE INDEX IF NOT EXISTS postcall_jobs_by_finished ON postcall_jobs (state, finished_at);
"""


def call_of(payload: str) -> dict[str, str]:
    """The ``session_id``, ``call_id`` and ``tenant`` strings of a job's JSON
    payload (a call record), those it has: the call the job's log records name."""
    try:
        data = json.loads(payload)
    except ValueError:
        return {}
    if not isinstance(data, dict):
        return {}
    return {name: value for name in ("session_id", "call_id", "tenant")
            if isinstance(value := data.get(name), str)}


def session_id_of(payload: str) -> str | None:
    """The ``session_id`` string of a job's JSON payload, or None."""
    return call_of(payload).get("session_id")


@dataclass(frozen=True, slots=True)
class NewJob:
    """A job not yet in the table: its kind, payload as JSON text, creation (epoch s)."""

    kind: str
    payload: str
    created_at: float


@dataclass(frozen=True, slots=True)
class Job:
    """A claimed row of ``postcall_jobs``; ``attempts`` counts the attempts before this one."""

    id: int
    kind: str
    payload: str
    created_at: float
    attempts: int

    def body(self) -> bytes:
        """The POST body of the next attempt (UTF-8 JSON; the payload spliced in as stored)."""
        head = json.dumps({"event": self.kind, "job_id": self.id, "attempt": self.attempts + 1,
                           "created_at": iso_utc(self.created_at)}, separators=(",", ":"))
        return f'{head[:-1]},"data":{self.payload}}}'.encode()


class JobStore:
    """The table ``postcall_jobs`` through one sqlite3 connection; blocking, no Trio.

    Call it from one thread at a time (the queue's ``CapacityLimiter(1)``).
    Every method raises :class:`sqlite3.Error` when the database fails (after
    waiting up to :data:`BUSY_TIMEOUT_MS` for the other writer of the file).
    ``pending`` and ``oldest_pending_at`` are refreshed by each method that
    changes the table, for the metrics.
    """

    def __init__(self, path: str, keep_finished: int) -> None:
        """Open ``path`` (WAL, ``synchronous=FULL``: a committed job survives power loss),
        create the table if missing, make ``in_flight`` rows pending again (``requeued``)."""
        self.keep_finished = keep_finished
        self.pending = 0
        self.oldest_pending_at: float | None = None
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False,
                                   timeout=BUSY_TIMEOUT_MS / 1000)
        try:
            self._db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            self._db.execute("PRAGMA journal_mode = WAL")
            self._db.execute("PRAGMA synchronous = FULL")
            self._db.executescript(_SCHEMA)
            with self._transaction():
                self.requeued = self._db.execute(
                    "UPDATE postcall_jobs SET state = ? WHERE state = ?", (PENDING, IN_FLIGHT),
                ).rowcount
                self._prune()
        except sqlite3.Error:
            self._db.close()
            raise

    def close(self) -> None:
        self._db.close()

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.rollback()
            raise
        self._db.commit()
        self._refresh()

    def _refresh(self) -> None:
        self.pending, self.oldest_pending_at = self._db.execute(
            "SELECT COUNT(*), MIN(created_at) FROM postcall_jobs WHERE state = ?", (PENDING,),
        ).fetchone()

    def _prune(self) -> None:
        self._db.execute(
            "DELETE FROM postcall_jobs WHERE id IN (SELECT id FROM postcall_jobs"
            " WHERE state IN (?, ?) ORDER BY finished_at DESC, id DESC LIMIT -1 OFFSET ?)",
            (DONE, FAILED, self.keep_finished))

    def insert(self, jobs: list[NewJob], max_pending: int) -> int:
        """Add ``jobs`` as pending and due; returns how many of the oldest pending were deleted
        to keep at most ``max_pending``."""
        with self._transaction():
            self._db.executemany(
                "INSERT INTO postcall_jobs (kind, payload, created_at, state, next_attempt_at)"
                " VALUES (?, ?, ?, ?, ?)",
                [(j.kind, j.payload, j.created_at, PENDING, j.created_at) for j in jobs])
            (pending,) = self._db.execute(
                "SELECT COUNT(*) FROM postcall_jobs WHERE state = ?", (PENDING,)).fetchone()
            excess = max(0, int(pending) - max_pending)
            self._db.execute(
                "DELETE FROM postcall_jobs WHERE id IN (SELECT id FROM postcall_jobs"
                " WHERE state = ? ORDER BY created_at, id LIMIT ?)", (PENDING, excess))
        return excess

    def claim(self, now: float) -> tuple[Job | None, float | None]:
        """Mark the newest pending job due at ``now`` (epoch s) in flight and return it;
        without one, None and the earliest ``next_attempt_at`` of the pending (or None)."""
        with self._transaction():
            row = self._db.execute(
                "SELECT id, kind, payload, created_at, attempts FROM postcall_jobs"
                " WHERE state = ? AND next_attempt_at <= ?"
                " ORDER BY created_at DESC, id DESC LIMIT 1", (PENDING, now)).fetchone()
            if row is None:
                (next_due_at,) = self._db.execute(
                    "SELECT MIN(next_attempt_at) FROM postcall_jobs WHERE state = ?",
                    (PENDING,)).fetchone()
                return None, next_due_at
            self._db.execute("UPDATE postcall_jobs SET state = ? WHERE id = ?",
                             (IN_FLIGHT, row[0]))
        return Job(*row), None

    def reschedule(self, job_id: int, attempts: int, error: str, next_attempt_at: float) -> None:
        """Job ``job_id`` failed its attempt number ``attempts``: pending again from then."""
        with self._transaction():
            self._db.execute(
                "UPDATE postcall_jobs SET state = ?, attempts = ?, last_error = ?,"
                " next_attempt_at = ? WHERE id = ?",
                (PENDING, attempts, error, next_attempt_at, job_id))

    def finish(self, job_id: int, state: str, attempts: int, error: str | None,
               finished_at: float) -> None:
        """Job ``job_id`` is ``done`` or ``failed``; keeps the ``keep_finished`` newest such."""
        with self._transaction():
            self._db.execute(
                "UPDATE postcall_jobs SET state = ?, attempts = ?, last_error = ?,"
                " finished_at = ? WHERE id = ?", (state, attempts, error, finished_at, job_id))
            self._prune()

    def summary(self) -> dict[str, object]:
        """Rows by state, ``oldest_pending_at`` (epoch s or None), ``recent_failures``."""
        counts: dict[str, object] = dict.fromkeys((PENDING, IN_FLIGHT, DONE, FAILED), 0)
        counts.update(self._db.execute(
            "SELECT state, COUNT(*) FROM postcall_jobs GROUP BY state").fetchall())
        (counts["oldest_pending_at"],) = self._db.execute(
            "SELECT MIN(created_at) FROM postcall_jobs WHERE state = ?", (PENDING,)).fetchone()
        rows = self._db.execute(
            "SELECT id, kind, attempts, last_error, payload, created_at FROM postcall_jobs"
            " WHERE state = ? ORDER BY finished_at DESC, id DESC LIMIT ?",
            (FAILED, RECENT_FAILURES)).fetchall()
        counts["recent_failures"] = [
            {"id": job_id, "kind": kind, "attempts": attempts, "last_error": error,
             "session_id": session_id_of(payload), "created_at": iso_utc(created_at)}
            for job_id, kind, attempts, error, payload, created_at in rows]
        return counts


def _small_body(response: httpx.Response) -> bool:
    length = response.headers.get("Content-Length", "")
    return length.isdigit() and int(length) <= MAX_RESPONSE_BYTES


class PostCallQueue:
    """Bounded, persistent, newest-first delivery of post-call jobs (see the module doc).

    Args:
        path: the SQLite file shared with the call records.
        webhook_url: where jobs are POSTed; empty turns the queue off
            (:meth:`enqueue` does nothing, :meth:`run` only waits).
        workers: deliveries at once (≥ 1).
        max_pending: most jobs waiting in memory, and most pending rows (≥ 1).
        max_attempts: attempts before a job is failed (≥ 1).
        backoff_initial_s, backoff_max_s: retry waits (:func:`~voxgate.backoff.backoff_delay_s`), of
            jobs and of the database when it fails.
        timeout_s: each POST attempt's whole time.
        keep_finished: done/failed rows kept for ``voxgatectl jobs``.
        wall_clock: epoch seconds for ``created_at``/``next_attempt_at`` (waits use Trio's clock).

    Raises:
        ValueError: ``workers``, ``max_pending`` or ``max_attempts`` below 1.

    ``healthy`` is False while the database cannot be opened or used;
    ``last_error`` is its latest error (kept after recovery).
    """

    def __init__(self, path: str, *, webhook_url: str, workers: int, max_pending: int,
                 max_attempts: int, backoff_initial_s: float, backoff_max_s: float,
                 timeout_s: float, keep_finished: int = 1000,
                 wall_clock: Callable[[], float] = time.time) -> None:
        if min(workers, max_pending, max_attempts) < 1:
            raise ValueError("workers, max_pending and max_attempts must be at least 1")
        self.path = path
        self.webhook_url = webhook_url
        self.workers = workers
        self.max_pending = max_pending
        self.max_attempts = max_attempts
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.timeout_s = timeout_s
        self.keep_finished = keep_finished
        self.healthy = True
        self.last_error: str | None = None
        self._wall_clock = wall_clock
        self._store: JobStore | None = None
        self._db_limiter = trio.CapacityLimiter(1)
        self._db_failures = 0
        self._intake: deque[NewJob] = deque()
        self._intake_ready = trio.Event()
        self._wake = trio.Event()
        self._claiming = True
        self._in_flight = 0
        self._idle = trio.Event()
        self._idle.set()
        self._dropped = 0
        self._dropping = False

    # -- the daemon's side -------------------------------------------------------

    def enqueue(self, kind: str, payload: dict[str, object]) -> None:
        """Queue a job (``kind`` e.g. ``call.completed``, ``payload`` JSON-able); never blocks
        or raises. Over ``max_pending`` unsaved jobs the oldest is dropped and counted; a
        payload JSON cannot encode (NaN, circular) is dropped, counted and logged."""
        if not self.webhook_url:
            return
        try:
            text = json.dumps(payload, ensure_ascii=False, allow_nan=False, default=str)
        except (TypeError, ValueError) as e:
            self._count_dropped(1)
            log_event(logging.WARNING, "postcall_unencodable", "post-call job dropped: "
                      "payload is not JSON", kind=kind, error=str(e))
            return
        if len(self._intake) >= self.max_pending:
            self._intake.popleft()
            self._queue_full(1, "intake")
        self._intake.append(NewJob(kind, text, self._wall_clock()))
        self._intake_ready.set()

    def stop_claiming(self) -> None:
        """Drain: workers finish the delivery they hold and take no new job."""
        self._claiming = False
        self._wake_workers()

    async def wait_idle(self) -> None:
        """Return once no job is being claimed or delivered (at once if none is).

        Does not wait for the backlog; call :meth:`stop_claiming` first, else
        it returns at any gap between deliveries. Cancellation leaves the
        deliveries running.
        """
        while self._in_flight:
            await self._idle.wait()

    async def summary(self) -> dict[str, object]:
        """The backlog for ``voxgatectl jobs``.

        Keys: ``pending``, ``in_flight``, ``done``, ``failed`` (rows; None while
        the database is unavailable), ``intake`` (jobs not yet written),
        ``dropped`` (since start), ``oldest_pending_age_s`` (float or None),
        ``healthy``, ``last_error``, ``enabled`` (a webhook is set),
        ``recent_failures`` (up to :data:`RECENT_FAILURES` of ``{"id", "kind",
        "attempts", "last_error", "session_id", "created_at"}`` with
        ``created_at`` in ISO 8601 UTC), newest failure first.
        """
        found: dict[str, object] = dict.fromkeys((PENDING, IN_FLIGHT, DONE, FAILED))
        found.update(oldest_pending_at=None, recent_failures=[])
        if self._store is not None:
            with contextlib.suppress(sqlite3.Error):
                found = await self._db(self._store.summary)
        oldest = found.pop("oldest_pending_at")
        age_s = self._wall_clock() - oldest if isinstance(oldest, int | float) else None
        return {**found, "intake": len(self._intake), "dropped": self._dropped,
                "oldest_pending_age_s": age_s, "healthy": self.healthy,
                "last_error": self.last_error, "enabled": bool(self.webhook_url)}

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
                  ) -> None:
        """Open the table, then persist and deliver jobs until cancelled.

        Reports started at once: a database that cannot be opened makes the
        queue unhealthy and is retried with backoff. On cancellation the
        deliveries in flight are abandoned (those jobs stay ``in_flight`` and
        are delivered again at the next start), jobs not yet written get
        :data:`FINAL_FLUSH_S` to be written, and the connection is closed.
        """
        task_status.started()
        if not self.webhook_url:
            await trio.sleep_forever()
        store = await self._open()
        try:
            tls = await trio.to_thread.run_sync(ssl.create_default_context)
            async with httpx.AsyncClient(
                verify=tls, timeout=self.timeout_s, follow_redirects=False,
                limits=httpx.Limits(max_connections=self.workers),
            ) as client, trio.open_nursery() as nursery:
                nursery.start_soon(self._persist, store)
                for _ in range(self.workers):
                    nursery.start_soon(self._work, store, client)
        finally:
            with trio.CancelScope(shield=True):
                with trio.move_on_after(FINAL_FLUSH_S):
                    if self._intake and not await self._save_intake(store):
                        log_event(logging.WARNING, "postcall_unsaved",
                                  "post-call jobs lost at exit", jobs=len(self._intake))
                self._store = None
                await trio.to_thread.run_sync(store.close, limiter=self._db_limiter)

    # -- the database ------------------------------------------------------------

    async def _db(self, fn: Callable[[*_Ts], _T], *args: *_Ts) -> _T:
        """``fn(*args)`` in a thread, one at a time; tracks health.

        Raises:
            sqlite3.Error: as ``fn``.
        """
        try:
            result = await trio.to_thread.run_sync(fn, *args, limiter=self._db_limiter)
        except sqlite3.Error as e:
            self._db_failures += 1
            self.last_error = f"{type(e).__name__}: {e}"
            if self.healthy:
                self.healthy = False
                log_event(logging.WARNING, "postcall_unhealthy",
                          "post-call job database unavailable", path=self.path,
                          error=self.last_error)
            raise
        self._db_failures = 0
        if not self.healthy:
            self.healthy = True
            log_event(logging.INFO, "postcall_healthy", "post-call job database back",
                      path=self.path)
        return result

    async def _db_backoff(self) -> None:
        await trio.sleep(backoff_delay_s(self._db_failures, self.backoff_initial_s,
                                       self.backoff_max_s))

    async def _open(self) -> JobStore:
        while self._store is None:
            try:
                self._store = await self._db(JobStore, self.path, self.keep_finished)
            except sqlite3.Error:
                await self._db_backoff()
        store = self._store
        QUEUE_DEPTH.set_function(lambda: store.pending)
        OLDEST_PENDING.set_function(lambda: self._oldest_pending_age_s(store))
        log_event(logging.INFO, "postcall_started", "post-call queue open",
                  path=self.path, pending=store.pending, requeued=store.requeued)
        return store

    def _oldest_pending_age_s(self, store: JobStore) -> float:
        oldest = store.oldest_pending_at
        return 0.0 if oldest is None else max(0.0, self._wall_clock() - oldest)

    # -- intake → table ----------------------------------------------------------

    async def _persist(self, store: JobStore) -> None:
        while True:
            if not self._intake:
                self._intake_ready = trio.Event()
                await self._intake_ready.wait()
            if not await self._save_intake(store):
                await self._db_backoff()

    async def _save_intake(self, store: JobStore) -> bool:
        """Write the intake to the table; False (jobs kept in the intake) if the database
        failed."""
        batch = list(self._intake)
        self._intake.clear()
        try:
            dropped = await self._db(store.insert, batch, self.max_pending)
        except BaseException as e:  # cancelled or failed: keep the jobs for the next write
            self._intake.extendleft(reversed(batch))
            while len(self._intake) > self.max_pending:
                self._intake.popleft()
                self._queue_full(1, "intake")
            if isinstance(e, sqlite3.Error):
                return False
            raise
        if dropped:
            self._queue_full(dropped, "table")
        else:
            self._dropping = False
        self._wake_workers()
        return True

    def _count_dropped(self, jobs: int) -> None:
        DELIVERIES.labels(result="dropped").inc(jobs)
        self._dropped += jobs

    def _queue_full(self, jobs: int, where: str) -> None:
        """Count ``jobs`` oldest pending dropped from the intake or the table; log once per
        burst (until a write drops nothing)."""
        self._count_dropped(jobs)
        if not self._dropping:
            self._dropping = True
            log_event(logging.WARNING, "postcall_dropped", "post-call queue full: oldest "
                      "pending jobs dropped", jobs=jobs, where=where,
                      max_pending=self.max_pending)

    def _wake_workers(self) -> None:
        self._wake.set()
        self._wake = trio.Event()

    # -- table → webhook ---------------------------------------------------------

    async def _work(self, store: JobStore, client: httpx.AsyncClient) -> None:
        while self._claiming:
            wake = self._wake
            try:
                job, next_due_at = await self._claim(store)
            except sqlite3.Error:
                await self._db_backoff()
                continue
            if job is None:
                delay_s = math.inf if next_due_at is None else next_due_at - self._wall_clock()
                with trio.move_on_after(max(0.0, delay_s)):
                    await wake.wait()
                continue
            try:
                await self._deliver(store, client, job)
            finally:
                self._end_delivery()

    async def _claim(self, store: JobStore) -> tuple[Job | None, float | None]:
        """As :meth:`JobStore.claim`; a job returned counts as in flight until
        :meth:`_end_delivery`."""
        if not self._in_flight:
            self._idle = trio.Event()
        self._in_flight += 1
        job: Job | None = None
        try:
            job, next_due_at = await self._db(store.claim, self._wall_clock())
        finally:
            if job is None:
                self._end_delivery()
        return job, next_due_at

    def _end_delivery(self) -> None:
        self._in_flight -= 1
        if not self._in_flight:
            self._idle.set()

    async def _deliver(self, store: JobStore, client: httpx.AsyncClient, job: Job) -> None:
        attempt = job.attempts + 1
        started_s = trio.current_time()
        error = await self._post(client, job)
        DELIVERY_SECONDS.observe(trio.current_time() - started_s)
        now = self._wall_clock()
        if error is None:
            DELIVERIES.labels(result="ok").inc()
            await self._settle(store.finish, job.id, DONE, attempt, None, now)
        elif attempt < self.max_attempts:
            DELIVERIES.labels(result="retry").inc()
            retry_at = now + backoff_delay_s(attempt, self.backoff_initial_s, self.backoff_max_s)
            await self._settle(store.reschedule, job.id, attempt, error, retry_at)
        else:
            DELIVERIES.labels(result="failed").inc()
            await self._settle(store.finish, job.id, FAILED, attempt, error, now)
            call = call_of(job.payload)
            log_event(logging.WARNING, "postcall_failed", "post-call job failed",
                      job_id=job.id, kind=job.kind, session_id=call.get("session_id"),
                      call_id=call.get("call_id"), tenant=call.get("tenant"),
                      attempts=attempt, error=error)

    async def _settle(self, fn: Callable[[*_Ts], None], *args: *_Ts) -> None:
        """Write a delivery's outcome, retrying while the database fails."""
        while True:
            try:
                await self._db(fn, *args)
            except sqlite3.Error:
                await self._db_backoff()
                continue
            return

    async def _post(self, client: httpx.AsyncClient, job: Job) -> str | None:
        """POST ``job``'s next attempt; None on a 2xx answer, else what went wrong."""
        with trio.move_on_after(self.timeout_s):
            try:
                async with client.stream("POST", self.webhook_url, content=job.body(),
                                         headers={"Content-Type": "application/json"},
                                         ) as response:
                    if _small_body(response):
                        await response.aread()  # read, the connection can be used again
            except (httpx.HTTPError, httpx.InvalidURL) as e:
                return f"{type(e).__name__}: {e}"
            return None if response.is_success else f"HTTP {response.status_code}"
        return f"no answer within {self.timeout_s} s"
