"""The kv benchmark runs end to end on a few facts (slow: it answers with the real SmolLM2)."""

import json

import pytest


@pytest.mark.slow
def test_bench_kv_writes_results(tmp_path):
    from benchmarks.kv import run

    result = run(n_facts=4, compositions=(1, 2), methods=["none", "text", "int4"], ttft_tokens=(64,),
                 out_dir=tmp_path)
    saved = json.loads((tmp_path / "kv.json").read_text())
    assert saved["accuracy"]["text"]["2"]["questions"] == 4
    assert saved["sizes"]["int4"]["vs_fp16_kv"] < 0.35
    assert saved["ttft"]["64"]["memory_tokens"] <= 64 and saved["ttft"]["64"]["kv_s"] > 0
    assert (tmp_path / "kv.png").is_file()
    assert result["accuracy"]["none"]["1"]["direct"] <= result["accuracy"]["text"]["1"]["direct"]
