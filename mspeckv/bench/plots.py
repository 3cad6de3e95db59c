"""PNG plots of a rendered sweep (optional extra ``plot``: matplotlib, imported lazily; pyplot is never used)."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..runs.plots import INSTALL_HINT, PlotDependencyError, figure_cls, label, save  # noqa: F401 (INSTALL_HINT: for callers)


def _finite(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def plot_metric(rows: Sequence[dict[str, Any]], metric: str, path: str | os.PathLike, *, x_name: str = "x",
                ylabel: str | None = None, title: str | None = None, methods: Sequence[str] | None = None) -> Path:
    """One line per method of ``row[f'{metric}_mean']`` vs ``row['x']``, error bars = ``row[f'{metric}_std']``.

    ``rows`` are summary rows (``x``, ``method``, ``<metric>_mean``, ``<metric>_std``); rows with no mean (all runs
    failed) are left out. Numeric x spanning >= 4x is drawn on a log2 axis; non-numeric x is categorical.
    """
    Figure = figure_cls()
    methods = list(methods) if methods is not None else list(dict.fromkeys(r["method"] for r in rows))
    xs_all = list(dict.fromkeys(r["x"] for r in rows))
    numeric = all(_finite(x) for x in xs_all)
    pos = {x: (x if numeric else i) for i, x in enumerate(xs_all)}

    fig = Figure(figsize=(7.0, 4.5), dpi=120)
    ax = fig.add_subplot(1, 1, 1)
    for method in methods:
        pts = [r for r in rows if r["method"] == method and _finite(r.get(f"{metric}_mean"))]
        if not pts:
            continue
        pts.sort(key=lambda r: pos[r["x"]])
        ys = [r[f"{metric}_mean"] for r in pts]
        es = [r.get(f"{metric}_std") if _finite(r.get(f"{metric}_std")) else 0.0 for r in pts]
        ax.errorbar([pos[r["x"]] for r in pts], ys, yerr=es, marker="o", capsize=3, label=method)
    if numeric and xs_all and min(xs_all) > 0 and max(xs_all) / min(xs_all) >= 4:
        ax.set_xscale("log", base=2)
    ticks = sorted(xs_all) if numeric else xs_all
    ax.set_xticks([pos[x] for x in ticks], [f"{x:g}" if numeric else str(x) for x in ticks])
    ax.minorticks_off()
    ax.grid(True, alpha=0.3)
    label(ax, x_name, ylabel or metric, title)
    return save(fig, path)


SEGMENTS = (("draft_s", "draft"), ("verify_l1_s", "L1: target, retrieval KV"), ("verify_l2_s", "L2: target, full KV"),
            ("other_s", "other (host)"))


def plot_breakdown(rows: Sequence[dict[str, Any]], path: str | os.PathLike, *, x_name: str = "x",
                   title: str | None = None) -> Path:
    """Stacked bars of decode seconds per level, one group per x and one bar per method (``breakdown.rows`` rows;
    a baseline bar is its whole decode time)."""
    Figure = figure_cls()
    xs = list(dict.fromkeys(r[x_name] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    width = 0.8 / max(len(methods), 1)
    fig = Figure(figsize=(max(7.0, 1.6 * len(xs) * max(len(methods), 1) / 2), 4.5), dpi=120)
    ax = fig.add_subplot(1, 1, 1)
    colors = {key: f"C{i}" for i, (key, _) in enumerate(SEGMENTS)}
    labelled: set[str] = set()
    for j, m in enumerate(methods):
        for i, x in enumerate(xs):
            r = next((r for r in rows if r[x_name] == x and r["method"] == m), None)
            if r is None or not _finite(r.get("latency_s")):
                continue
            pos, bottom = i + (j - (len(methods) - 1) / 2) * width, 0.0
            parts = [(k, r.get(k)) for k, _ in SEGMENTS] if _finite(r.get("draft_s")) else [("ar", r["latency_s"])]
            for key, v in parts:
                if not _finite(v) or v <= 0:
                    continue
                name = dict(SEGMENTS).get(key, "AR decode")
                ax.bar(pos, v, width * 0.9, bottom=bottom, color=colors.get(key, "0.6"),
                       label=None if name in labelled else name)
                labelled.add(name)
                bottom += v
            ax.text(pos, bottom, m.replace("mspeckv_", "").replace("_specdec", ""), rotation=90, ha="center",
                    va="bottom", fontsize=7)
    ax.set_xticks(range(len(xs)), [f"{x:g}" if _finite(x) else str(x) for x in xs])
    ax.set_ylim(top=ax.get_ylim()[1] * 1.25)  # room for the bar labels
    ax.grid(True, axis="y", alpha=0.3)
    label(ax, x_name, "decode seconds (mean over seeds)", title)
    if labelled:  # the legend in the segments' order
        order = ["AR decode"] + [name for _, name in SEGMENTS]
        handles, labels = ax.get_legend_handles_labels()
        pairs = sorted(zip(handles, labels, strict=True), key=lambda hl: order.index(hl[1]))
        ax.legend([h for h, _ in pairs], [lab for _, lab in pairs], fontsize=8)
    return save(fig, path)


def plot_summary(rows: Sequence[dict[str, Any]], out_dir: str | os.PathLike, *, x_name: str = "x",
                 methods: Sequence[str] | None = None, title: str = "") -> list[Path]:
    """``throughput.png`` (tok/s) and ``latency.png`` (s) in ``out_dir``. Raises PlotDependencyError."""
    sfx = f" ({title})" if title else ""
    return [plot_metric(rows, metric, Path(out_dir) / f"{name}.png", x_name=x_name, ylabel=ylabel, methods=methods,
                        title=f"{name.capitalize()} vs {x_name}{sfx}")
            for metric, name, ylabel in (("tok_per_s", "throughput", "decode throughput (tok/s)"),
                                         ("latency_s", "latency", "decode latency after the first token (s)"))]
