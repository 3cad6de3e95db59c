"""Where each layer's KV lives: ``Placement`` (the knobs). The cache a placement implies (``make_cache``) and the
planner that picks one live above storage and presses, in ``mspeckv/cache.py``.

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
