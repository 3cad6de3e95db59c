"""Time decode/verification attention at model shapes on random data (not a test): the Triton split-K kernel of
``mspeckv.model.decode_attention`` (bf16, int8, int4 KV) against the fp32-score ``bmm`` path that ``attention()``
used before and against SDPA over the folded queries.

Each cell times one attention call per layer over ``n_buf`` distinct K/V buffers (enough that they do not fit in
the L2, as in a real step, where the weights evict the KV between steps), captured in one CUDA graph, after
warm-up; CUDA events; the median of ``--runs`` runs. Reported per layer (us), for a step (x layers, ms), and as
achieved HBM bandwidth = bytes of K/V (codes + scales + zeros) + Q read + output written / time, against a
device-to-device copy bandwidth (bytes read + written / time) measured in the same run.

    PYTHONPATH=. python tools/bench_decode_attention.py --out results/kernels/decode_attention_h200.json
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mspeckv.kv.quant import QTensor  # noqa: E402
from mspeckv.model import decode_attention as da  # noqa: E402
from mspeckv.model.llama import causal_mask  # noqa: E402

SHAPES = {  # layers, q heads, kv heads, head dim
    "qwen2.5-1.5b": (28, 12, 2, 128),
    "llama-2-7b": (32, 32, 32, 128),
}
GROUP = 64


def git_commit() -> str | None:
    from mspeckv.runs.store import provenance

    return provenance()["git_commit"]


def median_ms(fn, runs: int, inner: int) -> tuple[float, list[float]]:
    """fn() once per inner iteration; each run = mean of `inner` calls, CUDA events; median over runs."""
    out = []
    for _ in range(runs):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        for _ in range(inner):
            fn()
        e.record()
        e.synchronize()
        out.append(s.elapsed_time(e) / inner)
    return statistics.median(out), out


def copy_bandwidth(runs: int) -> float:
    """Device-to-device copy of 2 GiB: (read + written) bytes / time, GB/s."""
    n = 1 << 30
    a = torch.empty(n, dtype=torch.bfloat16, device="cuda").normal_()
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    ms, _ = median_ms(lambda: b.copy_(a), max(runs, 5), 5)
    return 2 * 2 * n / (ms * 1e-3) / 1e9


def rand_q(Hkv: int, S: int, D: int, fmt: str, kind: str, gen) -> QTensor:
    bits = {"int8": 8, "int4": 4}[fmt]
    dev = "cuda"
    if kind == "k":
        NG = S // GROUP
        codes = torch.randint(0, 256, (1, Hkv, NG, D, GROUP * bits // 8), dtype=torch.uint8, device=dev,
                              generator=gen)
        sc = (torch.rand(1, Hkv, NG, D, device=dev, generator=gen) * 0.05).half()
        ze = torch.randn(1, Hkv, NG, D, device=dev, generator=gen).half()
    else:
        codes = torch.randint(0, 256, (1, Hkv, S, D * bits // 8), dtype=torch.uint8, device=dev, generator=gen)
        sc = (torch.rand(1, Hkv, S, D // GROUP, device=dev, generator=gen) * 0.05).half()
        ze = torch.randn(1, Hkv, S, D // GROUP, device=dev, generator=gen).half()
    return QTensor(codes, sc, ze, (1, Hkv, S, D))


def nbytes(x) -> int:
    if isinstance(x, QTensor):
        return x.nbytes()
    return x.numel() * x.element_size()


def bmm_path(q, k, v, mask):
    """The few-row CUDA path attention() had before the kernel (B == 1)."""
    B, Hq, T, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    qf = q.reshape(B, Hkv, G * T, D)
    sc = torch.bmm(qf[0] * D**-0.5, k[0].transpose(1, 2), out_dtype=torch.float32)
    if mask is not None:
        sc.masked_fill_(~mask.repeat(G, 1), float("-inf"))
    return torch.bmm(sc.softmax(-1).to(v.dtype), v[0])[None].reshape(B, Hq, T, D)


def sdpa_path(q, k, v, mask):
    B, Hq, T, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    qf = q.reshape(B, Hkv, G * T, D)
    fm = None if mask is None else mask.repeat(G, 1)
    return F.scaled_dot_product_attention(qf, k, v, attn_mask=fm).reshape(B, Hq, T, D)


def cell(shape: str, S: int, T: int, method: str, runs: int, budget_bytes: float, gen, **kw) -> dict:
    L, Hq, Hkv, D = SHAPES[shape]
    fmt = kw.pop("fmt", "bf16")
    variant = kw.pop("variant", "")
    dev = "cuda"
    if fmt == "bf16":
        per = 2 * Hkv * S * D * 2
    else:
        bits = {"int8": 8, "int4": 4}[fmt]
        per = 2 * Hkv * S * (D * bits // 8 + 2 * 2 * D // GROUP)
    n_buf = int(min(512, max(2, math.ceil(budget_bytes / per))))
    bufs = []
    for _ in range(n_buf):
        if fmt == "bf16":
            k = torch.randn(1, Hkv, S, D, device=dev, generator=gen, dtype=torch.bfloat16)
            v = torch.randn(1, Hkv, S, D, device=dev, generator=gen, dtype=torch.bfloat16)
        else:
            k, v = rand_q(Hkv, S, D, fmt, "k", gen), rand_q(Hkv, S, D, fmt, "v", gen)
        bufs.append((k, v))
    q = torch.randn(1, Hq, T, D, device=dev, generator=gen, dtype=torch.bfloat16)
    mask = causal_mask(T, S, dev) if T > 1 else None
    if method == "triton":
        causal = variant == "causal"
        m = None if causal else mask
        if m is not None:
            da.mask_bound(m)  # computed once per forward in a real step (shared by the layers): outside the graph
        fn1 = lambda k, v: da.decode_attention_triton(q, k, v, m, causal=causal and T > 1, **kw)
    elif method == "bmm":
        fn1 = lambda k, v: bmm_path(q, k, v, mask)
    elif method == "sdpa":
        fn1 = lambda k, v: sdpa_path(q, k, v, mask)
    else:
        raise ValueError(method)

    def all_layers():
        for k, v in bufs:
            fn1(k, v)

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            all_layers()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        all_layers()
    g.replay()
    torch.cuda.synchronize()
    inner = max(1, min(20, int(2e9 // (per * n_buf))))
    ms, all_ms = median_ms(g.replay, runs, inner)
    per_layer_us = ms * 1e3 / n_buf
    k0, v0 = bufs[0]
    moved = nbytes(k0) + nbytes(v0) + 2 * q.numel() * q.element_size()
    return dict(shape=shape, S=S, T=T, method=method, fmt=fmt, variant=variant, n_buf=n_buf,
                per_layer_us=per_layer_us, step_attn_ms=per_layer_us * L / 1e3,
                runs_ms=[x * 1e3 / n_buf for x in all_ms], bytes_per_layer=moved,
                GBps=moved / (per_layer_us * 1e-6) / 1e9, **kw)


def _x(b: dict | None, tri: dict | None) -> str:
    if not b or not tri or "error" in b or "error" in tri:
        return "      -"
    return f"{b['per_layer_us'] / tri['per_layer_us']:7.2f}x"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--contexts", default="1024,2048,4096,8192,16384,32768,65536")
    ap.add_argument("--tokens", default="1,9")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--budget-gb", type=float, default=1.0, help="K/V bytes per timed pass (rotated buffers)")
    ap.add_argument("--no-baselines", action="store_true", help="Triton only")
    ap.add_argument("--formats", default="bf16,int8,int4", help="Triton KV formats to time")
    ap.add_argument("--sweep-splits", action="store_true", help="also time bf16 at 1/4x, 1/2x and 2x the splits")
    ap.add_argument("--quant-matrix", action="store_true",
                    help="only time quantized-kernel variants (block_n, prefetch, kfold, warps) at 32K")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    if a.runs < 3:
        ap.error("--runs must be >= 3")
    torch.backends.cuda.matmul.allow_tf32 = False
    gen = torch.Generator(device="cuda").manual_seed(0)
    t0 = time.time()
    copy_gbps = copy_bandwidth(a.runs)
    print(f"device {torch.cuda.get_device_name()}  d2d copy {copy_gbps:.0f} GB/s (read+write)", flush=True)
    rows = []
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    if a.quant_matrix:
        combos = [dict(block_n=bn, prefetch=pf, kfold=kf, num_warps=4) for bn in (16, 32, 64) for pf in (False, True)
                  for kf in (False, True)]
        combos += [dict(block_n=32, prefetch=pf, kfold=True, num_warps=8) for pf in (False, True)]
        for shape, T, fmts in (("llama-2-7b", 1, ("int8", "int4")), ("qwen2.5-1.5b", 1, ("int4",)),
                               ("qwen2.5-1.5b", 9, ("int4",))):
            for fmt in fmts:
                for c in combos:
                    name = f"bn{c['block_n']}-pf{int(c['prefetch'])}-kf{int(c['kfold'])}-w{c['num_warps']}"
                    try:
                        r = cell(shape, 32768, T, "triton", a.runs, a.budget_gb * 1e9, gen, fmt=fmt, variant=name,
                                 **c)
                        r["pct_copy_bw"] = 100 * r["GBps"] / copy_gbps
                    except Exception as e:
                        r = dict(shape=shape, T=T, fmt=fmt, variant=name, error=f"{type(e).__name__}: {e}"[:200])
                    torch.cuda.empty_cache()
                    rows.append(r)
                    print(f"{shape:14s} T={T} {fmt} {name:22s} " + (f"{r['per_layer_us']:8.1f} us "
                          f"{r['pct_copy_bw']:5.1f}%" if "error" not in r else r["error"]), flush=True)
        if a.out:
            Path(a.out).write_text(json.dumps(dict(git_commit=git_commit(), copy_GBps=copy_gbps, rows=rows)) + "\n")
        return
    for shape in a.shapes.split(","):
        L, Hq, Hkv, D = SHAPES[shape]
        for S in map(int, a.contexts.split(",")):
            for T in map(int, a.tokens.split(",")):
                specs = [("triton", dict(fmt=f)) for f in a.formats.split(",")]
                if T > 1 and "bf16" in a.formats.split(","):
                    specs.append(("triton", dict(fmt="bf16", variant="causal")))
                if a.sweep_splits:
                    for fmt, per_sm in (("bf16", 2.0), ("int4", 4.0)):
                        base = da.default_splits(S, 64, Hkv, Hq // Hkv * T, sms, per_sm)
                        for f in (0.5, 2.0, 4.0):
                            ns = min(da.MAX_SPLITS - 1, max(1, int(base * f)))
                            specs.append(("triton", dict(fmt=fmt, variant=f"splits{ns}", num_splits=ns)))
                if not a.no_baselines:
                    specs += [("bmm", {}), ("sdpa", {})]
                for method, kw in specs:
                    try:
                        r = cell(shape, S, T, method, a.runs, a.budget_gb * 1e9, gen, **kw)
                    except Exception as e:  # one failing baseline must not lose the table
                        r = dict(shape=shape, S=S, T=T, method=method, fmt=kw.get("fmt", "bf16"),
                                 variant=kw.get("variant", ""), error=f"{type(e).__name__}: {e}"[:300])
                        torch.cuda.empty_cache()
                    torch.cuda.empty_cache()
                    if "GBps" in r:
                        r["pct_copy_bw"] = 100 * r["GBps"] / copy_gbps
                    rows.append(r)
                    print(json.dumps({k: (round(v, 2) if isinstance(v, float) else v) for k, v in r.items()
                                      if k != "runs_ms"}), flush=True)
    # summary table: per shape, S, T: triton bf16/int8/int4, bmm, sdpa per-layer us and % of copy bw
    key = lambda r: (r["shape"], r["S"], r["T"])
    cols = [("triton", "bf16", ""), ("triton", "int8", ""), ("triton", "int4", ""), ("bmm", "bf16", ""),
            ("sdpa", "bf16", "")]
    print("\nper-layer attention time, us (% of d2d copy bandwidth); random data; "
          f"{torch.cuda.get_device_name()}, copy {copy_gbps:.0f} GB/s")
    print(f"{'shape':14s} {'S':>6s} {'T':>2s} | " + " | ".join(f"{m}-{f}".rjust(18) for m, f, _ in cols)
          + " | tri/bmm | tri/sdpa")
    by = {}
    for r in rows:
        by.setdefault(key(r), {})[(r["method"], r["fmt"], r["variant"])] = r
    for kk, d in by.items():
        cells = []
        for c in cols:
            r = d.get(c)
            cells.append("err".rjust(18) if r is None or "error" in r else
                         f"{r['per_layer_us']:9.1f} ({r['pct_copy_bw']:3.0f}%)".rjust(18))
        tri, bmm, sd = d.get(cols[0]), d.get(cols[3]), d.get(cols[4])
        print(f"{kk[0]:14s} {kk[1]:6d} {kk[2]:2d} | " + " | ".join(cells) + f" | {_x(bmm, tri)} | {_x(sd, tri)}")
    # verification / decode ratio (Triton, same format)
    ratios = []
    for (shape, S, T), d in by.items():
        if T == 1:
            continue
        for fmt in ("bf16", "int8", "int4"):
            r9, r1 = d.get(("triton", fmt, "")), by.get((shape, S, 1), {}).get(("triton", fmt, ""))
            if r9 and r1 and "error" not in r9 and "error" not in r1:
                ratios.append(dict(shape=shape, S=S, T=T, fmt=fmt, ratio=r9["per_layer_us"] / r1["per_layer_us"]))
    if ratios:
        print("\nT-token verification / 1-token decode (Triton, per layer):")
        for x in ratios:
            print(f"  {x['shape']:14s} S={x['S']:6d} {x['fmt']:5s} T={x['T']}: {x['ratio']:.2f}x")
    out = dict(kind="decode_attention_kernel_bench", data="random (no real weights)",
               gpu=torch.cuda.get_device_name(), torch=torch.__version__,
               triton=getattr(da.triton, "__version__", None), git_commit=git_commit(),
               command=" ".join(sys.argv), copy_GBps=copy_gbps, group_size=GROUP, runs=a.runs,
               wall_s=time.time() - t0, rows=rows, verify_over_decode=ratios)
    line = json.dumps(out)
    print(line)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
