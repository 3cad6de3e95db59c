"""Every flag of ``mspeckv generate`` in every mode and backend: it is either refused before any weights load, with
one error naming it, or the run reaches the weights. The expectations below are written from the documented
behaviour, independently of the declarations in ``mspeckv/cli_common.py``; a flag added to the command without a row
here fails ``test_every_flag_has_a_row``. Then the other checks that must come before any work."""

from __future__ import annotations

import pytest

from mspeckv import cli
from tests.tiny import save_tiny_pair

MODES = ("ar", "vanilla", "mspeckv")
BACKENDS = ("ours", "hf")
SPEC, HIER, ALL = {"vanilla", "mspeckv"}, {"mspeckv"}, set(MODES)
BOTH, OURS = set(BACKENDS), {"ours"}
OFF = ["--on-chip", "1"]
SAMPLE = ["--temperature", "0.5"]
DRAFT = "{draft}"
# flag -> (its value or None for a switch, the flags it needs to act at all, modes where it acts, backends)
ROWS = {
    "--chat": (None, [], ALL, BOTH),
    "--max-new-tokens": ("4", [], ALL, BOTH),
    "--prefill-chunk": ("16", [], ALL, OURS),  # transformers' generate prefills in one forward
    "--temperature": ("0.5", [], ALL, BOTH),
    "--top-p": ("0.9", SAMPLE, ALL, BOTH),
    "--top-k": ("5", SAMPLE, ALL, BOTH),
    "--seed": ("3", SAMPLE, ALL, BOTH),
    "--greedy": (None, [], ALL, BOTH),
    "--on-chip": ("1", [], ALL, BOTH),
    "--kv-quant": ("int8", [*OFF, "--kv-group-size", "16"], ALL, BOTH),  # the tiny model's head_dim is 16
    "--kv-group-size": ("16", OFF, ALL, BOTH),
    "--allow-lossy": (None, [*OFF, "--kv-quant", "int2", "--kv-group-size", "16"], ALL, BOTH),
    "--resident-layers": ("1", OFF, ALL, BOTH),
    "--resident-format": ("quant", [*OFF, "--resident-layers", "1", "--kv-quant", "int8", "--kv-group-size", "16"], ALL,
                          BOTH),
    "--resident-policy": ("static", [*OFF, "--resident-layers", "1"], ALL, BOTH),
    "--press": ("streaming", [], ALL, BOTH),
    "--press-every": ("4", ["--press", "streaming"], {"ar"}, OURS),  # re-presses during AR decoding only
    "--draft": (DRAFT, [], SPEC, OURS),
    "--drafter": ("ngram", [], SPEC, OURS),
    "--gamma": ("3", [], SPEC, OURS),
    "--draft-gamma": ("2", [], HIER, OURS),
    "--budget": ("64", [], HIER, OURS),
    "--chunk": ("4", [], HIER, OURS),
    "--draft-sinks": ("4", [], HIER, OURS),
    "--draft-window": ("32", [], HIER, OURS),
    "--refresh-every": ("8", [], HIER, OURS),
    "--l1-press": ("retrieval:budget=64,chunk=8", [], HIER, OURS),
    # --prompts FILE.jsonl's own flags: refused with --prompt (tests/test_batch_cli.py runs them with --prompts)
    "--batch": ("2", [], set(), set()),
    "--out": ("x.jsonl", [], set(), set()),
    "--gpu-memory": ("24", [], set(), set()),
    # speculation at batch's own flags (--mode self and the window of mspeckv at batch): refused with --prompt
    "--self-window": ("9", [], set(), set()),
    "--self-sinks": ("2", [], set(), set()),
    "--auto-gamma": (None, [], set(), set()),
}
PROMPTS_ONLY = {"--batch", "--out", "--gpu-memory", "--self-window", "--self-sinks", "--auto-gamma"}
# set per case
FIXED = {"-h", "--model", "--prompt", "--prompt-file", "--prompts", "--device", "--backend", "--mode", "--tp"}


class Loaded(Exception):
    """Raised where the weights would load: the run got past every check."""


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return save_tiny_pair(tmp_path_factory.mktemp("flag_models"))


@pytest.fixture
def stop_at_weights(monkeypatch):
    import transformers

    import mspeckv.model.api as api

    def loaded(*a, **k):
        raise Loaded

    monkeypatch.setattr(api, "load", loaded)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", loaded)


def _generate_flags() -> set[str]:
    import argparse

    sub = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return {s for act in sub.choices["generate"]._actions for s in act.option_strings if s.startswith("--")}


def test_every_flag_has_a_row():
    assert _generate_flags() - FIXED - {"-h", "--help"} == set(ROWS)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("flag", sorted(ROWS))
def test_flag_acts_or_is_refused_before_weights(flag, mode, backend, pair, capsys, stop_at_weights):
    target, draft = pair
    value, needs, modes, backends = ROWS[flag]
    argv = ["generate", "--model", target, "--prompt", "hello there", "--device", "cpu", "--max-new-tokens", "4",
            "--mode", mode, "--backend", backend, *needs]
    if mode != "ar" and flag not in ("--draft", "--drafter"):
        argv += ["--draft", draft]
    argv += [flag] if value is None else [flag, value.replace(DRAFT, draft)]
    if backend == "hf" and mode != "ar" and flag not in PROMPTS_ONLY:  # those are refused first, in every mode
        assert cli.main(argv) == 2
        assert "--backend hf runs transformers' own generate" in capsys.readouterr().err
        return
    if mode in modes and backend in backends:
        with pytest.raises(Loaded):
            cli.main(argv)
        return
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"mspeckv: error: {flag} would be ignored: ") and err.count("\n") == 1, err
    why = "--prompts FILE.jsonl" if flag in PROMPTS_ONLY else f"--mode {mode}" if mode not in modes else "--backend hf"
    assert why in err, err


# ------------------------------------------------------------------------------- other combinations and paths
@pytest.mark.parametrize("argv, match", [
    (["--backend", "hf", "--press", "snapkv"], "--press snapkv watches the attention queries"),
    (["--backend", "hf", "--drafter", "ngram"], "--drafter would be ignored: --mode ar"),
    (["--mode", "ar", "--l1-press", "snapkv"], "--l1-press would be ignored: --mode ar"),
    (["--mode", "vanilla", "--draft", "{draft}", "--press", "streaming", "--press-every", "4"],
     "--press-every would be ignored: --mode vanilla"),
    (["--press-every", "4"], "--press-every N needs --press"),
    (["--on-chip", "1", "--kv-quant", "int2", "--kv-group-size", "16"], "--kv-quant int2 changes the model's output a "
     "lot: none is measured for {target}"),
    (["--on-chip", "1", "--kv-quant", "int8", "--kv-group-size", "16", "--allow-lossy"],
     "--allow-lossy only unlocks --kv-quant int2"),
    (["--allow-lossy"], "--allow-lossy would be ignored"),
])
def test_generate_combinations_refused_before_weights(argv, match, pair, capsys, stop_at_weights):
    target, draft = pair
    argv = ["generate", "--model", target, "--prompt", "x", "--device", "cpu",
            *[x.replace("{draft}", draft) for x in argv]]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert match.replace("{target}", target) in err and err.count("\n") == 1, err


def test_paths_refused_before_weights(pair, tmp_path, capsys, stop_at_weights):
    target, _ = pair
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    cases = [
        (["eval", "ppl", "--model", target, "--context", "256", "--scored", "32", "--output-dir", str(a_file)],
         f"--output-dir {a_file} is a file; give a folder"),
        (["eval", "ppl", "--model", target, "--context", "256", "--scored", "32", "--output-dir", str(a_file / "sub")],
         "is a file, so no folder can be made there"),
        (["presses", "calibrate", "--model", target, "--out", str(a_file)], f"--out {a_file} is a file"),
        (["presses", "calibrate", "--model", target, "--out", str(a_file / "sub")], "is a file, so no folder"),
    ]
    for argv, match in cases:
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert match in err and err.count("\n") == 1, (argv, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


@pytest.mark.parametrize("argv, flags", [
    (["presses", "list", "--model", "x"], "--model"),
    (["presses", "list", "--tokens", "100"], "--tokens"),
    (["presses", "list", "--out", "d", "--max-rank", "4"], "--out, --max-rank"),
    (["models", "verify", "--gguf", "f.gguf"], "--gguf"),
    (["sweep", "context", "--target", "random:tiny", "--draft", "random:tiny", "--dataset", "/no/such.txt"],
     "--dataset"),
])
def test_listing_and_sweep_flags_that_would_be_ignored(argv, flags, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"mspeckv: error: {flags} would be ignored: ") and err.count("\n") == 1, err


def test_hf_status_line_names_the_device(pair, capsys):
    target, _ = pair
    assert cli.main(["generate", "--model", target, "--prompt", "hello", "--max-new-tokens", "2", "--device", "cpu",
                     "--backend", "hf"]) == 0
    err = capsys.readouterr().err
    assert "all 3 layers' KV on the CPU" in err and "GPU" not in err, err


def test_speculative_generate_without_a_draft_is_one_clear_error():
    import torch

    from mspeckv.config import GenerationConfig
    from mspeckv.decoding.speculative import SpecConfig, speculative_generate
    from tests.tiny import tiny_model

    with pytest.raises(ValueError, match="no draft model.*drafter='ngram'"):
        speculative_generate(tiny_model(), None, torch.tensor([[1, 2, 3]]), GenerationConfig(max_new_tokens=2),
                             SpecConfig(mode="vanilla"))
    res = speculative_generate(tiny_model(), None, torch.tensor([[1, 2, 3, 1, 2]]), GenerationConfig(max_new_tokens=2),
                               SpecConfig(mode="vanilla", drafter="ngram"))  # no draft needed: it runs
    assert res.n_generated == 2
