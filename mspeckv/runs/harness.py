"""The speed harness every bench and eval times with: clocks, warm-up and repeats, end-to-end fields, memory and
bandwidth probes, and table cells (the fixed-context step timers, which build caches, are ``bench/steps.py``).

A bench is "cells + how to time one cell": it builds its cells, times each with the helpers below, and renders rows
(``bench.registry``: config -> ``run`` -> result -> ``render`` -> one JSON line; files written atomically through
``runs.store``).

Clocks. ``time_ms`` is for short kernels and steps: CUDA events around ``iters`` calls after ``warmup`` calls (the
host clock on the CPU). ``wall`` is for whole requests: a device sync, then the host clock around the call, then a
sync, so the GPU's queue is inside the interval.

End to end (every request-level speed record, :func:`e2e`): ``setup_s`` is what a request pays outside its prefill
and decode (building its caches, pinned allocation, capturing graphs), ``ttft_s`` the prefill and first token,
``decode_s`` the tokens after the first; ``e2e_s`` = all three, measured as one wall-clock interval where the bench
can (then ``e2e_s >= setup_s + ttft_s + decode_s``, the rest being host work between them). Beside each bench's
decode-only rate (tokens after the first over the decode time) stands the end-to-end rate (``e2e_tok_per_s``: every
generated token over ``e2e_s``). Loading the model is once per process: ``model_load_s``.
"""

from __future__ import annotations

import gc
import math
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from .tables import fmt  # noqa: F401 (the benches, bench/batch.py and serve.load import it from here)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------------------- clocks
def time_ms(fn: Callable[[], Any], warmup: int, iters: int, cuda: bool | None = None, before=None) -> float:
    """Mean ms per call over ``iters`` calls, after ``warmup`` calls, timed with CUDA events (host clock on the CPU).
    ``cuda``: time with events (default: whenever CUDA is available); ``before()`` runs between warm-up and timing
    (e.g. a barrier across ranks)."""
    for _ in range(warmup):
        fn()
    if before is not None:
        before()
    if not (torch.cuda.is_available() if cuda is None else cuda):
        t = time.perf_counter()
        for _ in range(iters):
            fn()
        return (time.perf_counter() - t) * 1e3 / iters
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(iters):
        fn()
    e.record()
    e.synchronize()
    return s.elapsed_time(e) / iters


def wall(device: torch.device, fn: Callable[[], Any]) -> tuple[Any, float]:
    """(``fn()``, its wall-clock seconds with the device's queue drained before and after)."""
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t0


def repeat(fn: Callable[[], Any], repeats: int, warmup: int = 1, before=None) -> list:
    """``warmup`` untimed calls, then ``repeats`` calls whose results are returned; ``before()`` runs ahead of each
    kept call (e.g. a peak-memory reset)."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        if before is not None:
            before()
        out.append(fn())
    return out


def requests(device: torch.device, fn: Callable[[], Any], repeats: int) -> tuple[list, list[float]]:
    """``repeats`` calls of ``fn()``, each timed by :func:`wall` after a peak-memory reset: (results, seconds).
    Warm up before (one call at the same shape)."""
    out = repeat(lambda: wall(device, fn), repeats, warmup=0, before=lambda: reset_peak(device))
    return [r for r, _ in out], [w for _, w in out]


def median_of(runs: list, *keys: str) -> dict[str, Any]:
    """The median of each key (dict item or attribute) over the runs (None where a run lacks it)."""
    out = {}
    for k in keys:
        xs = [r.get(k) if isinstance(r, dict) else getattr(r, k, None) for r in runs]
        out[k] = statistics.median(xs) if xs and all(x is not None for x in xs) else None
    return out


# ------------------------------------------------------------------------------------------------------ end to end
def e2e(setup_s: float | None, ttft_s: float, decode_s: float, n_generated: int,
        e2e_s: float | None = None) -> dict[str, Any]:
    """The end-to-end fields of one request (module docstring), to stand beside the bench's decode-only rate.
    ``e2e_s``: the measured wall-clock interval around the request (default: the sum of the parts)."""
    total = e2e_s if e2e_s is not None else (setup_s or 0.0) + ttft_s + decode_s
    return {"setup_s": setup_s, "e2e_s": total, "e2e_tok_per_s": n_generated / total if total > 0 else None}


def median_e2e(runs: list, n_generated: int, walls: list[float] | None = None) -> dict[str, Any]:
    """:func:`e2e` of the median request: the medians of the runs' ``setup_s``, ``ttft_s`` and ``decode_s``, and of
    their measured ``walls`` (None: the sum of those parts)."""
    m = median_of(runs, "setup_s", "ttft_s", "decode_s")
    return e2e(m["setup_s"], m["ttft_s"], m["decode_s"], n_generated, statistics.median(walls) if walls else None)


# --------------------------------------------------------------------------------------------------------- memory
def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_bytes(device: torch.device) -> int | None:
    """Max GPU bytes allocated since the last :func:`reset_peak` (None on the CPU)."""
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def device_name(device: torch.device | str, cpu: str = "cpu") -> str:
    return torch.cuda.get_device_name(device) if torch.device(device).type == "cuda" else cpu


def mem_available() -> int | None:
    """Memory the kernel can give without swapping, in bytes: ``MemAvailable`` in /proc/meminfo, else free physical
    pages; None when neither can be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def free_memory() -> None:
    """Drop what the last cell left: Python garbage, the CUDA caching allocator, and (where this torch has it) the
    cache of pinned host blocks, which otherwise keeps every freed pinned store."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        host_empty = getattr(torch._C, "_host_emptyCache", None)
        if host_empty is not None:
            host_empty()


def host_refusal(need: int, what: str, reserve: int, avail: int | None = None) -> str | None:
    """None if ``need`` bytes of host memory fit in ``avail`` (default: MemAvailable) minus ``reserve``, else the
    refusal recorded as the cell's error (the run goes on with the next cell)."""
    size = lambda n: f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"  # noqa: E731
    src = "MemAvailable" if avail is None else "the given host memory"
    avail = mem_available() if avail is None else avail
    if avail is None or need + reserve <= avail:
        return None
    return (f"refused: {what} needs {size(need)} of host memory; {size(avail)} available ({src}) minus a "
            f"{size(reserve)} reserve")


def pinned_store_bytes(model_cfg, placement, capacity: int, dtype_bytes: int = 2) -> int:
    """Host bytes of a PlacedKV's store: every offloaded layer's K and V at ``capacity`` tokens (quantized stores:
    codes + scales + zeros, keys rounded up to whole groups)."""
    c = model_cfg
    n_off = c.n_layers - placement.n_on_chip(c.n_layers)
    spec = placement.quant
    if spec is None:
        per_layer = 2 * c.n_kv_heads * capacity * c.head_dim * dtype_bytes
    else:
        cap = -(-capacity // spec.group_size) * spec.group_size
        per_layer = math.ceil(2 * c.n_kv_heads * cap * c.head_dim * spec.bytes_per_element())
    return n_off * per_layer


# ------------------------------------------------------------------------------------------------------ bandwidth
def _copy_seconds(src: torch.Tensor, dst: torch.Tensor, iters: int, skip: int = 0) -> float:
    """Median seconds of one ``dst.copy_(src)`` on the GPU (CUDA events around each), the first ``skip`` left out."""
    copy = lambda: dst.copy_(src, non_blocking=True)  # noqa: E731
    return statistics.median([time_ms(copy, 0, 1, cuda=True) / 1e3 for _ in range(iters + skip)][skip:])


def h2d_bandwidth(nbytes: int = 1 << 30, iters: int = 8) -> float:
    """Pinned host-to-device copy bandwidth in bytes/s (median)."""
    if not torch.cuda.is_available():  # smoke runs on the CPU: a host memcpy stands in (never a published number)
        src, dst = torch.empty(nbytes, dtype=torch.uint8), torch.empty(nbytes, dtype=torch.uint8)
        return nbytes / wall(torch.device("cpu"), lambda: dst.copy_(src))[1]
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    return nbytes / _copy_seconds(src, torch.empty(nbytes, dtype=torch.uint8, device="cuda"), iters, skip=1)


def d2d_bandwidth(nbytes: int = 1 << 31, iters: int = 8) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read + written (median). CPU: a host copy."""
    if not torch.cuda.is_available():
        src, dst = torch.empty(nbytes // 8, dtype=torch.uint8), torch.empty(nbytes // 8, dtype=torch.uint8)
        return 2 * src.numel() / wall(torch.device("cpu"), lambda: dst.copy_(src))[1]
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    dst.copy_(src)
    return 2 * nbytes / _copy_seconds(src, dst, iters)


# ---------------------------------------------------------------------------------------------------------- cells
def check_contexts(contexts, gen_len: int, limit: int, model: str, flag: str = "--contexts") -> None:
    """Refuse contexts that leave no room for ``gen_len`` generated tokens in ``model``'s ``limit`` positions."""
    if too_long := [c for c in contexts if c + gen_len > limit]:
        raise ValueError(f"{flag} {','.join(map(str, too_long))} plus --gen-len {gen_len} exceed {model}'s maximum "
                         f"context of {limit}; use contexts up to {limit - gen_len}")


def pick(rows: list[dict], keys: tuple[str, ...]) -> list[dict]:
    """The ``keys`` of every row (a bench's JSON line); None where a row lacks one."""
    return [{k: r.get(k) for k in keys} for r in rows]


def failure(e: BaseException) -> str:
    """A failed cell's reason, as every bench records it."""
    return f"failed: {type(e).__name__}: {e}"[:300]
