"""``mspeckv bench presses``: what each press costs and saves, measured on a real prompt.

Per (context, press), after one warm-up of the same shape, median of ``repeats`` runs:
- ``prefill_s``: chunked prefill into the uncompressed cache (the same for every press);
- ``compress_s``: ``cache.compress()`` alone (scoring, selection, quantization or projection);
- ``ttft_overhead``: compress_s / the uncompressed prefill_s (goal: <= 0.10 at 32K);
- ``decode_ms``: ms per decoded token, greedy, eager, through the compressed cache (the ``none`` row decodes through
  the uncompressed cache the same way, so the two are comparable);
- bytes: ``bytes_per_token`` of the stores, ``compression`` against the uncompressed bytes per token, ``kv_mb``
  everything the cache holds after compress (stores, tail buffer, scratch), and the peak GPU memory of the cell.
- end to end: ``setup_s`` builds the cache, ``e2e_s`` = setup + prefill + compress + decode, ``e2e_tok_s`` the
  decoded tokens over it (beside ``decode_tok_s``, the decode alone).
Times are wall clock around CUDA-synchronised regions (``runs.harness.wall``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from ..model.api import load, model_config, parse_device
from ..runs.checks import out_dir
from ..runs.harness import check_contexts, device_name, e2e, fmt, median_of, peak_bytes, pick, repeat, reset_peak, wall
from ..runs.store import write_bench
from ..runs.template import check_fields, opt

PRESS_DEFAULTS = ("none", "streaming:budget=0.25", "snapkv:budget=0.25", "h2o:budget=0.25", "pyramidkv:budget=0.25",
                  "adakv:budget=0.25", "kivi:k_bits=8,v_bits=8", "kivi:k_bits=4,v_bits=4", "kivi:k_bits=2,v_bits=2",
                  "conservative", "aggressive", "extreme")


@dataclass(frozen=True)
class PressBenchConfig:
    model: str = opt("qwen2.5-coder-1.5b", "embedded name, HF directory, .gguf file or hub id")
    contexts: tuple[int, ...] = opt((8192, 32768 - 64), "contexts (prompt lengths)", lo=64)
    presses: tuple[str, ...] = opt(PRESS_DEFAULTS, "';'-separated press specs (default: every family and preset; "
                                                   "'none' is the uncompressed baseline)", sep=";")
    gen_len: int = opt(64, "decoded tokens per run", lo=1)
    repeats: int = opt(2, "timed runs after one warm-up (the median is reported)", lo=1)
    device: str | None = opt(None, "cpu | cuda (default: cuda if available)")
    prefill_chunk: int = opt(4096, "tokens per prefill forward", lo=1)
    out_dir: str = opt("results/presses", "output folder", aliases=("--output-dir",))

    def __post_init__(self):
        from ..presses import parse_press

        check_fields(self)
        if not self.presses:
            raise ValueError("--presses is empty; give ';'-separated press specs, e.g. --presses 'none;snapkv'")
        if len(set(self.presses)) != len(self.presses):
            raise ValueError(f"--presses {';'.join(self.presses)} repeats a spec")
        for p in self.presses:
            parse_press(p, "--presses")  # a bad spec fails before the model loads

    def validate(self) -> None:
        """What can be refused before the weights load: the output folder, and the model's maximum context."""
        out_dir("--out-dir", self.out_dir)
        check_contexts(self.contexts, self.gen_len, model_config(self.model).max_position, self.model)


@torch.inference_mode()
def _run(model, ids, press, cfg, dev) -> dict:
    """One request through a fresh pressed cache: build, prefill, compress, greedy decode (each region timed)."""
    from ..cache import make_cache

    if dev.type == "cuda":
        torch.cuda.empty_cache()
    reset_peak(dev)
    t = {}
    cache, t["setup_s"] = wall(dev, lambda: make_cache(model, None, 1, ids.shape[1] + cfg.gen_len, press=press,
                                                       tail=cfg.gen_len + 8))
    logits, t["prefill_s"] = wall(dev, lambda: model.prefill(ids, cache, chunk=cfg.prefill_chunk))
    _, t["compress_s"] = wall(dev, cache.compress)

    def decode():
        tok = logits.argmax(-1, keepdim=True)
        for _ in range(cfg.gen_len):
            tok = model(tok, cache)[:, -1].argmax(-1, keepdim=True)

    _, decode_s = wall(dev, decode)
    pk = peak_bytes(dev)
    return {**t, "decode_ms": 1e3 * decode_s / cfg.gen_len, "peak_gpu_mb": pk / 2**20 if pk is not None else None,
            "report": cache.memory_report(), **e2e(t["setup_s"], t["prefill_s"] + t["compress_s"], decode_s,
                                                  cfg.gen_len)}


def _cell(model, ids, press, cfg, dev) -> dict:
    timed = repeat(lambda: _run(model, ids, press, cfg, dev), cfg.repeats)  # after one warm-up
    med = median_of(timed, "prefill_s", "compress_s", "decode_ms", "setup_s", "e2e_s")
    rep = timed[-1]["report"]
    full_bpt = 2 * model.cfg.n_layers * model.cfg.n_kv_heads * model.cfg.head_dim * model.dtype.itemsize
    bpt = rep.get("bytes_per_token", full_bpt)
    kv_bytes = rep.get("kv_bytes", full_bpt * (ids.shape[1] + cfg.gen_len))
    return {**med, "decode_tok_s": 1e3 / med["decode_ms"], "e2e_tok_s": cfg.gen_len / med["e2e_s"],
            "decode_ms_runs": [r["decode_ms"] for r in timed], "compress_s_runs": [r["compress_s"] for r in timed],
            "peak_gpu_mb": timed[-1]["peak_gpu_mb"],
            "bytes_per_token": bpt, "full_bytes_per_token": full_bpt, "compression": full_bpt / bpt,
            "kv_mb": kv_bytes / 2**20, "report": rep}


def run_press_bench(cfg: PressBenchConfig) -> dict:
    from ..data.corpora import long_prompt
    from ..presses import parse_press

    dev = parse_device(cfg.device)
    (model, tok, _), load_s = wall(dev, lambda: load(cfg.model, dev))
    rows = []
    for ctx in cfg.contexts:
        model.check_context(ctx + cfg.gen_len)
        ids = torch.tensor([long_prompt(tok, ctx, seed=0)], device=dev)
        base = None
        for spec in cfg.presses:
            press = parse_press(spec)
            r = _cell(model, ids, press, cfg, dev)
            if press is None:
                base = r
            r = {"context": ctx, "press": spec, "press_spec": str(press) if press else "none", **r}
            if base is not None:
                r["ttft_overhead"] = r["compress_s"] / base["prefill_s"]
                r["decode_vs_full"] = r["decode_ms"] / base["decode_ms"]
            rows.append(r)
            print(_line(r), flush=True)
    return {"config": asdict(cfg), "rows": rows, "device": device_name(dev), "dtype": str(model.dtype),
            "model_load_s": load_s}


def _line(r: dict) -> str:
    ov = r.get("ttft_overhead")
    vs = r.get("decode_vs_full")
    return (f"| {r['context']} | {r['press']} | {r['compression']:.2f}x | {r['bytes_per_token']:.0f} | "
            f"{r['kv_mb']:.1f} | {r['prefill_s'] * 1e3:.0f} | {r['compress_s'] * 1e3:.1f} | "
            f"{'' if ov is None else f'{100 * ov:.1f}%'} | {r['decode_ms']:.2f} | "
            f"{'' if vs is None else f'{vs:.2f}'} | {fmt(r.get('e2e_tok_s'), '{:.1f}', '')} | "
            f"{r['peak_gpu_mb'] or 0:.0f} |")


HEADER = ("| context | press | compression | bytes/token | KV MB after compress | prefill ms | compress ms | "
          "compress / prefill | decode ms/token | decode vs none | e2e tok/s | peak GPU MB |\n"
          "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")


def render_press_bench(res: dict) -> str:
    return "\n".join([f"# Presses on {res['config']['model']} ({res['device']}, {res['dtype']})", "", HEADER,
                      *(_line(r) for r in res["rows"])]) + "\n"


# ------------------------------------------------------------------------------------- the bench registry's entry
def run(cfg: PressBenchConfig, command: str = "") -> dict:
    """Check every input, then measure; writes ``presses.json`` and ``summary.md`` into ``cfg.out_dir``."""
    cfg.validate()
    return write_bench(cfg.out_dir, "presses", run_press_bench(cfg), render_press_bench, command)


def line(res: dict) -> dict:
    keys = ("context", "press", "compression", "decode_ms", "e2e_tok_s", "compress_s")
    return {"bench": "presses", "rows": pick(res["rows"], keys)}
