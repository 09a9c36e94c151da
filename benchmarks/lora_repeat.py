"""Repeated trainings in one process: in the process itself, and each in a child process.

Trains the same adapter ``--times`` times one after another (the lora benchmark's facts,
seed 7, default recipe), first in this process and then each in a child process
(:func:`memplug.runtime.run_in_child`, as the lora tier does by default), and writes the
times to ``benchmarks/results/lora_repeat.json``. A serving model is loaded in this process
first, as a memory that reads and trains has one.

    python -m benchmarks.lora_repeat --facts 20 --times 3
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import time
from pathlib import Path

from memplug.checks.facts import generate
from memplug.plugin import write_atomic
from memplug.runtime import load_model, run_in_child
from memplug.settings import Settings
from memplug_lora import train as lora

from .kv import _machine

ROOT = Path(__file__).resolve().parents[1]


def _rss_gb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--facts", type=int, default=20)
    parser.add_argument("--times", type=int, default=3)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "lora_repeat.json"))
    args = parser.parse_args()
    if args.facts < 1 or args.times < 1:
        parser.error("--facts and --times must be at least 1")
    settings = Settings()
    serving = load_model(settings.home, settings.model)
    facts = generate(args.facts, 7)
    job = {"home": str(settings.home), "model": settings.model, "statements": [f.statement for f in facts],
           "item_ids": list(range(args.facts)), "cfg": lora.TrainConfig(seed=7)}
    runs: dict[str, list[dict[str, float]]] = {"in_process": [], "child": []}
    for mode in runs:
        for k in range(args.times):
            t0 = time.perf_counter()
            if mode == "child":
                result, _ = run_in_child("memplug_lora.train:train_items", job)
            else:
                result, _ = lora.train_items(**job)
            total = time.perf_counter() - t0
            del result
            gc.collect()
            runs[mode].append({"seconds": total, "rss_gb_after": _rss_gb()})
            print(f"{mode} {k + 1}: {total:.1f} s, this process holds {_rss_gb():.2f} GB", flush=True)
    out = {"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"), "machine": _machine(),
           "model": serving.name, "facts": args.facts, "seed": 7, "runs": runs}
    write_atomic(Path(args.out), json.dumps(out, indent=2).encode())
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
