"""Fixed-context step timing over a model and its cache: fill a cache to a context, then time a forward of n tokens
on top of it (eager, or graphed as autoregressive decoding runs it), rolled back after each step so the context
stays fixed. The clocks themselves are ``runs.harness``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..cache import make_cache
from ..kv.static import GraphedForward
from ..runs.harness import time_ms


def fill_cache(model, cache, ctx: int, chunk: int = 4096, seed: int = 0) -> None:
    """Write ctx tokens of random K/V (N(0,1), like post-norm activations) through the cache's own path."""
    c = model.cfg
    g = torch.Generator(device=model.device)
    g.manual_seed(seed)
    for s in range(0, ctx, chunk):
        n = min(chunk, ctx - s)
        cache.begin(n)
        for layer in range(c.n_layers):
            k = torch.randn(1, c.n_kv_heads, n, c.head_dim, generator=g, device=model.device, dtype=model.dtype)
            v = torch.randn(1, c.n_kv_heads, n, c.head_dim, generator=g, device=model.device, dtype=model.dtype)
            cache.update(layer, k, v)
        cache.end()


def step_runs(step: Callable[[], Any], steps: int, repeats: int) -> list[float]:
    """Per-repeat mean ms of ``step`` over ``steps`` calls (two warm-up calls before the first repeat)."""
    return [time_ms(step, warmup=2 if i == 0 else 0, iters=steps) for i in range(repeats)]


def decode_ms(model, cache, steps: int, repeats: int, n_tokens: int = 1) -> list[float]:
    """Per-repeat mean ms of a forward over n_tokens on top of the cache; rolls back after each (fixed context)."""
    tok = torch.randint(0, model.cfg.vocab_size, (1, n_tokens), device=model.device)

    def step():
        model(tok, cache)
        cache.rollback(n_tokens)

    with torch.inference_mode():
        return step_runs(step, steps, repeats)


def graphed_ms(
    model, ctx: int, steps: int, repeats: int, n_tokens: int = 1, placement=None, capacity: int | None = None
) -> tuple[list[float], int, dict]:
    """(per-repeat mean ms, H2D bytes per step, memory report) of a GRAPHED forward over n_tokens (StaticKV +
    GraphedForward, as autoregressive decoding runs it; eager on the CPU) on a cache filled to ctx: every layer on
    the GPU without ``placement``, else the static PlacedKV of ``placement`` (its resident slots filled by one eager
    forward first, so the plan is stationary). Fixed context: rolled back after each step."""
    cache = make_cache(model, placement, 1, capacity or ctx + n_tokens + 8, graphs=True)
    with torch.inference_mode():
        fill_cache(model, cache, ctx)
        tok = torch.randint(0, model.cfg.vocab_size, (1, n_tokens), device=model.device)
        if placement is not None:
            model(tok, cache)
            cache.rollback(n_tokens)
        fwd = GraphedForward(model, cache, n_tokens, 1)
        stats = getattr(cache, "stats", None)
        before, n0 = (stats.h2d_bytes, stats.static_forwards) if stats is not None else (0, 0)

        def step():
            fwd(tok, ctx)
            cache.rollback(n_tokens)

        runs = step_runs(step, steps, repeats)
        if stats is None:
            return runs, 0, {}
        per_step = (stats.h2d_bytes - before) // max(stats.static_forwards - n0, 1)
        return runs, per_step, cache.memory_report()
