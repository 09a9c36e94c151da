"""The kv benchmark runs end to end on a few facts (slow: it answers with the real SmolLM2)."""

import json

import pytest


@pytest.mark.slow
def test_bench_kv_writes_results(tmp_path):
    from benchmarks.kv import run

    result = run(n_facts=4, compositions=(1, 2), methods=["none", "text", "int4", "int4-rc2"], ttft_tokens=(64,),
                 ttft_items=(1, 4), out_dir=tmp_path, repair=2)
    saved = json.loads((tmp_path / "kv.json").read_text())
    assert saved["accuracy"]["text"]["2"]["questions"] == 4
    assert saved["sizes"]["int4"]["vs_fp16_kv"] < 0.35
    assert saved["accuracy"]["int4-rc2"]["2"]["questions"] == 4
    for items in (1, 4):
        r = saved["ttft"][f"64x{items}"]
        assert r["items"] == items and r["memory_tokens"] <= 64 and r["repair_tokens"] == 2
        assert min(r["cold_s"], r["hot_s"], r["repaired_s"], r["per_item_s"], r["recompute_s"]) > 0
    assert (tmp_path / "kv.png").is_file()
    assert result["accuracy"]["none"]["1"]["direct"] <= result["accuracy"]["text"]["1"]["direct"]
