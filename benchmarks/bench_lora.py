"""Weights-tier benchmark (same as `memplug bench lora`): see memplug/bench/lora.py.

    python benchmarks/bench_lora.py --facts 20,50,100
"""

from memplug.cli import bench_lora

if __name__ == "__main__":
    bench_lora()
