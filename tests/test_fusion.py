"""fuse(): the tiers' contributions to a read become one Recall. Pure: no Postgres, no model."""

from __future__ import annotations

import pytest

from memplug import AdapterRef, Budget, Hit, InvalidInput, Item, KVPrefix, Scope
from memplug.fusion import RRF_K, fuse

ALICE = Scope("alice")


def item(i: int, tokens: int = 10, role: str | None = None) -> Item:
    return Item(i, ALICE, f"fact {i}", tokens=tokens, role=role)


def hits(tier: str, *ids: int, tokens: int = 10) -> list[Hit]:
    return [Hit(item(i, tokens), tier, 1.0 / (n + 1)) for n, i in enumerate(ids)]


def prefix(*ids: int, left_out: tuple[int, ...] = ()) -> KVPrefix:
    return KVPrefix("kv", tuple(item(i) for i in ids), 10 * len(ids), "fp", "int4", lambda ids: [],
                    spans=(10,) * len(ids), sizes=(100,) * len(ids), left_out=left_out)


def adapter(*ids: int) -> AdapterRef:
    return AdapterRef("lora", ALICE, 1, "fp", tuple(item(i) for i in ids), "file://x", 1000, lambda: ({}, {}))


def test_reciprocal_rank_fusion_ranks_items_found_by_several_tiers_first():
    recall = fuse(ALICE, "q", [hits("a", 1, 2, 3), hits("b", 3, 4)], Budget(k=10))
    assert [h.item.id for h in recall.hits] == [3, 1, 2, 4]  # 3: 1/63 + 1/61 beats 1's 1/61
    assert recall.tokens == 40 and recall.query == "q" and recall.scope == ALICE
    assert [h.item.id for h in fuse(ALICE, "q", [hits("a", 1, 2), None, []], Budget(k=10)).hits] == [1, 2]
    assert RRF_K == 60


def test_an_item_is_returned_once_with_its_best_scored_hit():
    a = [Hit(item(1), "a", 0.2), Hit(item(1), "a", 0.9)]  # a tier's repeat of an item is ignored
    assert [(h.tier, h.score) for h in fuse(ALICE, "q", [a], Budget()).hits] == [("a", 0.2)]
    recall = fuse(ALICE, "q", [a, [Hit(item(1), "b", 0.5)]], Budget())
    assert [(h.item.id, h.tier, h.score) for h in recall.hits] == [(1, "b", 0.5)]


def test_k_and_the_token_budget_bound_the_text_hits():
    lists = [hits("a", 1, 2, 3, 4, 5)]
    assert [h.item.id for h in fuse(ALICE, "q", lists, Budget(k=2)).hits] == [1, 2]
    big = [Hit(item(1, 10), "a", 1.0), Hit(item(2, 500), "a", 0.5), Hit(item(3, 10), "a", 0.3)]
    recall = fuse(ALICE, "q", [big], Budget(tokens=100, k=10))
    assert [h.item.id for h in recall.hits] == [1, 3] and recall.tokens == 20  # a smaller hit still fits


def test_pinned_hits_come_apart_and_take_no_ranked_place():
    pinned = [Hit(item(9, 5), "profile", 1.0, text="name: Ana", pinned=True)]
    recall = fuse(ALICE, "q", [pinned, hits("a", 1, 2, 3)], Budget(k=2))
    assert [h.item.id for h in recall.pinned] == [9] and [h.item.id for h in recall.hits] == [1, 2]
    assert recall.tokens == 25
    assert [it.id for it in recall.items] == [9, 1, 2]
    assert recall.as_text().splitlines() == ["Relevant memories:", "- name: Ana", "- fact 1", "- fact 2"]
    # Pinned hits spend the token budget first; one that does not fit is left out.
    assert fuse(ALICE, "q", [[Hit(item(9, 500), "p", 1.0, pinned=True)]], Budget(tokens=100)).pinned == ()


def test_items_carried_by_the_kv_prefix_take_their_place_without_tokens():
    recall = fuse(ALICE, "q", [hits("a", 1, 2, 3, 4), [prefix(2, 4)]], Budget(k=3))
    assert [h.item.id for h in recall.hits] == [1, 3] and recall.tokens == 20
    assert [it.id for it in recall.kv.items] == [2]  # 4 is below the top 3: not injected
    # The best-ranked item is injected last, next to the question.
    recall = fuse(ALICE, "q", [hits("a", 1, 2, 3), [prefix(1, 2)]], Budget(k=3))
    assert [it.id for it in recall.kv.items] == [2, 1]


def test_items_the_prefix_leaves_out_keep_their_place_unserved():
    recall = fuse(ALICE, "q", [hits("a", 1, 2, 3, 4), [prefix(1, left_out=(2,))]], Budget(k=3))
    assert [h.item.id for h in recall.hits] == [3] and [it.id for it in recall.kv.items] == [1]


def test_the_adapter_holds_items_that_are_then_neither_text_nor_kv():
    recall = fuse(ALICE, "q", [hits("a", 1, 2, 3), [prefix(1, 2)], [adapter(2)]], Budget(k=3))
    assert [h.item.id for h in recall.covered] == [2] and recall.adapter.version == 1
    assert [it.id for it in recall.kv.items] == [1] and [h.item.id for h in recall.hits] == [3]
    assert "fact 2" in recall.as_text() and "fact 2" not in recall.as_text(adapter_as_text=False)
    # Of several adapters the one holding most items wins.
    assert fuse(ALICE, "q", [[adapter(1)], [adapter(1, 2)]], Budget()).adapter.items[1].id == 2


def test_turns_are_written_after_knowledge_in_the_order_they_happened():
    turns = [Hit(item(5, role="user"), "context", 1.0), Hit(item(4, role="assistant"), "context", 0.5)]
    text = fuse(ALICE, "q", [turns, hits("a", 1)], Budget()).as_text()
    assert text.split("\n\n")[1].splitlines() == ["Recent conversation:", "assistant: fact 4", "user: fact 5"]


def test_anything_else_from_a_tier_is_refused():
    with pytest.raises(InvalidInput, match="returned str, not a memplug.Hit"):
        fuse(ALICE, "q", [["not a hit"]], Budget())
