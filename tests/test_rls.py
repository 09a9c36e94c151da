"""Row-level security: a scoped transaction sees and writes one user's rows, whatever its SQL says.

Every table that holds a user's data is confined (``memplug.store.row_security``):
the host's items, usage, placements and moves, and each built-in tier's tables.
The queries below are deliberately "buggy" (no WHERE clause, another user's id);
Postgres itself keeps them to the transaction's user. KV and adapter rows are
written the way their tiers write them, without encoding or training a model.
"""

from __future__ import annotations

import pytest
from psycopg.types.json import Jsonb

from memplug import ConfigError, InvalidScope, NotFound, Scope, ScopeViolation, Settings
from memplug.store import row_security
from memplug_profile import ProfileTier

BY_USER = ["items", "context_turns", "pgvector_items", "kv_items", "lora_adapters", "lora_items", "profile_facts"]
BY_ITEM = ["usage", "placements", "moves"]


@pytest.fixture
def rls_memory(make_memory, tmp_path):
    return make_memory(settings=Settings(plugins="context,pgvector,kv,lora"), plugins=[ProfileTier()],
                       options={"artifacts": str(tmp_path / "artifacts")})


def fill(mem, user):
    """Rows for ``user`` in every scoped table, through the API where one exists."""
    items = mem.write(Scope(user), [f"My name is {user.title()} and I live in Oslo.", f"{user} keeps bees."])
    mem.write(Scope(user, "a1"), f"{user} plays chess with the agent.")
    mem.write_messages(Scope(user, session_id="s1"), [{"role": "user", "content": f"{user} says hello"}])
    mem.read(Scope(user), "bees")  # usage rows
    ids = [it.id for it in items]
    # What the kv tier writes after encoding, and the lora tier after training; each in the user's own scope.
    with mem.store.scoped(user) as db:
        db.execute(
            "INSERT INTO kv_items (item_id, user_id, agent_id, session_id, embedding, span, stored_tokens, bytes, "
            "fingerprint, codec, artifact) SELECT item_id, user_id, agent_id, session_id, embedding, 8, 8, 64, "
            "'fp', 'int4', 'kv/x' FROM pgvector_items WHERE item_id = %s", (ids[0],))
        adapter = db.execute(
            "INSERT INTO lora_adapters (user_id, agent_id, session_id, artifact, bytes, fingerprint, item_ids, "
            "recall, metrics) VALUES (%s, '', '', 'lora/x', 1, 'fp', %s, 1.0, %s) RETURNING id",
            (user, ids, Jsonb({}))).fetchone()[0]
        db.execute("INSERT INTO lora_items (item_id, user_id, agent_id, session_id, adapter_id, recall, passed) "
                   "SELECT unnest(%s::bigint[]), %s, '', '', %s, 1.0, true", (ids, user, adapter))
    return ids


def owners(db, table):
    """The users whose rows a query with no WHERE clause returns."""
    if table in BY_USER:
        return {r[0] for r in db.execute(f"SELECT user_id FROM {table}").fetchall()}
    return {r[0] for r in db.execute(
        f"SELECT i.user_id FROM {table} t JOIN items i ON i.id = t.item_id").fetchall()}


def test_a_query_without_where_sees_only_the_scoped_users_rows(rls_memory, users):
    alice, bob = users(2)
    fill(rls_memory, alice)
    fill(rls_memory, bob)
    with rls_memory.store.transaction() as db:  # the unscoped path sees both
        for table in BY_USER + BY_ITEM:
            assert {alice, bob} <= owners(db, table), table
    with rls_memory.store.scoped(alice) as db:
        for table in BY_USER + BY_ITEM:
            assert owners(db, table) == {alice}, table
            # Not even the count of another user's rows shows.
            mine = db.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
            assert mine == len(db.execute(f"SELECT 1 FROM {table}").fetchall()) > 0
        # A query naming one partition of a partitioned table is confined too.
        parts = [r[0] for r in db.execute(
            "SELECT relid::regclass::text FROM pg_partition_tree('pgvector_items') WHERE isleaf").fetchall()]
        assert len(parts) == 16
        for part in parts:
            assert {r[0] for r in db.execute(f"SELECT user_id FROM {part}").fetchall()} <= {alice}
        # Asking for bob by name returns nothing rather than bob's rows.
        assert db.execute("SELECT count(*) FROM items WHERE user_id = %s", (bob,)).fetchone()[0] == 0


def test_writing_another_users_rows_is_refused_and_nothing_is_written(rls_memory, users):
    alice, bob = users(2)
    mine = fill(rls_memory, alice)
    theirs = fill(rls_memory, bob)
    with rls_memory.store.transaction() as db:
        before = {t: db.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in BY_USER + BY_ITEM}
    attempts = [
        "INSERT INTO items (user_id, text, content_hash, tokens) VALUES (%(b)s, 'x', '\\x00', 1)",
        "UPDATE items SET user_id = %(b)s WHERE id = %(mine)s",
        "INSERT INTO usage (item_id) VALUES (%(theirs)s)",
        "INSERT INTO placements (item_id, tier, level, reason) VALUES (%(theirs)s, 'kv', 2, 'x')",
        "INSERT INTO moves (item_id, tier, level, held, reason) VALUES (%(theirs)s, 'kv', 2, true, 'x')",
        "INSERT INTO context_turns (item_id, user_id, agent_id, session_id, tokens) "
        "VALUES (%(theirs)s, %(b)s, '', 's1', 1)",
        "INSERT INTO pgvector_items (item_id, user_id, agent_id, session_id, embedding, tsv) "
        "SELECT %(mine)s, %(b)s, '', '', embedding, tsv FROM pgvector_items WHERE item_id = %(mine)s",
        "UPDATE kv_items SET user_id = %(b)s",
        # A row in one's own name that points at another user's item is refused too.
        "INSERT INTO kv_items (item_id, user_id, agent_id, session_id, embedding, span, stored_tokens, bytes, "
        "fingerprint, codec, artifact) VALUES (%(theirs)s, %(a)s, '', '', array_fill(0.1, ARRAY[384])::halfvec, "
        "1, 1, 1, 'fp', 'int4', 'kv/y')",
        "UPDATE lora_items SET item_id = %(theirs)s WHERE item_id = %(mine)s",
        "INSERT INTO lora_adapters (user_id, agent_id, session_id, artifact, bytes, fingerprint, item_ids, "
        "recall, metrics) VALUES (%(b)s, '', '', 'lora/y', 1, 'fp', '{}', 1, '{}')",
        "UPDATE lora_items SET user_id = %(b)s",
        "INSERT INTO profile_facts (user_id, agent_id, session_id, slot, value, rank, item_id) "
        "VALUES (%(b)s, '', '', 'name', 'Mallory', 0, %(theirs)s)",
        # The full-text lookup that runs as the table owner checks the scope itself.
        "SELECT * FROM pgvector_postings('bee', %(b)s, '', '', NULL, 10)",
    ]
    for sql in attempts:
        with pytest.raises(ScopeViolation, match=alice), rls_memory.store.scoped(alice) as db:
            db.execute("UPDATE items SET text = text || ' (edited)' WHERE id = %s", (mine[1],))
            db.execute(sql, {"a": alice, "b": bob, "mine": mine[0], "theirs": theirs[0]})
    # An update or delete with no WHERE clause touches the scoped user's rows only.
    with rls_memory.store.scoped(alice) as db:
        assert db.execute("UPDATE lora_adapters SET stale = true").rowcount == 1
        assert db.execute("DELETE FROM placements").rowcount > 0
    with rls_memory.store.transaction() as db:
        after = {t: db.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in BY_USER + BY_ITEM}
        # Each refused transaction was rolled back whole, its own-scope edit included.
        assert not db.execute("SELECT count(*) FROM items WHERE text LIKE '%%(edited)'").fetchone()[0]
        assert db.execute("SELECT bool_and(NOT stale) FROM lora_adapters WHERE user_id = %s", (bob,)).fetchone()[0]
        assert db.execute("SELECT count(*) FROM placements p JOIN items i ON i.id = p.item_id "
                          "WHERE i.user_id = %s", (alice,)).fetchone()[0] == 0
        assert db.execute("SELECT count(*) FROM placements p JOIN items i ON i.id = p.item_id "
                          "WHERE i.user_id = %s", (bob,)).fetchone()[0] > 0
    assert {t: n for t, n in after.items() if t != "placements"} == \
        {t: n for t, n in before.items() if t != "placements"}


def test_the_memory_api_works_under_row_security_and_the_unscoped_path_sees_everyone(rls_memory, users):
    alice, bob = users(2)
    mine, theirs = fill(rls_memory, alice), fill(rls_memory, bob)
    recall = rls_memory.read(alice, "Who keeps bees in Oslo?")
    assert recall.hits and {h.item.scope.user_id for h in recall.hits} == {alice}
    assert {h.text for h in recall.pinned}, "the profile tier's pinned facts are read under RLS"
    filtered = rls_memory.read(alice, "bees", filters={"nothing": "matches"})
    assert filtered.hits == ()
    with pytest.raises(NotFound):
        rls_memory.forget(alice, [theirs[0]])
    everyone = rls_memory.stats()
    assert everyone["users"] >= 2 and everyone["items"] >= 8
    assert rls_memory.stats(alice)["items"] == 4 and rls_memory.stats(bob)["items"] == 4
    assert rls_memory.forget(alice) == 4
    assert rls_memory.stats(bob)["items"] == 4 and rls_memory.get(bob, theirs)
    assert mine


def test_the_scoped_role_may_analyze_a_tiers_tables(rls_memory, user):
    # The pgvector tier ANALYZEs a user's partition after a large write, inside the write's scoped
    # transaction: row_security() grants MAINTAIN (Postgres 17+), else Postgres would skip it with a warning.
    rls_memory.write(user, f"{user} keeps ferns.")
    with rls_memory.store.transaction() as db:
        if int(db.execute("SHOW server_version_num").fetchone()[0]) < 170000:
            pytest.skip("MAINTAIN arrived in Postgres 17")
        part = db.execute("SELECT tableoid::regclass::text FROM pgvector_items WHERE user_id = %s",
                          (user,)).fetchone()[0]
    count = "SELECT analyze_count FROM pg_stat_user_tables WHERE relid = %s::regclass"
    with rls_memory.store.transaction() as db:
        before = db.execute(count, (part,)).fetchone()[0]
    with rls_memory.store.scoped(user) as db:
        db.execute(f"ANALYZE {part}")
    with rls_memory.store.transaction() as db:
        assert db.execute(count, (part,)).fetchone()[0] == before + 1


def test_a_third_party_table_is_confined_by_the_helper(dsn, rls_memory, users):
    alice, bob = users(2)
    store = rls_memory.store
    try:
        store.migrate("rls_test_notes", [
            "CREATE TABLE rls_test_notes (user_id text NOT NULL, note text NOT NULL)",
            row_security("rls_test_notes"),
        ])
        with store.transaction() as db:
            db.execute("INSERT INTO rls_test_notes VALUES (%s, 'a'), (%s, 'b')", (alice, bob))
        with store.scoped(Scope(alice, "agent")) as db:
            assert db.execute("SELECT user_id, note FROM rls_test_notes").fetchall() == [(alice, "a")]
        with pytest.raises(ScopeViolation), store.scoped(alice) as db:
            db.execute("INSERT INTO rls_test_notes VALUES (%s, 'c')", (bob,))
    finally:
        with store.transaction() as db:
            db.execute("DROP TABLE IF EXISTS rls_test_notes")
            db.execute("DELETE FROM migrations WHERE component = 'rls_test_notes'")


def test_bad_arguments_are_named():
    with pytest.raises(ConfigError, match="lower_snake_case"):
        row_security("items; DROP TABLE items")
    with pytest.raises(ConfigError, match="user_id' or 'item_id"):
        row_security("notes", by="owner")


def test_a_scoped_transaction_needs_a_valid_scope(memory):
    with pytest.raises(InvalidScope), memory.store.scoped(""):
        pass
    with pytest.raises(InvalidScope), memory.store.scoped(None):
        pass
