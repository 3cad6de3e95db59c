"""KIVI (Liu et al., 2024) as a press: keys quantized per channel, values per token (``mspeckv/kv/quant.py``, the same
quantizer and Triton dequant kernels as offloaded KV), the newest ``residual`` rows kept in full precision.

High-precision guard: a ``guard`` fraction of the quantized rows, the most attended by the newest ``obs_window``
queries (SnapKV's score), is stored at ``guard_bits`` (8: int8 codes; 16: full precision) instead of the low bits.

Rows are laid out as: low-bit rows | guard rows | full-precision rows (the residual window, and the < group_size rows
that do not fill a whole key group). Keys group along tokens, so each quantized set holds whole groups.
Supported widths are 8, 4 and 2 bits: there is no 3-bit packing (a 3-bit key asks for int4 and is stored as int4;
``k_bits`` records what is stored)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..kv.base import LastQueries
from ..kv.quant import QuantSpec
from ..kv.stores import QuantRows, Rows
from .base import Press, check_range, gather_rows, last_queries, snap_scores

FMT = {8: "int8", 4: "int4", 2: "int2"}


def _fmt(name: str, bits: int) -> str:
    if bits not in FMT:
        raise ValueError(f"kivi.{name} must be one of 8, 4, 2 (stored widths), got {bits!r}")
    return FMT[bits]


@dataclass(frozen=True)
class KIVIPress(Press):
    name: ClassVar[str] = "kivi"
    k_bits: int = 4
    v_bits: int = 4
    group_size: int = 32
    residual: int = 128  # newest rows kept in full precision
    guard: float = 0.0  # share of the quantized rows kept at guard_bits
    guard_bits: int = 8  # 8 (int8) or 16 (full precision)
    obs_window: int = 32  # queries that rank rows for the guard

    def __post_init__(self):
        _fmt("k_bits", self.k_bits), _fmt("v_bits", self.v_bits)
        check_range(self, "group_size", 1)
        check_range(self, "residual", 0)
        check_range(self, "guard", 0.0, 1.0, kind=float)
        if self.guard_bits not in (8, 16):
            raise ValueError(f"kivi.guard_bits must be 8 or 16, got {self.guard_bits!r}")
        check_range(self, "obs_window", 1)
        for b in (self.k_bits, self.v_bits, 8):
            QuantSpec(FMT[b], self.group_size)  # packing: group_size a multiple of codes per byte

    def spec_for(self, bits: int) -> QuantSpec:
        return QuantSpec(FMT[bits], self.group_size)

    def observers(self, n_layers):
        return [LastQueries(n_layers, self.obs_window)] if self.guard > 0 else []

    def encode(self, layer, k, v, pos, obs):
        B, H, n, D = k.shape
        self.spec_for(self.v_bits).check_head_dim(D)
        g = self.group_size
        nq = max(0, n - self.residual)  # rows that may be quantized (the oldest)
        order = torch.arange(n, device=k.device).expand(B, H, n)
        n_guard = int(self.guard * nq) // g * g if self.guard_bits == 8 else int(self.guard * nq)
        if n_guard:  # the most attended of the quantizable rows go to the guard (same count in every head)
            s = snap_scores(last_queries(obs, layer), k, pos, 5, "mean")[..., :nq]
            top = s.topk(n_guard, dim=-1).indices.sort(-1).values
            rest = torch.ones(B, H, nq, dtype=torch.bool, device=k.device).scatter_(-1, top, False)
            low = order[..., :nq][rest].view(B, H, nq - n_guard)
        else:
            top, low = order[..., :0], order[..., :nq]
        n_low = low.shape[-1] // g * g
        dense = [low[..., n_low:], order[..., nq:]]  # rows that do not fill a group, and the residual window
        stores = []
        if n_low:
            i = low[..., :n_low]
            stores.append(QuantRows.encode(gather_rows(k, i), gather_rows(v, i), pos.gather(2, i),
                                           self.spec_for(self.k_bits), self.spec_for(self.v_bits)))
        if n_guard and self.guard_bits == 8:
            stores.append(QuantRows.encode(gather_rows(k, top), gather_rows(v, top), pos.gather(2, top),
                                           self.spec_for(8), self.spec_for(8)))
        elif n_guard:
            dense.insert(0, top)
        i = torch.cat(dense, -1)
        if i.shape[-1]:
            stores.append(Rows(gather_rows(k, i), gather_rows(v, i), pos.gather(2, i).to(torch.int32)))
        return stores
