"""Static-shape KV caches for CUDA graphs: fixed-capacity buffers, the length mirrored on the device.

A forward over T tokens writes its K/V at rows ``[pos, pos+T)`` (``pos`` a device scalar) and attends over the whole
buffer with a mask that hides rows past each query's position, so every replay has the same shapes and no host
values inside. Host bookkeeping (length checks, streaming compaction, rollback) happens outside the graph.

``StaticStreaming`` (draft: sinks + recent window) and ``StaticRetrieval`` (middle level: retrieved chunks +
appended rows) hold the same rows as ``StreamingCache`` / ``RetrievalCache``; they differ only in shapes.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import CacheFullError, check_rollback, check_shape
from .retrieval import BudgetCoversPrompt, select_chunks


class StaticKV:
    def __init__(self, n_layers: int, batch: int, n_kv_heads: int, head_dim: int, capacity: int, groups: int,
                 dtype: torch.dtype, device):
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

    @classmethod
    def for_model(cls, model, capacity: int, batch: int = 1, **kw):
        c = model.cfg
        return cls(c.n_layers, batch, c.n_kv_heads, c.head_dim, capacity, c.n_heads // c.n_kv_heads,
                   model.dtype, model.device, **kw)

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


class StaticStreaming(StaticKV):
    """Sinks + recent window in a fixed buffer of sinks + window + room rows. Eviction (compaction of the window to
    the front) happens only in ``reserve``/``prepare``, outside any forward, so rollbacks within a round are exact."""

    def __init__(self, *a, sinks: int, window: int, room: int, **kw):
        super().__init__(*a, **kw)
        if sinks < 0 or window < 1 or room < 1:
            raise ValueError(f"streaming cache needs sinks >= 0, window >= 1, room >= 1, got {sinks}, {window}, {room}")
        if sinks + window + room != self.cap:
            raise ValueError("capacity must equal sinks + window + room")
        self.sinks, self.window = sinks, window
        self.n_evicted = 0
        self._floor = 0  # length right after the last compaction: a rollback below it would return wrong rows

    @classmethod
    def for_model(cls, model, *, sinks: int, window: int, room: int, batch: int = 1):
        return super().for_model(model, sinks + window + room, batch, sinks=sinks, window=window, room=room)

    def reserve(self, n: int) -> None:
        if self._len + n <= self.cap:
            return
        keep = self.window
        src = self._len - keep
        if src > self.sinks:
            for t in self.k + self.v:
                t[:, :, self.sinks:self.sinks + keep] = t[:, :, src:src + keep].clone()
            self.n_evicted += src - self.sinks
            self.set_length(self.sinks + keep)
            self._floor = self._len
        if self._len + n > self.cap:
            raise CacheFullError(f"a forward of {n} tokens exceeds the streaming cache's room ({self.cap - self._len})")

    def prepare(self, n_new: int) -> None:
        self.reserve(n_new)

    def rollback(self, n: int) -> None:
        if self._len - n < self._floor:
            raise ValueError(f"rollback({n}) crosses a compaction: only {self._len - self._floor} tokens were appended "
                             f"since the last one; call reserve(total tokens of the round) before a speculation round")
        super().rollback(n)


class StaticRetrieval(StaticKV):
    """Retrieved chunks of the full cache (fixed rows at the front) + appended rows, in ``budget + extra`` rows."""

    @classmethod
    def build(cls, model, full_cache, queries: list[Tensor], budget: int, chunk: int, extra: int) -> StaticRetrieval:
        self = cls.for_model(model, budget + extra)
        self.fill(full_cache, queries, chunk, budget)
        return self

    def fill(self, full_cache, queries: list[Tensor], chunk: int, budget: int | None = None) -> None:
        budget = budget or self.budget
        self.budget = budget
        if budget >= full_cache.length():
            raise BudgetCoversPrompt(f"budget {budget} >= history {full_cache.length()}")
        n = None
        for layer in range(self.n_layers):
            k, v = full_cache.read(layer)  # (B, Hkv, L, D)
            idx = select_chunks(k, queries[layer], budget, chunk)  # (B, Hkv, n)
            n = idx.shape[-1]
            g = idx[..., None].expand(-1, -1, -1, k.shape[-1])
            self.k[layer][:, :, :n] = torch.gather(k, 2, g)
            self.v[layer][:, :, :n] = torch.gather(v, 2, g)
        self.n_retrieved = n
        self.set_length(n)

    def rebuild(self, full_cache, queries: list[Tensor], chunk: int = 8) -> None:
        self.fill(full_cache, queries, chunk)

    def rollback(self, n: int) -> None:
        if self._len - n < self.n_retrieved:
            raise ValueError(f"rollback({n}) would cut into the {self.n_retrieved} retrieved rows")
        super().rollback(n)

    def append_external(self, kv_per_layer: list[tuple[Tensor, Tensor]]) -> None:
        m = kv_per_layer[0][0].shape[2]
        self.prepare(m)
        for layer, (k, v) in enumerate(kv_per_layer):
            self.k[layer][:, :, self._len:self._len + m] = k
            self.v[layer][:, :, self._len:self._len + m] = v
        self.set_length(self._len + m)


class GraphedForward:
    """``model(ids, cache, positions)`` for a fixed token count T captured in a CUDA graph (eager on the CPU).

    Call it with the new token ids (1, T) and the absolute position of the first; returns fp32 logits
    (1, num_logits, V) in a buffer the next replay overwrites (consume or clone before calling again).
    """

    def __init__(self, model, cache: StaticKV, T: int, num_logits: int, pool=None, batch: int = 1):
        self.model, self.cache, self.T, self.num_logits = model, cache, T, num_logits
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
            self.kept = {a: list(getattr(cache, a)) for a in ("new", "queries") if hasattr(cache, a)}

    def _eager(self) -> Tensor:
        return self.model(self.ids, self.cache, pos0=0, num_logits=self.num_logits, positions=self.positions)

    def __call__(self, ids: Tensor, pos0: int) -> Tensor:
        self.ids.copy_(ids)
        torch.add(self.ar, pos0, out=self.positions)
        if self.graph is None:
            return self._eager()
        self.cache.prepare(self.T)
        self.graph.replay()
        self.cache.commit(self.T)
        for a, tensors in self.kept.items():
            getattr(self.cache, a)[:] = tensors
        return self.out
