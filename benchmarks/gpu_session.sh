#!/usr/bin/env bash
# What a lent GPU runs, one call at a time; results under ${OUT:-out/gpu}, a table printed last.
#
#   bash benchmarks/gpu_session.sh quick [--dry-run]   # <= 6 min on an H100/H200, JIT included: run first
#   bash benchmarks/gpu_session.sh full N [--dry-run]  # N = 1..6, each a separate call of < 8 min
#   bash benchmarks/gpu_session.sh full                # lists the full calls
#
# Every step runs in its own process under a time budget (no step starts past it, a hung one is
# killed), a failure is recorded and the next step still runs, and every result is appended to
# $OUT/<group>.jsonl as soon as it exists. No `set -e`: a failing command must not end the session.
# The ahead-of-time compile check needs no GPU and runs in CI: python -m cloq_engine.kernels.check
cd "$(dirname "$0")/.." || exit 1
OUT=${OUT:-out/gpu}
PY=${PY:-python}
group=${1:-quick}
shift || true
if [[ $group == full ]]; then
  if [[ $1 =~ ^[0-9]+$ ]]; then
    group="full-$1"
    shift
  else
    $PY -m benchmarks.session list
    echo "run one full group per call: bash benchmarks/gpu_session.sh full N"
    exit 0
  fi
fi
mkdir -p "$OUT"
if [[ " $* " != *" --dry-run "* ]]; then
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.sm --format=csv > "$OUT/gpu.csv" 2>&1
fi
$PY -m benchmarks.session "$group" --out "$OUT" "$@"
