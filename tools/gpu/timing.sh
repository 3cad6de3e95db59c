#!/usr/bin/env bash
# Timing runs (alone on the GPU): issue 12's bench hf, then issue 11's A1 rerun (resumable: run again to finish).
# Expects tools/gpu_prepare.sh to have prepared both models (and printed the provenance), PYTHONPATH set.
set -uo pipefail
what=${1:-all}
if [[ $what == all || $what == hf ]]; then
  [[ -f /root/hf/hf.json ]] || python -m mspeckv bench hf --model qwen2.5-coder-1.5b --device cuda --out-dir /root/hf
fi
if [[ $what == all || $what == a1 ]]; then
  timeout "${A1_TIMEOUT:-480}" python -m mspeckv sweep context --prefill-lengths 8192,16384,24576,32512 --gen-len 256 \
    --budget 4096 --on-chip 16 --resident-layers 12 --gamma 8 --seeds 1,2,3 \
    --methods baseline,vanilla_specdec,mspeckv,mspeckv_kv_quant,ar_gpu,hf_ar --device cuda --no-progress \
    --output-dir /root/A1h
fi
