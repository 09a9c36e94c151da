"""Crash safety: a consolidation worker killed with SIGKILL in the middle of a job.

After a new worker starts, the job is retried and completes once: nothing the dead
attempt wrote survives, in Postgres (rolled back) or in the artifact store (swept).
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

from helpers.counting import CountingTier
from helpers.workers import drain, start_worker, wait_for

from memplug import Move, Settings
from memplug_kv.codec import header

FACTS = [
    "Zorbul Quenti lives in the city of Marrakesh.",
    "The access code for the Tamsin lab is 4471.",
    "Ilse Varga's favourite instrument is the oboe.",
]


def _job(mem, job_id):
    return {j.id: j for j in mem.jobs.jobs()}[job_id]


def _files(root: Path) -> list[str]:
    """Every file under ``root``, hidden and temporary ones included."""
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()) if root.exists() else []


def test_killed_worker_job_is_retried_without_duplicates(make_memory, user, tmp_path):
    mem = make_memory(plugins=[CountingTier()])
    item = mem.write(user, "Bo keeps bees.")
    job = mem.enqueue_consolidation(user, [Move((item.id,), 1, 9, "slow")])
    started = tmp_path / "started"
    plugin = "helpers.counting:CountingTier"
    try:
        first = start_worker(plugin, {"MEMPLUG_PLUGINS": "", "COUNTING_SLEEP": "60", "COUNTING_STARTED": str(started)})
        wait_for(started, first)
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
        assert _job(mem, job).status == "doing"  # orphaned by the dead worker
        with mem.store.transaction() as db:  # its transaction died with it
            assert db.execute("SELECT count(*) FROM counting_runs WHERE item_id = %s", (item.id,)).fetchone()[0] == 0
        time.sleep(3.5)  # its heartbeat goes stale
        second = start_worker(plugin, {"MEMPLUG_PLUGINS": "", "COUNTING_SLEEP": "0"}, once=True)
        assert second.wait(timeout=120) == 0, second.stderr.read()
        after = _job(mem, job)
        assert after.status == "succeeded" and after.attempts == 2
        with mem.store.transaction() as db:
            assert db.execute("SELECT count(*) FROM counting_runs WHERE item_id = %s", (item.id,)).fetchone()[0] == 1
        assert {u.item_id: u.level for u in mem.usage(user)} == {item.id: 9}
    finally:
        drain(mem)


def test_worker_killed_mid_kv_consolidation_leaves_no_blob_behind(make_memory, user, tmp_path):
    """The real kv tier (SmolLM2 encodes, blobs go to the artifact store); the worker dies after the
    blobs are written and before the commit. A user forgets one item while the job is orphaned."""
    artifacts = tmp_path / "artifacts"
    mem = make_memory(settings=Settings(plugins="context,pgvector,kv"), options={"artifacts": str(artifacts)})
    items = mem.write(user, FACTS)
    job = mem.enqueue_consolidation(user)  # planned by the worker: every item to the kv tier
    started = tmp_path / "started"
    plugin = "helpers.pause:PromoteAllThenPause"
    env = {"MEMPLUG_PLUGINS": "context,pgvector,kv", "MEMPLUG_ARTIFACTS": str(artifacts)}
    try:
        first = start_worker(plugin, {**env, "PAUSE_SLEEP": "60", "PAUSE_STARTED": str(started)})
        wait_for(started, first, timeout=180)
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)

        [pack] = [f for f in _files(artifacts) if f.endswith(".safetensors")]  # the scope's one pack
        index = json.loads(header((artifacts / pack).read_bytes())["items"])
        assert sorted(e["item_id"] for e in index) == sorted(it.id for it in items), _files(artifacts)
        with mem.store.transaction() as db:
            assert db.execute("SELECT count(*) FROM kv_items WHERE user_id = %s", (user,)).fetchone()[0] == 0
        assert _job(mem, job).status == "doing"
        assert {u.level for u in mem.usage(user)} == {1}  # nothing was promoted

        forgotten = items[1]
        assert mem.forget(user, [forgotten.id]) == 1
        kept = [it for it in items if it.id != forgotten.id]

        time.sleep(3.5)  # the dead worker's heartbeat goes stale
        second = start_worker(plugin, env, once=True)
        assert second.wait(timeout=180) == 0, second.stderr.read()

        after = _job(mem, job)
        assert after.status == "succeeded" and after.attempts == 2
        assert {u.item_id: u.level for u in mem.usage(user)} == {it.id: 2 for it in kept}
        with mem.store.transaction() as db:
            rows = db.execute("SELECT item_id, artifact, bytes FROM kv_items WHERE user_id = %s ORDER BY item_id",
                              (user,)).fetchall()
            placed = db.execute(
                "SELECT item_id, count(*) FROM moves m JOIN items i ON i.id = m.item_id "
                "WHERE i.user_id = %s AND m.tier = 'kv' AND m.held GROUP BY item_id", (user,)).fetchall()
        assert [r[0] for r in rows] == [it.id for it in kept]
        assert dict(placed) == {it.id: 1 for it in kept}  # placed once, by the attempt that committed
        # Exactly the committed pack, whole: the dead worker's pack (with the forgotten item) and any
        # temporary file are gone.
        [key] = {r[1] for r in rows}
        assert _files(artifacts) == [key]
        assert abs((artifacts / key).stat().st_size - sum(r[2] for r in rows)) <= len(rows)  # shares of the pack
        assert forgotten.id not in {e["item_id"] for e in json.loads(header((artifacts / key).read_bytes())["items"])}
    finally:
        drain(mem)
