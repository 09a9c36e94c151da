"""`python -m benchmarks.speed`: times the kv and lora tiers with a model's architecture and random weights."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from benchmarks import speed
from memplug import InvalidInput
from memplug.runtime import model as model_cache


@pytest.fixture
def bundle_dir(tiny_parts, tmp_path):
    """What ``prepare`` writes for a tiny config-built model (saved as a model folder, the ``model`` setting):
    its config and tokenizer, the training set for 3 facts and the replay set."""
    model, tok = tiny_parts
    folder = tmp_path / "tiny-model"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return speed.prepare(tmp_path / "input", sizes=(3,), seed=7, home=tmp_path / "home", model=str(folder))


def test_prepare_writes_the_models_architecture_tokenizer_and_training_sets(bundle_dir, tiny_parts):
    model, tok = tiny_parts
    bundle = json.loads((bundle_dir / speed.BUNDLE).read_text())
    assert list(bundle["sets"]) == ["3"] and bundle["seed"] == 7
    items = bundle["sets"]["3"]
    assert [d["item_id"] for d in items] == [0, 1, 2]
    assert all(d["train"] and d["statement"] for d in items)
    assert len(bundle["replay"]) > 100 and all(len(p) == 3 for p in bundle["replay"])
    config = json.loads((bundle_dir / "model" / "config.json").read_text())
    assert config["hidden_size"] == model.config.hidden_size and "quantization_config" not in config
    assert (bundle_dir / "model" / "tokenizer.json").is_file()
    assert not list((bundle_dir / "model").glob("*.safetensors"))  # no weights travel


def test_a_run_times_training_switching_and_kv_on_random_weights(bundle_dir, tmp_path):
    out = tmp_path / "out"
    before = set(model_cache._loaded)
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
    assert 0 < ttft["memory_tokens"] <= 64 and ttft["cold_s"] > 0 and ttft["hot_s"] > 0 and ttft["recompute_s"] > 0
    assert result["lora"]["3"]["steps"] == run3["steps"]
    # Every model the run loaded went with its temporary folder: none is kept in the process's cache.
    assert set(model_cache._loaded) == before


def test_the_command_passes_its_options_through(bundle_dir, tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setattr(speed, "run", lambda input_dir, **kw: seen.update(input_dir=input_dir, **kw))
    result = CliRunner().invoke(speed.main, ["--input", str(bundle_dir), "--facts", "3",
                                       "--device", "cpu", "--out", str(tmp_path / "o"), "--name", "speed-cpu"])
    assert result.exit_code == 0, result.output
    assert seen["input_dir"] == str(bundle_dir) and seen["sizes"] == [3] and seen["device"] == "cpu"
    assert seen["out_dir"] == str(tmp_path / "o") and seen["name"] == "speed-cpu"
    CliRunner().invoke(speed.main, ["--input", str(bundle_dir)])
    assert seen["sizes"] is None  # every prepared size
    bad = CliRunner().invoke(speed.main, ["--input", str(bundle_dir), "--facts", "3,x"])
    assert bad.exit_code == 2 and "--facts takes numbers" in bad.output


def test_a_result_name_that_is_not_a_file_name_is_refused(bundle_dir, tmp_path):
    with pytest.raises(InvalidInput, match="must be a plain file name"):
        speed.run(bundle_dir, out_dir=tmp_path, device="cpu", name="../elsewhere")


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
    neither = runner.invoke(speed.main, ["--out", str(tmp_path)])
    both = runner.invoke(speed.main, ["--prepare", str(tmp_path), "--input", str(tmp_path)])
    for result in (neither, both):
        assert result.exit_code == 2 and "give one of --prepare DIR" in result.output
    missing = runner.invoke(speed.main, ["--input", str(tmp_path / "none"), "--out", str(tmp_path)])
    assert missing.exit_code != 0 and "bundle.json is missing" in " ".join(missing.output.split())
