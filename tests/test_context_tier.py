"""The context tier: recent turns within a token budget, flushed to long-term memory."""

from __future__ import annotations

from memplug import Budget, Scope


def turns(n):
    return [
        {"role": "user" if k % 2 == 0 else "assistant", "content": f"Turn {k}: my favourite number today is {k * 7}."}
        for k in range(n)
    ]


def test_recent_turns_are_returned_in_order(memory, user):
    s = Scope(user, "chat", "s1")
    memory.write_messages(s, turns(4))
    recall = memory.read(s, "what did we talk about", Budget(k=10))
    held = [h for h in recall.hits if h.tier == "context"]
    assert [h.text for h in sorted(held, key=lambda h: h.item.id)] == [t["content"] for t in turns(4)]
    text = recall.as_text()
    assert text.index("Turn 0") < text.index("Turn 3") and "assistant: Turn 1" in text
    # another session of the same user does not see these turns
    assert memory.read(Scope(user, "chat", "s2"), "favourite number").hits == ()


def test_turns_over_the_budget_are_flushed_to_long_term(make_memory, user):
    mem = make_memory(options={"context_tokens": 60})
    s = Scope(user, "chat", "s1")
    written = mem.write_messages(s, turns(10))
    counter = mem.token_counter
    per_turn = [counter.count(t["content"]) for t in turns(10)]
    assert all(it.tokens == n for it, n in zip(written, per_turn, strict=True))

    stats = mem.stats(Scope(user))
    held = stats["items_per_tier"]["context"]
    assert sum(per_turn[-held:]) <= 60 < sum(per_turn[-held - 1:])
    # flushed user turns became knowledge of the scope without the session ...
    long_term = mem.items(Scope(user, "chat"))
    assert {i.text for i in long_term} == {t["content"] for t in turns(10)[: 10 - held] if t["role"] == "user"}
    assert all(i.scope == Scope(user, "chat") and i.role is None for i in long_term)
    assert all(i.metadata["session_id"] == "s1" for i in long_term)
    # ... which a later session finds by search
    hits = mem.read(Scope(user, "chat", "s2"), "favourite number today is 0").hits
    assert hits and hits[0].text.startswith("Turn 0")


def test_end_session_flushes_everything(memory, user):
    s = Scope(user, None, "s9")
    memory.write_messages(s, [("user", "My passport expires in March 2031."), ("assistant", "Noted!")])
    placed = memory.end_session(s)
    assert placed and not placed[0].held
    assert memory.stats(Scope(user))["turns"] == 0
    assert [i.text for i in memory.items(Scope(user))] == ["My passport expires in March 2031."]
    assert memory.end_session(s) == []


def test_idle_sessions_are_flushed_by_consolidation(make_memory, user):
    mem = make_memory(options={"context_idle_seconds": 0})
    s = Scope(user, None, "old")
    mem.write_messages(s, [("user", "I keep my spare key under the blue pot.")])
    mem.consolidate(Scope(user))
    assert [i.text for i in mem.items(Scope(user))] == ["I keep my spare key under the blue pot."]


def test_repeated_turns_are_kept(memory, user):
    s = Scope(user, None, "s1")
    memory.write_messages(s, [("user", "ok"), ("assistant", "ok"), ("user", "ok")])
    assert memory.stats(Scope(user))["turns"] == 3
