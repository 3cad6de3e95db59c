#!/usr/bin/env bash
# Issue 29.1: re-measure the placement quality cells after the chunked-prefill fix (2ae123f), with the same command
# as quality.sh's job l_a (ppl/kl/ece/attention/recon at 2K/8K/32K, two windows, the full cache in the same run),
# into a new folder; then the GPU tests in the foreground. Run after tools/gpu_prepare.sh (the 1.5B), with
# PYTHONPATH and MSPECKV_GIT_COMMIT set. Writes $OUT/q_lm_fix.tgz and $OUT/gputests.log.
set -uo pipefail
M=qwen2.5-coder-1.5b
python -m mspeckv eval ppl,kl,ece,attention,recon --model $M --device cuda --no-plots \
  --context 2048,8192,32768 --windows 2 --kv-quant none,int8,int4,int2 --output-dir /root/q_lm_fix \
  > /root/q_lm_fix.log 2>&1
status=$?
tail -n 25 /root/q_lm_fix.log
tar czf "$OUT/q_lm_fix.tgz" -C /root q_lm_fix q_lm_fix.log
exit $status
