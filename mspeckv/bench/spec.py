"""``mspeckv bench spec``: AR, vanilla and MSpecKV on the same real long prompts, side by side.

Greedy by default, so every mode must produce the target's greedy output; in bf16 on a GPU a batched verification
and a one-token step round differently, so the token agreement with AR is reported rather than assumed.
Each (prefill, mode) is warmed up once at the same prompt length before the timed run.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass

import torch

from .. import validate as v
from ..config import GenerationConfig, SamplingConfig
from ..decoding.autoregressive import generate
from ..decoding.runner import use_graphs
from ..decoding.speculative import SpecConfig, check_pair, speculative_generate
from ..kv.placement import Placement, make_cache
from ..model.api import load, parse_device


@dataclass(frozen=True)
class SpecBenchConfig:
    target: str = "qwen2.5-coder-1.5b"
    draft: str = "qwen2.5-coder-0.5b"
    prefills: tuple[int, ...] = (16384, 32768 - 512)
    gen_len: int = 128
    modes: tuple[str, ...] = ("ar", "vanilla", "mspeckv")
    gamma: int = 8
    draft_gamma: int = 4
    budget: int = 4096
    chunk: int = 8
    placement: Placement = Placement()
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 1
    repeats: int = 2
    device: str | None = None
    press: str | None = None  # the target's KV press in every mode (lossy; measured in results/quality)
    l1_press: str | None = None  # the mspeckv middle level's press (lossless); None: retrieval

    def __post_init__(self):
        from ..presses import parse_press

        for k in ("press", "l1_press"):
            v.text(k, getattr(self, k), optional=True)
            parse_press(getattr(self, k))
        v.text("target", self.target)
        v.text("draft", self.draft)
        v.integers("prefills", self.prefills, lo=1)
        v.integer("gen_len", self.gen_len, lo=2)  # latency is timed over the tokens after the first
        v.choices("modes", self.modes, ("ar", "vanilla", "mspeckv"))
        if not isinstance(self.placement, Placement):
            raise v.ConfigError(f"placement must be a Placement, got {self.placement!r}")
        v.integer("repeats", self.repeats, lo=1)
        v.text("device", self.device, optional=True)
        SamplingConfig(temperature=self.temperature, top_p=self.top_p, seed=self.seed)
        if any(m != "ar" for m in self.modes):  # gamma, budget, chunk: only the speculative modes use them
            mode = "mspeckv" if "mspeckv" in self.modes else "vanilla"
            SpecConfig(mode=mode, gamma=self.gamma, draft_gamma=self.draft_gamma, budget=self.budget, chunk=self.chunk)


def _one(cfg: SpecBenchConfig, target, draft, ids, mode: str, gen_len: int):
    s = SamplingConfig(temperature=cfg.temperature, top_p=cfg.top_p, seed=cfg.seed)
    gen = GenerationConfig(max_new_tokens=gen_len, sampling=s, stop_on_eos=False, prefill_chunk=4096)
    if mode == "ar":  # the factory decides the layout: graphed when nothing is offloaded or pressed, as in spec
        cache = make_cache(target, cfg.placement, 1, ids.shape[1] + gen_len, press=cfg.press,
                           graphs=use_graphs(target))
        res = generate(target, ids, gen, cache=cache)
        res.stats["memory"] = cache.memory_report()
        return res
    spec = SpecConfig(mode=mode, gamma=cfg.gamma, draft_gamma=cfg.draft_gamma, budget=cfg.budget, chunk=cfg.chunk,
                      l1_press=cfg.l1_press if mode == "mspeckv" else None)
    return speculative_generate(target, draft, ids, gen, spec, placement=cfg.placement, press=cfg.press)


def transfer_accounting(r) -> dict:
    """Per run: host-to-device bytes of the target's KV per accepted token (every generated token is accepted), and
    the PCIe rate while streaming (those bytes over the copy stream's busy time, from CUDA events per fetch)."""
    mem = r.stats.get("memory") or {}
    h2d = mem.get("h2d_bytes_total")
    return {"h2d_bytes": h2d, "h2d_bytes_per_accepted_token": h2d / r.n_generated if h2d is not None else None,
            "h2d_GBps_streaming": mem.get("h2d_achieved_GBps"), "h2d_busy_s": mem.get("h2d_busy_s")}


def run_spec_bench(cfg: SpecBenchConfig) -> dict:
    from ..data.corpora import long_prompt

    device = parse_device(cfg.device)
    target, tok, _ = load(cfg.target, device)
    draft, dtok, _ = load(cfg.draft, device)
    check_pair(target, draft, tok, dtok)
    rows = []
    for prefill in cfg.prefills:
        ids = torch.tensor([long_prompt(tok, prefill, cfg.seed)], device=device)
        ref = None
        for mode in cfg.modes:
            _one(cfg, target, draft, ids, mode, 8)  # warm-up at this prompt length
            runs = []
            for _ in range(cfg.repeats):
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                runs.append(_one(cfg, target, draft, ids, mode, cfg.gen_len))
            r = runs[-1]
            ref = r.tokens[0] if mode == "ar" else ref
            agree = None
            if ref is not None:
                n = min(len(ref), len(r.tokens[0]))
                first_diff = next((i for i in range(n) if ref[i] != r.tokens[0][i]), n)
                agree = first_diff / n  # fraction of the output identical to AR before the first difference
            rows.append({
                "prefill": prefill, "mode": mode, "tok_per_s": statistics.median(x.tok_per_s for x in runs),
                "ms_per_token": statistics.median(x.ms_per_token for x in runs),
                "ttft_s": statistics.median(x.ttft_s for x in runs), "accepted": r.stats.get("accepted"),
                "levels": getattr(r, "levels", None), "time_s": r.stats.get("time_s"),
                "agreement_with_ar": agree, "n_generated": r.n_generated,
                "runs_tok_per_s": [x.tok_per_s for x in runs],
                "peak_gpu_bytes": torch.cuda.max_memory_allocated() if device.type == "cuda" else None,
                "text": tok.decode(r.tokens[0][:64]), **transfer_accounting(r),
            })
            print(f"[{prefill} {mode}] {rows[-1]['tok_per_s']:.1f} tok/s, accepted {rows[-1]['accepted']}, "
                  f"agreement {agree}", flush=True)
    return {"bench": "spec", "weights": "real", "config": {**asdict(cfg), "placement": asdict(cfg.placement)},
            "device_name": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "rows": rows,
            "written": time.strftime("%Y-%m-%dT%H:%M:%S")}


def render_spec(res: dict) -> str:
    c = res["config"]
    lines = [f"# AR vs vanilla vs MSpecKV ({c['target']} + {c['draft']}, real weights, {res['device_name']})", "",
             f"gen {c['gen_len']} tokens, gamma {c['gamma']}, draft_gamma {c['draft_gamma']}, budget {c['budget']}, "
             f"chunk {c['chunk']}, temperature {c['temperature']}, placement {c['placement']}; prompts are BBC News "
             f"text (seed {c['seed']}); median of {c['repeats']} runs after a warm-up.", "",
             "| prefill | mode | tok/s | ms/token | TTFT s | accepted | L1 acceptance | agreement with AR | "
             "H2D MB / accepted token | PCIe GB/s while streaming |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in res["rows"]:
        l1 = (r["levels"] or {}).get("verify_l1", {}).get("acceptance_rate")
        mb = r.get("h2d_bytes_per_accepted_token")
        mb = None if mb is None else mb / 1e6
        f = lambda v, d=2: "-" if v is None else f"{v:.{d}f}"
        lines.append(f"| {r['prefill']} | {r['mode']} | {r['tok_per_s']:.1f} | {r['ms_per_token']:.1f} | "
                     f"{r['ttft_s']:.2f} | {f(r['accepted'])} | {f(l1)} | {f(r['agreement_with_ar'])} | "
                     f"{f(mb)} | "
                     f"{f(r.get('h2d_GBps_streaming'), 1)} |")
    return "\n".join(lines) + "\n"
