"""Where does a pressed cache's graphed decode step go? Random weights at a named shape (timing only: a press's row
choice differs from the real model's, but its static buffer, and so every kernel's shape, does not). Usage (GPU):
    python tools/profile_pressed.py qwen2.5-1.5b 2048,8192,32768 out.json snapkv:budget=0.25 adakv:budget=0.25

For each press and context: ``evals.generation.greedy`` (the path ``eval speed --speed-graphs`` times) under
torch.profiler, once with 1 new token and once with 1 + N. Each kernel's device time in the second minus the first,
over N, is its cost per decode step; the table lists the busiest kernels per step and their sum. ``PROFILE_NEW=N``
(default 32) sets N; the cache's tail holds N + 2 rows, so N also sets the attention's key length (fixed rows + tail),
as ``--speed-gen`` does in ``eval speed`` (tail 65 at its default 64).
"""

import json
import os
import sys
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from mspeckv.evals.generation import greedy
from mspeckv.evals.variants import Variant
from mspeckv.model.api import random_model
from mspeckv.runs.store import run_metadata

N = int(os.environ.get("PROFILE_NEW", 32))  # decode steps profiled; the tail (N + 2 rows) sets the buffer length
shape, contexts, out = sys.argv[1], [int(c) for c in sys.argv[2].split(",")], sys.argv[3]
presses = sys.argv[4:]
m = random_model(shape, "cuda", torch.bfloat16)
g = torch.Generator().manual_seed(0)


def kernels(v: Variant, ids: list[int], new: int) -> tuple[dict[str, float], float]:
    """Device microseconds per kernel name for one greedy generation, and its decode wall time (s)."""
    with profile(activities=[ProfilerActivity.CUDA]) as p:
        r = greedy(m, v, ids, new, eos=False, graphs=True)
        torch.cuda.synchronize()
    k = defaultdict(float)
    for e in p.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            k[e.name[:80]] += e.device_time_total
    return k, r.decode_s


rows = []
for ctx in contexts:
    ids = torch.randint(0, m.cfg.vocab_size, (ctx - N - 1,), generator=g).tolist()
    for spec in [None, *presses]:
        v = Variant(press=spec)
        greedy(m, v, ids, N + 1, eos=False, graphs=True)  # warm-up at the exact shape
        k1, _ = kernels(v, ids, 1)
        kn, dec = kernels(v, ids, N + 1)
        per = {name: (kn[name] - k1.get(name, 0.0)) / N / 1e3 for name in kn}  # ms per decode step
        per = {name: ms for name, ms in per.items() if ms > 1e-4}
        top = dict(sorted(per.items(), key=lambda kv: -kv[1])[:10])
        row = {"variant": v.name, "ctx": ctx, "step_wall_ms": dec / N * 1e3, "kernel_ms_per_step": sum(per.values()),
               "top_kernels_ms_per_step": top}
        rows.append(row)
        print(f"{v.name:>22} ctx {ctx}: wall {row['step_wall_ms']:.2f} ms/step, kernels {row['kernel_ms_per_step']:.2f}"
              " ms/step", flush=True)
        for name, ms in list(top.items())[:6]:
            print(f"      {ms:7.3f} ms  {name}", flush=True)
res = {"shape": shape, "new_tokens": N, "weights": "random", "device": torch.cuda.get_device_name(),
       "command": " ".join(sys.argv), "meta": run_metadata(), "rows": rows}
with open(out, "w") as f:
    json.dump(res, f, indent=1)
print(json.dumps({"shape": shape, "rows": len(rows)}))
