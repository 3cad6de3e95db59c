"""Where each layer's KV lives: ``Placement`` (the knobs), ``make_cache`` (the backend it implies) and a planner.

Knob names follow the original experiments: ``on_chip`` layers keep their KV on the GPU; the others live in pinned
CPU memory (``kv_quant`` format) and are streamed in; ``resident_layers`` of them may stay on the GPU between steps.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

from .. import validate as v
from .quant import BITS, QuantSpec

FORMATS = ("none", *BITS)
RESIDENT_FORMATS = ("dequant", "quant")
RESIDENT_POLICIES = ("lru", "static")


@dataclass(frozen=True)
class Placement:
    on_chip: int | None = None  # None: every layer on the GPU (no offload)
    kv_quant: str = "none"  # format of offloaded KV: none | int8 | int4 | int2
    kv_group_size: int = 64  # quantization group; also the block in which new tokens are flushed to the CPU
    resident_layers: int = 0
    resident_format: str = "dequant"  # dequant: bf16 copies on the GPU; quant: codes on the GPU
    resident_policy: str = "lru"  # lru | static (keep the first R offloaded layers seen; no thrashing)
    rollback_slack: int = 64  # newest tokens kept full-precision on the GPU, so rollbacks never touch the store

    def __post_init__(self):
        v.integer("on_chip", self.on_chip, lo=0, optional=True)  # None: every layer on the GPU
        v.choice("kv_quant", self.kv_quant, FORMATS)
        v.integer("kv_group_size", self.kv_group_size, lo=1)
        v.integer("resident_layers", self.resident_layers, lo=0)
        v.choice("resident_format", self.resident_format, RESIDENT_FORMATS)
        v.choice("resident_policy", self.resident_policy, RESIDENT_POLICIES)
        v.integer("rollback_slack", self.rollback_slack, lo=0)
        if self.resident_format == "quant" and self.kv_quant == "none" and self.resident_layers:
            raise ValueError(f"{v.name('resident_format')} quant needs a quantized {v.name('kv_quant')} "
                             f"(int8/int4/int2)")
        if self.quant is not None:  # format-specific checks (packing) with the quantizer's own message
            _ = self.quant

    @property
    def quant(self) -> QuantSpec | None:
        return None if self.kv_quant == "none" else QuantSpec(self.kv_quant, self.kv_group_size)

    def n_on_chip(self, n_layers: int) -> int:
        return n_layers if self.on_chip is None else self.on_chip

    def validate(self, n_layers: int, head_dim: int) -> None:
        """Checks that need the model: raise one clear error each."""
        on, res = v.name("on_chip"), v.name("resident_layers")
        if self.on_chip is not None and self.on_chip > n_layers:
            raise ValueError(f"{on} {self.on_chip} is greater than the model's {n_layers} layers")
        n_off = n_layers - self.n_on_chip(n_layers)
        if self.resident_layers > n_off:
            raise ValueError(
                f"{res} {self.resident_layers} is greater than the {n_off} offloaded layers "
                f"({n_layers} layers, {on} {self.n_on_chip(n_layers)}); use at most {n_off}"
            )
        if self.quant is not None and n_off:
            self.quant.check_head_dim(head_dim)
        if self.resident_policy == "lru" and 0 < self.resident_layers < n_off:
            warnings.warn(
                f"--resident-policy lru with {self.resident_layers} slots for {n_off} offloaded layers never hits: "
                f"every forward visits the layers in the same order, so LRU evicts each layer just before it is "
                f"needed again; use --resident-policy static (or --resident-layers {n_off})",
                stacklevel=3,
            )

    def describe(self, n_layers: int) -> str:
        on = self.n_on_chip(n_layers)
        if on == n_layers:
            return f"all {n_layers} layers on the GPU"
        return (f"{on} on-chip, {n_layers - on} offloaded ({self.kv_quant}, g{self.kv_group_size}), "
                f"{self.resident_layers} resident ({self.resident_format}, {self.resident_policy})")


def make_cache(model, placement: Placement | None, batch: int, max_len: int, press=None,
               tail: int | None = None, compress_every: int | None = None, graphs: bool = False):
    """The one cache factory. The KV backend a placement implies (DenseKV when nothing is offloaded, else PlacedKV),
    and with a ``press`` (a Press or a spec string) a ``PressedKV`` over it: the prefill fills the backend, then
    ``cache.compress()`` presses it. ``tail`` rows (default ``max_len``) hold what is appended after a compress; the
    offloaded layers of the placement keep their pressed stores in pinned CPU memory.

    ``graphs``: ask for a static (CUDA-graph) layout: a ``StaticKV`` when every layer is on the GPU, a ``PlacedKV``
    in its static layout when layers are offloaded (its decode steps and verifications between flushes replay
    graphs; see ``kv/offload.py``). With a press: a static ``PressedKV`` when the press keeps dense rows (eviction
    only) and no layer is offloaded; its buffers hold ``press.max_rows(max_len)`` rows + ``tail`` per layer, the
    prefill still fills an ordinary cache, and ``compress()`` lays the kept rows into the static buffers. A press
    that stores codes or latents, an offloaded pressed layer, or a cache re-pressed every ``compress_every``
    tokens runs eagerly. ``cache.graphable`` says what was
    built, and ``decoding.runner.make_runner`` follows it."""
    from .dense import DenseKV

    c = model.cfg
    placement = placement or Placement()
    if not isinstance(placement, Placement):
        raise v.ConfigError(f"placement must be a Placement or None, got {placement!r}")
    if placement.n_on_chip(c.n_layers) == c.n_layers:
        placement.validate(c.n_layers, c.head_dim)  # e.g. resident layers with nothing offloaded: an error
        if graphs and press is None:
            from .static import StaticKV

            return StaticKV.for_model(model, max_len, batch=batch)
        inner = DenseKV.for_model(model, batch, max_len)
    else:
        from .offload import PlacedKV  # validates the placement itself

        inner = PlacedKV(c.n_layers, c.n_kv_heads, c.head_dim, placement, batch, max_len, model.dtype, model.device,
                         static=graphs and press is None)
    if press is None:
        return inner
    from ..presses import parse_press
    from .pressed import PressedKV

    press = parse_press(press)
    off = frozenset(range(placement.n_on_chip(c.n_layers), c.n_layers))
    static = graphs and press.dense and not off and compress_every is None
    cap = press.max_rows(max_len, c.n_layers, c.n_kv_heads) if static else 0
    return PressedKV(press, c.n_layers, batch, c.n_kv_heads, c.head_dim, tail or max_len, model.dtype, model.device,
                     inner=inner, offload=off, compress_every=compress_every, static=static, fixed_cap=cap)


# ------------------------------------------------------------------------------------------------------- planner
@dataclass(frozen=True)
class Plan:
    placement: Placement
    gpu_kv_bytes: int  # on-chip KV + resident slots + staging, predicted
    pinned_bytes: int
    h2d_bytes_per_token: int  # predicted bytes streamed per decode step at this context
    note: str


def plan_placement(model_cfg, context: int, gpu_kv_budget: int, batch: int = 1, dtype_bytes: int = 2,
                   group_size: int = 64, prefer_quant: str = "int8") -> Plan:
    """Pick on_chip, resident_layers and kv_quant so the GPU-side KV fits ``gpu_kv_budget`` bytes.

    Greedy on the decode-time equation t ~ gpu_time + streamed_bytes / B_pcie: keep as many layers on chip as fit;
    if anything is offloaded, quantize it (``prefer_quant``), then spend what is left on resident layers (stored
    in the ``quant`` resident format, which fits more layers per byte than bf16 copies).
    """
    c = model_cfg
    v.integer("context", context, lo=1)
    v.integer("batch", batch, lo=1)
    v.integer("kv_group_size", group_size, lo=1)
    v.number("gpu_kv_budget", gpu_kv_budget, lo=0, lo_open=True)
    elems = batch * c.n_kv_heads * c.head_dim * context * 2  # K and V elements of one layer
    layer_bf16 = elems * dtype_bytes
    if layer_bf16 * c.n_layers <= gpu_kv_budget:
        return Plan(Placement(), layer_bf16 * c.n_layers, 0, 0, "the whole KV fits on the GPU")
    spec = QuantSpec(prefer_quant, group_size)
    layer_q = int(elems * spec.bytes_per_element())
    # what PlacedKV allocates to stream a quantized layer: one bf16 layer (the dequantized view) and a ring of code
    # buffers (at most two bf16 layers' bytes: see offload.code_stages); bf16 streaming would take two bf16 layers
    from .offload import code_stages

    staging = layer_bf16 + code_stages(layer_bf16, layer_q, c.n_layers) * layer_q
    on_chip = int(max(0, min(c.n_layers - 1, (gpu_kv_budget - staging) // layer_bf16)))
    if on_chip == 0 and gpu_kv_budget < staging:
        raise ValueError(
            f"--gpu-kv-budget {gpu_kv_budget / 2**30:.2f} GiB cannot hold even the staging buffers for one "
            f"streamed layer ({staging / 2**30:.2f} GiB at context {context}); raise it or shorten the context"
        )
    n_off = c.n_layers - on_chip
    left = gpu_kv_budget - staging - on_chip * layer_bf16
    resident = int(min(n_off, max(0, left) // layer_q))
    p = Placement(on_chip=on_chip, kv_quant=prefer_quant, kv_group_size=group_size, resident_layers=resident,
                  resident_format="quant", resident_policy="static")
    gpu = on_chip * layer_bf16 + resident * layer_q + staging
    h2d = (n_off - resident) * layer_q
    return Plan(p, gpu, n_off * layer_q, h2d,
                f"{on_chip} layers fit on chip; {n_off} streamed as {prefer_quant}, {resident} of them resident")
