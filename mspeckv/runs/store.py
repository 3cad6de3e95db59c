"""The files every bench and eval writes: atomic writes (0644), run metadata with measured provenance
(:func:`provenance`), one rule for a folder of resumable cells (:class:`CellFolder`), and the benches' sweeps.

One benchmark run -> one JSON file. A sweep is a list of :class:`RunSpec` (sweep, method, x_name, x, seed,
config). :func:`run_sweep` runs each spec that is not already done, catches every ``Exception`` (CUDA OOM included)
into a ``failed`` record, and writes each record atomically to ``<dir>/runs/<run_filename(...)>``. Resuming a sweep
skips runs whose JSON says ``ok`` and retries the failed and damaged ones (:class:`CellFolder`, the rule every bench
and eval shares). ``KeyboardInterrupt`` propagates and never leaves a partial file behind.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import functools
import hashlib
import importlib.metadata
import json
import os
import platform
import re
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

STATUS_OK = "ok"
STATUS_FAILED = "failed"
TMP_SUFFIX = ".tmp"  # ``.NAME.XXXX.tmp``: a write in progress, or one a kill interrupted
STALE_TMP_S = 60.0  # a write lasts milliseconds: a temp file this old was left by an interrupted one
RECORD_KEYS = ("sweep", "x_name", "x", "method", "seed", "status")  # what makes a JSON a run record


# --------------------------------------------------------------------------------------------------- atomic writes
def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (temp file in the same directory, fsync, ``os.replace``), mode 0644."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    try:
        os.fchmod(fd, 0o644)  # readable by all like any tool's output (mkstemp makes 0600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable where the OS allows it
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    return path


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented JSON atomically (NaN/inf are written as ``null``)."""
    return atomic_write_text(path, json.dumps(json_safe(obj), indent=2, sort_keys=False) + "\n")


def read_json_object(path: str | os.PathLike) -> dict[str, Any]:
    """A JSON object file's content; ``{}`` when the file is absent, unreadable or holds no object."""
    try:
        d = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return d if isinstance(d, dict) else {}


def json_safe(obj: Any) -> Any:
    """Recursively convert to plain JSON types: NaN/inf -> None, tuples -> lists, numpy scalars -> Python."""
    if isinstance(obj, float):
        return obj if obj == obj and obj not in (float("inf"), float("-inf")) else None
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    if obj is None or isinstance(obj, str | int | bool):
        return obj
    if hasattr(obj, "item") and callable(obj.item):  # numpy / torch scalars
        with contextlib.suppress(Exception):
            return json_safe(obj.item())
    return str(obj)


# --------------------------------------------------------------------------------------------------------- metadata
def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


COMMIT_STAMP = "COMMIT"  # mspeckv/COMMIT holds $Format:%H$, which ``git archive`` fills in (.gitattributes)


def _git(folder: Path, *args: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(folder), *args], capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def _stamp(folder: Path) -> str | None:
    """The commit a ``git archive`` copy carries in ``COMMIT`` (None in a checkout, where it reads ``$Format:%H$``)."""
    try:
        text = (folder / COMMIT_STAMP).read_text(encoding="utf-8").strip()
    except OSError:
        return None
    return text if re.fullmatch(r"[0-9a-f]{40}", text) else None


def provenance(folder: str | os.PathLike | None = None, env: dict | None = None) -> dict[str, Any]:
    """Where the running code comes from, measured, first source that answers:

    1. ``git``: the package folder is tracked by a git checkout: ``rev-parse HEAD`` and ``status --porcelain``
       (tracked files; ``git_dirty`` None if git cannot say);
    2. ``stamp``: a ``git archive`` copy, whose ``COMMIT`` file git filled in; ``git_dirty`` None (nothing tells
       whether the copy was changed after it was made);
    3. ``env``: only then ``MSPECKV_GIT_COMMIT`` (an assertion, not a measurement); ``git_dirty`` True when
       ``MSPECKV_GIT_DIRTY=1``, else None;
    4. ``unknown``: commit and dirty state None.

    An unknown or unmeasured state is written as None, never as clean. Returns ``git_commit``, ``git_dirty``,
    ``commit_source``."""
    folder = Path(folder) if folder is not None else Path(__file__).resolve().parent.parent
    env = os.environ if env is None else env
    if _git(folder, "ls-files", "--error-unmatch", "__init__.py") is not None:
        commit = _git(folder, "rev-parse", "HEAD") or None
        status = _git(folder, "status", "--porcelain", "--untracked-files=no") if commit else None
        return {"git_commit": commit, "git_dirty": None if status is None else bool(status), "commit_source": "git"}
    if stamp := _stamp(folder):
        return {"git_commit": stamp, "git_dirty": None, "commit_source": "stamp"}
    if pin := env.get("MSPECKV_GIT_COMMIT"):
        return {"git_commit": pin, "git_dirty": True if env.get("MSPECKV_GIT_DIRTY") == "1" else None,
                "commit_source": "env"}
    return {"git_commit": None, "git_dirty": None, "commit_source": "unknown"}


@functools.lru_cache(maxsize=1)
def _static_metadata() -> dict[str, Any]:
    gpu = cuda = None
    torch_version = _version("torch")
    if torch_version is not None:
        try:
            import torch  # lazy: heavy, and optional for report-only use

            torch_version = torch.__version__
            cuda = torch.version.cuda
            if torch.cuda.is_available():
                gpu = torch.cuda.get_device_name(torch.cuda.current_device())
        except Exception:  # broken installs must not kill a sweep
            pass
    return {
        **provenance(),
        "python": platform.python_version(),
        "torch": torch_version,
        "transformers": _version("transformers"),
        "numpy": _version("numpy"),
        "mspeckv": _version("mspeckv"),
        "cuda": cuda,
        "gpu": gpu,
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
    }


def run_metadata() -> dict[str, Any]:
    """Provenance for one run: git commit, dirty flag and where they were read (:func:`provenance`), library
    versions, hostname, GPU name, UTC timestamp."""
    meta = dict(_static_metadata())
    meta["timestamp"] = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
    return meta


# ------------------------------------------------------------------------------------------------- specs / records
@dataclass
class RunSpec:
    """One planned run of a sweep; ``config`` is recorded verbatim in the result."""

    sweep: str
    method: str
    x_name: str
    x: Any
    seed: int
    config: dict[str, Any] = field(default_factory=dict)


@dataclass
class RunRecord:
    """The content of one run JSON."""

    sweep: str
    x_name: str
    x: Any
    method: str
    seed: int
    status: str  # 'ok' | 'failed'
    error: str | None = None  # "ExceptionType: message" when failed
    config: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == STATUS_OK

    def to_dict(self) -> dict[str, Any]:
        return json_safe(asdict(self))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunRecord:
        names = cls.__dataclass_fields__.keys()
        return cls(**{k: v for k, v in d.items() if k in names})


_SAFE = re.compile(r"[^A-Za-z0-9._+-]+")


def _safe(part: Any) -> str:
    s = repr(part) if isinstance(part, float) else str(part)
    cleaned = _SAFE.sub("-", s).strip("-.") or "_"
    if cleaned != s:  # keep distinct values distinct after sanitising
        cleaned += "~" + hashlib.sha1(s.encode()).hexdigest()[:8]
    return cleaned[:80]


def run_filename(sweep: str, method: str, x_name: str, x: Any, seed: int) -> str:
    """Deterministic, filesystem-safe name, e.g. ``a1__mspeckv__prefill=4096__seed0.json``."""
    return f"{_safe(sweep)}__{_safe(method)}__{_safe(x_name)}={_safe(x)}__seed{_safe(seed)}.json"


def _key(run) -> tuple:
    """(sweep, method, x_name, x, seed) of a RunSpec, RunRecord or record dict."""
    names = ("sweep", "method", "x_name", "x", "seed")
    return tuple(run[k] for k in names) if isinstance(run, dict) else tuple(getattr(run, k) for k in names)


@dataclass(frozen=True)
class Skipped:
    """A file of a cell folder that holds no cell: ``damaged`` (unreadable: corrupt, truncated) or foreign (a JSON
    of another kind). ``str()`` names it and says why."""

    name: str
    why: str
    damaged: bool

    def __str__(self) -> str:
        return f"{self.name} ({self.why})"


class CellFolder:
    """One JSON file per resumable cell in ``folder``: the one rule of every bench and eval.

    - A cell is **done** iff its file reads back as a JSON object with the folder's ``keys`` and status ``ok``. A
      missing, corrupt, truncated or foreign file is not done: the cell is computed again and the write replaces it.
    - :meth:`scan` returns the cells and names every other ``*.json`` file (:class:`Skipped`), so a report can count
      them and mark itself PARTIAL when one is damaged.
    - :meth:`clean` removes temp files that an interrupted write left (older than ``STALE_TMP_S``, so a write in
      progress in another job is never touched); a resume calls it first.
    """

    keys: tuple[str, ...] = ("status",)
    statuses: tuple[str, ...] = (STATUS_OK,)
    kind = "a cell"  # what a file of the folder is, in messages

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)

    def read(self, path: Path) -> tuple[dict[str, Any] | None, Skipped | None]:
        """(the cell, None); (None, why not) for a file that holds none; (None, None) when there is no file."""
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None, None
        except (OSError, ValueError) as e:
            return None, Skipped(path.name, f"unreadable: {e}", True)
        if not isinstance(d, dict):
            kind = {"list": "a JSON array", "str": "a JSON string", "NoneType": "JSON null"}.get(
                type(d).__name__, "a JSON value")
            return None, Skipped(path.name, f"{kind}, not {self.kind}", False)
        if missing := [k for k in self.keys if k not in d]:
            return None, Skipped(path.name, f"not {self.kind}: no {', '.join(missing)}", False)
        if d["status"] not in self.statuses:
            return None, Skipped(path.name, f"unknown status {d['status']!r}", False)
        return d, None

    def load_path(self, path: Path) -> dict[str, Any] | None:
        """The cell stored at ``path``, or None (absent, damaged or foreign)."""
        return self.read(path)[0]

    def done_path(self, path: Path) -> bool:
        d = self.load_path(path)
        return d is not None and d.get("status") == STATUS_OK

    def scan(self) -> tuple[list[dict[str, Any]], list[Skipped]]:
        """(cells sorted by file name, every other ``*.json`` file); temp files (names starting '.') are not
        files of the folder."""
        out: list[dict[str, Any]] = []
        skipped: list[Skipped] = []
        if not self.folder.is_dir():
            return out, skipped
        for p in sorted(self.folder.glob("*.json")):
            if p.name.startswith("."):
                continue
            d, why = self.read(p)
            if d is not None:
                out.append(d)
            elif why is not None:
                skipped.append(why)
        return out, skipped

    def clean(self, now: float | None = None) -> list[Path]:
        """Remove the temp files of interrupted writes in the folder and its parent (the rendered summaries')."""
        now = time.time() if now is None else now
        gone = []
        for d in (self.folder, self.folder.parent):
            for p in d.glob(f".*{TMP_SUFFIX}*") if d.is_dir() else ():
                with contextlib.suppress(OSError):
                    if p.is_file() and now - p.stat().st_mtime > STALE_TMP_S:
                        p.unlink()
                        gone.append(p)
        return gone


class RunStore(CellFolder):
    """Raw run JSONs under ``<dir>/runs/``; the rendered summaries live in ``<dir>``."""

    keys = RECORD_KEYS
    statuses = (STATUS_OK, STATUS_FAILED)
    kind = "a run record"

    def __init__(self, dir: str | os.PathLike):
        self.dir = Path(dir)
        self.runs_dir = self.dir / "runs"
        super().__init__(self.runs_dir)

    def path_for(self, run: Any) -> Path:
        """The file of a run (a RunSpec, RunRecord or record dict)."""
        return self.runs_dir / run_filename(*_key(run))

    def load(self, run: Any) -> dict[str, Any] | None:
        """The stored record of a run, or None if absent, damaged or foreign."""
        return self.load_path(self.path_for(run))

    def done(self, run: Any) -> bool:
        """True iff an ``ok`` record exists for this run (failed and damaged runs are run again on resume)."""
        return self.done_path(self.path_for(run))

    def save(self, record: RunRecord | dict[str, Any]) -> Path:
        d = record.to_dict() if isinstance(record, RunRecord) else json_safe(record)
        return atomic_write_json(self.path_for(d), d)

    def load_all(self) -> list[dict[str, Any]]:
        """All run records (sorted by file name); other files are skipped with a warning on stderr."""
        out, skipped = self.scan()
        for s in skipped:
            print(f"warning: skipping {self.runs_dir / str(s)}", file=sys.stderr)
        return out


# ---------------------------------------------------------------------------------------------------------- sweeps
def free_cuda_memory() -> None:
    """Empty the CUDA caching allocator after a failed run or cell (only where the caller already uses torch)."""
    torch = sys.modules.get("torch")  # only if the caller already uses torch
    if torch is None:
        return
    with contextlib.suppress(Exception):
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def run_one(spec: RunSpec, fn: Callable[[RunSpec], dict[str, Any]]) -> RunRecord:
    """Run ``fn(spec)``; any ``Exception`` becomes a failed record (``"TypeName: message"``)."""
    meta = run_metadata()
    t0 = time.perf_counter()
    try:
        metrics = fn(spec)
        if not isinstance(metrics, dict):
            raise TypeError(f"run function must return a dict of metrics, got {type(metrics).__name__}")
        status, error = STATUS_OK, None
    except Exception as e:  # incl. torch.cuda.OutOfMemoryError (a RuntimeError); KeyboardInterrupt propagates
        metrics, status = {}, STATUS_FAILED
        error = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        free_cuda_memory()
    meta["wall_s"] = time.perf_counter() - t0
    return RunRecord(
        sweep=spec.sweep, x_name=spec.x_name, x=spec.x, method=spec.method, seed=spec.seed, status=status,
        error=error, config=dict(spec.config), metrics=dict(metrics), meta=meta,
    )  # fmt: skip


def run_sweep(store: RunStore, plan: Sequence[RunSpec], fn: Callable[[RunSpec], dict[str, Any]],
              progress: bool = True) -> list[RunRecord]:
    """Run every planned spec not already ``ok`` in ``store``; one record per spec, in plan order.

    Done runs are not re-run (their stored record is returned). A failure is recorded and the sweep goes on.
    """
    records: list[RunRecord] = []
    store.clean()
    n_todo = sum(not store.done(s) for s in plan)
    bar = _Progress(n_todo, enabled=progress and n_todo > 0)
    with bar:
        for spec in plan:
            stored = store.load(spec)
            if stored is not None and stored["status"] == STATUS_OK:
                records.append(RunRecord.from_dict(stored))
                continue
            bar.describe(f"{spec.method} {spec.x_name}={spec.x} seed={spec.seed}")
            rec = run_one(spec, fn)
            store.save(rec)
            records.append(rec)
            if not rec.ok:
                bar.log(f"[red]FAILED[/red] {spec.method} {spec.x_name}={spec.x} seed={spec.seed}: {rec.error}")
            bar.advance()
    return records


class _Progress:
    """Thin rich progress bar (ETA included); a no-op when disabled (failures are then printed to stderr)."""

    def __init__(self, total: int, enabled: bool):
        self._p = self._task = None
        if not enabled:
            return
        from rich import progress as rp

        self._p = rp.Progress(rp.TextColumn("{task.description}"), rp.BarColumn(), rp.MofNCompleteColumn(),
                              rp.TimeElapsedColumn(), rp.TextColumn("ETA"), rp.TimeRemainingColumn())
        self._task = self._p.add_task("sweep", total=total)

    def __enter__(self) -> _Progress:
        if self._p is not None:
            self._p.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._p is not None:
            self._p.stop()

    def describe(self, text: str) -> None:
        if self._p is not None:
            self._p.update(self._task, description=text)

    def advance(self) -> None:
        if self._p is not None:
            self._p.advance(self._task)

    def log(self, text: str) -> None:
        if self._p is not None:
            self._p.console.print(text)
        else:
            print(re.sub(r"\[/?[a-z]+\]", "", text), file=sys.stderr)


def write_bench(out_dir: str | Path, name: str, res: dict, render, command: str, meta: bool = True) -> dict:
    """A bench's results files: ``<name>.json`` (the result, with run metadata and the command) and ``summary.md``
    (``render(result)`` and the command). Returns the result as written."""
    res = {**res, **({"meta": run_metadata()} if meta else {}), "command": command}
    d = Path(out_dir)
    atomic_write_json(d / f"{name}.json", res)
    atomic_write_text(d / "summary.md", render(res) + f"\nCommand: `{command}`\n")
    return res
