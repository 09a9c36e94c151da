"""Consolidation jobs on the Postgres queue, with real worker processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers.counting import CountingTier

from memplug import InvalidInput, Move

ROOT = Path(__file__).resolve().parent.parent


def _worker(env_extra: dict[str, str], once: bool) -> subprocess.Popen:
    env = {**os.environ, "MEMPLUG_PLUGINS": "", "PYTHONPATH": str(ROOT / "tests"), "MEMPLUG_JOB_STALLED_S": "3",
           **env_extra}
    args = [sys.executable, "-m", "memplug.cli", "worker", "--plugin", "helpers.counting:CountingTier"]
    return subprocess.Popen(args + (["--once"] if once else []), env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _drain(mem) -> None:
    """Leave no queued job behind for other tests."""
    with mem.store.transaction() as db:
        db.execute("SET LOCAL search_path TO memplug_jobs")
        db.execute("DELETE FROM procrastinate_jobs WHERE status IN ('todo', 'doing')")


def _runs(mem, ids) -> dict[int, int]:
    with mem.store.transaction() as db:
        rows = db.execute("SELECT item_id, count(*) FROM counting_runs WHERE item_id = ANY(%s) GROUP BY item_id",
                          (list(ids),)).fetchall()
    return dict(rows)


def test_consolidate_enqueues_and_inline_runs_now(make_memory, user):
    mem = make_memory(plugins=[CountingTier()])
    items = mem.write(user, ["Ann likes tea.", "Ann lives in Oslo."])
    try:
        job = mem.consolidate(user, [Move((items[0].id,), 1, 9, "count")])
        assert isinstance(job, int)
        queued = {j.id: j for j in mem.jobs.jobs()}
        assert queued[job].status == "todo" and queued[job].scope == user and queued[job].moves == 1
        # A planned consolidation of a scope is queued once while it waits.
        assert mem.consolidate(user) == mem.consolidate(user)
        placed = mem.consolidate(user, [Move((items[1].id,), 1, 9, "count")], wait=True)
        assert [p.tier for p in placed] == ["counting"] and _runs(mem, [items[1].id]) == {items[1].id: 1}
        with pytest.raises(InvalidInput, match="wait"):
            mem.consolidate(user, wait="yes")
    finally:
        _drain(mem)


def test_two_workers_run_fifty_jobs_each_once(make_memory, users):
    mem = make_memory(plugins=[CountingTier()])
    ids, jobs = [], []
    for u in users(50):
        item = mem.write(u, f"{u} has a fact.")
        ids.append(item.id)
        jobs.append(mem.consolidate(u, [Move((item.id,), 1, 9, "count")]))
    try:
        workers = [_worker({}, once=True) for _ in range(2)]
        for w in workers:
            assert w.wait(timeout=180) == 0, w.stderr.read()
        assert _runs(mem, ids) == {i: 1 for i in ids}
        done = {j.id: j for j in mem.jobs.jobs(limit=200)}
        assert all(done[j].status == "succeeded" and done[j].attempts == 1 for j in jobs)
    finally:
        _drain(mem)


def test_killed_worker_job_is_retried_without_duplicates(make_memory, user, tmp_path):
    mem = make_memory(plugins=[CountingTier()])
    item = mem.write(user, "Bo keeps bees.")
    job = mem.consolidate(user, [Move((item.id,), 1, 9, "slow")])
    started = tmp_path / "started"
    try:
        first = _worker({"COUNTING_SLEEP": "60", "COUNTING_STARTED": str(started)}, once=False)
        deadline = time.monotonic() + 120
        while not started.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert started.exists(), "the worker never started the job"
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
        status = {j.id: j for j in mem.jobs.jobs()}[job]
        assert status.status == "doing"  # orphaned by the dead worker
        assert _runs(mem, [item.id]) == {}  # its transaction died with it
        time.sleep(3.5)  # its heartbeat goes stale
        second = _worker({"COUNTING_SLEEP": "0"}, once=True)
        assert second.wait(timeout=120) == 0, second.stderr.read()
        after = {j.id: j for j in mem.jobs.jobs()}[job]
        assert after.status == "succeeded" and after.attempts == 2
        assert _runs(mem, [item.id]) == {item.id: 1}
        assert {u.item_id: u.level for u in mem.usage(user)} == {item.id: 9}
    finally:
        _drain(mem)
