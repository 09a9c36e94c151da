"""After forget, a scan of every table of the memplug schema and of the artifact store finds no trace.

The scan (:func:`memplug.testing.find_traces`) knows no tier's tables: it reads the
catalog. Each test first shows that the scan finds the items while they are kept,
so an empty scan after forget means something.
"""

from __future__ import annotations

import pytest

from memplug import Move, Scope, Settings
from memplug.testing import find_traces

FACTS = [
    "Quillon Dray keeps a spare key to the Harrowgate studio under the third flowerpot.",
    "The Velmora account number of Ostrid Paake is 5527-1180-93.",
    "Brisa Tallou's daughter is allergic to cashews and sesame.",
    "The boiler at 14 Ferncombe Lane was last serviced by Kettering Heat in March.",
]


def places(traces):
    """Where traces were found: ``table items.text``, ``artifact`` (any file)..."""
    return {t.where if t.where.startswith("table") else "artifact" for t in traces}


def use(mem, scope, items):
    """Read, give feedback and store keyed documents, so usage and placements rows exist."""
    for it in items:
        recall = mem.read(scope, it.text)
        assert it.id in {x.id for x in recall.items}
    mem.feedback(scope, [it.id for it in items])


def test_forget_leaves_no_trace_in_text_tiers(memory, users):
    alice, bob = users(2)
    items = memory.write(alice, FACTS)
    keyed = memory.put(alice, ["doc-1"], ["Zandor Fleck's passport expires on 2031-04-09."],
                       [{"owner": "Zandor Fleck's passport"}])
    chat = Scope(alice, "helper", "s1")
    turns = memory.write_messages(chat, [{"role": "user", "content": "My locker at Pellham gym is number 4471."},
                                         {"role": "assistant", "content": "Noted: Pellham gym locker 4471."}])
    kept_by_bob = memory.write(bob, FACTS[0])  # the same words, another user's own copy
    use(memory, alice, items + keyed)

    everything = items + keyed + turns
    found = places(find_traces(memory, everything))
    assert {"table items.id", "table items.text", "table items.content_hash", "table usage.item_id",
            "table placements.item_id", "table moves.item_id", "table pgvector_items.item_id",
            "table pgvector_items.embedding", "table context_turns.item_id"} <= found, found

    memory.forget(alice, [items[1].id, keyed[0].id])
    assert find_traces(memory, [items[1], keyed[0]]) == []
    assert find_traces(memory, [items[0]]), "the scan no longer sees a kept item"

    memory.forget(alice)  # alice and every scope under her
    assert find_traces(memory, everything, scope=Scope(alice)) == []
    assert memory.get(bob, [kept_by_bob.id])[0].text == FACTS[0]


@pytest.fixture
def kv_memory(make_memory, tmp_path):
    return make_memory(settings=Settings(plugins="context,pgvector,kv"),
                       options={"artifacts": str(tmp_path / "artifacts")})


def test_forget_leaves_no_trace_of_kv_memory(kv_memory, users):
    """With explicit memory (the real SmolLM2 encodes the KV blobs)."""
    mem = kv_memory
    alice, bob = users(2)
    items = mem.write(alice, FACTS)
    theirs = mem.write(bob, ["Bob's bicycle is kept in the Ferncombe Lane shed."])
    use(mem, alice, items)
    mem.consolidate(alice, [Move(tuple(it.id for it in items[:3]), 1, 2, "test")])
    mem.consolidate(bob, [Move((theirs[0].id,), 1, 2, "test")])
    assert mem.read(alice, FACTS[0]).kv is not None

    traces = find_traces(mem, items, scope=Scope(alice))
    found = places(traces)
    assert {"table kv_items.item_id", "table kv_items.embedding", "artifact"} <= found, found
    assert any("safetensors header names item id" in t.what for t in traces)  # the scope's pack

    # One item with a KV blob, one without.
    mem.forget(alice, [items[0].id, items[3].id])
    assert find_traces(mem, [items[0], items[3]]) == []
    assert places(find_traces(mem, items[1:3])) >= {"table kv_items.item_id", "artifact"}

    mem.forget(alice)
    assert find_traces(mem, items, scope=Scope(alice)) == []
    assert mem.read(bob, theirs[0].text).kv is not None  # bob's explicit memory is untouched
    assert places(find_traces(mem, theirs)) >= {"table kv_items.item_id", "artifact"}
