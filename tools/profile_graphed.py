"""Where does a GRAPHED decode step go? Random weights at a named shape (timing only). Usage (GPU):
    python tools/profile_graphed.py qwen2.5-1.5b 32768 [out.json]

For the all-on-GPU step (StaticKV) and the offloaded static PlacedKV steps (on_chip 16, bf16 / int8 / int4,
nothing resident) at one context: the step time (CUDA events, median of 3 x 20 replays) and, from a torch.profiler
trace of 5 replays, the GPU kernels and copies per step: count, summed duration, the busiest kinds, and the timeline
split (``mspeckv.bench.timeline``): how much of the span kernels and copies overlap, run alone, or leave idle (idle
includes the host gaps between the profiled replays). A step whose kernels sum to about its time, in hundreds of short
kernels, is bound by kernel execution latency, not bandwidth.
"""

import json
import statistics
import sys
import tempfile
from collections import defaultdict

import torch

from mspeckv.bench import timeline
from mspeckv.bench.steps import fill_cache
from mspeckv.cache import make_cache
from mspeckv.kv.placement import Placement
from mspeckv.kv.static import GraphedForward
from mspeckv.model.api import random_model
from mspeckv.runs.harness import time_ms

shape = sys.argv[1] if len(sys.argv) > 1 else "qwen2.5-1.5b"
ctx = int(sys.argv[2]) if len(sys.argv) > 2 else 32768
out = sys.argv[3] if len(sys.argv) > 3 else None
m = random_model(shape, "cuda", torch.bfloat16)
tok = torch.randint(0, m.cfg.vocab_size, (1, 1), device="cuda")
rows = []


def one(name: str, placement) -> None:
    cache = make_cache(m, placement, 1, ctx + 64, graphs=True)
    with torch.inference_mode():
        fill_cache(m, cache, ctx)
        m(tok, cache)  # an eager forward first (slots, flush state settle)
        cache.rollback(1)
        fwd = GraphedForward(m, cache, 1, 1)

        def step():
            fwd(tok, ctx)
            cache.rollback(1)

        ms = statistics.median(time_ms(step, 3 if i == 0 else 0, 20) for i in range(3))
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as p:
            for _ in range(5):
                step()
            torch.cuda.synchronize()
    kinds, n, total, copy_us = defaultdict(float), 0, 0.0, 0.0
    for e in p.events():
        if e.device_type != torch.autograd.DeviceType.CUDA:
            continue
        d = e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total
        if "memcpy" in e.name.lower() or "memset" in e.name.lower():
            copy_us += d
            continue
        n += 1
        total += d
        kinds[e.name[:60]] += d
    every = sorted(kinds.items(), key=lambda kv: -kv[1])  # all kernels in the JSON (a split by kernel needs them)
    top = every[:6]
    with tempfile.TemporaryDirectory() as td:  # the timeline: how much of the copies the kernels overlap
        p.export_chrome_trace(f"{td}/trace.json")
        tl = timeline.from_file(f"{td}/trace.json", 5)
    row = {"setup": name, "ctx": ctx, "step_ms": ms, "kernels_per_step": n / 5, "kernel_ms_per_step": total / 5e3,
           "copy_ms_per_step": copy_us / 5e3, "top_kernels_ms_per_step": {k: v / 5e3 for k, v in top},
           "kernels_ms_per_step": {k: v / 5e3 for k, v in every},
           "timeline_ms_per_step": tl}
    rows.append(row)
    print(f"{name:>14} ctx {ctx}: step {ms:.2f} ms | {n / 5:.0f} kernels, {total / 5e3:.2f} ms summed | copies "
          f"{copy_us / 5e3:.2f} ms (copy stream, overlappable)", flush=True)
    print(f"      timeline per step: span {tl['span_ms']:.2f} ms = overlapped {tl['overlap_ms']:.2f} + kernels only "
          f"{tl['compute_only_ms']:.2f} + copies only {tl['copy_only_ms']:.2f} + idle {tl['idle_ms']:.2f}")
    for k, v in top:
        print(f"      {v / 5e3:7.3f} ms  {k}")


for name, pl in [("all-on-GPU", None)] + [(f"offloaded {f}", Placement(on_chip=16, kv_quant=f))
                                          for f in ("none", "int8", "int4")]:
    try:
        one(name, pl)
    except Exception as e:  # reported, and the next setup runs
        print(f"{name}: failed: {type(e).__name__}: {e}", flush=True)
    torch.cuda.empty_cache()
print(json.dumps({"shape": shape, "weights": "random", "device": torch.cuda.get_device_name(), "rows": rows}))
if out:
    with open(out, "w") as f:
        json.dump({"shape": shape, "weights": "random", "device": torch.cuda.get_device_name(),
                   "command": " ".join(sys.argv), "rows": rows}, f, indent=1)
