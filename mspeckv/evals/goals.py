"""What a quality table may judge, and the verdicts: the context-sensitivity check and issue 10's goal lines, each
judged from a 95% interval (``evals.intervals``).

**Context sensitivity** (per folder and context). The lm pass also scores the context floor: the same windows with
only the last ``F`` prefix tokens kept (``--floor``, ``variants.floor_spec``). The floor's *gap* is its PPL Δ against
the full cache; the *noise* is that Δ's bootstrap standard error, paired by window (how much the full cache's
advantage varies from window to window, over the square root of the windows). A context may judge a press only when
the gap exceeds 2 × the noise (about: the gap's 95% interval lies above zero):
otherwise its continuations barely depend on the prefix beyond the last ``F`` tokens, and dropping context costs
little whatever a press keeps. No goal is judged there, nor on short unrelated articles (bbc, newsgroups:
``data.corpora.unrelated``), nor where no floor was measured. Each variant's *gap kept* is
``intervals.gap_kept``: 100% = as good as the full cache, 0% = as bad as the floor.

**Goals** (one line per goal and context), "met" only when the interval says so, "MISSED" when it lies wholly on the
wrong side, "not resolved" otherwise:

- int8 KV <= +0.1% PPL; 2-bit (the int2 placement or KIVI 2/2) <= +3% PPL: the variant's PPL Δ interval
  (``intervals.at_most``).
- >= 4x at <= +1% PPL: met by every variant of >= 4x compression whose interval meets the limit; MISSED when every
  such variant's misses it; else not resolved, naming the unresolved ones.
- >= 8x at <= +3% PPL and needle >= 95% of full at 8K-32K: the needle part pools the variant's needles over its
  folder's contexts in [8192, 32768] and compares their Wilson interval with 95% of the same folder's full-cache
  accuracy over the same contexts (``intervals.at_least``); met when both parts are met, MISSED when either misses.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..data.corpora import corpus_label, unrelated
from ..runs.tables import number
from .intervals import at_least, at_most, ppl_delta_interval, ppl_delta_noise, wilson
from .variants import BASELINE, floor_spec

NEEDLE_SHARE = 0.95
FAR = (8192, 32768)  # the needle goal's contexts
NOISE_MULTIPLE = 2.0


def needle_hits(results: dict) -> int:
    """A needle cell's hits (cells from before ``hits`` was recorded: from its accuracy)."""
    return results.get("hits", round(results["accuracy"] * results["n"]))


def index_cells(cells: list[dict]) -> tuple[dict, dict]:
    """(the shown cells by (metric, variant, context), every baseline cell by (metric, context, source))."""
    by = {(c["metric"], c["variant"], c["context"]): c for c in cells if not c.get("_shadowed")}
    base = {(c["metric"], c["context"], c.get("_source")): c for c in cells if c["variant"] == BASELINE}
    return by, base


def baseline_cell(by: dict, base: dict, metric: str, ctx: int, cell: dict | None) -> dict:
    """The baseline cell a variant's cell is compared with: its own folder's, else the shown one."""
    src = cell.get("_source") if cell else None
    return base.get((metric, ctx, src)) or by.get((metric, BASELINE, ctx)) or {}


def _paired(cell: dict | None, base_cell: dict) -> tuple[list[float], list[float]] | None:
    """(the cell's window NLLs, its baseline's) when both scored the same >= 2 windows."""
    if not cell or not base_cell:
        return None
    r, b = cell.get("results", {}), base_cell.get("results", {})
    v, f = r.get("window_nll"), b.get("window_nll")
    if not v or not f or len(v) != len(f) or len(v) < 2 or r.get("window_docs") != b.get("window_docs"):
        return None
    return v, f


def paired_interval(cell: dict | None, base_cell: dict) -> tuple[float, float] | None:
    """95% interval of a ppl cell's Δ% against its baseline cell, when both scored the same >= 2 windows."""
    pair = _paired(cell, base_cell)
    return ppl_delta_interval(*pair) if pair else None


@dataclass(frozen=True)
class Sensitivity:
    context: int
    source: str | None
    dataset: str | None
    split: str  # all | select | confirm (data.corpora.doc_split)
    corpus: str  # data.corpora.corpus_label
    floor: int  # prefix tokens the floor keeps (0: none measured)
    windows: int
    ppl_full: float | None
    ppl_floor: float | None
    gap_pct: float | None
    ci: tuple[float, float] | None
    noise: float | None  # the gap's bootstrap standard error (% points)
    judge: bool
    why: str  # why no goal is judged here ("" when one may be)


def sensitivity(cells: list[dict]) -> dict[tuple[str | None, int], Sensitivity]:
    """One Sensitivity per (folder, context) with a full-cache ppl cell."""
    own = {(c["metric"], c["variant"], c["context"], c.get("_source")): c for c in cells}
    out = {}
    for (m, v, ctx, src), full in own.items():
        if m != "ppl" or v != BASELINE:
            continue
        st, res = full.get("settings", {}), full.get("results", {})
        dataset, floor = st.get("dataset"), int(st.get("floor") or 0)
        fc = own.get(("ppl", floor_spec(floor), ctx, src)) if floor else None
        ppl_f = fc["results"].get("ppl") if fc else None
        gap = 100 * (ppl_f / res["ppl"] - 1) if number(ppl_f) and number(res.get("ppl")) else None
        ci = paired_interval(fc, full)
        noise = ppl_delta_noise(*_paired(fc, full)) if ci else None
        label = corpus_label(dataset)
        if unrelated(dataset):
            why = f"{dataset or 'bbc'} is {label}: a window spans several of them, so no goal is judged on it"
        elif fc is None:
            why = ("no context floor was measured here (--floor 0, a prefix not longer than the floor, or cells from "
                   "before the floor)")
        elif ci is None:
            why = "the floor and the full cache lack >= 2 paired windows (cells from before per-window NLL)"
        elif gap <= NOISE_MULTIPLE * noise:
            why = (f"the floor (last {floor} tokens) is only {gap:+.2f}% [{ci[0]:+.2f}, {ci[1]:+.2f}], within "
                   f"{NOISE_MULTIPLE:g}x its noise (standard error {noise:.2f}): this corpus cannot judge a press at "
                   "this context")
        else:
            why = ""
        out[(src, ctx)] = Sensitivity(ctx, src, dataset, st.get("split", "all"), label, floor if fc else 0,
                                      int(res.get("windows") or 0), res.get("ppl"), ppl_f, gap, ci, noise, not why,
                                      why)
    return out


def floor_names(sens: dict) -> set[str]:
    return {floor_spec(s.floor) for s in sens.values() if s.floor}


def _needle(by: dict, base: dict, v: str) -> tuple[str, str]:
    """(verdict, text) of the needle part of the 8x goal for variant ``v``."""
    far = sorted(c for m, x, c in by if m == "needle" and x == v and FAR[0] <= c <= FAR[1])
    if not far:
        return "not resolved", "needle at 8K-32K not measured"
    k = n = fk = fn = 0
    for ctx in far:
        cell = by[("needle", v, ctx)]
        full = baseline_cell(by, base, "needle", ctx, cell).get("results")
        if not full:
            return "not resolved", f"no full-cache needle cell at {ctx}"
        k, n = k + needle_hits(cell["results"]), n + cell["results"]["n"]
        fk, fn = fk + needle_hits(full), fn + full["n"]
    lo, hi = wilson(k, n)
    target = NEEDLE_SHARE * fk / fn
    return at_least(lo, hi, target), (f"needle {k}/{n} = {k / n:.1%} [{lo:.1%}, {hi:.1%}] vs {NEEDLE_SHARE:.0%} of "
                                      f"full's {fk}/{fn} = {target:.1%} at {','.join(map(str, far))}")


def _kivi_bits(spec) -> tuple[int, int] | None:
    """(k_bits, v_bits) of a kivi press spec, else None (the 2-bit goal concerns 2-bit keys and values only)."""
    if not spec or not str(spec).startswith("kivi"):
        return None
    from ..presses import parse_press

    try:
        p = parse_press(str(spec))
    except (ValueError, FileNotFoundError):
        return None
    return p.k_bits, p.v_bits


def _ppl_verdict(r: dict, limit: float) -> str:
    ci = r.get("ppl_delta_ci")
    return at_most(ci[0], ci[1], limit) if ci else "not resolved"


def _both(a: str, b: str) -> str:
    return "missed" if "missed" in (a, b) else "met" if a == b == "met" else "not resolved"


def _show(verdict: str) -> str:
    return "MISSED" if verdict == "missed" else verdict


def _desc(r: dict, extra: str = "") -> str:
    ci = r.get("ppl_delta_ci")
    iv = f" [{ci[0]:+.2f}, {ci[1]:+.2f}]" if ci else " (no interval)"
    comp = f"{r['compression']:.1f}x, " if number(r.get("compression")) else ""
    return f"{r['config']} ({comp}{r['ppl_delta_pct']:+.3f}%{iv}{', ' + extra if extra else ''})"


def goals(cells: list[dict], ov: dict[str, list[dict]]) -> list[str]:
    """The goal lines for the overview's contexts (see the module docstring). Overview rows carry ``ppl_delta_ci``
    and ``floor`` (set by ``report.overview``)."""
    info = {c["variant"]: c.get("variant_info", {}) for c in cells}
    by, base = index_cells(cells)
    sens = sensitivity(cells)
    out = []
    for ctx, rows in ov.items():
        measured = [r for r in rows if number(r["ppl_delta_pct"]) and r["config"] != BASELINE and not r.get("floor")]
        judged, refused = [], {}
        for r in measured:
            cell = by.get(("ppl", r["config"], int(ctx)))
            s = sens.get((cell.get("_source") if cell else None, int(ctx)))
            why = "no full-cache ppl cell of its folder" if s is None else s.why
            if why:
                refused.setdefault(why, []).append(r["config"])
            else:
                judged.append(r)
        for why, names in refused.items():
            out.append(f"{ctx}: not judged ({len(names)} variant(s)): {why}")
        for r in judged:
            i = info.get(r["config"], {})
            q, press = i.get("kv_quant"), i.get("press")
            for applies, goal, limit in ((q == "int8" and not press, "int8 KV <= +0.1% PPL", 0.1),
                                         ((q == "int2" and not press) or _kivi_bits(press) == (2, 2),
                                          "2-bit within +3% PPL", 3.0)):
                if applies:
                    out.append(f"{ctx}: {goal}: {_show(_ppl_verdict(r, limit))} ({_desc(r)})")
        if not judged:
            continue
        for need, limit in ((4.0, 1.0), (8.0, 3.0)):
            what = f">= {need:g}x at <= +{limit:g}% PPL" + (" and needle >= 95% of full at 8K-32K" if need == 8 else "")
            cand = [r for r in judged if number(r["compression"]) and r["compression"] >= need]
            if not cand:
                out.append(f"{ctx}: {what}: no judged variant reaches {need:g}x here")
                continue
            verdicts = []
            for r in cand:
                v, extra = _ppl_verdict(r, limit), ""
                if need == 8.0:
                    nv, extra = _needle(by, base, r["config"])
                    v = _both(v, nv)
                verdicts.append((v, r, extra))
            met = [(r, e) for v, r, e in verdicts if v == "met"]
            open_ = sorted(((r, e) for v, r, e in verdicts if v == "not resolved"), key=lambda x: x[0]["ppl_delta_pct"])
            if met:
                out.append(f"{ctx}: {what}: met by " + "; ".join(_desc(r, e) for r, e in met))
            elif open_:
                out.append(f"{ctx}: {what}: not resolved: " + "; ".join(_desc(r, e) for r, e in open_))
            else:
                best = min(verdicts, key=lambda x: x[1]["ppl_delta_pct"])
                out.append(f"{ctx}: {what}: MISSED; closest {_desc(best[1], best[2])}")
    return out
