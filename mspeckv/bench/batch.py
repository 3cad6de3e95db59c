"""``mspeckv bench batch``: batched AR (``decoding/batch.py``) over batch x context, against the memory floor and
against transformers' batched ``generate``.

Cells (each a resumable run record under ``<out>/runs/``, one per seed; a seed draws other prompts):
- ``ar``: every (context, batch) of ``--contexts`` x ``--batches``: uniform prompts, graphed, every layer on the GPU.
  A cell whose weights + KV + workspace exceed ``--gpu-memory`` is refused before it allocates (recorded as such);
- ``ragged`` / ``uniform``: ``--ragged-batch`` prompts with lengths drawn uniformly from ``--ragged`` (lo-hi), and a
  uniform batch of the same total prompt tokens: their decode rates should match;
- ``hf``: transformers' batched ``generate`` with its ``StaticCache`` (it compiles the decode step itself where it
  can; the record says what ran) at the ``--hf`` cells.

Per cell: decode tok/s (tokens after each sequence's first over the decode time), ms per step, and end to end
(setup = cache + graph capture, prefill, decode). MBU = (weight bytes + mean KV bytes read per step) / step time,
over the device-to-device copy bandwidth measured at the start of the same run (bytes read + written).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass

import torch

from .. import validate as v
from ..cache import check_gpu_memory, offload_placement
from ..config import GenerationConfig
from ..runs.harness import d2d_bandwidth, device_name, fmt, free_memory, peak_bytes, reset_peak, sync
from ..runs.store import RunSpec, RunStore, run_sweep, write_bench
from ..runs.template import check_fields, opt


@dataclass(frozen=True)
class BatchBenchConfig:
    model: str = opt("qwen2.5-coder-1.5b", "embedded name, HF directory, .gguf file or random:<shape>")
    contexts: tuple[int, ...] = opt((8192, 16384, 32768), "prompt tokens per sequence (comma list)", lo=1)
    batches: tuple[int, ...] = opt((1, 8, 32, 64), "sequences in flight (comma list)", lo=1)
    gen_len: int = opt(128, "tokens generated per sequence", lo=1)
    seeds: int = opt(3, "runs per cell, each with other prompts (the median is reported)", lo=2)
    ragged: str = opt("4096-32768", "length range lo-hi of the ragged cell's prompts ('' skips it)", check=False)
    ragged_batch: int = opt(32, "sequences of the ragged cell and its uniform twin", lo=1)
    hf: tuple[str, ...] = opt((), "CONTEXTxBATCH cells for transformers' batched generate (comma list)")
    offload: tuple[str, ...] = opt((), "CONTEXTxBATCH cells of offloaded AR under --gpu-memory (bf16 KV streamed from "
                                   "pinned memory; uniform lengths)")
    presses: tuple[str, ...] = opt((), "compress-to-fit AR: PRESS@CONTEXTxBATCH cells (a press spec or preset, e.g. "
                                   "kivi:k_bits=4,v_bits=4@32768x32)", sep=";")
    waves: int = opt(1, "prompts per slot in the ar and speculation cells: CxB decodes B x WAVES prompts, B in "
                        "flight, a freed slot taking the next prompt (continuous batching: the batch's tail comes "
                        "once, at the end); its cells are labelled CxB/wWAVES", lo=1)
    offload_gen_len: int = opt(32, "tokens generated per sequence in the offload and press cells", lo=2)
    spec: tuple[str, ...] = opt((), "speculation at batch: MODE:GAMMA@CONTEXTxBATCH cells, MODE self or vanilla, "
                                "GAMMA a number or autoN (the cost model picks γ <= N, or AR, per round), an optional "
                                ":wWINDOW for self, e.g. self:4@32768x32,self:auto8:w512@32768x32")
    draft: str = opt("qwen2.5-coder-0.5b", "the draft model of vanilla and mspeckv cells")
    draft_gamma: int = opt(4, "mspeckv cells: the draft's tokens per verification by the target over its window",
                           lo=1)
    dataset: str | None = opt(None, "prompts from this corpus (e.g. pycode, the Python standard library's modules; "
                                    "a real model's tokenizer) instead of random token ids; speculation's acceptance "
                                    "needs real text", check=False)
    draft_window: int | None = opt(None, "vanilla and mspeckv cells: the draft model's steps read --sinks + its "
                                         "newest N rows (StreamingLLM over its own KV); default its full KV")
    window: int = opt(2048, "self cells: the newest rows each draft step reads", lo=1)
    sinks: int = opt(4, "self cells: the first rows each draft step reads", lo=0)
    gpu_memory: float | None = opt(None, "GB the run may allocate on the GPU (weights, KV, workspace)")
    prefill_chunk: int = opt(4096, "tokens per prefill forward", lo=1)
    device: str | None = opt(None, "cpu | cuda (default: cuda if available)")
    out: str = opt("results/bench/batch", "output folder (resumable: done cells are kept)")

    def __post_init__(self):
        check_fields(self)  # each field's declaration above; then what spans fields or parses text
        if self.ragged:
            lo, hi = ragged_range(self.ragged)
            if not 1 <= lo <= hi:
                raise v.ConfigError(f"--ragged {self.ragged!r}: give lo-hi with 1 <= lo <= hi")
        for c in self.hf + self.offload:
            hf_cell(c)
        for c in self.presses:
            press_cell(c)
        for c in self.spec:
            spec_cell(c)
        if self.offload and self.gpu_memory is None:
            raise v.ConfigError("--offload cells stream what does not fit --gpu-memory: give --gpu-memory GB")
        if self.gpu_memory is not None:
            v.number("gpu_memory", self.gpu_memory, lo=0, lo_open=True)

    def validate(self) -> None:
        from ..model.api import model_config
        from ..runs.checks import generation_fits, out_dir

        if self.dataset is not None:
            from ..data.corpora import load_documents

            if self.model.startswith("random:"):
                raise v.ConfigError(f"--dataset {self.dataset!r} needs a real model's tokenizer; {self.model} has "
                                    f"none: drop --dataset (random token ids) or give a real model")
            load_documents(self.dataset)  # a missing corpus fails here, before any weights load

        out_dir("--out", self.out)
        longest = max(self.contexts + ((ragged_range(self.ragged)[1],) if self.ragged else ()))
        generation_fits(model_config(self.model), self.gen_len, longest, "--gen-len", "--contexts")


def ragged_range(text: str) -> tuple[int, int]:
    try:
        lo, hi = (int(x) for x in text.split("-"))
    except ValueError:
        raise v.ConfigError(f"--ragged {text!r}: give a range lo-hi, e.g. 4096-32768") from None
    return lo, hi


def hf_cell(text: str) -> tuple[int, int]:
    try:
        ctx, b = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise v.ConfigError(f"--hf {text!r}: give CONTEXTxBATCH cells, e.g. 32768x32") from None
    return ctx, b


def press_cell(text: str) -> tuple[str, int, int]:
    spec, _, cell = text.rpartition("@")
    if not spec:
        raise v.ConfigError(f"--presses {text!r}: give PRESS@CONTEXTxBATCH, e.g. kivi:bits=4@32768x32")
    from ..presses import parse_press

    parse_press(spec)
    return (spec, *hf_cell(cell))


def spec_cell(text: str) -> tuple[str, int, bool, int | None, int, int]:
    """MODE:GAMMA[:wWINDOW]@CONTEXTxBATCH -> (mode, gamma, auto, window or None, context, batch); GAMMA is N or
    autoN; wWINDOW (self) overrides --window for this cell."""
    from ..decoding.batch_spec import MODES

    head, _, cell = text.rpartition("@")
    mode, _, rest = head.partition(":")
    gamma, _, win = rest.partition(":")
    auto = gamma.startswith("auto")
    gamma = gamma.removeprefix("auto")
    window = win.removeprefix("w")
    if mode not in MODES or not gamma.isdigit() or int(gamma) < 1 or (win and (mode == "vanilla" or not win.startswith(
            "w") or not window.isdigit() or int(window) < 1)):
        raise v.ConfigError(f"--spec {text!r}: give MODE:GAMMA[:wWINDOW]@CONTEXTxBATCH with MODE one of "
                            f"{', '.join(MODES)}, GAMMA >= 1 or autoN, and wWINDOW (self, mspeckv) >= 1, e.g. "
                            f"self:4@32768x32, self:auto8:w512@32768x32")
    return (mode, int(gamma), auto, int(window) if win else None, *hf_cell(cell))


def prompt_lengths(method: str, ctx: int, batch: int, cfg: BatchBenchConfig, seed: int) -> list[int]:
    if method in ("ragged", "uniform"):
        lo, hi = ragged_range(cfg.ragged)
        g = torch.Generator().manual_seed(1000 + seed)
        lens = torch.randint(lo, hi + 1, (cfg.ragged_batch,), generator=g).tolist()
        return lens if method == "ragged" else [sum(lens) // len(lens)] * len(lens)
    return [ctx] * batch * (cfg.waves if method in ("ar", "spec") else 1)


class Bench:
    def __init__(self, cfg: BatchBenchConfig):
        from ..model.api import load_any, parse_device
        from .decode import weight_bytes_per_step

        self.cfg = cfg
        self.device = parse_device(cfg.device)
        t0 = time.perf_counter()
        self.model, self.tok, self.dir = load_any(cfg.model, self.device)
        self.load_s = time.perf_counter() - t0
        self.weights = weight_bytes_per_step(self.model)
        self.copy_bw = d2d_bandwidth(1 << 30, 10) if self.device.type == "cuda" else None
        self.hf_model = None
        self.h2d_bw = None  # pinned host-to-device bandwidth, measured at the first offload cell
        self.draft = None  # loaded at the first vanilla cell

    def prompts(self, lens: list[int], seed: int) -> list[list[int]]:
        """Random token ids, or with --dataset real text: sequence i of seed s is ``long_prompt`` of seed 1000 s + i."""
        if self.cfg.dataset is not None:
            from ..data.corpora import long_prompt

            return [long_prompt(self.tok, n, 1000 * seed + i, self.cfg.dataset) for i, n in enumerate(lens)]
        g = torch.Generator().manual_seed(seed)
        return [torch.randint(10, self.model.cfg.vocab_size - 10, (n,), generator=g).tolist() for n in lens]

    def prompt_source(self) -> str:
        from ..data.corpora import corpus_version

        if self.cfg.dataset is None:
            return "random token ids"
        return f"corpus {self.cfg.dataset}" + (f" ({corpus_version(self.cfg.dataset)})"
                                                if corpus_version(self.cfg.dataset) else "")

    def floor(self, lens: list[int], step_s: float) -> dict:
        """Bytes a step reads (weights + the mean KV over the decode) and what that is of the copy bandwidth."""
        c, gen = self.model.cfg, self.cfg.gen_len
        kv = sum(n + gen / 2 for n in lens) * c.kv_bytes_per_token(self.model.dtype.itemsize)
        out = {"weight_bytes_per_step": self.weights, "kv_bytes_per_step_mean": kv}
        if self.copy_bw:
            achieved = (self.weights + kv) / step_s
            out.update(achieved_GBps=achieved / 1e9, copy_GBps=self.copy_bw / 1e9, mbu=achieved / self.copy_bw,
                       floor_ms=(self.weights + kv) / self.copy_bw * 1e3)
        return out

    def run(self, spec: RunSpec) -> dict:
        ctx, batch = spec.config["context"], spec.config["batch"]
        lens = prompt_lengths(spec.method, ctx, batch, self.cfg, spec.seed)
        if spec.method in ("offload", "press"):
            return self.uniform_generate(spec, ctx, batch)
        if spec.method == "spec":
            return self.speculate(spec, ctx, batch)
        slots = min(len(lens), batch) if spec.method == "ar" else len(lens)  # waves: batch in flight
        if spec.method != "hf":  # refused before it allocates
            check_gpu_memory(self.model.cfg, slots, max(lens) + self.cfg.gen_len, self.model.dtype.itemsize,
                             self.cfg.gpu_memory)
        free_memory()
        reset_peak(self.device)
        ps = self.prompts(lens, spec.seed)
        gen = GenerationConfig(max_new_tokens=self.cfg.gen_len, stop_on_eos=False,
                               prefill_chunk=self.cfg.prefill_chunk)
        m = self.hf(ps, gen) if spec.method == "hf" else self.ours(ps, gen, slots)
        step_s = m["decode_s"] / max(m["decode_steps"], 1)
        return {**m, "prompt_lens": lens if spec.method == "ragged" else None, "total_prompt_tokens": sum(lens),
                "batch": slots, "sequences": len(lens), "step_ms": step_s * 1e3,
                **self.floor(lens[:slots], step_s),
                "peak_gpu_bytes": peak_bytes(self.device), "device_name": device_name(self.device),
                "model_load_s": self.load_s, "prompts": self.prompt_source()}

    def uniform_generate(self, spec: RunSpec, ctx: int, batch: int) -> dict:
        """Offloaded or pressed AR at batch (uniform prompt lengths: ``decoding.autoregressive.generate``)."""
        from ..cache import make_cache
        from ..decoding.autoregressive import generate
        from ..runs.harness import h2d_bandwidth

        cfg, dev, n = self.cfg, self.device, self.cfg.offload_gen_len
        cap = ctx + n
        free_memory()
        reset_peak(dev)
        ids = torch.tensor(self.prompts([ctx] * batch, spec.seed), device=dev)
        gen = GenerationConfig(max_new_tokens=n, stop_on_eos=False, prefill_chunk=cfg.prefill_chunk)
        t0 = time.perf_counter()
        if spec.method == "offload":
            p = offload_placement(self.model.cfg, self.weights, batch, cap, self.model.dtype.itemsize, cfg.gpu_memory)
            cache = make_cache(self.model, p, batch, cap, graphs=dev.type == "cuda")
            what = f"PlacedKV at batch {batch}: {p.n_on_chip(self.model.cfg.n_layers)} layers on chip, the rest bf16"
        else:
            press = spec.config["press"]
            cache = make_cache(self.model, None, batch, cap, press=press, graphs=dev.type == "cuda")
            what = f"PressedKV ({press}) at batch {batch}"
        alloc_s = time.perf_counter() - t0
        r = generate(self.model, ids, gen, cache=cache)
        sync(dev)
        wall = time.perf_counter() - t0
        rep = cache.memory_report() or {}
        steps = r.decode_steps
        out = {"setup_s": alloc_s + r.setup_s, "prefill_s": r.ttft_s, "decode_s": r.decode_s, "decode_steps": steps,
               "capture_s": r.stats.get("capture_s"), "n_generated": r.n_generated,
               "decode_tok_per_s": r.tok_per_s, "e2e_s": wall, "e2e_tok_per_s": r.n_generated / wall,
               "engine": what, "batch": batch, "total_prompt_tokens": ctx * batch, "step_ms": r.ms_per_token,
               "peak_gpu_bytes": peak_bytes(dev), "device_name": device_name(dev), "model_load_s": self.load_s,
               "prompts": self.prompt_source(), "memory": rep}
        h2d0 = r.stats.get("h2d_bytes_before_decode")
        if h2d0 is not None and rep.get("h2d_bytes_total") is not None and dev.type == "cuda":
            per_step = (rep["h2d_bytes_total"] - h2d0) / max(steps, 1)
            if self.h2d_bw is None:
                self.h2d_bw = h2d_bandwidth(1 << 30, 8)
            out.update(h2d_bytes_per_step=per_step, h2d_GBps=self.h2d_bw / 1e9,
                       transfer_floor_ms=per_step / self.h2d_bw * 1e3,
                       vs_transfer_floor=r.ms_per_token / (per_step / self.h2d_bw * 1e3) if per_step else None)
        return out

    def speculate(self, spec: RunSpec, ctx: int, batch: int) -> dict:
        """Speculation at batch (``decoding/batch_spec.py``, graphed on CUDA), on uniform prompts."""
        from ..decoding.batch_spec import BatchSpecConfig, generate_batch_spec
        from ..model.api import load_any

        mode, gamma = spec.config["mode"], spec.config["gamma"]
        check_gpu_memory(self.model.cfg, batch, ctx + self.cfg.gen_len + gamma + 1, self.model.dtype.itemsize,
                         self.cfg.gpu_memory)
        if mode != "self" and self.draft is None:
            self.draft = load_any(self.cfg.draft, self.device)[0]
        free_memory()
        reset_peak(self.device)
        ps = self.prompts([ctx] * batch * self.cfg.waves, spec.seed)
        gen = GenerationConfig(max_new_tokens=self.cfg.gen_len, stop_on_eos=False,
                               prefill_chunk=self.cfg.prefill_chunk)
        sc = BatchSpecConfig(mode, gamma, sinks=self.cfg.sinks, window=spec.config["window"],
                             auto=spec.config.get("auto", False), draft_gamma=self.cfg.draft_gamma,
                             draft_window=self.cfg.draft_window if mode != "self" else None, draft_sinks=self.cfg.sinks)
        t0 = time.perf_counter()
        r = generate_batch_spec(self.model, self.draft if mode != "self" else None, ps, gen, sc, max_batch=batch)
        sync(self.device)
        wall = time.perf_counter() - t0
        st = r.summary()
        dw = "" if sc.draft_window is None else f" over a window of {sc.draft_window} (sinks {sc.draft_sinks})"
        return {k: st[k] for k in ("setup_s", "prefill_s", "decode_s", "decode_steps", "n_generated",
                                   "acceptance", "tokens_per_round", "rounds", "capture_s", "calibration_s",
                                   "cost_model", "eager_steps", "draft_eager_steps")} | {
            "l1_acceptance": st.get("l1_acceptance"), "l1_runs": st.get("l1_runs"),
            "decode_tok_per_s": r.tok_per_s, "e2e_s": wall, "e2e_tok_per_s": r.n_generated / wall,
            "engine": f"BatchSpecEngine {mode} γ={'auto≤' if sc.auto else ''}{gamma}"
                      + {"self": f" (window {sc.window}, sinks {sc.sinks})",
                         "vanilla": f" (draft {self.cfg.draft}{dw})",
                         "mspeckv": f" (draft {self.cfg.draft}{dw} -> window {sc.window}, sinks {sc.sinks}, draft γ "
                                    f"{sc.draft_gamma} -> full KV)"}[mode]
                      + (", CUDA graphs" if st["graphs"] else ", eager"),
            "batch": batch, "sequences": len(ps), "total_prompt_tokens": ctx * len(ps),
            "round_ms": st["decode_s"] / st["rounds"] * 1e3 if st["rounds"] else None, "step_ms": None,
            "peak_gpu_bytes": peak_bytes(self.device), "device_name": device_name(self.device),
            "model_load_s": self.load_s, "prompts": self.prompt_source(), "outputs": [q.tokens for q in r.seqs]}

    def ours(self, ps, gen, slots: int) -> dict:
        from ..decoding.batch import generate_batch

        t0 = time.perf_counter()
        r = generate_batch(self.model, ps, gen, max_batch=slots)
        sync(self.device)
        wall = time.perf_counter() - t0
        s = r.summary()
        return {k: s[k] for k in ("setup_s", "prefill_s", "decode_s", "decode_steps", "capture_s", "n_generated",
                                  "kv_bytes_allocated")} | {
            "decode_tok_per_s": r.tok_per_s, "e2e_s": wall, "e2e_tok_per_s": r.n_generated / wall,
            "engine": "mspeckv BatchEngine (BatchKV, CUDA graphs per batch bucket)" if r.stats["graphs"]
            else "mspeckv BatchEngine (eager)", "outputs": [q.tokens for q in r.seqs]}

    def hf(self, ps, gen) -> dict:
        """transformers' generate over the same prompts (uniform lengths: one (B, T) tensor, no padding)."""
        import transformers
        from transformers import AutoModelForCausalLM

        if len({len(p) for p in ps}) != 1:
            raise ValueError("the transformers peer runs uniform prompt lengths only")
        if self.hf_model is None and self.dir is not None:
            self.hf_model = AutoModelForCausalLM.from_pretrained(str(self.dir), dtype=self.model.dtype)
        elif self.hf_model is None:  # random weights: transformers' model of the same shape, holding our weights
            from transformers import AutoConfig

            from ..model.api import RANDOM_SHAPES

            kw = dict(RANDOM_SHAPES[self.cfg.model.split(":", 1)[1]])
            hf = AutoModelForCausalLM.from_config(AutoConfig.for_model(kw.pop("model_type"), **kw),
                                                  dtype=self.model.dtype)
            missing, unexpected = hf.load_state_dict(self.model.state_dict(), strict=False)
            if unexpected or [k for k in missing if "rotary" not in k]:
                raise RuntimeError(f"our weights do not map onto transformers' model: {missing[:3]} {unexpected[:3]}")
            self.hf_model = hf
        self.hf_model = self.hf_model.to(self.device).eval()
        hf = self.hf_model
        ids = torch.tensor(ps, device=self.device)
        kw = dict(attention_mask=torch.ones_like(ids), do_sample=False, eos_token_id=None,
                  pad_token_id=hf.generation_config.pad_token_id or 0, cache_implementation="static")

        def call(n: int) -> float:
            sync(self.device)
            t = time.perf_counter()
            with torch.inference_mode():
                out = hf.generate(ids, max_new_tokens=n, min_new_tokens=n, **kw)
            sync(self.device)
            if out.shape[1] != ids.shape[1] + n:
                raise RuntimeError(f"transformers generated {out.shape[1] - ids.shape[1]} tokens, {n} were asked for")
            return time.perf_counter() - t

        first = call(gen.max_new_tokens)  # the first call compiles (when transformers compiles): its setup
        ttft = call(1)
        total = call(gen.max_new_tokens)
        compiled = getattr(hf, "_compiled_call", None) is not None
        n = len(ps) * gen.max_new_tokens
        # setup: the compiling first call less a warm one (noise can make it slightly negative; it is not clamped)
        return {"setup_s": first - total, "prefill_s": ttft, "decode_s": total - ttft,
                "decode_steps": gen.max_new_tokens - 1, "capture_s": None, "n_generated": n,
                "decode_tok_per_s": len(ps) * (gen.max_new_tokens - 1) / (total - ttft), "e2e_s": first,
                "e2e_tok_per_s": n / first, "kv_bytes_allocated": None,
                "engine": f"transformers {transformers.__version__} generate, StaticCache"
                          f"{', torch.compile (auto)' if compiled else ', eager'}",
                "hf_warm_total_s": total}


def plan(cfg: BatchBenchConfig) -> list[RunSpec]:
    cells = [("ar", c, b) for c in cfg.contexts for b in cfg.batches]
    if cfg.ragged:
        cells += [("ragged", 0, cfg.ragged_batch), ("uniform", 0, cfg.ragged_batch)]
    cells += [("hf", *hf_cell(c)) for c in cfg.hf]
    cells += [("offload", *hf_cell(c)) for c in cfg.offload]
    settings = {k: x for k, x in asdict(cfg).items() if k != "out"}
    w = "" if cfg.waves == 1 else f"/w{cfg.waves}"  # another --waves is another cell (and another run file)
    specs = [RunSpec("batch", m, "cell", cfg.ragged if m in ("ragged", "uniform") else f"{c}x{b}{w * (m == 'ar')}", s,
                     {"context": c, "batch": b, **settings}) for m, c, b in cells for s in range(cfg.seeds)]
    for text in cfg.spec:
        mode, gamma, auto, window, c, b = spec_cell(text)
        specs += [RunSpec("batch", "spec", "cell", text + w, s, {**settings, "context": c, "batch": b, "mode": mode,
                                                             "gamma": gamma, "auto": auto,
                                                             "window": window or cfg.window})
                  for s in range(cfg.seeds)]
    for text in cfg.presses:
        press, c, b = press_cell(text)
        specs += [RunSpec("batch", "press", "cell", f"{press}@{c}x{b}", s, {"context": c, "batch": b, "press": press,
                                                                           **settings}) for s in range(cfg.seeds)]
    return specs


def agreement(outs: list[list[int]], ref: list[list[int]]) -> tuple[int, float]:
    """Sequences identical to the reference's, and the mean share of each sequence before its first divergence."""
    same, share = 0, 0.0
    for a, b in zip(outs, ref, strict=True):
        k = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
        same += a == b
        share += k / max(len(b), 1)
    return same, share / len(ref)


def agree_with_ar(records: list[dict]) -> dict:
    """Per speculation cell: its outputs against AR's at the same cell and seed (same prompts), over every seed that
    has both: {cell: (identical sequences, sequences, mean share before the first divergence)}."""
    ar = {(r["x"], r["seed"]): r["metrics"].get("outputs") for r in records
          if r["method"] == "ar" and r["status"] == "ok"}
    acc = {}
    for r in records:
        ref = ar.get((str(r["x"]).rpartition("@")[2], r["seed"])) if r["method"] == "spec" else None
        outs = r["metrics"].get("outputs") if r["status"] == "ok" else None
        if ref and outs:
            same, share = agreement(outs, ref)
            n, m, sh = acc.get(r["x"], (0, 0, []))
            acc[r["x"]] = (n + same, m + len(ref), sh + [share])
    return {x: (n, m, statistics.mean(sh)) for x, (n, m, sh) in acc.items()}


def summarize(records: list[dict]) -> list[dict]:
    """One row per cell: medians over its seeds, with the spread."""
    by = {}
    for r in records:
        by.setdefault((r["method"], r["x"]), []).append(r)
    rows = []
    for (method, x), rs in by.items():
        ok = [r["metrics"] for r in rs if r["status"] == "ok"]
        row = {"method": method, "cell": x, "runs": len(ok), "errors": [r["error"] for r in rs if r["error"]][:1]}
        if ok:
            for k in ("decode_tok_per_s", "step_ms", "mbu", "floor_ms", "e2e_s", "e2e_tok_per_s", "setup_s",
                      "capture_s", "prefill_s", "decode_s", "peak_gpu_bytes", "batch", "total_prompt_tokens",
                      "transfer_floor_ms", "vs_transfer_floor", "h2d_bytes_per_step", "acceptance",
                      "tokens_per_round"):
                xs = [m.get(k) for m in ok if m.get(k) is not None]
                row[k] = statistics.median(xs) if xs else None
                if k == "decode_tok_per_s" and len(xs) > 1:
                    row["decode_tok_per_s_range"] = [min(xs), max(xs)]
            row["engine"] = ok[0]["engine"]
            row["device_name"] = ok[0]["device_name"]
        rows.append(row)
    ar = {r["cell"]: r for r in rows if r["method"] == "ar"}
    agree = agree_with_ar(records)
    for r in rows:
        if r["cell"] in agree and r["method"] == "spec":  # per sequence, against AR's outputs on the same prompts
            n, m, share = agree[r["cell"]]
            r.update(agree_seqs=n / m, agree_share=share, agree_n=m)
        # speculation against AR at its cell, both measured in this run: decode-only and end to end
        base = ar.get(str(r["cell"]).rpartition("@")[2]) if r["method"] == "spec" else None
        if base is not None and r.get("decode_tok_per_s") and base.get("decode_tok_per_s"):
            r["vs_ar_decode"] = r["decode_tok_per_s"] / base["decode_tok_per_s"]
            r["vs_ar_e2e"] = r["e2e_tok_per_s"] / base["e2e_tok_per_s"]
    return rows


def run(cfg: BatchBenchConfig, command: str = "") -> dict:
    cfg.validate()
    b = Bench(cfg)
    store = RunStore(cfg.out)
    recs = [r.to_dict() for r in run_sweep(store, plan(cfg), b.run)]
    res = {"bench": "batch", "config": asdict(cfg), "rows": summarize(recs), "copy_GBps":
           b.copy_bw / 1e9 if b.copy_bw else None, "device_name": device_name(b.device), "model_load_s": b.load_s}
    return write_bench(cfg.out, "batch", res, render, command)


def render(res: dict) -> str:
    cols = [("method", "{}"), ("cell", "{}"), ("runs", "{}"), ("decode_tok_per_s", "{:.0f}"), ("step_ms", "{:.2f}"),
            ("floor_ms", "{:.2f}"), ("mbu", "{:.1%}"), ("transfer_floor_ms", "{:.1f}"), ("vs_transfer_floor", "{:.2f}"),
            ("setup_s", "{:.2f}"), ("capture_s", "{:.2f}"),
            ("prefill_s", "{:.2f}"), ("decode_s", "{:.2f}"), ("e2e_s", "{:.2f}"), ("e2e_tok_per_s", "{:.0f}"),
            ("acceptance", "{:.2f}"), ("tokens_per_round", "{:.2f}"), ("vs_ar_decode", "{:.2f}"),
            ("vs_ar_e2e", "{:.2f}"), ("agree_seqs", "{:.0%}"), ("agree_share", "{:.0%}")]
    lines = [f"# bench batch: {res['config']['model']} on {res['device_name']} (copy bandwidth "
             f"{fmt(res['copy_GBps'], '{:.0f}')} GB/s)", "",
             "| " + " | ".join(c for c, _ in cols) + " | engine / error |", "|" + "---|" * (len(cols) + 1)]
    for r in res["rows"]:
        cells = [f.format(r[c]) if c in ("method", "cell", "runs") else fmt(r.get(c), f) for c, f in cols]
        lines.append("| " + " | ".join(cells) + f" | {r.get('engine') or (r['errors'] or [''])[0]} |")
    return "\n".join(lines) + "\n"


def line(res: dict) -> dict:
    return {"bench": "batch", "device_name": res["device_name"], "rows": [
        {k: r.get(k) for k in ("method", "cell", "decode_tok_per_s", "mbu", "e2e_tok_per_s", "vs_ar_decode")}
        for r in res["rows"]]}
