"""A read racing a forget of an item it found (found by the load benchmark's shared reads)."""

from __future__ import annotations

import threading
import time

from memplug import Scope
from memplug.usage import record_reads


def test_read_of_an_item_being_forgotten_counts_nothing_and_does_not_fail(make_memory, user):
    app, other = make_memory(), make_memory()
    fresh, seen, kept = app.write(user, ["Nell's ferry leaves at dawn.", "Nell's ferry is painted teal.",
                                         "Nell's ferry carries twelve cars."])
    with app.store.transaction() as db:  # one of the forgotten items was read before, one never
        record_reads(db, [seen.id], app.half_life_s)
    outcome = {}

    def read():
        try:
            outcome["recall"] = other.read(user, "When does Nell's ferry leave?")
        except Exception as e:  # noqa: BLE001 - the assertion below shows it
            outcome["error"] = e

    with app.store.transaction() as db:  # the forget holds its locks until it commits
        app.forget_in(db, Scope(user), [fresh.id, seen.id])
        reader = threading.Thread(target=read)
        reader.start()
        # The reader has found the items and now waits for the forget to end.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not _waiting_on_a_lock(app):
            time.sleep(0.05)
        assert _waiting_on_a_lock(app), "the read never reached the forgotten item"
    reader.join(timeout=60)
    assert "error" not in outcome, outcome.get("error")
    # They were there when the read looked; they are not counted after the forget.
    assert {fresh.id, seen.id, kept.id} <= {it.id for it in outcome["recall"].items}
    assert {u.item_id: u.reads for u in app.usage(user)} == {kept.id: 1}


def _waiting_on_a_lock(mem) -> bool:
    with mem.store.connect(autocommit=True) as conn:
        return conn.execute(
            "SELECT EXISTS (SELECT 1 FROM pg_stat_activity WHERE datname = current_database() "
            "AND wait_event_type = 'Lock' AND query LIKE '%%INSERT INTO usage%%')").fetchone()[0]
