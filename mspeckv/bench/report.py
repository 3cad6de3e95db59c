"""Render a sweep directory (``<dir>/runs/*.json``) into summary.{csv,json,md} and PNG plots.

Used both at the end of a sweep and by ``mspeckv report DIR``. All statistics are over seeds; comparisons between
methods are paired by seed (see :mod:`mspeckv.bench.stats`). Failed runs never enter a mean; they are counted and
shown (``FAILED (3/3: OutOfMemoryError)`` or a footnote on a partially failed cell).
"""

from __future__ import annotations

import io
import json
import math
import os
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mspeckv.bench import breakdown, registry
from mspeckv.bench.registry import METHODS
from mspeckv.bench.stats import NA, delta, fmt_pm, mean_std, order_key, speedup
from mspeckv.runs.store import STATUS_OK, RunStore, atomic_write_json, atomic_write_text, json_safe, read_json_object
from mspeckv.runs.tables import csv_text, md_table

HIGHER_IS_BETTER = {"tok_per_s": True, "latency_s": False, "accepted": True, "ttft_s": False, "e2e_tok_per_s": True}
METRICS = tuple(HIGHER_IS_BETTER)
REFERENCES = ("baseline", "mspeckv")
MD_TABLES = (
    ("Throughput (decode-only tok/s: tokens after the first / decode time, higher is better)", "tok_per_s"),
    ("Latency (s, lower is better)", "latency_s"),
    ("Accepted tokens (higher is better)", "accepted"),
    ("End-to-end throughput (tok/s: generated tokens / (setup + prefill + decode), higher is better; decode-only "
     "above)", "e2e_tok_per_s"),
)
FAILED = "FAILED"


@dataclass
class Group:
    """All runs of one (x, method)."""

    x: Any
    method: str
    ok: list[dict[str, Any]] = field(default_factory=list)
    failed: list[dict[str, Any]] = field(default_factory=list)

    @property
    def n_total(self) -> int:
        return len(self.ok) + len(self.failed)

    def values(self, metric: str) -> dict[Any, Any]:
        """``{seed: value}`` over ok runs (missing metrics are None and get ignored by the stats)."""
        return {r.get("seed"): (r.get("metrics") or {}).get(metric) for r in self.ok}

    def errors(self) -> Counter:
        return Counter(_error_name(r.get("error")) for r in self.failed)

    def errors_text(self) -> str:
        """``'OutOfMemoryError'``; with several error types ``'OutOfMemoryError×2, ValueError×1'``."""
        errs = sorted(self.errors().items())
        return errs[0][0] if len(errs) == 1 else ", ".join(f"{name}×{n}" for name, n in errs)


def _error_name(err: Any) -> str:
    if not err:
        return "unknown error"
    head = str(err).split(":", 1)[0].strip()
    return head if head and " " not in head else "error"


def _method_key(m: str) -> tuple:
    return (METHODS.index(m), "") if m in METHODS else (len(METHODS), m)


def _fmt_x(x: Any) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


def _ms_dict(prefix: str, ms: tuple[float, float]) -> dict[str, float | None]:
    m, s = ms
    return {f"{prefix}_mean": None if math.isnan(m) else m, f"{prefix}_std": None if math.isnan(s) else s}


# ----------------------------------------------------------------------------------------------------- end to end
PROCESS_GAP_S = 10.0  # more idle time than this between two runs of a folder: a new sweep process started


def end_to_end(records: list[dict[str, Any]]) -> str | None:
    """Give every ok run ``metrics['e2e_tok_per_s']`` (in memory; the run files are not touched) and return a note
    on where the numbers come from (None when every run recorded its own).

    A run written before the end-to-end fields (no ``setup_s``) recorded ``e2e_s`` = TTFT + decode only. For our
    methods its end to end is read from ``meta.wall_s``, the wall clock of the run function: building the caches,
    prefill, graph capture and decode, plus building the prompt's token ids. The first run of each (method, x) in
    a sweep process also carried that pair's warm-up run, so it gets no end-to-end number; a process start is a gap
    of more than ``PROCESS_GAP_S`` between one run's end and the next one's start. transformers' methods already
    timed their whole ``generate`` as ``e2e_s``."""
    import datetime as dt

    def start(r):
        try:
            return dt.datetime.fromisoformat(r["meta"]["timestamp"]).timestamp()
        except (KeyError, TypeError, ValueError):
            return None

    legacy = [r for r in records if r.get("status") == STATUS_OK and "setup_s" not in (r.get("metrics") or {})]
    if not legacy:
        return None
    warmed: set = set()
    prev_end = None
    used = dropped = 0
    for r in sorted(legacy, key=lambda r: (start(r) is None, start(r) or 0.0)):
        m, t, w = r["metrics"], start(r), (r.get("meta") or {}).get("wall_s")
        if t is None or prev_end is None or t - prev_end > PROCESS_GAP_S:
            warmed = set()  # a new process: every (method, x) warms up again
        prev_end = t + w if t is not None and w is not None else None
        key, n = (r.get("method"), r.get("x")), m.get("n_generated")
        secs = m.get("e2e_s") if r.get("method") in registry.HF_METHODS else (w if key in warmed else None)
        warmed.add(key)
        m = r["metrics"] = dict(m)
        m["e2e_tok_per_s"] = n / secs if n and secs else None
        used, dropped = used + (secs is not None), dropped + (secs is None)
    return (f"{len(legacy)} of the runs predate the end-to-end fields: their end to end is `meta.wall_s` (cache "
            f"construction, prefill, graph capture, decode, and building the prompt's token ids; transformers' "
            f"methods: their whole `generate`). {dropped} of them also carried a warm-up run (the first of their "
            f"method and x value in a sweep process) and have no end-to-end number; {used} do.")


# ---------------------------------------------------------------------------------------------------- aggregation
def _group(records: list[dict[str, Any]]) -> dict[tuple[Any, str], Group]:
    groups: dict[tuple[Any, str], Group] = {}
    for r in records:
        key = (r.get("x"), str(r.get("method")))
        g = groups.setdefault(key, Group(x=key[0], method=key[1]))
        (g.ok if r.get("status") == STATUS_OK else g.failed).append(r)
    return dict(sorted(groups.items(), key=lambda kv: (order_key(kv[0][0]), _method_key(kv[0][1]))))


def _rows(groups: dict[tuple[Any, str], Group], x_name: str) -> list[dict[str, Any]]:
    rows = []
    for (x, method), g in groups.items():
        row: dict[str, Any] = {"x_name": x_name, "x": x, "method": method, "n_ok": len(g.ok), "n_failed": len(g.failed),
                               "errors": dict(sorted(g.errors().items())),
                               "error_examples": sorted({str(r.get("error"))[:300] for r in g.failed}),
                               "seeds_ok": sorted(r.get("seed") for r in g.ok)}
        for metric in METRICS:
            row.update(_ms_dict(metric, mean_std(g.values(metric).values())))
        for ref in REFERENCES:
            for metric, tag in (("tok_per_s", "tps"), ("latency_s", "latency")):
                row.update(_ms_dict(f"{tag}_speedup_vs_{ref}", _vs(g, groups.get((x, ref)), metric)))
        rows.append(row)
    return rows


def _vs(a: Group | None, b: Group | None, metric: str, cmp=speedup) -> tuple[float, float]:
    """``a`` against ``b`` on ``metric``, paired by seed: ``speedup`` (better / worse by the metric's direction) or
    ``delta``; NaN when either did not run."""
    if a is None or b is None:
        return math.nan, math.nan
    extra = (HIGHER_IS_BETTER[metric],) if cmp is speedup else ()
    return cmp(a.values(metric), b.values(metric), *extra)


def _speedup_columns(methods: list[str]) -> list[tuple[str, str, str]]:
    """(column, method, reference) from the registry: the columns against REFERENCES always show (NA when not
    run), the others when their reference ran."""
    return [c for c in registry.SPEEDUP_COLUMNS if c[2] in REFERENCES or c[2] in methods]


def _speedup_rows(groups, xs, methods, x_name) -> list[dict[str, Any]]:
    out = []
    for x in xs:
        row: dict[str, Any] = {x_name: x}
        for col, method, ref in _speedup_columns(methods):
            a, b = groups.get((x, method)), groups.get((x, ref))
            ms = _vs(a, b, "latency_s")
            row.update(_ms_dict(col, ms))
            row[f"{col}_text"] = _cmp_cell(a, b, ms)
        out.append(row)
    return out


# ------------------------------------------------------------------------------------------------------ markdown
def _cmp_cell(a: Group | None, b: Group | None, ms: tuple[float, float], signed: bool = False) -> str:
    if a is None or b is None:
        return NA
    if not a.ok or not b.ok:
        return FAILED
    text = fmt_pm(*ms)
    return "+" + text if signed and text != NA and ms[0] >= 0 else text


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    esc = lambda cells: [str(c).replace("|", "\\|") for c in cells]  # noqa: E731
    return md_table(esc(header), [esc(r) for r in rows])


def _value_cell(g: Group | None, metric: str, x_name: str, notes: list[str]) -> str:
    """A group's mean ± std; a partly failed group's cell gets a footnote (appended to ``notes``, numbered on)."""
    if g is None:
        return NA
    if not g.ok:
        return f"{FAILED} ({len(g.failed)}/{g.n_total}: {g.errors_text()})"
    text = fmt_pm(*mean_std(g.values(metric).values()))
    if g.failed:
        notes.append(f"[^{len(notes) + 1}]: {x_name}={_fmt_x(g.x)}, {g.method}: {len(g.failed)}/{g.n_total} runs "
                     f"failed ({g.errors_text()}); mean ± std over the {len(g.ok)} ok run(s).")
        text += f" [^{len(notes)}]"
    return text


def _metric_table(groups, xs, methods, metric, x_name, notes: list[str]) -> str:
    comparisons = [(m, ref) for ref in REFERENCES if ref in methods for m in methods
                   if m != ref and not (ref == "mspeckv" and m == "baseline")]
    header, cmp_cols = [x_name, *methods], []
    for m, ref in comparisons:
        pairs = [(groups.get((x, m)), groups.get((x, ref))) for x in xs]
        d_col = [_cmp_cell(a, b, _vs(a, b, metric, delta), signed=True) for a, b in pairs]
        s_col = [_cmp_cell(a, b, _vs(a, b, metric)) for a, b in pairs]
        for name, col in ((f"Δ {m} vs {ref}", d_col), (f"× {m} vs {ref}", s_col)):
            if any(c != NA for c in col):  # e.g. 'accepted' does not exist for the baseline
                header.append(name)
                cmp_cols.append(col)
    body = [[_fmt_x(x), *(_value_cell(groups.get((x, m)), metric, x_name, notes) for m in methods),
             *(col[i] for col in cmp_cols)] for i, x in enumerate(xs)]
    return _md_table(header, body)


def _common_config(records: list[dict[str, Any]]) -> tuple[dict[str, Any], list[str]]:
    seen: dict[str, set[str]] = {}
    first: dict[str, Any] = {}
    for r in records:
        for k, v in (r.get("config") or {}).items():
            seen.setdefault(k, set()).add(json.dumps(json_safe(v), sort_keys=True))
            first.setdefault(k, v)
    common = {
        k: first[k] for k, vals in seen.items() if len(vals) == 1 and all(k in (r.get("config") or {}) for r in records)
    }
    return common, sorted(k for k in seen if k not in common)


def _header(summary: dict[str, Any], records: list[dict[str, Any]]) -> str:
    common, varying = _common_config(records)
    partial = f" (PARTIAL: {summary['n_runs']} of {summary['n_expected']} runs)" if summary["partial"] else ""
    lines = [f"# Sweep {', '.join(summary['sweeps']) or '?'}: {summary['x_name']}{partial}", "",
             f"- weights: {summary['weights']}", f"- GPU: {', '.join(summary['gpu']) or 'none recorded'}",
             f"- commit: {', '.join(summary['commit']) or 'unknown'}",
             f"- seeds: {', '.join(str(s) for s in summary['seeds']) or 'none'}",
             f"- methods: {', '.join(summary['methods'])}", f"- runs: {runs_text(summary)}", "- config:"]
    for w in summary["warnings"]:
        lines.insert(1, f"\n> **Warning:** {w}\n")
    if "random" in summary["weights"]:
        lines.insert(1, "\n> **Random weights.** Acceptance means nothing here, so the speculative methods' tok/s, "
                        "latency and speedups say nothing about speculation. Read the baseline's ms/token and the "
                        "per-call costs of each level (last table) instead.\n")
    lines += [f"  - {k}: `{json.dumps(json_safe(v), sort_keys=True)}`" for k, v in sorted(common.items())]
    if varying:
        lines.append(f"  - varies between runs: {', '.join(varying)}")
    return "\n".join(lines)


def runs_text(summary: dict[str, Any]) -> str:
    """'k of n runs (a ok, b failed); missing: ...' (the missing runs named, up to 10)."""
    text = f"{summary['n_runs']} of {summary['n_expected']} runs ({summary['n_ok']} ok, {summary['n_failed']} failed)"
    missing = summary["missing"]
    if missing:
        shown = ", ".join(f"{m['method']} {summary['x_name']}={_fmt_x(m['x'])} seed {m['seed']}" for m in missing[:10])
        text += f"; missing: {shown}" + (f" (+{len(missing) - 10} more)" if len(missing) > 10 else "")
    return text


def expected_runs(dir: str | os.PathLike, records: list[dict[str, Any]]) -> set[tuple]:
    """(method, x, seed) of every run the sweep's invocations planned: ``sweep.json``'s ``planned`` list, each
    record's config (its invocation's xs, seeds and methods), and the records themselves."""
    planned = read_json_object(Path(dir) / "sweep.json").get("planned") or []
    keys = {tuple(k) for k in planned if isinstance(k, list) and len(k) == 3}
    for r in records:
        c = r.get("config") or {}
        xs, seeds, methods = c.get("xs"), c.get("seeds"), c.get("methods")
        if all(isinstance(v, list) for v in (xs, seeds, methods)):
            keys |= {(m, x, s) for x in xs for s in seeds for m in methods}
        keys.add((r["method"], r["x"], r["seed"]))
    return {k for k in keys if all(_plain(p) for p in k)}


def _plain(v: Any) -> bool:
    return isinstance(v, str | int | float)


def _markdown(summary: dict[str, Any], records, groups, xs, methods) -> str:
    x_name = summary["x_name"]
    notes: list[str] = []  # every table's footnotes, numbered on; each table's shown below it
    parts = [_header(summary, records)]
    for title, metric in MD_TABLES:
        shown = len(notes)
        parts.append(f"## {title}\n\n{_metric_table(groups, xs, methods, metric, x_name, notes)}")
        if metric == "e2e_tok_per_s" and summary.get("e2e_note"):
            parts.append(summary["e2e_note"])
        if notes[shown:]:
            parts.append("\n".join(notes[shown:]))
    cols = _speedup_columns(methods)
    rows = [[_fmt_x(r[x_name])] + [r[f"{c}_text"] for c, _, _ in cols] for r in summary["speedups"]]
    parts.append("## Latency speedups (paired by seed)\n\n" + _md_table([x_name] + [c for c, _, _ in cols], rows))
    parts.append(
        "## Where the decode time goes (mean over seeds)\n\n"
        + breakdown.markdown(summary["breakdown"], x_name, _fmt_x)
        + "\n\ndraft / L1 (target over the retrieval cache) / L2 (target over its full KV; vanilla's only verifier): "
        "CUDA-event seconds over the decode, share of latency in brackets; ms/call = seconds / rounds of that level; "
        "draft ms/token = draft seconds / tokens the draft proposed. "
        "other = latency − the levels (host work, acceptance). Levels run back to back on one stream, so GPU work a "
        "level leaves queued while the host launches the next counts to the earlier level: the split between "
        "adjacent levels is approximate, their sum is not. H2D = host-to-device KV bytes of the target's cache "
        "(prefill included) / generated tokens."
        + "".join(f" {m} exposes no per-level times." for m in methods if m in registry.HF_METHODS)
    )
    parts.append(
        "Cells are mean ± sample std over seeds. Δ = method − reference and × = speedup of method over reference "
        "(throughput and accepted: method / reference; latency: reference / method), both computed per seed on "
        "the seeds where both runs succeeded. NA = not run; FAILED = no successful run to compare."
    )
    return "\n\n".join(parts) + "\n"


# -------------------------------------------------------------------------------------------------------- render
CSV_COLUMNS = (
    ["x_name", "x", "method", "n_ok", "n_failed", "errors"]
    + [f"{m}_{s}" for m in METRICS for s in ("mean", "std")]
    + [f"{t}_speedup_vs_{r}_{s}" for r in REFERENCES for t in ("tps", "latency") for s in ("mean", "std")]
)


def _csv(rows: list[dict[str, Any]]) -> str:
    errors = lambda r: ";".join(f"{k}:{v}" for k, v in r["errors"].items())  # noqa: E731
    return csv_text([{**r, "errors": errors(r)} for r in rows], CSV_COLUMNS)


def render(dir: str | os.PathLike, plots: bool = True) -> dict[str, Any]:
    """Aggregate ``<dir>/runs/*.json`` and write summary.csv/.json/.md (+ throughput/latency PNGs) into ``dir``."""
    store = RunStore(dir)
    if not store.runs_dir.is_dir():
        raise FileNotFoundError(f"no run directory {store.runs_dir} (expected raw run JSONs there)")
    records, skipped = store.scan()
    e2e_note = end_to_end(records)
    groups = _group(records)
    xs = sorted({x for x, _ in groups}, key=order_key)
    methods = sorted({m for _, m in groups}, key=_method_key)
    x_name = Counter(str(r.get("x_name", "x")) for r in records).most_common(1)[0][0] if records else "x"
    meta = [r.get("meta") or {} for r in records]
    configs = [r.get("config") or {} for r in records]
    weights = sorted({str(c["weights"]) for c in configs if c.get("weights") is not None})
    commits = sorted({f"{m['git_commit'][:12]}{' (dirty)' if m.get('git_dirty') else ''}" for m in meta
                      if m.get("git_commit")})
    present = {(r["method"], r["x"], r["seed"]) for r in records if _plain(r["x"]) and _plain(r["seed"])}
    order = lambda k: (order_key(k[1]), order_key(k[2]), _method_key(str(k[0])))  # noqa: E731
    missing = sorted(expected_runs(dir, records) - present, key=order)
    n_ok = sum(r.get("status") == STATUS_OK for r in records)
    summary: dict[str, Any] = {
        "dir": str(Path(dir)), "sweeps": sorted({str(r.get("sweep")) for r in records}), "x_name": x_name,
        "x_values": xs, "methods": methods, "seeds": sorted({r.get("seed") for r in records}, key=order_key),
        "n_runs": len(records), "n_ok": n_ok, "weights": "|".join(weights) or "unknown",
        "gpu": sorted({str(m["gpu"]) for m in meta if m.get("gpu")}), "commit": commits,
        "n_failed": len(records) - n_ok, "e2e_note": e2e_note,
        "missing": [{"method": m, "x": x, "seed": s} for m, x, s in missing],
        "n_expected": len(records) + len(missing), "partial": bool(missing) or any(s.damaged for s in skipped),
        "warnings": ([f"skipped {len(skipped)} file(s) in runs/ that are not run records: "
                      f"{'; '.join(map(str, skipped))}"] if skipped else []),
        "rows": _rows(groups, x_name), "speedups": _speedup_rows(groups, xs, methods, x_name),
        "breakdown": breakdown.rows(groups, xs, methods, x_name)}
    out = Path(dir)
    md = _markdown(summary, records, groups, xs, methods)
    files = {"summary_csv": str(atomic_write_text(out / "summary.csv", _csv(summary["rows"]))),
             "summary_md": str(atomic_write_text(out / "summary.md", md))}
    if plots and summary["rows"]:
        try:
            from mspeckv.bench.plots import PlotDependencyError, plot_breakdown, plot_summary

            title = ", ".join(summary["sweeps"])
            pngs = plot_summary(summary["rows"], out, x_name=x_name, methods=methods, title=title)
            if summary["breakdown"]:
                pngs.append(plot_breakdown(summary["breakdown"], out / "breakdown.png", x_name=x_name,
                                           title=f"Where the decode time goes ({title})"))
            files.update({f"{p.stem}_png": str(p) for p in pngs})
        except PlotDependencyError as e:
            summary["warnings"].append(f"plots skipped: {e}")
        except Exception as e:  # a plotting problem must not lose the tables
            summary["warnings"].append(f"plots failed: {type(e).__name__}: {e}")
        for w in summary["warnings"]:
            warnings.warn(w, stacklevel=2)
    summary["files"] = {**files, "summary_json": str(out / "summary.json")}
    summary = json_safe(summary)
    atomic_write_json(out / "summary.json", summary)
    return summary


# ------------------------------------------------------------------------------------------------------- console
def console_table(summary: dict[str, Any]) -> str:
    """A compact text table of the summary rows (rich if available, else plain)."""
    x_name = summary.get("x_name", "x")
    header = [x_name, "method", "ok/total", "tok/s", "e2e tok/s", "latency (s)", "accepted", "× latency vs baseline"]
    from rich.console import Console  # a dependency of the package
    from rich.table import Table

    title = f"{', '.join(summary.get('sweeps', []))} (weights: {summary.get('weights', '?')})"
    if summary.get("partial"):
        title += f" PARTIAL: {runs_text(summary)}"
    table = Table(title=title)
    for h in header:
        table.add_column(h, justify="left" if h in (x_name, "method") else "right")
    for r in summary.get("rows", []):
        ok = f"{r['n_ok']}/{r['n_ok'] + r['n_failed']}" + (f" ({', '.join(r['errors'])})" if r["errors"] else "")
        pm = lambda k, d=2, r=r: fmt_pm(r.get(f"{k}_mean"), r.get(f"{k}_std"), d)  # noqa: E731
        table.add_row(_fmt_x(r["x"]), r["method"], ok, pm("tok_per_s"), pm("e2e_tok_per_s"), pm("latency_s", 3),
                      pm("accepted"), pm("latency_speedup_vs_baseline"))
    buf = io.StringIO()
    Console(file=buf, width=160, force_terminal=False, color_system=None).print(table)
    return buf.getvalue().rstrip("\n")


def summary_line(summary: dict[str, Any]) -> str:
    """ONE JSON line for the CLI: counts, output files and the latency speedup table (numbers only)."""
    keep = ("dir", "sweeps", "x_name", "methods", "x_values", "n_runs", "n_ok", "n_failed", "n_expected", "partial",
            "missing", "weights", "files", "warnings")
    speedups = [{k: v for k, v in r.items() if not k.endswith("_text")} for r in summary.get("speedups", [])]
    return json.dumps(json_safe({**{k: summary.get(k) for k in keep}, "speedups": speedups}), separators=(",", ":"))
