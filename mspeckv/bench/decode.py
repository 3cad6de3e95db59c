"""``mspeckv bench decode``: prefill tok/s, decode ms/token, peak memory and (on CUDA) achieved bandwidth.

Achieved bandwidth = (weight bytes + KV bytes read per decode step) / step time, compared with a device-to-device copy
bandwidth (bytes read + written) measured in the same run. Warm-up runs at the exact measured shape first.
End to end (``runs.harness``): ``e2e_s`` is the wall clock of one ``generate``; with graphs it builds its static
cache and captures its graph inside (``setup_s``); eagerly one DenseKV is allocated before the runs and reused.
"""

from __future__ import annotations

import resource
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..config import GenerationConfig
from ..decoding.autoregressive import generate
from ..kv.dense import DenseKV
from ..model.api import load_any, model_config, parse_device
from ..runs.checks import generation_fits, out_file
from ..runs.harness import d2d_bandwidth, device_name, median_e2e, median_of, peak_bytes, requests, wall
from ..runs.store import atomic_write_json, run_metadata
from ..runs.tables import md_table
from ..runs.template import check_fields, opt


@dataclass(frozen=True)
class DecodeBenchConfig:
    model: str = opt("qwen2.5-coder-1.5b", "embedded name, HF directory, .gguf file, hub id or random:<shape>")
    prompt_len: int = opt(1024, "prompt tokens", lo=1)
    gen_len: int = opt(128, "decoded tokens", lo=1)
    device: str | None = opt(None, "cpu | cuda (default: cuda if available)")
    repeats: int = opt(3, "timed runs after one warm-up at the same shape (the median is reported)", lo=2)
    batch: int = opt(1, "sequences decoded together", lo=1)
    prefill_chunk: int = opt(4096, "tokens per prefill forward", lo=1)
    out: str | None = opt(None, "JSON path (default under results/bench/)")
    seed: int = opt(0, "seed of the prompt", lo=0)
    # CUDA graphs over a static cache (CUDA only); False: eager with a DenseKV
    graphs: bool = opt(True, "eager steps instead of CUDA graphs", flag="--no-graphs", negate=True)

    def __post_init__(self):
        check_fields(self)

    def validate(self) -> None:
        """What can be refused before the weights load: the output path, and the model's config (not its weights)."""
        out_file("--out", self.out or "results/bench/decode.json")
        generation_fits(model_config(self.model), self.gen_len, self.prompt_len, "--gen-len", "--prompt-len")


def weight_bytes_per_step(model) -> int:
    """Bytes of weights one decode step reads: every matrix once; the embedding table only via a tied LM head."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())  # parameters() dedups tied weights
    if not model.cfg.tie_embeddings:
        e = model.model.embed_tokens.weight
        total -= e.numel() * e.element_size()
    return total


def prompt_ids(tok, n: int, batch: int, vocab: int, seed: int) -> tuple[torch.Tensor, str]:
    src = "random-ids"
    if tok is not None:
        try:
            from ..data.corpora import long_prompt

            return torch.tensor([long_prompt(tok, n, seed + b) for b in range(batch)]), "bbc-news"
        except Exception as e:  # no corpus installed: fall back to random ids, and say so in the results
            src = f"random-ids ({type(e).__name__})"
    g = torch.Generator().manual_seed(seed)
    return torch.randint(10, vocab, (batch, n), generator=g), src


def run_decode_bench(cfg: DecodeBenchConfig, write: bool = True) -> dict:
    device = parse_device(cfg.device)
    (model, tok, _), load_s = wall(device, lambda: load_any(cfg.model, device))
    model.check_context(cfg.prompt_len + cfg.gen_len)
    ids, src = prompt_ids(tok, cfg.prompt_len, cfg.batch, model.cfg.vocab_size, cfg.seed)
    gen = GenerationConfig(max_new_tokens=cfg.gen_len, stop_on_eos=False, prefill_chunk=cfg.prefill_chunk)
    graphs = cfg.graphs and device.type == "cuda"
    cache = None if graphs else DenseKV.for_model(model, cfg.batch, cfg.prompt_len + cfg.gen_len)

    def one():  # a graphed run builds its static cache and captures its graph inside generate (its setup_s)
        if cache is not None:
            cache.rollback(cache.length())
        return generate(model, ids, gen, cache=cache, graphs=graphs)

    one()  # the warm-up at the same shape
    runs, walls = requests(device, one, cfg.repeats)
    m = median_of(runs, "prefill_s", "ms_per_token", "ttft_s")
    prefill_s, ms_tok = m["prefill_s"], m["ms_per_token"]
    row = {"bench": "decode", "model": cfg.model, "weights": "random" if cfg.model.startswith("random:") else "real",
           "family": model.cfg.family, "device": str(device), "dtype": str(model.dtype).removeprefix("torch."),
           "cuda_graphs": graphs, "prompt_source": src, **asdict(cfg),
           "prefill_tok_per_s": cfg.batch * cfg.prompt_len / prefill_s, "prefill_s": prefill_s,
           "ttft_s": m["ttft_s"], "decode_ms_per_token": ms_tok, "decode_tok_per_s": cfg.batch * 1e3 / ms_tok,
           **median_e2e(runs, runs[-1].n_generated, walls), "model_load_s": load_s, "runs_e2e_s": walls,
           "runs_ms_per_token": [r.ms_per_token for r in runs], "runs_prefill_s": [r.prefill_s for r in runs],
           "sample_text": tok.decode(runs[-1].tokens[0][:48]) if tok is not None else None}
    if device.type == "cuda":
        row["device_name"] = device_name(device)
        row["peak_gpu_bytes"] = peak_bytes(device)
        w = weight_bytes_per_step(model)
        kv = model.cfg.kv_bytes_per_token(model.dtype.itemsize) * cfg.batch * (cfg.prompt_len + cfg.gen_len / 2)
        achieved = (w + kv) / (ms_tok / 1e3)
        with torch.cuda.device(device):
            peak = d2d_bandwidth(1 << 30, 10)
        row.update(weight_bytes_per_step=w, kv_bytes_per_step_mean=kv, achieved_bandwidth_GBps=achieved / 1e9,
                   d2d_copy_bandwidth_GBps=peak / 1e9, bandwidth_utilisation=achieved / peak)
    row["peak_host_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if write:
        out = Path(cfg.out or f"results/bench/decode-{cfg.model.replace(':', '-')}-{device.type}"
                               f"-p{cfg.prompt_len}-g{cfg.gen_len}-b{cfg.batch}.json")
        row |= {"meta": run_metadata(), "written": time.strftime("%Y-%m-%dT%H:%M:%S")}
        atomic_write_json(out, row)
        row["out"] = str(out)
    return row


# ------------------------------------------------------------------------------------- the bench registry's entry
def run(cfg: DecodeBenchConfig, command: str = "") -> dict:
    """Check every input, then measure and write the row (its JSON file; the command is not recorded in it)."""
    cfg.validate()
    return run_decode_bench(cfg)


def render(row: dict) -> str:
    """The row's main metrics as a Markdown table."""
    where = row.get("device_name", row["device"])
    keys = [("prompt_len", "{}"), ("gen_len", "{}"), ("batch", "{}"), ("prefill_tok_per_s", "{:.0f}"),
            ("ttft_s", "{:.3f}"), ("setup_s", "{:.3f}"), ("e2e_s", "{:.3f}"), ("decode_ms_per_token", "{:.2f}"),
            ("decode_tok_per_s", "{:.1f}"), ("e2e_tok_per_s", "{:.1f}"),
            ("achieved_bandwidth_GBps", "{:.0f}"), ("d2d_copy_bandwidth_GBps", "{:.0f}"),
            ("bandwidth_utilisation", "{:.1%}"), ("peak_gpu_bytes", "{:,}"), ("peak_host_rss_bytes", "{:,}")]
    body = [[k, f.format(row[k])] for k, f in keys if row.get(k) is not None]
    head = f"# decode bench: {row['model']} ({row['weights']} weights) on {where}"
    return f"{head}\n\n{md_table(['metric', 'value'], body, 'lr')}\n"


def line(row: dict) -> dict:
    return row
