"""Tier ``profile`` (level 0): a compact profile of each user's stable facts, first in every read.

When knowledge or a user's turn is written, the tier picks out stable facts said in
the first person: the user's name, where they live and work, the people and pets
in their life, allergies and likes. It keeps one value per slot (a newer statement
replaces an older one), and every read of the scope starts with the profile as
pinned hits ("name: Ana", "sister: Maria"), within ``profile_tokens`` (48) tokens,
most important slots first. Facts said in one agent's scope stay in that scope.
Forgetting the item a fact came from removes the fact.

An example: installing it does not activate it (``opt_in``); name it in ``MEMPLUG_PLUGINS``
or pass it in code, ``Memory(plugins=[ProfileTier()])``.
"""

from __future__ import annotations

import re

from memplug.plugin import (
    ITEM_COLUMNS,
    Hit,
    Option,
    Placement,
    hookimpl,
    item_from_row,
    row_security,
    visible_sql,
)

MIGRATIONS = (
    """
    CREATE TABLE profile_facts (
        user_id    text NOT NULL,
        agent_id   text NOT NULL,
        session_id text NOT NULL,
        slot       text NOT NULL,
        value      text NOT NULL,
        rank       smallint NOT NULL,
        item_id    bigint NOT NULL REFERENCES items(id) ON DELETE CASCADE,
        said_at    timestamptz NOT NULL DEFAULT clock_timestamp(),
        PRIMARY KEY (user_id, agent_id, session_id, slot)
    );
    CREATE INDEX profile_facts_item ON profile_facts (item_id);
    """,
    # 2: a scoped transaction sees its own user's facts only
    row_security("profile_facts"),
)

_END = r"(?=\s*(?:[.,;!?]|\band\b|\bbut\b|$))"
_RELATIONS = ("wife|husband|partner|son|daughter|sister|brother|mother|father|mum|mom|dad|"
              "friend|boss|dog|cat")
# (pattern, slot or slot prefix, rank): lower ranks are kept first under the token budget.
PATTERNS: tuple[tuple[re.Pattern[str], str, int], ...] = (
    (re.compile(r"\b(?i:my name is) ([A-Z][\w'-]+(?: [A-Z][\w'-]+)?)"), "name", 0),
    (re.compile(r"\b(?i:call me) ([A-Z][\w'-]+)"), "name", 0),
    (re.compile(r"\bI (?i:live in) ([A-Z][\w'-]+(?: [A-Z][\w'-]+)*)" + _END), "lives in", 1),
    (re.compile(r"\bI (?i:work at|work for|am working at|am working for) ([A-Z][\w&'-]+(?: [A-Z][\w&'-]+)*)" + _END),
     "works at", 2),
    (re.compile(rf"\b(?i:my) ((?i:{_RELATIONS}))(?i:'s name)? (?i:is) (?:(?i:called|named) )?([A-Z][\w'-]+)"),
     "relation", 3),
    (re.compile(r"\bI(?i:'m| am) (?i:allergic to) ([\w' -]+?)" + _END), "allergic to", 4),
    (re.compile(r"\bI (?i:really )?(?i:like|love|enjoy|prefer) ([\w' -]+?)" + _END), "likes", 5),
)


def extract(text: str) -> list[tuple[str, str, int]]:
    """``(slot, value, rank)`` for each stable first-person fact in ``text``."""
    found = []
    for pattern, slot, rank in PATTERNS:
        for m in pattern.finditer(text):
            if slot == "relation":
                found.append((m.group(1).lower(), m.group(2), rank))
            elif slot in ("likes", "allergic to"):
                value = m.group(1).strip().lower()
                if 0 < len(value) <= 40:
                    found.append((f"{slot}: {value}", value, rank))
            else:
                found.append((slot, m.group(1).strip(), rank))
    return found


class ProfileTier:
    """The user's stable facts, pinned first in every read."""

    name = "profile"
    level = 0
    opt_in = True
    options = (Option("profile_tokens", int, 48, "Prompt tokens the pinned profile may take in a read.", min=1),)

    @hookimpl
    def memplug_configure(self, memory):
        memory.store.migrate("profile", MIGRATIONS)
        self.max_tokens = memory.option("profile_tokens")
        self.counter = memory.token_counter

    @hookimpl
    def memplug_write(self, scope, items, db):
        u, a, s = scope.key
        kept = []
        for item in items:
            if item.role not in (None, "user"):
                continue
            facts = extract(item.text)
            for slot, value, rank in facts:
                db.execute(
                    "INSERT INTO profile_facts (user_id, agent_id, session_id, slot, value, rank, item_id) "
                    "VALUES (%s, %s, %s, %s, %s, %s, %s) ON CONFLICT (user_id, agent_id, session_id, slot) "
                    "DO UPDATE SET value = EXCLUDED.value, rank = EXCLUDED.rank, item_id = EXCLUDED.item_id, "
                    "said_at = clock_timestamp()", (u, a, s, slot, value, rank, item.id))
            if facts:
                kept.append(item.id)
        return [Placement(self.name, self.level, kept, "profile fact")] if kept else None

    @hookimpl
    def memplug_read(self, scope, filters, db):
        if filters:
            return None  # a filtered read asks for particular items; the profile is not one of them
        where, params = visible_sql(scope, "i")
        rows = db.execute(
            f"SELECT f.slot, f.value, {ITEM_COLUMNS} FROM profile_facts f JOIN items i ON i.id = f.item_id "
            f"WHERE f.user_id = %(scope_user)s AND {where} ORDER BY f.rank, f.said_at DESC", params).fetchall()
        # One hit per source item (the host keeps one hit per item), its facts on one line.
        lines: dict[int, list[str]] = {}
        items, spent, seen = {}, 0, set()
        for slot, value, *item_row in rows:
            if slot in seen:  # the same slot set in a narrower scope and a wider one: the newest wins
                continue
            seen.add(slot)
            line = slot if slot.endswith(value) else f"{slot}: {value}"
            cost = self.counter.count_many([line])[0]
            if spent + cost > self.max_tokens:
                continue
            spent += cost
            item = item_from_row(item_row)
            items.setdefault(item.id, item)
            lines.setdefault(item.id, []).append(line)
        return [Hit(items[i], self.name, 1.0, text="; ".join(ls), pinned=True) for i, ls in lines.items()]

    @hookimpl
    def memplug_footprint(self, item_ids, db):
        rows = db.execute("SELECT item_id, sum(pg_column_size(f.*)) FROM profile_facts f "
                          "WHERE item_id = ANY(%s::bigint[]) GROUP BY item_id", (list(item_ids),)).fetchall()
        return {item_id: int(size) for item_id, size in rows}

    @hookimpl
    def memplug_forget(self, item_ids, db):
        db.execute("DELETE FROM profile_facts WHERE item_id = ANY(%s::bigint[])", (list(item_ids),))
