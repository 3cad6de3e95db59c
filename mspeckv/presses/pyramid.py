"""PyramidKV (Cai et al., 2024): SnapKV's scores with budgets that shrink with depth.

Layer l of L keeps ``budget * (1 + spread * (1 - 2 l / (L - 1)))`` rows: ``(1 + spread)`` times the mean at the first
layer, ``(1 - spread)`` at the last, the mean over layers equal to ``budget`` (up to rounding and the cap at 1)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .base import check_range
from .snapkv import SnapKVPress


@dataclass(frozen=True)
class PyramidKVPress(SnapKVPress):
    name: ClassVar[str] = "pyramidkv"
    spread: float = 0.5  # in [0, 1): 0 is SnapKV

    def __post_init__(self):
        super().__post_init__()
        check_range(self, "spread", 0.0, 0.99, kind=float)
        if self.layer_budgets is not None:
            raise ValueError("pyramidkv computes its own layer_budgets from budget and spread; use snapkv with "
                             "layer_budgets for an explicit schedule")

    def layer_budget(self, layer, n_layers):
        f = 1.0 + self.spread * (1.0 - 2.0 * layer / max(n_layers - 1, 1))
        if isinstance(self.budget, float):
            return min(1.0, self.budget * f)
        return max(1, round(self.budget * f))
