"""Load benchmark (same as `memplug bench load`): see memplug/bench/load.py.

    python benchmarks/bench_load.py --processes 8 --seconds 60
"""

from memplug.cli import bench_load

if __name__ == "__main__":
    bench_load()
