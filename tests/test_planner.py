"""The quality-aware planner (evals/planner.py) and ``mspeckv plan --lossless | --max-ppl-delta``, on tiny result
folders written here: memory edges, the lossless rule, the interval's upper end, ranking, "no measurement"."""

import dataclasses
import json
import math

import pytest

from mspeckv.cache import batch_memory, offload_placement, weight_bytes
from mspeckv.cli import main
from mspeckv.evals import planner as P
from mspeckv.evals.goals import paired_interval
from mspeckv.model.api import model_config

M = "random:tiny"
CTX, B, GEN = 2000, 64, 16
CFG = model_config(M)


def batch_json(root, name, model, rows, *, gen=GEN, window=8, when="2026-12-01T00:00:00+00:00", card="NVIDIA H100"):
    d = root / "bench" / name
    d.mkdir(parents=True)
    rows = [{"runs": 2, "errors": [], "device_name": card, **r} for r in rows]
    (d / "batch.json").write_text(json.dumps({"bench": "batch", "config": {"model": model, "gen_len": gen,
                                                                            "offload_gen_len": gen, "window": window},
                                              "rows": rows, "device_name": card, "meta": {"timestamp": when}}))
    return d / "batch.json"


def ppl_cell(root, folder, variant, ctx, nll, *, model=M, dataset="pycode", press=None, kv_quant="none",
             kv_bytes=1000.0, per_window=True):
    d = root / "quality" / folder / "cells"
    d.mkdir(parents=True, exist_ok=True)
    res = {"ppl": math.exp(sum(nll) / len(nll)), "kv_bytes_prefix": kv_bytes, "window_docs": ["a", "b", "c", "d"]}
    if per_window:
        res["window_nll"] = nll
    cell = {"metric": "ppl", "variant": variant, "context": ctx, "status": "ok", "results": res,
            "settings": {"model": model, "dataset": dataset},
            "variant_info": {"press": press, "kv_quant": kv_quant}}
    f = d / f"ppl__{variant.replace(':', '-')}__ctx={ctx}.json"
    f.write_text(json.dumps(cell))
    return cell


def press_pair(root, folder, press, shift, *, ctx=CTX, **kw):
    """A full cell and a press cell whose windows' NLL differ by ``shift`` (+ a little noise)."""
    base = [1.0, 1.2, 0.9, 1.1]
    ppl_cell(root, folder, "full", ctx, base, dataset=kw.get("dataset", "pycode"), model=kw.get("model", M))
    return ppl_cell(root, folder, press, ctx, [b + shift + 0.002 * i for i, b in enumerate(base)], press=press,
                    kv_bytes=250.0, **kw)


@pytest.fixture
def results(tmp_path):
    batch_json(tmp_path, "run", M, [
        {"method": "ar", "cell": f"{CTX}x{B}", "decode_tok_per_s": 1000.0},
        {"method": "spec", "cell": f"self:3@{CTX}x{B}", "decode_tok_per_s": 1500.0},
        {"method": "spec", "cell": f"self:2:w4@{CTX}x{B}", "decode_tok_per_s": 800.0},
        {"method": "press", "cell": f"kivi:k_bits=4,v_bits=4@{CTX}x{B}", "decode_tok_per_s": 3000.0},
        {"method": "ragged", "cell": "10-20", "decode_tok_per_s": 9e9},
    ])
    press_pair(tmp_path, "q", "kivi:k_bits=4,v_bits=4", 0.002)  # about +0.5%, upper end under 1%
    return tmp_path


def req(**kw):
    return P.PlanRequest(**{"model": M, "context": CTX, "batch": B, "gpu_memory": 80.0, "gen_len": GEN,
                            "card": "H100", "draft": M, **kw})


def run_plan(root, **kw):
    return P.plan(req(**kw), CFG, P.load_speed(root), P.load_quality(root), draft_cfg=CFG)


def names(cands):
    return [x.name for x in cands]


def test_loaders_read_cells_and_keys(results):
    sp = P.load_speed(results)
    assert sorted((c.kind, c.key) for c in sp) == sorted([("ar", ""), ("spec", "self:3:w8"), ("spec", "self:2:w4"),
                                                          ("press", P.press_key("kivi:k_bits=4,v_bits=4"))])
    assert all(c.context == CTX and c.batch == B and c.gen_len == GEN for c in sp)
    (q,) = P.load_quality(results)
    cells = {p.name: json.loads(p.read_text()) for p in (results / "quality" / "q" / "cells").iterdir()}
    full, var = cells["ppl__full__ctx=2000.json"], next(c for n, c in cells.items() if "kivi" in n)
    assert q.ci == paired_interval(var, full) and q.ci[0] < q.delta_pct < q.ci[1] < 1.0
    assert q.delta_pct == pytest.approx(100 * (var["results"]["ppl"] / full["results"]["ppl"] - 1))
    assert q.compression == 4.0


def test_memory_filter_edges(results):
    ar = batch_memory(CFG, B, CTX + GEN, 2)["total"]
    at = run_plan(results, lossless=True, gpu_memory=ar / 1e9)
    assert "AR (all KV on the GPU)" in names(at.ranked)  # exactly the bytes it needs: fits
    below = run_plan(results, lossless=True, gpu_memory=(ar - 1) / 1e9)
    assert "AR (all KV on the GPU)" not in names(below.ranked)
    why = next(x.why for x in below.excluded if x.kind == "ar")
    assert why.startswith("needs") and "GB" in why
    # speculation needs its slack rows on top: at AR's bytes every speculation configuration is out
    assert not [x for x in at.ranked if x.kind == "spec"]
    assert all(x.gpu_bytes > ar for x in at.excluded if x.kind == "spec")
    # below AR, the bf16 offload placement of bench batch --offload is offered, within the budget
    off = next(x for x in below.ranked if x.kind == "offload")
    n = offload_placement(CFG, weight_bytes(CFG, 2), B, CTX + GEN, 2, (ar - 1) / 1e9).n_on_chip(CFG.n_layers)
    layer = batch_memory(CFG, B, CTX + GEN, 2)["kv"] // CFG.n_layers
    assert off.gpu_bytes == weight_bytes(CFG, 2) + (2 << 30) + (n + 2) * layer <= ar - 1  # n layers + 2 staging
    assert f"{n} of {CFG.n_layers} layers" in off.name
    assert not [x for x in at.ranked + at.excluded if x.kind in ("offload", "placed")]  # AR fits: no offload


def test_lossless_excludes_every_press_and_quantized_placement(results):
    ar = batch_memory(CFG, B, CTX + GEN, 2)["total"]
    for gb in (80.0, (ar - 1) / 1e9):
        res = run_plan(results, lossless=True, gpu_memory=gb)
        assert all(x.lossless and x.kind in ("ar", "spec", "offload") for x in res.ranked)
        lossy = [x for x in res.excluded if x.kind in ("press", "placed")]
        assert lossy and all(x.why.startswith("lossy") for x in lossy)
        assert {P.press_key(s) for s in P.DEFAULT_PRESSES} <= {x.key for x in lossy}
    # the same press, fastest of all and well within 1%, is admitted (and first) under --max-ppl-delta 1
    assert run_plan(results, max_ppl_delta=1.0).ranked[0].kind == "press"


def test_interval_upper_end_rule(tmp_path):
    press_pair(tmp_path, "a", "snapkv:budget=0.25", 0.002)  # point ~+0.5%, upper end < 1
    ppl_cell(tmp_path, "b", "full", CTX, [1.0, 1.2, 0.9, 1.1])  # point ~+0.5%, but a noisy window: upper end > 1
    ppl_cell(tmp_path, "b", "h2o:budget=0.25", CTX, [0.99, 1.232, 0.894, 1.104], press="h2o:budget=0.25")
    press_pair(tmp_path, "c", "streaming:budget=0.25", -0.01, dataset=None)  # bbc: never judges
    press_pair(tmp_path, "d", "pyramidkv:budget=0.25", -0.01, per_window=False)  # no interval
    press_pair(tmp_path, "e", "adakv:budget=0.25", -0.01, model="random:llama-68m")  # another model only
    qs = {q.variant: q for q in P.load_quality(tmp_path)}
    snap, h2o = qs["snapkv:budget=0.25"], qs["h2o:budget=0.25"]
    assert snap.ci[1] < 1.0 and h2o.delta_pct < 1.0 < h2o.ci[1]
    res = P.plan(req(max_ppl_delta=1.0), CFG, [], list(qs.values()), draft_cfg=CFG)
    ok, out = names(res.ranked), {x.name: x.why for x in res.excluded}
    assert "snapkv:budget=0.25" in ok
    assert out["h2o:budget=0.25"].startswith("PPL Δ upper end") and "> 1%" in out["h2o:budget=0.25"]
    assert "bbc" in out["streaming:budget=0.25"]
    assert "no interval" in out["pyramidkv:budget=0.25"]
    assert out["adakv:budget=0.25"] == f"no quality measurement of {P.press_key('adakv:budget=0.25')} for {M}"
    assert "no quality measurement" in out["kivi:k_bits=8,v_bits=8"]
    # the bound is inclusive: X equal to the upper end admits
    assert "h2o:budget=0.25" in names(P.plan(req(max_ppl_delta=h2o.ci[1]), CFG, [], list(qs.values()),
                                             draft_cfg=CFG).ranked)
    # the nearest context judges; a farther one does not
    press_pair(tmp_path, "f", "snapkv:budget=0.25", 0.5, ctx=1900)
    res = P.plan(req(max_ppl_delta=1.0, context=1900), CFG, [], P.load_quality(tmp_path), draft_cfg=CFG)
    assert "snapkv:budget=0.25" not in names(res.ranked)


def test_ranking_and_top(results):
    res = run_plan(results, lossless=True)
    measured = [x for x in res.ranked if x.speed.tok_per_s is not None]
    assert [x.speed.tok_per_s for x in measured] == [1500.0, 1000.0, 800.0]
    assert names(measured) == ["self:3:w8", "AR (all KV on the GPU)", "self:2:w4"]
    assert res.ranked[: len(measured)] == tuple(measured)  # every unmeasured one after the measured
    assert res.top.name == "self:3:w8" and res.top.speed.distance == "exact"
    assert res.top.speed.cell.cell == f"rows[method=spec, cell=self:3@{CTX}x{B}]"
    empty = P.plan(req(lossless=True), CFG, [], [], draft_cfg=CFG)
    assert empty.top is None and empty.ranked  # candidates, none measured: no top choice


def test_no_measurement_and_distance_labels(results, tmp_path):
    sp = P.load_speed(results)
    far = P.nearest_speed(req(context=int(CTX * 1.3)), "ar", "", sp, P.same_shape)
    assert far.tok_per_s is None and far.distance.startswith("no measurement")
    assert P.nearest_speed(req(batch=B // 2), "ar", "", sp, P.same_shape).tok_per_s is None
    assert P.nearest_speed(req(gen_len=GEN * 3), "ar", "", sp, P.same_shape).tok_per_s is None
    near = P.nearest_speed(req(context=CTX + 100), "ar", "", sp, P.same_shape)
    assert near.tok_per_s == 1000.0 and near.distance == f"context {CTX}"
    res = run_plan(results, lossless=True)
    assert P.speed_text(next(x for x in res.ranked if x.name == "self:4:w2048")) == "no measurement"
    # another model of the same shape predicts AR, labelled; never speculation (acceptance depends on weights)
    other = "random:llama-68m"
    sp2 = [dataclasses.replace(c, model="twin") for c in sp]
    twin = {"twin", M}
    same = lambda a, b: {a, b} <= twin  # noqa: E731
    ar = P.nearest_speed(req(), "ar", "", sp2, same)
    assert ar.tok_per_s == 1000.0 and "model twin (same shape)" in ar.distance
    assert P.nearest_speed(req(), "spec", "self:3:w8", sp2, same).tok_per_s is None
    assert P.nearest_speed(req(model=other), "ar", "", sp2, same).tok_per_s is None
    # the same card is preferred; then the newest run
    batch_json(tmp_path, "h200", M, [{"method": "ar", "cell": f"{CTX}x{B}", "decode_tok_per_s": 7.0}],
               card="NVIDIA H200", when="2026-12-05T00:00:00+00:00")
    batch_json(tmp_path, "new", M, [{"method": "ar", "cell": f"{CTX}x{B}", "decode_tok_per_s": 9.0}],
               when="2026-12-04T00:00:00+00:00")
    batch_json(tmp_path, "old", M, [{"method": "ar", "cell": f"{CTX}x{B}", "decode_tok_per_s": 8.0}],
               when="2026-12-03T00:00:00+00:00")
    sp3 = P.load_speed(tmp_path / "bench")
    assert P.nearest_speed(req(), "ar", "", sp3, P.same_shape).tok_per_s == 9.0
    h200 = P.nearest_speed(req(card="H200"), "ar", "", sp3, P.same_shape)
    assert h200.tok_per_s == 7.0 and h200.distance == "exact"
    assert "card NVIDIA H200" in P.nearest_speed(req(card="B200"), "ar", "", sp3, P.same_shape).distance


def test_request_refuses_bad_input():
    with pytest.raises(ValueError, match="not both"):
        req(lossless=True, max_ppl_delta=1.0)
    for bad in ({"max_ppl_delta": -0.1}, {"max_ppl_delta": float("nan")}, {"gpu_memory": 0}, {"context": 0},
                {"batch": -1}, {"gen_len": 0}):
        with pytest.raises(ValueError):
            req(**bad)


def test_check_commands(results):
    res = run_plan(results, lossless=True)
    (cmd,) = P.check_commands(res)
    assert cmd.startswith(f"mspeckv bench batch --model {M} --contexts {CTX} --batches {B} --gen-len {GEN} ")
    assert cmd.endswith(f"--spec self:3:w8@{CTX}x{B}") and "--gpu-memory 80" in cmd and "--dataset" not in cmd
    top_press = run_plan(results, max_ppl_delta=1.0)
    bench, ppl = P.check_commands(top_press)
    assert f"--presses kivi:k_bits=4,v_bits=4@{CTX}x{B} " in bench and "--batches 1" in bench
    assert ppl.startswith(f"mspeckv eval ppl --model {M} --dataset pycode --context {CTX}")
    assert P.check_commands(P.plan(req(lossless=True), CFG, [], [], draft_cfg=CFG)) == []


def cli(results, *flags):
    return main(["plan", "--model", M, "--context", str(CTX), "--batch", str(B), "--gen-len", str(GEN),
                 "--gpu-memory", "80", "--draft", M, "--results", str(results), *flags])


def test_cli_plan_table_json_and_check(results, capsys):
    assert cli(results, "--lossless", "--check") == 0
    out = capsys.readouterr().out.strip().splitlines()
    row = json.loads(out[-1])
    assert row["top"]["name"] == "self:3:w8" and row["top"]["predicted_tok_per_s"] == 1500.0
    assert row["top"]["speed_source"].endswith("batch.json") and row["top"]["speed_cell"].startswith("rows[")
    assert any("| self:3:w8 |" in x and "1,500 measured at" in x for x in out)
    assert any(x.strip() == row["check"][0] for x in out)
    assert cli(results, "--max-ppl-delta", "1", "--json") == 0
    (line,) = capsys.readouterr().out.strip().splitlines()
    assert json.loads(line)["top"]["kind"] == "press"
    # without the new flags: the placement plan as before
    assert main(["plan", "--model", M, "--context", "1000", "--gpu-kv-budget", "0.003"]) == 0
    assert "gpu_kv_budget_bytes" in json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.mark.parametrize("flags, msg", [
    (["--lossless", "--max-ppl-delta", "1"], "not both"),
    (["--max-ppl-delta", "-1"], "max-ppl-delta"),
    (["--max-ppl-delta", "nan"], "max-ppl-delta"),
    (["--json"], "give --lossless or --max-ppl-delta"),
    (["--lossless", "--model", "random:nope"], "unknown random shape"),
    (["--lossless", "--draft", "random:nope"], "unknown random shape"),
    (["--lossless", "--gpu-kv-budget", "1"], "--gpu-kv-budget would be ignored"),
    (["--lossless", "--tp", "2"], "--tp would be ignored"),
    (["--lossless", "--gen-len", "5000"], "positions"),
])
def test_cli_plan_errors_before_loading(results, capsys, monkeypatch, flags, msg):
    def boom(*a, **k):
        raise AssertionError("results read before the input was checked")

    monkeypatch.setattr(P, "load_speed", boom)
    monkeypatch.setattr(P, "load_quality", boom)
    assert cli(results, *flags) == 2
    err = capsys.readouterr().err
    assert err.startswith("mspeckv: error:") and msg in err and len(err.strip().splitlines()) == 1


def test_cli_placement_plan_refuses_the_quality_flags(capsys):
    assert main(["plan", "--model", M, "--context", "1000", "--gpu-kv-budget", "0.003", "--gen-len", "64",
                 "--card", "H200"]) == 2
    assert "--gen-len, --card would be ignored" in capsys.readouterr().err


def test_cli_plan_needs_gpu_memory_and_results(tmp_path, capsys):
    assert main(["plan", "--model", M, "--context", "100", "--lossless"]) == 2
    assert "needs --gpu-memory" in capsys.readouterr().err
    assert main(["plan", "--model", M, "--context", "100", "--lossless", "--gpu-memory", "8",
                 "--results", str(tmp_path / "none")]) == 2
    assert "no bench/ or quality/ folder" in capsys.readouterr().err


def test_verify_against_a_check_run(results, tmp_path_factory):
    res = run_plan(results, lossless=True)  # top: self:3:w8 at 1500 tok/s
    runs = tmp_path_factory.mktemp("runs")
    assert P.verify(res, runs)["speed"].startswith("no run of it")
    batch_json(runs, "near", M, [{"method": "spec", "cell": f"self:3@{CTX}x{B}", "decode_tok_per_s": 1400.0},
                                 {"method": "spec", "cell": f"self:3@{CTX}x{B * 2}", "decode_tok_per_s": 1500.0}])
    v = P.verify(res, runs)
    assert v["speed"] == "met" and v["measured_tok_per_s"] == 1400.0 and v["ratio"] == pytest.approx(1500 / 1400)
    assert v["quality"].startswith("lossless")
    batch_json(runs, "later", M, [{"method": "spec", "cell": f"self:3@{CTX}x{B}", "decode_tok_per_s": 1250.0}],
               when="2026-12-09T00:00:00+00:00")  # the newest run decides: 1500 / 1250 = 1.2
    assert P.verify(res, runs)["speed"] == "MISSED"
    with pytest.raises(ValueError, match="nothing to verify"):
        P.verify(P.plan(req(lossless=True), CFG, [], [], draft_cfg=CFG), runs)
    # a press: its new PPL Δ must fall inside the interval it was admitted by
    top = run_plan(results, max_ppl_delta=1.0)
    lo, hi = top.top.quality.ci
    q = tmp_path_factory.mktemp("q")
    press_pair(q, "in", "kivi:k_bits=4,v_bits=4", 0.001)  # +0.4%: inside
    assert P.verify(top, q)["quality"].startswith("met") and lo < 0.4 < hi
    q2 = tmp_path_factory.mktemp("q2")
    press_pair(q2, "out", "kivi:k_bits=4,v_bits=4", 0.05)  # +5%: outside
    assert P.verify(top, q2)["quality"].startswith("MISSED")


def test_cli_verify(results, tmp_path_factory, capsys):
    runs = tmp_path_factory.mktemp("runs")
    batch_json(runs, "r", M, [{"method": "spec", "cell": f"self:3@{CTX}x{B}", "decode_tok_per_s": 1450.0}])
    assert cli(results, "--lossless", "--verify", str(runs)) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert json.loads(out[-1])["verify"]["speed"] == "met" and any(x.startswith("Verified against") for x in out)
    assert cli(results, "--lossless", "--verify", str(runs / "missing")) == 2
    assert "no such folder" in capsys.readouterr().err
