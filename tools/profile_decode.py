"""Where does a decode step go? Random weights at a named shape (timing only). Usage (GPU):
    python tools/profile_decode.py qwen2.5-1.5b 1024,16384,32256"""

import sys

import torch
import torch.nn.functional as F

from mspeckv.bench.steps import fill_cache
from mspeckv.kv.dense import DenseKV
from mspeckv.kv.static import GraphedForward, StaticKV
from mspeckv.model.api import random_model
from mspeckv.runs.harness import time_ms

shape = sys.argv[1] if len(sys.argv) > 1 else "qwen2.5-1.5b"
ctxs = [int(x) for x in (sys.argv[2] if len(sys.argv) > 2 else "1024,16384,32256").split(",")]
m = random_model(shape, "cuda", torch.bfloat16)
c = m.cfg
tok = torch.randint(0, c.vocab_size, (1, 1), device="cuda")
def run(ctx: int) -> None:
    d = DenseKV.for_model(m, 1, ctx + 16)
    fill_cache(m, d, ctx)

    def eager():
        m(tok, d)
        d.rollback(1)

    with torch.inference_mode():
        e = time_ms(eager, 3, 20)
        s = StaticKV.for_model(m, ctx + 16)
        fill_cache(m, s, ctx)
        gf = GraphedForward(m, s, 1, 1)

        def graphed():
            gf(tok, ctx)
            s.rollback(1)

        g = time_ms(graphed, 3, 50)
    G = c.n_heads // c.n_kv_heads
    q = torch.randn(1, c.n_kv_heads, G, c.head_dim, device="cuda", dtype=torch.bfloat16)
    k, v = d.read(0)
    sd = time_ms(lambda: F.scaled_dot_product_attention(q, k, v), 3, 50)
    mask = s.attn_mask.repeat(G, 1)
    sdm = time_ms(lambda: F.scaled_dot_product_attention(q, s.k[0], s.v[0], attn_mask=mask), 3, 50)

    def manual():
        w = (q @ k.transpose(-1, -2)).float().mul_(c.head_dim ** -0.5).softmax(-1)
        return w.to(v.dtype) @ v

    mm = time_ms(manual, 3, 50)
    print(f"ctx {ctx}: eager step {e:.2f} ms | graphed step {g:.2f} ms | one layer attention: sdpa {sd * 1e3:.0f} us,"
          f" sdpa+mask(static) {sdm * 1e3:.0f} us, matmul-softmax {mm * 1e3:.0f} us", flush=True)
    if ctx == ctxs[-1]:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as p, torch.inference_mode():
            for _ in range(3):
                eager()
            torch.cuda.synchronize()
        print(p.key_averages().table(sort_by="cuda_time_total", row_limit=8))


for ctx in ctxs:
    run(ctx)
