"""`memplug bench speed`: times the kv and lora tiers with a model's architecture and random weights."""

from __future__ import annotations

import json
from dataclasses import asdict

import pytest
from click.testing import CliRunner

from memplug import InvalidInput
from memplug.bench import speed
from memplug.cli import main
from memplug.runtime import synth

FACTS = ["Alice Brown lives in Oslo.", "The code word for the vault is parrot.", "Rex is the name of Tom's dog."]


@pytest.fixture
def bundle_dir(tiny_parts, tmp_path):
    """The input ``prepare`` writes, for a tiny config-built model: its config and tokenizer, a training set
    for 3 facts and a replay pair."""
    model, tok = tiny_parts
    folder = tmp_path / "input"
    model.config.save_pretrained(folder / "model")
    tok.save_pretrained(folder / "model")
    data = synth.synthesize(FACTS, [0, 1, 2], None, seed=0)
    bundle = {"model": "tiny-llama", "fingerprint": "tiny", "seed": 7, "sets": {"3": [asdict(d) for d in data]},
              "replay": [["Give me a tip for sleeping.", "Keep a regular bedtime.", True]], "date": "2026-01-01"}
    (folder / speed.BUNDLE).write_text(json.dumps(bundle))
    return folder


def test_a_run_times_training_switching_and_kv_on_random_weights(bundle_dir, tmp_path):
    out = tmp_path / "out"
    result = speed.run(bundle_dir, out_dir=out, device="cpu", ttft_tokens=(64,), kv_facts=8)
    written = json.loads((out / "speed.json").read_text())
    assert written["device"] == "cpu" and written["weights"].startswith("random")
    run3 = written["lora"]["3"]
    assert run3["facts"] == 3 and run3["steps"] > 0 and run3["train_s"] > 0 and run3["synthesis_s"] > 0
    assert run3["examples"] >= sum(len(d["train"]) for d in json.loads((bundle_dir / speed.BUNDLE).read_text())
                                   ["sets"]["3"])
    assert written["lora"]["first_training_s"] > 0
    switch = written["lora"]["switch"]
    assert switch["switch_s"] > 0 and switch["cold_load_s"] > 0 and switch["base_switch_s"] > 0
    assert switch["first_load_s"] > 0  # the run's model had no adapter before: its first load injected one
    assert written["lora"]["adapter_bytes"] > 0
    assert written["kv"]["encode_items_per_s"] > 0
    ttft = written["kv"]["ttft"]["64"]
    assert 0 < ttft["memory_tokens"] <= 64 and ttft["kv_s"] > 0 and ttft["recompute_s"] > 0
    assert result["lora"]["3"]["steps"] == run3["steps"]


def test_a_missing_bundle_or_size_is_refused_before_anything_runs(bundle_dir, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(InvalidInput, match=r"bundle\.json is missing or unreadable.*--prepare"):
        speed.run(tmp_path / "nowhere", out_dir=out, device="cpu")
    with pytest.raises(InvalidInput, match=r"no training set for 50 facts .*\(it has 3\)"):
        speed.run(bundle_dir, out_dir=out, sizes=[3, 50], device="cpu")
    (bundle_dir / speed.BUNDLE).write_text('{"model": "tiny-llama", "seed": 7}')
    with pytest.raises(InvalidInput, match=r"lacks sets, replay, date"):
        speed.run(bundle_dir, out_dir=out, device="cpu")
    (bundle_dir / speed.BUNDLE).write_text("{not json")
    with pytest.raises(InvalidInput, match="unreadable"):
        speed.run(bundle_dir, out_dir=out, device="cpu")
    assert not out.exists()


def test_the_command_takes_one_of_prepare_or_input(tmp_path):
    runner = CliRunner()
    neither = runner.invoke(main, ["bench", "speed", "--out", str(tmp_path)])
    both = runner.invoke(main, ["bench", "speed", "--prepare", str(tmp_path), "--input", str(tmp_path)])
    for result in (neither, both):
        assert result.exit_code == 2 and "give one of --prepare DIR" in result.output
    missing = runner.invoke(main, ["bench", "speed", "--input", str(tmp_path / "none"), "--out", str(tmp_path)])
    assert missing.exit_code != 0 and "bundle.json is missing" in " ".join(missing.output.split())
