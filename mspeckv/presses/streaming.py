"""StreamingLLM (Xiao et al., 2023): the first ``sinks`` rows (attention sinks) and the newest rows, nothing scored."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import Press, check_budget_value, check_range, n_keep


@dataclass(frozen=True)
class StreamingLLMPress(Press):
    name: ClassVar[str] = "streaming"
    budget: float | int = 0.25  # rows kept in total, sinks included
    sinks: int = 4

    def __post_init__(self):
        check_budget_value("streaming.budget", self.budget)
        check_range(self, "sinks", 0)

    def max_rows(self, L, n_layers, n_kv_heads=1):
        return n_keep(self.budget, L)

    def select(self, layer, n_layers, k, pos, obs):
        B, H, L, _ = k.shape
        n = n_keep(self.budget, L)
        if n >= L:
            return None
        s = min(self.sinks, n)
        idx = torch.cat([torch.arange(s), torch.arange(L - (n - s), L)]).to(k.device)  # (n,)
        return idx.expand(B, H, n)
