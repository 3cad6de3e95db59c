"""PNG plots of an evaluation (matplotlib, the optional ``plot`` extra; pyplot is never used).

- ``ppl_vs_compression.png``: PPL change (%) against compression, one panel per context; one series per family
  (a press's name, ``offload`` for the placements' quantized KV, ``preset``), joined by a line where the family has
  several settings (KIVI's bit widths, low-rank's ranks, the placements' formats) as in Palu's Figure 2; the y axis
  is linear within ±2% and logarithmic beyond, so small and large changes both stay readable;
- ``accuracy_vs_compression.png``: needle, RULER and GSM8K accuracy against compression, one panel each, points
  coloured by context;
- ``kv_memory_vs_context.png``: held KV MB against context, one line per config;
- ``throughput_vs_compression.png``: decode tok/s against compression, one line per context;
- ``needle_<config>.png``: one heatmap (depth x context) per config.
"""

from __future__ import annotations

import re
from pathlib import Path

from ..runs.plots import figure_cls, label, save
from .variants import BASELINE


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=+-]+", "-", s).strip("-") or "_"


def family(cell_info: dict, variant: str) -> str:
    """The series a variant belongs to: its press's name, ``preset`` for a preset, ``offload`` for a quantized
    placement without a press."""
    press = cell_info.get("press")
    if press:
        from ..presses import presets

        name = str(press).split(":")[0]
        return "preset" if name in presets() else name
    return "offload" if cell_info.get("kv_quant") not in (None, "none") else "full"


def short(variant: str) -> str:
    """A short point label: the spec without a calibration path or default-looking noise."""
    v = re.sub(r"calib=[^,]*,?", "", variant)
    v = v.replace("kv=", "").replace("/g64/res64/onchip0", "").replace("budget=", "")
    v = v.replace("k_bits=", "k").replace("v_bits=", "v").replace("group_size=", "g").replace("residual=", "r")
    return v.replace("retain=", "").replace(",guard=0", "").replace("window=", "w")


def _points(ax, pts: list[tuple], label: str, style: str = "o") -> None:
    """(x, y, variant) points in ``style``, each labelled with its variant's short name."""
    ax.plot([p[0] for p in pts], [p[1] for p in pts], style, ms=4, label=label)
    for x, y, v in pts:
        ax.annotate(short(v), (x, y), fontsize=5, alpha=0.8, xytext=(2, 2), textcoords="offset points")


def _panels(n: int, width: float, height: float):
    """A figure of ``n`` panels side by side, each ``width`` wide: (figure, its axes)."""
    fig = figure_cls()(figsize=(width * n, height), dpi=110)
    return fig, [fig.add_subplot(1, n, i + 1) for i in range(n)]


def plot_all(cells: list[dict], summary: dict, out: Path) -> list[Path]:
    by = {(c["metric"], c["variant"], c["context"]): c for c in cells}
    paths = []

    # PPL and throughput points come from the overview rows: compression and Δ there are against each variant's own
    # folder's baseline (``render(include=...)`` may mix folders)
    ov = {int(ctx): rows for ctx, rows in summary["overview"].items()}
    info = {c["variant"]: c.get("variant_info", {}) for c in cells}
    ppl_ctx = [ctx for ctx, rows in ov.items() if any(r["ppl_delta_pct"] is not None for r in rows)]
    if ppl_ctx:
        fig, axes = _panels(len(ppl_ctx), 6.0, 5.0)
        for ax, ctx in zip(axes, ppl_ctx, strict=True):
            pts = [(r["compression"], r["ppl_delta_pct"], r["config"]) for r in ov[ctx]
                   if r["compression"] and r["ppl_delta_pct"] is not None and r["config"] != BASELINE]
            for fam in sorted({family(info.get(v, {}), v) for _, _, v in pts}):
                fp = sorted(p for p in pts if family(info.get(p[2], {}), p[2]) == fam)
                _points(ax, fp, fam, "-o" if fam != "preset" and len(fp) > 1 else "o")  # presets: distinct recipes
            ax.axhline(0, color="gray", lw=0.8)
            ax.set_yscale("symlog", linthresh=2.0)
            label(ax, "KV compression (×, held bytes)", "PPL change vs full cache (%)", f"context {ctx}", 6)
        paths.append(save(fig, out / "ppl_vs_compression.png"))

    # accuracy: one panel per metric, one colour per context, points only (distinct configs, not a curve); GSM8K's
    # prompts (~850 tokens) have no compression cell of their own: its x is the compression at the shortest context
    mets = [m for m in ("needle", "ruler", "gsm8k") if any(k[0] == m for k in by)]
    if mets:
        fig, axes = _panels(len(mets), 5.5, 4.5)
        short_ctx = min((k[2] for k in by if k[0] in ("speed", "ppl")), default=0)
        comp = {(ctx, r["config"]): r["compression"] for ctx, rows in ov.items() for r in rows}
        for ax, m in zip(axes, mets, strict=True):
            for ctx in sorted({k[2] for k in by if k[0] == m}):
                ref = ctx or short_ctx
                pts = [(comp.get((ref, v)), cell["results"]["accuracy"] * 100, v)
                       for (mm, v, c), cell in by.items() if mm == m and c == ctx]
                pts = sorted(p for p in pts if p[0] is not None)
                if pts:
                    _points(ax, pts, f"{ctx}" if ctx else f"prompts (x at {short_ctx})")
            label(ax, "KV compression (×)", f"{m} accuracy (%)", m, 7)
        paths.append(save(fig, out / "accuracy_vs_compression.png"))

    mem_ctx = sorted({k[2] for k in by if k[0] in ("speed", "ppl")})
    if mem_ctx:
        fig, (ax,) = _panels(1, 7.0, 4.5)
        for v in dict.fromkeys(c["variant"] for c in cells):
            mb = {ctx: r["kv_mb"] for ctx in mem_ctx for r in ov.get(ctx, ()) if r["config"] == v}
            pts = [(ctx, mb[ctx]) for ctx in mem_ctx if mb.get(ctx)]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=v)
        label(ax, "context (tokens)", "held KV (MB)", legend=6)
        paths.append(save(fig, out / "kv_memory_vs_context.png"))

    sp_ctx = sorted({k[2] for k in by if k[0] == "speed"})
    if sp_ctx:
        fig, (ax,) = _panels(1, 7.0, 4.5)
        for ctx in sp_ctx:
            pts = sorted((r["compression"], r["tok_per_s"], r["config"]) for r in ov.get(ctx, [])
                         if r["tok_per_s"] and r["compression"] and not r["bytes_from_ppl_prefix"])
            if pts:  # one point per variant (distinct configs, not a curve), each labelled with its name
                _points(ax, pts, f"context {ctx}")
        graphed = {c["results"].get("graphed") for c in cells if c["metric"] == "speed"}
        how = ("graphed" if graphed == {True} else "eager" if graphed <= {False, None}
               else "graphed where the cache allows")
        ax.set_yscale("log")
        label(ax, "KV compression (×)", f"decode tok/s ({how})", legend=7)
        paths.append(save(fig, out / "throughput_vs_compression.png"))

    needle = [c for c in cells if c["metric"] == "needle"]
    for v in dict.fromkeys(c["variant"] for c in needle):
        cs = sorted((c for c in needle if c["variant"] == v), key=lambda c: c["context"])
        depths = sorted({float(d) for c in cs for d in c["results"]["accuracy_by_depth"]})
        grid = [[next((a for d, a in c["results"]["accuracy_by_depth"].items() if float(d) == dep), float("nan"))
                 for c in cs] for dep in depths]
        fig, (ax,) = _panels(1, 1.2 * len(cs) + 2.5, 0.5 * len(depths) + 2.0)
        im = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        ax.set_xticks(range(len(cs)), [str(c["context"]) for c in cs])
        ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths])
        for i, row in enumerate(grid):
            for j, a in enumerate(row):
                ax.text(j, i, "–" if a != a else f"{100 * a:.0f}", ha="center", va="center", fontsize=8)
        label(ax, "context (tokens)", "needle depth")  # a heatmap: nothing labelled
        ax.set_title(f"needle retrieval: {v}", fontsize=9)
        fig.colorbar(im, ax=ax)
        paths.append(save(fig, out / f"needle_{_slug(v)}.png"))
    return paths
