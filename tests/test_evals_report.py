"""Eval report rendering from fixture cells, and the config template (flags from fields, validation messages)."""

from __future__ import annotations

import argparse
import csv
import json
import shutil
from pathlib import Path

import pytest

from mspeckv.evals import report
from mspeckv.evals.runner import EvalConfig, plan
from mspeckv.runs.template import CellStore, add_flags, from_args

FIXTURE = Path(__file__).parent / "fixtures" / "evals"
INT8 = "kv=int8/g16/res16/onchip0"


@pytest.fixture
def rendered(tmp_path):
    d = tmp_path / "run"
    shutil.copytree(FIXTURE, d)
    return d, report.render(d, plots=True)


def test_render_from_fixture_cells(rendered):
    d, s = rendered
    assert s["n_cells"] == 14 and s["git_commits"] == ["9a3f1b992452ff0a0890815d208b87a1a4d39e46"]
    rows = {(r["metric"], r["variant"], r["context"]): r for r in s["rows"]}
    base = rows[("ppl", "full", 128)]
    assert base["delta"] == 0 and base["delta_pct"] == 0
    q = rows[("ppl", INT8, 128)]
    assert q["value"] == pytest.approx(96.12266665701793) and q["baseline"] == pytest.approx(96.12697523034366)
    assert q["delta_pct"] == pytest.approx(100 * (q["value"] / q["baseline"] - 1))
    assert rows[("kl", INT8, 128)]["top1_agreement"] == 1.0
    assert rows[("gsm8k", INT8, 0)]["value"] == 0.5
    over = {r["config"]: r for r in s["overview"]["128"]}
    assert set(over) == {"full", INT8}
    assert over["full"]["compression"] == 1.0 and over[INT8]["compression"] > 1.5
    assert over[INT8]["kv_mb"] == pytest.approx(over["full"]["kv_mb"] / over[INT8]["compression"])
    assert over[INT8]["bytes_per_token"] == pytest.approx(over[INT8]["kv_mb"] * 2**20 / 128)
    assert over[INT8]["gsm8k_acc"] == 0.5 and over[INT8]["needle_acc"] is None  # needle ran at 560/700 only
    # the fixture's corpus is BBC (dataset null): short, unrelated articles, on which no goal is judged
    assert s["goals"] == ["128: not judged (1 variant(s)): bbc is short, unrelated articles: a window spans several "
                          "of them, so no goal is judged on it"]
    md = (d / "summary.md").read_text()
    assert "## Goals (issue 10)" in md
    assert "| config | compression | KV MB @ctx | bytes/token | decode tok/s | TTFT s | TPOT ms | PPL (Δ%) |" in md
    assert "#### needle accuracy %, full (depth x context)" in md
    with (d / "summary.csv").open() as f:
        got = list(csv.DictReader(f))
    assert len(got) == 14 and {"metric", "variant", "context", "value", "baseline", "delta"} <= set(got[0])
    assert json.loads((d / "summary.json").read_text())["overview"]["128"][0]["config"] == "full"
    if s["plot_error"] is None:
        for name in ("ppl_vs_compression.png", "accuracy_vs_compression.png", "kv_memory_vs_context.png",
                     "throughput_vs_compression.png", "needle_full.png"):
            assert (d / name).stat().st_size > 1000, name
    line = report.summary_line(s)
    assert {"metric", "variant", "context", "value", "delta", "delta_pct"} == set(line["rows"][0])


def test_cells_resume_and_settings_guard(tmp_path):
    store = CellStore(tmp_path)
    cfg = EvalConfig(metrics=("ppl",), context=(128,), scored=32, kv_quant=("int8",), kv_group_size=16)
    todo = plan(cfg, store)
    want = [("lm", 128, ["full", "kv=int8/g16/res64/onchip0"])]
    assert [(f.name, c, [v.name for v in vs]) for f, c, vs in todo] == want
    for v in cfg.variants():
        store.save("ppl", v.name, 128, {"ppl": 1.0}, {"model": cfg.model, "scored": 32})
    assert plan(cfg, store) == []
    assert not list(tmp_path.glob("cells/.*"))  # atomic writes leave no temp files
    with pytest.raises(ValueError, match="other settings.*scored"):
        store.check_settings("ppl", {"model": cfg.model, "scored": 64})


def _parse(*argv):
    p = argparse.ArgumentParser()
    add_flags(p, EvalConfig)
    return from_args(EvalConfig, p.parse_args(list(argv)), metrics=("ppl",))


def test_flags_come_from_the_config_fields():
    c = _parse("--context", "2048,8192", "--kv-quant", "none,int4", "--press", "snapkv:budget=64,window=8", "h2o",
               "--on-chip", "4", "--needle-depths", "0,0.5", "--no-plots")
    assert c.context == (2048, 8192) and c.kv_quant == ("none", "int4") and c.on_chip == 4
    assert c.press == ("snapkv:budget=64,window=8", "h2o") and c.needle_depths == (0.0, 0.5) and c.no_plots
    names = [v.name for v in c.variants()]
    assert names[0] == "full" and "kv=int4/g64/res64/onchip4" in names and len(names) == 7  # bf16 offload too
    assert _parse().context == (2048, 8192, 32768)


@pytest.mark.parametrize("argv, msg", [
    (["--context", "2048,x"], "--context: 'x' is not an int"),
    (["--kv-quant", "int3"], "--kv-quant: 'int3' is not one of"),
    (["--context", "256", "--scored", "256"], "--scored 256 must be shorter than every --context"),
    (["--windows", "0"], "--windows must be >= 1"),
    (["--needle-depths", "1.5"], "--needle-depths must lie in"),
    (["--kv-quant", "int8", "--kv-group-size", "0"], "--kv-group-size must be >= 1"),
    (["--kv-quant", "int8,int8"], "--kv-quant names a format twice"),
])
def test_config_errors_name_the_flag(argv, msg):
    with pytest.raises(ValueError, match=msg.replace("(", r"\(").replace("'", "'")):
        _parse(*argv)


def test_accept_only_folder_renders_its_rows_in_the_overview(tmp_path):
    """A folder with only accept cells gets an overview per context with the L1 acceptance column, and no
    compression goal lines (no PPL was measured there)."""
    store = CellStore(tmp_path)
    for ctx, rates in ((8192, {"full": 0.64, "snapkv:budget=4096": 0.65}), (32768, {"full": 0.21})):
        for v, r in rates.items():
            store.save("accept", v, ctx, {"l1_acceptance_rate": r, "l2_accepted_per_round": 7.0}, {"model": "m"},
                       {"name": v, "press": None if v == "full" else v, "kv_quant": "none"})
    s = report.render(tmp_path, plots=False)
    assert set(s["overview"]) == {"8192", "32768"}
    over = {r["config"]: r for r in s["overview"]["8192"]}
    assert set(over) == {"full", "snapkv:budget=4096"} and over["snapkv:budget=4096"]["accept_l1"] == 0.65
    md = (tmp_path / "summary.md").read_text()
    assert "(no cells)" not in md and "| accept L1 % |" in md
    assert "| snapkv:budget=4096 | – | – | – | – | – | – | – | – | – | – | – | 65.0 |" in md
    assert s["goals"] == [] and "- (no ppl cells)" in md


def test_overview_without_accept_cells_keeps_the_issue_columns(rendered):
    d, s = rendered
    md = (d / "summary.md").read_text()
    assert "accept L1 %" not in md and "| RULER % | GSM8K % |\n" in md


def test_gsm8k_only_folder_states_no_compression_goal(tmp_path):
    store = CellStore(tmp_path)
    for v, a in (("full", 0.41), ("aggressive", 0.175)):
        store.save("gsm8k", v, 0, {"accuracy": a}, {"model": "m"}, {"name": v, "press": None, "kv_quant": "none"})
    s = report.render(tmp_path, plots=False)
    assert [r["gsm8k_acc"] for r in s["overview"]["0"]] == [0.41, 0.175]
    assert s["goals"] == []  # not "no variant reaches 4x here": compression and PPL were not measured


def test_include_reads_other_folders_with_each_folders_own_baseline(tmp_path, capsys):
    """``eval report --include``: one overview over several folders. A key shown by the output folder (or an earlier
    --include) hides later copies, and each delta is against the variant's own folder's full cache: here folder B's
    full cache scored a 10% higher PPL (another commit), and B's variant is compared with that, not with A's."""
    from mspeckv import cli

    a, b = tmp_path / "A", tmp_path / "B"
    shutil.copytree(FIXTURE, a)
    shutil.copytree(FIXTURE, b)
    for p in (b / "cells").glob("*.json"):
        c = json.loads(p.read_text())
        if c["variant"] == INT8:
            c["variant"] = "B-variant"
        elif c["metric"] == "ppl":
            c["results"]["ppl"] *= 1.1
        elif c["metric"] == "speed":
            c["results"]["kv_bytes"] *= 2  # B's full cache held twice the bytes: B-variant's compression doubles
        p.write_text(json.dumps(c))
    out = tmp_path / "overview"
    s = report.render(out, plots=False, include=[a, b])
    rows = {(r["metric"], r["variant"], r["context"]): r for r in s["rows"]}
    base_a = json.loads((a / "cells" / "ppl__full__ctx=128.json").read_text())["results"]["ppl"]
    assert rows[("ppl", "full", 128)]["value"] == pytest.approx(base_a)  # A's copy shown, B's hidden
    bv = rows[("ppl", "B-variant", 128)]
    assert bv["baseline"] == pytest.approx(1.1 * base_a) and bv["source"] == str(b)
    assert bv["delta_pct"] == pytest.approx(100 * (bv["value"] / (1.1 * base_a) - 1))
    assert rows[("ppl", INT8, 128)]["baseline"] == pytest.approx(base_a)
    over = {r["config"]: r for r in s["overview"]["128"]}
    assert over["B-variant"]["sources"] == [str(b)] and over[INT8]["sources"] == [str(a)]
    assert over["B-variant"]["ppl_delta_pct"] == pytest.approx(bv["delta_pct"])
    assert over["B-variant"]["compression"] == pytest.approx(2 * over[INT8]["compression"])
    assert s["n_cells"] == 14 + 7  # B's 7 baseline cells are hidden by A's
    assert "| folder |" in (out / "summary.md").read_text()
    # a folder without a baseline of its own is compared with the shown one
    c = tmp_path / "C"
    shutil.copytree(b, c)
    for p in (c / "cells").glob("*.json"):
        cell = json.loads(p.read_text())
        if cell["variant"] == "full":
            p.unlink()
        else:
            cell["variant"] = "C-variant"
            p.write_text(json.dumps(cell))
    rows = {(r["metric"], r["variant"], r["context"]): r for r in report.render(tmp_path / "o1", plots=False,
                                                                                   include=[a, c])["rows"]}
    assert rows[("ppl", "C-variant", 128)]["baseline"] == pytest.approx(base_a)
    assert cli.main(["eval", "report", "--output-dir", str(tmp_path / "o2"), "--include", str(a), "--no-plots"]) == 0
    capsys.readouterr()
    assert cli.main(["eval", "report", "--output-dir", str(tmp_path / "o3"), "--include", str(tmp_path)]) == 2
    assert "not an evaluation folder" in capsys.readouterr().err
    assert cli.main(["eval", "ppl", "--output-dir", str(tmp_path / "o4"), "--include", str(a)]) == 2
    assert "--include is for 'eval report' only" in capsys.readouterr().err


def test_compression_from_the_ppl_prefix_compares_prefix_with_prefix(tmp_path):
    """A variant without a speed cell gets its bytes from the ppl prefix (†); the baseline's bytes must then come from
    its ppl prefix too, not from its speed cell (the whole context), which would overstate the compression."""
    d = tmp_path / "run"
    shutil.copytree(FIXTURE, d)
    (d / "cells" / "speed__kv=int8-g16-res16-onchip0__ctx=128.json").unlink()
    s = report.render(d, plots=False)
    over = {r["config"]: r for r in s["overview"]["128"]}
    ppl = {c["variant"]: c["results"] for c in CellStore(d).all() if c["metric"] == "ppl"}
    assert over[INT8]["bytes_from_ppl_prefix"] and not over["full"]["bytes_from_ppl_prefix"]
    assert over[INT8]["compression"] == pytest.approx(ppl["full"]["kv_bytes_prefix"] / ppl[INT8]["kv_bytes_prefix"])
    assert over[INT8]["bytes_per_token"] == pytest.approx(ppl[INT8]["kv_bytes_prefix"] / ppl[INT8]["prefix_tokens"])


def test_plot_series_are_press_families():
    """ppl_vs_compression draws one series per family: a press's name, 'preset', or 'offload' for a placement."""
    from mspeckv.evals.plots import family, short

    assert family({"press": "snapkv:budget=0.25", "kv_quant": "none"}, "snapkv:budget=0.25") == "snapkv"
    assert family({"press": "aggressive", "kv_quant": "none"}, "aggressive") == "preset"
    assert family({"press": None, "kv_quant": "int4"}, INT8) == "offload"
    assert family({"press": None, "kv_quant": "none"}, "full") == "full"
    assert short("lowrank:calib=/root/calib15,rank=32") == "lowrank:rank=32"
    assert short("kv=int8/g64/res64/onchip0") == "int8"
    assert short("hybrid:retain=0.25,k_bits=4,v_bits=4,guard=0,window=128") == "hybrid:0.25,k4,v4,w128"


def _cell(d, metric, variant, ctx):
    name = f"{metric}__{variant.replace('/', '-')}__ctx={ctx}.json"
    return json.loads((d / "cells" / name).read_text())


def _add(d, metric, variant, ctx, results, src_ctx, src_metric=None, src_variant=None):
    """Write a cell: a copy of a fixture cell (src_metric, src_variant, src_ctx) with these fields."""
    c = _cell(d, src_metric or metric, src_variant or variant, src_ctx)
    c["metric"], c["variant"], c["context"], c["results"] = metric, variant, ctx, results
    (d / "cells" / f"{metric}__{variant.replace('/', '-')}__ctx={ctx}.json").write_text(json.dumps(c))


def test_overview_columns_equal_the_cells(tmp_path):
    """Every overview column is the value of the right cell at the right context (the issue's Table 1): speed's tok/s,
    TTFT and TPOT, KL and top-1 agreement, needle, RULER and GSM8K accuracy, and the markdown shows them."""
    d = tmp_path / "run"
    shutil.copytree(FIXTURE, d)
    for v, acc in (("full", 0.9), (INT8, 0.7)):
        _add(d, "needle", v, 128, {"accuracy": acc, "n": 10, "accuracy_by_depth": {"0.5": acc}}, src_ctx=560)
        _add(d, "ruler", v, 128, {"accuracy": acc / 2, "multikey_accuracy": acc, "vartrack_score": 0.0},
             src_ctx=560, src_metric="needle")
    # a variant with cells at another context only (listed first) is left out of this context's table, not the end
    _add(d, "accept", "aaa", 999, {"l1_acceptance_rate": 0.5}, src_ctx=128, src_metric="kl", src_variant=INT8)
    s = report.render(d, plots=False)
    assert "aaa" in [r["config"] for r in s["overview"]["999"]]
    over = {r["config"]: r for r in s["overview"]["128"]}
    assert list(over) == ["full", INT8]
    for v in ("full", INT8):
        r, sp, kl = over[v], _cell(d, "speed", v, 128)["results"], _cell(d, "kl", v, 128)["results"]
        assert (r["tok_per_s"], r["ttft_s"], r["tpot_s"]) == (sp["tok_per_s"], sp["ttft_s"], sp["tpot_s"])
        assert (r["kl"], r["top1_agreement"]) == (kl["kl_mean"], kl["top1_agreement"])
        assert r["needle_acc"] == _cell(d, "needle", v, 128)["results"]["accuracy"]
        assert r["ruler_acc"] == _cell(d, "ruler", v, 128)["results"]["accuracy"]
        assert r["gsm8k_acc"] == _cell(d, "gsm8k", v, 0)["results"]["accuracy"]
        assert r["bytes_per_token"] == pytest.approx(sp["kv_bytes"] / 128) and not r["bytes_from_ppl_prefix"]
        ppl, base = _cell(d, "ppl", v, 128)["results"]["ppl"], _cell(d, "ppl", "full", 128)["results"]["ppl"]
        assert r["ppl_delta_pct"] == pytest.approx(100 * (ppl / base - 1))
    md = report.overview_markdown(s)
    r = over[INT8]
    row = next(line for line in md.splitlines() if line.startswith(f"| {INT8} |"))
    cols = [c.strip() for c in row.strip("|").split("|")]
    assert cols[4:7] == [f"{r['tok_per_s']:.1f}", f"{r['ttft_s']:.3f}", f"{1e3 * r['tpot_s']:.1f}"]
    assert cols[8:12] == [f"{r['kl']:.4f}", "70.0", "35.0", f"{100 * r['gsm8k_acc']:.1f}"]


@pytest.mark.parametrize("keep, contexts", [(("needle", "ruler"), ["560", "700"]), (("gsm8k",), ["0"])])
def test_overview_contexts_when_no_ppl_or_speed_cell(tmp_path, keep, contexts):
    """Without ppl/speed/kl/accept cells the overview's tables are the retrieval contexts, else the GSM8K prompts."""
    d = tmp_path / "run"
    shutil.copytree(FIXTURE, d)
    for p in (d / "cells").glob("*.json"):
        if json.loads(p.read_text())["metric"] not in keep:
            p.unlink()
    s = report.render(d, plots=False)
    assert list(s["overview"]) == contexts
    assert {r["config"] for rows in s["overview"].values() for r in rows} == {"full", INT8}
