"""Real `memplug worker` processes for the job and crash tests."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def start_worker(plugin: str, env: dict[str, str] | None = None, once: bool = False) -> subprocess.Popen:
    """``memplug worker --plugin PLUGIN`` with this venv's python; a dead worker's jobs go stale after 3 s."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "tests"), "MEMPLUG_JOB_STALLED_S": "3", **(env or {})}
    args = [sys.executable, "-m", "memplug.cli", "worker", "--plugin", plugin] + (["--once"] if once else [])
    return subprocess.Popen(args, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    """Wait until ``path`` exists; fail early, with its stderr, if ``proc`` exits first."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"the process exited ({proc.returncode}) before {path.name}: {proc.stderr.read()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"no {path.name} after {timeout:.0f} s")
        time.sleep(0.1)


def drain(mem) -> None:
    """Leave no queued job behind for other tests."""
    with mem.store.transaction() as db:
        db.execute("SET LOCAL search_path TO memplug_jobs")
        db.execute("DELETE FROM procrastinate_jobs WHERE status IN ('todo', 'doing')")
