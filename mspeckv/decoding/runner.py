"""Who runs a model over a cache, and whether it replays CUDA graphs: decided here, once, for every level.

- ``use_graphs(model, asked)``: graphs are on by default on CUDA, off on the CPU, and never for dynamic-NTK RoPE
  (it recomputes frequencies from the host-side length, which a replay cannot see).
- ``make_runner(model, cache)``: a ``GraphRunner`` when the cache has a static (graphable) layout, else a ``Runner``.
  A GraphRunner keeps one graph per (tokens, logits, ``cache.graph_key(tokens)``): a cache whose static layout
  changes (``PlacedKV``: the copy bucket, the residency plan) gets a graph per layout, and a forward whose key is
  None (a flush, a slot fill, a prefill chunk) runs eagerly on the same buffers.
  The cache factory (``cache.make_cache(..., graphs=...)``, ``cache.streaming_cache``, ``PressedKV.build(static=
  ...)``) decides the layout; a runner only follows it. On the CPU a GraphRunner's forwards are eager
  (``GraphedForward``), so the graph path's bookkeeping is exercised by CPU tests too.
"""

from __future__ import annotations

import time

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
        # forwards run eagerly by a graphed runner (a flush, a slot fill), and graphs captured on the way with their
        # seconds: a capture inside the decode loop is charged to the level that needed it, so it is counted
        self.eager_steps, self.captures, self.capture_s = 0, 0, 0.0

    def graph_counts(self) -> tuple[int, int, float]:
        return self.eager_steps, self.captures, self.capture_s

    def feed(self, seq: Seq, upto: int, num_logits: int, eager: bool = False) -> Tensor:
        """Feed tokens [n, upto) -> logits (1, num_logits, V) for the last num_logits positions."""
        return self.step(seq.tokens[:, self.n:upto], num_logits, eager)

    def step(self, ids: Tensor, num_logits: int = 1, eager: bool = False) -> Tensor:
        """Feed ids (B, T) at positions [n, n + T) -> logits (B, num_logits, V)."""
        logits = self.model(ids, self.cache, pos0=self.n, num_logits=num_logits)
        self.n += ids.shape[1]
        return logits

    def rollback_to(self, m: int) -> None:
        if self.n > m:
            self.cache.rollback(self.n - m)
            self.n = m

    def precapture(self, shapes: list[tuple[int, int]], batch: int = 1) -> None:
        """Capture graphs for these (tokens, logits) shapes now (nothing to do for an eager runner)."""


class GraphRunner(Runner):
    """A Runner over a static-shape cache whose forwards replay CUDA graphs, one per (tokens, logits, layout)."""

    def __init__(self, model, cache, n: int = 0):
        super().__init__(model, cache, n)
        self.graphs: dict[tuple, GraphedForward] = {}
        self.pool = torch.cuda.graph_pool_handle() if model.device.type == "cuda" else None

    def step(self, ids: Tensor, num_logits: int = 1, eager: bool = False) -> Tensor:
        T = ids.shape[1]
        layout = None if eager else self.cache.graph_key(T)
        if layout is None:  # asked, or the cache cannot run this forward statically (a flush, a slot fill)
            self.eager_steps += not eager
            return super().step(ids, num_logits)
        key = (T, num_logits, layout)
        if key not in self.graphs:
            self._capture(key, T, num_logits, ids.shape[0])
        logits = self.graphs[key](ids, self.n, layout)
        self.n += T
        return logits

    def precapture(self, shapes: list[tuple[int, int]], batch: int = 1) -> None:
        for T, nl in shapes:  # on the CPU a "capture" is bookkeeping only (its forwards run eagerly when called)
            layout = self.cache.graph_key(T)
            key = (T, nl, layout)
            if layout is not None and key not in self.graphs and self.cache.length() + T <= self.cache.capacity():
                self._capture(key, T, nl, batch)

    def _capture(self, key: tuple, T: int, num_logits: int, batch: int) -> None:
        t0 = time.perf_counter()  # a capture synchronizes the device anyway: host time is its cost
        self.graphs[key] = GraphedForward(self.model, self.cache, T, num_logits, self.pool, batch=batch)
        self.captures += 1
        self.capture_s += time.perf_counter() - t0


def make_runner(model, cache, n: int = 0) -> Runner:
    return (GraphRunner if cache.graphable else Runner)(model, cache, n)
