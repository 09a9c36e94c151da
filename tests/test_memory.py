"""Write, read and forget through the public API, on the real Postgres and embedder."""

from __future__ import annotations

import asyncio

import pytest

from memplug import Budget, Item, NotFound, Recall, Scope


def test_round_trip(memory, user):
    s = Scope(user)
    item = memory.write(s, "I moved to Lisbon in May.", metadata={"source": "chat"})
    assert isinstance(item, Item) and item.id > 0 and item.tokens > 0
    assert item.metadata == {"source": "chat"} and item.scope == s

    memory.write(s, ["My dog is called Pickles.", "I work at Corvana Labs as a UX designer."])
    recall = memory.read(s, "Which city does the user live in?", budget=Budget(tokens=512))
    assert isinstance(recall, Recall)
    assert recall.hits[0].item.id == item.id
    assert "Lisbon" in recall.as_text()
    assert recall.tokens == sum(h.item.tokens for h in recall.hits)

    assert memory.forget(s, item_ids=[item.id]) == 1
    assert all(h.item.id != item.id for h in memory.read(s, "Lisbon").hits)
    assert memory.forget(s) == 2
    assert memory.read(s, "anything about the user").hits == ()


def test_identical_text_is_stored_once(memory, user):
    s = Scope(user)
    a = memory.write(s, "My locker code is ZQ-7741-B.")
    b = memory.write(s, "My locker code is ZQ-7741-B.", metadata={"again": True})
    batch = memory.write(s, ["My locker code is ZQ-7741-B.", "Something else.", "Something else."])
    assert a.id == b.id == batch[0].id
    assert batch[1].id == batch[2].id
    assert memory.stats(s)["items"] == 2
    # the same text in another scope is a different item
    assert memory.write(Scope(user, "helper"), "My locker code is ZQ-7741-B.").id != a.id


def test_budget_limits_tokens_and_count(memory, user):
    s = Scope(user)
    memory.write(s, [f"Fact number {n}: the user visited city {n} in spring." for n in range(12)])
    recall = memory.read(s, "Which cities did the user visit?", Budget(tokens=40, k=10))
    assert 0 < recall.tokens <= 40
    assert memory.read(s, "cities", Budget(tokens=4096, k=3)).hits.__len__() == 3


def test_every_returned_item_is_counted_as_read(memory, user):
    s = Scope(user)
    items = memory.write(s, ["Alice likes green tea.", "Alice plays the cello."])
    recall = memory.read(s, "What does Alice drink?", Budget(k=1))
    memory.read(s, "What does Alice drink?", Budget(k=1))
    usage = {u.item_id: u for u in memory.usage(s)}
    top = recall.hits[0].item.id
    assert usage[top].reads == 2 and usage[top].last_read_at is not None and usage[top].heat > 1.9
    other = next(i.id for i in items if i.id != top)
    assert usage[other].reads == 0
    memory.feedback(s, [top])
    assert {u.item_id: u for u in memory.usage(s)}[top].used == 1


def test_metadata_filters(memory, user):
    s = Scope(user)
    memory.write(s, "Meeting with the dentist on Friday.", metadata={"source": "calendar", "kind": "event"})
    memory.write(s, "The dentist said to floss more.", metadata={"source": "chat"})
    hits = memory.read(s, "dentist", filters={"source": "calendar"}).hits
    assert [h.text for h in hits] == ["Meeting with the dentist on Friday."]
    assert memory.read(s, "dentist", filters={"source": "email"}).hits == ()
    nested = memory.read(s, "dentist", filters={"source": "calendar", "kind": "event"}).hits
    assert len(nested) == 1


def test_scope_sees_itself_and_its_ancestors(memory, user):
    memory.write(Scope(user), "User-level: prefers metric units.")
    memory.write(Scope(user, "travel"), "Agent-level: likes window seats.")
    memory.write(Scope(user, "travel", "s1"), "Session-level: booking a flight to Oslo.")
    memory.write(Scope(user, "cooking"), "Other agent: bakes sourdough.")

    def texts(scope):
        return {h.text for h in memory.read(scope, "what does the user like", Budget(k=20)).hits}

    assert texts(Scope(user)) == {"User-level: prefers metric units."}
    assert texts(Scope(user, "travel")) == {"User-level: prefers metric units.", "Agent-level: likes window seats."}
    assert len(texts(Scope(user, "travel", "s1"))) == 3
    assert "Other agent: bakes sourdough." not in texts(Scope(user, "travel", "s1"))
    # forgetting an agent scope removes it and its sessions, nothing above or beside it
    assert memory.forget(Scope(user, "travel")) == 2
    assert memory.stats(Scope(user))["items"] == 2


def test_forget_ids_outside_the_scope_changes_nothing(memory, users):
    alice, bob = users(2)
    a = memory.write(Scope(alice), "Alice's secret: the vault code is 1234.")
    b = memory.write(Scope(bob), "Bob's note.")
    with pytest.raises(NotFound, match=str(a.id)):
        memory.forget(Scope(bob), [b.id, a.id])
    assert memory.stats(Scope(bob))["items"] == 1
    assert memory.stats(Scope(alice))["items"] == 1
    with pytest.raises(NotFound):
        memory.get(Scope(bob), [a.id])


def test_async_facade(memory, user):
    s = Scope(user)

    async def go():
        item = await memory.awrite(s, "Async fact: the user's bike is red.")
        turns = await memory.awrite_messages(Scope(user, session_id="s1"), [{"role": "user", "content": "hi"}])
        recall = await memory.aread(s, "bike colour")
        both = await asyncio.gather(memory.aread(s, "bike"), memory.aread(s, "red"))
        n = await memory.aforget(s)
        return item, turns, recall, both, n

    item, turns, recall, both, n = asyncio.run(go())
    assert recall.hits[0].item.id == item.id
    assert all(r.hits for r in both)
    assert len(turns) == 1 and n == 2


def test_items_and_get(memory, user):
    s = Scope(user)
    written = memory.write(s, ["one fact", "two facts", "three facts"])
    assert [i.text for i in memory.items(s)] == ["one fact", "two facts", "three facts"]
    assert memory.get(s, [written[1].id])[0].text == "two facts"


def fake_explicit_tier(held, left_out=()):
    """A level-2 tier whose prefix carries ``held`` (and leaves out ``left_out``), whatever the query."""
    from memplug import KVPrefix, hookimpl

    class FakeExplicitTier:
        name, level = "fake-kv", 2

        @hookimpl
        def memplug_read(self, memory, scope, query, budget, filters, db):
            [item] = memory.get(scope, [held.id])
            return [KVPrefix(self.name, (item,), 9, "fp", "int4", lambda ids: [], left_out=tuple(left_out))]
    return FakeExplicitTier()


def test_items_in_a_kv_prefix_are_not_repeated_as_text(make_memory, user):
    mem = make_memory()
    held, other = mem.write(user, ["Ada keeps bees on the roof.", "Ada's bees make heather honey."])
    mem.register(fake_explicit_tier(held))
    recall = mem.read(user, "Ada bees")
    assert [it.id for it in recall.kv.items] == [held.id]
    assert [h.item.id for h in recall.hits] == [other.id]
    assert {it.id for it in recall.items} == {held.id, other.id}
    assert "roof" in recall.as_text() and "roof" not in recall.as_text(kv_as_text=False)
    assert {u.item_id: u.reads for u in mem.usage(user)} == {held.id: 1, other.id: 1}


def test_items_a_kv_prefix_leaves_out_are_served_neither_as_kv_nor_as_text(make_memory, user):
    mem = make_memory()
    held, near, other = mem.write(user, ["Ada keeps bees on the roof.", "Ada's bees make heather honey.",
                                         "Ada's sister lives in Lisbon."])
    mem.register(fake_explicit_tier(held, left_out=[near.id]))
    recall = mem.read(user, "Ada's bees: honey, roof", Budget(k=3))
    assert [it.id for it in recall.kv.items] == [held.id]
    assert near.id not in {it.id for it in recall.items}
    assert [h.item.id for h in recall.hits] == [other.id]
    assert near.id not in {u.item_id for u in mem.usage(user) if u.reads}
    # Its place among the k best is not filled from further down: with k=2, only the prefix is served.
    assert not mem.read(user, "Ada's bees: honey, roof", Budget(k=2)).hits


def test_a_read_leaves_torch_with_the_threads_it_had(memory, user):
    """The embedder encodes a query on one thread; the local model's work after it keeps them all."""
    import torch

    memory.write(user, "Ada keeps her bicycle in the hall.")
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        memory.read(user, "Where is Ada's bicycle?")
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
