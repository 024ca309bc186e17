#!/usr/bin/env bash
# The served study of the README's "Serving with llama.cpp / ollama" table: GPTQ + CLoQ on llama.cpp's
# q2_k / q3_k / q4_k grids, fine-tuned (32 steps of 4 x 128 tokens, lr 3e-3), exported to GGUF with the adapter,
# served by llama.cpp beside llama-quantize's own types; then our own grids at the nearest bits at init.
# Needs `bash benchmarks/build_llamacpp.sh` first. About 75 min on the 2-core machine; rerun resumes.
# The merged-to-16-bits rows: cloq bench gguf --no-fp --merge q2_k-ft=results/serve/q2_k-ft --merge-peer Q2_K (and q3_k).
set -uo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 PYTHONPATH=$PWD
C=.venv/bin/cloq
R=results/serve
mkdir -p $R
log() { echo "[$(date +%H:%M:%S)] $*"; }
for g in q2_k q3_k q4_k; do
  if [ ! -f $R/$g/config.json ]; then
    log "prepare $g"; /usr/bin/time -v $C prepare --model smollm2 --grid $g --no-progress --json --out $R/$g > $R/$g.prepare.json 2> $R/$g.prepare.err || log "FAILED prepare $g"
  fi
  if [ ! -f $R/$g-ft/config.json ]; then
    log "finetune $g"; $C finetune $R/$g --steps 32 --lr 3e-3 --batch-size 4 --seq-len 128 --eval-samples 8 --json --out $R/$g-ft > $R/$g.ft.json 2> $R/$g.ft.err || log "FAILED ft $g"
  fi
done
log "bench gguf"
$C bench gguf --model smollm2 --chunks 16 --ours q2_k-init=$R/q2_k q2_k-ft=$R/q2_k-ft q3_k-init=$R/q3_k q3_k-ft=$R/q3_k-ft q4_k-init=$R/q4_k q4_k-ft=$R/q4_k-ft \
   --merge q2_k-ft=$R/q2_k-ft q2_k-ft-rtn=$R/q2_k-ft:rtn q3_k-ft=$R/q3_k-ft \
   --work results/gguf-bench --out $R/gguf-served.json > $R/bench.log 2>&1 || log "FAILED bench"
log "own-grid at-init comparison"
for spec in "b2g64:--bits 2 --group-size 64" "b3g64:--bits 3 --group-size 64" "b4g32:--bits 4 --group-size 32"; do
  n=${spec%%:*}; a=${spec#*:}
  [ -f $R/$n/config.json ] || { log "prepare $n"; $C prepare --model smollm2 $a --no-progress --json --out $R/$n > $R/$n.prepare.json 2> $R/$n.prepare.err || log "FAILED $n"; }
done
log "eval"
$C eval $R/q2_k $R/b2g64 $R/q3_k $R/b3g64 $R/q4_k $R/b4g32 --samples 32 --json > $R/eval-init.json 2> $R/eval-init.err || log "FAILED eval"
log done
