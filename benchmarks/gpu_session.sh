#!/usr/bin/env bash
# Everything issue 9 asks a GPU session to run, in order, results under ${OUT:-out/gpu}.
# Each step fits a 10-minute call on an H100; run them as separate calls if the lease is per call:
#   bash benchmarks/gpu_session.sh tests | check | kernels | train | tune | all
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/gpu}
PY=${PY:-python}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv > "$OUT/gpu.csv" 2>/dev/null || true
step=${1:-all}
if [[ $step == tests || $step == all ]]; then
  $PY -m pytest -m gpu -q -x tests 2>&1 | tee "$OUT/pytest_gpu.txt"
fi
if [[ $step == check || $step == all ]]; then
  $PY -m cloq_engine.kernels.check --dtype bf16 --json > "$OUT/check.json"
fi
if [[ $step == kernels || $step == all ]]; then
  $PY benchmarks/kernels.py --json "$OUT/kernels.json" 2>&1 | tee "$OUT/kernels.txt"
fi
if [[ $step == train || $step == all ]]; then
  $PY benchmarks/train.py --json "$OUT/train.json" 2>&1 | tee "$OUT/train.txt"
fi
if [[ $step == tune ]]; then
  $PY benchmarks/kernels.py --tune "$OUT/configs_tuned.json" 2>&1 | tee "$OUT/tune.txt"
fi
