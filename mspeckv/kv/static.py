"""Static-shape KV caches for CUDA graphs: fixed-capacity buffers, the length mirrored on the device.

A forward over T tokens writes its K/V at rows ``[pos, pos+T)`` (``pos`` a device scalar) and attends over the whole
buffer with a mask that hides rows past each query's position, so every replay has the same shapes and no host
values inside. Host bookkeeping (length checks, streaming compaction, rollback) happens outside the graph.

Pressed caches (``kv/pressed.py``) have the same static layout for the draft's streaming window and the middle level.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import CacheFullError, KVCache, check_rollback, check_shape


class StaticKV(KVCache):
    graphable = True
    def __init__(self, n_layers: int, batch: int, n_kv_heads: int, head_dim: int, capacity: int, groups: int,
                 dtype: torch.dtype, device):
        super().__init__()
        check_shape(batch, capacity)
        self.n_layers, self.cap, self.groups, self.batch = n_layers, capacity, groups, batch
        shape = (batch, n_kv_heads, capacity, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.pos = torch.zeros((), dtype=torch.long, device=device)  # == length, on the device
        self.cols = torch.arange(capacity, device=device)
        self._len = 0
        self._n: int | None = None
        self.attn_mask: Tensor | None = None
        self.attn_lens: Tensor | None = None

    @classmethod
    def for_model(cls, model, capacity: int, batch: int = 1, **kw):
        c = model.cfg
        return cls(c.n_layers, batch, c.n_kv_heads, c.head_dim, capacity, c.n_heads // c.n_kv_heads,
                   model.dtype, model.device, **kw)

    def nbytes(self) -> int:
        """Bytes allocated for K and V (the whole capacity)."""
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    # -------------------------------------------------------------------------------------------- KVCache protocol
    def length(self) -> int:
        return self._len

    def capacity(self) -> int:
        return self.cap

    def prepare(self, n_new: int) -> None:
        """Host-side checks before a forward (eager or replayed)."""
        if self._len + n_new > self.cap:
            raise CacheFullError(f"static cache holds {self.cap} tokens; {self._len} + {n_new} were asked for")

    def begin(self, n_new: int) -> None:
        self.prepare(n_new)
        self._n = n_new
        rows = self.pos + torch.arange(n_new, device=self.pos.device)  # (T,) device: graph-safe
        self.rows = rows
        self.attn_mask = self.cols[None, :] <= rows[:, None]  # (T, C): row i sees keys up to its own position
        self.attn_lens = (rows + 1).to(torch.int32)  # the same, as each row's prefix length

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        self.k[layer].index_copy_(2, self.rows, k)
        self.v[layer].index_copy_(2, self.rows, v)
        return self.k[layer], self.v[layer]

    def end(self) -> None:
        self.pos.add_(self._n)
        self.commit(self._n)

    def commit(self, n: int) -> None:
        """Host side of end() (a replayed graph advances ``pos`` itself)."""
        self._len += n
        self._n = None

    def abort(self) -> None:
        self._n = None

    def rollback(self, n: int) -> None:
        check_rollback(n, self._len)
        self._len -= n
        self.pos.sub_(n)

    def read(self, layer: int) -> tuple[Tensor, Tensor]:
        return self.k[layer][:, :, :self._len], self.v[layer][:, :, :self._len]

    def set_length(self, n: int) -> None:
        self._len = n
        self.pos.fill_(n)


class GraphedForward:
    """``model(ids, cache, positions)`` for a fixed token count T captured in a CUDA graph (eager on the CPU).

    Call it with the new token ids (1, T) and the absolute position of the first; returns fp32 logits
    (1, num_logits, V) in a buffer the next replay overwrites (consume or clone before calling again).
    """

    def __init__(self, model, cache: KVCache, T: int, num_logits: int, pool=None, batch: int = 1):
        self.model, self.cache, self.T, self.num_logits = model, cache, T, num_logits
        self.key = cache.graph_key(T)  # what the cache's layout depends on (e.g. PlacedKV: bucket, residency plan)
        if self.key is None:
            raise ValueError(f"{type(cache).__name__} cannot capture a forward of {T} tokens now (graph_key is None); "
                             f"run it eagerly")
        dev = model.device
        self.ids = torch.zeros(batch, T, dtype=torch.long, device=dev)
        self.ar = torch.arange(T, device=dev)
        self.positions = self.ar.clone()
        self.graph = None
        if dev.type == "cuda":
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                for _ in range(2):  # warm-up (allocator, cuBLAS handles) outside the graph
                    self._eager()
                    cache.rollback(T)
            torch.cuda.current_stream().wait_stream(s)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph, pool=pool):
                self.out = self._eager()
            cache.commit(-T)  # capture ran the host bookkeeping of one forward but executed no device work
            # wrappers that keep per-forward tensors (new K/V, queries) must point at this graph's after a replay
            self.kept = [(lst, list(lst)) for o in cache.observers for lst in o.kept().values()]

    def _eager(self) -> Tensor:
        # a ragged cache's positions come from its device-side lengths, inside the graph (token_positions)
        pos = None if self.cache.ragged else self.positions
        return self.model(self.ids, self.cache, pos0=0, num_logits=self.num_logits, positions=pos)

    def __call__(self, ids: Tensor, pos0: int, key=None) -> Tensor:
        """``key``: the cache's ``graph_key(T)`` if the caller already has it (checked here otherwise)."""
        if (self.cache.graph_key(self.T) if key is None else key) != self.key:
            raise RuntimeError(f"this graph was captured for cache layout {self.key!r}, the cache is now at "
                               f"{self.cache.graph_key(self.T)!r}: capture another (GraphRunner does)")
        self.ids.copy_(ids)
        torch.add(self.ar, pos0, out=self.positions)
        if self.graph is None:
            return self._eager()
        self.cache.prepare(self.T)
        self.graph.replay()
        self.cache.commit(self.T)
        for lst, tensors in self.kept:
            lst[:] = tensors
        return self.out
