"""The store: migrations, concurrency, and the embedded server."""

from __future__ import annotations

import threading

from memplug import Memory, Scope
from memplug.store import Store, redact


def test_migrations_run_once(dsn):
    store = Store(dsn, pool_size=1)
    try:
        assert store.migrate("unit_test_component", ["CREATE TABLE unit_test_t (x int)"]) in (0, 1)
        assert store.migrate("unit_test_component", ["CREATE TABLE unit_test_t (x int)"]) == 0
        assert store.migrate("unit_test_component",
                             ["CREATE TABLE unit_test_t (x int)", "ALTER TABLE unit_test_t ADD y int"]) == 1
        with store.transaction() as db:
            cols = {r[0] for r in db.execute(
                "SELECT column_name FROM information_schema.columns WHERE table_name = 'unit_test_t'").fetchall()}
            db.execute("DROP TABLE unit_test_t")
            db.execute("DELETE FROM migrations WHERE component = 'unit_test_component'")
        assert cols == {"x", "y"}
    finally:
        store.close()


def test_many_memories_start_at_once(dsn):
    errors = []

    def start():
        try:
            Memory(dsn).close()
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=start) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_concurrent_writers_of_the_same_text(memory, user):
    s = Scope(user)
    ids, errors = [], []

    def write():
        try:
            ids.append(memory.write(s, "Concurrent: the same fact from four threads.").id)
        except Exception as e:  # pragma: no cover
            errors.append(e)

    threads = [threading.Thread(target=write) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(set(ids)) == 1
    assert memory.stats(s)["items"] == 1


def test_redact():
    assert "hunter2" not in redact("postgresql://bob:hunter2@db.example:5432/app")
    assert redact("host=db password=hunter2 dbname=app").count("***") == 1


def test_embedded_server_is_the_default(tmp_path, monkeypatch):
    monkeypatch.delenv("MEMPLUG_DSN", raising=False)
    with Memory(home=tmp_path / "home", load_entrypoints=False) as mem:
        assert str(tmp_path / "home" / "pgdata") in mem.store.safe_dsn
        with mem.store.transaction() as db:
            assert db.execute("SELECT extversion FROM pg_extension WHERE extname = 'vector'").fetchone()[0]
