"""A labelled PROJECTION of MSpecKV tok/s for a model shape whose acceptance cannot be measured (random weights),
from two measured sweep folders:

    python tools/project.py --costs results/context/llama-2-7b-128k_random_A1 \
        --acceptance results/context/qwen2.5-coder-1.5b_A1_h200 --out results/projection/7b-from-1.5b-pair

- ``--costs``: a context sweep at the target shape (random weights are fine: only per-call costs are read). Per
  context, medians over seeds of: the draft's ms per proposed token (draft seconds / tokens proposed to level 1),
  one level-1 (retrieval) call, one level-2 (full-KV) verification, and the AR baseline's ms/token.
- ``--acceptance``: a context sweep of a real pair. Per context, medians over seeds of what one level-2 round
  contains: tokens made (accepted + 1), level-1 calls, draft tokens.
- Projection, per context of the costs folder and method, with the acceptance of the nearest context of the other
  folder: ms per round = draft tokens x draft ms + level-1 calls x level-1 ms + one level-2 ms; tok/s = tokens per
  round / that. The range column redoes it with the acceptance of every measured context. Against two measured AR
  runs of the costs folder: the offloaded baseline and ``ar_gpu`` (every layer on the GPU, graphed), which is what a
  user whose KV fits would run. A costs context beyond the acceptance folder's longest is marked: there the shorter
  context's acceptance stands in.

This is arithmetic on measured parts, not a measurement: acceptance of the real pair stands in for the target
shape's (a different pair accepts differently), and the parts were timed in separate runs. Every output says so.
Contexts are matched to the nearest one in the other folder (e.g. 32512 with 32768), and the pairing is printed.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path

from mspeckv.runs.store import run_metadata

SPEC = ("mspeckv", "mspeckv_kv_quant")
LABEL = "PROJECTION (not a measurement)"


def _runs(folder: Path) -> list[dict]:
    runs = [json.loads(p.read_text()) for p in sorted((folder / "runs").glob("*.json"))]
    ok = [r for r in runs if r.get("status") == "ok"]
    if not ok:
        raise ValueError(f"{folder}/runs holds no successful runs")
    return ok


def _median(xs: list[float]) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def costs(runs: list[dict]) -> dict[tuple[str, int], dict]:
    """(method, context) -> medians over seeds of the per-call costs in ms."""
    acc: dict[tuple[str, int], dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for r in runs:
        m, lv, s = r["metrics"], r["metrics"].get("levels") or {}, r["metrics"].get("per_level_s") or {}
        a = acc[(r["method"], r["x"])]
        if r["method"] in ("baseline", "ar_gpu"):
            a["ar_ms"].append(m["decode_ms_per_token"])
            continue
        l1, l2 = lv.get("verify_l1"), lv.get("verify_l2")
        if l1 and l1["proposed"]:
            a["draft_ms_per_token"].append(1e3 * s["draft"] / l1["proposed"])
            a["l1_ms"].append(1e3 * s["verify_l1"] / l1["rounds"])
        if l2 and l2["rounds"]:
            a["l2_ms"].append(1e3 * s["verify_l2"] / l2["rounds"])
    return {k: {n: _median(v) for n, v in d.items()} for k, d in acc.items()}


def acceptance(runs: list[dict]) -> dict[tuple[str, int], dict]:
    """(method, context) -> medians over seeds of one level-2 round's contents."""
    acc: dict[tuple[str, int], dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for r in runs:
        lv = r["metrics"].get("levels") or {}
        l1, l2 = lv.get("verify_l1"), lv.get("verify_l2")
        if r["method"] not in SPEC or not (l1 and l2 and l2["rounds"]):
            continue
        a = acc[(r["method"], r["x"])]
        a["tokens_per_round"].append(l2["accepted_per_round"] + 1)
        a["l1_calls_per_round"].append(l1["rounds"] / l2["rounds"])
        a["draft_tokens_per_round"].append(l1["proposed"] / l2["rounds"])
        a["seeds"].append(r["seed"])
    return {k: {n: (sorted(v) if n == "seeds" else _median(v)) for n, v in d.items()} for k, d in acc.items()}


def _nearest(x: int, xs: list[int]) -> int:
    return min(xs, key=lambda y: abs(y - x))


def _tok_s(a: dict, c: dict) -> tuple[float, float]:
    """(ms per round, tok/s) for one round's contents `a` at the per-call costs `c`."""
    ms = a["draft_tokens_per_round"] * c["draft_ms_per_token"] + a["l1_calls_per_round"] * c["l1_ms"] + c["l2_ms"]
    return ms, a["tokens_per_round"] / ms * 1e3


def project(cost: dict, accept: dict, draft: dict | None = None) -> list[dict]:
    """``draft``: per-call costs of the acceptance folder; when given, its draft's ms per token (the real draft that
    produced the acceptance, timed in the same runs) replaces the costs folder's."""
    rows = []
    for (method, xc), c in sorted(cost.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        xs = sorted(x for m, x in accept if m == method)
        if method not in SPEC or not xs or c.get("l2_ms") is None or c.get("l1_ms") is None:
            continue
        x = _nearest(xc, xs)
        a = accept[(method, x)]
        # the costs at acceptance context xa: the draft's from the acceptance folder when asked
        cs = {xa: {**c, "draft_ms_per_token": draft[(method, xa)]["draft_ms_per_token"]} if draft else c for xa in xs}
        ms, tok_s = _tok_s(a, cs[x])
        band = [_tok_s(accept[(method, xa)], cs[xa])[1] for xa in xs]
        ar, gpu = cost.get(("baseline", xc), {}).get("ar_ms"), cost.get(("ar_gpu", xc), {}).get("ar_ms")
        rows.append({"label": LABEL, "method": method, "context_acceptance": x, "context_costs": xc,
                     "acceptance_extrapolated": xc > max(xs) * 1.1, **a,
                     "draft_ms_per_token": cs[x]["draft_ms_per_token"],
                     "draft_cost_from": "acceptance" if draft else "costs", "l1_ms": c["l1_ms"], "l2_ms": c["l2_ms"],
                     "ms_per_round": ms, "projected_tok_s": tok_s,
                     "projected_tok_s_range": [min(band), max(band)], "acceptance_contexts": xs,
                     "baseline_ar_ms": ar, "baseline_tok_s": 1e3 / ar if ar else None,
                     "projected_speedup_vs_baseline": tok_s * ar / 1e3 if ar else None,
                     "ar_gpu_ms": gpu, "ar_gpu_tok_s": 1e3 / gpu if gpu else None,
                     "projected_speedup_vs_ar_gpu": tok_s * gpu / 1e3 if gpu else None})
    return rows


def _meta(runs: list[dict]) -> dict:
    return {"commits": sorted({r["meta"].get("git_commit") or "null" for r in runs}),
            "gpus": sorted({r["meta"].get("gpu") or "?" for r in runs}),
            "weights": sorted({r["config"].get("weights", "?") for r in runs}),
            "target": sorted({r["config"]["target"] for r in runs}),
            "draft": sorted({r["config"]["draft"] for r in runs})}


def render(res: dict) -> str:
    c, a = res["costs_source"], res["acceptance_source"]
    lines = [f"# MSpecKV tok/s, {LABEL}", "",
             f"Per-call costs measured in `{c['folder']}` ({', '.join(c['target'])} + {', '.join(c['draft'])}, "
             f"{'/'.join(c['weights'])} weights, {', '.join(c['gpus'])}, commits {', '.join(c['commits'])}).",
             f"Acceptance measured in `{a['folder']}` ({', '.join(a['target'])} + {', '.join(a['draft'])}, "
             f"{'/'.join(a['weights'])} weights, {', '.join(a['gpus'])}, commits {', '.join(a['commits'])}).",
             "The real pair's acceptance stands in for the projected pair's, and the parts were timed in separate "
             "runs: this is arithmetic on measurements, not a measurement.",
             "Draft ms/token: " + ("the acceptance folder's real draft, timed in its runs (the draft whose proposals "
                                   "were accepted)." if res["rows"][0]["draft_cost_from"] == "acceptance" else
                                   "the costs folder's draft."), "",
             "| method | context (costs / acceptance) | tokens/round | draft tok/round | L1 calls/round | draft ms/tok "
             "| L1 ms | L2 ms | ms/round | projected tok/s | range over acceptance contexts | offloaded AR tok/s "
             "(measured) | projected speedup | all-on-GPU graphed AR tok/s (measured) | projected vs it |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|"]
    f = lambda v, p=2: "–" if v is None else f"{v:.{p}f}"
    for r in res["rows"]:
        star = " ⁺" if r["acceptance_extrapolated"] else ""
        lo, hi = r["projected_tok_s_range"]
        lines.append(f"| {r['method']} | {r['context_costs']} / {r['context_acceptance']}{star} | "
                     f"{f(r['tokens_per_round'])} | {f(r['draft_tokens_per_round'])} | {f(r['l1_calls_per_round'])} | "
                     f"{f(r['draft_ms_per_token'])} | {f(r['l1_ms'])} | {f(r['l2_ms'])} | {f(r['ms_per_round'], 1)} | "
                     f"{f(r['projected_tok_s'], 1)} | {f(lo, 1)}–{f(hi, 1)} | {f(r['baseline_tok_s'], 1)} | "
                     f"{f(r['projected_speedup_vs_baseline'])}x | {f(r['ar_gpu_tok_s'], 1)} | "
                     f"{f(r['projected_speedup_vs_ar_gpu'])}x |")
    if any(r["acceptance_extrapolated"] for r in res["rows"]):
        lines += ["", "⁺ the costs context is longer than any context of the acceptance folder: the longest measured "
                  "acceptance stands in (acceptance may fall with context)."]
    lines += ["", "The range column redoes the projection with the acceptance measured at each context of the "
              f"acceptance folder ({', '.join(str(x) for x in res['rows'][0]['acceptance_contexts'])})."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--costs", required=True, help="sweep folder at the projected shape (per-call costs)")
    ap.add_argument("--acceptance", required=True, help="sweep folder of a real pair (acceptance)")
    ap.add_argument("--draft-from", choices=("costs", "acceptance"), default="costs",
                    help="whose draft ms/token to use: the costs folder's draft, or the real draft of the acceptance "
                         "folder (the one whose proposals were accepted), timed in those runs")
    ap.add_argument("--out", default=None, help="folder for projection.json and summary.md (default: print only)")
    a = ap.parse_args(argv)
    cr, ar = _runs(Path(a.costs)), _runs(Path(a.acceptance))
    rows = project(costs(cr), acceptance(ar), costs(ar) if a.draft_from == "acceptance" else None)
    if not rows:
        raise SystemExit("no (method, context) is in both folders with level-1 and level-2 costs: nothing to project")
    res = {"label": LABEL, "costs_source": {"folder": a.costs, **_meta(cr)},
           "acceptance_source": {"folder": a.acceptance, **_meta(ar)}, "rows": rows,
           "command": "python tools/project.py " + " ".join(argv if argv is not None else __import__("sys").argv[1:]),
           "meta": run_metadata()}  # the commit of this arithmetic (the sources name theirs)
    md = render(res)
    print(md)
    if a.out:
        d = Path(a.out)
        d.mkdir(parents=True, exist_ok=True)
        (d / "projection.json").write_text(json.dumps(res, indent=1) + "\n")
        (d / "summary.md").write_text(md + f"\nCommand: `{res['command']}`\n")
    print(json.dumps({"label": LABEL, "rows": [{k: r[k] for k in ("method", "context_costs", "projected_tok_s",
                                                                   "projected_speedup_vs_baseline",
                                                                   "projected_speedup_vs_ar_gpu")} for r in rows]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
