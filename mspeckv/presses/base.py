"""What a press is: a policy that decides which of a layer's rows are kept (``select``) and in what form (``encode``).

A press never owns storage. ``PressedKV`` (``mspeckv/kv/pressed.py``) calls, once per layer::

    stores = press.compress(layer, n_layers, k, v, pos, obs)     # k/v (B, H_kv, L, D) post-RoPE, pos (B, H_kv, L)

which is ``select`` (indices to keep, or None = all) followed by ``encode`` (the kept rows as stores:
``Rows`` / ``QuantRows`` / ``LowRank``, see ``mspeckv/kv/stores.py``). ``obs`` is the list of observers the press
asked for (``observers()``), attached to the cache the rows came from during prefill: last queries, accumulated
attention.

Budgets (``Budget``): a float in (0, 1] is the ratio of rows kept, an int >= 1 a fixed count; ``layer_budgets``
overrides it per layer (any retain list; PyramidKV computes one). A budget that covers every row keeps them all,
unchanged (``select`` returns None), so a full-budget press gives logits identical to no press.

Score presses share ``ScorePress.select``: ``score(...) -> (B, H_kv, L)``, the first ``sinks`` and the newest
``window`` rows forced in, then top-k, kept in position order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from ..kv.base import LastQueries, Observer
from ..kv.stores import Rows, Store


def check_budget_value(name: str, b) -> None:
    if isinstance(b, bool) or not isinstance(b, int | float):
        raise ValueError(f"{name} must be a ratio in (0, 1] or a token count >= 1, got {b!r}")
    if isinstance(b, float) and not (0.0 < b <= 1.0):
        raise ValueError(f"{name} as a ratio must be in (0, 1], got {b}; give a token count as an int")
    if isinstance(b, int) and b < 1:
        raise ValueError(f"{name} as a token count must be >= 1, got {b}")


def n_keep(budget: float | int, L: int) -> int:
    """Rows kept of ``L`` for a ratio (rounded up) or a count (capped at L)."""
    return min(L, max(1, math.ceil(budget * L)) if isinstance(budget, float) else budget)


def check_range(obj, name: str, lo=None, hi=None, kind=int) -> None:
    v = getattr(obj, name)
    if isinstance(v, bool) or not isinstance(v, kind if kind is not float else int | float):
        raise ValueError(f"{type(obj).__name__}.{name} must be {kind.__name__}, got {v!r}")
    if (lo is not None and v < lo) or (hi is not None and v > hi) or (kind is float and not math.isfinite(v)):
        rng = f"[{lo}, {'inf' if hi is None else hi}]"
        raise ValueError(f"{type(obj).__name__}.{name} must be in {rng}, got {v!r}")


@dataclass(frozen=True)
class Press:
    """Base: keeps everything as dense rows (a no-op press)."""

    name: ClassVar[str] = "none"

    def observers(self, n_layers: int) -> list[Observer]:
        return []

    def select(self, layer: int, n_layers: int, k: Tensor, pos: Tensor, obs: list) -> Tensor | None:
        """(B, H, n) int64 row indices to keep, increasing, or None for all."""
        return None

    def encode(self, layer: int, k: Tensor, v: Tensor, pos: Tensor, obs: list) -> list[Store]:
        return [Rows(k.clone(), v.clone(), pos.to(torch.int32))]

    def compress(self, layer: int, n_layers: int, k: Tensor, v: Tensor, pos: Tensor, obs: list) -> list[Store]:
        idx = self.select(layer, n_layers, k, pos, obs)
        if idx is not None:
            k, v, pos = gather_rows(k, idx), gather_rows(v, idx), pos.gather(2, idx)
        return self.encode(layer, k, v, pos, obs)

    def max_rows(self, L: int, n_layers: int, n_kv_heads: int = 1) -> int:
        """Most rows one head of one layer keeps of ``L`` (sizes static buffers)."""
        return L

    @property
    def dense(self) -> bool:
        """True when the press keeps rows as they are (eviction only): a CUDA-graph layout can hold them."""
        return type(self).encode is Press.encode

    def spec(self) -> str:
        """The ``name:k=v,...`` string that ``parse_press`` turns back into this press."""
        kv = ",".join(f"{f.name}={_fmt(getattr(self, f.name))}" for f in fields(self)
                      if getattr(self, f.name) != f.default)  # defaults left out (None has no spelling)
        return f"{self.name}:{kv}" if kv else self.name

    def __str__(self) -> str:
        return self.spec()


def _fmt(v) -> str:
    return "/".join(map(str, v)) if isinstance(v, tuple) else str(v)


def gather_rows(x: Tensor, idx: Tensor) -> Tensor:
    """x (B, H, L, D), idx (B, H, n) -> (B, H, n, D)."""
    return x.gather(2, idx[..., None].expand(-1, -1, -1, x.shape[-1]))


@dataclass(frozen=True)
class ScorePress(Press):
    """Eviction by score: keep the top ``budget`` rows of ``score`` plus the first ``sinks`` and newest ``window``."""

    budget: float | int = 0.25
    sinks: int = 4
    window: int = 32
    layer_budgets: tuple | None = None  # per-layer budgets (ratios or counts), overriding ``budget``
    window_share: float = 1.0  # most of a layer's budget the forced window may take; the rest is chosen by score

    def __post_init__(self):
        check_budget_value(f"{self.name}.budget", self.budget)
        check_range(self, "sinks", 0)
        check_range(self, "window", 0)
        check_range(self, "window_share", 0.0, 1.0, kind=float)
        if self.layer_budgets is not None:
            for i, b in enumerate(self.layer_budgets):
                check_budget_value(f"{self.name}.layer_budgets[{i}]", b)

    def layer_budget(self, layer: int, n_layers: int) -> float | int:
        if self.layer_budgets is None:
            return self.budget
        if len(self.layer_budgets) != n_layers:
            raise ValueError(f"{self.name}.layer_budgets has {len(self.layer_budgets)} entries for a model with "
                             f"{n_layers} layers; give one budget per layer")
        return self.layer_budgets[layer]

    def max_rows(self, L, n_layers, n_kv_heads=1):
        return max(n_keep(self.layer_budget(i, n_layers), L) for i in range(n_layers))

    def score(self, layer: int, k: Tensor, pos: Tensor, obs: list) -> Tensor:
        raise NotImplementedError

    def select(self, layer, n_layers, k, pos, obs):
        B, H, L, _ = k.shape
        n = n_keep(self.layer_budget(layer, n_layers), L)
        if n >= L:
            return None
        s = forced_ranking(self.score(layer, k, pos, obs), self.sinks, self.forced_window(n))
        return s.topk(n, dim=-1).indices.sort(-1).values

    def forced_window(self, n: int) -> int:
        """Newest rows forced in when a layer keeps ``n``: ``window``, capped at ``window_share`` of ``n`` (a window
        wider than the budget would otherwise turn the press into StreamingLLM: nothing older could be kept)."""
        return min(self.window, int(self.window_share * n))


# ---------------------------------------------------------------------------------------------- shared scoring
def forced_ranking(scores: Tensor, sinks: int, window: int) -> Tensor:
    """Scores (B, H, L) -> a ranking in which the first ``sinks`` rows come first, then the newest ``window`` rows
    (newest first), then every other row by its score. Top-k of it keeps the forced rows when the budget allows, and
    when it does not (sinks + window > budget) the sinks and the newest rows, never an arbitrary pick among ties.
    Scores are scaled into [0, 1] per head; window rows rank in [2, 3) by position, sinks at 4."""
    s = scores.float()
    L = s.shape[-1]
    s = s / s.amax(-1, keepdim=True).clamp_min(1e-30)  # [0, 1] (scores are non-negative attention mass)
    ar = torch.arange(L, device=s.device, dtype=torch.float32)
    if window:
        s = torch.where(ar >= L - window, 2.0 + ar / L, s)
    if sinks:
        s = torch.where(ar < sinks, torch.full_like(s, 4.0), s)
    return s


def window_attention(q: Tensor, k: Tensor, pos: Tensor) -> Tensor:
    """Attention of observation queries q (B, Hq, w, D), the newest w tokens, over the held keys k (B, Hkv, L, D)
    -> (B, Hkv, G, w, L) probabilities. Query i sits at position ``pos.max() - w + 1 + i`` and sees keys at
    positions <= its own (the held rows include the queries' own tokens)."""
    B, Hq, w, D = q.shape
    Hkv, L = k.shape[1], k.shape[2]
    G = Hq // Hkv
    qg = q.float().reshape(B, Hkv, G * w, D)  # query head h = kv * G + g
    s = (qg @ k.float().transpose(-1, -2) / math.sqrt(D)).reshape(B, Hkv, G, w, L)
    last = pos.amax(-1, keepdim=True)  # (B, Hkv, 1) position of the newest token
    qpos = last[:, :, None, :] - (w - 1) + torch.arange(w, device=k.device)[:, None]  # (B, Hkv, w, 1)
    visible = pos[:, :, None, :] <= qpos  # (B, Hkv, w, L)
    s = s.masked_fill(~visible[:, :, None], float("-inf"))
    return s.softmax(-1)


def snap_scores(q: Tensor, k: Tensor, pos: Tensor, kernel: int, reduce: str) -> Tensor:
    """SnapKV: mean attention of the observation window, pooled along tokens, reduced over each GQA group."""
    a = window_attention(q, k, pos).mean(3)  # (B, Hkv, G, L)
    if kernel > 1:
        B, H, G, L = a.shape
        a = F.avg_pool1d(a.reshape(B * H * G, 1, L), kernel, stride=1, padding=kernel // 2,
                         count_include_pad=False)[..., :L].reshape(B, H, G, L)
    return a.amax(2) if reduce == "max" else a.mean(2)


def last_queries(obs: list, layer: int) -> Tensor:
    for o in obs:
        if isinstance(o, LastQueries):
            q = o.queries[layer]
            if q is None:
                raise RuntimeError("the press saw no queries: run a prefill through the cache before compress()")
            return q
    raise RuntimeError("this press needs a LastQueries observer on the cache it compresses")
