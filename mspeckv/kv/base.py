"""The one interface between the model and KV storage.

A forward over ``n_new`` tokens does::

    cache.begin(n_new)                       # backends may start prefetching layer 0 here
    for layer in range(n_layers):
        k_all, v_all = cache.update(layer, k_new, v_new)   # append, then view for attention
    cache.end()                              # commit: length += n_new

``update`` receives the new tokens' keys/values after RoPE, ``(B, H_kv, n_new, D)``, and returns what attention reads,
``(B, H_kv, S, D)``, whose **last** ``n_new`` rows are the new tokens (so the causal mask is "everything before, plus
causal among the new rows"). A view may be a subset of the history (retrieval, streaming windows): ``S`` need not
equal ``length + n_new``. ``rollback(n)`` forgets the newest ``n`` committed tokens; callers never touch lengths.

``read(layer)`` returns the committed history ``(B, H_kv, length, D)`` on the compute device, outside any forward
(used to build retrieval caches and by presses). Caches may also define ``observe_query(layer, q)``: the model then
hands it each layer's post-RoPE queries ``(B, H_q, n_new, D)`` before ``update`` (retrieval scoring, SnapKV, H2O).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from torch import Tensor


@runtime_checkable
class KVCache(Protocol):
    n_layers: int

    def length(self) -> int:
        """Committed tokens (host int, never a device sync)."""
        ...

    def capacity(self) -> int:
        """Most tokens this cache can hold."""
        ...

    def begin(self, n_new: int) -> None: ...

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]: ...

    def end(self) -> None: ...

    def rollback(self, n: int) -> None: ...

    def read(self, layer: int) -> tuple[Tensor, Tensor]: ...


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
