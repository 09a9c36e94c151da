"""The built-in promotion policies: plugins that implement ``memplug_plan`` like any other.

Both are registered by entry point; the ``policy`` setting picks the one that
plans (``cost``, the default, ``frequency``, or ``none`` to leave planning to
a third-party policy). Levels: 1 text (RAG), 2 explicit KV, 3 weights.

- :class:`FrequencyPolicy` works on thresholds over the usage history.
- :class:`CostPolicy` puts each item at the level with the least expected cost,
  from the read and write costs each tier measured on this deployment
  (``memplug_costs``) and the reads predicted from the item's heat.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from .plugin import ItemUsage, Move, Option, Scope, TierCost, hookimpl

TEXT, KV, WEIGHTS = 1, 2, 3
DAY = 24 * 3600.0
# The local model's prefill per prompt token before one was measured (SmolLM2-135M, 2 CPU cores).
PREFILL_MS_PRIOR = 1.5

POLICIES = ("cost", "frequency", "none")  # the ``policy`` option: the built-in policy that plans, or none
# Declared by both policies (the same declarations).
SHARED = (
    Option("policy", str, "cost", "The built-in policy that plans moves; none leaves planning to "
           "third-party policy plugins.", choices=POLICIES),
    Option("demote_idle_s", float, 30 * DAY, "Seconds without a read before an item may move down a level.",
           gt=0),
)


def _selected(memory, name: str) -> bool:
    return memory.option("policy") == name


def _movable(usage: Sequence[ItemUsage]) -> list[ItemUsage]:
    """Long-term items: level 0 is the context buffer, whose tier moves its own turns."""
    return [u for u in usage if u.level >= TEXT]


@dataclass(frozen=True)
class FrequencyThresholds:
    promote_reads: int = 3  # reads within promote_window_s promote an item to explicit KV
    promote_window_s: float = 24 * 3600.0
    weights_reads: int = 8  # reads within weights_window_s make an item a weights candidate
    weights_window_s: float = 7 * 24 * 3600.0
    weights_min_items: int = 5  # ... once the scope has this many new candidates (a retrain is costly)
    demote_idle_s: float = 30 * 24 * 3600.0  # unread for this long: one level down


class FrequencyPolicy:
    """Thresholds: N reads within W promote to KV; sustained reads over a longer window, with
    at least M such items in a scope, promote to weights; idle for D demotes one level."""

    name = "frequency"
    options = SHARED + (
        Option("freq_promote_reads", int, 3, "Reads within freq_promote_window_s that promote an item to "
               "explicit KV memory.", min=1),
        Option("freq_promote_window_s", float, DAY, "The window of freq_promote_reads, in seconds.", gt=0),
        Option("freq_weights_reads", int, 8, "Reads within freq_weights_window_s that make an item a candidate "
               "for the weights.", min=1),
        Option("freq_weights_window_s", float, 7 * DAY, "The window of freq_weights_reads, in seconds.", gt=0),
        Option("freq_weights_min_items", int, 5, "New candidates a scope needs before its adapter is retrained.",
               min=1),
    )

    def __init__(self, thresholds: FrequencyThresholds | None = None) -> None:
        self.thresholds = thresholds
        self.active = True

    @hookimpl
    def memplug_configure(self, memory):
        self.active = _selected(memory, self.name)
        if self.thresholds is None:
            self.thresholds = FrequencyThresholds(
                promote_reads=memory.option("freq_promote_reads"),
                promote_window_s=memory.option("freq_promote_window_s"),
                weights_reads=memory.option("freq_weights_reads"),
                weights_window_s=memory.option("freq_weights_window_s"),
                weights_min_items=memory.option("freq_weights_min_items"),
                demote_idle_s=memory.option("demote_idle_s"),
            )

    @hookimpl
    def memplug_plan(self, memory, scope, usage):
        if not self.active:
            return None
        return self.plan(usage, datetime.now(UTC), set(memory.plugins.levels()))

    def plan(self, usage: Sequence[ItemUsage], now: datetime, levels: set[int] | None = None) -> list[Move]:
        """The moves for ``usage``; with ``levels``, only moves up to levels some tier holds."""
        t = self.thresholds or FrequencyThresholds()
        to_kv = levels is None or KV in levels
        to_weights = levels is None or WEIGHTS in levels
        idle = {u.item_id for u in _movable(usage) if u.level > TEXT and u.idle_s(now) >= t.demote_idle_s}
        candidates: dict[Scope | None, list[int]] = defaultdict(list)
        for u in _movable(usage):
            if (u.item_id not in idle and u.level < WEIGHTS and u.reads_within(t.weights_window_s, now) >= t.weights_reads
                    and not u.declined_within(WEIGHTS, t.weights_window_s, now)):  # an adapter did not hold it
                candidates[u.scope].append(u.item_id)
        # A retrain is costly: it waits until a scope has weights_min_items new candidates.
        weights = {i for ids in candidates.values() if len(ids) >= t.weights_min_items for i in ids}
        hot = f"{t.promote_reads}+ reads in {_span(t.promote_window_s)}"
        sustained = f"{t.weights_reads}+ reads in {_span(t.weights_window_s)}"
        cold = f"idle for {_span(t.demote_idle_s)}"
        moves: dict[tuple[int, int, str], list[int]] = defaultdict(list)
        for u in _movable(usage):
            if u.item_id in idle:
                moves[(u.level, u.level - 1, cold)].append(u.item_id)
            elif u.item_id in weights and to_weights:
                moves[(u.level, WEIGHTS, sustained)].append(u.item_id)
            elif to_kv and u.level < KV and u.reads_within(t.promote_window_s, now) >= t.promote_reads:
                moves[(u.level, KV, hot)].append(u.item_id)
        return [Move(tuple(ids), src, dst, reason) for (src, dst, reason), ids in sorted(moves.items())]


def _span(seconds: float) -> str:
    for unit, n in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= n:
            return f"{seconds / n:g} {unit}"
    return f"{seconds:g} s"


class CostPolicy:
    """Each item at the level with the least expected cost over the planning horizon:
    ``predicted reads x read cost(level) + write cost(level)`` (no write cost where it already is).

    Costs are in milliseconds of this deployment: a prompt token costs what the
    local model's prefill measured (``token_ms`` overrides it, e.g. to price an
    API model's tokens), and each tier reports its own measured read and write
    costs through ``memplug_costs``. Predicted reads come from the item's heat. Budgets
    per scope: ``max_kv_bytes`` and ``max_retrains_per_day``. An item read less
    than ``demote_idle_s`` ago is never demoted, so a hot item does not flap.
    """

    name = "cost"
    options = SHARED + (
        Option("cost_horizon_s", float, None, "Seconds of predicted reads an item's placement is priced over "
               "(unset: heat_half_life_s).", gt=0),
        Option("max_kv_bytes", int, 64 * 2**20, "Bytes of explicit KV memory one scope may hold.", gt=0),
        Option("max_retrains_per_day", float, 4.0, "Adapter retrains one scope may start per day.", gt=0),
        Option("token_ms", float, 0.0, "The price of one prompt token in ms (e.g. of an API model); 0 prices it "
               "at the local model's measured prefill.", min=0),
    )

    def __init__(self) -> None:
        self.active = True
        self.horizon_s = 7 * DAY
        self.demote_idle_s = 30 * DAY
        self.max_kv_bytes = 64 * 2**20
        self.max_retrains = 4.0
        self.half_life_s = 7 * DAY
        self.token_ms: float | None = None

    @hookimpl
    def memplug_configure(self, memory):
        self.active = _selected(memory, self.name)
        self.half_life_s = memory.half_life_s
        self.horizon_s = memory.option("cost_horizon_s") or memory.half_life_s
        self.demote_idle_s = memory.option("demote_idle_s")
        self.max_kv_bytes = memory.option("max_kv_bytes")
        self.max_retrains = memory.option("max_retrains_per_day")
        self.token_ms = memory.option("token_ms") or None

    @hookimpl
    def memplug_plan(self, memory, scope, usage):
        if not self.active:
            return None
        movable = _movable(usage)
        if not movable:
            return None
        costs = _flatten(memory.hook.memplug_costs(memory=memory, scope=scope) or [])
        token_ms = self.token_ms
        if token_ms is None:
            token_ms = memory.measured("model").get("prefill_ms_per_token", (PREFILL_MS_PRIOR, 0))[0]
        return self.plan(movable, costs, datetime.now(UTC), token_ms)

    def plan(self, usage: Sequence[ItemUsage], costs: Sequence[TierCost], now: datetime,
             token_ms: float = PREFILL_MS_PRIOR) -> list[Move]:
        """The moves for ``usage``, given the tiers' ``costs`` and the price of a prompt token in ms."""
        by_level = {c.level: c for c in costs}
        if TEXT not in by_level:
            return []
        moves: dict[tuple[int, int, str], list[int]] = defaultdict(list)
        for items in _by_scope(usage).values():
            choice, forced = self._choose(items, by_level, token_ms, now)
            for u in items:
                dst = choice.get(u.item_id, u.level)
                if dst == u.level:
                    continue
                if dst < u.level and u.idle_s(now) < self.demote_idle_s and u.item_id not in forced:
                    continue
                reason = (f"cheaper at level {dst} over {_span(self.horizon_s)}" if dst > u.level
                          else "over the scope's KV budget" if u.item_id in forced
                          else f"idle for {_span(self.demote_idle_s)}, cheaper at level {dst}")
                moves[(u.level, dst, reason)].append(u.item_id)
        return [Move(tuple(ids), src, dst, reason) for (src, dst, reason), ids in sorted(moves.items())]

    def _reads(self, u: ItemUsage) -> float:
        return u.rate(self.half_life_s) * self.horizon_s

    def _choose(self, items: list[ItemUsage], by_level: dict[int, TierCost],
                token_ms: float, now: datetime) -> tuple[dict[int, int], set[int]]:
        """The cheapest placement of a scope's items, within its KV budget and retrain budget,
        and the items the KV budget pushes out of KV.

        Text and KV are priced per item. The KV budget keeps the items with the most
        saving per byte. Weights are priced per scope, since one retrain serves them
        all: the n items that gain most from weights go there, for the n that makes
        the scope's total cost least. When the KV budget binds, moving the hottest
        items to the weights frees KV for the next ones: text -> KV -> weights by heat.
        """
        def read(level: int, u: ItemUsage) -> float:
            c = by_level[level]
            return c.read_ms + u.tokens * (c.read_ms_per_token + c.prompt_tokens_per_token * token_ms)

        def write(level: int, u: ItemUsage) -> float:
            c = by_level[level]
            return 0.0 if u.level == level else c.write_ms + u.tokens * c.write_ms_per_token

        kv = by_level.get(KV)
        cost: dict[int, dict[int, float]] = {}
        for u in items:
            reads = self._reads(u)
            cost[u.item_id] = {lv: reads * read(lv, u) + (write(lv, u) if lv != WEIGHTS else 0.0)
                               for lv in (TEXT, KV, WEIGHTS) if lv in by_level}
        # KV is filled in this order, best saving per byte first.
        order = sorted(items, key=lambda u: (-(cost[u.item_id][TEXT] - cost[u.item_id].get(KV, math.inf))
                                             / max(1.0, u.tokens * (kv.bytes_per_token if kv else 1.0)), u.item_id))

        def fill(skip: set[int]) -> tuple[dict[int, int], float, set[int]]:
            choice, total, forced, spent = {}, 0.0, set(), 0.0
            for u in order:
                if u.item_id in skip:
                    continue
                c = cost[u.item_id]
                lv = KV if KV in c and c[KV] < c[TEXT] else TEXT
                if lv == KV:
                    size = u.tokens * kv.bytes_per_token
                    if spent + size > self.max_kv_bytes:
                        lv = TEXT
                        if u.level == KV:
                            forced.add(u.item_id)
                    else:
                        spent += size
                choice[u.item_id] = lv
                total += c[lv]
            return choice, total, forced

        w = by_level.get(WEIGHTS)
        held = [u for u in items if u.level == WEIGHTS] if w is not None else []
        kept = {u.item_id for u in held if cost[u.item_id][WEIGHTS] <= min(cost[u.item_id][TEXT],
                                                                         cost[u.item_id].get(KV, math.inf))}
        choice, best_total, forced = fill(kept)
        if w is not None and w.writes_24h < self.max_retrains:
            new = [u for u in items if u.level != WEIGHTS and cost[u.item_id][WEIGHTS] < cost[u.item_id][TEXT]
                   and not u.declined_within(WEIGHTS, 86400.0, now)]  # not retried within a day
            new.sort(key=lambda u: (-(cost[u.item_id][TEXT] - cost[u.item_id][WEIGHTS]), u.item_id))
            weights_cost = 0.0
            for n, u in enumerate(new, start=1):
                weights_cost += cost[u.item_id][WEIGHTS]
                chosen = {x.item_id for x in new[:n]}
                c, total, f = fill(kept | chosen)
                total += weights_cost + w.write_ms + w.write_ms_per_item * (len(held) + n)
                if total < best_total:
                    best_total, choice, forced = total, {**c, **dict.fromkeys(chosen, WEIGHTS)}, f
        for i in kept:
            choice[i] = WEIGHTS
        return choice, forced


def _by_scope(usage: Sequence[ItemUsage]) -> dict[Scope | None, list[ItemUsage]]:
    out: dict[Scope | None, list[ItemUsage]] = defaultdict(list)
    for u in usage:
        out[u.scope].append(u)
    return out


def _flatten(results) -> list[TierCost]:
    out = []
    for r in results:
        if isinstance(r, TierCost):
            out.append(r)
        elif r:
            out.extend(x for x in r if isinstance(x, TierCost))
    return out

