"""Crash safety: an app process killed with SIGKILL while it writes batches.

Each ``Memory.write`` of a list is one transaction: after the kill, every batch the
writer saw acknowledged is stored, and the batch in flight is stored whole or not at all.
"""

from __future__ import annotations

import os
import random
import signal
import statistics
import time

from helpers.batches import BATCH, acknowledged, check_batches, start_writer, wait_for_acks


def test_killed_writer_leaves_whole_batches_only(memory, dsn, users, tmp_path):
    seed = int.from_bytes(os.urandom(4), "big")
    rng = random.Random(seed)
    for round_, user in enumerate(users(2)):
        acks = tmp_path / f"acks-{round_}"
        writer = start_writer(acks, user, {"MEMPLUG_DSN": dsn})
        done = wait_for_acks(acks, rng.randint(2, 5), writer)
        # Somewhere inside the next batch: embedding, inserts, index updates or the commit.
        time.sleep(rng.uniform(0, statistics.fmean(a["s"] for a in done)))
        writer.send_signal(signal.SIGKILL)
        writer.wait(timeout=30)
        acked = acknowledged(acks)
        stored = check_batches(memory, user, acked)
        where = f"seed {seed}, round {round_}"
        assert len(stored) >= len(acked) >= 2, where
        # What was acknowledged reads back as written.
        last = acked[-1]
        got = memory.get(user, last["ids"])
        assert [it.metadata["batch"] for it in got] == [last["batch"]] * BATCH, where
        assert all(f"batch {last['batch']}," in it.text for it in got), where
