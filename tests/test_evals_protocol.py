"""The evaluation protocol of issue 28 end to end on the CPU with a tiny random model (numbers are not results):
PPL windows inside one document, the context floor, per-window NLL for the intervals, and held-out confirmation."""

from __future__ import annotations

import json
import math

import pytest

from mspeckv import cli
from mspeckv.data.corpora import doc_split
from mspeckv.evals.runner import FAMILY_OF, EvalConfig, asked, plan
from mspeckv.evals.variants import floor_spec
from mspeckv.runs.template import CellStore
from tests.tiny import char_tokenizer, tiny_pair

WORDS = ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet", "kilo", "lima")
FLOOR = floor_spec(16)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny model with the character tokenizer, and a folder of 12 documents of 300-520 characters."""
    root = tmp_path_factory.mktemp("protocol")
    hf, _ = tiny_pair("llama", 0)
    hf.save_pretrained(root / "m")
    char_tokenizer().save_pretrained(root / "m")
    docs = root / "docs"
    docs.mkdir()
    for i, w in enumerate(WORDS):
        (docs / f"{w}.txt").write_text(" ".join(f"{w} {j}." for j in range(40 + 4 * i)))
    return str(root / "m"), str(docs)


def _args(tiny, out, *extra):
    model, docs = tiny
    return ["eval", "ppl", "--model", model, "--dataset", docs, "--device", "cpu", "--context", "128", "--scored",
            "32", "--score-chunk", "16", "--windows", "4", "--floor", "16", "--attn-queries", "4", "--no-plots",
            *(["--output-dir", str(out)] if out else []), *extra]


def _cells(out) -> dict:
    return {(c["metric"], c["variant"]): c for c in CellStore(out).all()}


def test_ppl_windows_inside_documents_with_the_floor_and_per_window_nll(tiny, tmp_path, capsys):
    model, docs = tiny
    out = tmp_path / "q"
    assert cli.main(_args(tiny, out)) == 0
    capsys.readouterr()
    cells = _cells(out)
    full, floor = cells[("ppl", "full")]["results"], cells[("ppl", FLOOR)]["results"]
    assert {x.rpartition("@")[0] for x in full["window_docs"]} <= set(WORDS)
    assert len({x.rpartition("@")[0] for x in full["window_docs"]}) == 4 and not full["across_documents"]
    assert full["corpus"] == "your documents: windows inside one document each"
    for r in (full, floor):  # PPL is exp of the mean of the windows' mean NLL (equal spans)
        assert len(r["window_nll"]) == 4 and r["ppl"] == pytest.approx(math.exp(sum(r["window_nll"]) / 4))
    assert floor["window_docs"] == full["window_docs"]
    assert floor["kv_bytes_prefix"] < 0.25 * full["kv_bytes_prefix"]
    assert cells[("ppl", FLOOR)]["variant_info"]["press"] == FLOOR
    summary = json.loads((out / "summary.json").read_text())
    assert summary["sensitivity"][0]["floor"] == 16 and summary["sensitivity"][0]["windows"] == 4
    assert "**Context sensitivity:**" in (out / "summary.md").read_text()


def test_the_floor_keeps_the_sinks_and_the_last_prefix_tokens():
    import torch

    from mspeckv.evals.variants import Variant, build_cache
    from tests.tiny import tiny_model

    model = tiny_model()
    cache = build_cache(model, Variant(floor_spec(16)), 1, 128, tail=32)
    model.prefill(torch.randint(3, 90, (1, 96)), cache, chunk=64)
    cache.compress()
    for layer in range(3):
        kept = cache.positions(layer)[0, 0].tolist()
        assert kept == [0, 1, 2, 3, *range(80, 96)]


def test_windows_of_a_tiny_document_set_come_from_the_named_documents(tiny):
    """lm.windows: a window's ids are its document's tokens from its offset (a window cut across a boundary fails)."""
    from mspeckv.data.corpora import encode, load_documents
    from mspeckv.evals.lm import windows

    model, docs = tiny
    tok = char_tokenizer()
    text = {d.name: d.text for d in load_documents(docs)}
    wins = windows(tok, EvalConfig(dataset=docs, windows=6), 128)
    assert len(wins) == 6 and len({w.doc for w in wins}) == 6
    for w in wins:
        assert w.ids == encode(tok, text[w.doc])[w.start:w.start + 129]


def test_short_unrelated_corpora_keep_windows_across_documents(tiny, monkeypatch):
    """bbc and newsgroups (monkeypatched onto the folder here): a window spans several short articles, and says so."""
    from mspeckv.evals import lm

    model, docs = tiny
    monkeypatch.setattr(lm, "unrelated", lambda dataset: True)
    wins = lm.windows(char_tokenizer(), EvalConfig(dataset=docs, windows=3, stride=50), 600)
    assert [w.start for w in wins] == [0, 50, 100] and {w.doc for w in wins} == {"(across documents)"}
    assert all(len(w.ids) == 601 for w in wins)  # longer than any one document: only possible across them


def test_the_floor_runs_only_where_the_prefix_is_longer():
    cfg = EvalConfig(metrics=("ppl",), context=(128, 256), scored=32, floor=100)
    lm = FAMILY_OF["ppl"]
    assert [v.name for v in cfg.family_variants(lm, 128)] == ["full"]  # 96 prefix tokens <= 104 kept
    assert [v.name for v in cfg.family_variants(lm, 256)] == ["full", floor_spec(100)]
    assert [v.name for v in cfg.family_variants(FAMILY_OF["needle"], 256)] == ["full"]
    assert ("ppl", floor_spec(100), 256) in asked(cfg) and ("ppl", floor_spec(100), 128) not in asked(cfg)
    assert EvalConfig(metrics=("ppl",), context=(256,), scored=32, floor=0).family_variants(lm, 256)[1:] == []
    with pytest.raises(ValueError, match="--floor must be >= 0"):
        EvalConfig(floor=-1)


def test_defaults_give_eight_windows_and_fifty_needles():
    cfg = EvalConfig()
    assert cfg.windows >= 8 and cfg.needle_trials * len(cfg.needle_depths) >= 50 and cfg.floor == 256


def test_confirm_split_runs_on_other_documents_and_seeds_into_its_own_folder(tiny, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model, docs = tiny
    sel, conf = EvalConfig(model=model, split="select"), EvalConfig(model=model, split="confirm")
    assert sel.out_dir().name == "m-select" and conf.out_dir().name == "m-confirm" and \
        EvalConfig(model=model).out_dir().name == "m"
    assert {sel.task_seed(i) for i in range(10)}.isdisjoint({conf.task_seed(i) for i in range(10)})
    n_conf = sum(doc_split(w) == "confirm" for w in WORDS)
    assert cli.main(_args(tiny, None, "--split", "confirm", "--windows", str(n_conf))) == 0
    capsys.readouterr()
    out = tmp_path / "results" / "quality" / "m-confirm"
    cells = _cells(out)
    used = {x.rpartition("@")[0] for x in cells[("ppl", "full")]["results"]["window_docs"]}
    assert used == {w for w in WORDS if doc_split(w) == "confirm"}
    assert cells[("ppl", "full")]["settings"]["split"] == "confirm"
    assert "Held-out confirmation: the cells of `m-confirm` use only the confirm half's documents" in \
        (out / "summary.md").read_text()
    # the select half into the confirm folder is refused before anything loads
    assert cli.main(_args(tiny, out, "--split", "select", "--windows", str(n_conf))) == 2
    assert "other settings (split: stored 'confirm' vs asked 'select')" in capsys.readouterr().err
    # needles of the confirm split use seeds no select run uses, and record them
    assert cli.main(["eval", "needle", "--model", model, "--dataset", docs, "--device", "cpu", "--needle-context",
                     "500", "--needle-depths", "0.5", "--needle-trials", "2", "--needle-count", "2", "--split",
                     "confirm", "--no-plots"]) == 0
    capsys.readouterr()
    res = _cells(out)[("needle", "full")]["results"]
    assert res["seeds"] == [500, 501] and res["n"] == 2 and len(res["ci95"]) == 2


def test_too_few_windows_inside_documents_fails_before_loading(tiny, tmp_path, capsys, monkeypatch):
    import mspeckv.model.api as api

    monkeypatch.setattr(api, "load", lambda *a, **k: pytest.fail("loaded a model before validating"))
    out = tmp_path / "bad"
    assert cli.main(_args(tiny, out, "--context", "500", "--windows", "10")) == 2  # 9 documents hold 501 tokens
    err = capsys.readouterr().err
    assert "--context 500:" in err and "inside one document" in err and "lower --windows or --context" in err
    assert not out.exists()
    assert plan(EvalConfig(metrics=("ppl",), context=(128,), scored=32), CellStore(out))  # plans still work
