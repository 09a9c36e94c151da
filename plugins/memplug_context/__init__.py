"""Tier ``context`` (level 0): the recent turns of each session, within a token budget.

Turns written with :meth:`Memory.write_messages` are held here, newest last. When
a session's turns exceed ``context_tokens`` (counted with the local model's
tokenizer), the oldest are flushed: they become long-term items of the scope
without its session (so later sessions can recall them) and the turns are
removed. A session idle for ``context_idle_seconds`` is flushed by
consolidation, and :meth:`Memory.end_session` flushes one at once.
"""

from __future__ import annotations

from collections import defaultdict

from memplug.plugin import (
    ITEM_COLUMNS,
    Hit,
    Move,
    Option,
    Placement,
    Scope,
    hookimpl,
    item_from_row,
    row_security,
    subtree_sql,
)

MIGRATIONS = (
    """
    CREATE TABLE context_turns (
        item_id    bigint PRIMARY KEY REFERENCES items(id) ON DELETE CASCADE,
        user_id    text NOT NULL,
        agent_id   text NOT NULL,
        session_id text NOT NULL,
        tokens     integer NOT NULL,
        added_at   timestamptz NOT NULL DEFAULT now()
    );
    CREATE INDEX context_turns_session ON context_turns (user_id, agent_id, session_id, item_id);
    """,
    # 2: a scoped transaction sees its own user's turns only
    row_security("context_turns"),
)


class ContextTier:
    """Short-term conversation memory, one buffer per session."""

    name = "context"
    level = 0
    options = (
        Option("context_tokens", int, 1024, "Tokens of recent turns held per session (counted with the local "
               "model's tokenizer); older turns are flushed to long-term memory. 0: every turn at once.", min=0),
        Option("context_idle_seconds", float, 1800.0, "Seconds after its last turn that a session counts as "
               "idle and is flushed at the next consolidation.", min=0),
        Option("context_flush_roles", str, "user", "Roles whose turns become long-term items when flushed "
               "(comma-separated); the others are dropped."),
    )

    @hookimpl
    def memplug_configure(self, memory):
        memory.store.migrate("context", MIGRATIONS)
        self.budget_tokens = memory.option("context_tokens")
        self.idle_s = memory.option("context_idle_seconds")
        roles = memory.option("context_flush_roles")
        self.flush_roles = {r.strip() for r in roles.split(",") if r.strip()}

    @hookimpl
    def memplug_write(self, memory, scope, items, db):
        turns = [it for it in items if it.role is not None]
        if not turns:
            return None
        u, a, s = scope.key
        with db.cursor() as cur:
            cur.executemany(
                "INSERT INTO context_turns (item_id, user_id, agent_id, session_id, tokens) "
                "VALUES (%s, %s, %s, %s, %s)",
                [(t.id, u, a, s, t.tokens) for t in turns],
            )
        overflow = [r[0] for r in db.execute(
            """
            SELECT item_id FROM (
                SELECT item_id, sum(tokens) OVER (ORDER BY item_id DESC) AS newer_tokens
                FROM context_turns WHERE user_id = %s AND agent_id = %s AND session_id = %s
            ) t WHERE newer_tokens > %s ORDER BY item_id
            """,
            (u, a, s, self.budget_tokens),
        ).fetchall()]
        if overflow:
            self._flush(memory, db, overflow, "context budget")
        gone = set(overflow)
        held = [t.id for t in turns if t.id not in gone]
        return [Placement(self.name, self.level, held, "turn")] if held else None

    @hookimpl
    def memplug_read(self, memory, scope, query, budget, filters, db):
        if scope.session_id is None:
            return None
        u, a, s = scope.key
        sql = (
            f"SELECT {ITEM_COLUMNS} FROM context_turns c JOIN items i ON i.id = c.item_id "
            "WHERE c.user_id = %(u)s AND c.agent_id = %(a)s AND c.session_id = %(s)s"
        )
        params = {"u": u, "a": a, "s": s}
        if filters:
            from psycopg.types.json import Jsonb

            sql += " AND i.metadata @> %(filters)s"
            params["filters"] = Jsonb(filters)
        rows = db.execute(sql + " ORDER BY c.item_id DESC", params).fetchall()
        # Newest first: under a tight budget the latest turns are the ones kept.
        return [Hit(item_from_row(r), self.name, 1.0 / (1 + n)) for n, r in enumerate(rows)]

    @hookimpl
    def memplug_plan(self, memory, scope, usage):
        where, params = subtree_sql(scope, "c")
        with memory.store.scoped(scope) as db:
            rows = db.execute(
                f"""
                SELECT array_agg(c.item_id ORDER BY c.item_id) FROM context_turns c WHERE {where}
                GROUP BY c.user_id, c.agent_id, c.session_id
                HAVING max(c.added_at) < now() - make_interval(secs => %(idle)s)
                """,
                {**params, "idle": self.idle_s},
            ).fetchall()
        return [Move(tuple(r[0]), 0, 1, "session idle") for r in rows]

    @hookimpl
    def memplug_consolidate(self, memory, scope, moves, db):
        ids = sorted({i for m in moves if m.src_level == self.level and m.dst_level > self.level for i in m.item_ids})
        if not ids:
            return None
        flushed = self._flush(memory, db, ids, next(m.reason for m in moves if m.src_level == self.level))
        return [Placement(self.name, self.level, flushed, "flushed", held=False)] if flushed else None

    @hookimpl
    def memplug_forget(self, memory, scope, item_ids, db):
        db.execute("DELETE FROM context_turns WHERE item_id = ANY(%s::bigint[])", (list(item_ids),))

    def _flush(self, memory, db, item_ids, reason):
        """Turn held turns into long-term items of their session's parent scope, then drop the turns."""
        rows = db.execute(
            f"SELECT {ITEM_COLUMNS} FROM context_turns c JOIN items i ON i.id = c.item_id "
            "WHERE c.item_id = ANY(%s::bigint[]) ORDER BY c.item_id",
            (list(item_ids),),
        ).fetchall()
        by_session: dict[Scope, list] = defaultdict(list)
        for r in rows:
            turn = item_from_row(r)
            by_session[turn.scope].append(turn)
        for session, turns in by_session.items():
            keep = [
                (t.text, {"role": t.role, "session_id": session.session_id, "source": "conversation",
                          "flushed": reason}, None)
                for t in turns if t.role in self.flush_roles
            ]
            if keep:
                memory.write_in(db, session.without_session(), keep)
            memory.forget_in(db, session, [t.id for t in turns])
        return [r[0] for r in rows]
