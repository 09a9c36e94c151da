"""Consolidation: moving knowledge between levels, and recording where each item sits.

A consolidation of a scope runs in two phases:

1. **Moves**, in one short transaction: the policies' plan (``memplug_plan``), or
   the caller's moves, checked and handed to every tier (``memplug_consolidate``);
   the placements the tiers report are recorded with the reason of each move.
2. **Builds**, outside any transaction: slow work a tier took on in phase 1
   (training an adapter) runs in ``memplug_build``. The tier registers the result
   and its placements in a short transaction of its own, with :func:`record_placements`,
   so a consolidation never holds a transaction open for minutes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import psycopg

from .errors import InvalidInput
from .scoping import check_owned
from .types import Move, Placement, Scope

if TYPE_CHECKING:
    from .memory import Memory

Progress = Callable[[str, int, int, Mapping[str, Any]], None]


def consolidate(memory: Memory, scope: Scope, moves: list[Move] | None, progress: Progress | None) -> list[Placement]:
    """Plan (when ``moves`` is None) and carry out the moves of ``scope``; return every placement reported."""
    memory.flush_measurements()
    if moves is None:
        usage = memory.usage(scope, subtree=True)
        moves = first_move_per_item(_flatten(memory.hook.memplug_plan(memory=memory, scope=scope, usage=usage)))
    if not moves:
        return []
    with memory.store.scoped(scope) as db:
        check_owned(db, scope, sorted({i for m in moves for i in m.item_ids}), visible=False)
        placed = _flatten(memory.hook.memplug_consolidate(memory=memory, scope=scope, moves=moves, db=db,
                                                          progress=progress))
        record_placements(db, placed, {i: m.reason for m in moves for i in m.item_ids})
    built = _flatten(memory.hook.memplug_build(memory=memory, scope=scope, moves=moves, progress=progress))
    for p in built:
        _check_placement(p, "memplug_build")
    return placed + built


def check_moves(levels: Mapping[int, str], moves: Sequence[Move], unavailable: Sequence[Any] = ()) -> None:
    """Refuse a requested move that no tier can make: up to a level no registered tier holds,
    or down from one. Which items a tier then takes or lets go is the tier's business (a tier
    may track items it declined, as the lora tier does, and let them go on a move down)."""
    held = "; ".join(f"{n} {lv}" for lv, n in sorted(levels.items())) or "none"
    missing = {info.level: info for info in unavailable if info.level is not None}
    for m in moves:
        what, level = ("to", m.dst_level) if m.dst_level > m.src_level else ("from", m.src_level)
        if level not in levels:
            why = (f"the {missing[level].name} tier is unavailable ({missing[level].detail})" if level in missing
                   else f"no tier holds it (tiers by level: {held})")
            raise InvalidInput(f"cannot move items {what} level {level}: {why}; nothing was changed")


def record_placements(db: psycopg.Connection, placed: Sequence[Placement],
                      why: Mapping[int, str] | None = None) -> None:
    """Record what tiers report they now hold or gave up, in the caller's transaction.

    Every placement also goes into the item's history (``moves``), with the reason of
    the move behind it (``why``, by item id) when there was one. Items deleted in the
    same transaction are skipped.
    """
    for p in placed:
        _check_placement(p, "a hook")
        if not p.item_ids:
            continue
        groups: dict[str, list[int]] = {}
        for i in p.item_ids:
            move = (why or {}).get(i)
            groups.setdefault(f"{move}: {p.reason}" if move and move != p.reason else p.reason, []).append(i)
        for reason, ids in groups.items():
            db.execute(
                "INSERT INTO moves (item_id, tier, level, held, reason) "
                "SELECT i.id, %s, %s, %s, %s FROM items i WHERE i.id = ANY(%s::bigint[])",
                (p.tier, p.level, p.held, reason, ids),
            )
        if p.held:
            db.execute(
                """
                INSERT INTO placements (item_id, tier, level, reason)
                SELECT i.id, %s, %s, %s FROM items i WHERE i.id = ANY(%s::bigint[])
                ON CONFLICT (item_id, tier) DO UPDATE SET level = EXCLUDED.level,
                    reason = EXCLUDED.reason, placed_at = now()
                """,
                (p.tier, p.level, p.reason, list(p.item_ids)),
            )
        else:
            db.execute("DELETE FROM placements WHERE tier = %s AND item_id = ANY(%s::bigint[])",
                       (p.tier, list(p.item_ids)))


def first_move_per_item(moves: Sequence[Move]) -> list[Move]:
    """The policies' moves with each item in the first move that names it (conflicts keep the first)."""
    seen: set[int] = set()
    out = []
    for m in moves:
        if not isinstance(m, Move):
            raise InvalidInput(f"a memplug_plan hook returned {type(m).__name__}, not a memplug.Move")
        ids = tuple(i for i in m.item_ids if i not in seen)
        if ids:
            seen.update(ids)
            out.append(m if ids == m.item_ids else replace(m, item_ids=ids))
    return out


def _check_placement(p: object, where: str) -> None:
    if not isinstance(p, Placement):
        raise InvalidInput(f"{where} returned {type(p).__name__} where a memplug.Placement was expected")


def _flatten(results: Sequence[Sequence[Any] | None]) -> list[Any]:
    return [x for r in results if r for x in r]
