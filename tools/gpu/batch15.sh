#!/usr/bin/env bash
# Issues 25-27 with the real qwen2.5-coder-1.5b (and the 0.5B draft) at batch, on one GPU: speculation against graphed
# batched AR at 32K x 32 (the goal), batch 1, 16K x 64, 8K x 128, the hierarchy with the draft, the server under load,
# transformers' generate. Every bench folder is resumable per run: run a stage again to finish it.
#
# On the device the source is a `git archive` of the commit (mspeckv/COMMIT stamped by git), unpacked in /root/repo,
# so the records say which commit ran (commit_source "stamp") and a later call's copy of the working tree cannot
# change the code under a running job. From there:
#   bash tools/gpu/batch15.sh STAGE...       (stages below, in the order given; each logs to $RES/logs/STAGE.log)
# Dry run on the CPU (tiny random models, tiny cells): DRY=1 RES=/tmp/dry bash tools/gpu/batch15.sh goal b1 hier ...
set -uo pipefail
RES=${RES:-/root/res}
mkdir -p "$RES/logs"
export PYTHONPATH=/tmp/site:$PWD
if [[ ${DRY:-0} == 1 ]]; then  # the same commands at toy sizes
  M=random:tiny D=random:tiny C32=40 C16=24 C8=16 B32=2 B64=3 B128=4 G=8 W=8 DEV="--device cpu" S3=2 N=6 SC=32
else
  M=qwen2.5-coder-1.5b D=qwen2.5-coder-0.5b C32=32256 C16=16384 C8=8192 B32=32 B64=64 B128=128 G=512 W=2048 DEV=""
  S3=3 N=32 SC=8192
fi
if [[ ${SM:-0} == 1 ]]; then  # the server with SmolLM2-135M (3 transfer calls instead of 20): context <= 8192
  M=smollm2-135m B32=32 W=1024 N=32 SC=7000 RATES=4,0
fi
DS="--dataset pycode"
[[ $M == random:* ]] && DS=""
bench() { python -m mspeckv bench batch --model "$M" $DS --ragged '' $DEV "$@"; }

stage() {
  case $1 in
    prep15) cat ~/m/q15.[0-9][0-9] > ~/m/q15.gguf && python -m mspeckv models prepare qwen2.5-coder-1.5b --gguf ~/m/q15.gguf \
              && rm ~/m/q15.gguf && touch ~/m/prep15.ok ;;
    prep05) cat ~/m/q05.[0-9][0-9] > ~/m/q05.gguf && python -m mspeckv models prepare qwen2.5-coder-0.5b --gguf ~/m/q05.gguf \
              && rm ~/m/q05.gguf && touch ~/m/prep05.ok ;;
    prepsm) cat ~/m/sm.[0-9][0-9] > ~/m/sm.gguf && python -m mspeckv models prepare smollm2-135m --gguf ~/m/sm.gguf ;;
    # AR at the server's cell, on the same card: what the saturated server is compared with
    arserve) bench --contexts $SC --batches $B32 --gen-len 256 --seeds 2 --out "$RES/ar-serve-cell" ;;
    wait15|wait05) for _ in $(seq 600); do [[ -f ~/m/prep${1#wait}.ok ]] && return 0; sleep 1; done; return 1 ;;
    tests) python -m pytest -q -p no:cacheprovider tests/test_decode_attention.py tests/test_gpu.py \
             -k "window or per_sequence or batch" ;;
    # the goal cell: graphed batched AR against self-speculation (fixed γ and the cost model's choice), 3 seeds
    goal) bench --contexts $C32 --batches $B32 --gen-len $G --seeds $S3 \
            --spec self:4:w$W@${C32}x$B32,self:auto8:w$W@${C32}x$B32 --out "$RES/goal" ;;
    # batch 1: the cost model must not lose to AR (it may pick AR)
    b1) bench --contexts $C32 --batches 1 --gen-len $G --seeds 2 \
          --spec self:auto8:w$W@${C32}x1,self:4:w$W@${C32}x1 --out "$RES/b1" ;;
    # the draft model: vanilla, and the hierarchy draft -> target over its window -> target over its full KV; AR's
    # runs at this cell are the goal folder's (same prompts per seed): the folders are summarized together
    hier) bench --contexts $C32 --batches $B32 --gen-len $G --seeds 2 --draft "$D" --draft-gamma 4 \
            --spec vanilla:4@${C32}x$B32,mspeckv:4:w$W@${C32}x$B32 --out "$RES/goal" ;;
    # next: the batch kept full (continuous batching: 4 prompts per slot), and the draft model over its own window
    goalw) bench --contexts $C32 --batches $B32 --gen-len $G --seeds 2 --waves 4 \
             --spec self:4:w$W@${C32}x$B32,self:auto8:w$W@${C32}x$B32 --out "$RES/goalw" ;;
    hierdw) bench --contexts $C32 --batches $B32 --gen-len $G --seeds 2 --draft "$D" --draft-gamma 4 --draft-window 256 \
              --spec vanilla:4@${C32}x$B32,vanilla:auto8@${C32}x$B32,mspeckv:4:w$W@${C32}x$B32 --out "$RES/hierdw" ;;
    mid16) bench --contexts $C16 --batches $B64 --gen-len $G --seeds 2 --spec self:4:w$W@${C16}x$B64 --out "$RES/mid16" ;;
    mid8) bench --contexts $C8 --batches $B128 --gen-len $G --seeds 2 --spec self:4:w$W@${C8}x$B128 --out "$RES/mid8" ;;
    # the server under load (needs the serve wheels on the device: fastapi, starlette, uvicorn, pydantic(-core),
    # openai, httpx2, httpcore2, truststore, jiter, opentelemetry-api, ...): light to saturating rates, with and
    # without the prefill interleaved
    serve) for mode in ar self; do
             python -m mspeckv bench serve --model "$M" --mode $mode --gamma 4 --self-window $W --max-batch $B32 \
               --context $SC --gen-len 256 --rates ${RATES:-2,8,0} --requests $N --no-interleave-too $DS $DEV \
               --out "$RES/serve-$mode" || return 1
           done ;;
    # where each level's time goes (CUDA events per forward against the decode's wall time), one cell per mode
    profile) mkdir -p "$RES/profile" && for mode in ar self vanilla mspeckv; do
               python tools/profile_batch_spec.py --model "$M" $DS --context $C32 --batch $B32 --mode $mode --gamma 4 \
                 --window $W --gen-len 128 $([[ $mode == vanilla || $mode == mspeckv ]] && echo --draft "$D") $DEV \
                 --out "$RES/profile/$mode.json" || return 1
             done ;;
    hf) bench --contexts $C8 --batches $B32 --gen-len 128 --seeds 2 --hf ${C8}x$B32,${C32}x$B32 --out "$RES/hf" ;;
    *) echo "unknown stage $1"; return 2 ;;
  esac
}

for s in "$@"; do
  echo "$(date -u +%T) start $s" >> "$RES/logs/stages.txt"
  stage "$s" > "$RES/logs/$s.log" 2>&1
  rc=$?  # before anything else resets it
  echo "$(date -u +%T) end $s rc=$rc" >> "$RES/logs/stages.txt"
done
