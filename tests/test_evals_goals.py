"""Intervals (paired bootstrap on PPL Δ, Wilson on needles), the context-sensitivity check and the goal verdicts,
from hand-made cells (no model)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mspeckv.evals import report
from mspeckv.evals.goals import sensitivity
from mspeckv.evals.intervals import at_least, at_most, gap_kept, ppl_delta_interval, wilson
from mspeckv.evals.variants import FLOOR_SINKS, floor_spec

BASE = [2.0, 2.3, 1.8, 2.1, 2.5, 1.9, 2.2, 2.0]  # the full cache's mean NLL per window: windows differ a lot
FLOOR = floor_spec(256)
INT8 = "kv=int8/g64/res64/onchip0"


def _cell(name, nll, ctx=8192, src="A", dataset="pycode", press=None, q="none", kv=1000.0, metric="ppl"):
    return {"metric": metric, "variant": name, "context": ctx, "status": "ok", "_source": src,
            "results": {"ppl": math.exp(sum(nll) / len(nll)), "window_nll": list(nll), "windows": len(nll),
                        "window_docs": [f"pycode/m{i}.py@0" for i in range(len(nll))], "kv_bytes_prefix": kv,
                        "prefix_tokens": ctx - 256},
            "settings": {"dataset": dataset, "floor": 256},
            "variant_info": {"name": name, "press": press, "kv_quant": q}}


def _folder(variants, floor=None, **kw):
    """ppl cells of one folder: the full cache (BASE), the floor (default: +0.2 nats on every window: a clear gap) and
    each variant: name -> (NLL offsets per window, press, kv_quant, kv bytes)."""
    floor = floor if floor is not None else [0.2] * len(BASE)
    cells = [_cell("full", BASE, **kw), _cell(FLOOR, [b + d for b, d in zip(BASE, floor, strict=True)],
                                              press=FLOOR, kv=260.0, **kw)]
    for name, (off, press, q, kv) in variants.items():
        cells.append(_cell(name, [b + d for b, d in zip(BASE, off, strict=True)], press=press, q=q, kv=kv, **kw))
    return cells


def _goals(cells):
    ov = report.overview(cells)
    return ov, report.goals(cells, ov)


# --------------------------------------------------------------------------------------------------- intervals
def test_paired_bootstrap_matches_scipy_and_is_paired():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(1)
    d = rng.normal(0.01, 0.02, 12)
    nll_base = rng.normal(2.0, 0.4, 12)  # windows differ far more than the variant's effect
    lo, hi = ppl_delta_interval(nll_base + d, nll_base, seed=0)
    ref = stats.bootstrap((d,), lambda x, axis: 100 * np.expm1(x.mean(axis)), method="percentile",
                          n_resamples=20_000, rng=np.random.default_rng(0)).confidence_interval
    width = ref.high - ref.low
    assert lo == pytest.approx(ref.low, abs=0.05 * width) and hi == pytest.approx(ref.high, abs=0.05 * width)
    # paired: a constant per-window difference has no spread at all, however much the windows differ
    lo, hi = ppl_delta_interval([b + 0.01 for b in BASE], BASE)
    assert lo == pytest.approx(100 * math.expm1(0.01)) and hi == pytest.approx(lo)
    assert ppl_delta_interval(BASE, [b + 0.3 for b in BASE], seed=3) == ppl_delta_interval(
        BASE, [b + 0.3 for b in BASE], seed=3)  # seeded
    with pytest.raises(ValueError, match="same >= 2 windows"):
        ppl_delta_interval(BASE, BASE[:-1])


@pytest.mark.parametrize("k, n", [(0, 50), (47, 50), (50, 50), (12, 30), (1, 1)])
def test_wilson_matches_scipy(k, n):
    stats = pytest.importorskip("scipy.stats")
    ref = stats.binomtest(k, n).proportion_ci(0.95, method="wilson")
    assert wilson(k, n) == pytest.approx((ref.low, ref.high), abs=1e-9)


def test_verdicts_and_gap_kept():
    assert at_most(-0.2, 0.09, 0.1) == "met" and at_most(0.11, 0.5, 0.1) == "missed"
    assert at_most(0.05, 0.2, 0.1) == "not resolved"
    assert at_least(0.96, 1.0, 0.95) == "met" and at_least(0.5, 0.94, 0.95) == "missed"
    assert at_least(0.93, 1.0, 0.95) == "not resolved"
    assert gap_kept(10.0, 10.0, 12.0) == 1.0 and gap_kept(12.0, 10.0, 12.0) == 0.0
    assert gap_kept(11.5, 10.0, 12.0) == pytest.approx(0.25) and gap_kept(11.0, 10.0, 10.0) is None


def test_floor_is_the_streaming_press_with_its_own_sinks():
    from mspeckv.presses import parse_press
    from mspeckv.presses.streaming import StreamingLLMPress

    p = parse_press(floor_spec(256))
    assert isinstance(p, StreamingLLMPress) and p.sinks == FLOOR_SINKS == StreamingLLMPress().sinks
    assert p.budget == 256 + FLOOR_SINKS  # the last 256 prefix tokens, plus the sinks


# ----------------------------------------------------------------------------------------- sensitivity + goals
def test_goal_is_met_only_when_its_interval_says_so():
    """int8 <= +0.1% PPL: a steady +0.02% is met; +0.1% on average but noisy is not resolved (a point estimate
    would call it met); a steady +1% is MISSED."""
    cells = _folder({"a": ([0.0002] * 8, None, "int8", 500.0), "b": ([0.0029, -0.0011] * 4, None, "int8", 500.0),
                     "c": ([0.01] * 8, None, "int8", 500.0)})
    ov, lines = _goals(cells)
    got = {line.split("(")[1].split(" ")[0]: line for line in lines if "int8 KV" in line}
    assert got["a"].startswith("8192: int8 KV <= +0.1% PPL: met (a ")
    assert got["b"].startswith("8192: int8 KV <= +0.1% PPL: not resolved (b ")
    assert got["c"].startswith("8192: int8 KV <= +0.1% PPL: MISSED (c ")
    rows = {r["config"]: r for r in ov["8192"]}
    assert rows["b"]["ppl_delta_pct"] < 0.1 < rows["b"]["ppl_delta_ci"][1]
    assert rows[FLOOR]["floor"] and not rows["a"]["floor"]


def test_no_goal_is_judged_on_short_unrelated_articles():
    cells = _folder({"c": ([0.01] * 8, None, "int8", 500.0)}, dataset=None)
    _, lines = _goals(cells)
    assert lines == ["8192: not judged (1 variant(s)): bbc is short, unrelated articles: a window spans several of "
                     "them, so no goal is judged on it"]


def test_a_floor_within_twice_its_noise_refuses_the_goals():
    """The floor is +1% on average but swings +-30% between windows: the corpus cannot judge a press there."""
    cells = _folder({"c": ([0.01] * 8, None, "int8", 500.0)}, floor=[0.31, -0.29] * 4)
    s = sensitivity(cells)[("A", 8192)]
    assert not s.judge and s.gap_pct == pytest.approx(100 * (math.exp(0.01) - 1)) and s.gap_pct < 2 * s.noise
    # noise is the bootstrap standard error of the paired gap: about the windows' spread over sqrt(windows)
    spread = np.std([100 * math.expm1(x) for x in [0.31, -0.29] * 4], ddof=1) / math.sqrt(8)
    assert s.noise == pytest.approx(spread, rel=0.15)
    _, lines = _goals(cells)
    assert len(lines) == 1 and "cannot judge a press at this context" in lines[0]
    # a floor +10.5% that swings +-10% between windows: noise about 3.7, so 2x noise is under the gap and the
    # context may judge (twice the 95% half-width, about 15, would not)
    s = sensitivity(_folder({}, floor=[0.2, 0.0] * 4))[("A", 8192)]
    assert s.judge and 2 * s.noise < s.gap_pct < s.ci[1] - s.ci[0]
    # without a floor cell: not judged either
    _, lines = _goals([c for c in cells if c["variant"] != FLOOR])
    assert len(lines) == 1 and "no context floor was measured" in lines[0]


def test_gap_kept_is_reported_per_variant():
    cells = _folder({"half": ([0.1] * 8, "snapkv:budget=0.25", "none", 250.0)})
    ov, _ = _goals(cells)
    rows = {r["config"]: r for r in ov["8192"]}
    assert rows["half"]["gap_kept"] == pytest.approx((math.exp(0.2) - math.exp(0.1)) / (math.exp(0.2) - 1))
    assert rows["full"]["gap_kept"] == pytest.approx(1.0) and rows[FLOOR]["gap_kept"] == pytest.approx(0.0)


def _needles(v, hits, n, src="A"):
    return [{"metric": "needle", "variant": v, "context": c, "status": "ok", "_source": src,
             "results": {"accuracy": h / n, "n": n, "hits": h}, "settings": {}, "variant_info": {}}
            for c, h in zip((8192, 16384, 32768), hits, strict=True)]


@pytest.mark.parametrize("hits, verdict", [((50, 50, 50), "met"), ((50, 49, 47), "not resolved"),
                                           ((40, 42, 41), "MISSED")])
def test_eight_x_goal_pools_needles_with_a_wilson_interval(hits, verdict):
    """>= 8x at <= +3% PPL (steady +1%: met) and needle >= 95% of full at 8K-32K: 150/150 has a Wilson lower bound
    of 97.5% >= 95% (met); 146/150 (97.3%) is above 95% but its interval is not (not resolved); 123/150 is wholly
    under (MISSED)."""
    h = "hybrid:retain=0.1"
    cells = _folder({h: ([0.01] * 8, h, "none", 100.0)}) + _needles("full", (50, 50, 50), 50) + _needles(h, hits, 50)
    _, lines = _goals(cells)
    line = next(g for g in lines if ">= 8x" in g)
    assert line.startswith(f"8192: >= 8x at <= +3% PPL and needle >= 95% of full at 8K-32K: {verdict}")
    assert f"needle {sum(hits)}/150" in line and "full's 150/150" in line
    four = next(g for g in lines if ">= 4x" in g)
    assert four.startswith("8192: >= 4x at <= +1% PPL: MISSED")  # +1.005% is wholly over +1%


def test_the_needle_part_uses_the_variants_own_folder():
    """The 8x goal compares with the full cache of the variant's folder (B: 45/50 per context), not the shown one
    (A: 50/50): 143/150 >= 95% of 90% holds with its interval, against A's 100% it would not."""
    h = "hybrid:retain=0.1"
    cells = _folder({h: ([0.01] * 8, h, "none", 100.0)}, src="B")
    cells += _needles("full", (50, 50, 50), 50, src="A")
    cells += [{**c, "_shadowed": True} for c in _needles("full", (45, 45, 45), 50, src="B")]
    cells += _needles(h, (48, 48, 47), 50, src="B")
    _, lines = _goals(cells)
    line = next(g for g in lines if ">= 8x" in g)
    assert ": met by" in line and "full's 135/150" in line


def test_report_markdown_shows_the_floor_row_interval_and_gap(tmp_path):
    from mspeckv.runs.template import CellStore

    store = CellStore(tmp_path)
    for c in _folder({INT8: ([0.0002] * 8, None, "int8", 500.0)}):
        store.save("ppl", c["variant"], c["context"], c["results"], c["settings"], c["variant_info"])
    s = report.render(tmp_path, plots=False)
    md = (tmp_path / "summary.md").read_text()
    assert "| PPL (Δ%) | PPL Δ 95% CI | gap kept % | KL |" in md
    assert f"| {FLOOR} (context floor) |" in md
    assert "**Context sensitivity:** corpus `pycode` (long documents: one Python module each), 8 windows" in md
    assert "This context can judge a press." in md
    assert any(g.startswith("8192: int8 KV <= +0.1% PPL: met") for g in s["goals"])
    assert s["sensitivity"][0]["judge"] and s["sensitivity"][0]["floor"] == 256
