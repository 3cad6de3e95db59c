"""``mspeckv bench placement``: decode ms/token of KV placements against a floor measured in the same run.

For each (context, kv format, resident layers) cell:
    floor = offloaded bytes per step / pinned H2D bandwidth (measured here) + on-GPU time of an all-resident step
    ratio = measured ms/token / floor
Random bf16 weights at a named shape (default: Llama-2-7B-128K): pure transfer and kernel timing, labelled so.
The KV is filled through the cache's own write path with random K/V (the placement code paths are the real ones).
The same command times transformers' ``DynamicCache(offloading=True)`` as the "what a user has today" reference,
and one 9-token verification (gamma=8) at the longest context.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .. import validate as v
from ..kv.dense import DenseKV
from ..kv.placement import FORMATS, Placement, make_cache
from ..model.api import RANDOM_SHAPES, random_model


@dataclass(frozen=True)
class PlacementBenchConfig:
    shape: str = "llama-2-7b-128k"
    contexts: tuple[int, ...] = (8192, 16384, 32768)
    on_chip: int = 16
    formats: tuple[str, ...] = ("none", "int8", "int4")
    residents: tuple[int, ...] = (0, 16)
    steps: int = 8  # timed decode steps per repeat
    repeats: int = 3  # median over repeats (each the mean of `steps`)
    verify_tokens: int = 9
    hf_reference: bool = True
    out_dir: str = "results/placement"

    def __post_init__(self):
        v.choice("shape", self.shape, sorted(RANDOM_SHAPES))
        v.integers("contexts", self.contexts, lo=1)
        v.integer("on_chip", self.on_chip, lo=0)
        v.choices("formats", self.formats, FORMATS)
        v.integers("residents", self.residents, lo=0)
        v.integer("steps", self.steps, lo=1)
        v.integer("repeats", self.repeats, lo=2)  # the median over repeats is reported
        v.integer("verify_tokens", self.verify_tokens, lo=1)
        v.boolean("hf_reference", self.hf_reference)
        v.text("out_dir", self.out_dir)


def _ms(fn, warmup: int, iters: int) -> float:
    """Mean ms per call over `iters`, after `warmup` calls, timed with CUDA events (host clock on the CPU)."""
    for _ in range(warmup):
        fn()
    if not torch.cuda.is_available():
        t = time.perf_counter()
        for _ in range(iters):
            fn()
        return (time.perf_counter() - t) * 1e3 / iters
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(iters):
        fn()
    e.record()
    e.synchronize()
    return s.elapsed_time(e) / iters


def h2d_bandwidth(nbytes: int = 1 << 30, iters: int = 8) -> float:
    """Pinned host-to-device copy bandwidth in bytes/s (median)."""
    if not torch.cuda.is_available():  # smoke runs on the CPU: a host memcpy stands in (never a published number)
        src, dst = torch.empty(nbytes, dtype=torch.uint8), torch.empty(nbytes, dtype=torch.uint8)
        t = time.perf_counter()
        dst.copy_(src)
        return nbytes / (time.perf_counter() - t)
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    times = []
    for _ in range(iters + 1):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        dst.copy_(src, non_blocking=True)
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    return nbytes / statistics.median(times[1:])


def fill_cache(model, cache, ctx: int, chunk: int = 4096, seed: int = 0) -> None:
    """Write ctx tokens of random K/V (N(0,1), like post-norm activations) through the cache's own path."""
    c = model.cfg
    g = torch.Generator(device=model.device)
    g.manual_seed(seed)
    for s in range(0, ctx, chunk):
        n = min(chunk, ctx - s)
        cache.begin(n)
        for layer in range(c.n_layers):
            k = torch.randn(1, c.n_kv_heads, n, c.head_dim, generator=g, device=model.device, dtype=model.dtype)
            v = torch.randn(1, c.n_kv_heads, n, c.head_dim, generator=g, device=model.device, dtype=model.dtype)
            cache.update(layer, k, v)
        cache.end()


def decode_ms(model, cache, steps: int, repeats: int, n_tokens: int = 1) -> list[float]:
    """Per-repeat mean ms of a forward over n_tokens on top of the cache; rolls back after each (fixed context)."""
    tok = torch.randint(0, model.cfg.vocab_size, (1, n_tokens), device=model.device)

    def step():
        model(tok, cache)
        cache.rollback(n_tokens)

    with torch.inference_mode():
        return [_ms(step, warmup=2 if i == 0 else 0, iters=steps) for i in range(repeats)]


def hf_offloaded_ms(shape: str, ctx: int, steps: int, repeats: int) -> float | None:
    """transformers' LlamaForCausalLM with DynamicCache(offloading=True), random weights, same shape and context."""
    from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache

    kw = dict(RANDOM_SHAPES[shape])
    cfg = AutoConfig.for_model(kw.pop("model_type"), **kw)
    with torch.device("cuda"):
        hf = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16, attn_implementation="sdpa").eval()
    cache = DynamicCache(config=cfg, offloading=True)
    ids = torch.randint(10, 1000, (1, ctx), device="cuda")
    with torch.inference_mode():
        for s in range(0, ctx, 4096):  # chunked prefill so 32K fits
            hf(ids[:, s:s + 4096], past_key_values=cache, use_cache=True, logits_to_keep=1)
        tok = torch.randint(10, 1000, (1, 1), device="cuda")

        def step():  # HF's cache only grows; one token per step, as in real decoding
            hf(tok, past_key_values=cache, use_cache=True)

        res = [_ms(step, 2 if i == 0 else 0, steps) for i in range(repeats)]
    return statistics.median(res)


@dataclass
class Cell:
    ctx: int
    fmt: str
    resident: int
    ms_per_token: float
    runs_ms: list
    h2d_bytes_per_step: int
    floor_ms: float
    ratio: float
    memory: dict = field(default_factory=dict)


def run_placement_bench(cfg: PlacementBenchConfig, device: str = "cuda", on_context=None) -> dict:
    """``device='cpu'`` is for smoke tests only (tiny shapes); published numbers come from CUDA."""
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("bench placement needs a CUDA GPU (it times pinned transfers and copy streams)")
    t_start = time.time()
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = random_model(cfg.shape, device, dtype)
    nl = model.cfg.n_layers
    bw = h2d_bandwidth()
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    cells, dense_ms, hf_ms, verify = [], {}, {}, {}
    for ctx in cfg.contexts:
        cap = ctx + cfg.steps * 4 + 64
        dense = DenseKV.for_model(model, 1, cap)
        fill_cache(model, dense, ctx)
        dense_ms[ctx] = statistics.median(decode_ms(model, dense, cfg.steps, cfg.repeats))
        if ctx == max(cfg.contexts):
            verify["all_on_gpu"] = statistics.median(decode_ms(model, dense, 2, cfg.repeats, cfg.verify_tokens))
        del dense
        for fmt in cfg.formats:
            for r in cfg.residents:
                p = Placement(on_chip=cfg.on_chip, kv_quant=fmt, resident_layers=min(r, nl - cfg.on_chip))
                cache = make_cache(model, p, 1, cap)
                fill_cache(model, cache, ctx)
                before = cache.stats.h2d_bytes
                runs = decode_ms(model, cache, cfg.steps, cfg.repeats)
                n_fwd = 2 + cfg.steps * cfg.repeats
                per_step = (cache.stats.h2d_bytes - before) // n_fwd
                floor = per_step / bw * 1e3 + dense_ms[ctx]
                ms = statistics.median(runs)
                cells.append(Cell(ctx, fmt, r, ms, runs, per_step, floor, ms / floor, cache.memory_report()))
                if ctx == max(cfg.contexts) and (fmt, r) in (("none", 0), ("int8", 16)):
                    verify[f"{fmt}_resident{r}"] = statistics.median(
                        decode_ms(model, cache, 2, cfg.repeats, cfg.verify_tokens))
                del cache
                if device == "cuda":
                    torch.cuda.empty_cache()
        if cfg.hf_reference and device == "cuda":
            try:
                hf_ms[ctx] = hf_offloaded_ms(cfg.shape, ctx, cfg.steps, cfg.repeats)
            except Exception as e:  # reported, not fatal: the reference must not sink our own numbers
                hf_ms[ctx] = f"failed: {type(e).__name__}: {e}"[:300]
            torch.cuda.empty_cache()
        if on_context is not None:  # partial results survive a time limit (marked incomplete)
            on_context(_result(cfg, device, bw, weight_bytes, dense_ms, hf_ms, verify, cells, t_start, done=False))
    return _result(cfg, device, bw, weight_bytes, dense_ms, hf_ms, verify, cells, t_start, done=True)


def _result(cfg, device, bw, weight_bytes, dense_ms, hf_ms, verify, cells, t_start, done: bool) -> dict:
    out = {
        "bench": "placement", "weights": "random", "shape": cfg.shape, "config": asdict(cfg),
        "device_name": torch.cuda.get_device_name() if device == "cuda" else "cpu (smoke run)",
        "pinned_h2d_GBps": bw / 1e9,
        "weight_bytes": weight_bytes, "all_on_gpu_ms": dense_ms, "hf_offloaded_ms": hf_ms,
        "verify_ms": {"tokens": cfg.verify_tokens, "ctx": max(cfg.contexts), **verify},
        "cells": [asdict(c) for c in cells], "wall_s": time.time() - t_start, "complete": done,
    }
    return out


def render_placement(res: dict) -> str:
    lines = [
        f"# Placement benchmark ({res['shape']}, **random weights**, {res['device_name']})"
        + ("" if res.get("complete", True) else " — INCOMPLETE (stopped early)"),
        "",
        f"Pinned H2D bandwidth measured in this run: {res['pinned_h2d_GBps']:.1f} GB/s. "
        f"floor = offloaded bytes per step / that bandwidth + the all-on-GPU step time at the same context.",
        f"on_chip = {res['config']['on_chip']}; decode ms/token is the median over {res['config']['repeats']} "
        f"repeats of {res['config']['steps']} steps.",
        "",
        "| context | kv format | resident | ms/token | floor ms | ratio | MB streamed/step | all-on-GPU ms "
        "| HF offloaded ms |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in res["cells"]:
        hf = res["hf_offloaded_ms"].get(c["ctx"], res["hf_offloaded_ms"].get(str(c["ctx"])))
        hf = f"{hf:.2f}" if isinstance(hf, float) else (hf or "NA")
        dense = res["all_on_gpu_ms"].get(c["ctx"], res["all_on_gpu_ms"].get(str(c["ctx"])))
        lines.append(f"| {c['ctx']} | {c['fmt']} | {c['resident']} | {c['ms_per_token']:.2f} | {c['floor_ms']:.2f} | "
                     f"{c['ratio']:.2f}x | {c['h2d_bytes_per_step'] / 1e6:.0f} | {dense:.2f} | {hf} |")
    v = res["verify_ms"]
    lines += ["", f"## One verification of {v['tokens']} tokens at {v['ctx']}", "",
              "| KV setup | ms |", "|---|---:|"]
    for k, val in v.items():
        if k not in ("tokens", "ctx"):
            lines.append(f"| {k} | {val:.2f} |")
    return "\n".join(lines) + "\n"


def write_placement(res: dict, out_dir: str, command: str) -> Path:
    from .results import atomic_write_json, atomic_write_text, run_metadata

    d = Path(out_dir)
    res = {**res, "meta": run_metadata(), "command": command}
    atomic_write_json(d / "placement.json", res)
    atomic_write_text(d / "summary.md", render_placement(res) + f"\nCommand: `{command}`\n")
    return d
