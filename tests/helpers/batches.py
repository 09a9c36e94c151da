"""Start a batch writer (helpers.batch_writer), kill it or its server, and check what the store kept."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from helpers.workers import ROOT

BATCH = 8


def start_writer(acks: Path, user: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "tests"), **(env or {})}
    return subprocess.Popen([sys.executable, "-m", "helpers.batch_writer", str(acks), user, str(BATCH)], env=env,
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def acknowledged(acks: Path) -> list[dict]:
    """The batches the writer logged as written (a line cut short by a kill is not one)."""
    if not acks.exists():
        return []
    return [json.loads(line) for line in acks.read_text().splitlines() if line.endswith("}")]


def wait_for_acks(acks: Path, n: int, proc: subprocess.Popen, timeout: float = 120.0) -> list[dict]:
    deadline = time.monotonic() + timeout
    while len(done := acknowledged(acks)) < n:
        if proc.poll() is not None:
            raise AssertionError(f"the writer exited ({proc.returncode}) after {len(done)} batches: "
                                 f"{proc.stderr.read()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"only {len(done)} of {n} batches acknowledged in {timeout:.0f} s")
        time.sleep(0.02)
    return done


def check_batches(mem, user: str, acked: list[dict]) -> dict[int, list[int]]:
    """Every acknowledged batch is stored whole, with the ids the writer was given; any other batch is the
    one in flight at the crash, and whole too; every stored item has its embedding row and placement.
    Returns the stored batches."""
    with mem.store.transaction() as db:
        rows = db.execute(
            """
            SELECT (i.metadata->>'batch')::int, i.id,
                   EXISTS (SELECT 1 FROM pgvector_items v WHERE v.item_id = i.id AND v.user_id = i.user_id),
                   EXISTS (SELECT 1 FROM placements p WHERE p.item_id = i.id AND p.tier = 'pgvector')
            FROM items i WHERE i.user_id = %s ORDER BY i.id
            """, (user,)).fetchall()
    stored: dict[int, list[int]] = {}
    for batch, item_id, embedded, placed in rows:
        assert embedded and placed, f"item {item_id} of batch {batch} is only partly written"
        stored.setdefault(batch, []).append(item_id)
    for a in acked:
        assert sorted(stored.get(a["batch"], [])) == sorted(a["ids"]), f"acknowledged batch {a['batch']} was lost"
    assert all(len(ids) == BATCH for ids in stored.values()), {b: len(ids) for b, ids in stored.items()}
    in_flight = set(stored) - {a["batch"] for a in acked}
    assert in_flight <= {len(acked)}, f"batches {sorted(in_flight)} were stored but never sent"
    return stored
