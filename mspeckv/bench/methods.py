"""The sweep methods' runs (what each method is: ``registry.REGISTRY``): ``METHOD_FNS[name](ctx, x, seed) ->
metrics dict``, one timed run each. Conventions (every method):

* Prompt: real text (``long_prompt(tokenizer, prefill, seed, dataset)``) for real targets, else uniform random ids
  drawn from ``(seed, prefill)`` (``prompt_source: random-ids``): the same for every method. Sampling seed: the run's.
* Exactly ``gen_len`` tokens: EOS does not stop generation (transformers: ``eos_token_id=None``), so throughputs
  compare equal lengths.
* Warm-up: before the first timed run of each (method, x) in a process, one untimed run at the same prefill length
  with ``WARMUP_TOKENS`` new tokens (one-time costs such as allocator growth stay out of the numbers).
* ``ttft_s``: prefill + first token; ``latency_s``: the decode of the tokens after the first; ``tok_per_s`` =
  (n_generated - 1) / latency_s (decode only); ``decode_ms_per_token`` = 1e3 * latency / (n_generated - 1). End to
  end: ``runs.harness.e2e`` (``graph_setup_s``: the capture part of ``setup_s``; older records:
  ``report.end_to_end``).
* ``bytes_transferred``: the target cache's host-to-device KV bytes over the run (prefill included; 0 when every
  layer is on the chip), ``bytes_per_token`` that / n_generated; ``decode_bytes_per_token``: the bytes streamed in
  the decode window (after prefill and graph capture) per token after the first, i.e. per accepted token when
  speculating. ``peak_gpu_bytes``: max allocated (weights included) after a reset before the run, None on the CPU;
  ``resident_hit_rate``: None without resident layers.
* transformers: ``hf_assisted`` runs ``generate(assistant_model=draft)`` over ``DynamicCache(offloading=True)`` (a
  plain ``DynamicCache`` on the CPU, where offloading needs CUDA), ``hf_ar`` plain ``generate`` with a
  ``DynamicCache`` on the device. TTFT: when its streamer receives the first generated token; ``latency_s``: the
  rest of the same call. Acceptance and transfer bytes are not exposed: None. Both models load once per sweep,
  lazily (random weights: built from the config and given our models' weights).
"""

from __future__ import annotations

import hashlib
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch

from ..cache import make_cache
from ..config import GenerationConfig, SamplingConfig
from ..decoding.autoregressive import generate
from ..decoding.runner import use_graphs
from ..decoding.speculative import SpecConfig, check_pair, speculative_generate
from ..runs.harness import e2e, peak_bytes, reset_peak, sync, wall
from .registry import REGISTRY
from .sweep_settings import Point, SweepSettings, placement_for

WARMUP_TOKENS = 8
DRAFT_RANDOM_SEED = 1  # random:<shape> drafts get other weights than the (seed 0) target


@dataclass
class SweepContext:
    """Everything a method needs, loaded once per sweep."""

    settings: SweepSettings
    target: Any  # CausalLM
    draft: Any | None  # CausalLM (None when no method needs it)
    tokenizer: Any | None  # None for random-weight targets
    target_dir: Any | None = None  # HF directory (None: random weights)
    draft_dir: Any | None = None
    load_s: float | None = None  # loading target and draft (once per sweep process)
    hf: dict[str, Any] = field(default_factory=dict)  # lazily loaded transformers models
    hf_load_s: dict[str, float] = field(default_factory=dict)  # their load times
    warmed: set = field(default_factory=set)
    prompts: dict[tuple[int, int], tuple[torch.Tensor, str]] = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return self.target.device

    def point(self, x: int) -> Point:
        return self.settings.point(x, self.target.cfg.n_layers)


def load_context(s: SweepSettings) -> SweepContext:
    from ..model.api import load, random_model
    from .registry import SPEC_METHODS

    def one(ref: str, seed: int):
        if ref.startswith("random:"):
            return random_model(ref.split(":", 1)[1], s.device, seed=seed), None, None
        return load(ref, s.device)

    t0 = time.perf_counter()
    target, tok, tdir = one(s.target, 0)
    draft = dtok = ddir = None
    if any(m in SPEC_METHODS for m in s.methods):
        draft, dtok, ddir = one(s.draft, DRAFT_RANDOM_SEED)
        with warnings.catch_warnings():
            if s.weights == "random":  # a random draft has the target's shape by construction: not a mistake here
                warnings.filterwarnings("ignore", message=r"the draft .* is not smaller")
            check_pair(target, draft, tok, dtok)
    return SweepContext(s, target, draft, tok, tdir, ddir, time.perf_counter() - t0)


def prompt(ctx: SweepContext, prefill: int, seed: int) -> tuple[torch.Tensor, str]:
    """(1, prefill) ids and where they came from; cached per (prefill, seed)."""
    key = (prefill, seed)
    if key not in ctx.prompts:
        if ctx.tokenizer is None:
            h = int.from_bytes(hashlib.sha256(f"prompt:{seed}:{prefill}".encode()).digest()[:8], "big")
            g = torch.Generator().manual_seed(h)
            ids, src = torch.randint(0, ctx.target.cfg.vocab_size, (1, prefill), generator=g), "random-ids"
        else:
            from ..data.corpora import long_prompt

            ids = torch.tensor([long_prompt(ctx.tokenizer, prefill, seed, ctx.settings.dataset)])
            src = ctx.settings.dataset or "bbc"
        ctx.prompts[key] = (ids, src)
    return ctx.prompts[key]


def _gen(ctx: SweepContext, n: int, seed: int) -> GenerationConfig:
    s = ctx.settings
    return GenerationConfig(max_new_tokens=n, sampling=SamplingConfig(temperature=s.temperature, top_p=s.top_p,
                                                                      seed=seed),
                            stop_on_eos=False, prefill_chunk=s.prefill_chunk)


def _timed(ctx: SweepContext, method: str, x: int, run: Callable[[int], Any], gen_len: int):
    """Warm up once per (method, x), then the timed run -> (result, peak GPU bytes, its wall-clock seconds)."""
    if (method, x) not in ctx.warmed:
        run(min(WARMUP_TOKENS, gen_len))
        ctx.warmed.add((method, x))
    reset_peak(ctx.device)
    res, secs = wall(ctx.device, lambda: run(gen_len))
    return res, peak_bytes(ctx.device), secs


def _metrics(ttft: float, latency: float, n: int, peak: int | None, source: str, prompt_len: int,
             mem: dict | None, setup_s: float | None = None, wall_s: float | None = None, **extra) -> dict[str, Any]:
    """One run's metrics; ``wall_s``: the request's measured wall clock (default: the sum of its parts)."""
    h2d = (mem or {}).get("h2d_bytes_total", 0)
    h2d0 = extra.pop("h2d_bytes_before_decode", None)
    dec = h2d - h2d0 if (h2d is not None and h2d0 is not None) else None
    # every generated token is an accepted one, so bytes_per_token is the bytes per accepted token; the PCIe rate is
    # the H2D bytes over the copy stream's busy time (CUDA events around each fetch): GB/s while streaming
    return {"ttft_s": ttft, "latency_s": latency, **e2e(setup_s, ttft, latency, n, e2e_s=wall_s),
            "tok_per_s": (n - 1) / latency if latency > 0 else None,
            "decode_ms_per_token": 1e3 * latency / max(n - 1, 1), "n_generated": n, "prompt_len": prompt_len,
            "prompt_source": source, "bytes_transferred": h2d,
            "bytes_per_token": h2d / n if (h2d is not None and n) else None,
            "decode_bytes_per_token": dec / max(n - 1, 1) if dec is not None else None,
            "h2d_GBps_streaming": (mem or {}).get("h2d_achieved_GBps"), "h2d_busy_s": (mem or {}).get("h2d_busy_s"),
            "peak_gpu_bytes": peak, **extra}


def _ours(ctx: SweepContext, x: int, seed: int, *, method: str, mode: str | None) -> dict[str, Any]:
    """Our engine: AR (mode None) or vanilla or mspeckv speculation, with the method's placement. ar_gpu has none:
    every layer's KV on the GPU, as ``generate`` builds it (on CUDA it replays a CUDA graph over a static cache),
    what a user whose KV fits on the GPU would run."""
    s, p = ctx.settings, ctx.point(x)
    placement = placement_for(s, method, p)
    ids, src = prompt(ctx, p.prefill, seed)
    caches: list = []

    def run(n: int):
        gen = _gen(ctx, n, seed)
        if placement is None:
            return generate(ctx.target, ids, gen)
        if mode is None:  # the factory decides the layout: graphed when nothing is offloaded or pressed, as in spec
            cache, build_s = wall(ctx.device, lambda: make_cache(ctx.target, placement, 1, p.prefill + n,
                                                                 press=s.press, graphs=use_graphs(ctx.target)))
            caches[:] = [cache]
            res = generate(ctx.target, ids, gen, cache=cache)
            res.setup_s += build_s  # the cache is built outside generate here
            return res
        spec = SpecConfig(mode=mode, gamma=s.gamma, draft_gamma=s.draft_gamma, budget=s.budget, chunk=s.chunk,
                          l1_press=s.l1_press if mode == "mspeckv" else None)
        return speculative_generate(ctx.target, ctx.draft, ids, gen, spec, placement=placement, press=s.press)

    res, peak, secs = _timed(ctx, method, x, run, p.gen_len)
    if mode is None:
        mem = (caches[0].memory_report() or None) if caches else None
        per_level = {"prefill": res.prefill_s, "decode": res.decode_s}
    else:
        mem, per_level = res.stats.get("memory"), res.stats.get("time_s")
    hit = mem.get("resident_hit_rate") if mem and placement.resident_layers else None
    where = placement.describe(ctx.target.cfg.n_layers) if placement else "every layer on the GPU (graphed on CUDA)"
    return _metrics(res.ttft_s, res.decode_s, res.n_generated, peak, src, res.prompt_len, mem, res.setup_s, secs,
                    graph_setup_s=res.stats.get("capture_s", res.stats.get("graph_setup_s")), model_load_s=ctx.load_s,
                    h2d_bytes_before_decode=res.stats.get("h2d_bytes_before_decode"),
                    prefill_s=res.prefill_s, accepted=res.stats.get("accepted"), levels=getattr(res, "levels", None),
                    verifications=res.stats.get("verifications"), per_level_s=per_level, resident_hit_rate=hit,
                    placement=where, resident_layers=placement.resident_layers if placement else 0)


# ------------------------------------------------------------------------------------------------ transformers
def _hf_model(ctx: SweepContext, role: str):
    """The transformers twin of our target/draft, loaded once (from its directory, or built with our weights)."""
    if role not in ctx.hf:
        t0 = time.perf_counter()
        from transformers import AutoConfig, AutoModelForCausalLM

        from ..model.api import RANDOM_SHAPES

        ours, d = (ctx.target, ctx.target_dir) if role == "target" else (ctx.draft, ctx.draft_dir)
        dtype = torch.bfloat16 if ctx.device.type == "cuda" else torch.float32
        if d is not None:
            m = AutoModelForCausalLM.from_pretrained(str(d), dtype=dtype)
        else:
            ref = ctx.settings.target if role == "target" else ctx.settings.draft
            kw = dict(RANDOM_SHAPES[ref.split(":", 1)[1]])
            m = AutoModelForCausalLM.from_config(AutoConfig.for_model(kw.pop("model_type"), **kw), dtype=dtype)
            missing, unexpected = m.load_state_dict(ours.state_dict(), strict=False)
            if unexpected or [k for k in missing if "rotary" not in k]:
                raise RuntimeError(f"random {role} weights do not map onto transformers' model: "
                                   f"missing {missing[:4]}, unexpected {unexpected[:4]}")
        ctx.hf[role] = m.to(ctx.device).eval()
        ctx.hf_load_s[role] = time.perf_counter() - t0
    return ctx.hf[role]


def _hf_generate(ctx: SweepContext, x: int, seed: int, *, method: str, assisted: bool) -> dict[str, Any]:
    """One timed transformers ``generate``: TTFT is when its streamer receives the first generated token (the same
    call, so latency = total - TTFT is never negative), latency the rest. Assisted: the draft as ``assistant_model``
    over ``DynamicCache(offloading=True)`` (offloading needs CUDA; on the CPU a plain ``DynamicCache``). Plain:
    ``DynamicCache`` on the device."""
    from transformers import DynamicCache
    from transformers.generation.streamers import BaseStreamer

    class FirstToken(BaseStreamer):  # generate puts the prompt first, then each new token (moved to the host)
        puts, t = 0, None

        def put(self, value):
            self.puts += 1
            self.t = time.perf_counter() if self.puts == 2 else self.t

        def end(self):
            pass

    s, p = ctx.settings, ctx.point(x)
    target = _hf_model(ctx, "target")
    ids, src = prompt(ctx, p.prefill, seed)
    ids = ids.to(ctx.device)
    offload = assisted and ctx.device.type == "cuda"
    sample = s.temperature > 0
    kw = dict(attention_mask=torch.ones_like(ids), do_sample=sample, eos_token_id=None,
              temperature=s.temperature if sample else None, top_p=s.top_p if sample else None,
              pad_token_id=target.generation_config.pad_token_id or 0)
    if assisted:
        kw["assistant_model"] = _hf_model(ctx, "draft")

    def run(n: int) -> tuple[float, float, int]:
        torch.manual_seed(seed)
        cache, first = DynamicCache(config=target.config, offloading=offload), FirstToken()
        sync(ctx.device)
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = target.generate(ids, past_key_values=cache, max_new_tokens=n, streamer=first, **kw)
        sync(ctx.device)
        total = time.perf_counter() - t0
        return first.t - t0, total, out.shape[1] - ids.shape[1]

    (ttft, total, n), peak, _ = _timed(ctx, method, x, run, p.gen_len)
    # transformers builds and fills its cache inside generate: no setup apart; end to end is the full generate
    loads = [ctx.hf_load_s[r] for r in ("target", "draft") if r in ctx.hf_load_s and (assisted or r == "target")]
    return _metrics(ttft, total - ttft, n, peak, src, ids.shape[1], None, None, total, model_load_s=sum(loads),
                    accepted=None, levels=None, per_level_s=None, resident_hit_rate=None, bytes_transferred=None,
                    bytes_per_token=None,
                    hf_cache=f"DynamicCache(offloading={offload})", total_s=total)


OUR_MODES = {"baseline": None, "vanilla_specdec": "vanilla", "mspeckv": "mspeckv", "mspeckv_kv_quant": "mspeckv",
             "ar_gpu": None}
OTHERS = {"hf_assisted": partial(_hf_generate, method="hf_assisted", assisted=True),
          "hf_ar": partial(_hf_generate, method="hf_ar", assisted=False)}
# what each method is: ``registry.REGISTRY``; its run here: our engine with its mode (baseline: AR) and placement, or
# one of the others (a registry entry without a run fails at import)
METHOD_FNS: dict[str, Callable[[SweepContext, int, int], dict[str, Any]]] = {
    m.name: partial(_ours, method=m.name, mode=OUR_MODES[m.name]) if m.name in OUR_MODES else OTHERS[m.name]
    for m in REGISTRY}
