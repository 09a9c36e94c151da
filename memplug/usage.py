"""Usage accounting: how often and how recently each item was read, and its decayed heat."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import psycopg

from .types import Scope

# Heat halves every HALF_LIFE seconds without a read; each read adds 1.
DEFAULT_HALF_LIFE_S = 7 * 24 * 3600.0
# The times of an item's last RECENT reads are kept, for windowed policies.
RECENT = 64


@dataclass(frozen=True, slots=True)
class ItemUsage:
    """One item's usage, as policies see it."""

    item_id: int
    level: int
    reads: int
    used: int
    last_read_at: datetime | None
    heat: float
    tokens: int = 0
    created_at: datetime | None = None
    recent: tuple[datetime, ...] = field(default=(), repr=False)  # last reads, oldest first
    scope: Scope | None = None  # the scope the item was written in
    # (level, when) of each time a tier let the item go or would not hold it (held=False placements):
    # a demotion, or an adapter that did not recall it. Policies wait before trying that level again.
    declined: tuple[tuple[int, datetime], ...] = field(default=(), repr=False)

    def reads_within(self, seconds: float, now: datetime) -> int:
        """Reads in the last ``seconds`` before ``now`` (exact up to the last RECENT reads)."""
        since = now - timedelta(seconds=seconds)
        return sum(1 for t in self.recent if t > since)

    def idle_s(self, now: datetime) -> float:
        """Seconds since the last read, or since the item was written if it was never read."""
        last = self.last_read_at or self.created_at
        return (now - last).total_seconds() if last is not None else 0.0

    def declined_within(self, level: int, seconds: float, now: datetime) -> bool:
        """Whether level ``level`` let the item go or declined it in the last ``seconds``."""
        since = now - timedelta(seconds=seconds)
        return any(lv == level and at > since for lv, at in self.declined)

    def rate(self, half_life_s: float) -> float:
        """Reads per second, estimated from heat: a steady rate r holds heat at r * half_life / ln 2."""
        return self.heat * 0.6931471805599453 / half_life_s


def record_reads(db: psycopg.Connection, item_ids: Sequence[int], half_life_s: float) -> None:
    """Count one read of each item (ids are de-duplicated by the caller).

    An item that another transaction is forgetting is waited for, then skipped once that forget commits.
    """
    if not item_ids:
        return
    db.execute(
        """
        INSERT INTO usage AS u (item_id, reads, last_read_at, heat, heat_at, recent)
        SELECT i.id, 1, now(), 1.0, now(), ARRAY[now()] FROM items i WHERE i.id = ANY(%(ids)s::bigint[])
        ORDER BY i.id  -- a fixed lock order keeps concurrent readers from deadlocking
        FOR KEY SHARE  -- the items stay until the count is in; one forgotten meanwhile is not counted
        ON CONFLICT (item_id) DO UPDATE SET
            reads = u.reads + 1,
            recent = (u.recent || now())[greatest(1, cardinality(u.recent) + 2 - %(keep)s):],
            last_read_at = now(),
            heat = u.heat * exp(-ln(2) * extract(epoch FROM now() - u.heat_at) / %(hl)s) + 1.0,
            heat_at = now()
        """,
        {"ids": list(item_ids), "hl": half_life_s, "keep": RECENT},
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
               coalesce(u.heat * exp(-ln(2) * extract(epoch FROM now() - u.heat_at) / %(hl)s), 0),
               i.tokens, i.created_at, coalesce(u.recent, '{{}}'), i.user_id, i.agent_id, i.session_id,
               coalesce(d.levels, '{{}}'), coalesce(d.ats, '{{}}')
        FROM items i
        LEFT JOIN usage u ON u.item_id = i.id
        LEFT JOIN placements p ON p.item_id = i.id
        LEFT JOIN LATERAL (
            SELECT array_agg(m.level ORDER BY m.at) AS levels, array_agg(m.at ORDER BY m.at) AS ats
            FROM moves m WHERE m.item_id = i.id AND NOT m.held AND m.level > 0
        ) d ON true
        WHERE {where}
        GROUP BY i.id, u.reads, u.used, u.last_read_at, u.heat, u.heat_at, u.recent, d.levels, d.ats
        ORDER BY i.id
        """,
        {**params, "hl": half_life_s},
    ).fetchall()
    return [ItemUsage(r[0], r[1], r[2], r[3], r[4], float(r[5]), r[6], r[7], tuple(r[8]),
                      Scope(r[9], r[10] or None, r[11] or None), tuple(zip(r[12], r[13], strict=True)))
            for r in rows]
