"""Render an evaluation directory from its cells: ``summary.json``, ``summary.csv``, ``summary.md`` and PNG plots.

Rows: one per (metric, variant, context) with the metric's headline value, the full-cache baseline's value at the same
context and the delta (``delta_pct`` for ppl and speed). The compression overview has one table per context:
config | compression | KV MB @ctx | bytes/token | decode tok/s | TTFT | TPOT | PPL (Δ%) | KL | needle % | RULER % |
GSM8K %, plus accept L1 % (the middle level's acceptance rate) when the folder has ``accept`` cells. Compression is
the baseline's held KV bytes over the variant's at that context, from the ``speed`` cell (bytes held after the whole
prompt); without one, from the ``ppl`` cell (bytes held after the ppl prefix, marked †). Cells with per-window NLL
add two columns after PPL: the Δ's 95% interval and the share of the full-vs-floor gap kept; each table is followed by
its context-sensitivity line. The goal lines (``evals.goals``) are checked only at contexts with measured PPL rows,
and only where that line says the corpus can judge a press.

``render(dir, include=[...])`` (``eval report --include DIR``) also reads the cells of other evaluation folders, to
put a model's results into one overview: a (metric, variant, context) already shown by the folder itself, or by an
earlier ``--include``, hides later copies. Every delta is taken against the baseline of the variant's own folder
(the full cache that ran in the same invocations), never against another folder's, and each overview row names its
folder.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from ..runs.store import atomic_write_json, atomic_write_text
from ..runs.tables import csv_text, md_table, number
from ..runs.template import CellStore
from .goals import baseline_cell, floor_names, goals, index_cells, needle_hits, paired_interval, sensitivity
from .intervals import gap_kept, wilson
from .variants import BASELINE

# metric -> (headline field, delta kind: pct | abs, extra fields shown in the per-metric table)
HEADLINE = {
    "ppl": ("ppl", "pct", ("nll_mean",)),
    "kl": ("kl_mean", "abs", ("top1_agreement",)),
    "ece": ("ece", "abs", ()),
    "attention": ("attn_cosine_mean", "abs", ("attn_cosine_min",)),
    "recon": ("k_rel_mse_mean", "abs", ("v_rel_mse_mean", "kept_fraction")),
    "speed": ("tok_per_s", "pct", ("kv_bytes", "ttft_s", "tpot_s")),
    "needle": ("accuracy", "abs", ()),
    "ruler": ("accuracy", "abs", ("multikey_accuracy", "vartrack_score")),
    "gsm8k": ("accuracy", "abs", ("accuracy_flexible",)),
    "accept": ("l1_acceptance_rate", "abs", ("l2_accepted_per_round",)),
}
ORDER = tuple(HEADLINE)
OVERVIEW_COLS = ("config", "compression", "KV MB @ctx", "bytes/token", "decode tok/s", "TTFT s", "TPOT ms",
                 "PPL (Δ%)", "KL", "needle %", "RULER %", "GSM8K %")
CI_COL = "PPL Δ 95% CI"  # paired bootstrap over windows (evals.intervals)
GAP_COL = "gap kept %"  # of the full-vs-floor gap (evals.goals)
ACCEPT_COL = "accept L1 %"  # shown only when some row has an accept cell
E2E_COL = "e2e tok/s"  # shown only when some speed cell has end-to-end time (cells written since it is recorded)


def load_cells(dir: str | Path, include: list[str | Path] = ()) -> list[dict]:
    """The folder's cells, then each included folder's, every cell tagged with its ``_source`` folder; a key
    (metric, variant, context) seen before is ``_shadowed`` (kept: a baseline still serves its own folder)."""
    out, seen = [], set()
    for src in (dir, *include):
        for c in CellStore(Path(src)).all():
            key = (c["metric"], c["variant"], c["context"])
            out.append({**c, "_source": str(src), "_shadowed": key in seen})
            seen.add(key)
    return out


def damage(dirs: list[str | Path]) -> dict[str, Any]:
    """What a set of evaluation folders lacks: ``missing`` (cells an invocation asked for, ``expected/``, that no
    readable file holds), ``skipped`` (every file in ``cells/`` that holds no cell, named with why: damaged ones make
    the summary PARTIAL, foreign ones are only named and counted) and ``partial``."""
    missing, skipped, damaged = [], [], 0
    for src in dirs:
        store = CellStore(Path(src))
        cells, bad = store.scan()
        have = {(c["metric"], c["variant"], c["context"]) for c in cells}
        missing += [f"{m} {v} ctx={c}" + (f" ({src})" if src != dirs[0] else "")
                    for m, v, c in sorted(store.expected() - have)]
        skipped += [f"{store.cells_dir / b.name} ({b.why})" for b in bad]
        damaged += sum(b.damaged for b in bad)
    return {"partial": bool(missing or damaged), "missing": missing, "skipped": skipped, "n_damaged": damaged}


def rows_from_cells(cells: list[dict]) -> list[dict]:
    by, bases = index_cells(cells)
    rows = []
    for (metric, variant, ctx), c in sorted(by.items(), key=lambda kv: (ORDER.index(kv[0][0]) if kv[0][0] in ORDER
                                                                         else 99, kv[0][2], kv[0][1] != BASELINE,
                                                                         kv[0][1])):
        field, kind, extra = HEADLINE.get(metric, (None, "abs", ()))
        res = c.get("results", {})
        value = res.get(field) if field else None
        base = baseline_cell(by, bases, metric, ctx, c).get("results", {}).get(field) if field else None
        row = {"metric": metric, "variant": variant, "context": ctx, "field": field, "value": value,
               "baseline": base, "delta": None, "delta_pct": None,
               **{k: res.get(k) for k in extra}, "git_commit": c.get("meta", {}).get("git_commit"),
               "source": c.get("_source")}
        if number(value) and number(base):
            row["delta"] = value - base
            if kind == "pct" and base:
                row["delta_pct"] = 100.0 * (value / base - 1.0)
        rows.append(row)
    return rows


def _bytes_cell(by: dict, variant: str, ctx: int) -> tuple[float | None, bool, dict | None]:
    """(held KV bytes at ctx, from the ppl prefix?, the cell they come from)."""
    s = by.get(("speed", variant, ctx))
    if s is not None:
        return s["results"].get("kv_bytes"), False, s
    p = by.get(("ppl", variant, ctx))
    if p is not None:
        return p["results"].get("kv_bytes_prefix"), True, p
    return None, False, None


def overview(cells: list[dict]) -> dict[str, list[dict]]:
    by, bases = index_cells(cells)
    sens = sensitivity(cells)
    floors = floor_names(sens)
    variants = list(dict.fromkeys([BASELINE] + [c["variant"] for c in cells]))
    contexts = (sorted({c["context"] for c in cells if c["metric"] in ("ppl", "speed", "kl", "accept")})
                or sorted({c["context"] for c in cells if c["metric"] in ("needle", "ruler")})
                or sorted({c["context"] for c in cells if c["metric"] == "gsm8k"}))
    g = lambda m, v, ctx, f: by.get((m, v, ctx), {}).get("results", {}).get(f)
    out = {}
    for ctx in contexts:
        rows = []
        for v in variants:
            if not any((m, v, ctx) in by for m in ("ppl", "speed", "kl", "needle", "ruler", "accept")) and \
                    (("gsm8k", v, 0) not in by):
                continue
            nb, from_prefix, bcell = _bytes_cell(by, v, ctx)
            bres = baseline_cell(by, bases, bcell["metric"] if bcell else "ppl", ctx, bcell).get("results", {})
            base_bytes = bres.get("kv_bytes_prefix" if from_prefix else "kv_bytes")
            prefix_tokens = g("ppl", v, ctx, "prefix_tokens")
            ppl = g("ppl", v, ctx, "ppl")
            pcell = by.get(("ppl", v, ctx))
            pbase = baseline_cell(by, bases, "ppl", ctx, pcell)
            ppl_base = pbase.get("results", {}).get("ppl")
            s = sens.get((pcell.get("_source") if pcell else None, ctx))
            sources = sorted({by[k].get("_source") for k in by if k[1] == v and k[2] in (ctx, 0)} - {None})
            rows.append({
                "config": v, "context": ctx, "sources": sources,
                "compression": base_bytes / nb if number(base_bytes) and number(nb) and nb else None,
                "kv_mb": nb / 2**20 if number(nb) else None,
                "bytes_per_token": (nb / (prefix_tokens if from_prefix else ctx)) if number(nb) and
                (not from_prefix or prefix_tokens) else None,
                "bytes_from_ppl_prefix": from_prefix,
                "tok_per_s": g("speed", v, ctx, "tok_per_s"), "ttft_s": g("speed", v, ctx, "ttft_s"),
                "tpot_s": g("speed", v, ctx, "tpot_s"), "e2e_tok_per_s": g("speed", v, ctx, "e2e_tok_per_s"),
                "ppl": ppl,
                "ppl_delta_pct": 100 * (ppl / ppl_base - 1) if number(ppl) and number(ppl_base) else None,
                "ppl_delta_ci": paired_interval(pcell, pbase) if v != BASELINE else None,
                "gap_kept": gap_kept(ppl, s.ppl_full, s.ppl_floor) if s and number(ppl) and number(s.ppl_floor)
                else None,
                "floor": v in floors,
                "kl": g("kl", v, ctx, "kl_mean"), "top1_agreement": g("kl", v, ctx, "top1_agreement"),
                "needle_acc": g("needle", v, ctx, "accuracy"), "ruler_acc": g("ruler", v, ctx, "accuracy"),
                "gsm8k_acc": g("gsm8k", v, 0, "accuracy"),
                "accept_l1": g("accept", v, ctx, "l1_acceptance_rate"),
            })
        out[str(ctx)] = rows
    return out


def _f(x: Any, fmt: str, scale: float = 1.0) -> str:
    return "–" if not number(x) else format(x * scale, fmt)


def _md(header: list[str], rows: list[list[str]]) -> str:
    return md_table(header, rows, "l" + "r" * (len(header) - 1))


def overview_markdown(summary: dict) -> str:
    parts = []
    with_accept = any(number(r.get("accept_l1")) for rows in summary["overview"].values() for r in rows)
    with_src = bool(summary.get("include"))
    with_e2e = any(number(r.get("e2e_tok_per_s")) for rows in summary["overview"].values() for r in rows)
    # shown when some row has them (cells since intervals and the floor are recorded)
    with_ci = any(r.get("ppl_delta_ci") for rows in summary["overview"].values() for r in rows)
    with_gap = any(number(r.get("gap_kept")) for rows in summary["overview"].values() for r in rows)
    cols = list(OVERVIEW_COLS)
    at = cols.index("PPL (Δ%)") + 1
    cols[at:at] = ([CI_COL] if with_ci else []) + ([GAP_COL] if with_gap else [])
    cols += (([ACCEPT_COL] if with_accept else []) + ([E2E_COL] if with_e2e else [])
             + (["folder"] if with_src else []))
    sens = {(s["source"], s["context"]): s for s in summary.get("sensitivity", [])}
    for ctx, rows in summary["overview"].items():
        body = []
        for r in rows:
            comp = _f(r["compression"], ".2f") + ("×" if number(r["compression"]) else "")
            ppl = "–" if not number(r["ppl"]) else f"{r['ppl']:.3f} ({_f(r['ppl_delta_pct'], '+.2f')}%)"
            dag = " †" if r["bytes_from_ppl_prefix"] else ""
            ci = r.get("ppl_delta_ci")
            body.append([r["config"] + (" (context floor)" if r.get("floor") else ""), comp + dag,
                         _f(r["kv_mb"], ".1f"), _f(r["bytes_per_token"], ".0f"),
                         _f(r["tok_per_s"], ".1f"), _f(r["ttft_s"], ".3f"), _f(r["tpot_s"], ".1f", 1e3), ppl]
                        + ([f"[{ci[0]:+.2f}, {ci[1]:+.2f}]" if ci else "–"] if with_ci else [])
                        + ([_f(r.get("gap_kept"), ".1f", 100)] if with_gap else [])
                        + [_f(r["kl"], ".4f"), _f(r["needle_acc"], ".1f", 100), _f(r["ruler_acc"], ".1f", 100),
                           _f(r["gsm8k_acc"], ".1f", 100)]
                        + ([_f(r.get("accept_l1"), ".1f", 100)] if with_accept else [])
                        + ([_f(r.get("e2e_tok_per_s"), ".1f")] if with_e2e else [])
                        + ([", ".join(Path(x).name for x in r.get("sources", []))] if with_src else []))
        where = "the GSM8K prompts" if ctx == "0" else f"{ctx} tokens"
        parts.append(f"### Compression overview at {where}\n\n" + _md(cols, body))
        lines: dict[str, list[str]] = {}  # folders whose line reads the same share it
        for (src, c), x in sens.items():
            if str(c) == ctx:
                lines.setdefault(_sensitivity_line(x), []).append(Path(src).name if src else "")
        for line, folders in lines.items():
            where = f" ({', '.join(folders)})" if with_src else ""
            parts.append(f"**Context sensitivity{where}:** {line}")
    if any(r["bytes_from_ppl_prefix"] for rows in summary["overview"].values() for r in rows):
        parts.append("† no speed cell at this context: bytes held after the ppl prefix (context − scored span).")
    return "\n\n".join(parts) if parts else "(no cells)"


def _sensitivity_line(s: dict) -> str:
    """The context-sensitivity row of one folder at one context, in words."""
    half = "" if s["split"] == "all" else f", {s['split']} documents"
    head = f"corpus `{s['dataset'] or 'bbc'}` ({s['corpus']}{half}), {s['windows']} windows"
    if s["floor"]:
        ci = f" [{s['ci'][0]:+.2f}, {s['ci'][1]:+.2f}], noise (standard error) {s['noise']:.2f}" if s["ci"] else ""
        head += (f"; full cache PPL {s['ppl_full']:.3f}, floor (last {s['floor']} prefix tokens) "
                 f"{s['ppl_floor']:.3f}: gap {s['gap_pct']:+.2f}%{ci}")
    return head + (". This context can judge a press." if s["judge"] else f". **No goal judged:** {s['why']}.")


def _needle_intervals(cells: list[dict]) -> str:
    """Needle accuracy per (variant, context) with its 95% Wilson interval."""
    body = []
    for c in sorted((c for c in cells if c["metric"] == "needle"), key=lambda c: (c["context"], c["variant"])):
        r = c["results"]
        k = needle_hits(r)
        lo, hi = wilson(k, r["n"])
        body.append([c["variant"], str(c["context"]), f"{k}/{r['n']}", f"{100 * k / r['n']:.1f}",
                     f"[{100 * lo:.1f}, {100 * hi:.1f}]"])
    return _md(["variant", "context", "hits", "needle %", "95% Wilson"], body) if body else ""


def _metric_tables(rows: list[dict]) -> str:
    parts = []
    for metric in dict.fromkeys(r["metric"] for r in rows):
        mr = [r for r in rows if r["metric"] == metric]
        field, kind, extra = HEADLINE.get(metric, ("value", "abs", ()))
        body = []
        for r in mr:
            d = (_f(r["delta_pct"], "+.3f") + "%") if kind == "pct" else _f(r["delta"], "+.4g")
            body.append([r["variant"], str(r["context"] or "prompt"), _f(r["value"], ".6g"), _f(r["baseline"], ".6g"),
                         d, *[_f(r.get(k), ".6g") for k in extra]])
        parts.append(f"### {metric} ({field})\n\n" + _md(["variant", "context", field, "full cache", "Δ", *extra],
                                                         body))
    return "\n\n".join(parts)


def _needle_tables(cells: list[dict]) -> str:
    parts = []
    needle = [c for c in cells if c["metric"] == "needle"]
    for v in dict.fromkeys(c["variant"] for c in needle):
        cs = sorted((c for c in needle if c["variant"] == v), key=lambda c: c["context"])
        depths = list(dict.fromkeys(d for c in cs for d in c["results"]["accuracy_by_depth"]))
        body = [[d, *[_f(c["results"]["accuracy_by_depth"].get(d), ".0f", 100) for c in cs]] for d in depths]
        parts.append(f"#### needle accuracy %, {v} (depth x context)\n\n" +
                     _md(["depth", *[str(c["context"]) for c in cs]], body))
    return "\n\n".join(parts)


def _csv(rows: list[dict]) -> str:
    return csv_text(rows, list(dict.fromkeys(k for r in rows for k in r)))


def render(dir: str | Path, plots: bool = True, include: list[str | Path] = ()) -> dict[str, Any]:
    d = Path(dir)
    cells = load_cells(d, include)
    rows = rows_from_cells(cells)
    shown = [c for c in cells if not c["_shadowed"]]
    commits = sorted({str(c.get("meta", {}).get("git_commit")) for c in shown})
    commands = (d / "command.txt").read_text(encoding="utf-8").splitlines() if (d / "command.txt").exists() else []
    held = sorted({Path(c["_source"]).name for c in shown if c.get("settings", {}).get("split") == "confirm"})
    summary: dict[str, Any] = {"dir": str(d), "n_cells": len(shown), "git_commits": commits, "commands": commands,
                               "include": [str(x) for x in include], "rows": rows, "overview": overview(cells),
                               "plots": [], "plot_error": None, **damage([d, *include]),
                               "sensitivity": [asdict(s) for s in sensitivity(cells).values()]}
    summary["goals"] = goals(cells, summary["overview"])
    if plots and cells:
        from . import plots as P

        try:
            summary["plots"] = [str(p.relative_to(d)) for p in P.plot_all(shown, summary, d)]
        except ImportError as e:  # matplotlib is optional (the 'plot' extra)
            summary["plot_error"] = str(e)
    gaps = ([f"{len(summary['missing'])} cell(s) missing"] if summary["missing"] else []) + (
        [f"{summary['n_damaged']} unreadable"] if summary["n_damaged"] else [])
    title = "# Quality evaluation" + (f" (PARTIAL: {', '.join(gaps)})" if summary["partial"] else "")
    md = [title, "",
          "Every value is measured from the model's outputs through the placed/compressed cache; the full-cache "
          "baseline (`full`) ran in the same invocation on the same inputs. Protocols: `mspeckv/evals/*.py` "
          "docstrings.", "", f"Cells: {len(shown)}; git commits: {', '.join(commits) or '–'}", "",
          *([f"> **Missing:** {'; '.join(summary['missing'])}", ""] if summary["missing"] else []),
          *([f"> **Warning:** {len(summary['skipped'])} file(s) in cells/ hold no cell (not counted): "
             f"{'; '.join(summary['skipped'])}", ""] if summary["skipped"] else []),
          *([f"Held-out confirmation: the cells of {', '.join(f'`{x}`' for x in held)} use only the confirm half's "
             "documents and needle/RULER/accept seeds that no select run uses (`--split confirm`).", ""]
            if held else []),
          *([f"Also read (`--include`; deltas are against each folder's own baseline): "
             f"{', '.join(f'`{x}`' for x in include)}", ""] if include else []),
          overview_markdown(summary), "", "## Goals (issue 10)", "",
          "Judged only where the context floor shows the corpus depends on its prefix, never on short unrelated "
          "articles; met or MISSED only when the 95% interval lies wholly on one side (`mspeckv/evals/goals.py`).",
          "",
          *([f"- {g}" for g in summary["goals"]] or ["- (no ppl cells)"]), "",
          "## Per metric", "", _metric_tables(rows), ""]
    nt = _needle_tables(shown)
    if nt:
        md += ["## Needle grid", "", _needle_intervals(shown), "", nt, ""]
    if summary["plots"]:
        md += ["## Plots", ""] + [f"![{p}]({p})" for p in summary["plots"]] + [""]
    if commands:
        md += ["## Commands", "", "```", *commands, "```", ""]
    d.mkdir(parents=True, exist_ok=True)
    atomic_write_json(d / "summary.json", summary)
    atomic_write_text(d / "summary.csv", _csv(rows))
    atomic_write_text(d / "summary.md", "\n".join(md))
    return summary


def summary_line(summary: dict) -> dict:
    """The final JSON line: headline value and delta per (metric, variant, context)."""
    return {"eval": summary["dir"], "n_cells": summary["n_cells"], "git_commits": summary["git_commits"],
            "rows": [{k: r[k] for k in ("metric", "variant", "context", "value", "delta", "delta_pct")}
                     for r in summary["rows"]]}
