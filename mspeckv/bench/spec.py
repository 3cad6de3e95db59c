"""``mspeckv bench spec``: AR, vanilla and MSpecKV on the same real long prompts, side by side.

Greedy by default, so every mode must produce the target's greedy output; in bf16 on a GPU a batched verification
and a one-token step round differently, so the token agreement with AR is reported rather than assumed.
Each (prefill, mode) is warmed up once at the same prompt length before the timed run.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from functools import partial

import torch

from ..cache import make_cache
from ..config import GenerationConfig, SamplingConfig
from ..decoding.autoregressive import generate
from ..decoding.runner import use_graphs
from ..decoding.speculative import SpecConfig, check_pair, speculative_generate
from ..kv.placement import FORMATS, RESIDENT_FORMATS, RESIDENT_POLICIES, Placement
from ..model.api import load, model_config, parse_device
from ..runs.checks import out_dir, placement_flags, refuse
from ..runs.harness import check_contexts, device_name, fmt, median_e2e, median_of, peak_bytes, pick, requests, wall
from ..runs.store import write_bench
from ..runs.tables import md_table
from ..runs.template import changed, check_fields, opt

MODES = ("ar", "vanilla", "mspeckv")
PLACEMENT_FIELDS = ("on_chip", "kv_quant", "kv_group_size", "resident_layers", "resident_format", "resident_policy")


@dataclass(frozen=True)
class SpecBenchConfig:
    target: str = opt("qwen2.5-coder-1.5b", "target model (embedded name, HF directory, .gguf file or hub id)",
                      flag="--model")
    draft: str = opt("qwen2.5-coder-0.5b", "draft model")
    prefills: tuple[int, ...] = opt((16384, 32768 - 512), "contexts (prompt lengths)", flag="--contexts", lo=1)
    gen_len: int = opt(128, "generated tokens per run", lo=2)  # latency is timed after the first
    modes: tuple[str, ...] = opt(MODES, "modes to compare", choices=MODES)
    gamma: int = opt(8, "proposals per full-KV verification (level 2)")
    draft_gamma: int = opt(4, "proposals per retrieval verification (level 1)")
    budget: int = opt(4096, "retrieval cache: retrieved prompt tokens")
    chunk: int = opt(8, "retrieval chunk size (budget must be a multiple)")
    # the target's KV placement, flat (one flag each); ``placement`` builds the Placement
    on_chip: int | None = opt(None, "layers whose KV stays on the GPU (default: all)")
    kv_quant: str = opt("none", "format of the offloaded KV", choices=FORMATS)
    kv_group_size: int = opt(64, "quantization group size")
    resident_layers: int = opt(0, "offloaded layers also kept on the GPU")
    resident_format: str = opt("dequant", "resident copies: dequantized or quantized", choices=RESIDENT_FORMATS)
    resident_policy: str = opt("lru", "which offloaded layers stay resident", choices=RESIDENT_POLICIES)
    temperature: float = opt(0.0, "0 = greedy (default)")
    greedy: bool = opt(False, "force temperature 0")
    top_p: float = opt(1.0, "nucleus sampling threshold (with --temperature > 0)")
    seed: int = opt(0, "seed of the prompts (BBC News text) and of sampling")
    repeats: int = opt(2, "timed runs after one warm-up (the median is reported)", lo=1)
    device: str | None = opt(None, "cpu | cuda (default: cuda if available)")
    # the target's KV press in every mode (lossy; measured in results/quality)
    press: str | None = opt(None, "compress the target's KV after prefill, in every mode: name:k=v,... | preset | "
                                  "FILE.yaml (lossy: see `mspeckv presses list`)")
    # the mspeckv middle level's press (lossless); None: retrieval
    l1_press: str | None = opt(None, "the mspeckv middle level's press (default: retrieval)")
    out_dir: str = opt("results/spec", "output folder", aliases=("--output-dir",))

    def __post_init__(self):
        from ..presses import parse_press

        check_fields(self)
        for k in ("press", "l1_press"):
            parse_press(getattr(self, k))
        SamplingConfig(temperature=self.temperature, top_p=self.top_p, seed=self.seed)
        if self.greedy:  # the temperature is then 0, as its default: another one is refused
            refuse(changed(self, "temperature"), "--greedy sets the temperature to 0")
        if self.temperature == 0:  # the seed stays: it picks the prompts
            refuse(changed(self, "top_p"), "decoding is greedy (temperature 0), so sampling settings do nothing; "
                   "pass --temperature > 0 to sample")
        if any(m != "ar" for m in self.modes):  # gamma, budget, chunk: only the speculative modes use them
            mode = "mspeckv" if "mspeckv" in self.modes else "vanilla"
            SpecConfig(mode=mode, gamma=self.gamma, draft_gamma=self.draft_gamma, budget=self.budget, chunk=self.chunk)
        else:
            refuse(changed(self, "draft", "gamma", "draft_gamma", "budget", "chunk"), "--modes ar does not speculate")
        placement_flags(self, changed_flags=changed)  # offload/resident flags that would do nothing
        self.placement  # noqa: B018 (its own range checks)

    @property
    def placement(self) -> Placement:
        return Placement(**{k: getattr(self, k) for k in PLACEMENT_FIELDS})

    def validate(self) -> None:
        """What can be refused before the weights load: the output folder, and the target's config."""
        out_dir("--out-dir", self.out_dir)
        tcfg = model_config(self.target)
        self.placement.validate(tcfg.n_layers, tcfg.head_dim)
        placement_flags(self, tcfg.n_layers, changed_flags=changed)
        check_contexts(self.prefills, self.gen_len, tcfg.max_position, self.target)

    def as_json(self) -> dict:
        """The ``config`` of ``spec.json``: the placement nested as one description (as before the flags were
        fields); ``greedy`` is the temperature 0 and ``out_dir`` where the file is, so neither is repeated."""
        d = {}
        for k, x in asdict(self).items():
            if k == "on_chip":
                d["placement"] = asdict(self.placement)
            elif k not in (*PLACEMENT_FIELDS, "greedy", "out_dir"):
                d[k] = x
        return d


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
    (target, tok, _), load_s = wall(device, lambda: load(cfg.target, device))
    (draft, dtok, _), draft_load_s = wall(device, lambda: load(cfg.draft, device))
    check_pair(target, draft, tok, dtok)
    rows = []
    for prefill in cfg.prefills:
        ids = torch.tensor([long_prompt(tok, prefill, cfg.seed)], device=device)
        ref = None
        for mode in cfg.modes:
            _one(cfg, target, draft, ids, mode, 8)  # warm-up at this prompt length
            runs, walls = requests(device, partial(_one, cfg, target, draft, ids, mode, cfg.gen_len), cfg.repeats)
            r = runs[-1]
            ref = r.tokens[0] if mode == "ar" else ref
            agree = None
            if ref is not None:
                n = min(len(ref), len(r.tokens[0]))
                first_diff = next((i for i in range(n) if ref[i] != r.tokens[0][i]), n)
                agree = first_diff / n  # fraction of the output identical to AR before the first difference
            m = median_of(runs, "tok_per_s", "ms_per_token", "ttft_s")
            rows.append({
                "prefill": prefill, "mode": mode, "tok_per_s": m["tok_per_s"], "ms_per_token": m["ms_per_token"],
                "ttft_s": m["ttft_s"], **median_e2e(runs, r.n_generated, walls),
                "accepted": r.stats.get("accepted"), "levels": getattr(r, "levels", None),
                "time_s": r.stats.get("time_s"), "agreement_with_ar": agree, "n_generated": r.n_generated,
                "runs_tok_per_s": [x.tok_per_s for x in runs], "runs_e2e_s": walls,
                "peak_gpu_bytes": peak_bytes(device), "text": tok.decode(r.tokens[0][:64]), **transfer_accounting(r),
            })
            print(f"[{prefill} {mode}] {rows[-1]['tok_per_s']:.1f} tok/s decoding, {rows[-1]['e2e_tok_per_s']:.1f} "
                  f"end to end, accepted {rows[-1]['accepted']}, agreement {agree}", flush=True)
    return {"bench": "spec", "weights": "real", "config": cfg.as_json(), "device_name": device_name(device),
            "model_load_s": {"target": load_s, "draft": draft_load_s}, "rows": rows,
            "written": time.strftime("%Y-%m-%dT%H:%M:%S")}


def render_spec(res: dict) -> str:
    c = res["config"]
    lines = [f"# AR vs vanilla vs MSpecKV ({c['target']} + {c['draft']}, real weights, {res['device_name']})", "",
             f"gen {c['gen_len']} tokens, gamma {c['gamma']}, draft_gamma {c['draft_gamma']}, budget {c['budget']}, "
             f"chunk {c['chunk']}, temperature {c['temperature']}, placement {c['placement']}; prompts are BBC News "
             f"text (seed {c['seed']}); median of {c['repeats']} runs after a warm-up.", "",
             "decode tok/s: tokens after the first / decode time; e2e tok/s: generated tokens / the request's wall "
             "clock (setup: caches and graph capture, prefill, decode).", "",
             ""]
    f = lambda v, d=2: fmt(v, f"{{:.{d}f}}", na="-")  # noqa: E731
    rows = [[r["prefill"], r["mode"], f"{r['tok_per_s']:.1f}", f(r.get("e2e_tok_per_s"), 1), f"{r['ms_per_token']:.1f}",
             f"{r['ttft_s']:.2f}", f(r.get("setup_s")), f(r["accepted"]),
             f((r["levels"] or {}).get("verify_l1", {}).get("acceptance_rate")), f(r["agreement_with_ar"]),
             f(None if r.get("h2d_bytes_per_accepted_token") is None else r["h2d_bytes_per_accepted_token"] / 1e6),
             f(r.get("h2d_GBps_streaming"), 1)] for r in res["rows"]]
    return "\n".join(lines) + md_table(["prefill", "mode", "decode tok/s", "e2e tok/s", "ms/token", "TTFT s", "setup s",
                                        "accepted", "L1 acceptance", "agreement with AR", "H2D MB / accepted token",
                                        "PCIe GB/s while streaming"], rows, "rl" + "r" * 10) + "\n"


# ------------------------------------------------------------------------------------- the bench registry's entry
def run(cfg: SpecBenchConfig, command: str = "") -> dict:
    """Check every input, then measure; writes ``spec.json`` and ``summary.md`` into ``cfg.out_dir``."""
    cfg.validate()
    return write_bench(cfg.out_dir, "spec", run_spec_bench(cfg), render_spec, command)


def line(res: dict) -> dict:
    keys = ("prefill", "mode", "tok_per_s", "e2e_tok_per_s", "accepted", "agreement_with_ar")
    return {"bench": "spec", "rows": pick(res["rows"], keys)}
