"""Consolidation jobs on the Postgres queue, with real worker processes.

A worker killed in the middle of a job: tests/faults/test_worker_crash.py.
"""

from __future__ import annotations

import pytest
from helpers.counting import CountingTier
from helpers.workers import drain, start_worker

from memplug import InvalidInput, Move


def _worker(env_extra: dict[str, str], once: bool):
    return start_worker("helpers.counting:CountingTier", {"MEMPLUG_PLUGINS": "", **env_extra}, once)


def _runs(mem, ids) -> dict[int, int]:
    with mem.store.transaction() as db:
        rows = db.execute("SELECT item_id, count(*) FROM counting_runs WHERE item_id = ANY(%s) GROUP BY item_id",
                          (list(ids),)).fetchall()
    return dict(rows)


def test_enqueue_queues_a_job_and_consolidate_runs_now(make_memory, user):
    mem = make_memory(plugins=[CountingTier()])
    items = mem.write(user, ["Ann likes tea.", "Ann lives in Oslo."])
    try:
        job = mem.enqueue_consolidation(user, [Move((items[0].id,), 1, 9, "count")])
        assert isinstance(job, int)
        queued = {j.id: j for j in mem.jobs.jobs()}
        assert queued[job].status == "todo" and queued[job].scope == user and queued[job].moves == 1
        # A planned consolidation of a scope is queued once while it waits.
        assert mem.enqueue_consolidation(user) == mem.enqueue_consolidation(user)
        placed = mem.consolidate(user, [Move((items[1].id,), 1, 9, "count")])
        assert [p.tier for p in placed] == ["counting"] and _runs(mem, [items[1].id]) == {items[1].id: 1}
        with pytest.raises(InvalidInput, match="moves must be"):
            mem.consolidate(user, "up")
    finally:
        drain(mem)


async def test_the_async_calls_return_what_their_names_say(make_memory, user):
    mem = make_memory(plugins=[CountingTier()])
    item = mem.write(user, "Ann keeps a diary.")
    try:
        placed = await mem.aconsolidate(user, [Move((item.id,), 1, 9, "count")])
        assert [type(p).__name__ for p in placed] == ["Placement"]
        job = await mem.aenqueue_consolidation(user, [Move((item.id,), 1, 9, "count")])
        assert isinstance(job, int) and job in {j.id for j in mem.jobs.jobs()}
    finally:
        drain(mem)


def test_two_workers_run_fifty_jobs_each_once(make_memory, users):
    mem = make_memory(plugins=[CountingTier()])
    ids, jobs = [], []
    for u in users(50):
        item = mem.write(u, f"{u} has a fact.")
        ids.append(item.id)
        jobs.append(mem.enqueue_consolidation(u, [Move((item.id,), 1, 9, "count")]))
    try:
        workers = [_worker({}, once=True) for _ in range(2)]
        for w in workers:
            assert w.wait(timeout=180) == 0, w.stderr.read()
        assert _runs(mem, ids) == {i: 1 for i in ids}
        done = {j.id: j for j in mem.jobs.jobs(limit=200)}
        assert all(done[j].status == "succeeded" and done[j].attempts == 1 for j in jobs)
    finally:
        drain(mem)


def test_a_move_no_tier_can_make_is_refused_before_anything_changes(make_memory, user):
    mem = make_memory(plugins=[CountingTier()])
    item = mem.write(user, "Ann keeps bees.")
    history = mem.inspect(user)[0]["history"]
    with pytest.raises(InvalidInput, match=r"to level 7: no tier holds it \(tiers by level: .*counting 9\)"):
        mem.consolidate(user, [Move((item.id,), 1, 7, "x")])
    with pytest.raises(InvalidInput, match=r"from level 5: no tier holds it"):
        mem.consolidate(user, [Move((item.id,), 5, 1, "x")])
    assert mem.inspect(user)[0]["history"] == history
    try:
        # Queued, the levels are the worker's to check: it may load tiers this process has not.
        job = mem.enqueue_consolidation(user, [Move((item.id,), 1, 7, "x")])
        assert isinstance(job, int)
    finally:
        drain(mem)
