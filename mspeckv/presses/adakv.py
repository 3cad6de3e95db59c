"""Head-adaptive budgets in the spirit of AdaKV (Feng et al., 2024): a layer keeps ``budget x H_kv`` rows in total, but
heads whose attention is concentrated give rows to heads whose attention is spread. Each head first gets its own top
``floor x budget`` rows; the rest of the layer's total goes to the best remaining scores across all heads (SnapKV
scores are attention probabilities, so they compare across heads).

Heads then hold different counts. The store pads every head to the largest count and marks the padding invalid
(``Rows.valid``); attention masks it out. The padding's bytes are held and counted. A static (CUDA-graph) buffer must
hold the worst case, one head taking every pooled row (``max_rows``): up to ``n*H - n_own*(H-1)`` rows per head."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import check_range, forced_ranking, n_keep
from .snapkv import SnapKVPress


@dataclass(frozen=True)
class AdaKVPress(SnapKVPress):
    name: ClassVar[str] = "adakv"
    floor: float = 0.2  # share of the mean per-head budget every head keeps by its own ranking

    def __post_init__(self):
        super().__post_init__()
        check_range(self, "floor", 0.0, 1.0, kind=float)

    def select(self, layer, n_layers, k, pos, obs):
        return self.select_adaptive(layer, n_layers, k, pos, obs)[0]

    def _n_own(self, n: int) -> int:
        """Rows each head keeps by its own ranking when the layer keeps ``n`` (< L) per head on average."""
        return max(int(self.floor * n), min(n, self.sinks + self.forced_window(n)))

    def max_rows(self, L, n_layers, n_kv_heads=1):
        # one head can win every pooled row: its own n_own plus the other heads' shares, n*H - n_own*H of them
        worst = 0
        for i in range(n_layers):
            n = n_keep(self.layer_budget(i, n_layers), L)
            if n >= L:
                return L
            worst = max(worst, n * n_kv_heads - self._n_own(n) * (n_kv_heads - 1))
        return min(L, worst)

    def select_adaptive(self, layer, n_layers, k, pos, obs):
        """-> (idx (B, H, n_max) increasing, valid (B, H, n_max) bool) or (None, None) to keep everything."""
        B, H, L, _ = k.shape
        n = n_keep(self.layer_budget(layer, n_layers), L)
        if n >= L:
            return None, None
        s = forced_ranking(self.score(layer, k, pos, obs), self.sinks, self.forced_window(n))  # (B, H, L)
        n_own = self._n_own(n)  # every head keeps its forced rows (or as many as fit)
        own = s.topk(n_own, dim=-1).indices  # (B, H, n_own): each head's guaranteed rows
        keep = torch.zeros_like(s, dtype=torch.bool).scatter_(-1, own, True)
        rest = s.masked_fill(keep, float("-inf")).flatten(1)  # (B, H*L): the remaining rows of every head
        extra = rest.topk(n * H - n_own * H, dim=-1).indices
        keep.view(B, -1).scatter_(-1, extra, True)
        counts = keep.sum(-1)  # (B, H)
        n_max = int(counts.max())
        # kept rows first in position order, then padding: sort by (not kept, position)
        order = (~keep).long() * L + torch.arange(L, device=k.device)
        idx = order.sort(-1).indices[..., :n_max] % L  # (B, H, n_max)
        valid = torch.arange(n_max, device=k.device) < counts[..., None]
        return idx, valid

    def compress(self, layer, n_layers, k, v, pos, obs):
        from ..kv.stores import Rows
        from .base import gather_rows

        idx, valid = self.select_adaptive(layer, n_layers, k, pos, obs)
        if idx is None:
            return self.encode(layer, k, v, pos, obs)
        return [Rows(gather_rows(k, idx), gather_rows(v, idx), pos.gather(2, idx).to(torch.int32), valid)]
