"""Scope isolation under random interleavings of three users, across every tier (hypothesis, real Postgres).

A model of what each scope holds is kept beside the real Memory (tiers context,
pgvector, kv and lora). The users write knowledge and conversation turns, read,
promote items to the kv tier and train adapters, demote, forget, try to write
into each other's rows, and run unfiltered ("buggy") queries in their scoped
transactions. KV entries and adapters are written as their tiers write them after
encoding or training (rows and artifact metadata; no model runs), then served by
the real tiers' reads. Every read's hits, KV prefix and adapter, and every row a
buggy query returns, must belong to what the reader's scope may see; anything
else is a leak, and so is a write into another user's rows that is not refused.

``MEMPLUG_TEST_ISOLATION_OPS`` sets how many operations run (default 500);
``python -m benchmarks.isolation`` runs 10,000 and writes ``benchmarks/results/isolation.json``
(``MEMPLUG_TEST_ISOLATION_OUT``).
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
import uuid
from collections import Counter
from pathlib import Path

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from psycopg.types.json import Jsonb

from memplug import Budget, Memory, Move, Scope, ScopeViolation, Settings

WORDS = ["apple", "harbour", "violin", "granite", "lantern", "orbit", "pepper", "tundra", "saffron", "quartz"]
AGENTS = [None, "a1", "a2"]
SESSIONS = [None, "s1"]
STEPS = 40
BY_USER = ["items", "context_turns", "pgvector_items", "kv_items", "lora_adapters", "lora_items"]
BY_ITEM = ["usage", "placements", "moves"]

# Writes into another user's rows, each either refused (ScopeViolation) or touching no row at all.
# %(a)s is the attacker, %(b)s the victim, %(v)s one of the victim's items.
FOREIGN_WRITES = {
    "items: insert in another user's name": (
        "INSERT INTO items (user_id, text, content_hash, tokens) VALUES (%(b)s, 'x', '\\x01', 1)", "refused"),
    "items: update another user's item": ("UPDATE items SET text = 'mine now' WHERE id = %(v)s", "no rows"),
    "items: delete another user's item": ("DELETE FROM items WHERE id = %(v)s", "no rows"),
    "usage: count a read of another user's item": ("INSERT INTO usage (item_id) VALUES (%(v)s)", "refused"),
    "usage: update another user's usage": ("UPDATE usage SET reads = reads + 100 WHERE item_id = %(v)s", "no rows"),
    "placements: place another user's item": (
        "INSERT INTO placements (item_id, tier, level, reason) VALUES (%(v)s, 'kv', 2, 'x')", "refused"),
    "moves: record a move of another user's item": (
        "INSERT INTO moves (item_id, tier, level, held, reason) VALUES (%(v)s, 'kv', 2, true, 'x')", "refused"),
    "context_turns: hold another user's item as a turn": (
        "INSERT INTO context_turns (item_id, user_id, agent_id, session_id, tokens) "
        "VALUES (%(v)s, %(a)s, '', 's1', 1)", "refused"),
    "pgvector_items: index another user's item": (
        "INSERT INTO pgvector_items (item_id, user_id, agent_id, session_id, embedding, tsv) "
        "VALUES (%(v)s, %(a)s, '', '', array_fill(0.1, ARRAY[384])::halfvec, to_tsvector('x'))", "refused"),
    "kv_items: register a KV blob in another user's name": (
        "INSERT INTO kv_items (item_id, user_id, agent_id, session_id, embedding, span, stored_tokens, bytes, "
        "fingerprint, codec, artifact) VALUES (%(v)s, %(b)s, '', '', array_fill(0.1, ARRAY[384])::halfvec, "
        "1, 1, 1, 'fp', 'int4', 'kv/x')", "refused"),
    "lora_items: put another user's item in one's adapter": (
        "INSERT INTO lora_items (item_id, user_id, agent_id, session_id) VALUES (%(v)s, %(a)s, '', '')", "refused"),
    "lora_adapters: register an adapter in another user's name": (
        "INSERT INTO lora_adapters (user_id, agent_id, session_id, artifact, bytes, fingerprint, item_ids, recall, "
        "metrics) VALUES (%(b)s, '', '', 'lora/x', 1, 'fp', '{}', 1, '{}')", "refused"),
    "lora_adapters: drop another user's adapters": ("DELETE FROM lora_adapters WHERE user_id = %(b)s", "no rows"),
}


class Tally:
    """Operations tried, entries checked and leaks found, over a whole run."""

    def __init__(self):
        self.operations: Counter[str] = Counter()
        self.checked: Counter[str] = Counter()
        self.leaks: Counter[str] = Counter()
        self.examples_of_leaks: list[str] = []
        self.examples = 0


def visible(owner: Scope, reader: Scope) -> bool:
    return (owner.user_id == reader.user_id and owner.agent_id in (None, reader.agent_id)
            and owner.session_id in (None, reader.session_id))


class Interleavings(RuleBasedStateMachine):
    mem: Memory
    tally: Tally
    fingerprint: str

    @initialize()
    def setup(self):
        run = uuid.uuid4().hex[:8]
        self.users = [f"iso{run}{n}" for n in range(3)]
        self.held: dict[int, Scope] = {}  # item id -> the scope it was written in
        self.turns: set[int] = set()  # conversation turns (not in pgvector, so never promoted)
        self.kv: set[int] = set()  # items with a KV entry
        self.lora: set[int] = set()  # items at level 3
        self.tally.examples += 1

    def teardown(self):
        for u in getattr(self, "users", []):
            self.mem.forget(Scope(u))

    # -- helpers ----------------------------------------------------------------

    def scope(self, data, session=None):
        return Scope(data.draw(st.sampled_from(self.users)), data.draw(st.sampled_from(AGENTS)),
                     session or data.draw(st.sampled_from(SESSIONS)))

    def leak(self, kind: str, detail: str) -> None:
        self.tally.leaks[kind] += 1
        if len(self.tally.examples_of_leaks) < 20:
            self.tally.examples_of_leaks.append(f"{kind}: {detail}")
        raise AssertionError(f"leak ({kind}): {detail}")

    def check(self, reader: Scope, item, served_as: str) -> None:
        self.tally.checked[served_as] += 1
        owner = self.held.get(item.id)
        if owner is None:
            self.leak(served_as, f"{reader} got item {item.id}, forgotten or never written")
        if not visible(owner, reader) or item.scope != owner:
            kind = "another user's item" if owner.user_id != reader.user_id else "a scope it cannot see"
            self.leak(served_as, f"{reader} got {kind}: item {item.id} of {owner} (labelled {item.scope})")

    def knowledge(self) -> list[int]:
        return sorted(set(self.held) - self.turns)

    def forgotten(self, ids) -> None:
        for i in ids:
            del self.held[i]
            self.turns.discard(i)
            self.kv.discard(i)
            self.lora.discard(i)

    # -- writing ------------------------------------------------------------------

    @rule(data=st.data(), words=st.lists(st.sampled_from(WORDS), min_size=1, max_size=4))
    def write(self, data, words):
        s = self.scope(data)
        item = self.mem.write(s, f"{s.user_id} note: " + " ".join(words))
        self.held[item.id] = s
        self.tally.operations["write"] += 1
        self.read_after(data, s)

    @rule(data=st.data(), words=st.lists(st.sampled_from(WORDS), min_size=1, max_size=4))
    def write_turn(self, data, words):
        s = self.scope(data, session="s1")
        [item] = self.mem.write_messages(s, [{"role": "user", "content": f"{s.user_id} says " + " ".join(words)}])
        self.held[item.id] = s
        self.turns.add(item.id)
        self.tally.operations["write_turn"] += 1
        self.read_after(data, s)

    @precondition(lambda self: set(self.held) - self.turns - self.kv - self.lora)
    @rule(data=st.data())
    def promote_to_kv(self, data):
        """What the kv tier records after encoding an item, in its owner's scoped transaction."""
        item_id = data.draw(st.sampled_from(sorted(set(self.held) - self.turns - self.kv - self.lora)))
        with self.mem.store.scoped(self.held[item_id]) as db:
            added = db.execute(
                "INSERT INTO kv_items (item_id, user_id, agent_id, session_id, embedding, span, stored_tokens, "
                "bytes, fingerprint, codec, artifact) SELECT item_id, user_id, agent_id, session_id, embedding, "
                "8, 8, 64, %s, 'int4', 'kv/isolation/' || item_id FROM pgvector_items WHERE item_id = %s",
                (self.fingerprint, item_id)).rowcount
            db.execute("INSERT INTO placements (item_id, tier, level, reason) VALUES (%s, 'kv', 2, 'encoded')",
                       (item_id,))
        assert added == 1
        self.kv.add(item_id)
        self.tally.operations["promote_to_kv"] += 1
        # Its owner's scope is served the item as explicit memory; then anyone reads.
        recall = self.read_as(data, self.held[item_id])
        assert recall.kv is not None and item_id in {it.id for it in recall.kv.items}
        self.read_after(data, self.held[item_id])

    @precondition(lambda self: set(self.held) - self.turns - self.kv)
    @rule(data=st.data())
    def train_adapter(self, data):
        """What the lora tier records after training a scope's adapter (every item recalled)."""
        trainable = [i for i in self.knowledge() if i not in self.kv]
        s = data.draw(st.sampled_from(sorted({self.held[i] for i in trainable}, key=lambda s: s.key)))
        ids = [i for i in trainable if self.held[i] == s]
        u, a, sess = s.key
        with self.mem.store.scoped(s) as db:
            adapter = db.execute(
                "INSERT INTO lora_adapters (user_id, agent_id, session_id, artifact, bytes, fingerprint, item_ids, "
                "recall, metrics) VALUES (%s, %s, %s, 'lora/isolation', 1, %s, %s, 1.0, %s) RETURNING id",
                (u, a, sess, self.fingerprint, ids, Jsonb({}))).fetchone()[0]
            db.execute(
                "INSERT INTO lora_items (item_id, user_id, agent_id, session_id, adapter_id, recall, passed) "
                "SELECT unnest(%s::bigint[]), %s, %s, %s, %s, 1.0, true ON CONFLICT (item_id) DO UPDATE "
                "SET adapter_id = EXCLUDED.adapter_id, recall = 1.0, passed = true", (ids, u, a, sess, adapter))
            db.execute("INSERT INTO placements (item_id, tier, level, reason) SELECT unnest(%s::bigint[]), 'lora', "
                       "3, 'trained' ON CONFLICT (item_id, tier) DO NOTHING", (ids,))
        self.lora.update(ids)
        self.tally.operations["train_adapter"] += 1
        # The scope itself is served its newest adapter, holding the items; then anyone reads.
        recall = self.read_as(data, s)
        assert recall.adapter is not None and recall.adapter.scope == s
        assert {it.id for it in recall.adapter.items} == set(ids)
        self.read_after(data, s)

    @precondition(lambda self: self.kv or self.lora)
    @rule(data=st.data())
    def demote(self, data):
        """A real consolidation moves an item down from the kv or lora tier."""
        item_id, level = data.draw(st.sampled_from(sorted([(i, 2) for i in self.kv] + [(i, 3) for i in self.lora])))
        placed = self.mem.consolidate(self.held[item_id], [Move((item_id,), level, 1, "cold")])
        assert [(p.tier, p.held, tuple(p.item_ids)) for p in placed] == [("kv" if level == 2 else "lora", False,
                                                                          (item_id,))]
        (self.kv if level == 2 else self.lora).discard(item_id)
        self.tally.operations["demote"] += 1
        self.read_after(data, self.held[item_id])

    # -- reading ------------------------------------------------------------------

    @rule(data=st.data())
    def read(self, data):
        self.read_as(data, self.scope(data))

    def read_as(self, data, s: Scope):
        word = data.draw(st.sampled_from(WORDS))
        recall = self.mem.read(s, f"{word} note", Budget(tokens=4096, k=50))
        self.tally.operations["read"] += 1
        for hit in recall.hits:
            self.check(s, hit.item, "text hit")
        for item in recall.kv.items if recall.kv else ():
            self.check(s, item, "KV prefix item")
        for hit in recall.covered:
            self.check(s, hit.item, "adapter-covered hit")
        if recall.adapter is not None:
            self.tally.checked["adapter"] += 1
            if not visible(recall.adapter.scope, s):
                self.leak("adapter", f"{s} got the adapter of {recall.adapter.scope}")
            for item in recall.adapter.items:
                self.check(s, item, "adapter item")
        return recall

    def read_after(self, data, changed: Scope) -> None:
        """After a change, a read in the changed scope or in any scope of any user."""
        self.read_as(data, changed if data.draw(st.booleans()) else self.scope(data))

    @precondition(lambda self: self.held)
    @rule(data=st.data())
    def buggy_query(self, data):
        """Queries with no WHERE clause in a user's scoped transaction return that user's rows only."""
        user = data.draw(st.sampled_from(sorted({o.user_id for o in self.held.values()})))
        table = data.draw(st.sampled_from(BY_USER + BY_ITEM))
        mine = {i for i, o in self.held.items() if o.user_id == user}
        key = "id" if table in ("items", "lora_adapters") else "item_id"
        owner = "user_id" if table in BY_USER else "NULL"
        with self.mem.store.scoped(user) as db:
            rows = db.execute(f"SELECT {owner}, {key} FROM {table}").fetchall()
        self.tally.operations["buggy_query"] += 1
        for owner, key in rows:
            self.tally.checked[f"row of {table}"] += 1
            if owner not in (None, user):
                self.leak(f"buggy query on {table}", f"{user} saw a row of {owner}")
            if table != "lora_adapters" and key not in mine:
                self.leak(f"buggy query on {table}", f"{user} saw a row of item {key}, not theirs")
        if table == "items" and len(rows) != len(mine):
            self.leak("buggy query on items", f"{user} saw {len(rows)} items, holds {len(mine)}")

    # -- writing into another user's rows ---------------------------------------------

    @precondition(lambda self: self.held)
    @rule(data=st.data(), attempt=st.sampled_from(sorted(FOREIGN_WRITES)))
    def write_foreign_rows(self, data, attempt):
        victim_item = data.draw(st.sampled_from(sorted(self.held)))
        victim = self.held[victim_item].user_id
        attacker = data.draw(st.sampled_from([u for u in self.users if u != victim]))
        sql, expected = FOREIGN_WRITES[attempt]
        self.tally.operations["write_foreign_rows"] += 1
        try:
            with self.mem.store.scoped(attacker) as db:
                changed = db.execute(sql, {"a": attacker, "b": victim, "v": victim_item}).rowcount
        except ScopeViolation:
            self.tally.checked["foreign write refused"] += 1
            return
        if expected == "refused" or changed:
            self.leak(attempt, f"{attacker} changed {changed} row(s) of {victim}")
        self.tally.checked["foreign write touched no row"] += 1

    # -- forgetting ---------------------------------------------------------------

    @precondition(lambda self: self.held)
    @rule(data=st.data())
    def forget_one(self, data):
        item_id = data.draw(st.sampled_from(sorted(self.held)))
        owner = self.held[item_id]
        assert self.mem.forget(Scope(owner.user_id), [item_id]) == 1
        self.forgotten([item_id])
        self.tally.operations["forget_one"] += 1
        self.read_after(data, owner)

    @rule(data=st.data())
    def forget_scope(self, data):
        s = self.scope(data)
        gone = [i for i, o in self.held.items() if o.user_id == s.user_id
                and (s.agent_id is None or o.agent_id == s.agent_id)
                and (s.session_id is None or o.session_id == s.session_id)]
        assert self.mem.forget(s) == len(gone)
        self.forgotten(gone)
        self.tally.operations["forget_scope"] += 1
        self.read_after(data, s)

    @invariant()
    def counts_match(self):
        if not hasattr(self, "users"):
            return
        for u in self.users:
            expected = sum(1 for o in self.held.values() if o.user_id == u)
            assert self.mem.stats(Scope(u))["items"] == expected


def test_no_scope_ever_sees_another(dsn, tmp_path):
    target = int(os.environ.get("MEMPLUG_TEST_ISOLATION_OPS", "500"))
    tally = Tally()
    mem = Memory(dsn, settings=Settings(plugins="context,pgvector,kv,lora"), options={
        "artifacts": str(tmp_path / "artifacts"),
        "kv_min_similarity": -1.0,  # every visible KV entry is offered, whatever the query
        "kv_margin": 2.0,  # and none is left out as a near miss
        "lora_gate": 0.0,  # the adapter is offered to every read that may see it
        "context_tokens": 1_000_000,  # turns stay turns: the model knows every item's id
    })
    Interleavings.mem, Interleavings.tally = mem, tally
    Interleavings.fingerprint = mem.model_fingerprint  # read from the model cache, not by loading it
    # Every tier must be exercised: reads returned KV entries and adapters, and foreign writes were refused.
    # The interleavings are random, so a run that reached its operations without one of them goes on
    # (up to three times as many operations) rather than passing or failing by luck.
    exercised = ["text hit", "KV prefix item", "adapter item", "foreign write refused", "foreign write touched no row"]

    def more() -> bool:
        done = sum(tally.operations.values())
        return done < target or (done < 3 * target and not all(tally.checked[kind] for kind in exercised))

    started = time.perf_counter()
    try:
        while more():
            done = sum(tally.operations.values())
            left = target - done if done < target else target // 2
            Interleavings.TestCase.settings = settings(
                max_examples=max(1, math.ceil(left / (STEPS * 0.8))), stateful_step_count=STEPS, deadline=None,
                suppress_health_check=list(HealthCheck), database=None)
            Interleavings.TestCase().runTest()
    finally:
        seconds = time.perf_counter() - started
        out = os.environ.get("MEMPLUG_TEST_ISOLATION_OUT")
        if out:
            _write_results(Path(out), mem, tally, seconds)
        mem.close()
    total = sum(tally.operations.values())
    assert total >= target and not tally.leaks, tally.examples_of_leaks
    missing = [kind for kind in exercised if not tally.checked[kind]]
    assert not missing, (missing, tally.operations, tally.checked)


def _write_results(path: Path, mem: Memory, tally: Tally, seconds: float) -> None:
    with mem.store.transaction() as db:
        pg = db.execute("SHOW server_version").fetchone()[0]
    result = {
        "benchmark": "isolation",
        "what": "random interleaved operations of 3 users over tiers context, pgvector, kv, lora; every read's "
                "hits, KV items and adapter, every row of an unfiltered query, and every write into another "
                "user's rows checked against a model of the scopes",
        "machine": {"cpu": platform.machine(), "cores": os.cpu_count(), "python": platform.python_version(),
                    "postgres": pg},
        "users": 3,
        "examples": tally.examples,
        "operations": sum(tally.operations.values()),
        "operations_per_kind": dict(sorted(tally.operations.items())),
        "checked_per_kind": dict(sorted(tally.checked.items())),
        "leaks": sum(tally.leaks.values()),
        "leaks_per_kind": dict(sorted(tally.leaks.items())),
        "leak_examples": tally.examples_of_leaks,
        "seconds": round(seconds, 1),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
