"""The kv tier end to end: real Postgres, real MiniLM, real SmolLM2-135M."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
import torch

from memplug import ArtifactCorrupt, Budget, KVPrefix, Move, Settings
from memplug_kv.encode import encode as encode_items

FACTS = [
    "Zorbul Quenti lives in the city of Marrakesh.",
    "The access code for the Tamsin lab is 4471.",
    "Ilse Varga's favourite instrument is the oboe.",
]


@pytest.fixture
def kv_memory(make_memory, tmp_path):
    return make_memory(settings=Settings(plugins="context,pgvector,kv"),
                       options={"artifacts": str(tmp_path / "artifacts")})


def promote(mem, scope, items):
    return mem.consolidate(scope, [Move(tuple(it.id for it in items), 1, 2, "test")])


def test_promoted_items_are_read_as_kv_and_not_repeated_as_text(kv_memory, user):
    items = kv_memory.write(user, FACTS)
    placed = promote(kv_memory, user, items[:2])
    assert [(p.tier, p.level, sorted(p.item_ids)) for p in placed] == [("kv", 2, sorted(i.id for i in items[:2]))]

    recall = kv_memory.read(user, "What is the access code for the Tamsin lab?")
    assert isinstance(recall.kv, KVPrefix)
    assert items[1].id in {it.id for it in recall.kv.items}
    assert not {h.item.id for h in recall.hits} & {it.id for it in recall.kv.items}
    assert recall.kv.fingerprint == kv_memory.model.fingerprint
    assert "4471" in recall.as_text() and "4471" not in recall.as_text(kv_as_text=False)
    # Served items count as read, like text hits.
    usage = {u.item_id: u for u in kv_memory.usage(user)}
    assert usage[items[1].id].reads == 1

    answer = kv_memory.model.generate("What is the access code for the Tamsin lab?", recall, max_new_tokens=24)
    assert "4471" in answer


def test_smollm2_injected_kv_matches_full_prefill(make_memory, tmp_path, user):
    """Stored uncompressed (fp32), read back as a pack and placed on the model's device path, the
    items give a full prefill's logits: exactly for one item, and for two composed items once
    every token is read again in context (the repair taken to its limit)."""
    mem = make_memory(settings=Settings(plugins="context,pgvector,kv"),
                      options={"artifacts": str(tmp_path / "artifacts"), "kv_codec": "fp32", "kv_margin": 2.0})
    items = mem.write(user, FACTS[:2])
    promote(mem, user, items)
    lm = mem.model
    question = "Where does Zorbul Quenti live?"
    closing = lm.ids(lm.layout(question)[1])
    pack = mem.read(user, question, Budget(kv_tokens=4096)).kv.packed()
    assert pack.codec == "fp32" and len(pack.item_ids) == 2

    def logits(memory, recompute=0):
        with torch.inference_mode():
            cache, position, stored = lm.build_cache(memory, recompute=recompute)
            n = len(closing)
            return lm.model(torch.tensor([closing]), **{lm._cache_kw: cache},
                            position_ids=torch.arange(position, position + n)[None],
                            attention_mask=torch.ones(1, stored + n, dtype=torch.long)).logits[0, -1]

    def prefill(texts):
        ids = lm.preamble()[0] + [t for text in texts for t in lm.chunk_ids(text)] + closing
        with torch.inference_mode():
            return lm.model(torch.tensor([ids])).logits[0, -1]

    by_id = {it.id: it.text for it in items}
    first = pack.select(pack.item_ids[:1])
    assert (logits(first) - prefill([by_id[first.item_ids[0]]])).abs().max() <= 1e-3
    both = prefill([by_id[i] for i in pack.item_ids])
    assert (logits(pack, recompute=10_000) - both).abs().max() <= 1e-3


def test_int4_items_stay_close_to_their_exact_kv(kv_memory, user):
    item = kv_memory.write(user, FACTS[0])
    promote(kv_memory, user, [item])
    [chunk] = kv_memory.read(user, "Where does Zorbul Quenti live?").kv.chunks()
    [exact] = encode_items(kv_memory.model, [item.text], [item.id], scores=False)
    assert chunk.span == exact.span and (chunk.keys - exact.keys).abs().max() < 0.5 * exact.keys.abs().max()


def packs(mem):
    return sorted((mem.artifacts.root / "kv").rglob("*.safetensors"))


def test_a_scope_holds_one_pack_and_forgetting_rewrites_it(kv_memory, user):
    from memplug.testing import find_traces
    from memplug_kv.codec import header, parse

    items = kv_memory.write(user, FACTS)
    promote(kv_memory, user, items[:2])
    promote(kv_memory, user, items[2:])  # a second consolidation adds to the scope's pack
    [pack] = packs(kv_memory)
    assert f'"item_id": {items[0].id}' in header(pack.read_bytes())["items"]
    before = {c.item_id: c for c in parse(pack.read_bytes(), fingerprint=None, layout=None, where="-").chunks()}
    assert set(before) == {it.id for it in items}

    kv_memory.forget(user, [items[0].id])
    [rewritten] = packs(kv_memory)
    assert rewritten != pack and find_traces(kv_memory, [items[0]]) == []
    recall = kv_memory.read(user, "Tamsin lab access code and Ilse Varga's instrument", Budget(kv_tokens=4096))
    after = {c.item_id: c for c in recall.kv.chunks()}
    assert set(after) <= {items[1].id, items[2].id} and after
    for item_id, chunk in after.items():  # the items left are stored as they were
        assert torch.equal(chunk.keys, before[item_id].keys) and torch.equal(chunk.values, before[item_id].values)

    kv_memory.forget(user)
    assert packs(kv_memory) == []
    with kv_memory.store.transaction() as db:
        assert db.execute("SELECT count(*) FROM kv_items WHERE user_id = %s", (user,)).fetchone()[0] == 0


def test_demotion_drops_the_blob_and_text_serves_again(kv_memory, user):
    items = kv_memory.write(user, FACTS)
    promote(kv_memory, user, items[1:2])
    history = kv_memory.inspect(user, limit=len(FACTS))
    # One item it held and one it never did: only the first is demoted, the other's history stays.
    placed = kv_memory.consolidate(user, [Move((items[1].id, items[2].id), 2, 1, "cold")])
    assert [(p.tier, p.held, p.item_ids) for p in placed] == [("kv", False, (items[1].id,))]
    after = {r["id"]: r["history"] for r in kv_memory.inspect(user, limit=len(FACTS))}
    assert after[items[2].id] == next(r["history"] for r in history if r["id"] == items[2].id)
    assert kv_memory.consolidate(user, [Move((items[2].id,), 2, 1, "cold")]) == []
    recall = kv_memory.read(user, "access code for the Tamsin lab")
    assert recall.kv is None and items[1].id in {h.item.id for h in recall.hits}
    assert list((kv_memory.artifacts.root / "kv").rglob("*.safetensors")) == []


def test_blob_of_another_model_is_not_injected_and_is_re_encoded(kv_memory, user):
    items = kv_memory.write(user, FACTS)
    promote(kv_memory, user, items)
    with kv_memory.store.transaction() as db:
        db.execute("UPDATE kv_items SET fingerprint = 'some-other-model' WHERE item_id = %s", (items[0].id,))
    recall = kv_memory.read(user, "Where does Zorbul Quenti live?")
    assert items[0].id not in {it.id for it in (recall.kv.items if recall.kv else ())}
    assert items[0].id in {h.item.id for h in recall.hits}  # still served, as text

    placed = kv_memory.consolidate(user)  # the kv tier's plan asks for a re-encode
    assert any(p.tier == "kv" and items[0].id in p.item_ids for p in placed)
    with kv_memory.store.transaction() as db:
        fp = db.execute("SELECT fingerprint FROM kv_items WHERE item_id = %s", (items[0].id,)).fetchone()[0]
    assert fp == kv_memory.model.fingerprint


def test_corrupt_blob_is_a_clear_error_then_re_encoded(kv_memory, user):
    items = kv_memory.write(user, FACTS)
    promote(kv_memory, user, items[1:2])
    [blob] = (kv_memory.artifacts.root / "kv").rglob("*.safetensors")
    blob.write_bytes(blob.read_bytes()[:200])
    recall = kv_memory.read(user, "access code for the Tamsin lab", Budget(kv_tokens=512))
    with pytest.raises(ArtifactCorrupt, match=f"items {items[1].id}"):
        recall.kv.chunks()
    kv_memory.consolidate(user)
    recall = kv_memory.read(user, "access code for the Tamsin lab")
    assert len(recall.kv.chunks()) == 1


def test_forgetting_from_an_unreadable_pack_still_removes_the_file(kv_memory, user):
    """A pack that cannot be rewritten (damaged) is deleted with the forget: it may still hold the
    forgotten item; the scope's other items are served as text until re-encoded."""
    from memplug.testing import find_traces

    items = kv_memory.write(user, FACTS)
    promote(kv_memory, user, items)
    [pack] = packs(kv_memory)
    data = bytearray(pack.read_bytes())
    data[-3] ^= 0xFF  # fails its checksum
    pack.write_bytes(bytes(data))
    kv_memory.forget(user, [items[0].id])
    assert packs(kv_memory) == [] and find_traces(kv_memory, [items[0]]) == []
    recall = kv_memory.read(user, "access code for the Tamsin lab")
    assert recall.kv is None and items[1].id in {h.item.id for h in recall.hits}
    kv_memory.consolidate(user)  # re-encoded from their text
    assert len(packs(kv_memory)) == 1
    assert kv_memory.read(user, "access code for the Tamsin lab", Budget(kv_tokens=4096)).kv is not None


def test_a_damaged_blob_found_by_one_process_is_known_to_every_other(kv_memory, make_memory, tmp_path, user):
    """What a serving process finds is kept in Postgres: another process (a worker, another server)
    neither offers the blob again nor waits for a consolidation in the process that found it."""
    items = kv_memory.write(user, FACTS)
    promote(kv_memory, user, items[1:2])
    [blob] = (kv_memory.artifacts.root / "kv").rglob("*.safetensors")
    blob.write_bytes(blob.read_bytes()[:200])
    worker = make_memory(settings=Settings(plugins="context,pgvector,kv"),
                         options={"artifacts": str(tmp_path / "artifacts")})
    assert worker.read(user, "access code for the Tamsin lab").kv is not None  # nobody knows yet
    with pytest.raises(ArtifactCorrupt):
        kv_memory.read(user, "access code for the Tamsin lab").kv.chunks()
    for mem in (kv_memory, worker):  # the item is served as text everywhere until it is re-encoded
        recall = mem.read(user, "access code for the Tamsin lab")
        assert recall.kv is None and items[1].id in {h.item.id for h in recall.hits}
    placed = worker.consolidate(user)  # the worker's plan asks for the re-encode
    assert any(p.tier == "kv" and p.held and items[1].id in p.item_ids for p in placed)
    assert len(kv_memory.read(user, "access code for the Tamsin lab").kv.chunks()) == 1


def test_kv_budget_limits_the_prefix(make_memory, tmp_path, user):
    mem = make_memory(settings=Settings(plugins="context,pgvector,kv"),
                      options={"artifacts": str(tmp_path / "artifacts"), "kv_margin": 2.0})  # no near-miss cut
    items = mem.write(user, FACTS)
    promote(mem, user, items)
    full = mem.read(user, "Zorbul Quenti Tamsin Ilse", Budget(kv_tokens=4096))
    small = mem.read(user, "Zorbul Quenti Tamsin Ilse", Budget(kv_tokens=20))
    assert len(full.kv.items) == 3
    assert small.kv is not None and small.kv.tokens <= 20 and len(small.kv.items) < 3


def test_memory_generate_streams_an_answer(kv_memory, user):
    items = kv_memory.write(user, FACTS)
    promote(kv_memory, user, items)
    injected = kv_memory.measured("kv").get("inject_ms_per_token", (0.0, 0))[1]
    pieces = list(kv_memory.stream(user, [{"role": "user", "content": "What is the access code for the Tamsin lab?"}],
                                   max_new_tokens=24))
    assert len(pieces) > 1 and "4471" in "".join(pieces)
    assert kv_memory.measured("kv")["inject_ms_per_token"][1] == injected + 1  # placing it was timed


def test_the_cost_policy_prices_kv_reads_as_measured_on_the_models_device(make_memory, tmp_path, user):
    """The kv tier's read cost is the pack's load plus its placement on the model's device, timed
    there (once against prefill if no read was timed yet): where placing costs more than reading
    the same tokens as text, as on a GPU for short memories, hot items stay text."""
    from dataclasses import replace

    from memplug import Scope, TierCost
    from memplug.policies import CostPolicy
    from memplug.usage import ItemUsage

    mem = make_memory(settings=Settings(plugins="context,pgvector,kv,cost"),
                      options={"artifacts": str(tmp_path / "artifacts")})
    [kv] = [c for c in mem.hook.memplug_costs(memory=mem, scope=Scope(user)) if c and c.tier == "kv"]
    measured = mem.measured("kv")
    prefill = mem.measured("model")["prefill_ms_per_token"][0]
    load = measured["read_ms_per_token"][0] if "read_ms_per_token" in measured else 0.05
    assert kv.read_ms_per_token == pytest.approx(load + measured["inject_ms_per_token"][0])
    assert kv.read_ms_per_token < prefill  # on a CPU, placing KV is far cheaper than reading text

    policy = CostPolicy()
    now = datetime.now(UTC)
    reads = tuple(now - timedelta(minutes=m) for m in range(20, 0, -1))  # oldest first
    hot = [ItemUsage(i, 1, len(reads), 0, reads[-1], 20.0, 40, now - timedelta(days=1), reads, Scope(user))
           for i in (1, 2)]
    text = TierCost("pgvector", 1, prompt_tokens_per_token=1.0)
    assert {(m.src_level, m.dst_level) for m in policy.plan(hot, [text, kv], now, prefill)} == {(1, 2)}
    dear = replace(kv, read_ms_per_token=2 * prefill)
    assert policy.plan(hot, [text, dear], now, prefill) == []


def test_blobs_of_a_consolidation_that_rolls_back_are_removed(kv_memory, user):
    from memplug import PluginError, hookimpl

    class FailsAfterKV:
        @hookimpl(trylast=True)  # runs after the kv tier has written its blobs
        def memplug_consolidate(self, moves):
            raise PluginError("refused")

    items = kv_memory.write(user, FACTS)
    kv_memory.register(FailsAfterKV())
    with pytest.raises(PluginError):
        promote(kv_memory, user, items)
    assert not (kv_memory.artifacts.root / "kv").exists() or \
        list((kv_memory.artifacts.root / "kv").rglob("*.safetensors")) == []
    with kv_memory.store.transaction() as db:
        assert db.execute("SELECT count(*) FROM kv_items WHERE user_id = %s", (user,)).fetchone()[0] == 0


NEAR_MISSES = [
    "Ulmo M. Haldova works as a luthier.",
    "Ulmo S. Brunski plays the cello.",
    "Fenmo M. Haldova's favourite colour is lavender.",
]


def test_near_misses_are_left_out_of_the_prefix_and_the_text(make_memory, tmp_path, user):
    """Injected next to the item that answers, chunks about similar names mislead the model
    (benchmarks/results/policy.json): the kv tier leaves them out, and the host does not serve
    them as text either."""
    question = "What is Ulmo M. Haldova's job?"
    got = {}
    for margin in (0.1, 2.0):
        mem = make_memory(settings=Settings(plugins="context,pgvector,kv"),
                          options={"artifacts": str(tmp_path / f"artifacts-{margin}"), "kv_margin": margin})
        scope = f"{user}-{int(margin * 10)}"
        items = mem.write(scope, NEAR_MISSES)
        promote(mem, scope, items)
        recall = mem.read(scope, question, Budget(k=3))
        got[margin] = recall
        if margin == 0.1:
            assert [it.id for it in recall.kv.items] == [items[0].id]
            assert set(recall.kv.left_out) == {items[1].id, items[2].id}
            assert not recall.hits  # the near misses are not served as text instead
            assert "luthier" in mem.model.generate(question, recall, max_new_tokens=24).lower()
    assert len(got[2.0].kv.items) == 3 and got[2.0].kv.left_out == ()


def test_an_item_whose_kv_answers_worse_than_its_text_stays_text(make_memory, tmp_path, user):
    from memplug_kv import REFUSED

    # Keeping a tenth of each item's tokens loses the words that answer: the check catches it.
    mem = make_memory(settings=Settings(plugins="context,pgvector,kv"),
                      options={"artifacts": str(tmp_path / "artifacts"), "kv_keep": 0.1, "kv_verify": "on"})
    items = mem.write(user, FACTS)
    placed = promote(mem, user, items)
    refused = {i for p in placed if not p.held for i in p.item_ids}
    assert refused and all(p.tier == "kv" and p.reason == REFUSED for p in placed if not p.held)
    assert all(p.held is False or not set(p.item_ids) & refused for p in placed)
    with mem.store.transaction() as db:
        rows = db.execute("SELECT item_id, text_score, kv_score FROM kv_refused WHERE user_id = %s",
                          (user,)).fetchall()
        assert {r[0] for r in rows} == refused and all(kv < text for _, text, kv in rows)
        assert not db.execute("SELECT count(*) FROM kv_items WHERE item_id = ANY(%s)", (sorted(refused),)).fetchone()[0]
    some = next(it for it in items if it.id in refused)
    assert some.id in {h.item.id for h in mem.read(user, some.text).hits}  # still served, as text
    history = mem.inspect(user)
    assert any(m["reason"].endswith(REFUSED) for row in history for m in row["history"] if row["id"] == some.id)
    # The verdict is kept for this model and codec: promoting again checks nothing and places nothing.
    assert promote(mem, user, [some]) == []
    # Without the check, the same item is encoded.
    unchecked = make_memory(settings=Settings(plugins="context,pgvector,kv"),
                            options={"artifacts": str(tmp_path / "artifacts"), "kv_keep": 0.1, "kv_verify": "off"})
    assert [(p.tier, p.held, p.item_ids) for p in promote(unchecked, user, [some])] == [("kv", True, (some.id,))]


def test_kv_options_are_checked(make_memory, tmp_path):
    from memplug import ConfigError

    with pytest.raises(ConfigError, match="kv_verify"):
        make_memory(settings=Settings(plugins="context,pgvector,kv"), options={"kv_verify": "maybe"})
    with pytest.raises(ConfigError, match="kv_margin"):
        make_memory(settings=Settings(plugins="context,pgvector,kv"), options={"kv_margin": -1})
