"""SnapKV (Li et al., 2024): score each row by the attention the newest ``obs_window`` queries pay it, smoothed by
an average pool of ``kernel`` rows along the sequence, and reduced over each KV head's query-head group."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..kv.base import LastQueries
from .base import ScorePress, check_range, last_queries, snap_scores


@dataclass(frozen=True)
class SnapKVPress(ScorePress):
    name: ClassVar[str] = "snapkv"
    obs_window: int = 32
    kernel: int = 5
    reduce: str = "mean"  # over the G query heads of a KV head: mean | max

    def __post_init__(self):
        super().__post_init__()
        check_range(self, "obs_window", 1)
        check_range(self, "kernel", 1)
        if self.reduce not in ("mean", "max"):
            raise ValueError(f"{self.name}.reduce must be mean or max, got {self.reduce!r}")

    def observers(self, n_layers):
        return [LastQueries(n_layers, self.obs_window)]

    def score(self, layer, k, pos, obs):
        return snap_scores(last_queries(obs, layer), k, pos, self.kernel, self.reduce)
