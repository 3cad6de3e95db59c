"""H2O (Zhang et al., 2023): heavy hitters by accumulated attention. Every query row of the prefill (and of later
forwards) adds its attention probabilities to its keys' scores; the top rows plus a recent window are kept.

The accumulation runs during the forward (``AttentionMass`` observer), in slices of ``q_block`` query rows so its
memory stays bounded: the cost is one extra QK^T + softmax per layer, the same FLOPs as the attention itself."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ..kv.base import Observer
from .base import ScorePress, check_range


class AttentionMass(Observer):
    """Per layer (B, H_kv, S): the attention probability mass every held row received so far, summed over query
    rows and the query heads of its group. Rows are indexed like the cache's view (its order and length)."""

    def __init__(self, n_layers: int, q_block: int = 256):
        self.mass: list[Tensor | None] = [None] * n_layers
        self.q: list[Tensor | None] = [None] * n_layers
        self.q_block = q_block

    def on_query(self, layer, q):
        self.q[layer] = q

    def on_update(self, layer, k, v, k_all, mask):
        q = self.q[layer]
        B, Hq, T, D = q.shape
        Hkv, S = k_all.shape[1], k_all.shape[2]
        G = Hq // Hkv
        acc = torch.zeros(B, Hkv, S, dtype=torch.float32, device=k_all.device)
        kf = k_all.float().transpose(-1, -2)
        for t0 in range(0, T, self.q_block):  # slices of query rows: (B, Hkv, G*t, S) scores at a time
            t1 = min(T, t0 + self.q_block)
            qs = q[:, :, t0:t1].float().reshape(B, Hkv, G * (t1 - t0), D)
            s = (qs @ kf) / math.sqrt(D)  # (B, Hkv, G*t, S)
            if mask is not None:
                m = mask[..., t0:t1, :]  # (t, S) or per head (B, Hkv, t, S); rows g-major like qs
                s = s.masked_fill(~(m.repeat(G, 1) if m.dim() == 2 else m.repeat(1, 1, G, 1)), float("-inf"))
            elif T > 1:  # causal among the new rows (in every block, one row included): row i sees keys j <= S - T + i
                i = torch.arange(t0, t1, device=s.device)[:, None]
                vis = torch.arange(S, device=s.device)[None, :] <= S - T + i
                s = s.masked_fill(~vis.repeat(G, 1), float("-inf"))
            acc += s.softmax(-1).sum(2)
        prev = self.mass[layer]
        if prev is not None and prev.shape == acc.shape:  # a static cache (same S every forward): accumulate in
            prev.add_(acc)  # place, so a captured graph keeps adding into the one tensor it reads (see LastQueries)
        else:
            if prev is not None:
                n = min(prev.shape[-1], S)
                acc[..., :n] += prev[..., :n]
            self.mass[layer] = acc
        self.q[layer] = None

    def reindex(self, layer: int, idx: Tensor) -> None:
        """Rows were compacted to ``idx`` (B, H_kv, n): keep their scores, in the new row order."""
        if self.mass[layer] is not None:
            self.mass[layer] = self.mass[layer].gather(2, idx)


@dataclass(frozen=True)
class H2OPress(ScorePress):
    name: ClassVar[str] = "h2o"
    q_block: int = 256

    def __post_init__(self):
        super().__post_init__()
        check_range(self, "q_block", 1)

    def observers(self, n_layers):
        return [AttentionMass(n_layers, self.q_block)]

    def score(self, layer, k, pos, obs):
        for o in obs:
            if isinstance(o, AttentionMass) and o.mass[layer] is not None:
                m = o.mass[layer]
                return m[..., :k.shape[2]] if m.shape[-1] >= k.shape[2] else torch.nn.functional.pad(
                    m, (0, k.shape[2] - m.shape[-1]))
        raise RuntimeError("h2o saw no attention: run a prefill through the cache before compress()")
