"""Who runs a model over a cache, and whether it replays CUDA graphs: decided here, once, for every level.

- ``use_graphs(model, asked)``: graphs are on by default on CUDA, off on the CPU, and never for dynamic-NTK RoPE
  (it recomputes frequencies from the host-side length, which a replay cannot see).
- ``make_runner(model, cache)``: a ``GraphRunner`` when the cache has a static (graphable) layout, else a ``Runner``.
  The cache factory (``kv.placement.make_cache(..., graphs=...)``, ``PressedKV.build/streaming(static=...)``) decides
  the layout; a runner only follows it. On the CPU a GraphRunner's forwards are eager (``GraphedForward``), so the
  graph path's bookkeeping is exercised by CPU tests too.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..kv.static import GraphedForward


def use_graphs(model, asked: bool | None = None) -> bool:
    if model.cfg.rope.rope_type == "dynamic":
        return False
    return model.device.type == "cuda" if asked is None else asked


class Seq:
    """Token ids on the device, with the host-side length (and a host mirror when a host drafter needs it)."""

    def __init__(self, prompt: Tensor, capacity: int, host: bool):
        self.tokens = torch.zeros(1, capacity, dtype=torch.long, device=prompt.device)
        self.tokens[:, : prompt.shape[1]] = prompt
        self.len = prompt.shape[1]
        self.host = prompt[0].tolist() if host else None


class Runner:
    """A model, its cache, and ``n``: how many tokens of the sequence the cache holds (absolute position)."""

    def __init__(self, model, cache, n: int = 0):
        self.model, self.cache, self.n = model, cache, n

    def feed(self, seq: Seq, upto: int, num_logits: int, eager: bool = False) -> Tensor:
        """Feed tokens [n, upto) -> logits (1, num_logits, V) for the last num_logits positions."""
        logits = self.model(seq.tokens[:, self.n:upto], self.cache, pos0=self.n, num_logits=num_logits)
        self.n = upto
        return logits

    def rollback_to(self, m: int) -> None:
        if self.n > m:
            self.cache.rollback(self.n - m)
            self.n = m

    def precapture(self, shapes: list[tuple[int, int]]) -> None:
        """Capture graphs for these (tokens, logits) shapes now (nothing to do for an eager runner)."""


class GraphRunner(Runner):
    """A Runner over a static-shape cache whose forwards replay CUDA graphs, one per (tokens, logits) shape."""

    def __init__(self, model, cache, n: int = 0):
        super().__init__(model, cache, n)
        self.graphs: dict[tuple[int, int], GraphedForward] = {}
        self.pool = torch.cuda.graph_pool_handle() if model.device.type == "cuda" else None

    def feed(self, seq: Seq, upto: int, num_logits: int, eager: bool = False) -> Tensor:
        if eager:
            return super().feed(seq, upto, num_logits)
        key = (upto - self.n, num_logits)
        if key not in self.graphs:
            self.graphs[key] = GraphedForward(self.model, self.cache, key[0], num_logits, self.pool)
        logits = self.graphs[key](seq.tokens[:, self.n:upto], self.n)
        self.n = upto
        return logits

    def precapture(self, shapes: list[tuple[int, int]]) -> None:
        if self.pool is None:  # the CPU: forwards are eager, nothing to capture ahead
            return
        for key in shapes:
            if key not in self.graphs and self.cache.length() + key[0] <= self.cache.capacity():
                self.graphs[key] = GraphedForward(self.model, self.cache, key[0], key[1], self.pool)


def make_runner(model, cache, n: int = 0) -> Runner:
    return (GraphRunner if cache.graphable else Runner)(model, cache, n)
