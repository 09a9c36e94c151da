"""The explicit-memory machinery on a tiny Llama built from a config: positions, rotation, codecs.

Only shapes and arithmetic matter here, so random weights do; the real model is
exercised in test_kv_tier.py.
"""

from __future__ import annotations

import copy
import logging
import warnings

import pytest
import torch

from memplug import ArtifactCorrupt, ConfigError, ModelMismatch
from memplug.runtime.chat import LocalModel
from memplug.runtime.kv import KVChunk, rotate
from memplug_kv.codec import Codec, decode, encode
from memplug_kv.encode import encode as encode_items
from memplug_kv.encode import select_tokens, thin

FACTS = ["Alice Brown lives in Oslo and keeps three cats.", "The code word for the vault is parrot."]


@pytest.fixture(scope="module")
def tiny(tiny_parts):
    model, tok = tiny_parts
    return LocalModel(copy.deepcopy(model), tok, fingerprint="tiny", name="tiny-llama", device="cpu", rotary=True)


def full_prefill_logits(lm, token_ids):
    with torch.inference_mode():
        return lm.model(torch.tensor([token_ids])).logits[0, -1]


def test_injected_kv_matches_full_prefill(tiny):
    chunk = encode_items(tiny, [FACTS[0]], [7])[0]
    closing = tiny.ids(tiny.layout("Where does Alice live?")[1])
    reference = full_prefill_logits(tiny, tiny.preamble()[0] + tiny.chunk_ids(FACTS[0]) + closing)
    assert (logits_after(tiny, [chunk], closing) - reference).abs().max() <= 1e-3


def test_second_chunk_lands_at_its_offset(tiny):
    # The second chunk was encoded right after the preamble; injected after the first,
    # its keys must equal a prefill's up to the context it did not see, so its
    # *rotation* is checked directly: rotating back by its offset restores the stored keys.
    a, b = encode_items(tiny, FACTS, [1, 2])
    cache, position, stored = tiny.build_cache([a, b])
    p = len(tiny.preamble()[0])
    assert position == p + a.span + b.span and stored == position
    layer0 = cache.layers[0].keys[0]
    placed = layer0[:, p + a.span:]
    assert torch.allclose(rotate(placed, -(p + a.span), tiny.inv_freq), b.keys[0], atol=1e-5)


def test_rotation_round_trip_is_exact():
    inv_freq = 1.0 / (10000 ** (torch.arange(0, 64, 2).float() / 64))
    keys = torch.randn(2, 3, 5, 64)
    assert torch.allclose(rotate(rotate(keys, 1234, inv_freq), -1234, inv_freq), keys, atol=1e-5)


def test_building_a_cache_leaves_the_chunks_alone(tiny):
    chunk = encode_items(tiny, [FACTS[1]], [3])[0]
    before = chunk.keys.clone()
    cache, _, _ = tiny.build_cache([chunk])
    cache.layers[0].keys.zero_()
    assert torch.equal(chunk.keys, before)
    assert not torch.equal(tiny.preamble()[1][0], torch.zeros_like(tiny.preamble()[1][0]))


def test_decode_batches_rows_of_different_lengths_like_single_rows(tiny):
    chunk = encode_items(tiny, [FACTS[0]], [1])[0]
    rows = [tiny.ids(tiny.layout(q)[1]) for q in ("Where?", "Where does Alice Brown live, and with whom?")]
    batched = [t.tolist() for t in tiny.decode([chunk], rows, max_new_tokens=4)]
    for i, row in enumerate(rows):
        single = [int(t[0]) for t in tiny.decode([chunk], [row], max_new_tokens=4)]
        assert [step[i] for step in batched][:len(single)] == single


def test_rows_that_stop_leave_the_batch_and_the_others_decode_as_if_alone(tiny):
    """A finished row is dropped from the batch (its later steps cost nothing); it yields padding,
    and the rows still running give the tokens they give alone."""
    chunk = encode_items(tiny, [FACTS[0]], [1])[0]
    rows = [tiny.ids(tiny.layout(q)[1]) for q in ("Where?", "Where does Alice Brown live, and with whom?", "Who?")]
    steps = [t.tolist() for t in tiny.decode([chunk], rows, max_new_tokens=6,
                                             stop=lambda i, tokens: i != 1 and len(tokens) >= 2)]
    for i, row in enumerate(rows):
        single = [int(t[0]) for t in tiny.decode([chunk], [row], max_new_tokens=6)]
        got = [step[i] for step in steps]
        n = min(len(single), 2 if i != 1 else 6)
        assert got[:n] == single[:n]
        if i != 1:
            assert all(t == tiny.pad_id for t in got[2:])


@pytest.mark.parametrize("name,bits,tolerance", [("fp16", 16, 2e-3), ("bf16", 16, 2e-2), ("int8", 8, 0.02),
                                                  ("int4", 4, 0.25), ("int3", 3, 0.5), ("int2", 2, 1.0)])
def test_codecs_round_trip_within_their_precision(tiny, name, bits, tolerance):
    chunk = encode_items(tiny, [FACTS[0]], [11])[0]
    layout = {"layers": tiny.layers, "kv_heads": tiny.kv_heads, "head_dim": tiny.head_dim}
    codec = Codec(name, group=8)
    blob = encode(chunk, codec, "tiny", layout)
    back = decode(blob, fingerprint="tiny", layout=layout, where="test")
    assert back.item_id == 11 and back.span == chunk.span
    scale = chunk.keys.abs().max()
    assert (back.keys - chunk.keys).abs().max() <= tolerance * scale
    fp16_bytes = chunk.keys.numel() * 2 * 2
    if bits < 16:
        payload = len(blob) - len(encode(KVChunk(11, chunk.span, chunk.keys[:, :, :0], chunk.values[:, :, :0]),
                                         codec, "tiny", layout))
        # Packed values plus one fp16 scale and minimum per group of 8 channels.
        assert payload <= fp16_bytes * (bits / 16 + 2 / 8) + 4096


def test_blob_from_another_model_is_refused(tiny):
    chunk = encode_items(tiny, [FACTS[0]], [1])[0]
    layout = {"layers": tiny.layers, "kv_heads": tiny.kv_heads, "head_dim": tiny.head_dim}
    blob = encode(chunk, Codec("int8"), "other-model", layout)
    with pytest.raises(ModelMismatch, match="other-model"):
        decode(blob, fingerprint="tiny", layout=layout, where="item 1")
    with pytest.raises(ModelMismatch, match="layers"):
        decode(encode(chunk, Codec("int8"), "tiny", layout), fingerprint="tiny",
               layout={**layout, "layers": 30}, where="item 1")


def test_truncated_or_altered_blob_is_a_clear_error(tiny):
    chunk = encode_items(tiny, [FACTS[0]], [1])[0]
    layout = {"layers": tiny.layers, "kv_heads": tiny.kv_heads, "head_dim": tiny.head_dim}
    blob = encode(chunk, Codec("int4"), "tiny", layout)
    for bad in (blob[: len(blob) // 2], blob[:5], b"", b"x" * 100):
        with pytest.raises(ArtifactCorrupt, match="item 9"):
            decode(bad, fingerprint="tiny", layout=layout, where="item 9")
    flipped = bytearray(blob)
    flipped[-3] ^= 0xFF
    with pytest.raises(ArtifactCorrupt, match="checksum"):
        decode(bytes(flipped), fingerprint="tiny", layout=layout, where="item 9")


def test_token_selection_keeps_the_protected_and_the_best():
    scores = torch.tensor([0.0, 5.0, 1.0, 4.0, 0.5, 0.1])
    # Half of six is three: the protected first and last tokens, then the best of the rest.
    assert select_tokens(scores, 0.5).tolist() == [0, 1, 5]
    assert select_tokens(scores, 0.67).tolist() == [0, 1, 3, 5]
    assert select_tokens(scores, 1.0).tolist() == list(range(6))
    chunk = KVChunk(1, 6, torch.randn(2, 1, 6, 4), torch.randn(2, 1, 6, 4), scores)
    kept = thin(chunk, 0.5)
    assert kept.span == 6 and kept.stored_tokens == 3
    assert torch.equal(kept.keys[:, :, 1], chunk.keys[:, :, 1])


def test_selected_tokens_keep_their_positions(tiny):
    chunk = encode_items(tiny, [FACTS[0]], [1])[0]
    kept = thin(chunk, 0.5)
    cache, position, stored = tiny.build_cache([kept])
    assert position == len(tiny.preamble()[0]) + chunk.span
    assert stored == len(tiny.preamble()[0]) + kept.stored_tokens


@pytest.mark.parametrize("kwargs", [{"name": "int5"}, {"group": 3}, {"keep": 0.0}, {"keep": 1.5}])
def test_bad_codec_settings_are_refused(kwargs):
    with pytest.raises(ConfigError):
        Codec(**kwargs)


def test_rows_with_different_memories_batch_like_single_rows(tiny):
    a, b = encode_items(tiny, FACTS, [1, 2])
    rows = [tiny.ids(tiny.layout(q)[1]) for q in ("Where does Alice live?", "What is the code word?")]
    batched = [t.tolist() for t in tiny.decode([], rows, max_new_tokens=4, per_row_chunks=[[a], [a, b]])]
    for i, (row, chunks) in enumerate(zip(rows, [[a], [a, b]], strict=True)):
        single = [int(t[0]) for t in tiny.decode(chunks, [row], max_new_tokens=4)]
        assert [step[i] for step in batched][:len(single)] == single


def test_encoding_and_decoding_use_the_cache_argument_the_installed_transformers_names(tiny, caplog):
    """transformers 5 renamed the forward's ``past_key_values`` to ``cache``: passing the old name
    warns at every call, and reading it from the output logs a deprecation. A user's decode
    must do neither."""
    from transformers.utils import logging as hf_logging

    logging.Logger.warning_once.cache_clear()  # transformers logs each message once per process
    hf_logging.enable_propagation()
    try:
        with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING):
            warnings.simplefilter("always")
            chunk = encode_items(tiny, [FACTS[0]], [1])[0]
            row = tiny.ids(tiny.layout("Where does Alice Brown live?")[1])
            list(tiny.decode([chunk], [row], max_new_tokens=3))
    finally:
        hf_logging.disable_propagation()
    assert not [w for w in caught if "past_key_values" in str(w.message)]
    assert not [r for r in caplog.records if "past_key_values" in r.getMessage()]


# -- packs: several items in one set of tensors, placed in one step -------------------------------


def logits_after(lm, memory, closing_ids, recompute=0):
    cache, position, stored = lm.build_cache(memory, recompute=recompute)
    n = len(closing_ids)
    with torch.inference_mode():
        out = lm.model(torch.tensor([closing_ids]), **{lm._cache_kw: cache},
                       position_ids=torch.arange(position, position + n)[None],
                       attention_mask=torch.ones(1, stored + n, dtype=torch.long))
    return out.logits[0, -1]


def test_an_uncompressed_pack_placed_on_the_device_path_matches_full_prefill(tiny):
    from memplug_kv.codec import compress, parse, serialize

    chunk = encode_items(tiny, [FACTS[0]], [7])[0]
    layout = {"layers": tiny.layers, "kv_heads": tiny.kv_heads, "head_dim": tiny.head_dim}
    pack = parse(serialize(compress([chunk], Codec("fp32")), "tiny", layout), fingerprint="tiny", layout=layout,
                 where="test")
    closing = tiny.ids(tiny.layout("Where does Alice live?")[1])
    reference = full_prefill_logits(tiny, tiny.preamble()[0] + tiny.chunk_ids(FACTS[0]) + closing)
    assert (logits_after(tiny, pack, closing) - reference).abs().max() <= 1e-3


def test_reading_every_token_again_equals_a_full_prefill_of_the_composed_items(tiny):
    from memplug_kv.codec import compress

    pack = compress(encode_items(tiny, FACTS, [1, 2]), Codec("fp32"))
    closing = tiny.ids(tiny.layout("What is the code word?")[1])
    reference = full_prefill_logits(tiny, tiny.preamble()[0] + tiny.chunk_ids(FACTS[0]) + tiny.chunk_ids(FACTS[1])
                                    + closing)
    apart = logits_after(tiny, pack, closing)
    assert (apart - reference).abs().max() > 1e-3  # encoded apart, the second item never saw the first
    assert (logits_after(tiny, pack, closing, recompute=10_000) - reference).abs().max() <= 1e-3


def test_recompute_changes_the_first_tokens_of_items_that_follow_others_only(tiny):
    from memplug_kv.codec import compress

    a, b = encode_items(tiny, FACTS, [1, 2])
    pack = compress([a, b], Codec("fp32"))
    p = len(tiny.preamble()[0])
    plain, _, _ = tiny.build_cache(pack)
    repaired, _, _ = tiny.build_cache(pack, recompute=2)
    changed = [(plain.layers[layer].keys[0] - repaired.layers[layer].keys[0]).abs().amax(dim=(0, 2)) > 1e-4
               for layer in range(1, tiny.layers)]  # layer 0's keys depend on the token alone
    changed = torch.stack(changed).any(dim=0).nonzero().squeeze(1).tolist()
    # The first item already read everything before it; the second's first two tokens now see the first.
    assert changed == [p + a.span, p + a.span + 1]


def test_an_int4_pack_expands_like_its_items_one_by_one(tiny):
    from memplug_kv.codec import compress

    a, b = encode_items(tiny, FACTS, [1, 2])
    layout = {"layers": tiny.layers, "kv_heads": tiny.kv_heads, "head_dim": tiny.head_dim}
    pack = compress([a, b], Codec("int4", group=8))
    one_by_one = [decode(encode(c, Codec("int4", group=8), "tiny", layout), fingerprint="tiny", layout=layout,
                         where="t") for c in (a, b)]
    for got, want in zip(pack.chunks(), one_by_one, strict=True):
        assert got.item_id == want.item_id and torch.equal(got.keys, want.keys) and torch.equal(got.values, want.values)
    picked = pack.select([2])
    assert picked.item_ids == (2,) and torch.equal(picked.chunks()[0].keys, one_by_one[1].keys)
    assert picked.keys["q"].data_ptr() != pack.keys["q"].data_ptr()  # new tensors, never views
    cache, position, _ = tiny.build_cache(pack.select([2, 1]))
    assert position == len(tiny.preamble()[0]) + a.span + b.span


def test_a_pack_whose_index_does_not_match_its_tensors_is_refused(tiny):
    import json

    from safetensors.torch import load, save

    from memplug_kv.codec import compress, header, parse, serialize

    layout = {"layers": tiny.layers, "kv_heads": tiny.kv_heads, "head_dim": tiny.head_dim}
    data = serialize(compress(encode_items(tiny, FACTS, [1, 2]), Codec("int4")), "tiny", layout)
    meta = header(data)
    index = json.loads(meta["items"])
    index[1]["tokens"] += 3
    tensors = load(data)
    tampered = save(tensors, metadata={**meta, "items": json.dumps(index)})
    with pytest.raises(ArtifactCorrupt, match="pack 7.*tile"):
        parse(tampered, fingerprint="tiny", layout=layout, where="7")


def test_injection_costs_are_timed_on_the_model(tiny):
    costs = tiny.injection_costs(tokens=64, items=4, repeats=1)
    assert costs["inject_ms_per_token"] > 0 and costs["prefill_ms_per_token"] > 0
