"""Fuzz the public API (same as `memplug fuzz`): see memplug/testing/fuzz.py.

    python benchmarks/fuzz_api.py --seconds 180 --out benchmarks/results/fuzz.json
"""

from memplug.cli import fuzz

if __name__ == "__main__":
    fuzz()
