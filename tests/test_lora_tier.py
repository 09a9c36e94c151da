"""The lora tier end to end: real Postgres, real MiniLM, real SmolLM2-135M, real training."""

from __future__ import annotations

import pytest

from benchmarks.lora import heldout_text, perplexity
from memplug import AdapterRef, ArtifactCorrupt, ModelMismatch, Move, Scope, Settings

FACTS = [
    ("Zorbul Quenti lives in Marrakesh.", "Where does Zorbul Quenti live?", "Marrakesh"),
    ("Ilse Varga plays the bassoon.", "Which instrument does Ilse Varga play?", "bassoon"),
    ("Tamsin Orlo's pet ferret is called Biscuit.", "What is the name of Tamsin Orlo's ferret?", "Biscuit"),
]
# A question that names a fact's value, not its subject: about something else (lora_gate).
ABOUT_THE_VALUE = {"Marrakesh": "In which country is Marrakesh?", "bassoon": "What kind of instrument is a bassoon?",
                   "Biscuit": "Is Biscuit a good name for a pet?"}


@pytest.fixture
def lora_memory(make_memory, tmp_path):
    return make_memory(settings=Settings(plugins="context,pgvector,lora"),
                       options={"artifacts": str(tmp_path / "artifacts"), "lora_epochs": 3,
                                "lora_min_steps": 24})  # a small budget: three trainings follow


def closed_book(lm, question, adapter=None):
    """The model's answer with no memory in the prompt, with or without an adapter."""
    rows = [lm.ids(lm.layout(question, "", chunks=False)[1])]
    out = []
    for step in lm.decode([], rows, max_new_tokens=24, with_preamble=False, adapter=adapter):
        out.append(int(step[0]))
    return lm.tokenizer.decode([t for t in out if t not in lm.stop_ids], skip_special_tokens=True)


def adapter_files(tmp_path):
    return sorted(p for p in (tmp_path / "artifacts").rglob("*") if p.is_file())


@pytest.mark.timeout(900)  # three trainings of SmolLM2 on a 2-core CPU
def test_adapter_trains_applies_isolates_and_forgets(lora_memory, make_memory, users, tmp_path):
    mem = lora_memory
    alice, bob = users(2)
    items = mem.write(alice, [f for f, _, _ in FACTS])
    mem.write(bob, "Bob keeps his bicycle in the garden shed.")
    lm = mem.model
    base_ppl = perplexity(lm, heldout_text()[:8])
    base_known = [key.lower() in closed_book(lm, q).lower() for _, q, key in FACTS]
    assert not any(base_known), "the base model cannot know invented facts"

    seen = []
    placed = mem.consolidate(alice, [Move(tuple(it.id for it in items), 1, 3, "test")],
                             progress=lambda task, done, total, info: seen.append((task, done, total)))
    assert any(t.startswith(f"lora {alice}") and "train" in t for t, _, _ in seen)
    held = {i for p in placed if p.tier == "lora" and p.held for i in p.item_ids}
    assert held, f"no item was recalled after training: {placed}"

    # The read offers the adapter; what it holds is not repeated as text (but is there for API models).
    fact, question, key = next(f for f, it in zip(FACTS, items, strict=True) if it.id in held)
    recall = mem.read(alice, question)
    assert isinstance(recall.adapter, AdapterRef)
    assert {it.id for it in recall.adapter.items} == held
    assert not {h.item.id for h in recall.hits} & held
    assert key in recall.as_text() and key not in recall.as_text(adapter_as_text=False)
    # A question far from every item it holds is routed to the base model (lora_gate).
    unrelated = mem.read(alice, "What is the capital of France?")
    assert unrelated.adapter is None and not unrelated.covered
    assert mem.read(alice, ABOUT_THE_VALUE[key]).adapter is None

    ref = recall.adapter
    recalled = [k.lower() in closed_book(lm, q, ref).lower() for _, q, k in FACTS]
    assert sum(recalled) > sum(base_known)
    assert key.lower() in mem.generate(alice, question, max_new_tokens=24).lower()
    with lm._lock:
        lm._use_adapter(ref)
        try:
            adapted_ppl = perplexity(lm, heldout_text()[:8])
        finally:
            lm._use_adapter(None)
    assert adapted_ppl <= 1.10 * base_ppl, (base_ppl, adapted_ppl)

    # Bob never gets Alice's adapter.
    bob_recall = mem.read(bob, question)
    assert bob_recall.adapter is None
    mem.generate(bob, question, max_new_tokens=4)
    assert lm._active is None

    # An adapter of another base model is never offered, and refused if asked for.
    with mem.store.transaction() as db:
        db.execute("UPDATE lora_adapters SET fingerprint = 'other' WHERE id = %s", (ref.version,))
    assert mem.read(alice, question).adapter is None
    with pytest.raises(ModelMismatch):
        lm.load_adapter(AdapterRef("lora", ref.scope, 999, "other", (), "", 0, ref.loader))
    with mem.store.transaction() as db:
        db.execute("UPDATE lora_adapters SET fingerprint = %s WHERE id = %s", (ref.fingerprint, ref.version))

    # A damaged adapter file gives a clear error naming the adapter, and the finding is kept in
    # Postgres: no process offers the adapter again, and any worker's next consolidation retrains it.
    lm.drop_adapter(ref.name)
    weights = next(p for p in adapter_files(tmp_path) if p.name == "adapter_model.safetensors")
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ArtifactCorrupt, match=f"adapter {ref.version}"):
        mem.generate(alice, question, max_new_tokens=4)
    worker = make_memory(settings=Settings(plugins="context,pgvector,lora"),
                         options={"artifacts": str(tmp_path / "artifacts")})
    for m in (mem, worker):
        assert m.read(alice, question).adapter is None
    plans = [mv for part in worker.hook.memplug_plan(memory=worker, scope=Scope(alice), usage=worker.usage(alice))
             if part for mv in part]
    assert any(mv.dst_level == 3 and set(mv.item_ids) == {it.id for it in items} for mv in plans), plans

    # Forget one fact: every adapter trained on it goes at once, the others are retrained without it.
    forgotten = items[[f for f, _, _ in FACTS].index(fact)]
    mem.forget(alice, [forgotten.id])
    assert adapter_files(tmp_path) == []
    assert mem.read(alice, question).adapter is None
    with mem.store.transaction() as db:
        assert db.execute("SELECT count(*) FROM lora_adapters WHERE user_id = %s", (alice,)).fetchone()[0] == 0
    # Files left by a training that died before its commit (a killed worker) are swept by the next one.
    orphan = tmp_path / "artifacts" / "lora" / mem.model_fingerprint[:16] / alice / "_" / "_" / "1" / "x.safetensors"
    orphan.parent.mkdir(parents=True, exist_ok=True)
    orphan.write_bytes(b"half-written")
    placed = mem.consolidate(alice)  # the tier's plan retrains the rest
    assert not orphan.exists()
    assert {i for p in placed for i in p.item_ids} <= {it.id for it in items} - {forgotten.id}
    with mem.store.transaction() as db:
        trained_on = db.execute("SELECT item_ids FROM lora_adapters WHERE user_id = %s", (alice,)).fetchall()
    assert trained_on and all(forgotten.id not in ids for (ids,) in trained_on)
    retrained = mem.read(alice, FACTS[0][1]).adapter or mem.read(alice, FACTS[1][1]).adapter
    if retrained is not None:
        # The forgotten fact's closed-book recall is back at the base model's level.
        assert key.lower() not in closed_book(lm, question, retrained).lower()

    # Forget the rest: the adapter is dropped and nothing is retrained.
    mem.forget(alice)
    assert adapter_files(tmp_path) == []
    assert mem.consolidate(alice) == []


@pytest.mark.timeout(600)
def test_a_training_waits_while_another_runs_on_this_machine(make_memory, users, tmp_path, dsn):
    """Trainings queue for the machine whichever process starts them: another worker's training
    (here, a connection holding the lock as one would) makes this one wait, and it then runs."""
    import socket
    import threading
    import time

    import psycopg

    from memplug_lora import TRAINING_LOCK

    mem = make_memory(settings=Settings(plugins="context,pgvector,lora"),
                      options={"artifacts": str(tmp_path / "artifacts"), "lora_min_recall": 0.0,
                               "lora_epochs": 1, "lora_max_train_s": 3})
    (alice,) = users(1)
    items = mem.write(alice, [f for f, _, _ in FACTS[:2]])
    stages, outcome, open_transactions = [], {}, []
    watcher = psycopg.connect(dsn, autocommit=True)

    def progress(task, done, total, info):
        stages.append(task)
        if task.endswith(": train") and not open_transactions:
            # What Postgres holds open for memplug while the adapter trains: nothing. (The moves'
            # transaction used to stay open to the end of the training.)
            open_transactions.append(watcher.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'memplug' "
                "AND xact_start IS NOT NULL AND pid <> pg_backend_pid()").fetchone()[0])
            # Forgotten while its adapter trains: the forget goes through at once, and the training
            # is void, nothing of it kept. (It used to wait for the training, holding this thread.)
            outcome["forgotten"] = mem.forget(alice, [items[0].id])

    def consolidate():
        try:
            outcome["placed"] = mem.consolidate(alice, [Move(tuple(it.id for it in items), 1, 3, "test")],
                                                progress=progress)
        except BaseException as e:  # noqa: BLE001 - handed to the test's thread
            outcome["error"] = e

    key = (TRAINING_LOCK, socket.gethostname())
    with psycopg.connect(dsn, autocommit=True) as other:
        other.execute("SELECT pg_advisory_lock(hashtext(%s), hashtext(%s))", key)
        worker = threading.Thread(target=consolidate)
        worker.start()
        try:
            deadline = time.monotonic() + 120
            while not other.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted "
                                    "AND classid::int = hashtext(%s) AND objid::int = hashtext(%s)",
                                    key).fetchone()[0]:
                assert worker.is_alive() and time.monotonic() < deadline, outcome
                time.sleep(0.1)
            time.sleep(1)
            assert worker.is_alive() and not any(s.endswith(": train") for s in stages), stages
            assert any("waiting for another training" in s for s in stages), stages
        finally:
            other.execute("SELECT pg_advisory_unlock(hashtext(%s), hashtext(%s))", key)
        worker.join(timeout=400)
    watcher.close()
    assert not worker.is_alive() and "error" not in outcome, outcome
    assert any(s.endswith(": train") for s in stages), stages
    waited = [k for k, s in enumerate(stages) if "waiting for another training" in s]
    trained = [k for k, s in enumerate(stages) if s.endswith(": train")]
    assert len(waited) == 2 and waited[-1] < trained[0], stages  # the wait shown, then shown over, then training
    # No transaction stayed open through the training (the moves committed before it began).
    assert open_transactions == [0] and outcome["forgotten"] == 1, (open_transactions, outcome)
    assert outcome["placed"] == []
    with mem.store.transaction() as db:
        assert db.execute("SELECT count(*) FROM lora_adapters WHERE user_id = %s", (alice,)).fetchone()[0] == 0
        assert db.execute("SELECT item_id, adapter_id FROM lora_items WHERE user_id = %s",
                          (alice,)).fetchall() == [(items[1].id, None)]  # still waiting, for the next training
    assert adapter_files(tmp_path) == []
