"""The demo, on a short script: it writes both users' conversations and answers from memory."""

from __future__ import annotations

from memplug.demo import load_script, run_demo


def test_bundled_script_is_consistent():
    script = load_script()
    turns = [t for u in script["users"].values() for s in u["sessions"] for t in s["turns"]]
    assert 90 <= len(turns) <= 110 and len(script["users"]) == 2
    for q in script["questions"]:
        said = " ".join(t["content"] for s in script["users"][q["user"]]["sessions"] for t in s["turns"]
                        if t["role"] == "user").lower()
        assert q["answer"].lower() in said, q


def test_demo_smoke(memory):
    result = run_demo(memory=memory, limit=6)
    summary = result["summary"]
    assert summary["questions"] == 6 and summary["turns_written"] == 100
    assert summary["leaks"] == 0
    assert summary["answer_in_top3"] >= 0.8
    assert all(q["hits"] for q in result["questions"])
    # a rerun starts clean rather than piling up duplicates
    again = run_demo(memory=memory, limit=1)["summary"]
    assert again["items"] == summary["items"]
