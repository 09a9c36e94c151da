"""Research benchmarks of memplug's tiers and policies. Not part of the installed package.

Run each from the repository root as a module; results go to ``benchmarks/results/``::

    python -m benchmarks.kv           # explicit (KV) memory against text: accuracy, bytes, time to first token
    python -m benchmarks.lora         # per-user LoRA adapters: closed-book recall, forgetting, cost
    python -m benchmarks.lora_repeat  # repeated trainings in one process and in child processes
    python -m benchmarks.speed        # kv and lora speed on any device, with random weights
    python -m benchmarks.policy       # RAG against the promotion policies
    python -m benchmarks.isolation    # three users' interleaved operations, checked for leaks
    python -m benchmarks.conversations  # retrieval on real conversations against BM25, MiniLM and mem0
    python -m benchmarks.serve        # per-user adapters served by the hf loop and by vLLM, in one run

Checks a user runs on a deployment stay in the command line: ``memplug bench store``,
``memplug bench load`` and ``memplug fuzz``. ``docs/benchmarks.md`` has the latest figures.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console

console = Console(markup=False)


def fail_cleanly(fn: Callable[..., Any]) -> Callable[..., Any]:
    """A benchmark's command: a memplug error ends it with its message, not a traceback."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from memplug import MemplugError

        try:
            return fn(*args, **kwargs)
        except MemplugError as e:
            print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
            sys.exit(2)
    return wrapper


def setting(spec: str) -> tuple[str, dict[str, Any]]:
    """A named setting from ``name:key=value,key=value`` (a value that parses as JSON is JSON;
    ``targets`` takes names joined by ``+``)."""
    from memplug.cli import key_values

    name, _, rest = spec.partition(":")
    values = key_values([p for p in rest.split(",") if p], "setting")
    if "targets" in values:
        values["targets"] = tuple(str(values["targets"]).split("+"))
    return name or "custom", values


def machine(memory: Any = None) -> dict[str, Any]:
    """The machine a run measured: CPU model and the flags that change timings, cores, memory,
    and (given a Memory) the Postgres and pgvector versions."""
    import os
    import platform

    cpu, flags = platform.processor() or platform.machine(), set()
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        info = ""
    for line in info.splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
        elif line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    out: dict[str, Any] = {
        "cpu": cpu, "cpu_flags": sorted(flags & {"avx2", "avx512f", "avx512_bf16", "amx_bf16"}),
        "cores": os.cpu_count(), "python": platform.python_version(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)}
    if memory is not None:
        with memory.store.transaction() as db:
            out["postgres"] = db.execute("SHOW server_version").fetchone()[0]
            out["pgvector"] = db.execute("SELECT extversion FROM pg_extension WHERE extname = 'vector'").fetchone()[0]
    return out
