#!/usr/bin/env bash
# Issue 11 item 2 on the GPU (random weights: nothing to carry): the graphed offloaded layout's GPU tests, then
# bench placement (eager and graphed per cell) at 32K for the 1.5B and 7B shapes. Results under /root/pl15, /root/pl7.
# Expects PYTHONPATH set (provenance: see tools/gpu_prepare.sh); run alone on the GPU (timed).
set -uo pipefail
python -m pytest -m gpu tests/test_gpu.py -k "graphed_offloaded" -p no:cacheprovider 2>&1 | tail -n 15
python -m mspeckv bench placement --shape qwen2.5-1.5b --contexts 32768 --on-chip 16 --formats none,int8,int4 \
  --residents 0,12 --no-hf --out-dir /root/pl15 > /root/pl15.log 2>&1; tail -n 30 /root/pl15.log
python -m mspeckv bench placement --shape llama-2-7b-128k --contexts 32768 --on-chip 16 --formats none,int8,int4 \
  --residents 0,16 --no-hf --out-dir /root/pl7 > /root/pl7.log 2>&1; tail -n 30 /root/pl7.log
