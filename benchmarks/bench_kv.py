"""Explicit-memory benchmark (same as `memplug bench kv`): see memplug/bench/kv.py.

    python benchmarks/bench_kv.py --facts 200 --compose 1,8,32 --ttft 256,1024,4096
"""

from memplug.cli import bench_kv

if __name__ == "__main__":
    bench_kv()
