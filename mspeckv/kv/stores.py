"""Compressed stores: the forms a press leaves a layer's kept rows in. Each holds only its own tensors.

A store holds ``n`` rows of one layer, ``(B, H_kv, n, D)`` once decoded, with their absolute positions ``pos``
``(B, H_kv, n)`` (int32). Keys are post-RoPE, so rows may sit in any order: attention over a set of keys does not
depend on their order, only the new rows of a forward must come last (the model's causal mask).

    Rows       fewer tokens: the kept rows as they are (eviction), optionally with a per-head ``valid`` mask when
               heads keep different counts (padded to the largest head; padding is counted in ``nbytes``)
    QuantRows  fewer bits: KIVI codes + scales + zeros (``kv/quant.py``), keys per channel, values per token
    LowRank    fewer dimensions: latents ``x @ P`` (B, H, n, r), optionally int8, with the layer's shared projection
               ``P`` (H, D, r); the projection's bytes are amortised over the model's tokens and stated separately

``nbytes()`` counts every tensor the store holds (indices included); ``decode_into`` writes bf16/fp32 rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .quant import QTensor, QuantSpec, dequantize_keys, dequantize_values, qt_to, quantize_keys, quantize_values


def _nb(*ts: Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in ts if t is not None)


@dataclass
class Rows:
    k: Tensor  # (B, H, n, D)
    v: Tensor
    pos: Tensor  # (B, H, n) int32
    valid: Tensor | None = None  # (B, H, n) bool, per-head padding (head-adaptive budgets)

    @property
    def n(self) -> int:
        return self.k.shape[2]

    def nbytes(self) -> int:
        return _nb(self.k, self.v, self.pos, self.valid)

    def decode_into(self, k: Tensor, v: Tensor) -> None:
        k.copy_(self.k, non_blocking=True)
        v.copy_(self.v, non_blocking=True)

    def to(self, device, non_blocking: bool = False) -> Rows:
        f = lambda t: None if t is None else t.to(device, non_blocking=non_blocking)
        return Rows(f(self.k), f(self.v), f(self.pos), f(self.valid))

    def pin(self) -> Rows:
        f = lambda t: None if t is None else t.pin_memory()
        return Rows(f(self.k), f(self.v), f(self.pos), f(self.valid))


@dataclass
class QuantRows:
    kq: QTensor
    vq: QTensor
    kspec: QuantSpec
    vspec: QuantSpec
    pos: Tensor

    @classmethod
    def encode(cls, k: Tensor, v: Tensor, pos: Tensor, kspec: QuantSpec, vspec: QuantSpec) -> QuantRows:
        """k/v (B, H, n, D) with n a multiple of kspec.group_size (keys group along tokens)."""
        return cls(quantize_keys(k, kspec), quantize_values(v, vspec), kspec, vspec, pos.to(torch.int32))

    @property
    def n(self) -> int:
        return self.kq.shape[2]

    def nbytes(self) -> int:
        return self.kq.nbytes() + self.vq.nbytes() + _nb(self.pos)

    def decode_into(self, k: Tensor, v: Tensor) -> None:
        k.copy_(dequantize_keys(self.kq, self.kspec, k.dtype))
        v.copy_(dequantize_values(self.vq, self.vspec, v.dtype))

    def to(self, device, non_blocking: bool = False) -> QuantRows:
        return QuantRows(qt_to(self.kq, device, non_blocking), qt_to(self.vq, device, non_blocking), self.kspec,
                         self.vspec, self.pos.to(device, non_blocking=non_blocking))

    def pin(self) -> QuantRows:
        p = lambda q: QTensor(q.codes.pin_memory(), q.scale.pin_memory(), q.zero.pin_memory(), q.shape)
        return QuantRows(p(self.kq), p(self.vq), self.kspec, self.vspec, self.pos.pin_memory())


@dataclass
class LowRank:
    """Rows in a low-rank basis: x ~= latent @ P^T. ``k`` is None for V-only (keys then live in another store of
    the same rows, ``k_rows``: full precision or quantized)."""

    v_lat: Tensor | QTensor  # (B, H, n, r) latents, or int8 codes (values layout, grouped along r)
    v_proj: Tensor  # (H, D, r), shared by every token of the layer (not counted per store)
    k_rows: Tensor | None  # (B, H, n, D) keys kept as they are (V-only) ...
    k_lat: Tensor | None  # ... or (B, H, n, rk) key latents
    k_proj: Tensor | None  # (H, D, rk)
    pos: Tensor
    lat_spec: QuantSpec | None = None

    @classmethod
    def encode(cls, k: Tensor, v: Tensor, pos: Tensor, v_proj: Tensor, k_proj: Tensor | None,
               lat_spec: QuantSpec | None) -> LowRank:
        dt = v_proj.dtype
        v_lat = torch.einsum("bhnd,hdr->bhnr", v.to(dt), v_proj).to(v.dtype)  # (B, H, n, r)
        if lat_spec is not None:
            v_lat = quantize_values(v_lat, lat_spec)
        k_lat = None if k_proj is None else torch.einsum("bhnd,hdr->bhnr", k.to(dt), k_proj).to(k.dtype)
        return cls(v_lat, v_proj, k if k_proj is None else None, k_lat, k_proj, pos.to(torch.int32), lat_spec)

    @property
    def n(self) -> int:
        return self.pos.shape[2]

    def nbytes(self) -> int:
        lat = self.v_lat.nbytes() if isinstance(self.v_lat, QTensor) else _nb(self.v_lat)
        return lat + _nb(self.k_rows, self.k_lat, self.pos)

    def shared_nbytes(self) -> int:
        return _nb(self.v_proj, self.k_proj)

    def decode_into(self, k: Tensor, v: Tensor) -> None:
        lat = self.v_lat
        if isinstance(lat, QTensor):
            lat = dequantize_values(lat, self.lat_spec, v.dtype)
        P = self.v_proj.to(v.dtype)
        # (B, H, n, r) @ (H, r, D) -> (B, H, n, D); einsum's ``out=`` is not in every supported torch (2.11 lacks it)
        torch.matmul(lat, P.transpose(1, 2), out=v) if v.is_contiguous() else v.copy_(lat @ P.transpose(1, 2))
        if self.k_lat is None:
            k.copy_(self.k_rows, non_blocking=True)
        else:
            k.copy_(torch.einsum("bhnr,hdr->bhnd", self.k_lat, self.k_proj.to(k.dtype)))

    def to(self, device, non_blocking: bool = False) -> LowRank:
        f = lambda t: None if t is None else (qt_to(t, device, non_blocking) if isinstance(t, QTensor)
                                              else t.to(device, non_blocking=non_blocking))
        return LowRank(f(self.v_lat), self.v_proj.to(device), f(self.k_rows), f(self.k_lat),
                       None if self.k_proj is None else self.k_proj.to(device), f(self.pos), self.lat_spec)

    def pin(self) -> LowRank:
        f = lambda t: None if t is None else (QTensor(t.codes.pin_memory(), t.scale.pin_memory(),
                                                      t.zero.pin_memory(), t.shape) if isinstance(t, QTensor)
                                              else t.pin_memory())
        return LowRank(f(self.v_lat), self.v_proj, f(self.k_rows), f(self.k_lat), self.k_proj, f(self.pos),
                       self.lat_spec)


Store = Rows | QuantRows | LowRank
