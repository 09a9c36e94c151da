"""Fusing the tiers' contributions to a read into one :class:`~memplug.Recall`. Pure: no I/O.

Each tier returns a ranked list (:class:`~memplug.Hit`), an explicit-memory
prefix (:class:`~memplug.KVPrefix`) or an adapter (:class:`~memplug.AdapterRef`).
:func:`fuse` merges the ranked lists by reciprocal rank, keeps one prefix and
one adapter, returns each item once, and takes the ``budget.k`` best items
whichever tier serves them: text while it fits ``budget.tokens``, while an
item carried by the prefix or held by the adapter takes its place without
prompt tokens. Pinned hits (a profile, standing instructions) are served first,
in their tier's order, within the token budget, and never take a ranked place.
"""

from __future__ import annotations

from collections.abc import Iterable

from .errors import InvalidInput
from .types import AdapterRef, Budget, Hit, KVPrefix, Recall, Scope, Window

# Reciprocal rank fusion constant (Cormack et al., 2009).
RRF_K = 60

Contribution = Hit | KVPrefix | AdapterRef


def fuse(scope: Scope, query: str, lists: Iterable[Iterable[Contribution] | None], budget: Budget,
         window: Window | None = None, min_relevance: float | None = None) -> Recall:
    """The recall of ``query`` in ``scope`` from the tiers' ``lists``, within ``budget``.

    With a ``window``, items it does not hold are dropped and no adapter is applied
    (weights cannot leave out what happened outside the range). Ranked hits whose
    ``relevance`` is below ``min_relevance`` are dropped (hits without one are kept).
    """
    ranked_by_tier: dict[str, list[Hit]] = {}
    prefixes: list[KVPrefix] = []
    adapters: list[AdapterRef] = []
    pinned: list[Hit] = []
    for contribution in (c for part in lists if part for c in part):
        if isinstance(contribution, KVPrefix):
            prefixes.append(contribution)
        elif isinstance(contribution, AdapterRef):
            adapters.append(contribution)
        elif not isinstance(contribution, Hit):
            raise InvalidInput(f"a memplug_read hook returned {type(contribution).__name__}, not a memplug.Hit")
        elif window is not None and not window.holds(contribution.item) or (min_relevance is not None and not contribution.pinned and contribution.relevance is not None
              and contribution.relevance < min_relevance):
            continue
        elif contribution.pinned:
            pinned.append(contribution)
        else:
            ranked_by_tier.setdefault(contribution.tier, []).append(contribution)

    if window is not None:
        adapters = []
        prefixes = [p for p in (p.without([it.id for it in p.items if not window.holds(it)]) for p in prefixes) if p]
    # One adapter is applied (the one holding most items): what it holds is not repeated.
    adapter = max(adapters, key=lambda a: (len(a.items), a.tier), default=None)
    held = {it.id for it in adapter.items} if adapter else set()
    # One prefix is injected (the largest); an item it carries is not repeated as text.
    kv = max(prefixes, key=lambda p: (len(p.items), p.tier), default=None)
    if kv is not None:
        kv = kv.without(held) if kv.items else None
    served = {it.id for it in kv.items} if kv else set()
    left_out = set(kv.left_out) - held - served if kv else set()

    scores, best = _reciprocal_ranks(ranked_by_tier.values())

    spent = 0
    first: list[Hit] = []
    placed: set[int] = set()
    for hit in pinned:
        if hit.item.id not in placed and spent + hit.item.tokens <= budget.tokens:
            first.append(hit)
            placed.add(hit.item.id)
            spent += hit.item.tokens

    # The top k items, whichever tier serves them: an item held by the adapter or carried by the
    # KV prefix takes its slot without prompt tokens.
    out: list[Hit] = []
    covered: list[Hit] = []
    injected: set[int] = set()
    ranked = [i for i in sorted(scores, key=lambda i: (-scores[i], i)) if i not in placed]
    passed = 0  # items left out by the KV prefix: they keep their place, unserved, not filled from below
    for item_id in ranked:
        if len(out) + len(covered) + len(injected) + passed >= budget.k:
            break
        hit = best[item_id]
        if item_id in left_out:
            passed += 1
        elif item_id in held:
            covered.append(hit)  # no prompt tokens; kept for a model that needs them as text
        elif item_id in served:
            injected.add(item_id)
        elif spent + hit.item.tokens <= budget.tokens:
            out.append(hit)  # a smaller hit further down may still fit after a skip
            spent += hit.item.tokens
    if kv is not None and scores:
        kv = kv.without(served - injected)  # KV items outside the top k are not injected
        if kv is not None:
            # The best-ranked item goes last, next to the question: chunks encoded apart are
            # told apart worse than text, and the nearest one is read best.
            rank = {i: n for n, i in enumerate(ranked)}
            kv = kv.ordered(sorted((it.id for it in kv.items), key=lambda i: -rank[i]))
    return Recall(scope=scope, query=query, hits=tuple(out), tokens=spent, kv=kv, adapter=adapter,
                  covered=tuple(covered), pinned=tuple(first))


def _reciprocal_ranks(lists: Iterable[list[Hit]]) -> tuple[dict[int, float], dict[int, Hit]]:
    """Each item's summed ``1 / (RRF_K + rank)`` over the lists, and its best-scored hit."""
    scores: dict[int, float] = {}
    best: dict[int, Hit] = {}
    for hits in lists:
        seen: set[int] = set()
        for rank, hit in enumerate(hits, start=1):
            item_id = hit.item.id
            if item_id in seen:
                continue
            seen.add(item_id)
            scores[item_id] = scores.get(item_id, 0.0) + 1.0 / (RRF_K + rank)
            if item_id not in best or hit.score > best[item_id].score:
                best[item_id] = hit
    return scores, best
