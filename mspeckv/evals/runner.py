"""``mspeckv eval {ppl,kl,attention,ece,needle,ruler,recon,gsm8k,accept,speed,all,report}`` (or a comma list such
as ``ppl,recon,speed``), on the run layer's template: :class:`EvalConfig` (its fields are the CLI flags, validated
in ``__post_init__``) -> :func:`run_eval` (cells, resumable) -> rows -> ``evals.report.render`` -> one JSON line.

Every invocation evaluates the full-cache baseline (variant ``full``: every layer's KV dense on the device, no press)
next to the asked variants, on the same inputs. Variants are the product of ``--press`` (none, or each spec) and
``--kv-quant`` (each format), minus the baseline. Metric families: ``FAMILIES`` (one module each, documenting its
protocol; ``accept`` needs ``--draft``).

Cells: ``<output-dir>/cells/<metric>__<variant>__ctx=<n>.json``, one per (metric, variant, context), written
atomically with the run's metadata and the settings that shaped it; an existing cell is skipped, so an interrupted
evaluation resumes where it stopped. Every input (model config, contexts, data, presses, placements, the settings
of cells already in the directory) is checked before any weights load and before anything is written.

Held-out confirmation (``--split``): choose a configuration from a grid run with ``--split select``, then run it
alone with ``--split confirm``. The halves share no document (``data.corpora.doc_split``, by a hash of each
document's name), confirm's needle/RULER/accept prompts use seeds 500 further on (:meth:`EvalConfig.task_seed`),
and each half writes its own folder (``results/quality/<model>-<split>``; the split is a recorded setting, so the
other half's cells are refused in it).
"""

from __future__ import annotations

import importlib
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..data.corpora import SPLITS
from ..runs.store import free_cuda_memory
from ..runs.template import CellStore, Partial, check, opt
from .variants import FLOOR_SINKS, Variant, floor_spec

FORMATS = ("none", "int8", "int4", "int2")
CONFIRM_SEEDS = 500  # the confirm split's needle/RULER/accept seeds are seed * 1000 + 500 + i: no select run's


@dataclass(frozen=True)
class Family:
    name: str
    metrics: tuple[str, ...]
    module: str  # mspeckv.evals.<module>
    fn: str
    settings: tuple[str, ...]  # EvalConfig fields that shape the results (recorded in each cell)
    contexts: str | None  # EvalConfig field with this family's contexts (None: one cell at context 0)
    needs_draft: bool = False
    # the variants of a context share one pass (lm: the baseline's logits; recon: the full cache's prefill); the
    # other families run one variant per call, so each variant's cells are written as soon as it finishes
    shared_pass: bool = False


TEXT = ("dataset", "split", "seed")  # the settings of every family that reads real text
FAMILIES = (
    Family("lm", ("ppl", "kl", "ece", "attention"), "lm", "run", (*TEXT, "windows", "stride", "scored", "score_chunk",
           "attn_queries", "prefill_chunk", "floor"), "context", shared_pass=True),
    Family("recon", ("recon",), "recon", "run", (*TEXT, "prefill_chunk"), "context", shared_pass=True),
    Family("speed", ("speed",), "speed", "run", (*TEXT, "prefill_chunk", "speed_gen", "speed_graphs", "speed_runs"),
           "context"),
    Family("needle", ("needle",), "retrieval", "run_needle",
           (*TEXT, "needle_depths", "needle_trials", "needle_count", "prefill_chunk"), "needle_context"),
    Family("ruler", ("ruler",), "retrieval", "run_ruler",
           (*TEXT, "ruler_samples", "ruler_keys", "vt_hops", "prefill_chunk"), "needle_context"),
    Family("gsm8k", ("gsm8k",), "gsm8k", "run", ("gsm8k_items", "gsm8k_max_new", "gsm8k_graphs", "prefill_chunk"),
           None),
    Family("accept", ("accept",), "accept", "run", (*TEXT, "draft", "accept_prompts", "accept_gen", "accept_budget",
           "gamma", "draft_gamma"), "context", needs_draft=True),
)
METRICS = tuple(m for f in FAMILIES for m in f.metrics)
FAMILY_OF = {m: f for f in FAMILIES for m in f.metrics}
ACTIONS = (*METRICS, "all", "report")


@dataclass(frozen=True)
class EvalConfig:
    metrics: tuple[str, ...] = opt(("ppl",), "metrics to run", cli=False)
    model: str = opt("qwen2.5-coder-1.5b", "embedded name, HF directory, .gguf file or hub id")
    device: str | None = opt(None, "cpu | cuda (default: cuda if available)")
    press: tuple[str, ...] = opt((), "press spec, preset name or .yaml file, e.g. snapkv:budget=1024; crossed with "
                                     "--kv-quant (see above)", nargs=True)
    kv_quant: tuple[str, ...] = opt(("none",), "formats of the offloaded KV, crossed with --press (see above)",
                                    choices=FORMATS)
    on_chip: int | None = opt(None, "layers whose KV stays dense on the device (default: all; 0 when a --kv-quant "
                                    "format is given, i.e. every layer quantized)")
    kv_group_size: int = opt(64, "quantization group (tokens for keys, channels for values)")
    kv_residual: int = opt(64, "newest tokens kept in full precision before being quantized (KIVI's residual)")
    resident_layers: int = opt(0, "offloaded layers also kept resident on the device (static policy)")
    context: tuple[int, ...] = opt((2048, 8192, 32768), "contexts for ppl/kl/ece/attention/recon/speed/accept")
    needle_context: tuple[int, ...] = opt((4096, 8192, 16384, 32768), "contexts for needle and ruler")
    dataset: str | None = opt(None, "bbc (default; short, unrelated articles: no goal is judged on it), pycode (the "
                                    "standard library, one module per document), pypackages (one stdlib package per "
                                    "document: for 32K windows), shakespeare (one play per document), or a "
                                    ".txt/.jsonl/directory path")
    split: str = opt("all", "held-out data: 'select' or 'confirm' takes every family's text from the documents of that "
                            "half only (by a hash of their names) and, for confirm, needle/RULER/accept seeds no "
                            "select run uses; its own output folder by default (results/quality/<model>-<split>)",
                     choices=SPLITS)
    seed: int = opt(0, "seed of the text windows and synthetic prompts")
    windows: int = opt(8, "ppl: windows per context (each inside one document; the PPL Δ interval resamples them)")
    stride: int | None = opt(None, "ppl: tokens between the starts of one document's windows (default: the window: "
                                   "no overlap)")
    floor: int = opt(256, "ppl: also score keeping only the last N prefix tokens (streaming, with its 4 sinks): the "
                          "context-sensitivity row, at contexts whose prefix is longer; 0 leaves it out, and then "
                          "no goal is judged")
    scored: int = opt(256, "ppl: scored span at the end of each window")
    score_chunk: int = opt(32, "ppl: tokens per forward when feeding the scored span through the cache")
    attn_queries: int = opt(64, "attention: sampled scored positions per window")
    prefill_chunk: int = opt(1024, "tokens per prefill forward")
    needle_depths: tuple[float, ...] = opt((0.0, 0.25, 0.5, 0.75, 1.0), "needle: depths (0 = start, 1 = end)")
    needle_trials: int = opt(10, "needle: prompts per (context, depth) (10 x 5 depths: 50 needles per cell)")
    needle_count: int = opt(4, "needle: distinct needles per haystack (one is asked for)")
    ruler_samples: int = opt(8, "ruler: prompts per task and context")
    ruler_keys: int = opt(8, "ruler: needles in the multi-key task")
    vt_hops: int = opt(4, "ruler: assignments after the first in the variable-tracking chain")
    gsm8k_items: int = opt(200, "gsm8k: items evaluated (the first N of the test file)")
    gsm8k_max_new: int = opt(256, "gsm8k: most generated tokens per item")
    gsm8k_shard: tuple[int, ...] = opt((0, 1), "gsm8k: K,N runs this process's share, the items whose index % N == K "
                                               "(parallel jobs on one variant; the job that completes the last item "
                                               "writes the cell)")
    gsm8k_graphs: bool = opt(False, "gsm8k: decode replaying CUDA graphs where the cache allows (the full cache, "
                                    "placements and presses that keep dense rows; codes and latents stay eager); "
                                    "same model, different kernels")
    speed_gen: int = opt(64, "speed: generated tokens per variant and context")
    speed_runs: int = opt(2, "speed: timed generations per variant and context, after an untimed one at the same "
                                "shape; TTFT and TPOT are their medians, every run is kept in the cell")
    speed_graphs: bool = opt(False, "speed: decode replaying CUDA graphs where the cache allows (the full cache, "
                                    "placements, dense presses); TPOT then times the cache rather than the host's "
                                    "launches. Codes and latents stay eager; each cell records what ran")
    draft: str = opt("qwen2.5-coder-0.5b", "accept: draft model of the MSpecKV hierarchy")
    accept_prompts: int = opt(2, "accept: prompts per context")
    accept_gen: int = opt(128, "accept: generated tokens per prompt")
    accept_budget: int = opt(4096, "accept: retrieval budget of the baseline's middle level")
    gamma: int = opt(8, "accept: proposals per full-KV verification")
    draft_gamma: int = opt(4, "accept: draft proposals per middle-level verification")
    output_dir: str | None = opt(None, "where cells and summaries go (default results/quality/<model>)")
    no_baseline: bool = opt(False, "leave the full-cache baseline's cells to another invocation into the same "
                                   "--output-dir (parallel runs on one GPU); not with ppl/kl/ece/attention, which "
                                   "need its logits in memory")
    no_plots: bool = opt(False, "skip the PNG plots")
    dry_run: bool = opt(False, "check every input and print the cells still to run; load and write nothing")

    def __post_init__(self):
        for m in self.metrics:
            check(m in METRICS, "metric", f"'{m}' is unknown; choose from {', '.join(ACTIONS)} (or a comma list)")
        check(bool(self.metrics), "metric", "names no metric")
        for name in ("context", "needle_context"):
            flag = "--" + name.replace("_", "-")
            vals = getattr(self, name)
            check(bool(vals), flag, "is empty")
            check(all(c >= 2 for c in vals), flag, f"values must be >= 2, got {','.join(map(str, vals))}")
        check(all(0.0 <= d <= 1.0 for d in self.needle_depths), "--needle-depths", "must lie in [0, 1]")
        for name in ("windows", "scored", "score_chunk", "attn_queries", "prefill_chunk", "needle_trials",
                     "needle_count", "ruler_samples", "ruler_keys", "vt_hops", "gsm8k_items", "gsm8k_max_new",
                     "speed_gen", "speed_runs", "accept_prompts", "accept_gen", "accept_budget", "gamma", "draft_gamma",
                     "kv_group_size"):
            check(getattr(self, name) >= 1, "--" + name.replace("_", "-"), f"must be >= 1, got {getattr(self, name)}")
        check(len(self.gsm8k_shard) == 2 and 0 <= self.gsm8k_shard[0] < self.gsm8k_shard[1], "--gsm8k-shard",
              f"must be K,N with 0 <= K < N, got {','.join(map(str, self.gsm8k_shard))}")
        check(self.kv_residual >= 0, "--kv-residual", f"must be >= 0, got {self.kv_residual}")
        check(self.floor >= 0, "--floor", f"must be >= 0, got {self.floor}")
        for name in ("needle_trials", "ruler_samples", "accept_prompts"):
            check(getattr(self, name) <= CONFIRM_SEEDS, "--" + name.replace("_", "-"),
                  f"must be <= {CONFIRM_SEEDS} (the confirm split's seeds start {CONFIRM_SEEDS} further on)")
        check(self.stride is None or self.stride >= 1, "--stride", f"must be >= 1, got {self.stride}")
        lm = [m for m in self.metrics if FAMILY_OF[m].name == "lm"]
        if lm:
            short = [c for c in self.context if c <= self.scored]
            check(not short, "--scored", f"{self.scored} must be shorter than every --context (not: "
                                         f"{','.join(map(str, short))})")
        check(self.needle_count <= 32, "--needle-count", "must be <= 32 (distinct keys)")
        check(self.ruler_keys <= 32, "--ruler-keys", "must be <= 32 (distinct keys)")
        check(not (self.no_baseline and lm), "--no-baseline", f"cannot be used with {','.join(lm)}: those compare "
              f"with the baseline's logits in the same pass; run them without it")
        check(len(set(self.press)) == len(self.press), "--press", "names a spec twice")
        check(len(set(self.kv_quant)) == len(self.kv_quant), "--kv-quant", "names a format twice")
        self.variants()  # placement errors (with the Placement's own flag names)

    # ---------------------------------------------------------------------------------------------- variants
    def placement(self, fmt: str):
        from ..kv.placement import Placement

        if fmt == "none" and self.on_chip is None:
            return None
        on_chip = self.on_chip if self.on_chip is not None else 0
        return Placement(on_chip=on_chip, kv_quant=fmt, kv_group_size=self.kv_group_size,
                         rollback_slack=self.kv_residual, resident_layers=self.resident_layers,
                         resident_policy="static")

    def variants(self) -> list[Variant]:
        """The baseline first, then every (press, format) pair that is not the baseline."""
        out = [Variant()]
        for press in (None, *self.press):
            for fmt in self.kv_quant:
                v = Variant(press, self.placement(fmt))
                if not v.is_baseline and v not in out:
                    out.append(v)
        return out

    def family_variants(self, fam: Family, context: int) -> list[Variant]:
        """The variants a family runs at a context: ``variants()``, and for the lm family the context floor where
        the prefix is longer than what the floor keeps."""
        out = self.variants()
        if fam.name == "lm" and self.floor and context - self.scored > self.floor + FLOOR_SINKS:
            floor = Variant(floor_spec(self.floor))
            out += [floor] if floor not in out else []
        return out

    def task_seed(self, i: int) -> int:
        """The seed of the i-th needle/RULER/accept prompt: ``seed * 1000 + i``, plus CONFIRM_SEEDS in the confirm
        split."""
        return self.seed * 1000 + i + (CONFIRM_SEEDS if self.split == "confirm" else 0)

    def out_dir(self) -> Path:
        if self.output_dir:
            return Path(self.output_dir)
        tag = "".join(c if c.isalnum() or c in "._-" else "-" for c in Path(self.model.replace(":", "-")).name)
        return Path("results/quality") / ((tag or "model") + ("" if self.split == "all" else f"-{self.split}"))

    def contexts(self, fam: Family) -> tuple[int, ...]:
        return (0,) if fam.contexts is None else getattr(self, fam.contexts)

    def settings(self, fam: Family) -> dict[str, Any]:
        return {"model": self.model, **{k: getattr(self, k) for k in fam.settings}}


# ------------------------------------------------------------------------------------------------------ running
class EvalContext:
    """What a family's ``run(ev, variants, context)`` gets: the config, the loaded model/tokenizer (and draft)."""

    def __init__(self, cfg: EvalConfig, model, tok, draft=None, quiet: bool = False, store: CellStore | None = None):
        self.cfg, self.model, self.tok, self.draft, self.quiet = cfg, model, tok, draft, quiet
        self.store = store
        self.settings: dict = {}  # the running family's settings (set by run_eval before each cell group)
        self.t0 = time.perf_counter()

    def partial(self, metric: str, variant: str, context: int) -> Partial:
        """Per-item checkpoint of a long cell (GSM8K): resumes an interrupted variant item by item."""
        if self.store is None:
            return Partial(None, self.settings)
        return self.store.partial(metric, variant, context, self.settings)

    def progress(self, msg: str) -> None:
        if not self.quiet:
            print(f"[{time.perf_counter() - self.t0:7.1f} s] {msg}", file=sys.stderr, flush=True)


def families(metrics: tuple[str, ...]) -> list[Family]:
    return [f for f in FAMILIES if any(m in metrics for m in f.metrics)]


def plan(cfg: EvalConfig, store: CellStore) -> list[tuple[Family, int, list[Variant]]]:
    """(family, context, variants to run) for every cell not yet stored. The lm family always reruns the baseline
    first (KL and agreement need its logits in memory)."""
    todo = []
    for fam in families(cfg.metrics):
        asked = [m for m in fam.metrics if m in cfg.metrics]
        for c in cfg.contexts(fam):
            variants = cfg.family_variants(fam, c)
            missing = [v for v in variants if any(not store.done(m, v.name, c) for m in asked)
                       and not (cfg.no_baseline and v.is_baseline)]
            if fam.name == "lm" and missing and not missing[0].is_baseline:
                missing = [variants[0], *missing]
            if missing:
                todo.append((fam, c, missing))
    return todo


def asked(cfg: EvalConfig) -> list[tuple[str, str, int]]:
    """Every (metric, variant, context) cell the config asks for (what ``plan`` runs when it is not stored)."""
    return [(m, v.name, c) for fam in families(cfg.metrics) for c in cfg.contexts(fam)
            for v in cfg.family_variants(fam, c) if not (cfg.no_baseline and v.is_baseline)
            for m in fam.metrics if m in cfg.metrics]


def validate(cfg: EvalConfig, store: CellStore) -> None:
    """Every check that can fail before weights load (one ValueError/FileNotFoundError each)."""
    from ..model.api import model_config

    if cfg.model.startswith("random:"):
        raise ValueError(f"--model {cfg.model}: random-weight models have no tokenizer and their outputs mean nothing;"
                         " evaluate a real model")
    mc = model_config(cfg.model)
    for fam in families(cfg.metrics):
        if fam.contexts is not None:
            flag = "--" + fam.contexts.replace("_", "-")
            over = [c for c in cfg.contexts(fam) if c > mc.max_position]
            check(not over, flag, f"{','.join(map(str, over))} exceeds the model's {mc.max_position} positions")
            gen = {"speed": ("--speed-gen", cfg.speed_gen), "accept": ("--accept-gen", cfg.accept_gen)}.get(fam.name)
            if gen is not None:  # these evals prompt with context - generated tokens
                short = [c for c in cfg.contexts(fam) if c - gen[1] < 2]
                check(not short, gen[0], f"{gen[1]} leaves no prompt at context {','.join(map(str, short))}")
        for m in fam.metrics:
            store.check_settings(m, cfg.settings(fam))
    for v in cfg.variants():
        v.validate(mc.n_layers, mc.head_dim)
    if any(f.name != "gsm8k" for f in families(cfg.metrics)):
        from ..data.corpora import load_documents, split_documents, unrelated

        split_documents(load_documents(cfg.dataset), cfg.split)
        if "lm" in [f.name for f in families(cfg.metrics)] and not unrelated(cfg.dataset):
            _check_windows(cfg)
    if "gsm8k" in cfg.metrics:
        from ..data.datasets import load_gsm8k
        from .gsm8k import split

        split(load_gsm8k(), cfg.gsm8k_items)
    if "accept" in cfg.metrics:
        from .variants import spec_config

        dc = model_config(cfg.draft)
        check(dc.vocab_size == mc.vocab_size, "--draft", f"has vocabulary {dc.vocab_size}, the model {mc.vocab_size}")
        for v in cfg.variants():
            spec_config(v, gamma=cfg.gamma, draft_gamma=cfg.draft_gamma, budget=cfg.accept_budget, chunk=8)
    if any(m in cfg.metrics for m in ("needle", "ruler", "gsm8k")):
        _check_prompts(cfg, mc)


def _check_windows(cfg: EvalConfig) -> None:
    """Cut every context's PPL windows with the model's tokenizer (no weights): a corpus without enough windows
    inside one document fails here, saying what to change."""
    from ..data.corpora import doc_windows
    from ..model.api import load_tokenizer
    from ..model.loading import resolve

    tok = load_tokenizer(resolve(cfg.model))
    for c in cfg.context:
        try:
            doc_windows(tok, c + 1, cfg.windows, cfg.seed, cfg.dataset, cfg.split, cfg.stride)
        except ValueError as e:
            raise ValueError(f"--context {c}: {e}") from None


def _check_prompts(cfg: EvalConfig, mc) -> None:
    """Build the shortest synthetic prompts and measure the longest GSM8K prompt with the model's tokenizer (no
    weights): a context too short for the task, or a prompt past the model's positions, fails here."""
    from ..model.api import load_tokenizer
    from ..model.loading import resolve
    from . import synth

    tok = load_tokenizer(resolve(cfg.model))
    c = min(cfg.needle_context) - synth.GEN_MAX
    try:
        if "needle" in cfg.metrics:
            synth.needle_prompt(tok, c, 0.5, seed=cfg.seed, n_needles=cfg.needle_count, dataset=cfg.dataset,
                                split=cfg.split)
        if "ruler" in cfg.metrics:
            synth.multikey_prompt(tok, c, seed=cfg.seed, n_keys=cfg.ruler_keys, dataset=cfg.dataset, split=cfg.split)
            synth.vartrack_prompt(tok, c, seed=cfg.seed, hops=cfg.vt_hops, dataset=cfg.dataset, split=cfg.split)
    except ValueError as e:
        raise ValueError(f"--needle-context {c + synth.GEN_MAX}: prompts have context - {synth.GEN_MAX} tokens, "
                         f"and {e}") from None
    if "gsm8k" in cfg.metrics:
        from ..data.datasets import load_gsm8k
        from .gsm8k import prompt, split

        items, shots = split(load_gsm8k(), cfg.gsm8k_items)
        longest = max(len(tok(prompt(it, shots), add_special_tokens=False).input_ids) for it in items)
        check(longest + cfg.gsm8k_max_new <= mc.max_position, "--gsm8k-max-new",
              f"{cfg.gsm8k_max_new} plus the longest 5-shot prompt ({longest} tokens) exceeds the model's "
              f"{mc.max_position} positions")


def run_eval(cfg: EvalConfig, command: str = "", quiet: bool = False) -> dict[str, Any]:
    """Run every missing cell, then render the directory. Returns the summary (``report.render``)."""
    from . import report

    store = CellStore(cfg.out_dir())
    validate(cfg, store)
    todo = plan(cfg, store)
    if cfg.dry_run:
        return {"dry_run": True, "dir": str(store.dir),
                "todo": [{"family": f.name, "context": c, "variants": [v.name for v in vs]} for f, c, vs in todo]}
    store.clean()
    store.expect(asked(cfg))
    failed: list[str] = []
    if todo:
        from ..model.api import load

        model, tok, _ = load(cfg.model, cfg.device)
        draft = load(cfg.draft, cfg.device)[0] if any(f.needs_draft for f, _, _ in todo) else None
        ev = EvalContext(cfg, model, tok, draft, quiet, store)
        _append_command(store.dir, command)
        for fam, c, vs in todo:
            ev.progress(f"{fam.name} at context {c}: {', '.join(v.name for v in vs)}")
            fn = getattr(importlib.import_module(f"mspeckv.evals.{fam.module}"), fam.fn)
            ev.settings = cfg.settings(fam)
            groups = [vs] if fam.shared_pass else [[v] for v in vs]
            while groups:
                group = groups.pop(0)
                try:
                    res = fn(ev, group, c)
                except Exception as e:  # a failed cell is reported and not written; the others go on
                    if type(e).__name__ != "OutOfMemoryError" and not isinstance(e, RuntimeError | ValueError):
                        raise
                    free_cuda_memory()
                    alone = [v for v in group if not (fam.name == "lm" and v.is_baseline)]
                    if len(alone) > 1:  # retry one variant at a time, so one bad variant costs only its own cells
                        ev.progress(f"{fam.name}@{c} failed ({type(e).__name__}); retrying each variant alone")
                        groups += [[vs[0], v] if fam.name == "lm" else [v] for v in alone]
                        continue
                    who = ",".join(v.name for v in alone) or "full"
                    failed.append(f"{fam.name}@{c} {who}: {type(e).__name__}: "
                                  f"{str(e).splitlines()[0] if str(e) else ''}")
                    ev.progress(f"FAILED {failed[-1]}")
                    continue
                for metric, per_variant in res.items():
                    for v in group:
                        if v.name in per_variant and not store.done(metric, v.name, c):
                            store.save(metric, v.name, c, per_variant[v.name], cfg.settings(fam), v.describe())
                free_cuda_memory()
    summary = report.render(store.dir, plots=not cfg.no_plots)
    summary["failed"] = failed
    return summary


def _append_command(d: Path, command: str) -> None:
    if not command:
        return
    d.mkdir(parents=True, exist_ok=True)
    with (d / "command.txt").open("a", encoding="utf-8") as f:
        f.write(command + "\n")
