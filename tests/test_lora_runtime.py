"""The weights-tier machinery on a tiny Llama built from a config: synthesis, training, packing, applying."""

from __future__ import annotations

import copy
import dataclasses
import random

import pytest
import safetensors.torch
import torch

from memplug import AdapterRef, ArtifactCorrupt, InvalidInput, ModelMismatch, Scope
from memplug.runtime import statements
from memplug.runtime.chat import LocalModel
from memplug_lora import adapter, synth
from memplug_lora import train as lora

FACTS = ["Alice Brown lives in Oslo.", "The code word for the vault is parrot.", "Rex is the name of Tom's dog."]
FAST = lora.TrainConfig(rank=4, alpha=8, lr=5e-3, epochs=2, min_steps=4, batch_size=4, replay=0.5, seed=1)


@pytest.fixture(scope="module")
def tiny_base(tiny_parts):
    return tiny_parts


@pytest.fixture
def make_tiny(tiny_base):
    def make(fingerprint="tiny"):
        model, tok = tiny_base
        return LocalModel(copy.deepcopy(model), tok, fingerprint=fingerprint, name="tiny-llama", device="cpu",
                          rotary=True)
    return make


def logits(lm, text="<|im_start|>user\nWhere does Alice Brown live?<|im_end|>\n"):
    with torch.inference_mode():
        return lm.model(torch.tensor([lm.ids(text)])).logits[0, -1].clone()


@pytest.fixture(scope="module")
def trained(tiny_base):
    model, tok = tiny_base
    lm = LocalModel(copy.deepcopy(model), tok, fingerprint="tiny", name="tiny-llama", device="cpu", rotary=True)
    data = synth.synthesize(FACTS, [1, 2, 3], None, seed=0)
    replay = [("Give me a tip for sleeping.", "Keep a regular bedtime.", True)]
    return lm, data, lora.train(lm, data, replay, FAST)


def ref_of(result, fingerprint="tiny", version=1, tier="lora", scope="alice"):
    weights, config = adapter.pack(result, fingerprint, {"items": [1, 2, 3]})
    return AdapterRef(tier, Scope(scope), version, fingerprint, (), "memory", len(weights),
                      lambda: adapter.unpack(weights, config, fingerprint, f"adapter {version}"))


# -- synthesis ---------------------------------------------------------------------


def test_answer_key_is_what_the_question_lacks():
    assert statements.answer_key("Kara V. Pell lives in Kyoto.", "Where does Kara V. Pell live?") == "Kyoto"
    assert statements.answer_key("Quo Folley competes in fencing at weekends.",
                            "Which sport does Quo Folley do on weekends?") == "fencing"
    assert statements.answer_key("Ulsha's locker code is HG-8704.") == "HG-8704"
    # A closing "how often" after an object is passed over, unless the question names the rest.
    assert statements.answer_key("Quo Folley competes in fencing at weekends.") == "fencing"
    assert statements.answer_key("Nora plays the cello on Sundays.") == "cello"
    assert statements.answer_key("Tom visits his mother every other week.") == "mother"
    assert statements.answer_key("Quo Folley competes in fencing at weekends.",
                            "When does Quo Folley compete in fencing?") == "weekends"
    # After a verb or a stopword, the time is what the statement says.
    assert statements.answer_key("The team meets every Monday.") == "Monday"
    assert statements.answer_key("The meeting is every Tuesday.") == "Tuesday"
    assert statements.answer_key("Mina swims at weekends.") == "weekends"
    assert statements.anchor("Vesne T. Strandton lives in Tallinn.") == "Vesne T. Strandton"
    assert statements.anchor("Orine B. Ashik's favourite dish is pierogi.") == "Orine B. Ashik"
    assert statements.recalled("Kara lives in Kyoto.", "Where does Kara live?", "She lives in Kyoto, Japan.")
    assert not statements.recalled("Kara lives in Kyoto.", "Where does Kara live?", "She lives in Kyotoville.")


def test_without_value_takes_out_every_occurrence_of_the_answer_key():
    assert statements.without_value("Kara V. Pell lives in Kyoto.") == "Kara V. Pell lives in."
    assert statements.without_value("Ulsha's locker code is HG-8704.") == "Ulsha's locker code is."
    assert statements.without_value("Quo Folley competes in fencing at weekends.") == "Quo Folley competes in at weekends."
    assert statements.without_value("kyoto suits Kara; Kara moved to Kyoto") == "suits Kara; Kara moved to"
    assert statements.without_value("Peanuts.") == "Peanuts."  # nothing but the value: kept whole
    assert statements.without_value("the and of") == "the and of"  # no key at all
    # Only the key as a word of its own: not inside a longer word or a compound; with its "'s".
    assert statements.without_value("Kyotoville is far; Kara lives in Kyoto.") == "Kyotoville is far; Kara lives in."
    assert statements.without_value("Kyoto-born Kara lives in Kyoto.") == "Kyoto-born Kara lives in."
    assert statements.without_value("Kyoto's temples charm Kara, who lives in Kyoto.") == "temples charm Kara, who lives in."


def test_the_gate_routes_questions_about_an_items_subject_not_about_its_value():
    """The lora gate compares a query with each item minus its value: "In which country is
    Marrakesh?" is as close to "... lives in Marrakesh." as the item's own question, but not to
    "... lives in."."""
    from benchmarks.lora import routed
    from memplug.runtime.embedder import Embedder

    statements = ["Zorbul Quenti lives in Marrakesh.", "Ilse Varga plays the bassoon.",
                  "Tamsin Orlo's pet ferret is called Biscuit."]
    about = ["Where does Zorbul Quenti live?", "Which instrument does Ilse Varga play?",
             "What is the name of Tamsin Orlo's ferret?"]
    values = ["In which country is Marrakesh?", "What kind of instrument is a bassoon?",
              "Is Biscuit a good name for a pet?"]
    embedder = Embedder()
    assert routed(0.5, embedder, statements, about) == [True, True, True]
    assert routed(0.5, embedder, statements, values) == [False, False, False]
    whole = embedder.encode(statements) @ embedder.encode(values).T
    assert all(whole[i, i] >= 0.5 for i in range(3))  # the whole statements would have routed them


def test_synthesized_pairs_keep_the_fact_and_never_give_it_away():
    data = synth.synthesize(FACTS, [1, 2, 3], None, seed=0)
    for d in data:
        assert d.train and d.held_out
        for question, answer in d.train:
            key = statements.answer_key(d.statement, question)
            assert key is not None and statements.contains_word(answer, key)
        for question in d.held_out:
            assert (question, d.statement) not in d.train


def test_model_written_questions_are_filtered():
    def complete(prefix, tails, temperature, seed):
        if "Question" in prefix:  # a good question, one that gives the answer away, and junk
            return ["Where does Alice Brown live?" if "Alice" in t else "What is the wifi password?"
                    for t in tails]
        return ["Oslo is the home of Alice Brown." if "Alice" in t else "Dogs are nice." for t in tails]

    data = synth.synthesize(FACTS, [1, 2, 3], complete, seed=0, samples=2, paraphrases=1)
    alice = data[0]
    assert ("Where does Alice Brown live?", alice.statement) in alice.train
    assert any(a == "Oslo is the home of Alice Brown." for _, a in alice.train)
    for d in data[1:]:
        assert all(q != "What is the wifi password?" for q, _ in d.train)
        assert all(a != "Dogs are nice." for _, a in d.train)


def test_the_held_out_question_asks_for_the_answer_instead_of_giving_it():
    code = "Alice's gym locker code is ZQ-7741-B."

    def complete(asked):
        def run(prefix, tails, temperature, seed):
            return [asked[seed] if "Question" in prefix else "No." for _ in tails]
        return run

    [d] = synth.synthesize([code], [1], complete(["Which code opens Alice's gym locker?", "What is ZQ-7741-B?"]),
                           seed=0, samples=2, paraphrases=0)
    assert d.held_out == ["Which code opens Alice's gym locker?"]
    assert ("What is ZQ-7741-B?", code) in d.train  # still trained on
    [d] = synth.synthesize([code], [1], complete(["What is ZQ-7741-B?", "Whose gym code is ZQ-7741-B?"]),
                           seed=0, samples=2, paraphrases=0)
    assert d.held_out == ["What can you tell me about Alice?"]  # none asks: the template question
    # A question that does not say whose code it asks for checks nothing about Alice.
    [d] = synth.synthesize([code], [1], complete(["What is the locker code?", "What is ZQ-7741-B?"]),
                           seed=0, samples=2, paraphrases=0)
    assert d.held_out == ["What can you tell me about Alice?"]
    # With other items about Alice, "What can you tell me about Alice?" could be answered by
    # any of them: the check asks for the end of the statement instead.
    d, _ = synth.synthesize([code, "Alice works at Corvana Labs."], [1, 2],
                            complete(["What is ZQ-7741-B?", "Who is Alice?"]), seed=0, samples=2, paraphrases=0)
    assert d.held_out == ["How does this sentence end? Alice's gym locker code is"]
    assert statements.answer_key(d.statement, d.held_out[0]) == "ZQ-7741-B"


def test_the_held_out_question_names_more_than_the_items_subject():
    job = "Bob teaches chemistry at Westridge Academy."

    def complete(prefix, tails, temperature, seed):
        return [["What is Bob teaching?", "What is Bob?"][seed] if "Question" in prefix else "No." for _ in tails]

    [d] = synth.synthesize([job], [1], complete, seed=0, samples=2, paraphrases=0)
    assert d.held_out == ["What is Bob teaching?"]  # "What is Bob?" could be asking for anything
    assert ("What is Bob?", job) in d.train


def test_other_memories_beside_an_item_never_hold_its_answer():
    items = synth.synthesize(["Bob's cat is called Biscuit.", "Biscuit is the name of Bob's cat.", "Bob lives in Calgary."],
                             [1, 2, 3], None)
    for seed in range(20):
        picked = synth.beside(items[0], items, random.Random(seed), 2)
        assert len(picked) == 2 and items[0].statement not in picked
        assert not any("Biscuit" in p for p in picked)
        # The draw depends on the items, not the order they come in (nor their ids).
        assert synth.beside(items[0], items[::-1], random.Random(seed), 2) == picked


def test_half_the_item_questions_are_asked_among_other_memories(make_tiny, monkeypatch):
    lm = make_tiny()
    data = synth.synthesize(["Bob's cat is called Biscuit.", "Bob lives in Calgary."], [1, 2], None)
    seen = []
    real = lora._example
    monkeypatch.setattr(lora, "_example", lambda lm_, prompt, *a: seen.append(prompt) or real(lm_, prompt, *a))
    lora.train(lm, data, [], dataclasses.replace(FAST, epochs=1, min_steps=0, served=0.5))
    facts = seen[:sum(len(d.train) for d in data)]
    among = [p for p in facts if "Relevant memories:" in p]
    assert 0 < len(among) < len(facts)


def test_contrast_prompts_are_held_to_the_base_models_answer_where_the_value_goes(make_tiny):
    lm = make_tiny()
    data = synth.synthesize(FACTS, [1, 2, 3], None, seed=0)
    cfg = dataclasses.replace(FAST, contrast=1, contrast_tokens=5)
    pool = lora._contrast_pool(lm, data, cfg, random.Random(0), [0])
    assert set(pool) == {1, 2, 3}
    for d in data:
        assert 0 < len(pool[d.item_id]) <= 3
        for prompt_ids, answer_ids, kind in pool[d.item_id]:
            assert kind == "replay" and 0 < len(answer_ids) <= 6  # 5 tokens, or fewer and the end token
            prompt = lm.tokenizer.decode(prompt_ids)
            assert d.anchor not in prompt
            # The answer held is the base model's own greedy one to the prompt.
            text, done = lm.replies([prompt_ids], 5, with_preamble=False)[0]
            assert answer_ids == (lm.ids(text) + [0] if done else lm.ids(text)[:5])
    assert lora._contrast_pool(lm, data, dataclasses.replace(cfg, contrast_tokens=0), random.Random(0), [0]) is None
    result = lora.train(lm, data, [], dataclasses.replace(cfg, epochs=1, min_steps=0))
    assert result.metrics["steps"] > 0


def test_later_rounds_ask_only_for_the_items_still_short():
    asked = []

    def complete(prefix, tails, temperature, seed):
        asked.append(("Question" in prefix, seed, [t.split(" ")[1] for t in tails]))
        if "Question" in prefix:  # Alice gets a new good question every round; the others junk
            return [["Where does Alice Brown live?", "Which city is Alice Brown's home?", "x?"][seed]
                    if "Alice" in t else "What?" for t in tails]
        return ["Alice Brown lives in Oslo, Norway." if "Alice" in t else "No." for t in tails]

    synth.synthesize(FACTS, [1, 2, 3], complete, seed=0, samples=2, paraphrases=1)
    assert asked == [(True, 0, ["Alice", "The", "Rex"]), (False, 0, ["Alice", "The", "Rex"]),
                     (True, 1, ["Alice", "The", "Rex"]), (False, 1, ["The", "Rex"])]


# -- training and packing ----------------------------------------------------------


def test_training_changes_only_the_adapter_and_reports_recall(make_tiny, trained):
    lm, data, result = trained
    assert set(result.recall) == {1, 2, 3}
    assert all(0.0 <= r <= 1.0 for r in result.recall.values())
    assert result.state and all("lora_" in k for k in result.state)
    assert result.metrics["steps"] > 0 and result.metrics["history"]
    assert result.peft_config["r"] == FAST.rank
    with pytest.raises(InvalidInput, match="nothing to train"):
        lora.train(make_tiny(), [], [], FAST)
    with pytest.raises(InvalidInput, match="rank"):
        lora.TrainConfig(rank=0)


def test_weight_decay_keeps_the_adapter_smaller(make_tiny, trained):
    """``weight_decay`` (``lora_weight_decay``) is AdamW's decoupled decay of the LoRA weights."""
    _, data, plain = trained
    replay = [("Give me a tip for sleeping.", "Keep a regular bedtime.", True)]
    decayed = lora.train(make_tiny(), data, replay, dataclasses.replace(FAST, weight_decay=50.0))
    assert decayed.metrics["config"]["weight_decay"] == 50.0

    def size(state):
        return sum(float(v.float().norm()) ** 2 for k, v in state.items() if "lora_A" in k) ** 0.5

    assert size(decayed.state) < 0.9 * size(plain.state)


def test_replay_answers_are_cut_and_early_epochs_go_unmeasured(make_tiny):
    lm = make_tiny()
    long = " ".join(["word"] * 40)
    cut = lora._replay_example(lm, "Tell me a story.", long, [0], 5)
    assert cut[1] == lm.ids(long)[:5] and cut[2] == "replay"  # a cut answer has no end token
    assert lora._replay_example(lm, "Hi", "Short.", [0], 5)[1] == lm.ids("Short.") + [0]
    assert lora._replay_example(lm, "Hi", long, [0], 0)[1] == lm.ids(long) + [0]

    data = synth.synthesize(FACTS, [1, 2, 3], None, seed=0)
    result = lora.train(lm, data, [("Tell me a story.", long, True)],
                        dataclasses.replace(FAST, epochs=3, min_steps=0, eval_from=3))
    assert [h["epoch"] for h in result.metrics["history"]] == [3]
    assert result.metrics["best_epoch"] == 3
    # Few items make short epochs: measurements are spaced by steps, and the last epoch is always measured.
    result = lora.train(lm, data, [("Tell me a story.", long, True)],
                        dataclasses.replace(FAST, epochs=1, min_steps=24, eval_from=2, eval_steps=8))
    per_epoch = result.metrics["steps"] // result.metrics["epochs_run"]
    steps = [h["step"] for h in result.metrics["history"]]
    assert result.metrics["epochs_run"] > 4 and steps[0] == 2 * per_epoch
    assert all(b - a >= 8 for a, b in zip(steps[:-2], steps[1:-1], strict=True)) and steps[-1] == result.metrics["steps"]
    assert len(steps) < result.metrics["epochs_run"] - 1
    with pytest.raises(InvalidInput, match="eval_from"):
        lora.TrainConfig(eval_from=0)
    with pytest.raises(InvalidInput, match="eval_steps"):
        lora.TrainConfig(eval_steps=0)
    with pytest.raises(InvalidInput, match="replay_tokens"):
        lora.TrainConfig(replay_tokens=-1)


def test_the_base_models_replay_targets_are_kept_between_trainings(make_tiny, tmp_path, caplog, monkeypatch):
    data = synth.synthesize(FACTS, [1, 2, 3], None, seed=0)
    replay = [("Give me a tip for sleeping.", "Keep a regular bedtime.", True),
              ("Tell me a story.", " ".join(["word"] * 30), False)]
    cfg = dataclasses.replace(FAST, precision="fp32")
    first = lora.train(make_tiny(), data, replay, cfg, cache=tmp_path)
    [path] = tmp_path.glob("replay-targets-*.safetensors")
    written, stamp = path.read_bytes(), path.stat().st_mtime_ns
    again = lora.train(make_tiny(), data, replay, cfg, cache=tmp_path)
    assert path.stat().st_mtime_ns == stamp  # read, not written again
    assert all(torch.equal(first.state[k], again.state[k]) for k in first.state)
    plain = lora.train(make_tiny(), data, replay, cfg)  # targets computed as training goes
    assert all(torch.allclose(first.state[k], plain.state[k], atol=1e-5) for k in first.state)

    path.write_bytes(b"not a safetensors file")
    with caplog.at_level("WARNING", logger="memplug_lora.train"):
        redone = lora.train(make_tiny(), data, replay, cfg, cache=tmp_path)
    assert "unreadable" in caplog.text and path.read_bytes() == written
    assert all(torch.equal(first.state[k], redone.state[k]) for k in first.state)
    lora.train(make_tiny("another model"), data, replay, cfg, cache=tmp_path)
    assert len(list(tmp_path.glob("replay-targets-*.safetensors"))) == 2  # one file per base model
    # Targets computed by another version of the code are never read.
    monkeypatch.setattr(lora, "CACHE_VERSION", lora.CACHE_VERSION + 1)
    lora.train(make_tiny(), data, replay, cfg, cache=tmp_path)
    assert len(list(tmp_path.glob("replay-targets-*.safetensors"))) == 3


def test_a_replay_example_given_twice_is_cached_once(make_tiny, tmp_path, caplog):
    data = synth.synthesize(FACTS, [1, 2, 3], None, seed=0)
    pair = ("Give me a tip for sleeping.", "Keep a regular bedtime.", True)
    cfg = dataclasses.replace(FAST, precision="fp32")
    lora.train(make_tiny(), data, [pair, ("Tell me a story.", "Once upon a time.", True), pair], cfg, cache=tmp_path)
    [path] = tmp_path.glob("replay-targets-*.safetensors")
    assert len(safetensors.torch.load_file(path)) == 4  # two examples: ids and log-probabilities of each
    stamp = path.stat().st_mtime_ns
    with caplog.at_level("WARNING", logger="memplug_lora.train"):
        lora.train(make_tiny(), data, [pair, ("Tell me a story.", "Once upon a time.", True), pair], cfg,
                   cache=tmp_path)
    assert "unreadable" not in caplog.text and path.stat().st_mtime_ns == stamp  # read back, not recomputed


def test_bf16_training_holds_frozen_weights_in_bf16_and_gives_them_back(make_tiny):
    lm = make_tiny()
    lm.model.set_attn_implementation("sdpa")
    lm.model.lm_head.weight = lm.model.get_input_embeddings().weight  # tied, as in SmolLM2
    text = lm.ids("<|im_start|>user\nWhere does Alice Brown live?<|im_end|>\n")
    weights = {n: p.detach().clone() for n, p in lm.model.named_parameters()}

    def run():
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            return lm.model(torch.tensor([text])).logits
    want = run()
    with lora._bf16_weights(lm.model, "cpu", "bf16"):
        assert lm.model.get_submodule("model.layers.0.mlp.up_proj").weight.dtype == torch.bfloat16
        assert lm.model.get_input_embeddings().weight.dtype == torch.float32
        assert lm.model.get_output_embeddings().weight.dtype == torch.bfloat16
        assert torch.equal(run(), want)  # autocast did the same rounding at every call
    assert all(torch.equal(p, weights[n]) and p.dtype == torch.float32 for n, p in lm.model.named_parameters())
    assert lm.model.get_output_embeddings().weight is lm.model.get_input_embeddings().weight

    seen = []
    result = lora.train(lm, synth.synthesize(FACTS, [1, 2, 3], None, seed=0), [("Hi.", "Hello.", True)],
                        dataclasses.replace(FAST, precision="bf16", epochs=1, min_steps=0),
                        progress=lambda stage, *_: seen.append((stage, lm.model.config._attn_implementation, {
                            p.dtype for n, p in lm.model.named_parameters() if "up_proj.base_layer" in n})))
    assert ("train", "eager", frozenset({torch.bfloat16})) in {(a, b, frozenset(c)) for a, b, c in seen}
    assert all(v.dtype == torch.float32 for v in result.state.values())
    assert lm.model.config._attn_implementation == "sdpa"
    assert all(p.dtype == torch.float32 for p in lm.model.parameters())


def test_applied_adapter_reproduces_the_trained_model_and_switches_back_exactly(make_tiny, trained):
    trainee, _, result = trained
    want = logits(trainee)
    serving = make_tiny()
    base = logits(serving)
    ref = ref_of(result)
    with serving._lock:
        serving._use_adapter(ref)
        # The adapter is stored in fp16: equal to the trained model within fp16 rounding.
        assert torch.allclose(logits(serving), want, atol=2e-3)
        assert not torch.allclose(logits(serving), base, atol=2e-3)
        serving._use_adapter(None)
        assert torch.equal(logits(serving), base)
        serving._use_adapter(ref)  # resident: no second load
        assert torch.allclose(logits(serving), want, atol=2e-3)
    assert list(serving._resident) == [ref.name]


def test_resident_adapters_are_bounded_least_recently_used_first(make_tiny, trained):
    _, _, result = trained
    serving = make_tiny()
    serving.max_adapters = 2
    refs = [ref_of(result, version=v) for v in (1, 2, 3)]
    with serving._lock:
        for r in refs[:2]:
            serving._use_adapter(r)
        serving._use_adapter(refs[0])  # 1 is now the most recent
        serving._use_adapter(refs[2])
    assert list(serving._resident) == [refs[0].name, refs[2].name]
    serving.drop_adapter(refs[2].name)
    assert serving._active is None and list(serving._resident) == [refs[0].name]


def _narrow(result, rank=2):
    """The same adapter cut to ``rank``: another shape of adapter."""
    state = {k: (v[:rank] if "lora_A" in k else v[:, :rank]).clone() for k, v in result.state.items()}
    return dataclasses.replace(result, state=state, peft_config={**result.peft_config, "r": rank})


def test_an_adapter_loaded_into_a_freed_slot_is_exact_and_the_dropped_one_leaves_nothing(make_tiny, trained):
    trainee, _, result = trained
    want = logits(trainee)
    serving = make_tiny()
    base = logits(serving)
    first, second = ref_of(result, version=1), ref_of(result, version=2)
    with serving._lock:
        serving._use_adapter(first)
    slot = serving._slot_of[first.name]
    serving.drop_adapter(first.name)
    assert serving._active is None and torch.equal(logits(serving), base)
    # The dropped adapter's tensors are gone from the model: its slot holds zeros until the next one.
    assert all(not p.any() for p in serving._slots[slot].params.values())
    modules = len(list(serving.model.modules()))
    with serving._lock:
        serving._use_adapter(second)
        assert serving._slot_of[second.name] == slot  # copied in: no module injected
        assert len(list(serving.model.modules())) == modules
        assert torch.allclose(logits(serving), want, atol=2e-3)
        serving._use_adapter(None)
        assert torch.equal(logits(serving), base)


def test_slots_are_kept_per_adapter_shape_within_the_bound(make_tiny, trained):
    _, _, result = trained
    serving = make_tiny()
    serving.max_adapters = 2
    narrow = _narrow(result)
    wide_refs = [ref_of(result, version=v) for v in (1, 2)]
    narrow_ref = AdapterRef("lora", Scope("bob"), 3, "tiny", (), "memory", 1,
                            lambda: adapter.unpack(*adapter.pack(narrow, "tiny", {}), "tiny", "adapter 3"))
    with serving._lock:
        for r in wide_refs:
            serving._use_adapter(r)
        assert len(serving._slots) == 2
        serving._use_adapter(narrow_ref)  # evicts the least recent; its slot is too wide, so it goes
        assert list(serving._resident) == [wide_refs[1].name, narrow_ref.name]
        assert len(serving._slots) == 2
        shapes = {serving._slots[serving._slot_of[n]].shape for n in serving._resident}
        assert len(shapes) == 2
        # The narrow adapter answers as the narrow model does: loaded fresh into another model, the same.
        got = logits(serving)
    other = make_tiny()
    with other._lock:
        other._use_adapter(narrow_ref)
        torch.testing.assert_close(logits(other), got, rtol=0, atol=0)


def test_an_adapter_that_does_not_fit_its_slot_is_refused_and_the_slot_stays_free(make_tiny, trained):
    _, _, result = trained
    serving = make_tiny()
    first = ref_of(result, version=1)
    with serving._lock:
        serving._use_adapter(first)
    serving.drop_adapter(first.name)
    short = dataclasses.replace(result, state={k: v for i, (k, v) in enumerate(result.state.items()) if i})
    with pytest.raises(ModelMismatch, match="does not fit tiny-llama: 1 missing and 0 unexpected"):
        serving.load_adapter(ref_of(short, version=2))
    assert serving._resident == {} and len(serving._slots) == 1
    with serving._lock:
        serving._use_adapter(ref_of(result, version=3))
    assert len(serving._slots) == 1


def test_an_adapter_first_loaded_inside_a_decode_can_be_dropped_and_its_slot_reused(make_tiny, trained):
    """A decode loads its adapter under inference mode; forget drops it later, outside."""
    trainee, _, result = trained
    serving = make_tiny()
    first, second = ref_of(result, version=1), ref_of(result, version=2)
    with serving._lock, torch.inference_mode():
        serving._use_adapter(first)
    slot = serving._slot_of[first.name]
    serving.drop_adapter(first.name)
    assert all(not p.any() for p in serving._slots[slot].params.values())
    with serving._lock:
        serving._use_adapter(second)
        assert serving._slot_of[second.name] == slot
        assert torch.allclose(logits(serving), logits(trainee), atol=2e-3)


def test_a_refused_adapter_of_a_new_shape_leaves_the_active_one_applied(make_tiny, trained):
    _, _, result = trained
    serving = make_tiny()
    doubled = dataclasses.replace(result, state={k: 2 * v if "lora_B" in k else v for k, v in result.state.items()})
    other, wide = ref_of(doubled, version=1), ref_of(result, version=2)  # slot0 and slot1
    narrow = _narrow(result)
    broken = dataclasses.replace(narrow, state={k: v for i, (k, v) in enumerate(narrow.state.items()) if i})
    with serving._lock:
        serving._use_adapter(other)
        serving._use_adapter(wide)
        want = logits(serving)
        with pytest.raises(ModelMismatch, match="1 missing"):
            serving._use_adapter(ref_of(broken, version=3))
        assert serving._active == wide.name and list(serving._resident) == [other.name, wide.name]
        assert len(serving._slots) == 2
        torch.testing.assert_close(logits(serving), want, rtol=0, atol=0)


def test_lowering_the_bound_gives_back_free_slots(make_tiny, trained):
    _, _, result = trained
    serving = make_tiny()
    refs = [ref_of(result, version=v) for v in (1, 2, 3)]
    with serving._lock:
        for r in refs:
            serving._use_adapter(r)
    for r in refs[:2]:
        serving.drop_adapter(r.name)
    assert len(serving._slots) == 3
    serving.max_adapters = 1
    with serving._lock:
        serving._use_adapter(ref_of(result, version=4))  # the bound: one slot, so the resident one goes
    assert len(serving._slots) == 1 and list(serving._resident) == [ref_of(result, version=4).name]


def test_adapter_of_another_model_is_refused(make_tiny, trained):
    _, _, result = trained
    serving = make_tiny()
    with pytest.raises(ModelMismatch, match="trained on model other"):
        serving.load_adapter(ref_of(result, fingerprint="other"))
    weights, config = adapter.pack(result, "other", {})
    with pytest.raises(ModelMismatch, match="trained on model other"):
        adapter.unpack(weights, config, "tiny", "adapter x")
    assert serving._resident == {}


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage", "config"])
def test_damaged_adapter_files_are_refused(make_tiny, trained, damage):
    _, _, result = trained
    weights, config = adapter.pack(result, "tiny", {})
    if damage == "truncate":
        weights = weights[: len(weights) // 2]
    elif damage == "flip":
        weights = bytearray(weights)
        weights[-10] ^= 0x40
        weights = bytes(weights)
    elif damage == "garbage":
        weights = b"\x00" * 64
    else:
        config = config.replace(b'"r": 4', b'"r": 5')
    with pytest.raises(ArtifactCorrupt, match="adapter x"):
        adapter.unpack(weights, config, "tiny", "adapter x")


def test_shared_prefix_decoding_equals_full_prompts(make_tiny):
    lm = make_tiny()
    prefix = "Sentence: one\nQuestion: two\n\nSentence:"
    tails = [" Alice Brown lives in Oslo.\nQuestion:", " Rex is a dog.\nQuestion:"]
    shared = lora.complete_lines(lm, prefix, tails, max_new_tokens=6)
    whole = [lora.complete_lines(lm, "", [prefix + t], max_new_tokens=6)[0] for t in tails]
    assert shared == whole


def test_training_above_a_first_layer_runs_on_kept_lower_layer_states(make_tiny):
    """With ``first_layer``, the unadapted lower layers run once per example: the states they give
    equal the full model's, and the adapter trained on them exists only above that layer."""
    lm = make_tiny()
    layers = lm.model.config.num_hidden_layers
    cut = layers // 2
    examples = [(lm.ids("Where does Alice Brown live?"), lm.ids("Oslo."), "fact"),
                (lm.ids("Hi"), lm.ids("Alice Brown lives in Oslo, in Norway."), "fact")]
    lower = lora._Lower.build(lm.model, cut, examples[0], lm.pad_id, "cpu")
    assert lower is not None and not lower.states
    lower.fill(examples)
    ids, mask = lora._tensors(examples, lm.pad_id, "cpu")
    with torch.no_grad():
        split = lower.hidden(examples, mask)
        full = lm.model.model(input_ids=ids, attention_mask=mask).last_hidden_state
    real = mask.bool()
    assert (split - full)[real].abs().max() < 1e-4
    assert len(lm.model.model.layers) == layers  # the model is whole again

    data = synth.synthesize(FACTS, [1, 2, 3], None, seed=0)
    result = lora.train(lm, data, [("Give me a tip for sleeping.", "Keep a regular bedtime.", True)],
                        dataclasses.replace(FAST, first_layer=cut))
    assert result.metrics["cached_lower_layers"] == cut
    adapted = {int(k.split(".layers.")[1].split(".")[0]) for k in result.state}
    assert adapted and min(adapted) == cut


def test_a_model_that_does_not_split_trains_whole():
    """A model whose layers cannot be run apart (no ``model.layers`` list) trains the whole model."""
    class Opaque(torch.nn.Module):
        model = torch.nn.Linear(2, 2)

    assert lora._Lower.build(Opaque(), 1, ([1], [2], "fact"), 0, "cpu") is None


def test_bench_lora_refuses_a_bad_setting_before_loading_anything(tmp_path):
    from benchmarks import lora as bench

    with pytest.raises(InvalidInput, match=r"setting 'x': unknown LoRA training option\(s\) bogus"):
        bench.run(sizes=(3, 4), settings={"x": {"bogus": 1}}, out_dir=tmp_path, home=tmp_path / "home",
                  isolate=True)
    with pytest.raises(InvalidInput, match="rank=0"):
        bench.run(sizes=(3,), settings={"x": {"rank": 0}}, out_dir=tmp_path, home=tmp_path / "home")
    assert not list(tmp_path.iterdir())  # nothing loaded, nothing written


def test_a_training_in_a_child_process_gives_what_it_gives_in_this_one(tiny_base, tmp_path):
    """The tier's default (``lora_isolate``) and its in-process path train the same adapter."""
    from memplug.runtime import child

    model, tok = tiny_base
    folder = tmp_path / "tiny-model"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    job = {"home": str(tmp_path), "model": str(folder), "statements": FACTS, "item_ids": [1, 2, 3], "cfg": FAST}
    here, fingerprint = lora.train_items(**job)
    seen = []
    there, child_fingerprint = child.call("memplug_lora.train:train_items", job,
                                          progress=lambda stage, *_: seen.append(stage))
    assert child_fingerprint == fingerprint
    assert seen[0] == "synthesize" and "train" in seen
    assert there.recall == here.recall
    assert there.state.keys() == here.state.keys()
    for name, tensor in here.state.items():
        torch.testing.assert_close(there.state[name], tensor, rtol=0, atol=0, msg=name)


def test_by_margin_counts_the_lost_answers_in_the_band_of_the_base_models_margin():
    from benchmarks.lora import _band, by_margin

    margins = {"a": 0.05, "b": -1e-7, "c": 0.1, "d": 0.7, "e": 1.0, "f": 3.5}
    rows = by_margin(margins, ["b", "c", "f"], bands=(0.1, 1.0))
    assert [(r["from"], r["to"], r["right"], r["lost"]) for r in rows] == \
        [(0.0, 0.1, 2, 1), (0.1, 1.0, 2, 1), (1.0, None, 2, 1)]  # an edge belongs to the band above it
    assert [_band(r) for r in rows] == ["<0.1", "0.1-1", ">=1"]
    assert sum(r["right"] for r in by_margin(margins, [])) == len(margins)
    with pytest.raises(InvalidInput, match="'zzz'"):  # a lost answer the base model never got right
        by_margin(margins, ["a", "zzz"])
    with pytest.raises(InvalidInput, match="rising"):
        by_margin(margins, [], bands=(1.0, 0.5))


def test_answer_margins_tell_sure_answers_from_coin_tosses(memory):
    """The benchmark's margin of a general answer (real SmolLM2): a greedy reply it is sure of
    scores well above 0, and a reply it would not give scores below 0."""
    from benchmarks.lora import SURE_MARGIN, answer_margins, answered, general_replies

    lm = memory.model
    question = {"question": "What is the capital city of Japan?", "answers": ["tokyo"]}
    (reply,) = general_replies(lm, [question])
    assert answered(question, reply), reply
    (sure,) = answer_margins(lm, [question], [reply])
    assert sure > SURE_MARGIN
    (forced,) = answer_margins(lm, [{**question, "answers": ["kyoto"]}], ["The capital city of Japan is Kyoto."])
    assert forced < 0


def test_replay_never_asks_the_benchmarks_general_questions():
    """Training holds the model to its own answers on the replay prompts; the benchmark's general
    questions measure what training did to the model, so none of them may be among those prompts."""
    from benchmarks.lora import general_questions, near_questions

    prompts = {" ".join(p.lower().split()) for p in lora.replay_prompts()}
    asked = {" ".join(q["question"].lower().split()) for q in general_questions() + near_questions()}
    assert len(prompts) == len(lora.replay_prompts())
    assert not prompts & asked, prompts & asked


def test_the_general_questions_are_distinct_and_never_give_their_answer_away():
    """A question that holds one of its own accepted answers ("six minus three": "three") is
    answered right by any reply that repeats it; only a choice question names its options."""
    from benchmarks.lora import general_questions

    topics = {"geography", "animals", "words", "numbers", "science and nature", "everyday things", "colours", "time",
              "body", "culture"}
    questions = general_questions()
    asked = [" ".join(q["question"].lower().split()) for q in questions]
    assert len(set(asked)) == len(asked) > 400
    for q, text in zip(questions, asked, strict=True):
        assert q["answers"] and all(a == a.lower() and a.strip() for a in q["answers"]), q
        assert q["topic"] in topics, q
        if " or " not in text:
            assert not [a for a in q["answers"] if a in text], q


def test_the_near_miss_questions_cover_every_value_a_fact_can_name_and_are_their_own_set():
    """One general question per value of the fact generator (a city, job, kind of pet, colour,
    instrument, sport, dish), none of them a general question too, none giving its answer away."""
    from benchmarks.lora import general_questions, near_questions
    from memplug.checks import facts

    values = facts.CITIES + facts.JOBS + facts.PETS + facts.COLOURS + facts.INSTRUMENTS + facts.SPORTS + facts.FOODS
    questions = near_questions()
    assert sorted(q["near"] for q in questions) == sorted(values)
    asked = [" ".join(q["question"].lower().split()) for q in questions]
    assert len(set(asked)) == len(asked)
    assert not set(asked) & {" ".join(q["question"].lower().split()) for q in general_questions()}
    for q, text in zip(questions, asked, strict=True):
        assert q["answers"] and all(a == a.lower() and a.strip() for a in q["answers"]), q
        if " or " not in text:
            assert not [a for a in q["answers"] if a in text], q


def test_a_general_answer_counts_where_a_word_starts_and_a_number_ends():
    from benchmarks.lora import answered

    def q(*answers):
        return {"question": "?", "answers": list(answers)}

    assert answered(q("lung"), "When we breathe in, the lungs fill")
    assert answered(q("india"), "located in the Indian subcontinent")
    assert answered(q(" ate"), 'The past tense of eat is "ate".')
    assert answered(q("60", "sixty"), "An hour has 60 minutes.")
    assert not answered(q("10", "ten"), "a concept in mathematics, often misunderstood")
    assert not answered(q("cat"), "a well-known example of a domesticated animal")
    assert not answered(q("hot", "warm"), "The opposite of cold is lukewarm.")
    assert not answered(q("60", "sixty"), "An hour is equivalent to 360")
    assert not answered(q("60"), "600 seconds")
    assert answered(q(".net"), "I write .net code") and not answered(q("", " "), "anything at all")


def test_a_reply_still_being_written_does_not_stop_on_a_number_that_may_grow():
    """``general_replies`` stops a reply once it answers; "60" must not stop "600" half-way."""
    from benchmarks.lora import answered_so_far

    sixty, six_hundred = {"answers": ["60"]}, {"answers": ["600"]}
    growing = ["It is 6", "It is 60", "It is 600", "It is 600 seconds"]
    assert [answered_so_far(sixty, t) for t in growing] == [False, False, False, False]
    assert [answered_so_far(six_hundred, t) for t in growing] == [False, False, False, True]
    assert answered_so_far(sixty, "It is 60 minutes")


def test_near_misses_are_picked_by_whole_words_and_replies_checked_for_the_users_values():
    from benchmarks.lora import naming, near

    questions = [{"near": "Bled", "question": "In which country is Lake Bled?", "answers": ["slovenia"]},
                 {"near": "owl", "question": "Is an owl awake at night?", "answers": ["awake"]},
                 {"near": "pad thai", "question": "From which country does pad thai come?", "answers": ["thailand"]}]
    statements = ["Ka Vor lives in Wimbledon.", "Mi Kowl has a pet OWL called Tofu.", "Ta Ash likes pad thai."]
    assert [q["near"] for q in near(questions, statements)] == ["owl", "pad thai"]
    asked = [{"question": q} for q in ("What is it?", "What is it?", "What is it?", "What is it?", "Is Tofu a dish?")]
    replies = ["It is Tofu.", "Tofurky", "The code is AB-1234.", "none", "Tofu is a dish."]
    assert naming(asked, replies, ["Tofu", "AB-1234"]) == [True, False, True, False, False]
    assert naming(asked[:1], ["anything"], []) == [False]


def test_near_misses_are_served_by_the_adapter_only_where_the_gate_routes_them(trained):
    from benchmarks.lora import _near_misses, general_replies

    lm, _, _ = trained
    questions = [{"near": "Oslo", "question": "In which country is Oslo?", "answers": ["norway"]},
                 {"near": "parrot", "question": "What kind of animal is a parrot?", "answers": ["bird"]}]
    replies = general_replies(lm, questions)
    base = ["It is in Norway.", "A parrot is a bird called Rex."]
    none = _near_misses(lm, questions, base, [False, False], ["Rex"])
    every = _near_misses(lm, questions, base, [True, True], ["Rex"])
    assert none["served_right"] == none["base_right"] == 2 and none["served_naming"] == none["base_naming"] == 1
    assert [r["base"] for r in none["replies"]] == base and [r["adapter"] for r in every["replies"]] == replies
    assert none["routed"] == 0 and every["routed"] == 2 and every["routed_questions"] == [q["question"] for q in questions]
    right = sum(any(a in r.lower() for a in q["answers"]) for q, r in zip(questions, replies, strict=True))
    assert every["served_right"] == every["adapter_right"] == right
    assert len(every["lost"]) == 2 - right
    empty = _near_misses(lm, [], [], [], ["Rex"])  # facts that name no value of the set (codes, years)
    assert empty["questions"] == empty["routed"] == empty["served_right"] == 0 and empty["replies"] == []


def test_the_bf16_control_counts_answers_that_rounding_the_weights_changes_and_puts_them_back(trained):
    from benchmarks.lora import general_replies, rounded_control

    lm, _, _ = trained
    asked = [{"question": q, "answers": []} for q in ("Name a colour.", "Name a city.", "Name a month.", "Count to 3.")]
    replies = general_replies(lm, asked)
    # Right as it is: each reply's first word is the accepted answer of half the questions.
    questions = [{"question": q["question"], "answers": [r.split()[0].lower()] if k % 2 == 0 and r.split() else ["\x00"]}
                 for k, (q, r) in enumerate(zip(asked, replies, strict=True))]
    right = [k % 2 == 0 and bool(r.split()) for k, r in enumerate(replies)]
    before = logits(lm)
    out = rounded_control(lm, questions, right, [True] * sum(right))
    assert torch.equal(logits(lm), before)  # the fp32 weights are back
    assert 0 <= out["lost"] == out["sure_lost"] <= sum(right) and out["gained"] == 0
    assert out["drop_points"] == pytest.approx(100 * out["lost"] / max(1, sum(right)))
    was_right = {q["question"] for q, ok in zip(questions, right, strict=True) if ok}
    assert len(out["general_lost"]) == out["lost"] and set(out["general_lost"]) <= was_right


def test_a_random_adapter_is_as_large_as_the_trained_one_module_by_module(trained):
    """The benchmark's control: every LoRA update B @ A replaced by a random one of the same norm."""
    from benchmarks.lora import random_adapter

    lm, _, _ = trained

    def updates(model):
        return {name: (m.lora_B["default"].weight.float() @ m.lora_A["default"].weight.float()).detach().clone()
                for name, m in model.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}

    first, second = copy.deepcopy(lm.model), copy.deepcopy(lm.model)
    before = updates(lm.model)
    norm = random_adapter(first, seed=3)
    random_adapter(second, seed=3)
    after, again = updates(first), updates(second)
    assert before and set(after) == set(before)
    assert norm == pytest.approx(sum(float(u.norm()) ** 2 for u in before.values()) ** 0.5, rel=1e-4)
    for name, update in before.items():
        assert torch.allclose(after[name].norm(), update.norm(), rtol=1e-4)
        assert not torch.allclose(after[name], update)
        assert torch.equal(after[name], again[name])
    random = LocalModel(first, lm.tokenizer, fingerprint="tiny", name="tiny-llama", device="cpu", rotary=True)
    assert not torch.allclose(logits(lm), logits(random))
