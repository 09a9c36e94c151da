"""``memplug demo``: knowledge climbing from text to KV to weights as two users keep asking.

The script (``script.json``): two users each tell an agent ten things about
themselves over two sessions, and the agent writes a note of each (``write``).
Then, session after session, questions about them come in, some far more
often than others (a Zipf law over the facts, two phrasings each). The local model answers every question from
the user's memory (``Memory.answer``), and after each session a consolidation
runs, inline, as a worker would run it: hot items move to explicit KV memory,
then to the user's LoRA adapter.

Policy windows are scaled to the demo's minutes (``DEMO_OPTIONS``): a real
deployment counts reads over days. Per session the demo prints where each
user's facts sit, accuracy, prompt tokens and latency; at the end, the same
per tier, and a PNG chart of where the knowledge sat over the sessions.
"""

from __future__ import annotations

import copy
import json
import random
import statistics
import time
from collections import Counter
from importlib import resources
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ..errors import InvalidInput
from ..types import Budget, Scope

AGENT = "demo"
LEVELS = {1: "text", 2: "KV", 3: "weights"}
# Windows in minutes, not days: the demo plays weeks of use in a few minutes.
DEMO_OPTIONS: dict[str, dict[str, Any]] = {
    "frequency": {
        "policy": "frequency",
        "freq_promote_reads": 2, "freq_promote_window_s": 3600,  # 2 reads within the hour: KV
        "freq_weights_reads": 8, "freq_weights_window_s": 3600,  # 8 within the hour ...
        "freq_weights_min_items": 3,  # ... for 3 items of a user: train their adapter
        "demote_idle_s": 86400,
        "lora_max_train_s": 240,
    },
    # CostPolicy on measured costs: on this CPU a retrain pays only when the KV budget binds
    # and reads are priced over a long horizon (see the README).
    "cost": {
        "policy": "cost", "heat_half_life_s": 600, "cost_horizon_s": 30 * 86400,
        "max_kv_bytes": 400_000, "max_retrains_per_day": 1, "lora_max_train_s": 240,
    },
}


def load_script() -> dict[str, Any]:
    """The bundled script, each fact linked to the turn that tells it."""
    return check_script(json.loads(resources.files(__package__).joinpath("script.json").read_text()))


def check_script(script: dict[str, Any]) -> dict[str, Any]:
    """Validate a demo script; return a copy with each fact linked to the note that holds its answer."""
    script = copy.deepcopy(script)
    users = script.get("users")
    if not isinstance(users, dict) or not users:
        raise InvalidInput("a demo script needs a non-empty 'users' mapping")
    for user, data in users.items():
        told = [t for session in data.get("told", []) for t in session]  # the notes, per session
        if not told or not data.get("facts"):
            raise InvalidInput(f"demo script: user {user!r} needs 'told' sessions and 'facts'")
        for fact in data["facts"]:
            holders = [t for t in told if fact["answer"].lower() in t.lower()]
            if len(holders) != 1 or not fact.get("questions"):
                raise InvalidInput(f"demo script: {user}'s answer {fact['answer']!r} must be in exactly one "
                                   f"note (found {len(holders)}) and have questions")
            fact["turn"] = holders[0]
    return script


def run_demo(console: Console | None = None, *, memory: Any = None, script: dict[str, Any] | None = None,
             sessions: int = 5, per_session: int = 10, zipf_s: float = 1.2, k: int = 2, seed: int = 0,
             policy: str = "frequency", out_dir: str | Path | None = "memplug-demo",
             as_json: bool = False) -> dict[str, Any]:
    """Play the script; return (and with ``as_json`` print) the per-answer log and the summaries."""
    from ..memory import Memory

    if policy not in DEMO_OPTIONS:
        raise InvalidInput(f"demo policy must be one of {sorted(DEMO_OPTIONS)}, got {policy!r}")
    if sessions < 1 or per_session < 1 or k < 1:
        raise InvalidInput("demo sessions, questions per session and k must be at least 1")
    script = check_script(script) if script is not None else load_script()
    console = console or Console(quiet=True)
    mem = memory or Memory(options=DEMO_OPTIONS[policy])
    try:
        result = _run(mem, script, console, sessions, per_session, zipf_s, k, seed, out_dir)
    finally:
        if memory is None:
            mem.close()
    result["policy"] = policy if memory is None else mem.option("policy")
    if as_json:
        print(json.dumps(result, indent=2, ensure_ascii=False, default=str))
    return result


def _run(mem, script, console, sessions, per_session, zipf_s, k, seed, out_dir) -> dict[str, Any]:
    users = script["users"]
    rng = random.Random(seed)
    started = time.perf_counter()
    console.print(f"[bold]memplug demo[/]: {len(users)} users, {sessions} sessions of {per_session} questions each, "
                  f"reads of k={k}, policy [bold]{escape(mem.option('policy'))}[/]", markup=True)
    for user in users:  # a rerun starts from a clean slate
        mem.forget(Scope(user, AGENT))
    # 1. Each user tells the agent about themselves; the agent writes a note of each thing it learns.
    for user, data in users.items():
        by_text = {}
        for n, notes in enumerate(data["told"], start=1):
            for it in mem.write(Scope(user, AGENT), notes, metadata={"session": f"told-{n}"}):
                by_text[it.text] = it.id
        for fact in data["facts"]:
            fact["item"] = by_text[fact["turn"]]
    console.print(f"Told: {sum(len(d['facts']) for d in users.values())} facts written as notes in "
                  f"{time.perf_counter() - started:.1f} s; every one starts as text (level 1).\n")

    answers: list[dict[str, Any]] = []
    timeline: list[dict[str, Any]] = [_where(mem, users, 0)]
    consolidations: list[dict[str, Any]] = []
    columns = (TextColumn("{task.description}", markup=False), BarColumn(), TextColumn("{task.completed}/{task.total}"),
               TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        overall = progress.add_task("questions", total=sessions * per_session * len(users))
        for session in range(1, sessions + 1):
            rows = []
            for user, data in users.items():
                weights = [1.0 / (r + 1) ** zipf_s for r in range(len(data["facts"]))]
                scope = Scope(user, AGENT, f"ask-{session}")
                for fact in rng.choices(data["facts"], weights=weights, k=per_session):
                    question = rng.choice(fact["questions"])
                    progress.update(overall, description=f"session {session}: {user} asks")
                    a = mem.answer(scope, question, Budget(k=k), stop="\n", max_new_tokens=32)
                    row = {"session": session, "user": user, "question": question, "answer": fact["answer"],
                           "reply": a.text.strip(), "right": fact["answer"].lower() in a.text.lower(),
                           "served_by": a.served_by(fact["item"]) or "missed", "memory_tokens": a.recall.tokens,
                           "prompt_tokens": a.prompt_tokens, "seconds": a.seconds,
                           "leaked": [it.id for it in a.recall.items if it.scope.user_id != user]}
                    rows.append(row)
                    progress.advance(overall)
            answers.extend(rows)
            moved = []
            for user in users:
                task = progress.add_task(f"consolidating {user}", total=None)

                def report(what, done, total, info, task=task, user=user):
                    progress.update(task, description=f"consolidating {user}: {what}", completed=done, total=total)
                t = time.perf_counter()
                placed = mem.consolidate(Scope(user, AGENT), progress=report)
                seconds = time.perf_counter() - t
                progress.remove_task(task)
                for p in placed:
                    if p.held and p.level >= 2:
                        moved.append(f"{user}: {len(p.item_ids)} to {LEVELS.get(p.level, p.level)}"
                                     + (f" ({p.reason})" if p.level >= 3 else ""))
                consolidations.append({"after_session": session, "user": user, "seconds": seconds,
                                       "placements": [{"tier": p.tier, "level": p.level, "items": len(p.item_ids),
                                                       "held": p.held, "reason": p.reason} for p in placed]})
            timeline.append(_where(mem, users, session))
            _show_session(console, session, rows, timeline[-1], moved,
                          sum(c["seconds"] for c in consolidations if c["after_session"] == session))
    result = {"answers": answers, "timeline": timeline, "consolidations": consolidations,
              "by_session": _summarise(answers, "session"), "by_tier": _summarise(answers, "served_by"),
              "seconds": time.perf_counter() - started, "leaks": sum(len(r["leaked"]) for r in answers)}
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "demo.json").write_text(json.dumps(result, indent=2, ensure_ascii=False, default=str))
        result["chart"] = _plot(result, out / "demo.png")
    _show_summary(console, result)
    return result


def _where(mem, users, session: int) -> dict[str, Any]:
    """How many of each user's facts sit at each level."""
    out: dict[str, Any] = {"session": session}
    for user, data in users.items():
        level = {u.item_id: u.level for u in mem.usage(Scope(user, AGENT), subtree=True)}
        counts = Counter(LEVELS.get(level.get(f["item"], 1), "text") for f in data["facts"])
        out[user] = {name: counts.get(name, 0) for name in LEVELS.values()}
    return out


def _summarise(rows: list[dict[str, Any]], key: str) -> dict[str, dict[str, Any]]:
    groups: dict[Any, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(r[key], []).append(r)
    return {str(g): {"answers": len(rs), "accuracy": sum(r["right"] for r in rs) / len(rs),
                     "memory_tokens": statistics.fmean(r["memory_tokens"] for r in rs),
                     "prompt_tokens": statistics.fmean(r["prompt_tokens"] for r in rs),
                     "latency_ms": 1000 * statistics.fmean(r["seconds"] for r in rs)}
            for g, rs in groups.items()}


def _show_session(console: Console, session: int, rows, where, moved, seconds: float) -> None:
    s = _summarise(rows, "session")[str(session)]
    served = Counter(r["served_by"] for r in rows)
    sits = "; ".join(f"{u}: " + " / ".join(f"{n} {name}" for name, n in c.items())
                     for u, c in where.items() if u != "session")
    console.print(f"[bold]session {session}[/]: accuracy {s['accuracy']:.0%}, "
                  f"{s['memory_tokens']:.1f} memory tokens and {s['prompt_tokens']:.0f} prompt tokens per answer, "
                  f"{s['latency_ms']:.0f} ms; answers from " + escape(", ".join(f"{n} {k}" for k, n in served.most_common())),
                  markup=True, highlight=False)
    console.print(f"   consolidation ({seconds:.1f} s): " + ("; ".join(moved) or "nothing moved"), markup=False,
                  highlight=False)
    console.print(f"   facts now at: {sits}", markup=False, highlight=False)


def _show_summary(console: Console, result: dict[str, Any]) -> None:
    table = Table(title="where the answers came from")
    for col in ("served by", "answers", "accuracy", "memory tokens / answer", "prompt tokens / answer", "latency"):
        table.add_column(col, justify="left" if col == "served by" else "right")
    order = {"text": 0, "kv": 1, "adapter": 2, "missed": 3}
    for tier, s in sorted(result["by_tier"].items(), key=lambda kv: order.get(kv[0], 9)):
        table.add_row(tier, str(s["answers"]), f"{s['accuracy']:.0%}", f"{s['memory_tokens']:.1f}",
                      f"{s['prompt_tokens']:.0f}", f"{s['latency_ms']:.0f} ms")
    console.print(table)
    table = Table(title="by session")
    for col in ("session", "text / KV / weights (facts, both users)", "accuracy", "memory tokens / answer",
                "latency"):
        table.add_column(col, justify="right")
    for where in result["timeline"][1:]:
        s = result["by_session"][str(where["session"])]
        totals = Counter()
        for u, c in where.items():
            if u != "session":
                totals.update(c)
        table.add_row(str(where["session"]), " / ".join(str(totals[n]) for n in LEVELS.values()),
                      f"{s['accuracy']:.0%}", f"{s['memory_tokens']:.1f}", f"{s['latency_ms']:.0f} ms")
    console.print(table)
    console.print(f"{len(result['answers'])} answers in {result['seconds']:.0f} s; "
                  f"hits from the other user: {result['leaks']}."
                  + (f" Chart: {result['chart']}" if result.get("chart") else ""), highlight=False)


def _plot(result: dict[str, Any], path: Path) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    timeline = result["timeline"]
    sessions = [w["session"] for w in timeline]
    users = [u for u in timeline[0] if u != "session"]
    fig, axes = plt.subplots(1, len(users) + 1, figsize=(5 * (len(users) + 1), 3.8))
    colours = {"text": "#999999", "KV": "#4c72b0", "weights": "#55a868"}
    for ax, user in zip(axes, users, strict=False):
        bottom = [0] * len(sessions)
        for name in LEVELS.values():
            values = [w[user][name] for w in timeline]
            ax.bar(sessions, values, bottom=bottom, label=name, color=colours[name])
            bottom = [b + v for b, v in zip(bottom, values, strict=True)]
        ax.set_title(f"{user}: where the facts sit")
        ax.set_xlabel("after session (0: just told)")
        ax.set_ylabel("facts")
        ax.legend(fontsize=8)
    ax = axes[-1]
    by = result["by_session"]
    xs = sorted(int(s) for s in by)
    ax.plot(xs, [by[str(s)]["memory_tokens"] for s in xs], marker="o", label="memory tokens / answer")
    ax.set_xlabel("session")
    ax.set_ylabel("memory tokens in the prompt")
    ax2 = ax.twinx()
    ax2.plot(xs, [by[str(s)]["accuracy"] for s in xs], marker="s", color="#dd8452", label="accuracy")
    ax2.set_ylim(0, 1.05)
    ax2.set_ylabel("accuracy")
    ax.set_title("per session")
    ax.set_xticks(xs)
    lines = ax.get_lines() + ax2.get_lines()
    ax.legend(lines, [line.get_label() for line in lines], loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)
