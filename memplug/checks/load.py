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

With ``http``, the same processes then run the same mix again through ``memplug serve``
(``server_workers`` processes on 127.0.0.1, one API key for the run's users), each with a
:class:`memplug.client.Client`: the HTTP path against the library path, on one machine, in
one run. For every operation over HTTP the server reports the time it spent in memplug
(``Server-Timing``); what the client waited beyond that is the HTTP path's overhead. Writes
``load_http.json`` (and ``load_http.png``).
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
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
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
    """One load process on the library path: its own Memory and connection pool."""
    from ..memory import Memory
    from ..settings import Settings

    out: dict[str, Any] = {"process": n, "ops": [], "errors": []}
    try:
        mem = Memory(dsn, home=home, settings=Settings(plugins=plugins), options={"pool_size": 2})
    except Exception as e:  # noqa: BLE001 - reported, and the barrier is broken so the others stop too
        out["errors"].append(("setup", f"{type(e).__name__}: {e}"[:300]))
        barrier.abort()
        results.put(out)
        return
    try:
        _drive(mem, n, processes, run, seconds, seed, barrier, out, None)
    finally:
        results.put(out)
        mem.close()


def _http_worker(n: int, processes: int, run: str, url: str, key: str, seconds: float, seed: int,
                 barrier: Any, results: Any) -> None:
    """One load process on the HTTP path: a :class:`memplug.client.Client` of the run's server."""
    from ..client import Client

    out: dict[str, Any] = {"process": n, "ops": [], "errors": []}
    with Client(url, key, timeout=120) as mem:
        try:
            _drive(mem, n, processes, run, seconds, seed, barrier, out,
                   lambda: (mem.last_server_ms, mem.last_handler_ms))
        finally:
            results.put(out)


def _drive(mem: Any, n: int, processes: int, run: str, seconds: float, seed: int, barrier: Any,
           out: dict[str, Any], server_ms: Callable[[], tuple[float | None, float | None]] | None) -> None:
    """Seed this process's users, wait for the others, then run the mix until the clock runs out.

    Each operation is logged as ``(kind, start, seconds)``, and over HTTP with the seconds the
    server spent in memplug and in all (from the request's arrival to its response) as two more."""
    from .facts import haystack

    rng = random.Random(seed * 1000 + n)
    facts = haystack(100_000, seed=seed * 1000 + n)
    mine = user_ids(run, n)
    others = [u for p in range(processes) if p != n for u in user_ids(run, p)] or mine
    try:
        live: dict[str, list[int]] = {}
        questions: list[str] = []
        for user in mine:
            batch = [next(facts) for _ in range(SEED_FACTS)]
            live[user] = []
            # In writes of at most four texts, which the embedder runs in ONNX: no process (or server)
            # loads torch for a batch that is only the run's set-up.
            for start in range(0, SEED_FACTS, 4):
                live[user] += [it.id for it in mem.write(user, [f.statement for f in batch[start:start + 4]])]
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
            took = time.perf_counter() - t
            if server_ms is None:
                out["ops"].append((kind, round(now - start, 4), took))
            else:
                inside, handled = server_ms()
                out["ops"].append((kind, round(now - start, 4), took, None if inside is None else inside / 1000,
                                   None if handled is None else handled / 1000))
    except Exception as e:  # noqa: BLE001
        out["errors"].append(("setup", f"{type(e).__name__}: {e}"[:300]))
        barrier.abort()


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
    model, flags = None, set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            name, _, value = line.partition(":")
            if name.strip() == "model name" and model is None:
                model = value.strip()
            elif name.strip() == "flags" and not flags:
                flags = set(value.split())
    return {"cpu": platform.processor() or platform.machine(), "cpu_model": model,
            "avx512_bf16": "avx512_bf16" in flags, "cores": os.cpu_count(),
            "memory_gib": round(mem_gib, 1), "python": platform.python_version(), "postgres": pg,
            "pgvector": vec[0] if vec else None, "max_connections": max_conn, "gpu": None,
            "nice": os.nice(0), "load_average_at_start": [round(x, 2) for x in os.getloadavg()]}


def summarize(outs: Sequence[dict[str, Any]], seconds: float) -> dict[str, Any]:
    """Throughput and latency per kind of operation, from every process's log."""
    per_kind: dict[str, Any] = {}
    errors = Counter(kind for o in outs for kind, _ in o["errors"])
    total = 0
    for kind in KINDS:
        lat = [op[2] for o in outs for op in o["ops"] if op[0] == kind]
        total += len(lat)
        row: dict[str, Any] = {"ops": len(lat), "ops_per_s": round(len(lat) / seconds, 2), "errors": errors[kind]}
        if lat:
            row.update(_percentiles(lat))
            row["max_ms"] = round(max(lat) * 1000, 1)
        per_kind[kind] = row
    timeline = Counter(int(op[1]) for o in outs for op in o["ops"] if op[1] < seconds)
    return {"ops": total, "ops_per_s": round(total / seconds, 2), "per_kind": per_kind,
            "errors": sum(len(o["errors"]) for o in outs),
            "error_samples": [f"{k}: {m}" for o in outs for k, m in o["errors"]][:ERROR_SAMPLES],
            "ops_per_second_timeline": [timeline.get(s, 0) for s in range(int(seconds))]}


def _percentiles(seconds: Sequence[float], digits: int = 1) -> dict[str, float]:
    return {f"p{q}_ms": round(_pct(seconds, q / 100) * 1000, digits) for q in (50, 95, 99)}


def overhead(outs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per kind of HTTP operation: what the client waited beyond the server's time in memplug (``p*_ms``),
    split into the time in the server around memplug (``server_p*_ms``: parsing, the key check, threads)
    and the rest (``transit_p*_ms``: the client, the connection, and waiting for a core)."""
    rows: dict[str, Any] = {}
    groups = {kind: (kind,) for kind in KINDS} | {"all_reads": ("read", "read_shared")}
    for name, kinds in groups.items():
        ops = [op for o in outs for op in o["ops"] if op[0] in kinds and len(op) > 4 and None not in op[3:5]]
        if not ops:
            continue
        rows[name] = {"ops": len(ops), **_percentiles([op[2] - op[3] for op in ops], 2),
                      **{f"server_{k}": v for k, v in _percentiles([op[4] - op[3] for op in ops], 2).items()},
                      **{f"transit_{k}": v for k, v in _percentiles([op[2] - op[4] for op in ops], 2).items()},
                      "memplug_p50_ms": round(_pct([op[3] for op in ops], 0.5) * 1000, 1),
                      "memplug_p95_ms": round(_pct([op[3] for op in ops], 0.95) * 1000, 1)}
    return rows


def run(processes: int = 8, seconds: float = 60.0, out_dir: str | Path = "benchmarks/results", console: Any = None,
        dsn: str | None = None, seed: int = 0, plugins: str = "context,pgvector", name: str | None = None,
        http: bool = False, server_workers: int = 2, alone_reads: int = 200) -> dict[str, Any]:
    from ..errors import InvalidInput
    from ..settings import Settings

    if processes < 1 or seconds <= 0 or server_workers < 1:
        raise InvalidInput(f"the load benchmark needs processes >= 1, seconds > 0 and server_workers >= 1, got "
                           f"{processes}, {seconds} and {server_workers}")
    name = name or ("load_http" if http else "load")
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
    run_ids = [uuid.uuid4().hex[:8]]
    ctx = multiprocessing.get_context("spawn")  # torch and connection pools do not survive a fork
    log(f"load: {processes} processes x {seconds:g} s against {_safe(dsn)} (tiers {plugins})")
    server = None
    try:
        load_at_start = [round(x, 2) for x in os.getloadavg()]
        before = _deadlocks(dsn)
        started = time.time()
        library = _phase(ctx, processes, seconds, _worker,
                         lambda n: (n, processes, run_ids[0], dsn, str(home), plugins, seconds, seed))
        # Once the processes have set the database up (the vector extension is made on first use).
        machine = _machine(dsn) | {"load_average_at_start": load_at_start}
        if http:
            run_ids.append(uuid.uuid4().hex[:8])
            log(f"load: the same over HTTP, {server_workers} server process(es)")
            server, url, key = _start_server(dsn, home, plugins, server_workers, f"load-{run_ids[1]}-")
            web = _phase(ctx, processes, seconds, _http_worker,
                         lambda n: (n, processes, run_ids[1], url, key, seconds, seed))
            log("load: one client alone, library and HTTP reads in turn")
            alone = _alone(dsn, str(home), plugins, url, key, f"load-{run_ids[1]}-alone", seed, alone_reads)
        time.sleep(1.0)  # backends report their statistics as they exit
        after = _deadlocks(dsn)
        settings = {"processes": processes, "seconds": seconds, "mix": MIX, "users_per_process": USERS_PER_PROCESS,
                    "seed_facts_per_user": SEED_FACTS, "tiers": plugins, "embedder": "all-MiniLM-L6-v2",
                    "pool_size_per_process": 2, "seed": seed,
                    "store": "fresh embedded Postgres" if embedded else "given DSN"}
        if not http:
            result: dict[str, Any] = {"benchmark": "load", "machine": machine, "settings": settings,
                                      **library, "deadlocks": after - before,
                                      "wall_seconds": round(time.time() - started, 1)}
        else:
            settings |= {"server_workers": server_workers, "server": "memplug serve on 127.0.0.1, one API key "
                         "for the run's users, no rate limit", "order": "library path first, then HTTP",
                         "one_client_reads": alone_reads}
            result = {"benchmark": "load_http", "machine": machine, "settings": settings, "library": library,
                      "http": web, "http_overhead": overhead(web["outs"]), "one_client": alone,
                      "errors": library["errors"] + web["errors"], "deadlocks": after - before,
                      "wall_seconds": round(time.time() - started, 1)}
        if not embedded:
            for run_id in run_ids:
                _forget_run(dsn, str(home), plugins, run_id, processes)
    finally:
        if server is not None:
            _stop_server(server)
            _revoke(dsn, key)  # the run's key outlives it in nothing but the list of revoked keys
        if not embedded:
            shutil.rmtree(home, ignore_errors=True)
    for part in (result, result.get("library", {}), result.get("http", {})):
        part.pop("outs", None)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result, indent=2))
    if http:
        _plot_http(result, out / f"{name}.png")
        for path in ("library", "http"):
            r = result[path]
            log(f"load {path}: {r['ops_per_s']} ops/s, {r['errors']} errors; " + ", ".join(
                f"{k} {v['ops_per_s']}/s p50 {v.get('p50_ms', '-')} p95 {v.get('p95_ms', '-')} ms"
                for k, v in r["per_kind"].items()))
        reads = result["http_overhead"].get("all_reads", {})
        log(f"load: HTTP overhead per read p50 {reads.get('p50_ms', '-')} ms, p95 {reads.get('p95_ms', '-')} ms; "
            f"one client alone: p50 {alone['overhead']['p50_ms']} ms, p95 {alone['overhead']['p95_ms']} ms")
    else:
        _plot(result, out / f"{name}.png")
        log(f"load: {result['ops_per_s']} ops/s, {result['errors']} errors, {result['deadlocks']} deadlocks; "
            + ", ".join(f"{k} {v['ops_per_s']}/s p95 {v.get('p95_ms', '-')} ms"
                        for k, v in result["per_kind"].items()))
    log(f"wrote {out / f'{name}.json'}")
    return result


def _phase(ctx: Any, processes: int, seconds: float, target: Callable[..., None],
           args: Callable[[int], tuple]) -> dict[str, Any]:
    """Start ``processes`` of ``target``, release them together once each is seeded, and summarize
    their logs (the raw logs under ``outs``)."""
    barrier = ctx.Barrier(processes + 1)
    results = ctx.Queue()
    procs = [ctx.Process(target=target, args=(*args(n), barrier, results), daemon=True) for n in range(processes)]
    try:
        for p in procs:
            p.start()
        with contextlib.suppress(threading.BrokenBarrierError):  # a process failed: its error is in its log
            barrier.wait(timeout=600)  # every process has loaded the embedder and seeded its users
        outs = _collect(procs, results, seconds + 600)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
    return {**summarize(outs, seconds), "outs": outs}


def _alone(dsn: str, home: str, plugins: str, url: str, key: str, user: str, seed: int,
           reads: int) -> dict[str, Any]:
    """One client with the machine to itself (the load processes are done): the same reads through the
    library and over HTTP, in turn, and the HTTP path's overhead on each."""
    from ..client import Client
    from ..memory import Memory
    from ..settings import Settings
    from .facts import haystack

    rng = random.Random(seed)
    source = haystack(100_000, seed=seed + 7)
    facts = [next(source) for _ in range(20)]
    library, web, extra = [], [], []
    with Memory(dsn, home=home, settings=Settings(plugins=plugins), options={"pool_size": 2}) as mem, \
            Client(url, key) as client:
        for start in range(0, len(facts), 4):
            mem.write(user, [f.statement for f in facts[start:start + 4]])
        for n in range(reads + 10):
            query = rng.choice(facts).paraphrase
            t = time.perf_counter()
            mem.read(user, query)
            lib = time.perf_counter() - t
            t = time.perf_counter()
            client.read(user, query)
            took = time.perf_counter() - t
            if n >= 10 and client.last_server_ms is not None:  # the first few warm both paths up
                library.append(lib)
                web.append(took)
                extra.append(took - client.last_server_ms / 1000)
        mem.forget(user)
    return {"reads": len(web), "library": _percentiles(library, 2), "http": _percentiles(web, 2),
            "overhead": _percentiles(extra, 2)}


def _start_server(dsn: str, home: Path, plugins: str, workers: int, prefix: str) -> tuple[Any, str, str]:
    """``memplug serve`` on a free port of 127.0.0.1 and a key for the users under ``prefix``."""
    import socket

    import httpx

    from ..server.keys import create_key
    from ..store import Store

    store = Store(dsn, pool_size=1)
    try:
        _, key = create_key(store, prefix=prefix, name="memplug bench load --http")
    finally:
        store.close()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "MEMPLUG_DSN": dsn, "MEMPLUG_HOME": str(home), "MEMPLUG_PLUGINS": plugins}
    with (home / "server.log").open("ab") as err:
        proc = subprocess.Popen([sys.executable, "-m", "memplug.cli", "serve", "--port", str(port), "--workers",
                                 str(workers), "--rate-limit", "0"], env=env, stdout=err, stderr=err)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while proc.poll() is None and time.monotonic() < deadline:
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return proc, url, key
        time.sleep(0.2)
    _stop_server(proc)
    from ..errors import StoreUnavailable

    raise StoreUnavailable(f"memplug serve did not start; see {home / 'server.log'}")


def _revoke(dsn: str, key: str) -> None:
    from ..server.keys import key_id_of, revoke_key
    from ..store import Store

    store = Store(dsn, pool_size=1)
    try:
        revoke_key(store, key_id_of(key))
    finally:
        store.close()


def _stop_server(proc: Any) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


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


def _plot_http(r: dict[str, Any], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import numpy as np
    except ImportError:
        return
    kinds = [k for k in KINDS if r["library"]["per_kind"][k]["ops"] and r["http"]["per_kind"][k]["ops"]]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4))
    xs = np.arange(len(kinds))
    bars = ((-0.3, "library", "p50"), (-0.1, "library", "p95"), (0.1, "http", "p50"), (0.3, "http", "p95"))
    for off, where, q in bars:
        ax1.bar(xs + off, [r[where]["per_kind"][k][f"{q}_ms"] for k in kinds], 0.19, label=f"{where} {q}")
    ax1.set_xticks(xs, [f"{k}\n{r['library']['per_kind'][k]['ops_per_s']} vs {r['http']['per_kind'][k]['ops_per_s']}/s"
                        for k in kinds])
    ax1.set_ylabel("latency, ms")
    ax1.legend(fontsize=8)
    extra = r["http_overhead"]
    shown = [k for k in kinds if k in extra]
    for off, q in ((-0.2, "p50"), (0.2, "p95")):
        ax2.bar(np.arange(len(shown)) + off, [extra[k][f"{q}_ms"] for k in shown], 0.38, label=q)
    ax2.set_xticks(np.arange(len(shown)), shown)
    ax2.set_ylabel("HTTP overhead, ms")
    ax2.set_title("client's time less the server's time in memplug", fontsize=9)
    ax2.legend(fontsize=8)
    m = r["machine"]
    fig.suptitle(f"memplug load, library vs HTTP — {r['settings']['processes']} processes each, "
                 f"{r['settings']['server_workers']} server process(es), {r['errors']} errors — {m['cores']} cores "
                 f"({m.get('cpu_model') or m['cpu']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
