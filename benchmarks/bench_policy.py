"""Policy benchmark (same as `memplug bench policy`): see memplug/bench/policy.py.

    python benchmarks/bench_policy.py --facts 200 --answers 150
"""

from memplug.cli import bench_policy

if __name__ == "__main__":
    bench_policy()
