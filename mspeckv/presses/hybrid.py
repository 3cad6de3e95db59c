"""Hybrid: layer-aware sparsification, then mixed-precision quantization, with a recent window in full precision.

Selection is PyramidKV (SnapKV scores, budgets shrinking with depth, mean ``retain``); the kept rows are then stored
by KIVI with ``k_bits``/``v_bits``, a ``guard`` share of them at int8, and the newest ``window`` rows untouched.
The selection forces the newest ``window`` rows in, but never more than ``window_share`` of a layer's kept rows: at
short contexts (``retain`` x context < 2 x ``window``) the rest of the budget is still chosen by score. (Before this
cap the presets kept only the newest rows below ~11K tokens and lost needles there: results/quality/...-grid.)
The presets ``conservative``, ``aggressive`` and ``extreme`` (``mspeckv/configs/presses/*.yaml``) set these fields."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import ClassVar

from .base import Press, check_budget_value, check_range
from .kivi import KIVIPress
from .pyramid import PyramidKVPress


@dataclass(frozen=True)
class HybridPress(Press):
    name: ClassVar[str] = "hybrid"
    retain: float = 0.32
    k_bits: int = 4
    v_bits: int = 2
    guard: float = 0.6
    group_size: int = 32
    window: int = 2048
    spread: float = 0.5
    obs_window: int = 32
    sinks: int = 4
    window_share: float = 0.5  # of each layer's kept rows, at most this share is the forced newest window

    def __post_init__(self):
        check_budget_value("hybrid.retain", self.retain)
        check_range(self, "window", 0)
        _ = self.selector, self.encoder  # validate the parts now, with their own messages

    @cached_property
    def selector(self) -> PyramidKVPress:
        return PyramidKVPress(budget=self.retain, sinks=self.sinks, window=self.window, obs_window=self.obs_window,
                              spread=self.spread, window_share=self.window_share)

    @cached_property
    def encoder(self) -> KIVIPress:
        return KIVIPress(k_bits=self.k_bits, v_bits=self.v_bits, group_size=self.group_size, residual=self.window,
                         guard=self.guard, guard_bits=8, obs_window=self.obs_window)

    def observers(self, n_layers):
        return self.selector.observers(n_layers)  # LastQueries(obs_window): shared by the guard's ranking

    def select(self, layer, n_layers, k, pos, obs):
        return self.selector.select(layer, n_layers, k, pos, obs)

    def encode(self, layer, k, v, pos, obs):
        return self.encoder.encode(layer, k, v, pos, obs)
