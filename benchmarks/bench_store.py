"""Store benchmark (same as `memplug bench store`): see memplug/bench/store.py.

    python benchmarks/bench_store.py --sizes 10000,100000 --scopes-total 1000000 --scopes 1000 --minutes 15
"""

from memplug.cli import bench_store

if __name__ == "__main__":
    bench_store()
