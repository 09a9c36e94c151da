"""Speed of the kv and lora tiers on any device, random weights (same as `memplug bench speed`):
see memplug/bench/speed.py.

    python benchmarks/bench_speed.py --prepare /tmp/speed-input     # where the model is
    python benchmarks/bench_speed.py --input /tmp/speed-input       # on the machine to time
"""

from memplug.cli import bench_speed

if __name__ == "__main__":
    bench_speed()
