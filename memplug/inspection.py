"""What a scope's memory holds, for people and tools: counts, and where each item sits and why."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .scoping import subtree_sql
from .types import Scope

if TYPE_CHECKING:
    from .memory import Memory


def stats(memory: Memory, scope: Scope | None) -> dict[str, Any]:
    """Counts of ``scope`` and the scopes under it, or of the whole store (``scope`` None)."""
    where, params = ("TRUE", {}) if scope is None else subtree_sql(scope, "i")
    # The whole store's counts span users: the unscoped path, as the tables' owner.
    with memory.store.transaction() if scope is None else memory.store.scoped(scope) as db:
        items, turns, users, scopes, chars = db.execute(
            f"SELECT count(*), count(i.role), count(DISTINCT i.user_id), "
            f"count(DISTINCT (i.user_id, i.agent_id, i.session_id)), coalesce(sum(length(i.text)), 0) "
            f"FROM items i WHERE {where}", params).fetchone()
        tiers = dict(db.execute(
            f"SELECT p.tier, count(*) FROM placements p JOIN items i ON i.id = p.item_id WHERE {where} "
            f"GROUP BY p.tier ORDER BY p.tier", params).fetchall())
        reads = db.execute(
            f"SELECT coalesce(sum(u.reads), 0) FROM usage u JOIN items i ON i.id = u.item_id WHERE {where}",
            params).fetchone()[0]
        size = db.execute("SELECT pg_database_size(current_database())").fetchone()[0]
    return {
        "scope": None if scope is None else str(scope),
        "items": items, "turns": turns, "users": users, "scopes": scopes, "text_chars": chars,
        "items_per_tier": tiers, "reads": int(reads), "database_bytes": size,
        "store": memory.store.safe_dsn,
    }


def inspect(memory: Memory, scope: Scope, limit: int) -> list[dict[str, Any]]:
    """The newest ``limit`` items of ``scope`` and under it (0: all): level, usage, bytes per tier, history."""
    usage = {u.item_id: u for u in memory.usage(scope, subtree=True)}
    ids = sorted(usage)[-limit:] if limit else sorted(usage)
    with memory.store.scoped(scope) as db:
        texts = dict(db.execute("SELECT id, text FROM items WHERE id = ANY(%s::bigint[])", (ids,)).fetchall())
        history: dict[int, list[dict[str, Any]]] = {i: [] for i in ids}
        for item_id, tier, level, held, reason, at in db.execute(
                "SELECT item_id, tier, level, held, reason, at FROM moves WHERE item_id = ANY(%s::bigint[]) "
                "ORDER BY at, id", (ids,)).fetchall():
            history[item_id].append({"tier": tier, "level": level, "held": held, "reason": reason, "at": at})
        # Each implementation is called on its own: the answer is labelled with its plugin's name.
        footprint: dict[int, dict[str, int]] = {i: {} for i in ids}
        # As pluggy does: an implementation may declare only some of the hook's arguments.
        offered = {"memory": memory, "item_ids": ids, "db": db}
        for impl in memory.hook.memplug_footprint.get_hookimpls():
            name = getattr(impl.plugin, "name", None) or impl.plugin_name
            answer = impl.function(**{a: offered[a] for a in impl.argnames})
            for item_id, size in (answer or {}).items():
                footprint[item_id][name] = int(size)
    return [{"id": i, "text": texts.get(i, ""), "level": usage[i].level, "reads": usage[i].reads,
             "used": usage[i].used, "heat": usage[i].heat, "last_read_at": usage[i].last_read_at,
             "tokens": usage[i].tokens, "bytes": footprint[i], "history": history[i]} for i in ids]
