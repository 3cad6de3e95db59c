"""The one registry of sweep methods: what each method is, which models and settings it reads, and how the report
compares it. The run functions live in ``bench.methods`` (``METHOD_FNS``, checked against this table at import);
every other module (``results``, ``sweeps``, ``report``, ``breakdown``) reads the properties from here."""

from __future__ import annotations

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
