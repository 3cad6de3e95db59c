"""RetrievalCache: the middle level's KV, a fixed chunk selection of the full target cache plus appended rows.

Selection (``select_chunks``), per layer, per batch row and per KV head independently (one batched gather, no loop
over heads): the committed history ``[0, L)`` is cut into ``L // chunk`` full chunks plus a ragged tail of
``L % chunk`` tokens.
  * always kept: chunk 0 (the attention sinks) and the ragged tail (the newest tokens; never scored);
  * scored: every full chunk c by ``s = q . mean(K_c) / sqrt(D)``, turned into an estimated attention mass per query
    row by a softmax over the full chunks, then reduced by MAX over the KV head's G query heads and the nq query
    tokens (a chunk matters if any head of the group wants it; the softmax makes heads of different scale
    comparable, and with a single query row it ranks chunks exactly like the raw dot product);
  * kept: the ``(budget - chunk - tail) // chunk`` best full chunks among 1.. (chunk 0 is already in), in original
    order. So ``n_retrieved = chunk * (1 + k) + tail <= budget`` (equal when the tail is empty).
``budget`` must be a multiple of ``chunk`` and at least 2 chunks. ``budget >= L`` would keep everything: ``build``
raises ``BudgetCoversPrompt`` and ``retrieval_or_none`` warns and returns None, so the caller uses the full cache.

Layout per layer: ``(B, H_kv, budget + extra, D)``; rows ``[0, n_retrieved)`` are the retrieved ones (fixed),
rows after them are appended (drafted/generated tokens, or exact rows from the full target via ``append_external``).
``rollback`` removes appended rows only. Keys are post-RoPE at their original positions, so the model must be called
with ``pos0`` = the absolute position of the first new token (not ``length()``).
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor

from .base import check_begin, check_shape


class BudgetCoversPrompt(ValueError):
    """The retrieval budget holds the whole history: use the full cache instead."""


def check_budget(budget: int, chunk: int) -> None:
    from .. import validate as v

    b, c = v.name("budget"), v.name("chunk")
    if chunk < 1:
        raise ValueError(f"{c} must be >= 1, got {chunk}")
    if budget % chunk:
        raise ValueError(f"{b} {budget} is not a multiple of {c} {chunk}")
    if budget < 2 * chunk:
        raise ValueError(f"{b} {budget} must hold at least 2 chunks of {chunk} (the sink chunk + one retrieved)")


def chunk_scores(k: Tensor, q: Tensor, chunk: int) -> Tensor:
    """k (B, Hkv, L, D) committed keys, q (B, Hq, nq, D) queries -> (B, Hkv, L // chunk) score per full chunk."""
    B, Hkv, L, D = k.shape
    n = L // chunk
    G = q.shape[1] // Hkv
    means = k[:, :, :n * chunk].reshape(B, Hkv, n, chunk, D).mean(3, dtype=torch.float32)  # (B, Hkv, n, D)
    qg = q.float().reshape(B, Hkv, G * q.shape[2], D)  # query head h = kv * G + g, as in the model's GQA fold
    mass = (qg @ means.transpose(-1, -2) / math.sqrt(D)).softmax(-1)  # (B, Hkv, G*nq, n)
    return mass.amax(2)


def select_chunks(k: Tensor, q: Tensor, budget: int, chunk: int) -> Tensor:
    """Token indices to keep, (B, Hkv, n_retrieved) int64, increasing along the last axis. See module doc."""
    check_budget(budget, chunk)
    B, Hkv, L, _ = k.shape
    if budget >= L:
        raise BudgetCoversPrompt(f"budget {budget} covers the whole history of {L} tokens; use the full cache")
    n, tail = L // chunk, L % chunk
    n_top = (budget - chunk - tail) // chunk  # < n - 1 because budget < L
    scores = chunk_scores(k, q, chunk)[..., 1:]  # (B, Hkv, n-1): chunk 0 is always kept
    top = scores.topk(n_top, dim=-1).indices.sort(-1).values + 1  # (B, Hkv, n_top) chunk ids
    first = torch.zeros(B, Hkv, 1, dtype=torch.long, device=k.device)
    chunks = torch.cat([first, top], -1)  # (B, Hkv, 1 + n_top)
    ar = torch.arange(chunk, device=k.device)
    idx = (chunks[..., None] * chunk + ar).flatten(2)  # (B, Hkv, (1 + n_top) * chunk)
    tail_idx = torch.arange(n * chunk, L, device=k.device).expand(B, Hkv, tail)
    return torch.cat([idx, tail_idx], -1)


class RetrievalCache:
    def __init__(self, n_layers: int, batch: int, n_kv_heads: int, head_dim: int, budget: int, extra: int,
                 dtype: torch.dtype, device: torch.device | str):
        if extra < 1:
            raise ValueError(f"extra must be >= 1 (rows for generated/drafted tokens), got {extra}")
        check_shape(batch, budget + extra)
        self.n_layers, self.budget, self.extra, self.batch = n_layers, budget, extra, batch
        shape = (batch, n_kv_heads, budget + extra, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.index: list[Tensor] = []  # per layer (B, Hkv, n_retrieved): absolute positions of the retrieved rows
        self.n_retrieved = 0
        self.n_appended = 0
        self.source_len = 0  # length of the full cache the selection was made from
        self._pending: int | None = None

    @classmethod
    def build(cls, full_cache, queries: list[Tensor], budget: int, chunk: int = 8, extra: int = 64) -> RetrievalCache:
        """Select from ``full_cache`` (any KVCache with ``read``) using per-layer queries (B, Hq, nq, D).

        Raises ``BudgetCoversPrompt`` when ``budget >= full_cache.length()``.
        """
        check_budget(budget, chunk)
        if budget >= full_cache.length():
            raise BudgetCoversPrompt(
                f"budget {budget} covers the whole history of {full_cache.length()} tokens; use the full cache"
            )
        k0, _ = full_cache.read(0)
        B, Hkv, _, D = k0.shape
        self = cls(full_cache.n_layers, B, Hkv, D, budget, extra, k0.dtype, k0.device)
        self.rebuild(full_cache, queries, chunk)
        return self

    @classmethod
    def from_indices(cls, full_cache, index: list[Tensor] | Tensor, extra: int = 64) -> RetrievalCache:
        """Keep the given token indices, (B, Hkv, n) per layer (or one tensor for all layers), of ``full_cache``."""
        k0, _ = full_cache.read(0)
        B, Hkv, _, D = k0.shape
        idx = index if isinstance(index, list) else [index] * full_cache.n_layers
        self = cls(full_cache.n_layers, B, Hkv, D, idx[0].shape[-1], extra, k0.dtype, k0.device)
        self._fill(full_cache, lambda i, k: idx[i])
        return self

    def rebuild(self, full_cache, queries: list[Tensor], chunk: int = 8) -> None:
        """Re-select from the (grown) full cache, e.g. periodically; drops every appended row. Each layer's history
        is read once (for an offloaded cache every read is a transfer): select, then gather from the same read."""
        if len(queries) != self.n_layers:
            raise ValueError(f"need one query tensor per layer ({self.n_layers}), got {len(queries)}")
        self._fill(full_cache, lambda i, k: select_chunks(k, queries[i], self.budget, chunk))

    def _fill(self, full_cache, index_of) -> None:
        """``index_of(layer, k) -> (B, Hkv, n)`` token indices to keep; gathers them from one read per layer."""
        if self._pending is not None:
            raise RuntimeError("cannot refill a retrieval cache inside a forward")
        idx = []
        for i in range(self.n_layers):
            k, v = full_cache.read(i)  # (B, Hkv, L, D)
            ix = index_of(i, k)
            n = ix.shape[-1]
            if n > self.budget:
                raise ValueError(f"{n} retrieved rows exceed the buffer's budget of {self.budget}")
            g = ix[..., None].expand(-1, -1, -1, k.shape[-1])  # (B, Hkv, n, D)
            self.k[i][:, :, :n] = k.gather(2, g)
            self.v[i][:, :, :n] = v.gather(2, g)
            idx.append(ix)
        self.index, self.n_retrieved, self.n_appended = idx, idx[0].shape[-1], 0
        self.source_len = full_cache.length()

    def length(self) -> int:
        return self.n_retrieved + self.n_appended

    @property
    def n_seen(self) -> int:
        """Absolute position of the next token (= ``pos0`` for the next forward), assuming the appended rows
        continue the history the selection was made from."""
        return self.source_len + self.n_appended

    def capacity(self) -> int:
        return self.n_retrieved + self.extra

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def begin(self, n_new: int) -> None:
        check_begin(self.length(), n_new, self.capacity(), self._pending)
        self._pending = n_new

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        t0 = self.length()
        t1 = t0 + self._pending
        self.k[layer][:, :, t0:t1] = k
        self.v[layer][:, :, t0:t1] = v
        return self.k[layer][:, :, :t1], self.v[layer][:, :, :t1]

    def end(self) -> None:
        self.n_appended += self._pending
        self._pending = None

    def abort(self) -> None:
        self._pending = None

    def read(self, layer: int) -> tuple[Tensor, Tensor]:
        t = self.length()
        return self.k[layer][:, :, :t], self.v[layer][:, :, :t]

    def rollback(self, n: int) -> None:
        if not 0 <= n <= self.n_appended:
            raise ValueError(
                f"rollback({n}) outside [0, {self.n_appended}]: only appended rows can be rolled back, "
                f"the {self.n_retrieved} retrieved rows are fixed (rebuild to change them)"
            )
        self.n_appended -= n

    def append_external(self, kv_per_layer: list[tuple[Tensor, Tensor]]) -> None:
        """Append rows computed elsewhere (e.g. the full target's exact K/V of accepted tokens).

        kv_per_layer: one (k, v) per layer, each (B, Hkv, n, D), post-RoPE at their absolute positions.
        """
        if self._pending is not None:
            raise RuntimeError("append_external() inside a forward (between begin and end)")
        if len(kv_per_layer) != self.n_layers:
            raise ValueError(f"need one (k, v) per layer ({self.n_layers}), got {len(kv_per_layer)}")
        n = kv_per_layer[0][0].shape[2]
        if n:
            check_begin(self.length(), n, self.capacity(), None)
        t0 = self.length()
        for i, (k, v) in enumerate(kv_per_layer):
            self.k[i][:, :, t0:t0 + n] = k
            self.v[i][:, :, t0:t0 + n] = v
        self.n_appended += n


def retrieval_or_none(full_cache, queries: list[Tensor], budget: int, chunk: int = 8,
                      extra: int = 64) -> RetrievalCache | None:
    """``RetrievalCache.build``, or None with a warning when the budget covers the whole history."""
    try:
        return RetrievalCache.build(full_cache, queries, budget, chunk, extra)
    except BudgetCoversPrompt as e:
        warnings.warn(f"{e}: the middle level verifies against the full cache", stacklevel=2)
        return None


class QueryCapture:
    """Wraps a KVCache and records the last ``n_last`` post-RoPE query rows of each layer, (B, Hq, <=n_last, D).

    Rows roll over forwards (a 1-token last prefill chunk still yields ``n_last`` rows when there were earlier
    forwards). Everything else is delegated to ``inner``. Use: ``model.prefill(ids, QueryCapture(full, 16))`` then
    ``.queries`` for ``RetrievalCache.build``.
    """

    def __init__(self, inner, n_last: int = 1):
        if n_last < 1:
            raise ValueError(f"n_last must be >= 1, got {n_last}")
        self.inner, self.n_last = inner, n_last
        self.n_layers, self.batch = inner.n_layers, getattr(inner, "batch", None)
        self.queries: list[Tensor | None] = [None] * inner.n_layers

    def observe_query(self, layer: int, q: Tensor) -> None:
        prev, last = self.queries[layer], q[:, :, -self.n_last:]
        if prev is not None and last.shape[2] < self.n_last:
            last = torch.cat([prev, last], 2)[:, :, -self.n_last:]
        self.queries[layer] = last.clone()  # a view would pin the whole chunk's queries
        if (inner := getattr(self.inner, "observe_query", None)) is not None:
            inner(layer, q)

    def length(self) -> int:
        return self.inner.length()

    def capacity(self) -> int:
        return self.inner.capacity()

    def begin(self, n_new: int) -> None:
        self.inner.begin(n_new)

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        return self.inner.update(layer, k, v)

    def end(self) -> None:
        self.inner.end()

    def abort(self) -> None:
        getattr(self.inner, "abort", lambda: None)()

    def rollback(self, n: int) -> None:
        self.inner.rollback(n)

    def read(self, layer: int) -> tuple[Tensor, Tensor]:
        return self.inner.read(layer)

    def __getattr__(self, name: str):  # anything else (n_seen, nbytes, ...) from the wrapped cache
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)
