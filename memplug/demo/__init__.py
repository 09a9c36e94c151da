"""``memplug demo``: a two-user conversation written to memory, then questions answered from it.

The conversation (``conversation.json``, about 100 turns over four sessions per
user) is written turn by turn; each session's turns pass through the context
tier and are flushed to long-term memory when the session ends. Every question
is then answered from the user's memory alone, with its top hits and latency.
"""

from __future__ import annotations

import json
import statistics
import time
from importlib import resources
from typing import Any

from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from ..types import Budget, Scope

AGENT = "demo"


def load_script() -> dict[str, Any]:
    return json.loads(resources.files(__package__).joinpath("conversation.json").read_text())


def run_demo(console: Console | None = None, limit: int | None = None, as_json: bool = False,
             memory: Any = None, top: int = 3) -> dict[str, Any]:
    from ..memory import Memory

    script = load_script()
    questions = script["questions"][:limit] if limit else script["questions"]
    mem = memory or Memory()
    try:
        return _run(mem, script, questions, console, as_json, top)
    finally:
        if memory is None:
            mem.close()


def _run(mem, script, questions, console, as_json, top) -> dict[str, Any]:
    users = script["users"]
    for user in users:  # a rerun starts from a clean slate
        mem.forget(Scope(user, AGENT))
    n_turns = sum(len(s["turns"]) for u in users.values() for s in u["sessions"])
    t0 = time.perf_counter()
    with Progress(console=console or Console(quiet=True), transient=True) as progress:
        task = progress.add_task("writing the conversation", total=n_turns)
        for user, data in users.items():
            for session in data["sessions"]:
                scope = Scope(user, AGENT, session["id"])
                for turn in session["turns"]:
                    mem.write_messages(scope, [turn])
                    progress.advance(task)
                mem.end_session(scope)
    write_s = time.perf_counter() - t0

    rows, latencies = [], []
    for q in questions:
        scope = Scope(q["user"], AGENT)
        t = time.perf_counter()
        recall = mem.read(scope, q["question"], Budget(tokens=256, k=top))
        ms = (time.perf_counter() - t) * 1000
        latencies.append(ms)
        texts = [h.text for h in recall.hits]
        answer = q["answer"].lower()
        rank = next((n for n, text in enumerate(texts, 1) if answer in text.lower()), None)
        leaked = [h.item.id for h in recall.hits if h.item.scope.user_id != q["user"]]
        rows.append({"user": q["user"], "question": q["question"], "answer": q["answer"], "rank": rank,
                     "hits": texts, "ms": round(ms, 2), "leaked": leaked})

    n = len(rows)
    summary = {
        "turns_written": n_turns,
        "write_seconds": round(write_s, 2),
        "questions": n,
        "answer_in_top1": sum(r["rank"] == 1 for r in rows) / n if n else 0.0,
        f"answer_in_top{top}": sum(r["rank"] is not None for r in rows) / n if n else 0.0,
        "read_ms_mean": round(statistics.fmean(latencies), 2) if latencies else None,
        "read_ms_p95": round(sorted(latencies)[max(0, int(0.95 * n) - 1)], 2) if latencies else None,
        "leaks": sum(len(r["leaked"]) for r in rows),
        "items": mem.stats(Scope(next(iter(users))))["items"],
    }
    if as_json:
        print(json.dumps({"summary": summary, "questions": rows}, indent=2, ensure_ascii=False))
    elif console is not None:
        _show(console, rows, summary, top)
    return {"summary": summary, "questions": rows}


def _show(console: Console, rows, summary, top) -> None:
    console.print(f"Wrote {summary['turns_written']} turns for two users in {summary['write_seconds']} s "
                  "(each session flushed from the context tier to long-term memory).\n")
    for r in rows:
        mark = f"[green]answer at #{r['rank']}[/]" if r["rank"] else "[red]answer not in top hits[/]"
        console.print(f"[bold]{r['user']}[/] asks: {r['question']}  ({r['ms']:.1f} ms, {mark})", highlight=False)
        for n, text in enumerate(r["hits"], 1):
            console.print(f"   {n}. {text}", highlight=False, soft_wrap=True)
    table = Table(title="demo summary")
    table.add_column("measure")
    table.add_column("value")
    table.add_row("questions", str(summary["questions"]))
    table.add_row("answer in top 1", f"{summary['answer_in_top1']:.0%}")
    table.add_row(f"answer in top {top}", f"{summary[f'answer_in_top{top}']:.0%}")
    table.add_row("read latency mean / p95", f"{summary['read_ms_mean']} ms / {summary['read_ms_p95']} ms")
    table.add_row("hits from the other user", str(summary["leaks"]))
    console.print(table)
