"""DenseKV: preallocated per-layer K/V tensors with a logical length. The reference backend."""

from __future__ import annotations

import torch
from torch import Tensor

from .base import KVCache, check_begin, check_rollback, check_shape


class DenseKV(KVCache):
    """All layers' KV in preallocated ``(B, H_kv, T_max, D)`` tensors on one device."""

    def __init__(self, n_layers: int, batch: int, n_kv_heads: int, head_dim: int, max_len: int,
                 dtype: torch.dtype, device: torch.device | str):
        super().__init__()
        check_shape(batch, max_len)
        self.n_layers, self.max_len, self.batch = n_layers, max_len, batch
        shape = (batch, n_kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self._len = 0
        self._pending: int | None = None

    @classmethod
    def for_model(cls, model, batch: int, max_len: int, device=None, dtype=None) -> DenseKV:
        c = model.cfg
        p = next(model.parameters())
        return cls(c.n_layers, batch, c.n_kv_heads, c.head_dim, max_len, dtype or p.dtype, device or p.device)

    def length(self) -> int:
        return self._len

    def capacity(self) -> int:
        return self.max_len

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def begin(self, n_new: int) -> None:
        check_begin(self._len, n_new, self.max_len, self._pending)
        self._pending = n_new

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        t0, t1 = self._len, self._len + self._pending
        self.k[layer][:, :, t0:t1] = k
        self.v[layer][:, :, t0:t1] = v
        return self.k[layer][:, :, :t1], self.v[layer][:, :, :t1]

    def end(self) -> None:
        self._len += self._pending
        self._pending = None

    def abort(self) -> None:
        self._pending = None

    def read(self, layer: int) -> tuple[Tensor, Tensor]:
        return self.k[layer][:, :, :self._len], self.v[layer][:, :, :self._len]

    def rollback(self, n: int) -> None:
        check_rollback(n, self._len)
        if n:
            for t in self.k + self.v:  # zero the forgotten rows: a rolled-back cache is byte-identical to a fresh one
                t[:, :, self._len - n:self._len].zero_()
            self._len -= n
