"""Per-forward CPU cost of one model in fp32 against bf16 weights (results/demo/memory.md).

    python tools/cpu_dtype_bench.py MODEL DTYPE [PROMPT_TOKENS]

Loads MODEL (an embedded name or a directory) with DTYPE weights, prefills PROMPT_TOKENS (default 634, the demo's
prompt) token ids, then times 8 one-token decode steps and 4 seven-token forwards (a verification of gamma 6);
prints one JSON line with the medians and the process's peak RSS (VmHWM).
"""

import json
import statistics
import sys
import time

import torch

from mspeckv.cache import make_cache
from mspeckv.model.api import load_model, parse_dtype

ref, dtype = sys.argv[1], parse_dtype(sys.argv[2])
n = int(sys.argv[3]) if len(sys.argv) > 3 else 634
t0 = time.perf_counter()
model, _ = load_model(ref, "cpu", dtype, progress=False)
load_s = time.perf_counter() - t0
ids = torch.randint(100, 20000, (1, n), generator=torch.Generator().manual_seed(0))
cache = make_cache(model, None, 1, n + 64)
with torch.inference_mode():
    t = time.perf_counter()
    model.prefill(ids, cache, chunk=512)
    prefill_s = time.perf_counter() - t
    step, verify = [], []
    for i in range(8):
        t = time.perf_counter()
        model(ids[:, i:i + 1], cache)
        step.append(time.perf_counter() - t)
    for i in range(4):
        t = time.perf_counter()
        model(ids[:, i:i + 7], cache, num_logits=7)
        verify.append(time.perf_counter() - t)
        cache.rollback(7)
hwm = next(int(x.split()[1]) for x in open("/proc/self/status") if x.startswith("VmHWM"))
print(json.dumps({"model": ref, "dtype": str(dtype), "prompt": n, "load_s": round(load_s, 2),
                  "prefill_s": round(prefill_s, 2), "step_ms": round(1e3 * statistics.median(step), 1),
                  "verify7_ms": round(1e3 * statistics.median(verify), 1), "peak_rss_gb": round(hwm / 2**20, 2)}))
