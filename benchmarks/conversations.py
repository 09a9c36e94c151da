"""Retrieval on real conversations: memplug against BM25, brute-force MiniLM and mem0, in one run.

Two public sets, read from ``../shared/datasets/`` (the repository's sibling folder; see
its README), never copied here:

- REALTALK (Lee et al., 2025, arXiv 2502.13270): ten 21-day chats between two people,
  questions with turn-level evidence (multi-hop, temporal, open-domain);
- BEAM, 100K split (Tavakoli et al., 2025, arXiv 2510.27246): twenty long user-assistant
  chats, ten question types, most with the ids of the messages holding the evidence;
  abstention questions have none.

Every turn is written into one scope per conversation, with its speaker and time
(``occurred_at``); then every question is read. Recall@k is the share of a question's
evidence turns in the top k, averaged per category. Writes are timed one turn per call (a
sample, as an agent writes) and in batches (the whole set); reads with and without the
query embedding. Baselines, in the same run and on the same embedder: BM25 over the turns,
brute-force cosine search with MiniLM, and mem0 OSS (``infer=False``, on the same embedded
Postgres, in its own virtual environment: ``benchmarks/mem0_venv.sh``). mem0's keyword and
entity boosts need a spaCy model that cannot be installed offline: this is its semantic search.

Writes ``conversations.json`` and ``conversations.png`` to ``benchmarks/results/``.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click
import numpy as np
from psycopg import conninfo as _conninfo

from benchmarks import console, fail_cleanly, machine

ROOT = Path(__file__).resolve().parents[1]
DATASETS = ROOT.parent / "shared" / "datasets"
RESULTS = ROOT / "benchmarks" / "results"
MEM0_PYTHON = ROOT / ".venv-mem0" / "bin" / "python"
K = (5, 10)
BATCH = 256
# The configurations of memplug measured, each a set of options over the built-in pgvector tier;
# the first is the one shipped (its defaults), the others change one thing each.
VARIANTS: dict[str, dict[str, Any]] = {
    "memplug": {},
    "queries in torch (fp32)": {"embedder_runtime": "torch"},
    "vector leg only": {"pgvector_mode": "vector"},
    "text leg only": {"pgvector_mode": "text"},
    "index: text only": {"pgvector_index": ""},
    "index: +date": {"pgvector_index": "speaker,date"},
    "index: +previous turn": {"pgvector_index": "speaker,previous"},
    "vector weight 0.5": {"pgvector_vector_weight": 0.5},
    "updates: supersede at 0.5": {"pgvector_supersede": 0.5},
    "updates: supersede at 0.7": {"pgvector_supersede": 0.7},
    "relevance floor 0.2": {"relevance_floor": 0.2},
}


# -- data --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Turn:
    id: str
    text: str
    speaker: str
    when: datetime | None


@dataclass(frozen=True)
class Question:
    id: str
    query: str
    category: str
    evidence: tuple[str, ...]  # empty: nothing in the conversation answers it
    old: tuple[str, ...] = ()  # knowledge updates: the superseded statement's turns
    new: tuple[str, ...] = ()  # and the turns that supersede it


@dataclass
class Conversation:
    id: str
    turns: list[Turn]
    questions: list[Question] = field(default_factory=list)


REALTALK_CATEGORIES = {1: "multi-hop", 2: "temporal", 3: "open-domain"}
DIA_ID = re.compile(r"D\d+:\d+")


def load_realtalk(folder: Path) -> list[Conversation]:
    """REALTALK's chats. Evidence strings may hold several ids (``"D13:4. D14:4"``); ids naming no
    turn are skipped, and questions left without evidence dropped (see the datasets' README)."""
    out = []
    for path in sorted(folder.glob("Chat_*.json"), key=lambda p: int(p.name.split("_")[1])):
        data = json.loads(path.read_text())
        turns = []
        for key in sorted((k for k in data if re.fullmatch(r"session_\d+", k)), key=lambda k: int(k.split("_")[1])):
            for t in data[key]:
                text = (t.get("clean_text") or "").strip()
                if text:
                    turns.append(Turn(t["dia_id"], text, t["speaker"], _realtalk_time(t.get("date_time"))))
        known = {t.id for t in turns}
        conv = Conversation(path.stem, turns)
        for n, qa in enumerate(data.get("qa", [])):
            evidence = tuple(dict.fromkeys(i for e in qa.get("evidence", []) for i in DIA_ID.findall(str(e))
                                           if i in known))
            if evidence:
                category = REALTALK_CATEGORIES.get(qa.get("category"), str(qa.get("category")))
                conv.questions.append(Question(f"q{n}", qa["question"], category, evidence))
        out.append(conv)
    return out


def _realtalk_time(value: str | None) -> datetime | None:
    try:
        return datetime.strptime(value or "", "%d.%m.%Y, %H:%M:%S").replace(tzinfo=UTC)
    except ValueError:
        return None


def load_beam(folder: Path) -> list[Conversation]:
    """BEAM-100K's chats. A message without a time anchor takes the last one before it. Questions
    without evidence are dropped except abstention questions (kept for the relevance floor)."""
    out = []
    for chat in sorted((p for p in folder.iterdir() if p.is_dir()), key=lambda p: int(p.name)):
        batches = json.loads((chat / "chat.json").read_text())
        turns, anchor = [], None
        for batch in batches:
            anchor = _beam_time(batch.get("time_anchor")) or anchor
            for message in (m for group in batch["turns"] for m in group):
                anchor = _beam_time(message.get("time_anchor")) or anchor
                text = (message.get("content") or "").strip()
                if text:
                    turns.append(Turn(str(message["id"]), text, message["role"], anchor))
        known = {t.id for t in turns}
        conv = Conversation(f"beam-{chat.name}", turns)
        questions = json.loads((chat / "probing_questions.json").read_text())
        for kind, items in questions.items():
            for n, q in enumerate(items):
                ids = q.get("source_chat_ids") or []
                groups = list(ids.values()) if isinstance(ids, dict) else [ids]
                evidence = tuple(dict.fromkeys(str(i) for g in groups for i in g if str(i) in known))
                old = new = ()
                if isinstance(ids, dict) and len(groups) == 2:  # original then updated, first then second
                    old, new = (tuple(str(i) for i in g if str(i) in known) for g in groups)
                if evidence or kind == "abstention":
                    conv.questions.append(Question(f"{kind}-{n}", q["question"], kind, evidence, old, new))
        out.append(conv)
    return out


def _beam_time(value: str | None) -> datetime | None:
    try:
        return datetime.strptime(value or "", "%B-%d-%Y").replace(tzinfo=UTC)
    except ValueError:
        return None


# -- scoring (pure) ------------------------------------------------------------------------------


def recall_at(ranked: Sequence[str], evidence: Iterable[str], k: int) -> float:
    """The share of ``evidence`` among the first ``k`` of ``ranked``."""
    evidence = set(evidence)
    return len(evidence & set(ranked[:k])) / len(evidence) if evidence else 0.0


def newer_first(ranked: Sequence[str], old: Iterable[str], new: Iterable[str], k: int) -> bool | None:
    """Whether the superseding turns rank before the superseded ones in the top ``k``
    (None when neither is there)."""
    top = list(ranked[:k])
    first = lambda ids: min((top.index(i) for i in ids if i in top), default=math.inf)  # noqa: E731
    o, n = first(old), first(new)
    return None if o == n == math.inf else n < o


def percentiles(values: Sequence[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p95": None, "n": 0}
    return {"p50": round(float(np.percentile(values, 50)), 2), "p95": round(float(np.percentile(values, 95)), 2),
            "n": len(values)}


def score(conversations: Sequence[Conversation], ranked: dict[str, list[str]]) -> dict[str, Any]:
    """Recall@k overall and per category, over the questions with evidence; and for knowledge
    updates how often the newer statement ranks first."""
    rows: dict[str, list[list[float]]] = defaultdict(list)
    order: list[bool] = []
    for conv in conversations:
        for q in conv.questions:
            if not q.evidence:
                continue
            got = ranked.get(f"{conv.id}/{q.id}", [])
            values = [recall_at(got, q.evidence, k) for k in K]
            rows[q.category].append(values)
            rows["all"].append(values)
            if q.category == "knowledge_update" and q.old and q.new:
                verdict = newer_first(got, q.old, q.new, max(K))
                if verdict is not None:
                    order.append(verdict)
    out: dict[str, Any] = {
        cat: {**{f"recall@{k}": round(float(np.mean([v[n] for v in vals])), 4) for n, k in enumerate(K)},
              "questions": len(vals)}
        for cat, vals in sorted(rows.items())}
    if order:
        out["updates_newer_first"] = {"share": round(sum(order) / len(order), 3), "questions": len(order)}
    return out


def abstention(conversations: Sequence[Conversation], top: dict[str, float | None]) -> dict[str, Any] | None:
    """How the top hit's relevance separates answerable questions from unanswerable ones: both
    distributions, and the floor that classifies most questions right (balanced accuracy)."""
    yes, no = [], []
    for conv in conversations:
        for q in conv.questions:
            value = top.get(f"{conv.id}/{q.id}")
            if value is not None:
                (yes if q.evidence else no).append(value)
    if not yes or not no:
        return None
    best = max(((0.5 * (np.mean(np.array(yes) >= t) + np.mean(np.array(no) < t)), t)
                for t in np.arange(0.0, 1.0, 0.01)), key=lambda p: p[0])
    quantiles = lambda v: [round(float(x), 3) for x in np.percentile(v, [5, 25, 50, 75, 95])]  # noqa: E731
    return {"answerable_top1": quantiles(yes), "unanswerable_top1": quantiles(no),
            "quantiles": [5, 25, 50, 75, 95], "best_floor": round(float(best[1]), 2),
            "balanced_accuracy": round(float(best[0]), 3), "answerable": len(yes), "unanswerable": len(no)}


# -- baselines in this process ------------------------------------------------------------------

STOPWORDS = frozenset(["a", "an", "and", "are", "as", "at", "be", "but", "by", "did", "do", "does", "for", "from", "had", "has", "have", "how", "i", "in", "is", "it", "its", "me", "my", "of", "on", "or", "so", "that", "the", "their", "them", "they", "this", "to", "was", "we", "were", "what", "when", "where", "which", "who", "why", "will", "with", "you", "your"])


def words(text: str) -> list[str]:
    return [w for w in re.findall(r"[a-z0-9]+", text.lower()) if w not in STOPWORDS]


class BM25:
    """Okapi BM25 (k1 = 1.5, b = 0.75) over one conversation's turns."""

    def __init__(self, turns: Sequence[Turn], k1: float = 1.5, b: float = 0.75):
        self.ids = [t.id for t in turns]
        self.docs = [Counter(words(t.text)) for t in turns]
        lengths = np.array([sum(d.values()) for d in self.docs], dtype=float)
        df = Counter(w for d in self.docs for w in d)
        n = len(self.docs)
        self.idf = {w: math.log(1 + (n - f + 0.5) / (f + 0.5)) for w, f in df.items()}
        self.norm = k1 * (1 - b + b * lengths / max(lengths.mean(), 1e-9))
        self.k1 = k1

    def search(self, query: str, k: int) -> tuple[list[str], list[float]]:
        scores = np.zeros(len(self.docs))
        for w in set(words(query)):
            if w in self.idf:
                tf = np.array([d.get(w, 0) for d in self.docs], dtype=float)
                scores += self.idf[w] * tf * (self.k1 + 1) / (tf + self.norm)
        top = np.argsort(-scores, kind="stable")[:k]
        return [self.ids[i] for i in top], [float(scores[i]) for i in top]


class Dense:
    """Brute-force cosine search over one conversation's turns with the given embedder."""

    def __init__(self, turns: Sequence[Turn], embedder: Any):
        self.ids = [t.id for t in turns]
        self.vectors = embedder.encode([t.text for t in turns])
        self.embedder = embedder

    def search(self, query: str, k: int) -> tuple[list[str], list[float]]:
        sims = self.vectors @ self.embedder.encode([query])[0]
        top = np.argsort(-sims, kind="stable")[:k]
        return [self.ids[i] for i in top], [float(sims[i]) for i in top]


def run_local(name: str, conversations: Sequence[Conversation], build: Callable[[Conversation], Any],
              k: int) -> dict[str, Any]:
    ranked, top, reads = {}, {}, []
    for conv in conversations:
        index = build(conv)
        for q in conv.questions:
            t0 = time.perf_counter()
            ids, scores = index.search(q.query, k)
            reads.append(1000 * (time.perf_counter() - t0))
            ranked[f"{conv.id}/{q.id}"], top[f"{conv.id}/{q.id}"] = ids, (scores[0] if scores else None)
    console.print(f"  {name}: {len(reads)} reads")
    return {"ranked": ranked, "top": top, "read_ms": percentiles(reads)}


# -- memplug ------------------------------------------------------------------------------------


class TimedEmbedder:
    """The shared embedder, timed per call, with a cache of batch encodings by text (so that
    configurations indexing the same texts do not embed them again; single texts are never cached).
    ``runtime`` picks the embedder of the configuration being measured (option ``embedder_runtime``)."""

    def __init__(self) -> None:
        from memplug.runtime.embedder import RUNTIMES, Embedder

        self.runtimes = {r: Embedder(query_cache=0, runtime=r) for r in RUNTIMES}
        self.runtime = "auto"
        self.seconds = 0.0  # of the last call
        self.total = 0.0  # of every call
        self.cache: dict[str, np.ndarray] = {}
        self.caching = False

    @property
    def inner(self) -> Any:
        return self.runtimes[self.runtime]

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        t0 = time.perf_counter()
        try:
            if len(texts) == 1:
                return self.inner.encode(texts)
            if not self.caching:  # measured cold; kept for the configurations after
                vectors = self.inner.encode(texts)
                self.cache.update(zip(texts, vectors, strict=True))
                return vectors
            todo = [t for t in dict.fromkeys(texts) if t not in self.cache]
            if todo:
                self.cache.update(zip(todo, self.inner.encode(todo), strict=True))
            return np.stack([self.cache[t] for t in texts])
        finally:
            self.seconds = time.perf_counter() - t0
            self.total += self.seconds


def run_memplug(label: str, options: dict[str, Any], conversations: Sequence[Conversation], dataset: str,
                embedder: TimedEmbedder, k: int, single: int, home: Path, dsn: str | None) -> dict[str, Any]:
    from memplug import Budget, Memory, Scope, Settings

    out: dict[str, Any] = {"options": options}
    embedder.runtime = options.get("embedder_runtime", "auto")
    with Memory(dsn, home=home, settings=Settings(plugins="pgvector"), embedder=embedder,
                options={"pool_size": 2, "max_text_chars": 400_000, **options}) as mem:
        if single:  # one turn per call, as an agent writes: a sample of the first conversations' turns
            scope = Scope(f"bench-conv-{dataset}-single")
            mem.forget(scope)
            times = []
            for turn in [t for c in conversations for t in c.turns][:single]:
                t0 = time.perf_counter()
                mem.write(scope, turn.text, {"turn": turn.id, "speaker": turn.speaker}, occurred_at=turn.when)
                times.append(1000 * (time.perf_counter() - t0))
            mem.forget(scope)
            out["write_ms"] = percentiles(times)
        embedder.caching = not single  # the throughput of the shipped configuration is measured cold
        t0, written, embedding = time.perf_counter(), 0, embedder.total
        scopes = {}
        for conv in conversations:
            scope = scopes[conv.id] = Scope(f"bench-conv-{conv.id}")
            mem.forget(scope)
            for start in range(0, len(conv.turns), BATCH):
                part = conv.turns[start:start + BATCH]
                mem.write(scope, [t.text for t in part], [{"turn": t.id, "speaker": t.speaker} for t in part],
                          occurred_at=[t.when for t in part])
                written += len(part)
        seconds = time.perf_counter() - t0
        embedding = embedder.total - embedding
        embedder.caching = True
        out["batch_items_per_s"] = round(written / seconds, 1)
        # Without the embedder: what the store itself takes (the vectors precomputed, as if by a GPU).
        out["batch_store_items_per_s"] = round(written / max(seconds - embedding, 1e-9), 1)
        ranked, top, reads, stores, found = {}, {}, [], [], []
        budget = Budget(k=k, tokens=2**31 - 1)
        for conv in conversations:
            for q in conv.questions:
                embedder.seconds = 0.0
                t0 = time.perf_counter()
                recall = mem.read(scopes[conv.id], q.query, budget)
                total = time.perf_counter() - t0
                reads.append(1000 * total)
                stores.append(1000 * (total - embedder.seconds))
                ranked[f"{conv.id}/{q.id}"] = [h.item.metadata.get("turn") for h in recall.hits]
                found += [h.relevance for h in recall.hits
                          if h.item.metadata.get("turn") in q.evidence and h.relevance is not None]
                top[f"{conv.id}/{q.id}"] = max((h.relevance for h in recall.hits if h.relevance is not None),
                                               default=None)
        for scope in scopes.values():
            mem.forget(scope)
    embedder.runtime = "auto"
    out.update(ranked=ranked, top=top, read_ms=percentiles(reads), read_store_ms=percentiles(stores))
    if found:  # how relevant the evidence found is: what a relevance floor would cost
        out["evidence_relevance"] = dict(zip(("p1", "p5", "p10", "p50"), (
            round(float(x), 3) for x in np.percentile(found, [1, 5, 10, 50])), strict=True))
    console.print(f"  {label}: {out['batch_items_per_s']} items/s batched, read p50 {out['read_ms']['p50']} ms")
    return out


# -- mem0, in its own environment ----------------------------------------------------------------


def run_mem0(conversations: Sequence[Conversation], dsn: str, k: int) -> dict[str, Any] | None:
    if not MEM0_PYTHON.exists():
        console.print("  mem0: skipped (no .venv-mem0; run benchmarks/mem0_venv.sh)")
        return None
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "in.json", Path(tmp) / "out.json"
        src.write_text(json.dumps({"k": k, "batch": False, "conversations": [
            {"id": c.id, "turns": [{"id": t.id, "text": t.text, "speaker": t.speaker,
                                    "date": t.when.isoformat() if t.when else None} for t in c.turns],
             "questions": [{"id": q.id, "query": q.query} for q in c.questions]} for c in conversations]}))
        # One thread for torch, as memplug's queries get: on two shared cores a second thread
        # mostly waits (mem0's queries embed faster so, not slower). memplug's schema holds the
        # vector type; mem0's tables go to public. Iterative index scans keep mem0's filtered
        # HNSW searches from coming up short.
        dsn = _conninfo.make_conninfo(dsn, options="-c search_path=public,memplug -c hnsw.iterative_scan=relaxed_order")
        done = subprocess.run([str(MEM0_PYTHON), str(ROOT / "benchmarks" / "mem0_runner.py"), "--dsn", dsn,
                               "--input", str(src), "--output", str(dst)],
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
        if done.returncode != 0:
            console.print(f"  mem0: failed (exit status {done.returncode}); left out")
            return None
        raw = json.loads(dst.read_text())
    read = raw["read_ms"]
    store = [r - e for r, e in zip(read, raw.get("embed_ms", []), strict=False)]
    out = {"version": raw.get("version"), "notes": raw.get("notes", []), "ranked": raw["ranked"],
           "top": {key: (v[0] if v else None) for key, v in raw.get("scores", {}).items()},
           "write_ms": percentiles(raw["write_ms"]), "batch_items_per_s": raw.get("batch_items_per_s"),
           "batch_note": raw.get("batch_note"), "read_ms": percentiles(read),
           "read_store_ms": percentiles(store)}
    console.print(f"  mem0 {out['version']}: read p50 {out['read_ms']['p50']} ms")
    return out


# -- the run ------------------------------------------------------------------------------------


def summarise(system: dict[str, Any], conversations: Sequence[Conversation]) -> dict[str, Any]:
    """A system's figures without its per-question rankings."""
    keep = {k: v for k, v in system.items() if k not in ("ranked", "top")}
    keep["recall"] = score(conversations, system["ranked"])
    keep["abstention"] = abstention(conversations, system["top"])
    return keep


def plot(result: dict[str, Any], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    sets = list(result["datasets"])
    fig, axes = plt.subplots(1, len(sets) + 1, figsize=(6 * (len(sets) + 1), 4.5))
    for ax, name in zip(axes, sets, strict=False):
        systems = result["datasets"][name]["systems"]
        labels = list(systems)
        values = [systems[s]["recall"]["all"]["recall@10"] for s in labels]
        ax.barh(labels, values, color=["#1f77b4" if s.startswith(("memplug", "index", "vector")) else "#999999"
                                       for s in labels])
        ax.invert_yaxis()
        ax.set_xlim(0, 1)
        ax.set_title(f"{name}: recall@10")
        for y, v in enumerate(values):
            ax.text(v + 0.01, y, f"{v:.2f}", va="center")
    ax = axes[-1]
    for name in sets:
        systems = result["datasets"][name]["systems"]
        for label in ("memplug", "mem0", "brute-force MiniLM"):
            if label in systems and systems[label].get("read_ms", {}).get("p95") is not None:
                ax.bar(f"{label}\n{name}", systems[label]["read_ms"]["p95"],
                       color="#1f77b4" if label == "memplug" else "#999999")
    ax.set_ylabel("read p95 (ms)")
    ax.set_title("read latency, p95")
    ax.tick_params(axis="x", labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


@click.command()
@click.option("--sets", default="realtalk,beam", show_default=True, help="Datasets: realtalk, beam.")
@click.option("--data", type=click.Path(path_type=Path), default=DATASETS, show_default=True)
@click.option("--conversations", "limit", type=int, default=None, help="Only the first N conversations of each set.")
@click.option("--variants", default=",".join(VARIANTS), show_default=True,
              help="memplug configurations to measure (comma-separated names of VARIANTS).")
@click.option("--variants-beam", default=None,
              help="Those to measure on BEAM, if fewer (its long messages take minutes to embed per index).")
@click.option("--single", type=int, default=300, show_default=True, help="Turns written one per call, per set.")
@click.option("--mem0/--no-mem0", default=True, show_default=True)
@click.option("--k", type=int, default=max(K), show_default=True)
@click.option("--out", type=click.Path(path_type=Path), default=RESULTS, show_default=True)
@fail_cleanly
def main(sets: str, data: Path, limit: int | None, variants: str, variants_beam: str | None, single: int,
         mem0: bool, k: int, out: Path) -> None:
    from memplug import Memory, Settings

    loaders = {"realtalk": lambda: load_realtalk(data / "realtalk"), "beam": lambda: load_beam(data / "beam-100k")}
    chosen = [s.strip() for s in sets.split(",") if s.strip()]
    names = [v.strip() for v in variants.split(",") if v.strip()]
    per_set = {"beam": [v.strip() for v in variants_beam.split(",") if v.strip()]} if variants_beam else {}
    for name in chosen:
        if name not in loaders:
            raise click.BadParameter(f"unknown set {name!r}; the sets are {', '.join(loaders)}")
    for name in names + per_set.get("beam", []):
        if name not in VARIANTS:
            raise click.BadParameter(f"unknown variant {name!r}; the variants are {', '.join(VARIANTS)}")
    if not data.is_dir():
        console.print(f"no datasets at {data}: skipped")
        return
    home = Path(os.environ.get("MEMPLUG_HOME") or Path.home() / ".memplug")
    with Memory(home=home, settings=Settings(plugins="pgvector")) as mem:
        dsn = mem.store.dsn
        result: dict[str, Any] = {"machine": machine(mem), "k": k, "datasets": {}}
    embedder = TimedEmbedder()
    for runtime in embedder.runtimes.values():
        runtime.encode(["load the model before anything is timed"])
    for name in chosen:
        conversations = loaders[name]()[:limit]
        turns = sum(len(c.turns) for c in conversations)
        questions = Counter(q.category for c in conversations for q in c.questions)
        console.print(f"{name}: {len(conversations)} conversations, {turns} turns, {sum(questions.values())} "
                      f"questions")
        systems: dict[str, dict[str, Any]] = {}
        for n, label in enumerate(per_set.get(name, names)):
            systems[label] = run_memplug(label, VARIANTS[label], conversations, name, embedder, k,
                                         single if n == 0 else 0, home, dsn)
        systems["BM25"] = run_local("BM25", conversations, lambda c: BM25(c.turns), k)
        embedder.runtime, embedder.caching = "torch", True  # the turns' vectors are those indexed above
        systems["brute-force MiniLM"] = run_local("brute-force MiniLM", conversations,
                                                  lambda c: Dense(c.turns, embedder), k)
        embedder.runtime = "auto"
        if mem0:
            found = run_mem0(conversations, dsn, k)
            if found:
                systems["mem0"] = found
        result["datasets"][name] = {
            "conversations": len(conversations), "turns": turns, "questions": dict(questions),
            "systems": {label: summarise(s, conversations) for label, s in systems.items()}}
        embedder.cache.clear()
        # Each finished set is saved at once: a long run cut short keeps what it measured.
        out.mkdir(parents=True, exist_ok=True)
        (out / "conversations.json").write_text(json.dumps(result, indent=1) + "\n")
    plot(result, out / "conversations.png")
    for name, d in result["datasets"].items():
        console.print(f"\n{name}")
        for label, s in d["systems"].items():
            r = s["recall"]["all"]
            console.print(f"  {label:28s} R@5 {r['recall@5']:.3f}  R@10 {r['recall@10']:.3f}  "
                          f"read p50/p95 {s['read_ms']['p50']}/{s['read_ms']['p95']} ms")
    console.print(f"\nwrote {out / 'conversations.json'}")


if __name__ == "__main__":
    sys.exit(main())
