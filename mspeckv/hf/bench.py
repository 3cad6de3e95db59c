"""``mspeckv bench hf``: transformers' own ``generate`` over our cache (``mspeckv.hf.MSpecKVCache``) against
transformers' caches, on a real prompt.

Caches compared (each at every context):

- ``dynamic``: ``DynamicCache`` with every layer on the GPU (what a user whose KV fits runs);
- ``dynamic_offload``: ``DynamicCache(offloading=True)``, transformers' offloaded cache (bf16, every layer but the
  one in use on the CPU, prefetched one layer ahead);
- ``int8_offload``: ``MSpecKVCache(Placement(on_chip=0, kv_quant="int8"))``: every layer's KV int8 in pinned memory;
- ``int8_offload_resident``: the same with ``--resident-layers`` offloaded layers also kept on the GPU (static
  policy, bf16 copies).

Per (context, cache), after one untimed warm-up ``generate`` of the same prompt, ``repeats`` timed runs, each:

- ``ttft_s``: ``generate(max_new_tokens=1)`` (prefill + first token);
- ``total_s``: ``generate(max_new_tokens=gen_len, min_new_tokens=gen_len)``, greedy, so every run makes the same
  number of tokens; ``decode_ms`` = 1e3 * (total - ttft) / (gen_len - 1) and ``tok_per_s`` its inverse;
- ``setup_s``: building the cache before that ``generate`` (ours allocates its pinned store there); ``e2e_s`` =
  setup + total, and ``e2e_tok_per_s`` = gen_len / e2e_s;
- ``peak_gpu_mb``: ``max_memory_allocated`` over the full ``generate`` (weights included), after a reset.

The per-step breakdown (``forward_ms``) times the model's forward alone, one token at a time through the same cache
after a prefill, with CUDA events (median over ``gen_len`` steps); ``generate_overhead_ms`` = decode_ms -
forward_ms is what ``generate`` adds per token (logits processing, stopping criteria, bookkeeping). For our cache the
host-to-device bytes per step come from the cache's own transfer counter; ``h2d_floor_ms`` = those bytes / the pinned
H2D bandwidth measured in the same run. For ``dynamic_offload`` the bytes are the bf16 KV of every layer (what it
prefetches each step), a lower bound on its traffic. Times are medians of the repeats; every repeat is kept.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass

import torch

from .. import validate as v
from ..runs.harness import (
    check_contexts,
    device_name,
    e2e,
    fmt,
    median_of,
    peak_bytes,
    pick,
    repeat,
    reset_peak,
    time_ms,
    wall,
)
from ..runs.template import opt

CACHES = ("dynamic", "dynamic_offload", "int8_offload", "int8_offload_resident")


@dataclass(frozen=True)
class HFBenchConfig:
    model: str = opt("qwen2.5-coder-1.5b", "embedded name, HF directory or hub id (transformers loads it)")
    contexts: tuple[int, ...] = opt((8192, 32704), "contexts (prompt lengths)")
    caches: tuple[str, ...] = opt(CACHES, "caches to compare", choices=CACHES)
    gen_len: int = opt(64, "generated tokens per run")
    repeats: int = opt(2, "timed runs after one warm-up (the median is reported)")
    resident_layers: int = opt(14, "int8_offload_resident: offloaded layers also kept on the GPU")
    kv_group_size: int = opt(64, "int8 quantization group size")
    device: str | None = opt(None, "cpu | cuda (default: cuda if available)")
    out_dir: str = opt("results/hf", "output folder", aliases=("--output-dir",))

    def __post_init__(self):
        v.integer("gen_len", self.gen_len, lo=2)  # decode time needs tokens after the first
        v.integer("repeats", self.repeats, lo=2)  # the median over repeats is reported
        v.integer("resident_layers", self.resident_layers, lo=1)
        v.integer("kv_group_size", self.kv_group_size, lo=1)
        v.integers("contexts", self.contexts, lo=16)
        v.choices("caches", self.caches, CACHES)

    def validate(self) -> None:
        """What can be refused before the weights load: the device, the output folder, the model's maximum
        context."""
        from ..model.api import model_config
        from ..runs.checks import out_dir

        _check_device(self)
        out_dir("--out-dir", self.out_dir)
        check_contexts(self.contexts, self.gen_len, model_config(self.model).max_position, self.model)


def _check_device(cfg: HFBenchConfig) -> torch.device:
    from ..model.api import parse_device

    dev = parse_device(cfg.device)
    if dev.type != "cuda" and "dynamic_offload" in cfg.caches:
        raise ValueError("dynamic_offload is transformers' CUDA offloading and needs a GPU; on the CPU pass "
                         "--caches dynamic,int8_offload,int8_offload_resident")
    return dev


def make_hf_cache(kind: str, model, cfg: HFBenchConfig, max_len: int):
    """A fresh cache of ``kind`` for one ``generate``."""
    from transformers import DynamicCache

    from ..kv.placement import Placement
    from .cache import MSpecKVCache

    if kind == "dynamic":
        return DynamicCache(config=model.config)
    if kind == "dynamic_offload":
        return DynamicCache(config=model.config, offloading=True)
    resident = cfg.resident_layers if kind == "int8_offload_resident" else 0
    placement = Placement(on_chip=0, kv_quant="int8", kv_group_size=cfg.kv_group_size, resident_layers=resident,
                          resident_policy="static")
    return MSpecKVCache(model, placement=placement, max_len=max_len)


def _report(cache) -> dict:
    """Our cache's memory report; transformers' caches keep none."""
    from .cache import MSpecKVCache

    return cache.memory_report() if isinstance(cache, MSpecKVCache) else {}


@torch.inference_mode()
def _cell(model, ids: torch.Tensor, kind: str, cfg: HFBenchConfig, dev: torch.device, bw: float) -> dict:
    from .cache import cache_argument

    arg = cache_argument(model)
    max_len = ids.shape[1] + cfg.gen_len
    common = dict(attention_mask=torch.ones_like(ids), do_sample=False, eos_token_id=None,
                  pad_token_id=model.generation_config.pad_token_id or 0)

    def gen(n: int) -> tuple[float, float]:
        """(seconds of ``generate``, seconds building its cache before it)."""
        cache, setup = wall(dev, lambda: make_hf_cache(kind, model, cfg, max_len))
        out, secs = wall(dev, lambda: model.generate(ids, max_new_tokens=n, min_new_tokens=n, **{arg: cache},
                                                     **common))
        if out.shape[1] - ids.shape[1] != n:
            raise RuntimeError(f"{kind}: generate made {out.shape[1] - ids.shape[1]} tokens, asked for {n}")
        return secs, setup

    def run() -> dict:
        ttft, _ = gen(1)
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        reset_peak(dev)
        total, setup = gen(cfg.gen_len)
        pk = peak_bytes(dev)
        return {"ttft_s": ttft, "total_s": total, "decode_ms": 1e3 * (total - ttft) / (cfg.gen_len - 1),
                "peak_gpu_mb": pk / 2**20 if pk is not None else None, "setup_s": setup, "e2e_s": setup + total}

    gen(min(8, cfg.gen_len))  # warm-up at the same prompt shape
    runs = repeat(run, cfg.repeats, warmup=0)

    # per-step breakdown: the forward alone, one token at a time, through a cache holding the prompt
    cache = make_hf_cache(kind, model, cfg, max_len)
    out = model(ids, **{arg: cache}, logits_to_keep=1)
    tok = out.logits[:, -1:].argmax(-1)
    before = _report(cache).get("h2d_bytes_total")

    def step():
        nonlocal tok
        tok = model(tok, **{arg: cache}, logits_to_keep=1).logits[:, -1:].argmax(-1)

    step_ms = [time_ms(step, 0, 1, cuda=dev.type == "cuda") for _ in range(cfg.gen_len - 1)]
    after = _report(cache).get("h2d_bytes_total")
    if kind == "dynamic_offload":  # every layer's bf16 K and V come back each step (a lower bound on its traffic)
        c = model.config
        hd = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        h2d_step = 2 * c.num_hidden_layers * c.num_key_value_heads * hd * model.dtype.itemsize * max_len
    elif before is not None and after is not None:
        h2d_step = (after - before) / (cfg.gen_len - 1)
    else:
        h2d_step = 0
    mem = _report(cache)
    med = median_of(runs, "ttft_s", "decode_ms", "setup_s", "e2e_s")
    decode_ms, forward_ms = med["decode_ms"], statistics.median(step_ms)
    return {"ttft_s": med["ttft_s"], "decode_ms": decode_ms, "tok_per_s": 1e3 / decode_ms,
            **e2e(med["setup_s"], med["ttft_s"], 0.0, cfg.gen_len, e2e_s=med["e2e_s"]),
            "peak_gpu_mb": max((r["peak_gpu_mb"] or 0) for r in runs) if dev.type == "cuda" else None,
            "forward_ms": forward_ms, "generate_overhead_ms": decode_ms - forward_ms,
            "h2d_bytes_per_step": h2d_step, "h2d_floor_ms": 1e3 * h2d_step / bw if h2d_step else 0.0,
            "cache_report": mem, "runs": runs, "forward_ms_steps": step_ms}


def run_hf_bench(cfg: HFBenchConfig) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..bench.placement import h2d_bandwidth
    from ..data.corpora import long_prompt
    from ..model.api import default_dtype
    from ..model.loading import resolve
    from ..runs.store import run_metadata

    dev = _check_device(cfg)
    d = resolve(cfg.model)
    model, load_s = wall(dev, lambda: AutoModelForCausalLM.from_pretrained(str(d), dtype=default_dtype(dev))
                         .to(dev).eval())
    check_contexts(cfg.contexts, cfg.gen_len, model.config.max_position_embeddings, cfg.model)
    tok = AutoTokenizer.from_pretrained(str(d))
    bw = h2d_bandwidth()
    rows = []
    print(HEADER, flush=True)
    for ctx in cfg.contexts:
        ids = torch.tensor([long_prompt(tok, ctx, seed=0)], device=dev)
        base = None
        for kind in cfg.caches:
            r = {"context": ctx, "cache": kind, **_cell(model, ids, kind, cfg, dev, bw)}
            if kind == "dynamic_offload":
                base = r
            rows.append(r)
        for r in rows:
            if r["context"] == ctx:
                r["speedup_vs_dynamic_offload"] = base["decode_ms"] / r["decode_ms"] if base else None
                print(_line(r), flush=True)
    return {"bench": "hf", "config": asdict(cfg), "rows": rows, "pinned_h2d_GBps": bw / 1e9,
            "device": device_name(dev), "dtype": str(model.dtype), "model_load_s": load_s,
            "model_class": type(model).__name__, "meta": run_metadata()}


def _line(r: dict) -> str:
    _f = lambda x, spec: fmt(x, spec, na="")  # noqa: E731
    return (f"| {r['context']} | {r['cache']} | {r['tok_per_s']:.1f} | {_f(r.get('e2e_tok_per_s'), '{:.1f}')} | "
            f"{r['decode_ms']:.2f} | "
            f"{r['forward_ms']:.2f} | {r['generate_overhead_ms']:.2f} | {r['h2d_bytes_per_step'] / 1e6:.1f} | "
            f"{r['h2d_floor_ms']:.2f} | {r['ttft_s'] * 1e3:.0f} | {_f(r['peak_gpu_mb'], '{:.0f}')} | "
            f"{_f(r.get('speedup_vs_dynamic_offload'), '{:.2f}x')} |")


HEADER = ("| context | cache | decode tok/s | e2e tok/s | decode ms/token | forward ms | generate overhead ms | "
          "H2D MB/step | H2D floor ms | TTFT ms | peak GPU MB | vs dynamic_offload |\n"
          "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")


def render(res: dict) -> str:
    c = res["config"]
    meta = res["meta"]
    return "\n".join([
        f"# transformers generate with each cache: {c['model']} ({res['model_class']}, {res['device']}, "
        f"{res['dtype']})", "",
        f"- commit: {meta.get('git_commit')}; torch {meta.get('torch')}, transformers {meta.get('transformers')}",
        f"- greedy, {c['gen_len']} new tokens, median of {c['repeats']} runs after a warm-up; pinned H2D measured "
        f"in this run: {res['pinned_h2d_GBps']:.1f} GB/s",
        f"- int8_offload_resident keeps {c['resident_layers']} of the offloaded layers on the GPU (static policy)",
        "", HEADER, *(_line(r) for r in res["rows"]), ""])


# ------------------------------------------------------------------------------------- the bench registry's entry
def run(cfg: HFBenchConfig, command: str = "") -> dict:
    """Check every input, then measure; writes ``hf.json`` and ``summary.md`` (with the command) into
    ``cfg.out_dir``."""
    from ..runs.store import write_bench

    cfg.validate()
    return write_bench(cfg.out_dir, "hf", run_hf_bench(cfg), render, command, meta=False)  # it has its meta


def line(res: dict) -> dict:
    keys = ("context", "cache", "tok_per_s", "e2e_tok_per_s", "peak_gpu_mb", "speedup_vs_dynamic_offload")
    return {"bench": "hf", "rows": pick(res["rows"], keys)}
