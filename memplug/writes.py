"""Putting items into the store: ingest plugins, de-duplication, keyed items, the write hook.

Everything here runs inside the caller's transaction; :class:`~memplug.Memory`
opens it.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import replace
from datetime import datetime
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg.types.json import Jsonb

from .consolidation import record_placements
from .errors import InvalidInput
from .rows import ITEM_COLUMNS, item_from_row
from .types import Item, Scope
from .validate import check_keys, check_metadata, check_text, check_time

if TYPE_CHECKING:
    from .memory import Memory

# (text, metadata, role) or (text, metadata, role, occurred_at)
Row = tuple[str, Mapping[str, Any], str | None] | tuple[str, Mapping[str, Any], str | None, datetime | None]


def content_hash(text: str, role: str | None, key: str | None = None, occurred_at: datetime | None = None) -> bytes:
    """What makes an item a duplicate of another in its scope."""
    if key is not None:  # keyed items are told apart by their key, even with the same text
        return hashlib.sha256(f"key\0{key}\0{text}".encode()).digest()
    if role is None and occurred_at is not None:  # the same words about two moments are two items
        return hashlib.sha256(f"at\0{occurred_at.isoformat()}\0{text}".encode()).digest()
    if role is None:
        return hashlib.sha256(text.encode()).digest()
    # Turns are events: the same words said twice are two turns.
    return hashlib.sha256(f"{role}\0{text}\0{uuid.uuid4()}".encode()).digest()


def ingest(memory: Memory, scope: Scope, rows: Sequence[Row]) -> list[tuple[str, dict[str, Any], str | None,
                                                                          datetime | None]]:
    """Let ``memplug_ingest`` plugins change the rows, then validate what they left."""
    records = [{"text": row[0], "metadata": dict(row[1]), "role": row[2],
                "occurred_at": row[3] if len(row) > 3 else None} for row in rows]
    memory.hook.memplug_ingest(memory=memory, scope=scope, records=records)
    if len(records) != len(rows):
        raise InvalidInput(f"a memplug_ingest plugin changed the number of records ({len(rows)} -> {len(records)})")
    return [(check_text(rec["text"], f"text[{n}] after memplug_ingest", memory.max_text_chars),
             check_metadata(rec["metadata"], f"metadata[{n}] after memplug_ingest", memory.max_metadata_bytes),
             rec["role"], check_time(rec.get("occurred_at"), f"occurred_at[{n}] after memplug_ingest"))
            for n, rec in enumerate(records)]


def insert(memory: Memory, db: psycopg.Connection, scope: Scope, rows: Sequence[Row],
           keys: Sequence[str | None] | None = None) -> list[Item]:
    """Store validated rows in ``scope``; return the items in input order (existing ones for duplicates).

    New items reach every tier's ``memplug_write``, and the placements they report are recorded.
    """
    keys = list(keys) if keys is not None else [None] * len(rows)
    rows = ingest(memory, scope, rows)
    hashes = [content_hash(text, role, key, at) for (text, _, role, at), key in zip(rows, keys, strict=True)]
    tokens = memory.token_counter.count_many([text for text, *_ in rows])
    u, a, s = scope.key
    inserted = db.execute(
        """
        INSERT INTO items (user_id, agent_id, session_id, role, text, metadata, content_hash, tokens, key,
                           occurred_at)
        SELECT %(u)s, %(a)s, %(s)s, t.role, t.text, t.metadata, t.content_hash, t.tokens, t.key, t.occurred_at
        FROM unnest(%(roles)s::text[], %(texts)s::text[], %(metas)s::jsonb[], %(hashes)s::bytea[],
                    %(tokens)s::int[], %(keys)s::text[], %(times)s::timestamptz[])
             WITH ORDINALITY AS t(role, text, metadata, content_hash, tokens, key, occurred_at, ord)
        ORDER BY t.ord
        ON CONFLICT (user_id, agent_id, session_id, content_hash) DO NOTHING
        RETURNING id, content_hash
        """,
        {
            "u": u, "a": a, "s": s,
            "roles": [r for _, _, r, _ in rows],
            "texts": [t for t, _, _, _ in rows],
            "metas": [Jsonb(m) for _, m, _, _ in rows],
            "times": [at for *_, at in rows],
            "hashes": hashes,
            "tokens": tokens,
            "keys": keys,
        },
    ).fetchall()
    new_ids = {i for i, _ in inserted}
    found = db.execute(
        f"SELECT {ITEM_COLUMNS}, i.content_hash FROM items i "
        "WHERE i.user_id = %s AND i.agent_id = %s AND i.session_id = %s AND i.content_hash = ANY(%s)",
        (u, a, s, list(set(hashes))),
    ).fetchall()
    by_hash = {bytes(r[-1]): item_from_row(r) for r in found}
    items = [by_hash[h] for h in hashes]
    new = list({it.id: it for it in items if it.id in new_ids}.values())
    if new:
        placed = [p for part in memory.hook.memplug_write(memory=memory, scope=scope, items=new, db=db) if part
                  for p in part]
        record_placements(db, placed)
    return items


def keyed(db: psycopg.Connection, scope: Scope, keys: Sequence[str], lock: bool = False) -> list[Item]:
    """Items stored under ``keys`` in exactly ``scope``."""
    keys = check_keys(keys)
    rows = db.execute(
        f"SELECT {ITEM_COLUMNS} FROM items i WHERE i.user_id = %s AND i.agent_id = %s AND i.session_id = %s "
        f"AND i.key = ANY(%s){' FOR UPDATE' if lock else ''}", (*scope.key, keys)).fetchall()
    return [item_from_row(r) for r in rows]


def put(memory: Memory, db: psycopg.Connection, scope: Scope, keys: Sequence[str], texts: Sequence[str],
        metas: Sequence[Mapping[str, Any]], times: Sequence[datetime | None]) -> list[Item]:
    """Store checked texts under caller keys, one item per key: a key whose text is unchanged keeps
    its item (usage and placements too), a key with new text is forgotten and written anew."""
    old = {it.key: it for it in keyed(db, scope, keys, lock=True)}
    kept: dict[str, Item] = {}
    stale: list[int] = []
    for key, text, meta, at in zip(keys, texts, metas, times, strict=True):
        item = old.get(key)
        if item is None:
            continue
        if item.text == text and item.occurred_at == at:  # a new time is a new event: the tiers index it anew
            if dict(item.metadata) != meta:
                db.execute("UPDATE items SET metadata = %s WHERE id = %s", (Jsonb(meta), item.id))
            kept[key] = replace(item, metadata=meta, key=key)
        else:
            stale.append(item.id)
    memory.forget_in(db, scope, stale)
    todo = [n for n, k in enumerate(keys) if k not in kept]
    written = iter(insert(memory, db, scope, [(texts[n], metas[n], None, times[n]) for n in todo],
                          [keys[n] for n in todo]) if todo else [])
    return [kept[k] if k in kept else next(written) for k in keys]
