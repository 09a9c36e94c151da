"""The demo on a short script: two users tell, then ask; hot facts climb to KV and are answered from it."""

from __future__ import annotations

import json

import pytest

from memplug import InvalidInput, Settings
from memplug.demo import DEMO_OPTIONS, check_script, load_script, run_demo


def test_bundled_script_is_consistent():
    script = load_script()
    assert len(script["users"]) == 2
    for data in script["users"].values():
        assert len(data["facts"]) == 10 and len(data["told"]) == 2
        assert len({f["turn"] for f in data["facts"]}) == 10  # each fact in its own note


def test_bad_script_is_refused():
    with pytest.raises(InvalidInput, match="users"):
        check_script({})
    with pytest.raises(InvalidInput, match="exactly one note"):
        check_script({"users": {"a": {"told": [["I like tea."]], "facts": [{"answer": "coffee", "questions": ["?"]}]}}})


def short_script(alice: str, bob: str) -> dict:
    return {"users": {
        alice: {"told": [["Alice's gym locker code is ZQ-7741-B.", "Alice's dog is called Pickles.", "Alice works at Corvana Labs."]],
                "facts": [{"answer": "ZQ-7741-B", "questions": ["What is Alice's gym locker code?"]},
                          {"answer": "Pickles", "questions": ["What is the name of Alice's dog?"]},
                          {"answer": "Corvana Labs", "questions": ["Which company does Alice work at?"]}]},
        bob: {"told": [["Bob's garage door code is K7-QX42.", "Bob's cat is called Biscuit.", "Bob lives in Calgary."]],
              "facts": [{"answer": "K7-QX42", "questions": ["What is Bob's garage door code?"]},
                        {"answer": "Biscuit", "questions": ["What is the name of Bob's cat?"]},
                        {"answer": "Calgary", "questions": ["Which city does Bob live in?"]}]},
    }}


def test_demo_smoke(make_memory, users, tmp_path):
    alice, bob = users(2)
    # The demo's frequency policy, with weights out of reach so that no adapter is trained here.
    options = {**DEMO_OPTIONS["frequency"], "freq_weights_reads": 10_000}
    mem = make_memory(settings=Settings(plugins="context,pgvector,kv,frequency"),
                      options={**options, "artifacts": str(tmp_path / "artifacts")})
    result = run_demo(memory=mem, script=short_script(alice, bob), sessions=2, per_session=4, zipf_s=2.0,
                      out_dir=tmp_path / "out")
    assert len(result["answers"]) == 2 * 2 * 4 and result["leaks"] == 0
    # Before any question every fact is text; after the first session the most asked ones are in KV.
    assert result["timeline"][0][alice] == {"text": 3, "KV": 0, "weights": 0}
    assert result["timeline"][1][alice]["KV"] >= 1 and result["timeline"][1][bob]["KV"] >= 1
    # The second session's answers about those facts came from KV memory, with fewer prompt tokens.
    by_tier = result["by_tier"]
    assert by_tier["kv"]["answers"] >= 1 and by_tier["text"]["answers"] >= 1
    assert by_tier["kv"]["memory_tokens"] < by_tier["text"]["memory_tokens"]
    assert sum(r["right"] for r in result["answers"]) / len(result["answers"]) >= 0.5
    assert (tmp_path / "out" / "demo.png").stat().st_size > 0
    assert len(json.loads((tmp_path / "out" / "demo.json").read_text())["answers"]) == 16
    # Moves are recorded with the policy's reason.
    [row] = [r for r in mem.inspect(alice) if r["level"] == 2][:1]
    assert any("reads in" in h["reason"] for h in row["history"])
