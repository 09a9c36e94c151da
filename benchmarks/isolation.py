"""Isolation benchmark: random interleaved operations of 3 users across every tier, checked for leaks.

Runs the hypothesis state machine of ``tests/test_isolation.py`` (against a fresh
embedded Postgres, as the tests do) for ``--ops`` operations and writes what was
tried and what leaked to ``benchmarks/results/isolation.json``.

    python -m benchmarks.isolation --ops 10000
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ops", type=int, default=10_000, help="operations to run (at least)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "isolation.json"))
    args = parser.parse_args()
    if args.ops < 1:
        parser.error(f"--ops must be at least 1, got {args.ops}")
    os.environ["MEMPLUG_TEST_ISOLATION_OPS"] = str(args.ops)
    os.environ["MEMPLUG_TEST_ISOLATION_OUT"] = str(Path(args.out).resolve())
    os.chdir(ROOT)
    return pytest.main(["-q", "-p", "no:cacheprovider", "--timeout=0", "tests/test_isolation.py"])


if __name__ == "__main__":
    sys.exit(main())
