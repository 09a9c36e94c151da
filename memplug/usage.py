"""Usage accounting: how often and how recently each item was read, and its decayed heat."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import psycopg

# Heat halves every HALF_LIFE seconds without a read; each read adds 1.
DEFAULT_HALF_LIFE_S = 7 * 24 * 3600.0


@dataclass(frozen=True, slots=True)
class ItemUsage:
    """One item's usage, as policies see it."""

    item_id: int
    level: int
    reads: int
    used: int
    last_read_at: datetime | None
    heat: float


def record_reads(db: psycopg.Connection, item_ids: Sequence[int], half_life_s: float) -> None:
    """Count one read of each item (ids are de-duplicated by the caller)."""
    if not item_ids:
        return
    db.execute(
        """
        INSERT INTO usage AS u (item_id, reads, last_read_at, heat, heat_at)
        SELECT id, 1, now(), 1.0, now() FROM unnest(%(ids)s::bigint[]) AS t(id)
        ORDER BY id  -- a fixed lock order keeps concurrent readers from deadlocking
        ON CONFLICT (item_id) DO UPDATE SET
            reads = u.reads + 1,
            last_read_at = now(),
            heat = u.heat * exp(-ln(2) * extract(epoch FROM now() - u.heat_at) / %(hl)s) + 1.0,
            heat_at = now()
        """,
        {"ids": list(item_ids), "hl": half_life_s},
    )


def record_feedback(db: psycopg.Connection, item_ids: Sequence[int]) -> None:
    """Count that the caller actually used these items in an answer."""
    db.execute(
        "UPDATE usage SET used = used + 1 WHERE item_id = ANY(%s::bigint[])",
        (list(item_ids),),
    )


def scope_usage(db: psycopg.Connection, where: str, params: dict, half_life_s: float) -> list[ItemUsage]:
    """Usage of the items matching ``where`` (a filter on ``items i``), heat decayed to now."""
    rows = db.execute(
        f"""
        SELECT i.id, coalesce(max(p.level), -1), coalesce(u.reads, 0), coalesce(u.used, 0), u.last_read_at,
               coalesce(u.heat * exp(-ln(2) * extract(epoch FROM now() - u.heat_at) / %(hl)s), 0)
        FROM items i
        LEFT JOIN usage u ON u.item_id = i.id
        LEFT JOIN placements p ON p.item_id = i.id
        WHERE {where}
        GROUP BY i.id, u.reads, u.used, u.last_read_at, u.heat, u.heat_at
        ORDER BY i.id
        """,
        {**params, "hl": half_life_s},
    ).fetchall()
    return [ItemUsage(r[0], r[1], r[2], r[3], r[4], float(r[5])) for r in rows]
