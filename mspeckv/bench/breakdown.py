"""Where a run's decode time goes: per-level seconds, shares and per-call costs, from the raw run JSONs.

Each speculative run records ``per_level_s`` (CUDA-event time of each level over the decode, prefill apart) and
``levels`` (rounds per verifying level). The naming is the engine's: ``draft`` is the drafter, ``verify_l1`` the target
over its retrieval cache (hierarchy only), ``verify_l2`` the target over its full KV (the top level, vanilla included).
``draft_ms_per_token`` = draft seconds / tokens the draft proposed (the ``proposed`` count of the level above it).
``other`` = latency − the levels' sum: host work between levels, acceptance, bookkeeping. A baseline run has a single
``decode`` level. ``h2d_MB_per_token``: bytes streamed in the decode window per token after the first
(``decode_bytes_per_token``); runs recorded before that field fall back to the whole run's bytes (prefill included)
over all tokens. Every number is a mean over the ok runs (seeds) of a group; nothing here is estimated.
"""

from __future__ import annotations

import math
from statistics import fmean
from typing import Any

from ..runs.tables import md_table
from .registry import HF_METHODS

LEVELS = ("draft", "verify_l1", "verify_l2")


def _mean(vals: list[float | None]) -> float | None:
    vals = [v for v in vals if v is not None and math.isfinite(v)]
    return fmean(vals) if vals else None


def run_breakdown(metrics: dict[str, Any]) -> dict[str, float | None]:
    """One run's metrics -> ``{latency_s, <level>_s, <level>_share, <level>_ms_per_call, other_s, ...}``."""
    lat = metrics.get("latency_s")
    per = metrics.get("per_level_s") or {}
    levels = metrics.get("levels") or {}
    out: dict[str, float | None] = {"latency_s": lat}
    spent = 0.0
    for name in LEVELS:
        s = per.get(name)
        rounds = (levels.get(name) or {}).get("rounds")
        out[f"{name}_s"] = s
        out[f"{name}_share"] = s / lat if s is not None and lat else None
        if name != "draft":  # a drafter has no rounds: its cost per proposed token is below
            out[f"{name}_ms_per_call"] = 1e3 * s / rounds if s is not None and rounds else None
        spent += s or 0.0
    speculative = any(per.get(n) is not None for n in LEVELS)
    above = levels.get("verify_l1") or levels.get("verify_l2") or {}  # the level that verifies the draft's tokens
    drafted = above.get("proposed")
    out["draft_ms_per_token"] = 1e3 * per["draft"] / drafted if per.get("draft") is not None and drafted else None
    out["other_s"] = lat - spent if speculative and lat is not None else None
    out["other_share"] = out["other_s"] / lat if out["other_s"] is not None and lat else None
    out["decode_ms_per_token"] = metrics.get("decode_ms_per_token")
    bpt = metrics.get("decode_bytes_per_token")
    bpt = metrics.get("bytes_per_token") if bpt is None else bpt
    out["h2d_MB_per_token"] = bpt / 1e6 if bpt is not None else None
    out["resident_hit_rate"] = metrics.get("resident_hit_rate")
    return out


def group_breakdown(runs: list[dict[str, Any]]) -> dict[str, float | None]:
    """Mean of :func:`run_breakdown` over a group's ok runs (a key is None where no run has it)."""
    rows = [run_breakdown(r.get("metrics") or {}) for r in runs]
    keys = rows[0].keys() if rows else ()
    return {k: _mean([row[k] for row in rows]) for k in keys}


def _s(v: float | None, share: float | None = None, digits: int = 2) -> str:
    if v is None:
        return "–"
    return f"{v:.{digits}f}" + (f" ({100 * share:.0f}%)" if share is not None else "")


def markdown(rows: list[dict[str, Any]], x_name: str, fmt_x) -> str:
    """The per-level table for the summary, from :func:`rows`."""
    header = [x_name, "method", "latency s", "draft s", "draft ms/token", "L1 s", "L1 ms/call", "L2 s", "L2 ms/call",
              "other s", "decode ms/token", "H2D MB/token", "resident hit"]  # fmt: skip
    body = [[fmt_x(b[x_name]), b["method"], _s(b["latency_s"]), _s(b["draft_s"], b["draft_share"]),
             _s(b["draft_ms_per_token"], digits=1), _s(b["verify_l1_s"], b["verify_l1_share"]),
             _s(b["verify_l1_ms_per_call"], digits=1), _s(b["verify_l2_s"], b["verify_l2_share"]),
             _s(b["verify_l2_ms_per_call"], digits=1), _s(b["other_s"], b["other_share"]),
             _s(b["decode_ms_per_token"], digits=1), _s(b["h2d_MB_per_token"], digits=1), _s(b["resident_hit_rate"])]
            for b in rows]
    return md_table(header, body)


def rows(groups, xs, methods, x_name: str) -> list[dict[str, Any]]:
    """One row per (x, method) with ok runs (``groups``: ``{(x, method): Group}`` as in :mod:`report`); transformers
    exposes no per-level times, so hf_assisted has none."""
    return [{x_name: x, "method": m, **group_breakdown(g.ok)} for x in xs for m in methods
            if (g := groups.get((x, m))) is not None and g.ok and m not in HF_METHODS]
