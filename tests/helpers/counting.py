"""A tier for the job tests: it records each consolidation it carries out, in the
consolidation's own transaction, so a job killed before its commit leaves no row."""

import os
import time

from memplug import Placement, hookimpl

LEVEL = 9


class CountingTier:
    name = "counting"
    level = LEVEL

    @hookimpl
    def memplug_configure(self, memory):
        memory.store.migrate("counting_test", [
            "CREATE TABLE counting_runs (item_id bigint NOT NULL, pid integer NOT NULL, at timestamptz DEFAULT now())"])

    @hookimpl
    def memplug_consolidate(self, memory, scope, moves, db):
        ids = [i for m in moves if m.dst_level == LEVEL for i in m.item_ids]
        if not ids:
            return None
        for i in ids:
            db.execute("INSERT INTO counting_runs (item_id, pid) VALUES (%s, %s)", (i, os.getpid()))
        if any(m.reason == "slow" for m in moves):
            marker = os.environ.get("COUNTING_STARTED")
            if marker:
                with open(marker, "a") as f:
                    f.write(f"{os.getpid()}\n")
            time.sleep(float(os.environ.get("COUNTING_SLEEP", "0")))
        return [Placement(self.name, LEVEL, ids, "counted")]
