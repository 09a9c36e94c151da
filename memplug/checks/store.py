"""Store benchmark: write throughput, read latency and planted-needle recall at scale.

Runs against a fresh embedded Postgres in a temporary folder (or ``dsn``), so
that nothing of the user's own memory is touched or measured.

- One scope holding each of ``sizes`` items. Up to ``real_max`` items the
  haystack is embedded with the real all-MiniLM-L6-v2; above, haystack vectors
  are random unit vectors, so that the store, not the embedder, is measured.
  Needles (facts about people absent from the haystack) and queries (their
  paraphrased questions) always use real embeddings.
- ``scopes_total`` items across ``n_scopes`` scopes (synthetic vectors), capped
  at ``minutes`` of writing; the size reached is reported.

Writes ``store.json`` (and ``store.png`` when matplotlib is installed) to ``out_dir``.
"""

from __future__ import annotations

import json
import os
import platform
import random
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..memory import Memory
from ..types import Budget, Scope
from .facts import Fact, generate, haystack

NEEDLES = 100
BATCH = 500


class RandomUnitEmbedder:
    """Random 384-d unit vectors: stands in for the embedder when measuring the store alone."""

    dim = 384

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        v = self.rng.standard_normal((len(texts), self.dim)).astype(np.float32)
        return v / np.linalg.norm(v, axis=1, keepdims=True)


class PrecomputedEmbedder:
    """Returns vectors embedded beforehand, to time reads without the query embedding."""

    dim = 384

    def __init__(self, vectors: dict[str, np.ndarray]):
        self.vectors = vectors

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        return np.stack([self.vectors[t] for t in texts])


def _name_key(entity: str) -> tuple[str, str]:
    parts = entity.split()
    return parts[0], parts[-1]


def distinct_needles(n: int, seed: int, hay: Sequence[Fact]) -> list[Fact]:
    """Needles about people with no namesake (same first and last name) in the haystack.

    A needle is a unique fact; telling apart two people who differ only by a
    middle initial is another test.
    """
    taken = {_name_key(f.entity) for f in hay}
    out = [f for f in generate(n * 4, seed=seed) if _name_key(f.entity) not in taken][:n]
    if len(out) < n:
        raise RuntimeError(f"only {len(out)} needles without a namesake in the haystack")
    return out


def _pct(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def _ms(values: Sequence[float]) -> dict[str, float]:
    return {"p50_ms": round(_pct(values, 0.50) * 1000, 2), "p95_ms": round(_pct(values, 0.95) * 1000, 2),
            "mean_ms": round(statistics.fmean(values) * 1000, 2), "n": len(values)}


def _machine(mem: Memory) -> dict[str, Any]:
    with mem.store.transaction() as db:
        pg = db.execute("SHOW server_version").fetchone()[0]
        vec = db.execute("SELECT extversion FROM pg_extension WHERE extname = 'vector'").fetchone()[0]
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "memory_gib": round(mem_gib, 1), "python": platform.python_version(),
            "postgres": pg, "pgvector": vec, "gpu": None}


class StoreBench:
    def __init__(self, dsn: str | None, home: Path, seed: int, log: Callable[[str], None]):
        opts = {"pool_size": 4}
        self.real = Memory(dsn, home=home, options=opts)
        dsn = self.real.store.dsn
        self.synthetic = Memory(dsn, home=home, options=opts, embedder=RandomUnitEmbedder(seed))
        self.seed = seed
        self.log = log
        self.real.embedder.encode(["load the model before anything is timed"])
        self.real.token_counter.count("and the tokenizer")

    def close(self) -> None:
        self.real.close()
        self.synthetic.close()

    def write_batched(self, mem: Memory, scope: Scope, texts: Sequence[str],
                      deadline: float | None = None) -> tuple[int, float]:
        t0, n = time.perf_counter(), 0
        for start in range(0, len(texts), BATCH):
            if deadline is not None and time.perf_counter() > deadline:
                break
            chunk = texts[start:start + BATCH]
            mem.write(scope, list(chunk))
            n += len(chunk)
        return n, time.perf_counter() - t0

    def settle(self, limit_s: float = 300.0) -> float:
        """Wait until autovacuum has finished with what the writes left, then checkpoint."""
        t0 = time.perf_counter()
        with self.real.store.connect(autocommit=True) as conn:
            while time.perf_counter() - t0 < limit_s:
                busy = conn.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'autovacuum worker'").fetchone()[0]
                if not busy:
                    break
                time.sleep(2)
            conn.execute("CHECKPOINT")
        return round(time.perf_counter() - t0, 1)

    def reads_now_and_settled(self, pairs: Sequence[tuple[Scope, str, str]]) -> dict[str, Any]:
        """Reads right after the load (autovacuum and checkpoints still busy), then at rest."""
        now = self.reads(pairs)
        waited = self.settle()
        settled = self.reads(pairs)
        return {**now, "settle_seconds": waited, **{f"{k}_settled": v for k, v in settled.items() if k != "needles"}}

    def reads(self, pairs: Sequence[tuple[Scope, str, str]]) -> dict[str, Any]:
        """Time reads of (scope, question, needle text), with and without the query embedding."""
        for scope, q, _ in pairs[:5]:  # warm caches and the model
            self.real.read(scope, q, Budget(k=10))
        with_embed, found = [], 0
        for scope, q, needle in pairs:
            t = time.perf_counter()
            recall = self.real.read(scope, q, Budget(tokens=4096, k=10))
            with_embed.append(time.perf_counter() - t)
            found += any(h.text == needle for h in recall.hits)
        vectors = dict(zip([q for _, q, _ in pairs], self.real.embedder.encode([q for _, q, _ in pairs]), strict=True))
        pre = Memory(self.real.store.dsn, options={"pool_size": 2}, embedder=PrecomputedEmbedder(vectors))
        try:
            without = []
            for scope, q, _ in pairs:
                t = time.perf_counter()
                pre.read(scope, q, Budget(tokens=4096, k=10))
                without.append(time.perf_counter() - t)
        finally:
            pre.close()
        return {"read_with_query_embedding": _ms(with_embed), "read_without_query_embedding": _ms(without),
                "needle_recall_at_10": round(found / len(pairs), 4), "needles": len(pairs)}

    def one_scope(self, size: int, real_max: int) -> dict[str, Any]:
        scope = Scope(f"bench-{size}")
        hay_facts = list(haystack(size - NEEDLES, seed=self.seed))
        needles = distinct_needles(NEEDLES, self.seed + size, hay_facts)
        hay = [f.statement for f in hay_facts]
        real = size <= real_max
        self.log(f"one scope, {size} items ({'real' if real else 'synthetic'} haystack embeddings)")
        n, secs = self.write_batched(self.real if real else self.synthetic, scope, hay)
        t = time.perf_counter()
        self.real.write(scope, [f.statement for f in needles])
        needle_s = time.perf_counter() - t
        # Single writes: one item per call, real embedding, into the full scope.
        singles = []
        for f in generate(200, seed=self.seed + size + 1):
            t = time.perf_counter()
            self.real.write(scope, f.statement + " (single)")
            singles.append(time.perf_counter() - t)
        result = {
            "items": self.real.stats(scope)["items"],
            "haystack_embeddings": "real" if real else "synthetic (random unit vectors)",
            "write_batched_items_per_s": round(n / secs, 1),
            "write_batched_real_embeddings_items_per_s": round(NEEDLES / needle_s, 1),
            "write_single": _ms(singles),
        }
        result.update(self.reads_now_and_settled([(scope, f.paraphrase, f.statement) for f in needles]))
        self.log(f"  {json.dumps(result)}")
        return result

    def many_scopes(self, total: int, n_scopes: int, minutes: float) -> dict[str, Any]:
        per = max(1, total // n_scopes)
        self.log(f"{total} items across {n_scopes} scopes, at most {minutes} min of writing")
        deadline = time.perf_counter() + minutes * 60
        hay_facts = list(haystack(total, seed=self.seed + 1))
        texts = iter(hay_facts)
        written, secs, scopes = 0, 0.0, []
        for k in range(n_scopes):
            if time.perf_counter() > deadline:
                break
            chunk = [next(texts).statement for _ in range(per)]
            n, s = self.write_batched(self.synthetic, Scope(f"tenant-{k:05d}"), chunk, deadline)
            written, secs = written + n, secs + s
            scopes.append(k)
            if k % 50 == 0:
                self.log(f"  {written} items in {k + 1} scopes, {written / secs:.0f} items/s")
        rng = random.Random(self.seed)
        picked = rng.sample(scopes, min(NEEDLES, len(scopes)))
        # A read sees only its own scope: a needle needs no namesake there, not everywhere.
        needles = [distinct_needles(1, self.seed + 99 + k, hay_facts[k * per:(k + 1) * per])[0] for k in picked]
        for k, f in zip(picked, needles, strict=True):
            self.real.write(Scope(f"tenant-{k:05d}"), f.statement)
        result = {
            "items": written + len(picked), "scopes": len(scopes), "target_items": total,
            "target_scopes": n_scopes, "reached_target": written >= per * n_scopes,
            "haystack_embeddings": "synthetic (random unit vectors)",
            "write_batched_items_per_s": round(written / secs, 1) if secs else None,
        }
        pairs = [(Scope(f"tenant-{k:05d}"), f.paraphrase, f.statement) for k, f in zip(picked, needles, strict=True)]
        result.update(self.reads_now_and_settled(pairs))
        self.log(f"  {json.dumps(result)}")
        return result


def run(sizes: Sequence[int] = (10_000, 100_000), scopes_total: int = 1_000_000, n_scopes: int = 1000,
        minutes: float = 15.0, out_dir: str | Path = "benchmarks/results", console: Any = None,
        dsn: str | None = None, real_max: int = 10_000, seed: int = 0) -> dict[str, Any]:
    log = console.print if console is not None else print
    home = Path(tempfile.mkdtemp(prefix="memplug-bench-"))
    # Share the converted tokenizer with the user's own home, if it is there.
    from ..runtime.model_files import cache_dir
    from ..settings import Settings

    cached = cache_dir(Settings().home, None)
    if cached.exists():
        (home / "models").mkdir(parents=True)
        shutil.copytree(cached, cache_dir(home, None))
    bench = StoreBench(dsn, home, seed, log)
    started = time.time()
    try:
        results: dict[str, Any] = {"benchmark": "store", "machine": _machine(bench.real),
                                   "settings": {"read_budget": {"tokens": 4096, "k": 10}, "batch": BATCH,
                                                "needles": NEEDLES, "real_max": real_max, "mode": "hybrid"},
                                   "one_scope": [], "many_scopes": None}
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        for size in sizes:
            results["one_scope"].append(bench.one_scope(size, real_max))
            (out / "store.json").write_text(json.dumps(results, indent=2))  # keep what is done
        if scopes_total:
            results["many_scopes"] = bench.many_scopes(scopes_total, n_scopes, minutes)
        results["seconds"] = round(time.time() - started, 1)
        results["targets"] = _targets(results)
    finally:
        bench.close()
        if dsn is None:
            shutil.rmtree(home, ignore_errors=True)
    (out / "store.json").write_text(json.dumps(results, indent=2))
    _plot(results, out / "store.png")
    log(f"wrote {out / 'store.json'}")
    return results


def _targets(r: dict[str, Any]) -> dict[str, Any]:
    runs = r["one_scope"]
    largest = max(runs, key=lambda x: x["items"]) if runs else None
    checks = {}
    if runs:
        checks["batched_write_ge_300_per_s"] = min(x["write_batched_items_per_s"] for x in runs) >= 300
        checks["single_write_p95_le_40ms"] = max(x["write_single"]["p95_ms"] for x in runs) <= 40
        for suffix in ("", "_settled"):
            key = f"read_with_query_embedding{suffix}"
            if key in largest:
                checks[f"read_p95_le_30ms_at_{largest['items']}_with_embedding{suffix}"] = largest[key]["p95_ms"] <= 30
        checks["needle_recall_at_10_ge_0.95"] = min(x["needle_recall_at_10"] for x in runs) >= 0.95
    return checks


def _plot(r: dict[str, Any], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    rows = [(f"{x['items']:,} items\n1 scope", x) for x in r["one_scope"]]
    if r.get("many_scopes"):
        m = r["many_scopes"]
        rows.append((f"{m['items']:,} items\n{m['scopes']} scopes", m))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    xs = np.arange(len(rows))
    for off, key, label in [(-0.3, "read_with_query_embedding", "with query embedding"),
                            (0.0, "read_without_query_embedding", "store only")]:
        # At rest when measured (after autovacuum and a checkpoint), else right after the load.
        stats = [x.get(f"{key}_settled", x[key]) for _, x in rows]
        ax1.bar(xs + off, [v["p50_ms"] for v in stats], 0.28, label=f"p50 {label}")
        ax1.scatter(xs + off, [v["p95_ms"] for v in stats], marker="_", s=400, c="k")
    ax1.axhline(30, ls="--", c="r", lw=1, label="p95 target 30 ms")
    ax1.set_xticks(xs, [n for n, _ in rows])
    ax1.set_ylabel("read latency, ms (bar p50, tick p95)")
    ax1.legend(fontsize=8)
    ax2.bar(xs, [x["write_batched_items_per_s"] or 0 for _, x in rows], 0.5)
    ax2.axhline(300, ls="--", c="r", lw=1, label="target 300 items/s")
    ax2.set_xticks(xs, [n for n, _ in rows])
    ax2.set_ylabel("batched write, items/s")
    ax2.legend(fontsize=8)
    fig.suptitle(f"memplug store — {r['machine']['cores']} cores, PostgreSQL {r['machine']['postgres']}, "
                 f"pgvector {r['machine']['pgvector']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
