"""The registries of benchmarking: the sweep methods, and the ``mspeckv bench`` commands.

- **Methods** (``REGISTRY``): what each sweep method is, which models and settings it reads, and how the report
  compares it; their runs are ``bench.methods.METHOD_FNS`` (checked against this table at import).
- **Benches** (``BENCHES``): one entry per ``mspeckv bench <name>`` (see :class:`Bench`).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class Method:
    name: str
    doc: str
    draft: bool = False  # needs the draft model
    retrieval: bool = False  # has the MSpecKV middle level (reads --budget/--chunk/--draft-gamma/--l1-press)
    quant: bool = False  # reads --kv-quant and the resident settings
    placement: bool = True  # reads the sweep's placement (--on-chip); False: its own fixed storage
    hf: bool = False  # runs transformers (its own cache: no press, no per-level times)
    reference: bool = False  # a press-free reference, run only when --methods names it
    vs: tuple[tuple[str, str], ...] = ()  # (column, reference method): latency speedups reported for this method


REGISTRY: tuple[Method, ...] = (
    Method("baseline", "autoregressive decoding with the sweep's placement (bf16, no resident layers)"),
    Method("vanilla_specdec", "draft (its own full KV) -> target with the baseline's placement", draft=True,
           vs=(("vanilla_vs_base", "baseline"),)),
    Method("mspeckv", "the hierarchy: streaming draft -> retrieval target -> full target, offloaded KV in bf16",
           draft=True, retrieval=True, vs=(("no_kv_quant_vs_base", "baseline"),)),
    Method("mspeckv_kv_quant", "the hierarchy with quantized offloaded KV (--kv-quant) and resident layers",
           draft=True, retrieval=True, quant=True,
           vs=(("kv_quant_vs_base", "baseline"), ("quant_vs_no_quant", "mspeckv"), ("kv_quant_vs_hf", "hf_assisted"),
               ("kv_quant_vs_ar_gpu", "ar_gpu"), ("kv_quant_vs_hf_ar", "hf_ar"))),
    Method("hf_assisted", "transformers assisted generation over DynamicCache(offloading=True)", draft=True,
           placement=False, hf=True),
    Method("ar_gpu", "AR with every layer on the GPU, CUDA-graphed (what a user whose KV fits runs)",
           placement=False, reference=True),
    Method("hf_ar", "transformers' plain AR generate with DynamicCache on the GPU", placement=False, hf=True,
           reference=True),
)
BY_NAME = {m.name: m for m in REGISTRY}
METHODS = tuple(m.name for m in REGISTRY)
DEFAULT_METHODS = tuple(m.name for m in REGISTRY if not m.reference)
REFERENCE_METHODS = tuple(m.name for m in REGISTRY if m.reference)
SPEC_METHODS = tuple(m.name for m in REGISTRY if m.draft)
RETRIEVAL_METHODS = tuple(m.name for m in REGISTRY if m.retrieval)
HF_METHODS = tuple(m.name for m in REGISTRY if m.hf)
# (column, method, reference): latency speedup of ``method`` over ``reference`` = latency[reference] / latency[method]
SPEEDUP_COLUMNS = tuple((col, m.name, ref) for m in REGISTRY for col, ref in m.vs)


# ------------------------------------------------------------------------------------------------------- benches
@dataclass(frozen=True)
class Bench:
    """One ``mspeckv bench <name>``. Its config class and functions are named ``module:attr`` and imported when used,
    so reading this table imports nothing heavy.

    - ``config``: a frozen dataclass of ``runs.template.opt`` fields (the command's flags), which checks its values
      in ``__post_init__`` and has ``validate()`` for what needs the file system or a model's config;
    - ``run(cfg, command) -> result``: calls ``cfg.validate()`` before it loads or writes anything, then measures and
      writes the results files (recording ``command``);
    - ``render(result) -> str``: the Markdown printed; ``line(result) -> dict``: the one JSON line printed last;
    - ``ok(result) -> bool``: the exit status (None: 0 whenever ``run`` returns).
    """

    name: str
    help: str
    config: str
    run: str
    render: str
    line: str
    ok: str | None = None

    def load(self, what: str):
        """The object named by field ``what`` (``config``, ``run``, ...)."""
        module, attr = getattr(self, what).split(":")
        return getattr(importlib.import_module(module), attr)


def _bench(name: str, help: str, module: str, config: str, render: str = "render", ok: str | None = None) -> Bench:
    return Bench(name, help, f"{module}:{config}", f"{module}:run", f"{module}:{render}", f"{module}:line",
                 ok and f"{module}:{ok}")


BENCHES: tuple[Bench, ...] = (
    _bench("decode", "prefill tok/s, decode ms/token, peak memory and (CUDA) achieved bandwidth, one JSON",
           "mspeckv.bench.decode", "DecodeBenchConfig"),
    _bench("placement", "decode ms/token of each KV placement against floors measured in the same run (random "
           "weights)", "mspeckv.bench.placement", "PlacementBenchConfig", render="render_placement"),
    _bench("spec", "AR, vanilla and MSpecKV on the same real long prompts, with agreement with AR",
           "mspeckv.bench.spec", "SpecBenchConfig", render="render_spec"),
    _bench("presses", "per press and context: bytes per token, compression, compress time vs prefill, decode "
           "ms/token", "mspeckv.bench.presses", "PressBenchConfig", render="render_press_bench"),
    _bench("hf", "transformers generate over MSpecKVCache vs DynamicCache (on the GPU and offloaded)",
           "mspeckv.hf.bench", "HFBenchConfig"),
    _bench("batch", "batched AR over batch x context (ragged prompts too) against the copy floor and transformers' "
           "batched generate", "mspeckv.bench.batch", "BatchBenchConfig"),
    _bench("serve", "a load generator (openai client, streaming) against the real server at request rates from "
           "light to saturating: throughput, TTFT, TPOT, latency", "mspeckv.serve.load", "LoadConfig"),
    _bench("tp", "TP=1 against TP=N (random weights): H2D per rank, decode and verification per KV format",
           "mspeckv.parallel.bench", "TPBenchConfig", ok="complete"),
)
BENCH = {b.name: b for b in BENCHES}
