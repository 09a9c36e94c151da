"""The conversations benchmark: its loaders, its scoring, and a run end to end on tiny hand-made
conversations in both sets' formats (the real Postgres and embedder; mem0 left out)."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from benchmarks.conversations import (
    BM25,
    Conversation,
    Question,
    Turn,
    abstention,
    load_beam,
    load_realtalk,
    main,
    newer_first,
    recall_at,
    score,
)


def realtalk_chat(folder):
    turn = lambda i, who, text: {"dia_id": i, "speaker": who, "clean_text": text,  # noqa: E731
                                 "date_time": "29.12.2023, 22:42:04"}
    chat = {
        "name": "tiny",
        "session_1": [turn("D1:1", "Emi", "Hey! How are you?"),
                      turn("D1:2", "Elise", "Great, I just adopted a cat called Miso."),
                      turn("D1:3", "Emi", "I started skiing in 2013, it is my favourite hobby.")],
        "session_1_date_time": "29.12.2023, 22:42:04",
        "session_2": [turn("D2:1", "Elise", "Miso knocked my plant over today."),
                      turn("D1:4", "Emi", "I also love cooking ramen.")],  # a dia_id of another session
        "qa": [
            {"question": "What is Elise's cat called?", "answer": "Miso", "evidence": ["D1:2. D2:1"], "category": 1},
            {"question": "When did Emi start skiing?", "answer": "2013", "evidence": ["D1:3", "D9:9"], "category": 2},
            {"question": "What does Emi cook?", "answer": "ramen", "evidence": ["D1:4"], "category": 3},
            {"question": "Unknown evidence only", "answer": "-", "evidence": ["D7:1"], "category": 1},
        ],
    }
    folder.mkdir(parents=True)
    (folder / "Chat_1_Emi_Elise.json").write_text(json.dumps(chat))


def beam_chat(folder):
    message = lambda i, role, text, anchor=None: {"id": i, "role": role, "content": text,  # noqa: E731
                                                  "time_anchor": anchor, "index": "1,1"}
    batches = [{"batch_number": 1, "time_anchor": None, "turns": [
        [message(0, "user", "My budget app's dashboard API answers in 400ms.", "March-15-2024"),
         message(1, "assistant", "Let us profile the dashboard endpoint.")],
        [message(2, "user", "I deploy the budget app on Render."),
         message(3, "assistant", "Render works well for Flask.")]]},
        {"batch_number": 2, "time_anchor": None, "turns": [
            [message(4, "user", "After caching, the dashboard API now answers in 250ms.", "April-05-2024"),
             message(5, "assistant", "Great improvement.")]]}]
    questions = {
        "knowledge_update": [{"question": "What is the dashboard API's response time?",
                              "source_chat_ids": {"original_info": [0], "updated_info": [4]}}],
        "information_extraction": [{"question": "Where do I deploy the budget app?", "source_chat_ids": [2]}],
        "abstention": [{"question": "What did my manager say about the quarterly sales figures in Tokyo?"}],
        "summarization": [{"question": "Summarise everything."}],  # no evidence: dropped
    }
    chat = folder / "1"
    chat.mkdir(parents=True)
    (chat / "chat.json").write_text(json.dumps(batches))
    (chat / "probing_questions.json").write_text(json.dumps(questions))


def test_realtalk_loader_handles_the_quirks(tmp_path):
    realtalk_chat(tmp_path / "realtalk")
    [conv] = load_realtalk(tmp_path / "realtalk")
    assert [t.id for t in conv.turns] == ["D1:1", "D1:2", "D1:3", "D2:1", "D1:4"]
    assert conv.turns[0].when.year == 2023 and conv.turns[0].speaker == "Emi"
    questions = {q.query: q for q in conv.questions}
    assert len(questions) == 3  # the question whose only evidence names no turn is dropped
    assert questions["What is Elise's cat called?"].evidence == ("D1:2", "D2:1")  # two ids in one string
    assert questions["When did Emi start skiing?"].evidence == ("D1:3",)  # the unknown id skipped
    assert questions["When did Emi start skiing?"].category == "temporal"


def test_beam_loader_keeps_abstention_and_update_pairs(tmp_path):
    beam_chat(tmp_path / "beam")
    [conv] = load_beam(tmp_path / "beam")
    assert len(conv.turns) == 6
    assert conv.turns[1].when == conv.turns[0].when  # no anchor: the last one before it
    assert conv.turns[4].when.month == 4
    by_kind = {q.category: q for q in conv.questions}
    assert set(by_kind) == {"knowledge_update", "information_extraction", "abstention"}
    assert by_kind["knowledge_update"].old == ("0",) and by_kind["knowledge_update"].new == ("4",)
    assert by_kind["abstention"].evidence == ()


def test_scoring_on_a_hand_made_conversation():
    assert recall_at(["a", "b", "c"], ["b", "z"], 2) == 0.5
    assert recall_at(["a", "b", "c"], ["c"], 2) == 0.0
    assert newer_first(["x", "new", "old"], ["old"], ["new"], 10) is True
    assert newer_first(["old", "x"], ["old"], ["new"], 10) is False
    assert newer_first(["x"], ["old"], ["new"], 10) is None
    conv = Conversation("c", [Turn("1", "t", "A", None)], [
        Question("q1", "?", "temporal", ("a", "b")),
        Question("q2", "?", "multi-hop", ("c",)),
        Question("q3", "?", "knowledge_update", ("o", "n"), ("o",), ("n",)),
        Question("q4", "?", "abstention", ()),
    ])
    ranked = {"c/q1": ["a"] + ["x"] * 5 + ["b"], "c/q2": ["c"], "c/q3": ["n", "o"], "c/q4": ["a"]}
    result = score([conv], ranked)
    assert result["temporal"] == {"recall@5": 0.5, "recall@10": 1.0, "questions": 1}
    assert result["all"]["questions"] == 3  # abstention has no evidence to find
    assert result["all"]["recall@5"] == pytest.approx((0.5 + 1 + 1) / 3, abs=1e-4)
    assert result["updates_newer_first"] == {"share": 1.0, "questions": 1}
    split = abstention([conv], {"c/q1": 0.8, "c/q2": 0.7, "c/q3": 0.9, "c/q4": 0.2})
    assert split["balanced_accuracy"] == 1.0 and 0.2 < split["best_floor"] <= 0.7


def test_bm25_ranks_the_rare_word_first():
    turns = [Turn(str(n), f"we talked about the weather {n}", "A", None) for n in range(5)]
    turns.append(Turn("cat", "my cat Miso talked to the weather", "B", None))
    ids, scores = BM25(turns).search("what is the cat called", 3)
    assert ids[0] == "cat" and scores[0] > scores[1]


def test_the_benchmark_runs_end_to_end(tmp_path, dsn):
    realtalk_chat(tmp_path / "data" / "realtalk")
    beam_chat(tmp_path / "data" / "beam-100k")
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["--data", str(tmp_path / "data"), "--variants", "memplug,vector leg only",
                                       "--single", "3", "--no-mem0", "--out", str(out)])
    assert result.exit_code == 0, result.output
    saved = json.loads((out / "conversations.json").read_text())
    realtalk = saved["datasets"]["realtalk"]["systems"]
    assert set(realtalk) == {"memplug", "vector leg only", "BM25", "brute-force MiniLM"}
    assert realtalk["memplug"]["recall"]["all"]["questions"] == 3
    assert realtalk["memplug"]["recall"]["all"]["recall@10"] == 1.0  # five turns: everything is in the top 10
    assert realtalk["memplug"]["write_ms"]["n"] == 3 and realtalk["memplug"]["batch_items_per_s"] > 0
    assert realtalk["memplug"]["read_store_ms"]["p50"] <= realtalk["memplug"]["read_ms"]["p50"]
    beam = saved["datasets"]["beam"]["systems"]["memplug"]
    assert beam["recall"]["updates_newer_first"]["questions"] == 1
    assert beam["abstention"]["unanswerable"] == 1 and beam["abstention"]["answerable"] == 2
    assert saved["machine"]["cores"] >= 1 and "cpu_flags" in saved["machine"]
