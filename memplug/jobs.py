"""Consolidation jobs on a Postgres-backed queue (procrastinate), run by ``memplug worker``.

``Memory.enqueue_consolidation(scope)`` queues a job; any number of workers on any
number of machines share the queue through the memplug database. The queue's
tables live in their own Postgres schema (``memplug_jobs``).

- **Claimed once.** A worker claims a job with ``FOR UPDATE SKIP LOCKED``.
- **One at a time per user.** Jobs of one user share a lock, so two workers
  never consolidate the same user's memory at once.
- **De-duplicated.** A planned consolidation of a scope that already waits in
  the queue is not queued twice: the waiting job covers it.
- **Retried.** A job that fails is retried (``job_attempts``). A job whose
  worker died (``kill -9``, a lost machine) is found by its stale heartbeat and
  re-queued by the next worker that starts and, while workers run, every minute.
- **Idempotent.** A job re-plans from the database when it runs, or carries
  explicit moves that the tiers apply idempotently; whatever a dead job wrote
  before its commit is rolled back, and its files are swept by the next run.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg

from .errors import InvalidInput, StoreUnavailable
from .types import Move, Scope

# What a job runs: consolidate ``scope`` (planning when ``moves`` is None); returns the placements made.
Runner = Callable[[Scope, list[Move] | None, Callable[[str, int, int, Any], None]], int]

log = logging.getLogger(__name__)
SCHEMA = "memplug_jobs"
QUEUE = "consolidate"
TASK = "memplug.consolidate"
STALLED_S = 30.0  # a worker silent this long is dead: its jobs are re-queued
HEARTBEAT_S = 5.0


@dataclass(frozen=True)
class Job:
    """One consolidation job, as ``memplug jobs`` shows it."""

    id: int
    scope: str
    status: str  # todo, doing, succeeded, failed, cancelled, aborted
    attempts: int
    moves: int | None  # explicit moves carried, or None when the job plans for itself
    queued_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    worker: int | None  # the worker running it (while doing)


def ensure_schema(dsn: str) -> bool:
    """Create the queue's tables once (safe to call from many processes at once); True if created."""
    from procrastinate.schema import SchemaManager

    try:
        with psycopg.connect(dsn, autocommit=False) as conn:
            conn.execute("SELECT pg_advisory_xact_lock(hashtext('memplug-jobs-schema'))")
            conn.execute(f"CREATE SCHEMA IF NOT EXISTS {SCHEMA}")
            conn.execute(f"SET LOCAL search_path TO {SCHEMA}")
            if conn.execute("SELECT to_regclass('procrastinate_jobs') IS NOT NULL").fetchone()[0]:
                return False
            conn.execute(SchemaManager.get_schema())
            return True
    except psycopg.Error as e:
        raise StoreUnavailable(f"could not set up the job queue: {e}") from e


def encode_moves(moves: Sequence[Move] | None) -> list[dict[str, Any]] | None:
    if moves is None:
        return None
    return [{"ids": list(m.item_ids), "src": m.src_level, "dst": m.dst_level, "reason": m.reason} for m in moves]


def decode_moves(raw: list[dict[str, Any]] | None) -> list[Move] | None:
    if raw is None:
        return None
    return [Move(tuple(m["ids"]), int(m["src"]), int(m["dst"]), str(m["reason"])) for m in raw]


class JobQueue:
    """The consolidation queue in the database at ``dsn``; ``run`` carries out one job."""

    def __init__(self, dsn: str, run: Runner, attempts: int = 3, retry_wait_s: float = 5.0,
                 stalled_s: float = STALLED_S):
        if attempts < 1 or retry_wait_s < 0 or stalled_s <= 0:
            raise InvalidInput(f"job settings out of range: attempts={attempts} (>= 1), "
                               f"retry_wait_s={retry_wait_s} (>= 0), stalled_s={stalled_s} (> 0)")
        self.run = run
        self.dsn = dsn
        self.attempts = attempts
        self.retry_wait_s = retry_wait_s
        self.stalled_s = stalled_s
        self.heartbeat_s = min(HEARTBEAT_S, stalled_s / 3)
        self._lock = threading.Lock()
        self._app = None
        self._ready = False

    # -- the procrastinate app --------------------------------------------------

    def _make_app(self):
        from procrastinate import App, PsycopgConnector, RetryStrategy

        logging.getLogger("procrastinate").setLevel(logging.WARNING)
        app = App(connector=PsycopgConnector(conninfo=self.dsn, min_size=0, max_size=4,
                                             kwargs={"options": f"-c search_path={SCHEMA}"}))
        run = self.run

        @app.task(name=TASK, queue=QUEUE, pass_context=True,
                  retry=RetryStrategy(max_attempts=max(0, self.attempts - 1), wait=int(self.retry_wait_s)))
        def consolidate(context, scope: str, moves: list[dict[str, Any]] | None = None) -> int:
            job = context.job
            log.info("job %s: consolidating %s (attempt %d)", job.id, scope, job.attempts + 1)

            def progress(task: str, done: int, total: int, info: Any) -> None:
                if done == total or done % 10 == 0:
                    log.info("job %s: %s %d/%d %s", job.id, task, done, total, dict(info or {}))

            placed = run(Scope.parse(scope), decode_moves(moves), progress)
            log.info("job %s: %d placement(s)", job.id, placed)
            return placed

        @app.periodic(cron="*/1 * * * *")
        @app.task(name="memplug.retry_stalled", queue=QUEUE, queueing_lock="memplug.retry_stalled",
                  pass_context=True)
        async def retry_stalled(context, timestamp: int) -> None:
            await _retry_stalled_async(context.app, self.stalled_s)

        return app

    def _schema(self) -> None:
        """Create the queue's tables on first use (once per process)."""
        if not self._ready:
            ensure_schema(self.dsn)
            self._ready = True

    def _ensure(self):
        with self._lock:
            self._schema()
            if self._app is None:
                self._app = self._make_app()
                self._app.open()
            return self._app

    def close(self) -> None:
        with self._lock:
            if self._app is not None:
                self._app.close()
                self._app = None

    # -- enqueue and look ---------------------------------------------------------

    def enqueue(self, scope: Scope, moves: Sequence[Move] | None = None) -> int:
        """Queue a consolidation of ``scope``; return the job id.

        A planned consolidation (no moves) of a scope already waiting returns the waiting job.
        """
        from procrastinate import exceptions

        app = self._ensure()
        task = app.configure_task(TASK, lock=f"user:{scope.user_id}",
                                  queueing_lock=None if moves is not None else f"plan:{scope}")
        try:
            return int(task.defer(scope=str(scope), moves=encode_moves(moves)))
        except exceptions.AlreadyEnqueued:
            waiting = app.job_manager.list_jobs(queueing_lock=f"plan:{scope}", status="todo")
            if waiting:
                return int(waiting[0].id)
            return int(task.defer(scope=str(scope), moves=None))  # it started meanwhile: queue another

    def jobs(self, status: str | None = None, limit: int = 50) -> list[Job]:
        """The newest jobs, newest first."""
        if status is not None and status not in ("todo", "doing", "succeeded", "failed", "cancelled", "aborted"):
            raise InvalidInput(f"unknown job status {status!r}")
        self._schema()
        with psycopg.connect(self.dsn) as conn:
            conn.execute(f"SET search_path TO {SCHEMA}")
            rows = conn.execute(
                """
                SELECT j.id, j.args, j.status::text, j.attempts,
                       min(e.at) FILTER (WHERE e.type = 'deferred'),
                       max(e.at) FILTER (WHERE e.type = 'started'),
                       max(e.at) FILTER (WHERE e.type IN ('succeeded', 'failed', 'cancelled', 'aborted')),
                       j.worker_id
                FROM procrastinate_jobs j
                LEFT JOIN procrastinate_events e ON e.job_id = j.id
                WHERE j.task_name = %s AND (%s::text IS NULL OR j.status::text = %s)
                GROUP BY j.id ORDER BY j.id DESC LIMIT %s
                """, (TASK, status, status, limit)).fetchall()
        return [Job(r[0], r[1].get("scope", ""), r[2], r[3],
                    None if r[1].get("moves") is None else len(r[1]["moves"]), r[4], r[5], r[6], r[7])
                for r in rows]

    # -- workers ---------------------------------------------------------------

    def recover_stalled(self, seconds: float | None = None) -> int:
        """Re-queue jobs whose worker stopped sending heartbeats; return how many."""
        self._schema()
        return asyncio.run(self._recover(self.stalled_s if seconds is None else seconds))

    async def _recover(self, seconds: float) -> int:
        app = self._make_app()
        async with app.open_async():
            return await _retry_stalled_async(app, seconds)

    def run_worker(self, concurrency: int = 1, once: bool = False, name: str | None = None,
                   on_start: Callable[[], None] | None = None) -> None:
        """Run jobs until stopped (SIGINT/SIGTERM stop gracefully), or with ``once`` until the queue is empty."""
        self.recover_stalled()
        app = self._make_app()
        if on_start is not None:
            on_start()
        app.run_worker(queues=[QUEUE], concurrency=concurrency, wait=not once, name=name,
                       install_signal_handlers=threading.current_thread() is threading.main_thread(),
                       update_heartbeat_interval=self.heartbeat_s, stalled_worker_timeout=self.stalled_s,
                       delete_jobs="never", listen_notify=True, fetch_job_polling_interval=2.0)


async def _retry_stalled_async(app, seconds: float) -> int:
    from procrastinate import exceptions, manager
    from procrastinate.jobs import Status

    n = 0
    for job in await app.job_manager.get_stalled_jobs(seconds_since_heartbeat=seconds):
        try:
            await app.job_manager.retry_job(job)
            n += 1
            log.warning("job %s: its worker stopped; re-queued", job.id)
        except exceptions.UniqueViolation as e:
            if e.constraint_name != manager.QUEUEING_LOCK_CONSTRAINT:
                raise
            # The same planned consolidation already waits: that job covers this one.
            await app.job_manager.finish_job(job, status=Status.FAILED, delete_job=False)
    return n
