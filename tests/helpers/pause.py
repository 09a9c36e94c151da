"""A policy for the crash tests: it plans every text item of a scope up to the kv tier, and holds each
consolidation open after the tiers have done their work, before its commit, so that a test can kill the
worker while the kv tier's blobs are on disk and its rows are not committed.

``PAUSE_STARTED`` names a file the plugin appends its pid to when it pauses; ``PAUSE_SLEEP`` is how long
it waits there (seconds).
"""

import os
import time

from memplug import Move, hookimpl


class PromoteAllThenPause:
    name = "promote-all-then-pause"

    @hookimpl
    def memplug_plan(self, memory, scope, usage):
        ids = tuple(u.item_id for u in usage if u.level == 1)
        return [Move(ids, 1, 2, "crash test: promote all")] if ids else None

    @hookimpl(trylast=True)  # after every tier, so the kv tier has written its blobs
    def memplug_consolidate(self, memory, scope, moves, db):
        marker = os.environ.get("PAUSE_STARTED")
        if marker:
            with open(marker, "a") as f:
                f.write(f"{os.getpid()}\n")
        time.sleep(float(os.environ.get("PAUSE_SLEEP", "0")))
        return None
