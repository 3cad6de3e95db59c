"""``mspeckv bench placement``: decode ms/token of KV placements against floors measured in the same run.

For each (context, kv format, resident layers) cell:
    transfer floor = offloaded bytes per step / pinned H2D bandwidth (measured here)
    GPU floor      = the GRAPHED all-on-GPU decode step at the same context (StaticKV + GraphedForward, as
                     ``decoding.autoregressive`` runs it; eager on the CPU)
    ratio          = measured ms/token / max(transfer floor, GPU floor)   (perfect overlap of copies and compute)
    ratio_sum      = measured ms/token / (transfer floor + GPU floor)      (no overlap at all)
Each cell is timed twice: eagerly (``make_cache(p)``, the host drives every layer) and graphed (``make_cache(p,
graphs=True)``: the static PlacedKV layout, one CUDA graph per step, ``kv/offload.py``), each on a freshly filled
cache; ``graphed_ratio`` is the graphed step over the same floor. The graphed step copies the store's rows rounded
up to the copy bucket (``COPY_BLOCK`` tokens): its transfer floor counts those bytes.
The all-on-GPU steps (eager and graphed) also report their MBU: (weight bytes + KV bytes read) / time against the
device-to-device copy bandwidth measured in the same run (bytes read + written).
Host memory: pinned memory is freed between cells, and a cell whose pinned store (or HF's offloaded cache) would not
fit in MemAvailable (/proc/meminfo, or ``host_memory_bytes``) is refused up front and recorded as a failed cell, as
is a cell that raises; the run goes on with the next cell.
Random bf16 weights at a named shape (default: Llama-2-7B-128K): pure transfer and kernel timing, labelled so.
The KV is filled through the cache's own write path with random K/V (the placement code paths are the real ones).
The same command times transformers' ``DynamicCache(offloading=True)`` as the "what a user has today" reference,
and one 9-token verification (gamma=8) at the longest context.
"""

from __future__ import annotations

import gc
import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .. import validate as v
from ..cache import make_cache
from ..kv.dense import DenseKV
from ..kv.placement import FORMATS, Placement
from ..kv.static import GraphedForward
from ..model.api import RANDOM_SHAPES, random_model
from ..runs.template import opt


@dataclass(frozen=True)
class PlacementBenchConfig:
    shape: str = opt("llama-2-7b-128k", "random-weight shape", choices=sorted(RANDOM_SHAPES))
    contexts: tuple[int, ...] = opt((8192, 16384, 32768), "contexts (tokens in the cache)")
    on_chip: int = opt(16, "layers whose KV stays on the GPU; the rest are offloaded")
    formats: tuple[str, ...] = opt(("none", "int8", "int4"), "offloaded KV formats", choices=FORMATS)
    residents: tuple[int, ...] = opt((0, 16), "resident-layer counts")
    steps: int = opt(8, "timed decode steps per repeat")
    repeats: int = opt(3, "repeats (the median is reported; each the mean of --steps)")
    verify_tokens: int = opt(9, "tokens of the timed verification", cli=False)
    hf_reference: bool = opt(True, "skip the transformers offloaded reference", flag="--no-hf", negate=True)
    # also time each cell on the static layout with CUDA graphs
    graphed: bool = opt(True, "skip the graphed (static-layout) timing of each cell", flag="--no-graphs", negate=True)
    out_dir: str = opt("results/placement", "output folder", aliases=("--output-dir",))
    # None: MemAvailable from /proc/meminfo before each cell
    host_memory_bytes: int | None = opt(None, "host memory a pinned store may use", cli=False)
    # left free for everything else when checking that a pinned store fits
    host_reserve_bytes: int = opt(4 << 30, "host memory left free", cli=False)

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
        v.boolean("graphed", self.graphed)
        v.text("out_dir", self.out_dir)

    def validate(self) -> None:
        """The output folder can be made (checked before the model is built)."""
        from ..runs.checks import out_dir

        out_dir("--out-dir", self.out_dir)


def _ms(fn, warmup: int, iters: int, cuda: bool | None = None, before=None) -> float:
    """Mean ms per call over `iters`, after `warmup` calls, timed with CUDA events (host clock on the CPU).
    ``cuda``: time with events (default: whenever CUDA is available); ``before()`` runs between warm-up and timing
    (e.g. a barrier across ranks)."""
    for _ in range(warmup):
        fn()
    if before is not None:
        before()
    if not (torch.cuda.is_available() if cuda is None else cuda):
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


def d2d_bandwidth(nbytes: int = 1 << 31, iters: int = 8) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read + written (median). CPU: a host copy."""
    if not torch.cuda.is_available():
        src, dst = torch.empty(nbytes // 8, dtype=torch.uint8), torch.empty(nbytes // 8, dtype=torch.uint8)
        t = time.perf_counter()
        dst.copy_(src)
        return 2 * src.numel() / (time.perf_counter() - t)
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(iters):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        dst.copy_(src)
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    return 2 * nbytes / statistics.median(times)


def mem_available() -> int | None:
    """MemAvailable from /proc/meminfo in bytes (None where there is no such file)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def pinned_store_bytes(model_cfg, placement: Placement, capacity: int, dtype_bytes: int = 2) -> int:
    """Host bytes of a PlacedKV's store: every offloaded layer's K and V at ``capacity`` tokens (quantized stores:
    codes + scales + zeros, keys rounded up to whole groups)."""
    c = model_cfg
    n_off = c.n_layers - placement.n_on_chip(c.n_layers)
    spec = placement.quant
    if spec is None:
        per_layer = 2 * c.n_kv_heads * capacity * c.head_dim * dtype_bytes
    else:
        cap = -(-capacity // spec.group_size) * spec.group_size
        per_layer = math.ceil(2 * c.n_kv_heads * cap * c.head_dim * spec.bytes_per_element())
    return n_off * per_layer


def free_memory() -> None:
    """Drop what the last cell left: Python garbage, the CUDA caching allocator, and (where this torch has it) the
    cache of pinned host blocks, which otherwise keeps every freed pinned store."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        host_empty = getattr(torch._C, "_host_emptyCache", None)
        if host_empty is not None:
            host_empty()


def _size(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def host_fit_error(need: int, cfg: PlacementBenchConfig, what: str) -> str | None:
    """None if ``need`` bytes of host memory fit (MemAvailable minus the reserve), else the refusal message."""
    avail = cfg.host_memory_bytes if cfg.host_memory_bytes is not None else mem_available()
    if avail is None:
        return None
    if need + cfg.host_reserve_bytes > avail:
        src = "MemAvailable" if cfg.host_memory_bytes is None else "host_memory_bytes"
        return (f"refused: {what} needs {_size(need)} of host memory; {_size(avail)} available ({src}) "
                f"minus a {_size(cfg.host_reserve_bytes)} reserve")
    return None


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


def graphed_ms(model, ctx: int, steps: int, repeats: int, n_tokens: int = 1) -> list[float]:
    """Per-repeat mean ms of a GRAPHED forward over n_tokens with every layer's KV on the GPU (StaticKV +
    GraphedForward, as autoregressive decoding runs it; eager on the CPU); fixed context (rolled back)."""
    cache = make_cache(model, None, 1, ctx + n_tokens + 8, graphs=True)  # the StaticKV layout
    with torch.inference_mode():
        fill_cache(model, cache, ctx)
        fwd = GraphedForward(model, cache, n_tokens, 1)
        tok = torch.randint(0, model.cfg.vocab_size, (1, n_tokens), device=model.device)

        def step():
            fwd(tok, ctx)
            cache.rollback(n_tokens)

        return [_ms(step, warmup=2 if i == 0 else 0, iters=steps) for i in range(repeats)]


def graphed_cell_ms(model, p: Placement, cap: int, ctx: int, steps: int, repeats: int,
                    n_tokens: int = 1) -> tuple[list[float], int, dict]:
    """(per-repeat mean ms, H2D bytes per step, memory report) of a GRAPHED forward over n_tokens on a static
    PlacedKV filled to ctx (fixed context: rolled back after each step, so the graph's layout never changes)."""
    cache = make_cache(model, p, 1, cap, graphs=True)  # freed with this frame (the caller runs free_memory())
    with torch.inference_mode():
        fill_cache(model, cache, ctx)
        tok = torch.randint(0, model.cfg.vocab_size, (1, n_tokens), device=model.device)
        model(tok, cache)  # fills resident slots (an eager forward), so the next plan is stationary
        cache.rollback(n_tokens)
        fwd = GraphedForward(model, cache, n_tokens, 1)
        before, n0 = cache.stats.h2d_bytes, cache.stats.static_forwards

        def step():
            fwd(tok, ctx)
            cache.rollback(n_tokens)

        runs = [_ms(step, warmup=2 if i == 0 else 0, iters=steps) for i in range(repeats)]
        n_fwd = cache.stats.static_forwards - n0
        per_step = (cache.stats.h2d_bytes - before) // max(n_fwd, 1)
        return runs, per_step, cache.memory_report()


def step_bytes(model, ctx: int, weight_bytes: int) -> int:
    """Bytes an all-on-GPU decode step must read: every weight once and every layer's K and V at ``ctx``."""
    c = model.cfg
    return weight_bytes + c.kv_bytes_per_token(model.dtype.itemsize) * ctx


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
    ms_per_token: float | None
    runs_ms: list
    h2d_bytes_per_step: int | None
    floor_ms: float | None  # max(transfer floor, graphed GPU floor)
    ratio: float | None  # ms_per_token / floor_ms
    transfer_floor_ms: float | None = None
    gpu_floor_ms: float | None = None  # graphed all-on-GPU step at this context
    ratio_sum: float | None = None  # ms_per_token / (transfer floor + GPU floor)
    pinned_bytes_planned: int | None = None
    error: str | None = None  # a failed or refused cell: the reason; its numbers are None
    memory: dict = field(default_factory=dict)
    graphed_ms: float | None = None  # the same cell on the static layout, one CUDA graph per step
    graphed_runs_ms: list = field(default_factory=list)
    graphed_h2d_bytes_per_step: int | None = None  # bucketed copies: >= h2d_bytes_per_step
    graphed_floor_ms: float | None = None  # max(graphed transfer floor, GPU floor)
    graphed_ratio: float | None = None  # graphed_ms / graphed_floor_ms
    graphed_error: str | None = None


def _failed(ctx: int, fmt: str, r: int, error: str, planned: int | None) -> Cell:
    return Cell(ctx, fmt, r, None, [], None, None, None, pinned_bytes_planned=planned, error=error)


def run_placement_bench(cfg: PlacementBenchConfig, device: str = "cuda", on_context=None) -> dict:
    """``device='cpu'`` is for smoke tests only (tiny shapes); published numbers come from CUDA."""
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("bench placement needs a CUDA GPU (it times pinned transfers and copy streams)")
    t_start = time.time()
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = random_model(cfg.shape, device, dtype)
    nl = model.cfg.n_layers
    bw = h2d_bandwidth()
    d2d = d2d_bandwidth()
    free_memory()
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    cells, dense_ms, hf_ms, verify = [], {}, {}, {}
    graphed, mbu = {}, {}
    for ctx in cfg.contexts:
        cap = ctx + cfg.steps * 4 + 64
        dense = DenseKV.for_model(model, 1, cap)
        fill_cache(model, dense, ctx)
        dense_ms[ctx] = statistics.median(decode_ms(model, dense, cfg.steps, cfg.repeats))
        if ctx == max(cfg.contexts):
            verify["all_on_gpu"] = statistics.median(decode_ms(model, dense, 2, cfg.repeats, cfg.verify_tokens))
        del dense
        free_memory()
        try:  # the GPU floor: the graphed all-on-GPU step
            graphed[ctx] = statistics.median(graphed_ms(model, ctx, cfg.steps, cfg.repeats))
            if ctx == max(cfg.contexts):
                verify["all_on_gpu_graphed"] = statistics.median(
                    graphed_ms(model, ctx, 2, cfg.repeats, cfg.verify_tokens))
        except Exception as e:  # reported; the eager step stands in, and says so
            graphed[ctx] = f"failed: {type(e).__name__}: {e}"[:300]
        free_memory()
        nbytes = step_bytes(model, ctx, weight_bytes)
        gpu_floor = graphed[ctx] if isinstance(graphed[ctx], float) else dense_ms[ctx]
        mbu[ctx] = {"step_bytes": nbytes, "eager": nbytes / (dense_ms[ctx] * 1e-3) / d2d,
                    "graphed": nbytes / (graphed[ctx] * 1e-3) / d2d if isinstance(graphed[ctx], float) else None}
        for fmt in cfg.formats:
            for r in cfg.residents:
                p = Placement(on_chip=cfg.on_chip, kv_quant=fmt, resident_layers=min(r, nl - cfg.on_chip))
                planned = pinned_store_bytes(model.cfg, p, cap, dtype.itemsize)
                check = device == "cuda" or cfg.host_memory_bytes is not None  # CPU smoke runs: only when asked
                refusal = host_fit_error(planned, cfg, f"the pinned {fmt} store") if check else None
                if refusal is not None:
                    cells.append(_failed(ctx, fmt, r, refusal, planned))
                    continue
                cache = None
                try:
                    cache = make_cache(model, p, 1, cap)
                    fill_cache(model, cache, ctx)
                    before = cache.stats.h2d_bytes
                    runs = decode_ms(model, cache, cfg.steps, cfg.repeats)
                    n_fwd = 2 + cfg.steps * cfg.repeats
                    per_step = (cache.stats.h2d_bytes - before) // n_fwd
                    transfer = per_step / bw * 1e3
                    floor = max(transfer, gpu_floor)
                    ms = statistics.median(runs)
                    cells.append(Cell(ctx, fmt, r, ms, runs, per_step, floor, ms / floor, transfer, gpu_floor,
                                      ms / (transfer + gpu_floor), planned, None, cache.memory_report()))
                    if ctx == max(cfg.contexts) and (fmt, r) in (("none", 0), ("int8", 16)):
                        verify[f"{fmt}_resident{r}"] = statistics.median(
                            decode_ms(model, cache, 2, cfg.repeats, cfg.verify_tokens))
                except Exception as e:  # recorded, and the run goes on: a cell never dies silently
                    cells.append(_failed(ctx, fmt, r, f"failed: {type(e).__name__}: {e}"[:300], planned))
                finally:
                    del cache
                    free_memory()
                if cfg.graphed and cells[-1].error is None:
                    c = cells[-1]
                    try:
                        g_runs, g_bytes, _ = graphed_cell_ms(model, p, cap, ctx, cfg.steps, cfg.repeats)
                        c.graphed_runs_ms, c.graphed_ms = g_runs, statistics.median(g_runs)
                        c.graphed_h2d_bytes_per_step = g_bytes
                        c.graphed_floor_ms = max(g_bytes / bw * 1e3, gpu_floor)
                        c.graphed_ratio = c.graphed_ms / c.graphed_floor_ms
                        if ctx == max(cfg.contexts) and (fmt, r) in (("none", 0), ("int8", 16)):
                            verify[f"{fmt}_resident{r}_graphed"] = statistics.median(graphed_cell_ms(
                                model, p, cap, ctx, 2, cfg.repeats, cfg.verify_tokens)[0])
                    except Exception as e:  # recorded beside the eager numbers, never fatal
                        c.graphed_error = f"failed: {type(e).__name__}: {e}"[:300]
                    finally:
                        free_memory()
        if cfg.hf_reference and device == "cuda":
            need = model.cfg.kv_bytes_per_token(dtype.itemsize) * (ctx + 4096)
            refusal = host_fit_error(need, cfg, "HF's offloaded DynamicCache")
            if refusal is not None:
                hf_ms[ctx] = refusal
            else:
                try:
                    hf_ms[ctx] = hf_offloaded_ms(cfg.shape, ctx, cfg.steps, cfg.repeats)
                except Exception as e:  # reported, not fatal: the reference must not sink our own numbers
                    hf_ms[ctx] = f"failed: {type(e).__name__}: {e}"[:300]
            free_memory()
        if on_context is not None:  # partial results survive a time limit (marked incomplete)
            on_context(_result(cfg, device, bw, d2d, weight_bytes, dense_ms, graphed, mbu, hf_ms, verify, cells,
                               t_start, done=False))
    return _result(cfg, device, bw, d2d, weight_bytes, dense_ms, graphed, mbu, hf_ms, verify, cells, t_start,
                   done=True)


def _result(cfg, device, bw, d2d, weight_bytes, dense_ms, graphed, mbu, hf_ms, verify, cells, t_start,
            done: bool) -> dict:
    out = {
        "bench": "placement", "weights": "random", "shape": cfg.shape, "config": asdict(cfg),
        "device_name": torch.cuda.get_device_name() if device == "cuda" else "cpu (smoke run)",
        "pinned_h2d_GBps": bw / 1e9, "d2d_copy_GBps": d2d / 1e9,
        "weight_bytes": weight_bytes, "all_on_gpu_ms": dense_ms, "all_on_gpu_graphed_ms": graphed,
        "mbu_all_on_gpu": mbu, "hf_offloaded_ms": hf_ms,
        "verify_ms": {"tokens": cfg.verify_tokens, "ctx": max(cfg.contexts), **verify},
        "cells": [asdict(c) for c in cells], "failed_cells": sum(c.error is not None for c in cells),
        "wall_s": time.time() - t_start, "complete": done,
    }
    return out


def _get(d: dict, ctx):
    return d.get(ctx, d.get(str(ctx)))


def _f(x, fmt="{:.2f}") -> str:
    return fmt.format(x) if isinstance(x, float | int) and not isinstance(x, bool) else (x or "NA")


def render_placement(res: dict) -> str:
    lines = [
        f"# Placement benchmark ({res['shape']}, **random weights**, {res['device_name']})"
        + ("" if res.get("complete", True) else " — INCOMPLETE (stopped early)"),
        "",
        f"Measured in this run: pinned H2D {res['pinned_h2d_GBps']:.1f} GB/s; device copy "
        f"{res.get('d2d_copy_GBps', float('nan')):.0f} GB/s (read + written). Transfer floor = offloaded bytes per "
        "step / that H2D bandwidth; GPU floor = the graphed all-on-GPU step at the same context; ratio = ms/token / "
        "max(the two) (perfect overlap), ratio_sum = ms/token / their sum (no overlap).",
        f"on_chip = {res['config']['on_chip']}; decode ms/token is the median over {res['config']['repeats']} "
        f"repeats of {res['config']['steps']} steps.",
        "",
        "| context | kv format | resident | ms/token eager | graphed ms/token | transfer floor ms (eager / graphed) "
        "| GPU floor ms (graphed) | ratio eager | ratio graphed | ratio_sum eager | MB streamed/step (eager / "
        "graphed) | HF offloaded ms |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    failed = []
    for c in res["cells"]:
        if c.get("error"):
            failed.append(c)
            lines.append(f"| {c['ctx']} | {c['fmt']} | {c['resident']} | FAILED | | | | | | | | |")
            continue
        hf = _get(res["hf_offloaded_ms"], c["ctx"])
        gb = c.get("graphed_h2d_bytes_per_step")
        g_tr = gb / (res["pinned_h2d_GBps"] * 1e9) * 1e3 if gb is not None else None
        g_ms = c.get("graphed_ms")
        g_ms = "FAILED" if g_ms is None and c.get("graphed_error") else g_ms
        lines.append(f"| {c['ctx']} | {c['fmt']} | {c['resident']} | {c['ms_per_token']:.2f} | {_f(g_ms)} | "
                     f"{_f(c.get('transfer_floor_ms'))} / {_f(g_tr)} | {_f(c.get('gpu_floor_ms'))} | "
                     f"{c['ratio']:.2f}x | {_f(c.get('graphed_ratio'), '{:.2f}x')} | "
                     f"{_f(c.get('ratio_sum'), '{:.2f}x')} | {c['h2d_bytes_per_step'] / 1e6:.0f} / "
                     f"{_f(gb / 1e6 if gb is not None else None, '{:.0f}')} | {_f(hf)} |")
    lines += ["", "## All-on-GPU steps (MBU = weight + KV bytes read / time / device copy bandwidth)", "",
              "| context | eager ms | graphed ms | MBU eager | MBU graphed |", "|---:|---:|---:|---:|---:|"]
    for ctx, ms in res["all_on_gpu_ms"].items():
        g = _get(res.get("all_on_gpu_graphed_ms", {}), ctx)
        m = _get(res.get("mbu_all_on_gpu", {}), ctx) or {}
        pct = lambda x: f"{100 * x:.0f}%" if isinstance(x, float) else "NA"
        lines.append(f"| {ctx} | {ms:.2f} | {_f(g)} | {pct(m.get('eager'))} | {pct(m.get('graphed'))} |")
    v = res["verify_ms"]
    lines += ["", f"## One verification of {v['tokens']} tokens at {v['ctx']}", "",
              "| KV setup | ms |", "|---|---:|"]
    for k, val in v.items():
        if k not in ("tokens", "ctx"):
            lines.append(f"| {k} | {_f(val)} |")
    g_failed = [c for c in res["cells"] if c.get("graphed_error")]
    if g_failed:
        lines += ["", f"## Graphed timings that failed ({len(g_failed)})", ""]
        lines += [f"- {c['ctx']} / {c['fmt']} / resident {c['resident']}: {c['graphed_error']}" for c in g_failed]
    if failed:
        lines += ["", f"## Failed or refused cells ({len(failed)})", ""]
        lines += [f"- {c['ctx']} / {c['fmt']} / resident {c['resident']}: {c['error']}" for c in failed]
    return "\n".join(lines) + "\n"


def write_placement(res: dict, out_dir: str, command: str) -> Path:
    from ..runs.store import write_bench

    write_bench(out_dir, "placement", res, render_placement, command)
    return Path(out_dir)


# ------------------------------------------------------------------------------------- the bench registry's entry
def run(cfg: PlacementBenchConfig, command: str = "") -> dict:
    """Check every input, then measure; ``placement.json`` and ``summary.md`` are rewritten after each context."""
    cfg.validate()
    res = run_placement_bench(cfg, on_context=lambda r: write_placement(r, cfg.out_dir, command))
    write_placement(res, cfg.out_dir, command)
    return res


def line(res: dict) -> dict:
    keys = ("ctx", "fmt", "resident", "ms_per_token", "floor_ms", "ratio", "graphed_ms", "graphed_ratio")
    return {"bench": "placement", "cells": [{k: c[k] for k in keys} for c in res["cells"]],
            "hf_offloaded_ms": res["hf_offloaded_ms"], "verify_ms": res["verify_ms"]}
