"""Load benchmark: many processes writing, reading and forgetting at once against one Postgres.

``processes`` spawned processes, each with its own :class:`~memplug.Memory` (and
connection pool), run for ``seconds``. Each owns ``USERS_PER_PROCESS`` users,
seeded with a few facts before the clock starts, and loops over a fixed mix of
operations (``MIX``):

- ``write``: one new fact to one of its users (embedded with the real MiniLM);
- ``read``: a question to one of its users (the query is embedded too);
- ``read_shared``: a question to a user of another process, racing that
  process's writes and forgets (usage counters of the same rows are updated
  from several processes);
- ``forget``: one of its own items.

Every operation is timed; an error is counted and never retried. Deadlocks are
read from ``pg_stat_database`` before and after. Runs against a fresh embedded
Postgres in a temporary folder, or ``dsn`` (``MEMPLUG_DSN``), where the run's
users are forgotten afterwards. Writes ``load.json`` (and ``load.png`` when
matplotlib is installed) to ``out_dir``.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import multiprocessing
import os
import queue
import random
import shutil
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

MIX = {"write": 0.40, "read": 0.30, "read_shared": 0.15, "forget": 0.15}
KINDS = tuple(MIX)
USERS_PER_PROCESS = 4
SEED_FACTS = 10  # per user, before the clock starts
ERROR_SAMPLES = 10


def _pct(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def user_ids(run: str, process: int) -> list[str]:
    return [f"load-{run}-p{process}-u{k}" for k in range(USERS_PER_PROCESS)]


def _worker(n: int, processes: int, run: str, dsn: str, home: str, plugins: str, seconds: float, seed: int,
            barrier: Any, results: Any) -> None:
    """One load process: seed its users, wait for the others, then run the mix until the clock runs out."""
    from ..memory import Memory
    from ..settings import Settings
    from .facts import haystack

    rng = random.Random(seed * 1000 + n)
    facts = haystack(100_000, seed=seed * 1000 + n)
    mine = user_ids(run, n)
    others = [u for p in range(processes) if p != n for u in user_ids(run, p)] or mine
    out: dict[str, Any] = {"process": n, "ops": [], "errors": []}
    try:
        mem = Memory(dsn, home=home, settings=Settings(plugins=plugins), options={"pool_size": 2})
    except Exception as e:  # noqa: BLE001 - reported, and the barrier is broken so the others stop too
        out["errors"].append(("setup", f"{type(e).__name__}: {e}"[:300]))
        barrier.abort()
        results.put(out)
        return
    try:
        live: dict[str, list[int]] = {}
        questions: list[str] = []
        for user in mine:
            batch = [next(facts) for _ in range(SEED_FACTS)]
            live[user] = [it.id for it in mem.write(user, [f.statement for f in batch])]
            questions += [f.paraphrase for f in batch]
        barrier.wait(timeout=600)
        start = time.monotonic()
        deadline = start + seconds
        kinds, weights = list(MIX), list(MIX.values())
        while (now := time.monotonic()) < deadline:
            kind = rng.choices(kinds, weights)[0]
            user = rng.choice(mine)
            if kind == "forget" and not live[user]:
                kind = "write"
            t = time.perf_counter()
            try:
                if kind == "write":
                    fact = next(facts)
                    live[user].append(mem.write(user, fact.statement).id)
                    questions.append(fact.paraphrase)
                elif kind == "read":
                    mem.read(user, rng.choice(questions))
                elif kind == "read_shared":
                    mem.read(rng.choice(others), rng.choice(questions))
                else:
                    ids = live[user]
                    mem.forget(user, [ids.pop(rng.randrange(len(ids)))])
            except Exception as e:  # noqa: BLE001 - every failure is counted, none retried
                out["errors"].append((kind, f"{type(e).__name__}: {e}"[:300]))
            out["ops"].append((kind, round(now - start, 4), time.perf_counter() - t))
    except Exception as e:  # noqa: BLE001
        out["errors"].append(("setup", f"{type(e).__name__}: {e}"[:300]))
        barrier.abort()
    finally:
        results.put(out)
        mem.close()


def _deadlocks(dsn: str) -> int:
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SELECT pg_stat_clear_snapshot()")
        return int(conn.execute(
            "SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()").fetchone()[0])


def _machine(dsn: str) -> dict[str, Any]:
    import platform

    import psycopg

    with psycopg.connect(dsn) as conn:
        pg = conn.execute("SHOW server_version").fetchone()[0]
        vec = conn.execute("SELECT extversion FROM pg_extension WHERE extname = 'vector'").fetchone()
        max_conn = int(conn.execute("SHOW max_connections").fetchone()[0])
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "memory_gib": round(mem_gib, 1), "python": platform.python_version(), "postgres": pg,
            "pgvector": vec[0] if vec else None, "max_connections": max_conn, "gpu": None,
            "nice": os.nice(0), "load_average_at_start": [round(x, 2) for x in os.getloadavg()]}


def summarize(outs: Sequence[dict[str, Any]], seconds: float) -> dict[str, Any]:
    """Throughput and latency per kind of operation, from every process's log."""
    per_kind: dict[str, Any] = {}
    errors = Counter(kind for o in outs for kind, _ in o["errors"])
    total = 0
    for kind in KINDS:
        lat = [secs for o in outs for k, _, secs in o["ops"] if k == kind]
        total += len(lat)
        row: dict[str, Any] = {"ops": len(lat), "ops_per_s": round(len(lat) / seconds, 2), "errors": errors[kind]}
        if lat:
            row.update({f"p{q}_ms": round(_pct(lat, q / 100) * 1000, 1) for q in (50, 95, 99)})
            row["max_ms"] = round(max(lat) * 1000, 1)
        per_kind[kind] = row
    timeline = Counter(int(at) for o in outs for _, at, _ in o["ops"] if at < seconds)
    return {"ops": total, "ops_per_s": round(total / seconds, 2), "per_kind": per_kind,
            "errors": sum(len(o["errors"]) for o in outs),
            "error_samples": [f"{k}: {m}" for o in outs for k, m in o["errors"]][:ERROR_SAMPLES],
            "ops_per_second_timeline": [timeline.get(s, 0) for s in range(int(seconds))]}


def run(processes: int = 8, seconds: float = 60.0, out_dir: str | Path = "benchmarks/results", console: Any = None,
        dsn: str | None = None, seed: int = 0, plugins: str = "context,pgvector", name: str = "load") -> dict[str, Any]:
    from ..errors import InvalidInput
    from ..settings import Settings

    if processes < 1 or seconds <= 0:
        raise InvalidInput(f"the load benchmark needs processes >= 1 and seconds > 0, got {processes} and {seconds}")
    log = console.print if console is not None else print
    dsn = dsn or os.environ.get("MEMPLUG_DSN") or None
    embedded = dsn is None
    own_home = Settings().home
    home = Path(tempfile.mkdtemp(prefix="memplug-bench-load-"))
    if (own_home / "models").is_dir():  # the converted tokenizer, read only
        (home / "models").symlink_to((own_home / "models").resolve(), target_is_directory=True)
    if embedded:
        from ..embedded import embedded_dsn

        # Registered before the server starts, so it runs after the server's own exit hook stops it.
        atexit.register(shutil.rmtree, home, True)
        dsn = embedded_dsn(home)
    from ..runtime.tokenizer import load_token_counter

    load_token_counter(home)  # converted once here, not by every process at once
    run_id = uuid.uuid4().hex[:8]
    ctx = multiprocessing.get_context("spawn")  # torch and connection pools do not survive a fork
    barrier = ctx.Barrier(processes + 1)
    results = ctx.Queue()
    log(f"load: {processes} processes x {seconds:g} s against {_safe(dsn)} (tiers {plugins})")
    procs = [ctx.Process(target=_worker, args=(n, processes, run_id, dsn, str(home), plugins, seconds, seed,
                                                 barrier, results), daemon=True)
             for n in range(processes)]
    try:
        for p in procs:
            p.start()
        with contextlib.suppress(threading.BrokenBarrierError):  # a process failed: its error is in its log
            barrier.wait(timeout=600)  # every process has loaded the embedder and seeded its users
        machine = _machine(dsn)
        before = _deadlocks(dsn)
        started = time.time()
        outs = _collect(procs, results, seconds + 600)
        time.sleep(1.0)  # backends report their statistics as they exit
        after = _deadlocks(dsn)
        result: dict[str, Any] = {
            "benchmark": "load", "machine": machine,
            "settings": {"processes": processes, "seconds": seconds, "mix": MIX,
                         "users_per_process": USERS_PER_PROCESS, "seed_facts_per_user": SEED_FACTS,
                         "tiers": plugins, "embedder": "all-MiniLM-L6-v2", "pool_size_per_process": 2,
                         "seed": seed, "store": "fresh embedded Postgres" if embedded else "given DSN"},
            **summarize(outs, seconds), "deadlocks": after - before, "wall_seconds": round(time.time() - started, 1),
        }
        if not embedded:
            _forget_run(dsn, str(home), plugins, run_id, processes)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
        if not embedded:
            shutil.rmtree(home, ignore_errors=True)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result, indent=2))
    _plot(result, out / f"{name}.png")
    log(f"load: {result['ops_per_s']} ops/s, {result['errors']} errors, {result['deadlocks']} deadlocks; "
        + ", ".join(f"{k} {v['ops_per_s']}/s p95 {v.get('p95_ms', '-')} ms" for k, v in result["per_kind"].items()))
    log(f"wrote {out / f'{name}.json'}")
    return result


def _collect(procs: Sequence[Any], results: Any, timeout: float) -> list[dict[str, Any]]:
    """Every process's log; a process that died without one is reported as an error."""
    outs: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while len(outs) < len(procs) and time.monotonic() < deadline:
        try:
            outs.append(results.get(timeout=1.0))
        except queue.Empty:
            if not any(p.is_alive() for p in procs):
                break
    for p in procs:
        p.join(timeout=60)
    seen = {o["process"] for o in outs}
    outs += [{"process": n, "ops": [], "errors": [("setup", f"process {n} died (exit code {p.exitcode})")]}
             for n, p in enumerate(procs) if n not in seen]
    return outs


def _safe(dsn: str) -> str:
    from ..store import redact

    return redact(dsn)


def _forget_run(dsn: str, home: str, plugins: str, run_id: str, processes: int) -> None:
    """Leave nothing of the run in a database that outlives it."""
    from ..memory import Memory
    from ..settings import Settings

    with Memory(dsn, home=home, settings=Settings(plugins=plugins), options={"pool_size": 1}) as mem:
        for n in range(processes):
            for user in user_ids(run_id, n):
                mem.forget(user)


def _plot(r: dict[str, Any], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import numpy as np
    except ImportError:
        return
    kinds = [k for k in KINDS if r["per_kind"][k]["ops"]]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    xs = np.arange(len(kinds))
    for off, q in ((-0.27, 50), (0.0, 95), (0.27, 99)):
        ax1.bar(xs + off, [r["per_kind"][k][f"p{q}_ms"] for k in kinds], 0.26, label=f"p{q}")
    ax1.set_xticks(xs, [f"{k}\n{r['per_kind'][k]['ops_per_s']}/s" for k in kinds])
    ax1.set_ylabel("latency, ms")
    ax1.legend(fontsize=8)
    ax2.plot(range(len(r["ops_per_second_timeline"])), r["ops_per_second_timeline"])
    ax2.set_xlabel("second")
    ax2.set_ylabel("operations per second (all processes)")
    ax2.set_ylim(bottom=0)
    m = r["machine"]
    fig.suptitle(f"memplug load — {r['settings']['processes']} processes, {r['ops_per_s']} ops/s, "
                 f"{r['errors']} errors, {r['deadlocks']} deadlocks — {m['cores']} cores, "
                 f"PostgreSQL {m['postgres']}" + (f", nice {m['nice']}" if m["nice"] else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
