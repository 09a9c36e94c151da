"""``TierConformance``: the checks every memory tier passes, built-in or third-party."""

from __future__ import annotations

import inspect
import threading
from pathlib import Path
from typing import Any

import pytest

from memplug import Budget, Item, Memory, MemplugError, Move, NotFound, Recall, Scope, Settings

from .scan import assert_no_traces

FACTS = (
    "The orange heron in Tallinn guards locker 8812.",
    "The violet otter in Bergen keeps its keys under the blue mat.",
    "The silver lynx in Porto drinks mint tea every Sunday.",
    "The amber beetle in Quito repairs clocks for the museum.",
    "The teal walrus in Hobart collects maps of old lighthouses.",
)


def call_hook(plugin: Any, hook: str, **kwargs: Any) -> Any:
    """Call one plugin's hook implementation with the arguments it names (None if it has none)."""
    fn = getattr(plugin, hook, None)
    if fn is None:
        return None
    names = inspect.signature(fn).parameters
    return fn(**{k: v for k, v in kwargs.items() if k in names})


class TierConformance:
    """Subclass and set ``plugin``; pytest collects the checks below for your tier.

    - ``plugin``: the tier's class or instance (registered on each test's Memory), or the
      name of an installed entry point (loaded through the ``memplug`` group).
    - ``options``: plugin settings for the Memory under test (``Settings.option``).
    - ``base_plugins``: the built-in tiers your tier runs beside.
    - ``writes``: ``"knowledge"`` (items from :meth:`Memory.write`) or ``"turns"``
      (conversation turns, :meth:`Memory.write_messages`), whichever your tier holds.
    - ``texts``: five distinct texts your tier keeps (the defaults are plain facts).

    A tier at level 2 or more receives items by consolidation (a move up from level 1);
    one at level 0 or 1 takes them as they are written. Each check works in scopes
    of its own, on a real Postgres, and asserts through public interfaces: the
    placements the host records, the tier's ``memplug_footprint`` when it has one, what
    reads return, the artifact store and every table that refers to an item.
    """

    plugin: Any = None
    options: dict[str, Any] = {}
    base_plugins: tuple[str, ...] = ("context", "pgvector")
    writes: str = "knowledge"
    texts: tuple[str, ...] = FACTS

    # -- set-up ---------------------------------------------------------------------------

    @pytest.fixture
    def tier_memory(self, memplug_dsn, memplug_home, tmp_path):
        if self.plugin is None:
            pytest.fail(f"{type(self).__name__} must set plugin = <your tier class, instance or entry point name>")
        names = list(self.base_plugins)
        extra = []
        if isinstance(self.plugin, str):
            names += [] if self.plugin in names else [self.plugin]
        else:
            extra = [self.plugin() if isinstance(self.plugin, type) else self.plugin]
        mem = Memory(memplug_dsn, home=memplug_home, plugins=extra, settings=Settings(plugins=",".join(names)),
                     options={"artifacts": str(tmp_path / "artifacts"), **self.options})
        try:
            yield mem
        finally:
            mem.close()

    @pytest.fixture
    def tier(self, tier_memory):
        name = self.plugin if isinstance(self.plugin, str) else getattr(self.plugin, "name", None)
        found = tier_memory.plugins.pm.get_plugin(name) if name else None
        if found is None or getattr(found, "level", None) is None:
            pytest.fail(f"plugin {name!r} is not a registered tier (a tier has a str 'name' and an int 'level')")
        return found

    def scope(self, user: str, agent: str | None = None) -> Scope:
        """Where the checks write: a session scope for a tier of turns."""
        return Scope(user, agent, "s1" if self.writes == "turns" else None)

    def place(self, mem: Memory, tier: Any, scope: Scope, texts: tuple[str, ...] | list[str] | None = None
              ) -> list[Item]:
        """Write ``texts`` so that they reach the tier: written, and moved up to its level if it is 2 or more."""
        texts = self.texts if texts is None else texts
        if self.writes == "turns":
            items = mem.write_messages(scope, [{"role": "user", "content": t} for t in texts])
        else:
            items = mem.write(scope, list(texts))
        if tier.level >= 2:
            mem.consolidate(scope, [Move(tuple(it.id for it in items), 1, tier.level, "conformance")])
        return items

    # -- what the tier holds, seen from outside --------------------------------------------

    @staticmethod
    def held(mem: Memory, tier: Any, ids: list[int]) -> set[int]:
        with mem.store.transaction() as db:
            rows = db.execute("SELECT item_id FROM placements WHERE tier = %s AND item_id = ANY(%s::bigint[])",
                              (tier.name, ids)).fetchall()
        return {r[0] for r in rows}

    @staticmethod
    def footprint(mem: Memory, tier: Any, ids: list[int]) -> dict[int, int] | None:
        with mem.store.transaction() as db:
            return call_hook(tier, "memplug_footprint", memory=mem, item_ids=ids, db=db)

    @staticmethod
    def artifacts(mem: Memory) -> set[str]:
        root = getattr(mem.artifacts, "root", None)
        if not getattr(mem.artifacts, "local", False) or root is None or not Path(root).exists():
            return set()
        return {p.relative_to(root).as_posix() for p in Path(root).rglob("*") if p.is_file()}

    @staticmethod
    def rows_naming(mem: Memory, ids: list[int]) -> dict[str, int]:
        """Rows in any memplug table with an ``item_id`` column that name one of ``ids``."""
        found = {}
        with mem.store.transaction() as db:
            tables = db.execute(
                "SELECT table_schema, table_name FROM information_schema.columns "
                "WHERE column_name = 'item_id' AND table_schema = current_schema()").fetchall()
            for schema, table in tables:
                n = db.execute(f'SELECT count(*) FROM "{schema}"."{table}" WHERE item_id = ANY(%s::bigint[])',
                               (ids,)).fetchone()[0]
                if n:
                    found[table] = n
        return found

    @staticmethod
    def contributed(recall: Recall, name: str) -> bool:
        return (any(h.tier == name for h in (*recall.pinned, *recall.hits, *recall.covered))
                or (recall.kv is not None and recall.kv.tier == name)
                or (recall.adapter is not None and recall.adapter.tier == name))

    # -- the checks --------------------------------------------------------------------------

    def test_write_read_forget_round_trip(self, tier_memory, tier, memplug_user):
        mem, scope = tier_memory, self.scope(memplug_user)
        items = self.place(mem, tier, scope)
        ids = [it.id for it in items]
        held = self.held(mem, tier, ids)
        assert held, f"tier {tier.name!r} holds none of the items placed on it"
        footprint = self.footprint(mem, tier, ids)
        if footprint is not None:
            assert set(footprint) <= held and all(v >= 0 for v in footprint.values())
        contributed = 0
        for item in items:  # k leaves room for every item placed: a tier may rank by recency, not relevance
            recall = mem.read(scope, item.text, Budget(k=2 * len(items)))
            assert item.id in {it.id for it in recall.items}, f"reading {item.text!r} did not return it"
            contributed += self.contributed(recall, tier.name)
        assert contributed, f"tier {tier.name!r} contributed to none of the reads of its own items"
        assert mem.forget(scope, ids) == len(ids)
        assert not self.held(mem, tier, ids)
        assert not self.footprint(mem, tier, ids)
        for item in items:
            assert item.id not in {it.id for it in mem.read(scope, item.text, Budget(k=5)).items}

    def test_scopes_never_see_each_other(self, tier_memory, tier, memplug_user):
        mem = tier_memory
        a, b = self.scope(memplug_user), self.scope(memplug_user + "b")
        mine, theirs = self.place(mem, tier, a), self.place(mem, tier, b)  # the same texts, two users
        for scope, own in ((a, mine), (b, theirs)):
            own_ids = {it.id for it in own}
            for item in own:
                recall = mem.read(scope, item.text, Budget(k=10))
                seen = [*recall.items, *(recall.adapter.items if recall.adapter else ())]
                assert all(it.scope.user_id == scope.user_id for it in seen), "a read returned another user's item"
                assert {it.id for it in recall.items} <= own_ids | {it.id for it in mem.items(scope, limit=1000)}
        # agents of one user are apart too
        x, y = self.scope(memplug_user, "agent-x"), self.scope(memplug_user, "agent-y")
        only_x = self.place(mem, tier, x, [f"Agent x alone knows code {memplug_user}-x."])
        recall = mem.read(y, f"Agent x alone knows code {memplug_user}-x.", Budget(k=10))
        assert only_x[0].id not in {it.id for it in recall.items}

    def test_forget_leaves_no_trace(self, tier_memory, tier, memplug_user):
        mem, scope = tier_memory, self.scope(memplug_user)
        before = self.artifacts(mem)
        items = self.place(mem, tier, scope)
        ids = [it.id for it in items]
        mem.forget(Scope(memplug_user))  # the user and every scope under them
        assert self.rows_naming(mem, ids) == {}, "rows still name forgotten items"
        assert_no_traces(mem, items, Scope(memplug_user))  # every table and file: ids, texts, embeddings
        assert self.artifacts(mem) == before, "artifacts of forgotten items are left behind"
        assert not self.footprint(mem, tier, ids)
        assert mem.items(scope, limit=10) == []

    def test_bad_input_changes_nothing(self, tier_memory, tier, memplug_user):
        mem, scope = tier_memory, self.scope(memplug_user)
        items = self.place(mem, tier, scope)
        ids = [it.id for it in items]
        other = self.place(mem, tier, self.scope(memplug_user + "o"), ["Someone else's note."])
        snapshot = (self.held(mem, tier, ids), self.footprint(mem, tier, ids), self.artifacts(mem),
                    [it.id for it in mem.items(scope, limit=1000)])
        bad = [
            lambda: mem.write(scope, ""),
            lambda: mem.write(scope, "nul \x00 byte"),
            lambda: mem.write(scope, "lone \ud800 surrogate"),
            lambda: mem.write(scope, "x" * (mem.max_text_chars + 1)),
            lambda: mem.write(scope, "ok", metadata={"not json": object()}),
            lambda: mem.write_messages(scope.without_session(), [{"role": "user", "content": "hi"}]),
            lambda: mem.write_messages(Scope(memplug_user, session_id="s9"), [{"role": "wizard", "content": "x"}]),
            lambda: mem.read(scope, ""),
            lambda: mem.read(scope, "q", budget="many"),
            lambda: mem.read(scope, "q", filters="source=chat"),
            lambda: mem.forget(scope, [other[0].id]),  # another user's item
            lambda: mem.forget(scope, ["1"]),
            lambda: mem.consolidate(scope, ["up"]),
            lambda: Scope("../etc"),
            lambda: Scope(""),
        ]
        for n, call in enumerate(bad):
            with pytest.raises(MemplugError):
                call()
            assert (self.held(mem, tier, ids), self.footprint(mem, tier, ids), self.artifacts(mem),
                    [it.id for it in mem.items(scope, limit=1000)]) == snapshot, f"bad call {n} changed state"
        with pytest.raises(NotFound):
            mem.forget(scope, [other[0].id])

    def test_concurrent_writers(self, tier_memory, tier, memplug_user):
        mem = tier_memory
        errors: list[BaseException] = []
        placed: dict[int, list[Item]] = {}

        def writer(n: int) -> None:
            try:
                scope = self.scope(f"{memplug_user}w{n}")
                placed[n] = self.place(mem, tier, scope, [f"Writer {n} wrote note {k}. {self.texts[k]}" for k in range(3)])
            except BaseException as exc:  # reported below
                errors.append(exc)

        threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=600)
        assert not errors, errors
        for n, items in placed.items():
            ids = [it.id for it in items]
            assert len(set(ids)) == 3 and self.held(mem, tier, ids)
            scope = self.scope(f"{memplug_user}w{n}")
            assert {it.id for it in mem.items(scope, limit=100)} >= set(ids)

    def test_moves_in_and_out(self, tier_memory, tier, memplug_user):
        if tier.level < 2:
            pytest.skip(f"a tier at level {tier.level} takes items as they are written; nothing moves into it")
        mem, scope = tier_memory, self.scope(memplug_user)
        before = self.artifacts(mem)
        items = self.place(mem, tier, scope)
        ids = [it.id for it in items]
        held = self.held(mem, tier, ids)
        assert held, f"tier {tier.name!r} took none of the items moved up to level {tier.level}"
        mem.consolidate(scope, [Move(tuple(ids), tier.level, 1, "conformance: cold")])
        assert not self.held(mem, tier, ids)
        assert not self.footprint(mem, tier, ids)
        assert self.artifacts(mem) == before, "moving items out left their artifacts behind"
        for item in items:  # still known, from a lower tier
            recall = mem.read(scope, item.text, Budget(k=2 * len(items)))
            assert item.id in {it.id for it in recall.items} and not self.contributed(recall, tier.name)
