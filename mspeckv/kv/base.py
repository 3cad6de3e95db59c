"""The one interface between the model and KV storage: the ``KVCache`` base class.

A forward over ``n_new`` tokens does::

    cache.begin(n_new)                       # backends may start prefetching layer 0 here
    for layer in range(n_layers):
        cache.on_query(layer, q)             # observers see each layer's post-RoPE queries (B, H_q, n_new, D)
        k_all, v_all = cache.update(layer, k_new, v_new)   # append, then view for attention
        mask = cache.attn_mask               # None, or a bool mask for static-shape views
        lens = cache.attn_lens               # None, or (T,): the mask is each row's prefix [0, lens[t])
    cache.end()                              # commit: length += n_new

``update`` receives the new tokens' keys/values after RoPE, ``(B, H_kv, n_new, D)``, and returns what attention reads,
``(B, H_kv, S, D)``, whose **last** ``n_new`` rows are the new tokens (so the causal mask is "everything before, plus
causal among the new rows"), unless ``attn_mask`` says otherwise. A view may be a subset of the history (a press kept
some rows, a streaming window): ``S`` need not equal ``length + n_new``, and ``next_position()`` (the absolute
position of the next token, which the model uses for RoPE) need not equal ``length()`` (rows held).
``rollback(n)`` forgets the newest ``n`` committed tokens; callers never touch lengths.

``read(layer)`` returns the rows held ``(B, H_kv, length, D)`` on the compute device, reconstructed if they are
stored compressed, outside any forward; ``positions(layer)`` gives their absolute positions ``(B, H_kv, length)``.

Everything else has a no-op default here, so the model and the decoders call it without probing attributes:
``reserve`` (make room before a speculation round), ``abort`` (drop a failed forward), ``compress`` (apply a press),
``memory_report``. Graphable caches (``graphable = True``) add the host halves of a replayed forward: ``graph_key(n)``
(which captured graph a forward of n tokens may replay; None: run it eagerly), ``prepare(n)`` before a replay and
``commit(n)`` after it (``GraphedForward`` calls them).
Observers (``Observer``: last queries, the new rows of a forward, accumulated attention) are
attached with ``cache.observers.append(obs)`` and see every forward through ``on_query`` / ``on_update``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Window:
    """A StreamingLLM read of a cache with per-sequence lengths: on top of its ``attn_lens`` bound, row (b, t) sees
    key j only if ``j < sinks`` or ``j >= starts[b, t]``. The decode kernel then reads those keys alone, so a draft
    step over a 32K-row sequence costs its ``span`` keys, not 32K."""

    sinks: int
    starts: Tensor  # (B, T) int, on the device (graph safe)
    span: int  # the most keys any row reads (sinks + window): sizes the kernel's split of the key axis


class Observer:
    """Sees a cache's forwards. Subclasses override what they need; tensors they keep must be their own copies,
    or be listed in ``kept()`` so that a CUDA-graph replay can re-point them (see ``GraphedForward``)."""

    def on_query(self, layer: int, q: Tensor) -> None:
        """q (B, H_q, n_new, D): post-RoPE queries of a forward, before the cache's update."""

    def on_update(self, layer: int, k: Tensor, v: Tensor, k_all: Tensor, mask: Tensor | None) -> None:
        """k/v (B, H_kv, n_new, D) the new rows; k_all (B, H_kv, S, D) what attention reads, with ``mask``."""

    def kept(self) -> dict[str, list]:
        """Per-forward tensor lists this observer holds (re-pointed after a graph replay)."""
        return {}


class KVCache:
    """Base class of every KV backend. Subclasses implement length/capacity/begin/update/end/rollback/read."""

    n_layers: int
    batch: int | None = None  # rows the cache was built for (None: any)
    attn_mask: Tensor | None = None  # static-shape caches: (T, S) bool, True where a query row may attend
    # set with attn_mask when that mask is each row's prefix: (T,) int32, row t sees keys j < attn_lens[t]. The
    # attention kernel then bounds each row by it and loads no mask (model/decode_attention.py)
    attn_lens: Tensor | None = None
    attn_window: Window | None = None  # with attn_lens (B, T): each row reads its sinks and a window (see Window)
    graphable: bool = False  # a static layout (fixed buffers, device-side length): forwards can replay CUDA graphs
    ragged: bool = False  # a length per sequence: the model takes positions from token_positions() (kv/batch.py)

    def __init__(self) -> None:
        self.observers: list[Observer] = []

    # ------------------------------------------------------------------------------------------------ required
    def length(self) -> int:
        """Rows held (committed; host int, never a device sync)."""
        raise NotImplementedError

    def capacity(self) -> int:
        """Most rows this cache can hold."""
        raise NotImplementedError

    def begin(self, n_new: int) -> None:
        raise NotImplementedError

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def end(self) -> None:
        raise NotImplementedError

    def rollback(self, n: int) -> None:
        raise NotImplementedError

    def read(self, layer: int) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    # ------------------------------------------------------------------------------------------------ defaults
    def next_position(self) -> int:
        """Absolute position of the next token; equals ``length()`` unless rows were evicted."""
        return self.length()

    def positions(self, layer: int) -> Tensor:
        """(B, H_kv, length) absolute positions of the rows ``read(layer)`` returns."""
        k, _ = self.read(layer)
        B, H, n, _ = k.shape
        return torch.arange(n, device=k.device).expand(B, H, n)

    def token_positions(self, n_new: int) -> Tensor | None:
        """(B, n_new) absolute positions of the next forward's tokens when each sequence has its own length (on the
        device, graph safe); None: every row continues at ``next_position()``."""
        return None

    def reserve(self, n: int) -> None:
        """Make room now so that forwards totalling ``n`` tokens need no eviction (rollback-safe rounds)."""

    def abort(self) -> None:
        """Drop a forward that failed between begin() and end()."""

    def compress(self) -> None:
        """Apply this cache's press to the rows held (no press: nothing to do)."""

    def memory_report(self) -> dict:
        return {}

    # ------------------------------------------------------------------------------------------ graphable caches
    def graph_key(self, n_new: int):
        """Identity of the captured graph a forward of ``n_new`` tokens may replay (hashable), or None: eager."""
        return () if self.graphable else None

    def prepare(self, n_new: int) -> None:
        """Host side of begin() before a replay."""
        raise NotImplementedError(f"{type(self).__name__} has no static layout (graphable is False)")

    def commit(self, n: int) -> None:
        """Host side of end() after a replay; ``commit(-n)`` undoes a capture's bookkeeping."""
        raise NotImplementedError(f"{type(self).__name__} has no static layout (graphable is False)")

    # ------------------------------------------------------------------------------------------------ observers
    def on_query(self, layer: int, q: Tensor) -> None:
        for o in self.observers:
            o.on_query(layer, q)

    def on_update(self, layer: int, k: Tensor, v: Tensor, k_all: Tensor, mask: Tensor | None) -> None:
        for o in self.observers:
            o.on_update(layer, k, v, k_all, mask)


class CacheFullError(ValueError):
    pass


def check_begin(length: int, n_new: int, capacity: int, pending: int | None) -> None:
    if pending is not None:
        raise RuntimeError("cache.begin() called twice without end(): a previous forward did not finish")
    if n_new < 1:
        raise ValueError(f"a forward needs at least one token, got {n_new}")
    if length + n_new > capacity:
        raise CacheFullError(
            f"KV cache holds {capacity} tokens but {length} + {n_new} were asked for; "
            f"allocate a larger cache (max_len) or shorten the prompt/generation"
        )


def check_shape(batch, max_len) -> None:
    """A cache's batch and length must be positive ints (a batch of 0 would broadcast into wrong output)."""
    from .. import validate as v

    v.integer("batch", batch, lo=1)
    v.integer("max_len", max_len, lo=1)


def check_rollback(n: int, length: int) -> None:
    if not 0 <= n <= length:
        raise ValueError(f"rollback({n}) outside [0, {length}]")


# ---------------------------------------------------------------------------------------------- common observers
class LastQueries(Observer):
    """The last ``n_last`` post-RoPE query rows of each layer, (B, H_q, <=n_last, D), rolling over forwards (a
    1-token last prefill chunk still yields ``n_last`` rows when earlier forwards had more)."""

    def __init__(self, n_layers: int, n_last: int = 1):
        if n_last < 1:
            raise ValueError(f"n_last must be >= 1, got {n_last}")
        self.n_last = n_last
        self.queries: list[Tensor | None] = [None] * n_layers

    def on_query(self, layer: int, q: Tensor) -> None:
        prev, last = self.queries[layer], q[:, :, -self.n_last:]
        if prev is not None and prev.shape[2] == self.n_last and prev.shape[:2] == q.shape[:2] \
                and prev.dtype == q.dtype and prev.device == q.device:
            # full: roll in place. A CUDA graph that captured this forward then reads and writes this same buffer on
            # every replay; a new tensor here would leave the graph reading the pre-capture one, freed once the list
            # is re-pointed (a dangling read: the H2O/SnapKV middle level's illegal memory access on the GPU)
            T = last.shape[2]
            prev.copy_(last if T == self.n_last else torch.cat([prev[:, :, T:], last], 2))
            return
        if prev is not None and last.shape[2] < self.n_last:
            last = torch.cat([prev, last], 2)[:, :, -self.n_last:]
        self.queries[layer] = last.clone()  # a view would pin the whole chunk's queries

    def kept(self) -> dict[str, list]:
        return {"queries": self.queries}


class NewRows(Observer):
    """The new K/V rows of the latest forward per layer (views; valid until the next forward)."""

    def __init__(self, n_layers: int):
        self.new: list[tuple[Tensor, Tensor] | None] = [None] * n_layers

    def on_update(self, layer, k, v, k_all, mask) -> None:
        self.new[layer] = (k, v)

    def kept(self) -> dict[str, list]:
        return {"new": self.new}
