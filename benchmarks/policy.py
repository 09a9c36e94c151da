"""Policy benchmark: what promotion saves on a skewed workload, against keeping everything as text.

200 facts (the kv benchmark's generator) are written to one user. Questions
about them follow a Zipf law: the fact of popularity rank r is asked with
probability proportional to 1 / r^s. Each arm replays the same draws:

1. **warm-up**: ``warmup`` reads (usage only, no answers), in ``rounds``
   parts, each followed by a consolidation (timed) as a worker would run it;
2. **measured**: ``answers`` questions, each read and answered by the local
   model (greedy, up to the first line break), one at a time.

Arms: ``rag`` (no policy: every item stays text), ``frequency``
(:class:`memplug.policies.FrequencyPolicy`, defaults) and ``cost``
(:class:`memplug.policies.CostPolicy`, defaults); more as ``name:key=value``
settings. Per arm: text-memory tokens and prompt tokens per answer, answer
latency (mean, p95), accuracy (the answer string in the reply), how each
answer's fact was served (text, KV, adapter, not retrieved), KV bytes,
adapter versions, and consolidation time.
"""

from __future__ import annotations

import contextlib
import random
import statistics
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click

from memplug.checks.facts import generate
from memplug.checks.store import _pct

from . import console, fail_cleanly, setting
from .kv import _machine
from .lora import _save

BUILTIN_PLUGINS = "context,pgvector,kv,lora,frequency,cost"
ARMS: dict[str, dict[str, Any]] = {
    "rag": {"policy": "none"},
    "frequency": {"policy": "frequency"},
    "cost": {"policy": "cost"},
}


def zipf_draws(ranking: list[int], draws: int, s: float, rng: random.Random) -> list[int]:
    """``draws`` items; ``ranking[r]`` (popularity rank r) is drawn with probability ~ 1 / (r + 1)^s."""
    weights = [1.0 / (r + 1) ** s for r in range(len(ranking))]
    return [ranking[r] for r in rng.choices(range(len(ranking)), weights=weights, k=draws)]


def run(n_facts: int = 200, warmup: int = 600, rounds: int = 3, answers: int = 150, zipf_s: float = 1.0,
        k: int = 3, seed: int = 7, arms: dict[str, dict[str, Any]] | None = None,
        out_dir: str | Path = "benchmarks/results", console: Any = None, name: str = "policy") -> dict[str, Any]:
    from memplug import Budget, Memory, Scope
    from memplug.settings import Settings

    say = console.print if console is not None else print
    arms = arms or ARMS
    facts = generate(n_facts, seed)
    rng = random.Random(seed)
    ranking = list(range(n_facts))
    rng.shuffle(ranking)  # which facts are popular is random; the warm-up and the answers share it
    warm = zipf_draws(ranking, warmup, zipf_s, rng)
    asked = zipf_draws(ranking, answers, zipf_s, rng)
    kinds = [rng.choice(("question", "paraphrase")) for _ in range(warmup + answers)]
    budget = Budget(k=k)
    result: dict[str, Any] = {
        "machine": None, "facts": n_facts, "warmup_reads": warmup, "rounds": rounds, "answers": answers,
        "zipf_s": zipf_s, "k": k, "seed": seed, "arms": {},
        "distinct_facts_asked": len(set(asked)),
        "share_of_questions_on_top_10_facts": _head_share(warm + asked, 10),
    }
    for label, options in arms.items():
        scope = Scope(f"bench-policy-{label}")
        # The built-in tiers and policies only, whatever else is installed: results compare across machines.
        with Memory(settings=Settings(plugins=BUILTIN_PLUGINS), options=options) as mem:
            if result["machine"] is None:
                result["machine"] = _machine()
                result["model"] = mem.model.name
            mem.forget(scope)
            # Every arm starts from the tiers' prior costs and measures its own: costs measured by
            # earlier runs (or an earlier arm) would change what CostPolicy decides.
            with _fresh_costs(mem):
                t0 = time.perf_counter()
                items = mem.write(scope, [f.statement for f in facts])
                write_s = time.perf_counter() - t0
                ids = [it.id for it in items]
                consolidations = []
                per_round = -(-warmup // max(1, rounds))
                for r in range(rounds):
                    part = warm[r * per_round:(r + 1) * per_round]
                    for n, i in enumerate(part):
                        mem.read(scope, getattr(facts[i], kinds[r * per_round + n]), budget)
                    if options.get("policy", "cost") != "none":
                        t = time.perf_counter()
                        placed = mem.consolidate(scope)
                        consolidations.append({"round": r + 1, "seconds": time.perf_counter() - t,
                                               "moved": sum(len(p.item_ids) for p in placed if p.held)})
                    say(f"{label}: warm-up round {r + 1}/{rounds}, {len(part)} reads"
                        + (f", consolidation {consolidations[-1]['seconds']:.1f} s "
                           f"({consolidations[-1]['moved']} placed)" if consolidations else ""))
                levels = _levels(mem, scope)
                rows = []
                for n, i in enumerate(asked):
                    q = getattr(facts[i], kinds[warmup + n])
                    a = mem.answer(scope, q, budget, stop="\n", max_new_tokens=24)
                    rows.append({"fact": i, "kind": kinds[warmup + n], "right": facts[i].answer.lower() in a.text.lower(),
                                 "served_by": a.served_by(ids[i]) or "missed", "memory_tokens": a.recall.tokens,
                                 "prompt_tokens": a.prompt_tokens, "seconds": a.seconds,
                                 "first_token_s": a.first_token_s, "kv_items": len(a.recall.kv.items) if a.recall.kv else 0,
                                 "adapter": a.recall.adapter is not None})
                    if (n + 1) % 25 == 0:
                        say(f"{label}: {n + 1}/{len(asked)} answers")
                arm = _summary(rows, consolidations, levels, mem, scope, write_s)
                arm["options"] = options
                arm["per_answer"] = [{k: r[k] for k in ("fact", "kind", "right", "served_by", "kv_items", "adapter")}
                                  for r in rows]  # per answer, to compare arms question by question
                result["arms"][label] = arm
                say(f"{label}: {arm['memory_tokens_per_answer']:.1f} memory tokens / answer, accuracy "
                    f"{arm['accuracy']:.2f}, latency {1000 * arm['latency_s_mean']:.0f} / {1000 * arm['latency_s_p95']:.0f} ms, "
                    f"KV {arm['kv_bytes'] / 1e6:.1f} MB, {arm['adapter_versions']} adapter version(s), "
                    f"consolidation {arm['consolidation_s']:.1f} s; served {arm['served_by']}")
                mem.forget(scope)
        _save(result, out_dir, name)
    rag = result["arms"].get("rag")
    if rag:
        for arm in result["arms"].values():
            arm["memory_tokens_vs_rag"] = (arm["memory_tokens_per_answer"] / rag["memory_tokens_per_answer"]
                                           if rag["memory_tokens_per_answer"] else None)
            arm["prompt_tokens_vs_rag"] = arm["prompt_tokens_per_answer"] / rag["prompt_tokens_per_answer"]
    _save(result, out_dir, name)
    _plot(result, out_dir, name)
    return result


@contextlib.contextmanager
def _fresh_costs(mem: Any) -> Iterator[None]:
    """Run with no measured tier costs (the tiers' priors), then put the deployment's back:
    the benchmark's own measurements are dropped."""
    mem.flush_measurements()
    with mem.store.transaction() as db:
        saved = db.execute("DELETE FROM tier_costs RETURNING tier, metric, value, samples, at").fetchall()
    try:
        yield
    finally:
        mem.flush_measurements()
        with mem.store.transaction() as db:
            db.execute("DELETE FROM tier_costs")
            for row in saved:
                db.execute("INSERT INTO tier_costs (tier, metric, value, samples, at) VALUES (%s, %s, %s, %s, %s)",
                           row)


def _head_share(draws: list[int], top: int) -> float:
    counts: dict[int, int] = {}
    for i in draws:
        counts[i] = counts.get(i, 0) + 1
    head = sorted(counts.values(), reverse=True)[:top]
    return sum(head) / max(1, len(draws))


def _levels(mem: Any, scope: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for u in mem.usage(scope, subtree=True):
        out[str(u.level)] = out.get(str(u.level), 0) + 1
    return dict(sorted(out.items()))


def _summary(rows, consolidations, levels, mem, scope, write_s) -> dict[str, Any]:
    seconds = [r["seconds"] for r in rows]
    served: dict[str, int] = {}
    right_by: dict[str, int] = {}
    for r in rows:
        served[r["served_by"]] = served.get(r["served_by"], 0) + 1
        right_by[r["served_by"]] = right_by.get(r["served_by"], 0) + r["right"]
    kv_bytes = sum(row["bytes"].get("kv", 0) for row in mem.inspect(scope, limit=0))
    with mem.store.transaction() as db:
        trained = db.execute("SELECT to_regclass('lora_adapters') IS NOT NULL").fetchone()[0]
        adapters = db.execute("SELECT count(*) FROM lora_adapters WHERE user_id = %s",
                              (scope.user_id,)).fetchone()[0] if trained else 0
    return {
        "accuracy": sum(r["right"] for r in rows) / len(rows),
        "accuracy_direct": _share([r["right"] for r in rows if r["kind"] == "question"]),
        "accuracy_paraphrase": _share([r["right"] for r in rows if r["kind"] == "paraphrase"]),
        "memory_tokens_per_answer": statistics.fmean(r["memory_tokens"] for r in rows),
        "prompt_tokens_per_answer": statistics.fmean(r["prompt_tokens"] for r in rows),
        "latency_s_mean": statistics.fmean(seconds), "latency_s_p95": _pct(seconds, 0.95),
        "first_token_s_mean": statistics.fmean(r["first_token_s"] for r in rows),
        "served_by": served,
        "accuracy_by_tier": {k: right_by[k] / served[k] for k in served},
        "kv_items_injected_per_answer": statistics.fmean(r["kv_items"] for r in rows),
        "adapter_applied": sum(r["adapter"] for r in rows) / len(rows),
        "items_per_level": levels,
        "kv_bytes": kv_bytes,
        "adapter_versions": int(adapters),
        "consolidation_s": sum(c["seconds"] for c in consolidations),
        "consolidations": consolidations,
        "write_s": write_s,
    }


def _share(values: list[bool]) -> float | None:
    return sum(values) / len(values) if values else None


def _plot(result: dict[str, Any], out_dir: str | Path, name: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    arms = list(result["arms"])
    data = result["arms"]
    fig, axes = plt.subplots(1, 4, figsize=(14, 3.8))
    panels = [
        ("memory tokens in the prompt / answer", [data[a]["memory_tokens_per_answer"] for a in arms]),
        ("accuracy", [data[a]["accuracy"] for a in arms]),
        ("answer latency, mean (s)", [data[a]["latency_s_mean"] for a in arms]),
        ("KV memory (MB)", [data[a]["kv_bytes"] / 1e6 for a in arms]),
    ]
    for ax, (title, values) in zip(axes, panels, strict=True):
        ax.bar(arms, values, color=["#999999", "#4c72b0", "#dd8452", "#55a868", "#c44e52"][:len(arms)])
        ax.set_title(title, fontsize=9)
        for x, v in enumerate(values):
            ax.annotate(f"{v:.2f}" if v < 10 else f"{v:.0f}", (x, v), ha="center", va="bottom", fontsize=8)
    fig.suptitle(f"{result['facts']} facts, Zipf s={result['zipf_s']}, {result['warmup_reads']} warm-up reads, "
                 f"{result['answers']} answers, k={result['k']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(Path(out_dir) / f"{name}.png", dpi=120)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--facts", "n_facts", default=200, show_default=True)
@click.option("--warmup", default=600, show_default=True, help="reads before the measured answers")
@click.option("--rounds", default=3, show_default=True, help="warm-up parts, each followed by a consolidation")
@click.option("--answers", default=150, show_default=True, help="questions answered by the local model")
@click.option("--zipf", "zipf_s", default=1.0, show_default=True, help="exponent of the question popularity law")
@click.option("-k", "k", default=3, show_default=True, help="items per read (Budget.k)")
@click.option("--arm", "arms", multiple=True,
              help="an arm as name:key=value,... of Memory options (repeatable; default: rag, frequency, cost)")
@click.option("--seed", default=7, show_default=True)
@click.option("--out", default="benchmarks/results", show_default=True)
@click.option("--name", default="policy", show_default=True, help="file name of the JSON and PNG")
@fail_cleanly
def main(n_facts: int, warmup: int, rounds: int, answers: int, zipf_s: float, k: int,
         arms: tuple[str, ...], seed: int, out: str, name: str) -> None:
    """Prompt tokens, latency, accuracy, KV bytes and adapters of RAG against the promotion policies."""
    for label, value in (("--facts", n_facts), ("--answers", answers), ("--rounds", rounds), ("-k", k)):
        if value < 1:
            raise click.BadParameter(f"{label} must be at least 1, got {value}")
    chosen = dict(setting(a) for a in arms) if arms else ARMS
    run(n_facts=n_facts, warmup=warmup, rounds=rounds, answers=answers, zipf_s=zipf_s, k=k, seed=seed,
        arms=chosen, out_dir=out, console=console, name=name)


if __name__ == "__main__":
    main()
