"""``mspeckv bench placement``: decode ms/token of KV placements against floors measured in the same run.

For each (context, kv format, resident layers) cell:
    transfer floor = offloaded bytes per step / pinned H2D bandwidth (measured here)
    GPU floor      = the GRAPHED all-on-GPU decode step at the same context (StaticKV + GraphedForward, as
                     ``decoding.autoregressive`` runs it; eager on the CPU)
    ratio          = measured ms/token / max(transfer floor, GPU floor)   (perfect overlap of copies and compute)
    ratio_sum      = measured ms/token / (transfer floor + GPU floor)      (no overlap at all)
Each cell is timed eagerly (``make_cache(p)``: the host drives every layer) and graphed (``make_cache(p,
graphs=True)``: the static PlacedKV layout, one CUDA graph per step), each on a freshly filled cache;
``graphed_ratio`` is the graphed step over the same floor, whose transfer part counts the store's rows rounded up to
the copy bucket (``COPY_BLOCK`` tokens) as the graphed step copies them. The all-on-GPU steps (eager and graphed)
also report their MBU: (weight bytes + KV bytes read) / time against the device copy bandwidth measured in the same
run (bytes read + written).
Host memory: pinned memory is freed between cells; a cell whose pinned store (or HF's offloaded cache) would not fit
in MemAvailable (or ``host_memory_bytes``) is refused up front, and a cell that raises is recorded as failed too;
the run goes on with the next cell.
Random bf16 weights at a named shape (default: Llama-2-7B-128K), KV filled with random K/V through the cache's own
write path: pure transfer and kernel timing on the real placement code, labelled so. The same command times
transformers' ``DynamicCache(offloading=True)`` (what a user has today) and one 9-token verification (gamma=8) at
the longest context.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field

import torch

from ..cache import make_cache
from ..kv.dense import DenseKV
from ..kv.placement import FORMATS, Placement
from ..model.api import RANDOM_SHAPES, random_model
from ..runs.checks import out_dir
from ..runs.harness import (  # noqa: F401 (mem_available, pinned_store_bytes: this bench's names since it has them)
    d2d_bandwidth,
    device_name,
    failure,
    free_memory,
    h2d_bandwidth,
    host_refusal,
    mem_available,
    pick,
    pinned_store_bytes,
)
from ..runs.store import write_bench
from ..runs.tables import md_table
from ..runs.template import check_fields, opt
from .steps import decode_ms, fill_cache, graphed_ms, step_runs


@dataclass(frozen=True)
class PlacementBenchConfig:
    shape: str = opt("llama-2-7b-128k", "random-weight shape", choices=sorted(RANDOM_SHAPES))
    contexts: tuple[int, ...] = opt((8192, 16384, 32768), "contexts (tokens in the cache)", lo=1)
    on_chip: int = opt(16, "layers whose KV stays on the GPU; the rest are offloaded", lo=0)
    formats: tuple[str, ...] = opt(("none", "int8", "int4"), "offloaded KV formats", choices=FORMATS)
    residents: tuple[int, ...] = opt((0, 16), "resident-layer counts", lo=0)
    steps: int = opt(8, "timed decode steps per repeat", lo=1)
    # the median over repeats is reported
    repeats: int = opt(3, "repeats (the median is reported; each the mean of --steps)", lo=2)
    verify_tokens: int = opt(9, "tokens of the timed verification", cli=False, lo=1)
    hf_reference: bool = opt(True, "skip the transformers offloaded reference", flag="--no-hf", negate=True)
    # also time each cell on the static layout with CUDA graphs
    graphed: bool = opt(True, "skip the graphed (static-layout) timing of each cell", flag="--no-graphs", negate=True)
    out_dir: str = opt("results/placement", "output folder", aliases=("--output-dir",))
    # None: MemAvailable from /proc/meminfo before each cell
    host_memory_bytes: int | None = opt(None, "host memory a pinned store may use", cli=False)
    # left free for everything else when checking that a pinned store fits
    host_reserve_bytes: int = opt(4 << 30, "host memory left free", cli=False)

    def __post_init__(self):
        check_fields(self)

    def validate(self) -> None:
        """The output folder can be made (checked before the model is built)."""
        out_dir("--out-dir", self.out_dir)


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

        return statistics.median(step_runs(step, steps, repeats))


@dataclass
class Cell:
    ctx: int
    fmt: str
    resident: int
    ms_per_token: float | None = None
    runs_ms: list = field(default_factory=list)
    h2d_bytes_per_step: int | None = None
    floor_ms: float | None = None  # max(transfer floor, graphed GPU floor)
    ratio: float | None = None  # ms_per_token / floor_ms
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


def _attempt(fn, *args):
    """``fn(*args)``, or the failure text of what it raised (recorded; the run goes on with the next cell), memory
    freed after either."""
    try:
        return fn(*args)
    except Exception as e:
        return failure(e)
    finally:
        free_memory()


def _gpu_floor(model, cfg, ctx: int, graphed: dict, verify: dict) -> None:
    """The GPU floor: the graphed all-on-GPU step (and its verification at the longest context)."""
    graphed[ctx] = statistics.median(graphed_ms(model, ctx, cfg.steps, cfg.repeats)[0])
    if ctx == max(cfg.contexts):
        verify["all_on_gpu_graphed"] = statistics.median(graphed_ms(model, ctx, 2, cfg.repeats, cfg.verify_tokens)[0])


def _eager_cell(model, cfg, p: Placement, cap: int, ctx: int, fmt: str, r: int, bw: float, gpu_floor: float,
                planned: int, verify: dict) -> Cell:
    cache = make_cache(model, p, 1, cap)
    fill_cache(model, cache, ctx)
    before = cache.stats.h2d_bytes
    runs = decode_ms(model, cache, cfg.steps, cfg.repeats)
    per_step = (cache.stats.h2d_bytes - before) // (2 + cfg.steps * cfg.repeats)
    transfer = per_step / bw * 1e3
    floor, ms = max(transfer, gpu_floor), statistics.median(runs)
    if ctx == max(cfg.contexts) and (fmt, r) in VERIFIED:
        verify[f"{fmt}_resident{r}"] = statistics.median(decode_ms(model, cache, 2, cfg.repeats, cfg.verify_tokens))
    return Cell(ctx, fmt, r, ms, runs, per_step, floor, ms / floor, transfer, gpu_floor, ms / (transfer + gpu_floor),
                planned, None, cache.memory_report())


def _graphed_cell(model, cfg, c: Cell, p: Placement, cap: int, bw: float, verify: dict) -> None:
    runs, per_step, _ = graphed_ms(model, c.ctx, cfg.steps, cfg.repeats, placement=p, capacity=cap)
    c.graphed_runs_ms, c.graphed_ms, c.graphed_h2d_bytes_per_step = runs, statistics.median(runs), per_step
    c.graphed_floor_ms = max(per_step / bw * 1e3, c.gpu_floor_ms)
    c.graphed_ratio = c.graphed_ms / c.graphed_floor_ms
    if c.ctx == max(cfg.contexts) and (c.fmt, c.resident) in VERIFIED:
        verify[f"{c.fmt}_resident{c.resident}_graphed"] = statistics.median(graphed_ms(
            model, c.ctx, 2, cfg.repeats, cfg.verify_tokens, placement=p, capacity=cap)[0])


VERIFIED = (("none", 0), ("int8", 16))  # the cells whose verification is timed too, at the longest context


def run_placement_bench(cfg: PlacementBenchConfig, device: str = "cuda", on_context=None) -> dict:
    """``device='cpu'`` is for smoke tests only (tiny shapes); published numbers come from CUDA."""
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("bench placement needs a CUDA GPU (it times pinned transfers and copy streams)")
    t_start = time.time()
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = random_model(cfg.shape, device, dtype)
    nl = model.cfg.n_layers
    res = {"bench": "placement", "weights": "random", "shape": cfg.shape, "config": asdict(cfg),
           "device_name": device_name(device, cpu="cpu (smoke run)"), "pinned_h2d_GBps": h2d_bandwidth() / 1e9,
           "d2d_copy_GBps": d2d_bandwidth() / 1e9,
           "weight_bytes": sum(p.numel() * p.element_size() for p in model.parameters()), "all_on_gpu_ms": {},
           "all_on_gpu_graphed_ms": {}, "mbu_all_on_gpu": {}, "hf_offloaded_ms": {},
           "verify_ms": {"tokens": cfg.verify_tokens, "ctx": max(cfg.contexts)}, "cells": []}
    free_memory()
    bw, d2d, verify, cells = res["pinned_h2d_GBps"] * 1e9, res["d2d_copy_GBps"] * 1e9, res["verify_ms"], []
    dense_ms, graphed = res["all_on_gpu_ms"], res["all_on_gpu_graphed_ms"]
    reserve = (cfg.host_reserve_bytes, cfg.host_memory_bytes)  # host memory fits MemAvailable (or the given) minus it
    for ctx in cfg.contexts:
        cap = ctx + cfg.steps * 4 + 64
        dense = DenseKV.for_model(model, 1, cap)
        fill_cache(model, dense, ctx)
        dense_ms[ctx] = statistics.median(decode_ms(model, dense, cfg.steps, cfg.repeats))
        if ctx == max(cfg.contexts):
            verify["all_on_gpu"] = statistics.median(decode_ms(model, dense, 2, cfg.repeats, cfg.verify_tokens))
        del dense
        free_memory()
        if (err := _attempt(_gpu_floor, model, cfg, ctx, graphed, verify)) is not None:  # the eager step stands in
            graphed[ctx] = err
        # MBU: an all-on-GPU step reads every weight once and every layer's K and V at ctx
        nbytes = res["weight_bytes"] + model.cfg.kv_bytes_per_token(dtype.itemsize) * ctx
        ok = isinstance(graphed[ctx], float)
        gpu_floor = graphed[ctx] if ok else dense_ms[ctx]
        res["mbu_all_on_gpu"][ctx] = {"step_bytes": nbytes,
                                      "eager": nbytes / (dense_ms[ctx] * 1e-3) / d2d,
                                      "graphed": nbytes / (graphed[ctx] * 1e-3) / d2d if ok else None}
        for fmt in cfg.formats:
            for r in cfg.residents:
                p = Placement(on_chip=cfg.on_chip, kv_quant=fmt, resident_layers=min(r, nl - cfg.on_chip))
                planned = pinned_store_bytes(model.cfg, p, cap, dtype.itemsize)
                check = device == "cuda" or cfg.host_memory_bytes is not None  # CPU smoke runs: only when asked
                refusal = host_refusal(planned, f"the pinned {fmt} store", *reserve) if check else None
                cell = refusal or _attempt(_eager_cell, model, cfg, p, cap, ctx, fmt, r, bw, gpu_floor, planned, verify)
                if isinstance(cell, str):  # refused or failed: recorded, and the run goes on
                    cells.append(Cell(ctx, fmt, r, pinned_bytes_planned=planned, error=cell))
                    continue
                cells.append(cell)
                if cfg.graphed:  # recorded beside the eager numbers, never fatal
                    cell.graphed_error = _attempt(_graphed_cell, model, cfg, cell, p, cap, bw, verify)
        if cfg.hf_reference and device == "cuda":  # a failed reference must not sink our own numbers
            need = model.cfg.kv_bytes_per_token(dtype.itemsize) * (ctx + 4096)
            res["hf_offloaded_ms"][ctx] = (host_refusal(need, "HF's offloaded DynamicCache", *reserve) or
                                           _attempt(hf_offloaded_ms, cfg.shape, ctx, cfg.steps, cfg.repeats))
        res |= {"cells": [asdict(c) for c in cells], "failed_cells": sum(c.error is not None for c in cells),
                "wall_s": time.time() - t_start, "complete": ctx == cfg.contexts[-1]}
        if on_context is not None and not res["complete"]:  # partial results survive a time limit (incomplete)
            on_context(dict(res))
    return res


def _get(d: dict, ctx):
    return d.get(ctx, d.get(str(ctx)))


def _f(x, fmt="{:.2f}") -> str:
    return fmt.format(x) if isinstance(x, float | int) and not isinstance(x, bool) else (x or "NA")


def render_placement(res: dict) -> str:
    head = [f"# Placement benchmark ({res['shape']}, **random weights**, {res['device_name']})"
            + ("" if res.get("complete", True) else " — INCOMPLETE (stopped early)"), "",
            f"Measured in this run: pinned H2D {res['pinned_h2d_GBps']:.1f} GB/s; device copy "
            f"{res.get('d2d_copy_GBps', float('nan')):.0f} GB/s (read + written). Transfer floor = offloaded bytes per "
            "step / that H2D bandwidth; GPU floor = the graphed all-on-GPU step at the same context; ratio = ms/token "
            "/ max(the two) (perfect overlap), ratio_sum = ms/token / their sum (no overlap).",
            f"on_chip = {res['config']['on_chip']}; decode ms/token is the median over {res['config']['repeats']} "
            f"repeats of {res['config']['steps']} steps.", ""]
    cols = ["context", "kv format", "resident", "ms/token eager", "graphed ms/token",
            "transfer floor ms (eager / graphed)", "GPU floor ms (graphed)", "ratio eager", "ratio graphed",
            "ratio_sum eager", "MB streamed/step (eager / graphed)", "HF offloaded ms"]
    rows, failed = [], [c for c in res["cells"] if c.get("error")]
    for c in res["cells"]:
        if c.get("error"):
            rows.append(f"| {c['ctx']} | {c['fmt']} | {c['resident']} | FAILED | | | | | | | | |")
            continue
        gb = c.get("graphed_h2d_bytes_per_step")
        g_tr = gb / (res["pinned_h2d_GBps"] * 1e9) * 1e3 if gb is not None else None
        g_ms = "FAILED" if c.get("graphed_ms") is None and c.get("graphed_error") else c.get("graphed_ms")
        rows.append([c["ctx"], c["fmt"], c["resident"], f"{c['ms_per_token']:.2f}", _f(g_ms),
                     f"{_f(c.get('transfer_floor_ms'))} / {_f(g_tr)}", _f(c.get("gpu_floor_ms")), f"{c['ratio']:.2f}x",
                     _f(c.get("graphed_ratio"), "{:.2f}x"), _f(c.get("ratio_sum"), "{:.2f}x"),
                     f"{c['h2d_bytes_per_step'] / 1e6:.0f} / {_f(gb / 1e6 if gb is not None else None, '{:.0f}')}",
                     _f(_get(res["hf_offloaded_ms"], c["ctx"]))])
    pct = lambda x: f"{100 * x:.0f}%" if isinstance(x, float) else "NA"  # noqa: E731
    mbu = [[ctx, f"{ms:.2f}", _f(_get(res.get("all_on_gpu_graphed_ms", {}), ctx)), pct(m.get("eager")),
            pct(m.get("graphed"))] for ctx, ms in res["all_on_gpu_ms"].items()
           for m in [_get(res.get("mbu_all_on_gpu", {}), ctx) or {}]]
    v = res["verify_ms"]
    lines = [*head, md_table(cols, rows, "rlrrrrrrrrrr"), "",
             "## All-on-GPU steps (MBU = weight + KV bytes read / time / device copy bandwidth)", "",
             md_table(["context", "eager ms", "graphed ms", "MBU eager", "MBU graphed"], mbu, "rrrrr"), "",
             f"## One verification of {v['tokens']} tokens at {v['ctx']}", "",
             md_table(["KV setup", "ms"], [[k, _f(x)] for k, x in v.items() if k not in ("tokens", "ctx")], "lr")]
    g_failed = [c for c in res["cells"] if c.get("graphed_error")]
    for title, cs, key in ((f"## Graphed timings that failed ({len(g_failed)})", g_failed, "graphed_error"),
                           (f"## Failed or refused cells ({len(failed)})", failed, "error")):
        if cs:
            lines += ["", title, "", *(f"- {c['ctx']} / {c['fmt']} / resident {c['resident']}: {c[key]}" for c in cs)]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------- the bench registry's entry
def run(cfg: PlacementBenchConfig, command: str = "") -> dict:
    """Check every input, then measure; ``placement.json`` and ``summary.md`` are rewritten after each context."""
    cfg.validate()
    save = lambda r: write_bench(cfg.out_dir, "placement", r, render_placement, command)  # noqa: E731
    res = run_placement_bench(cfg, on_context=save)
    save(res)
    return res


def line(res: dict) -> dict:
    keys = ("ctx", "fmt", "resident", "ms_per_token", "floor_ms", "ratio", "graphed_ms", "graphed_ratio")
    return {"bench": "placement", "cells": pick(res["cells"], keys),
            "hf_offloaded_ms": res["hf_offloaded_ms"], "verify_ms": res["verify_ms"]}
