"""The lossy note and the int2 refusal come from the measured quality cells of the model being run: its own corpus,
context and PPL Δ, or a line saying none is measured for it; never another model's number."""

import json

import pytest

from mspeckv.evals.lossy import KL_NOTE, RESULTS, check_lossy, measurements, quality_note

INT2, INT8 = "kv=int2/g64/res64/onchip0", "kv=int8/g64/res64/onchip0"


def _cell(root, folder, metric, variant, ctx, value, model="m-small", dataset=None, windows=2):
    d = root / folder / "cells"
    d.mkdir(parents=True, exist_ok=True)
    field = {"ppl": "ppl", "kl": "kl_mean"}[metric]
    cell = {"metric": metric, "variant": variant, "context": ctx, "status": "ok", "results": {field: value},
            "settings": {"model": model, "dataset": dataset, "seed": 0, "windows": windows}}
    (d / f"{metric}__{variant.replace('/', '-')}__ctx={ctx}__{model}.json").write_text(json.dumps(cell))


@pytest.fixture
def root(tmp_path):
    # m-small: int2 at 2048 on pycode (PPL 10 -> 13: +30%), int8 below the note; press snapkv measured
    _cell(tmp_path, "a", "ppl", "full", 2048, 10.0, dataset="pycode")
    _cell(tmp_path, "a", "ppl", INT2, 2048, 13.0, dataset="pycode")
    _cell(tmp_path, "a", "kl", INT2, 2048, 0.25, dataset="pycode")
    _cell(tmp_path, "a", "kl", INT8, 2048, KL_NOTE / 2, dataset="pycode")
    _cell(tmp_path, "a", "ppl", "full", 8192, 20.0)  # default corpus (dataset None): bbc
    _cell(tmp_path, "a", "ppl", INT2, 8192, 21.0)
    _cell(tmp_path, "a", "kl", INT2, 8192, 0.05)
    _cell(tmp_path, "a", "kl", "snapkv:budget=0.25", 8192, 0.009)
    # m-big (another model, another folder): a larger int2 cost that must never be cited for m-small
    _cell(tmp_path, "b", "ppl", "full", 4096, 5.0, model="m-big")
    _cell(tmp_path, "b", "ppl", INT2, 4096, 9.0, model="m-big")
    _cell(tmp_path, "b", "kl", INT2, 4096, 0.9, model="m-big")
    _cell(tmp_path, "b", "kl", INT8, 4096, 0.02, model="m-big")
    _cell(tmp_path, "c/nested", "kl", "kv=int4/g64/res64/onchip0", 2048, 0.004, model="m-big")  # a folder's subfolder
    return tmp_path


def test_note_cites_the_running_models_worst_cell_with_corpus_and_context(root):
    note = quality_note("int2", model="m-small", root=root)
    assert note.startswith("note: --kv-quant int2 changes the model's output")
    assert "PPL +30.0%" in note and "KL 0.250" in note and "m-small" in note
    assert "corpus pycode" in note and "2048 tokens" in note and "2 windows" in note and "worst of 2" in note
    assert "m-big" not in note and "0.900" not in note
    assert quality_note("int2", model="m-big", root=root).count("KL 0.900") == 1
    assert "PPL +80.0%" in quality_note("int2", model="m-big", root=root)


def test_note_below_threshold_none_and_unmeasured(root):
    assert quality_note("int8", model="m-small", root=root) is None  # measured on it, below the note
    assert "KL 0.020" in quality_note("int8", model="m-big", root=root)  # measured above it on the other model
    assert "KL 0.004" in quality_note("int4", model="m-big", root=root) and "results/quality/c/nested" in \
        quality_note("int4", model="m-big", root=root)
    assert quality_note("none", model="m-small", root=root) is None
    note = quality_note("int4", model="m-small", root=root)  # never measured: says so, guesses nothing
    assert "no quality measurement of it exists for m-small" in note and "%" not in note
    note = quality_note(press="snapkv:budget=0.25", model="m-big", root=root)  # measured only on m-small
    assert "no quality measurement of it exists for m-big" in note and "0.009" not in note
    assert "KL 0.009" in quality_note(press="snapkv:budget=0.25", model="m-small", root=root)
    assert "corpus bbc" in quality_note(press="snapkv:budget=0.25", model="m-small", root=root)


def test_ppl_delta_only_against_the_baseline_of_the_same_corpus_and_context(root):
    _cell(root, "a", "kl", INT2, 4096, 0.1)  # no full ppl cell at 4096: the KL stands alone
    by_ctx = {m.context: m for m in measurements("m-small", "int2", root=root)}
    assert by_ctx[4096].ppl_delta_pct is None
    assert by_ctx[8192].ppl_delta_pct == pytest.approx(5.0) and by_ctx[8192].corpus == "bbc"
    assert by_ctx[2048].ppl_delta_pct == pytest.approx(30.0) and by_ctx[2048].corpus == "pycode"


def test_int2_refused_without_allow_lossy(root):
    with pytest.raises(ValueError) as e:
        check_lossy("int2", "m-small", False, root=root)
    msg = str(e.value)
    assert "PPL +30.0%" in msg and "corpus pycode" in msg and "--allow-lossy" in msg and "m-big" not in msg
    with pytest.raises(ValueError, match="none is measured for m-new .*Pass --allow-lossy"):
        check_lossy("int2", "m-new", False, root=root)
    check_lossy("int2", "m-small", True, root=root)  # allowed
    check_lossy("int4", "m-small", False, root=root)  # not refused
    check_lossy("none", "m-small", False, root=root)
    with pytest.raises(ValueError, match="--allow-lossy only unlocks --kv-quant int2.*drop --allow-lossy"):
        check_lossy("int8", "m-small", True, root=root)


def test_committed_results_name_the_model():
    """Against the committed results: the 1.5B's int2 note cites a 1.5B cell, the 0.5B's a 0.5B cell."""
    if not (RESULTS / "qwen2.5-coder-1.5b" / "cells").is_dir():
        pytest.skip("no committed results in this copy")
    for model in ("qwen2.5-coder-1.5b", "qwen2.5-coder-0.5b"):
        found = measurements(model, "int2")
        assert found and all(m.model == model for m in found)
        note = quality_note("int2", model=model)
        worst = max(found, key=lambda m: m.kl)
        assert f"on {model}," in note and f"KL {worst.kl:.3f}" in note and f"{worst.context} tokens" in note
