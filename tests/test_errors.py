"""Bad input gives one clear error (never wrong output or a traceback): configs, caches, CLI checks before the model
loads, ignored flags, main()'s one-line errors, model cache integrity and partial sweep reports."""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import pytest
import torch

from mspeckv import cli
from mspeckv.bench.decode import DecodeBenchConfig
from mspeckv.bench.placement import PlacementBenchConfig
from mspeckv.bench.spec import SpecBenchConfig
from mspeckv.cache import make_cache
from mspeckv.config import GenerationConfig, SamplingConfig
from mspeckv.decoding.autoregressive import generate
from mspeckv.decoding.speculative import SpecConfig, speculative_generate
from mspeckv.kv.dense import DenseKV
from mspeckv.kv.placement import Placement
from mspeckv.validate import ConfigError, flag_names
from tests.test_loading import cache, fake, write_tiny_gguf  # noqa: F401  (fixtures)
from tests.test_sweeps import tiny_dirs  # noqa: F401  (fixture)
from tests.tiny import tiny_model


def _err(capsys) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mspeckv"), err
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture
def no_load(monkeypatch):
    """Fail the test if a command loads model weights (its checks must come first)."""
    import mspeckv.model.api as api

    def boom(*a, **k):
        raise AssertionError("the model was loaded before the checks")

    monkeypatch.setattr(api, "load", boom)
    monkeypatch.setattr(api, "load_any", boom)


# ------------------------------------------------------------------------------------------------ config classes
@pytest.mark.parametrize("make, match", [
    (lambda: Placement(on_chip="4"), r"on_chip must be an integer >= 0 \(or None\), got '4'"),
    (lambda: Placement(on_chip=True), "on_chip must be an integer"),
    (lambda: Placement(kv_group_size=0), r"kv_group_size must be an integer >= 1, got 0"),
    (lambda: SamplingConfig(temperature=math.nan), "temperature must be a finite number >= 0, got nan"),
    (lambda: SamplingConfig(top_p=math.inf), r"top_p must be a finite number in \(0, 1\], got inf"),
    (lambda: SamplingConfig(top_k=1.5), "top_k must be an integer"),
    (lambda: GenerationConfig(max_new_tokens=True), "max_new_tokens must be an integer >= 1, got True"),
    (lambda: GenerationConfig(stop_on_eos=1), "stop_on_eos must be True or False"),
    (lambda: SpecConfig(gamma=0), "gamma must be an integer >= 1, got 0"),
    (lambda: SpecConfig(mode="mspeckv", gamma=300), "streaming window is -60 tokens"),
    (lambda: SpecConfig(drafter="lookup"), "drafter must be one of model, ngram"),
    (lambda: DecodeBenchConfig(repeats=True), "repeats must be an integer >= 2"),
    (lambda: SpecBenchConfig(repeats=0), "repeats must be an integer >= 1, got 0"),
    (lambda: SpecBenchConfig(modes=("ar", "fast")), "modes must be a non-empty tuple of distinct values"),
    (lambda: PlacementBenchConfig(contexts=(8, 8)), "contexts must be a non-empty tuple of distinct integers"),
])
def test_config_types_and_ranges(make, match):
    with pytest.raises(ConfigError, match=match):
        make()


def test_config_messages_use_flags_in_the_cli_and_fields_in_the_api():
    with pytest.raises(ConfigError, match="^on_chip must"):
        Placement(on_chip=-1)
    with flag_names(), pytest.raises(ConfigError, match="^--on-chip must"):
        Placement(on_chip=-1)
    with flag_names(), pytest.raises(ConfigError, match="^--contexts must"):
        SpecBenchConfig(prefills=())


def test_vanilla_has_no_draft_window():
    assert SpecConfig(mode="vanilla", gamma=300).gamma == 300  # the window belongs to the hierarchy only


def test_load_dtype_names(tiny_dirs):  # noqa: F811
    from mspeckv.model.api import load_model, parse_dtype

    assert parse_dtype("float16") is torch.float16 and parse_dtype("bf16") is torch.bfloat16
    with pytest.raises(ValueError, match="dtype must be one of"):
        parse_dtype("half-ish")
    model, _ = load_model(tiny_dirs[0], "cpu", dtype="float16")
    assert model.dtype == torch.float16


# -------------------------------------------------------------------------------------------------------- caches
def test_cache_inputs():
    m = tiny_model()
    gen = GenerationConfig(max_new_tokens=4)
    ids = torch.randint(3, 97, (1, 8))
    with pytest.raises(ConfigError, match="batch must be an integer >= 1, got 0"):
        make_cache(m, Placement(), 0, 16)
    with pytest.raises(ConfigError, match="batch must be an integer >= 1, got 0"):
        make_cache(m, Placement(on_chip=1), 0, 16)
    with pytest.raises(ValueError, match=r"built for batch 2 but input_ids has 1 row"):
        generate(m, ids, gen, cache=DenseKV.for_model(m, 2, 16))
    with pytest.raises(ValueError, match="token id 97 is outside this model's vocabulary of 97"):
        generate(m, torch.tensor([[5, 97]]), gen)
    with pytest.raises(ValueError, match="token id -1 is outside"):
        m.prefill(torch.tensor([[-1, 5]]), DenseKV.for_model(m, 1, 8))
    with pytest.raises(ValueError, match="the prompt is empty"):
        generate(m, torch.zeros(1, 0, dtype=torch.long), gen)
    with pytest.raises(ValueError, match="the prompt is empty"):
        speculative_generate(m, tiny_model(seed=1), torch.zeros(1, 0, dtype=torch.long), gen, SpecConfig())
    with pytest.raises(ValueError, match="integer token ids"):
        generate(m, ids.float(), gen)


# ------------------------------------------------------------------------------- CLI: checked before the model loads
BIN = b"\xff\xfe\x00binary"


@pytest.mark.parametrize("argv, match", [
    (["generate", "--prompt", ""], "--prompt is empty"),
    (["generate", "--prompt-file", "{tmp}"], "is not a file"),
    (["generate", "--prompt-file", "{tmp}/empty.txt"], "empty.txt is empty"),
    (["generate", "--prompt-file", "{tmp}/binary.txt"], "binary.txt is not UTF-8 text"),
    (["generate", "--prompt-file", "{tmp}/none.txt"], "none.txt does not exist"),
    (["generate", "--prompt", "x", "--temperature", "nan"], "--temperature must be a finite number >= 0, got nan"),
    (["generate", "--prompt", "x", "--max-new-tokens", "0"], "--max-new-tokens must be an integer >= 1"),
    (["generate", "--prompt", "x", "--kv-quant", "int8"], "--kv-quant would be ignored: .* without --on-chip"),
    (["generate", "--prompt", "x", "--on-chip", "1", "--resident-policy", "static"], "--resident-policy would be"),
    (["generate", "--prompt", "x", "--top-p", "0.9"], "--top-p would be ignored: decoding is greedy"),
    (["generate", "--prompt", "x", "--greedy", "--temperature", "0.5"], "--temperature would be ignored"),
    (["generate", "--prompt", "x", "--gamma", "3"], "--gamma would be ignored: --mode ar"),
    (["generate", "--prompt", "x", "--mode", "vanilla", "--budget", "64"], "--budget would be ignored"),
    (["generate", "--prompt", "x", "--mode", "vanilla", "--drafter", "ngram", "--draft", "y"],
     "--draft would be ignored: --drafter ngram"),
    (["bench", "decode", "--model", "random:tiny", "--on-chip", "2", "--gamma", "2"],
     r"bench decode: error: unrecognized arguments: --on-chip 2 --gamma 2 \(see 'mspeckv bench decode --help'\)"),
    (["bench", "decode", "--model", "random:tiny", "--out", "{tmp}"], "--out .* is a folder"),
    (["bench", "decode", "--model", "random:tiny", "--out", "{tmp}/binary.txt/x.json"], "is a file, so no folder"),
    (["bench", "decode", "--model", "random:tiny", "--prompt-len", "4000", "--gen-len", "200"],
     "--gen-len 200 plus --prompt-len 4000 exceeds the model's maximum context of 4096"),
    (["bench", "spec", "--repeats", "0"], "--repeats must be an integer >= 1, got 0"),
    (["bench", "spec", "--contexts", "8,,16"], "--contexts '8,,16' has an empty item"),
    (["bench", "spec", "--modes", "ar,fast"], "--modes: 'fast' is not one of ar, vanilla, mspeckv"),
    (["bench", "spec", "--out-dir", "{tmp}/binary.txt"], "--out-dir .* is a file"),
    (["bench", "placement", "--formats", "int8,fp8"], "--formats: 'fp8' is not one of none, int8, int4, int2"),
    (["plan", "--model", "random:tiny", "--context", "10", "--gpu-kv-budget", "nan"],
     "--gpu-kv-budget must be a finite number > 0, got nan"),
    (["plan", "--model", "random:tiny", "--context", "1000000", "--gpu-kv-budget", "1"],
     "--context 1000000 is beyond random:tiny's maximum context of 4096"),
    (["sweep", "context", "--seeds", "1,,2", "--target", "random:tiny", "--draft", "random:tiny"],
     "--seeds '1,,2' has an empty item"),
    (["sweep", "context", "--target", "random:tiny", "--draft", "random:tiny", "--output-dir", "{tmp}/binary.txt",
      "--quick", "--device", "cpu", "--prefill-lengths", "64", "--budget", "16", "--on-chip", "2"],
     "--output-dir .* is a file"),
    (["sweep", "context", "--target", "random:tiny", "--methods", "baseline", "--budget", "64"],
     "--budget would be ignored: only the mspeckv methods read them"),
    (["sweep", "context", "--target", "random:tiny", "--methods", "baseline,mspeckv", "--kv-quant", "int4"],
     "--kv-quant would be ignored: only the mspeckv_kv_quant method"),
    (["sweep", "context", "--target", "random:tiny", "--greedy", "--top-p", "0.5"], "--top-p would be ignored"),
    (["demo", "--mode", "ar"], "demo compares AR with a speculative mode"),
    (["report", "{tmp}/nowhere"], "nowhere is not a folder, so there is no run directory"),
    (["models", "list", "--force"], "--force would be ignored"),
    (["generate"], "one of the arguments --prompt --prompt-file --prompts is required"),
])
def test_cli_refuses_before_loading(argv, match, tmp_path, capsys, no_load):
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "binary.txt").write_bytes(BIN)
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    try:
        rc = cli.main(argv)
    except SystemExit as e:  # argparse's usage errors
        rc = e.code
    assert rc == 2
    assert re.search(match, _err(capsys))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["binary.txt", "empty.txt"]  # nothing written


@pytest.mark.skipif(os.geteuid() == 0 and not Path("/proc").is_dir(), reason="needs an unwritable place")
def test_cli_refuses_unwritable_output(tmp_path, capsys, no_load):
    place = Path("/proc/mspeckv-out") if os.geteuid() == 0 else tmp_path / "ro" / "out"
    if os.geteuid() != 0:
        (tmp_path / "ro").mkdir(mode=0o555)
    assert cli.main(["bench", "decode", "--model", "random:tiny", "--out", str(place / "x.json")]) == 2
    assert "cannot write in" in _err(capsys)


def test_model_checks_come_before_weights(tiny_dirs, capsys, no_load):  # noqa: F811
    t, d, _ = tiny_dirs
    assert cli.main(["generate", "--model", t, "--prompt", "x", "--on-chip", "9", "--device", "cpu"]) == 2
    assert "--on-chip 9 is greater than the model's 3 layers" in _err(capsys)
    assert cli.main(["generate", "--model", t, "--prompt", "x", "--on-chip", "3", "--kv-quant", "int8",
                     "--device", "cpu"]) == 2
    assert "with --on-chip 3 of 3 layers every layer's KV stays on the GPU" in _err(capsys)
    assert cli.main(["generate", "--model", t, "--prompt", "x", "--max-new-tokens", "600", "--device", "cpu"]) == 2
    assert "exceeds the model's maximum context of 512" in _err(capsys)
    assert cli.main(["bench", "spec", "--model", t, "--draft", d, "--contexts", "500", "--device", "cpu"]) == 2
    assert "--contexts 500 plus --gen-len 128 exceed" in _err(capsys)


def test_demo_honours_vanilla(monkeypatch, capsys):
    """demo --mode vanilla runs AR against vanilla (not the hierarchy)."""
    seen = []

    def fake_run(a, model, tok, draft, ids, mode):
        seen.append(mode)
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "run_generation", fake_run)
    monkeypatch.setattr(cli, "preflight", lambda a: None)
    monkeypatch.setattr(cli, "_load_pair", lambda a, *d: (type("M", (), {"device": "cpu"})(), _Tok(), None))
    monkeypatch.setattr(cli, "_demo_memory", lambda a: None)  # the memory check and the press row load real weights
    monkeypatch.setattr(cli, "_demo_press_row", lambda *a: None)
    from types import SimpleNamespace

    import mspeckv.data.corpora as corpora  # CI has no packaged corpus: the demo's document is not what is tested

    monkeypatch.setattr(corpora, "load_documents", lambda name: [SimpleNamespace(text="A short article.")])
    assert cli.main(["demo", "--mode", "vanilla", "--max-new-tokens", "4"]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == "mspeckv: interrupted; rerun the same command to resume"
    monkeypatch.setattr(cli, "run_generation", lambda *a: seen.append(a[-1]) or _Res())
    cli.main(["demo", "--mode", "vanilla", "--max-new-tokens", "4"])
    assert seen == ["ar", "ar", "vanilla"]
    assert set(json.loads(capsys.readouterr().out.splitlines()[-1])) >= {"ar", "vanilla", "identical"}


class _Tok:
    def apply_chat_template(self, *a, **k):
        return [1, 2, 3]

    chat_template = "x"

    def decode(self, *a, **k):
        return "text"


class _Res:
    tokens, n_generated, ttft_s, ms_per_token, tok_per_s, stats = [[1]], 1, 0.1, 1.0, 1.0, {}


# ----------------------------------------------------------------------------------------- main(): one line, exit 2
@pytest.mark.parametrize("exc, match", [
    (KeyboardInterrupt(), "mspeckv: interrupted; rerun the same command to resume"),
    (PermissionError(13, "Permission denied", "/x/y.json"), "mspeckv: error: /x/y.json: Permission denied"),
    (OSError(28, "No space left on device"), "No space left on device"),
])
def test_main_expected_failures(exc, match, monkeypatch, capsys):
    def fail(a):
        raise exc

    monkeypatch.setattr(cli, "cmd_plan", fail)
    assert cli.main(["plan", "--context", "8"]) == 2
    assert match in _err(capsys)
    monkeypatch.setenv("MSPECKV_DEBUG", "1")
    with pytest.raises(type(exc)):
        cli.main(["plan", "--context", "8"])


# ------------------------------------------------------------------------------------------- model cache integrity
def test_damaged_model_cache(fake, cache, tmp_path, capsys):  # noqa: F811
    from mspeckv.model import loading

    src = tmp_path / "tiny.gguf"
    write_tiny_gguf(src)
    data = src.read_bytes()
    name, _ = fake([data[:1000], data[1000:]], name="tiny")
    d = loading.prepare(name, progress=False)
    w = d / "model.safetensors"
    good = w.read_bytes()
    rec = json.loads((d / loading.MARKER).read_text())["files"]
    assert rec["model.safetensors"]["size"] == len(good) and len(rec["model.safetensors"]["sha256"]) == 64
    assert "config.json" in rec and loading.cache_state(name) == "prepared"

    w.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))  # same size, one bit flipped: seen cheaply, named by verify
    assert loading.cache_state(name).startswith("damaged: model.safetensors")
    assert cli.main(["models", "verify", name]) == 2
    out, err = capsys.readouterr()
    assert f"{name}: damaged: model.safetensors does not match the sha256 recorded at conversion" in out
    assert f"mspeckv models prepare {name} --force" in err

    w.write_bytes(good[: len(good) // 2])  # cut: every load names the file and the command
    with pytest.raises(loading.DamagedCacheError, match=rf"model.safetensors is {len(good) // 2} bytes, but "
                       rf"{len(good)} were written at conversion; rebuild it with: mspeckv models prepare {name} "
                       "--force"):
        loading.resolve(name, progress=False)
    assert cli.main(["models", "list"]) == 0
    assert re.search(rf"{name} .* damaged: model.safetensors is", capsys.readouterr().out)
    assert cli.main(["generate", "--model", name, "--prompt", "hi", "--device", "cpu"]) == 2
    assert f"mspeckv models prepare {name} --force" in _err(capsys)

    assert cli.main(["models", "prepare", name, "--force"]) == 0
    assert w.read_bytes() == good and loading.cache_state(name, full=True) == "prepared"
    assert cli.main(["models", "verify", name]) == 0


def test_unreadable_weights_name_the_directory(tiny_dirs, tmp_path):  # noqa: F811
    import shutil

    from mspeckv.model.api import load_model
    from mspeckv.model.loading import DamagedCacheError

    d = tmp_path / "m"
    shutil.copytree(tiny_dirs[0], d)
    (d / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(DamagedCacheError, match=f"cannot read the weights in {d}"):
        load_model(d, "cpu")


# -------------------------------------------------------------------------------------------------------- report
def test_report_tells_partial_from_complete_and_skips_foreign_json(tmp_path, capsys):
    from mspeckv.runs.store import RunSpec, RunStore, run_sweep

    store = RunStore(tmp_path)
    config = {"xs": [1, 2], "seeds": [1, 2, 3], "methods": ["baseline", "mspeckv"]}
    metrics = lambda s: {"tok_per_s": 1.0 + s.seed, "latency_s": 1.0}
    run_sweep(store, [RunSpec("context", "baseline", "prefill", 1, s, config) for s in (1, 2)], metrics, False)
    (store.runs_dir / "list.json").write_text("[1, 2]")
    (store.runs_dir / "other.json").write_text('{"name": "x"}')
    assert cli.main(["report", str(tmp_path)]) == 0
    s = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (s["n_runs"], s["n_expected"], s["partial"], s["sweeps"]) == (2, 12, True, ["context"])
    assert s["missing"][0] == {"method": "mspeckv", "x": 1, "seed": 1} and len(s["missing"]) == 10
    assert "list.json (a JSON array, not a run record)" in s["warnings"][0]
    assert "other.json (not a run record: no sweep, x_name, x, method, seed, status)" in s["warnings"][0]
    md = (tmp_path / "summary.md").read_text()
    assert md.splitlines()[0] == "# Sweep context: prefill (PARTIAL: 2 of 12 runs)"
    assert "- runs: 2 of 12 runs (2 ok, 0 failed); missing: mspeckv prefill=1 seed 1, " in md
    assert "> **Warning:** skipped 2 file(s) in runs/ that are not run records" in md

    specs = [RunSpec("context", m, "prefill", x, s, config) for x in (1, 2) for s in (1, 2, 3)
             for m in ("baseline", "mspeckv")]
    run_sweep(store, specs, metrics, False)
    for f in ("list.json", "other.json"):
        (store.runs_dir / f).unlink()
    assert cli.main(["report", str(tmp_path)]) == 0
    s = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (s["n_runs"], s["n_expected"], s["partial"], s["missing"], s["warnings"]) == (12, 12, False, [], [])
    md = (tmp_path / "summary.md").read_text()
    assert md.splitlines()[0] == "# Sweep context: prefill" and "- runs: 12 of 12 runs (12 ok, 0 failed)" in md
