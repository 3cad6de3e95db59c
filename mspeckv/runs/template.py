"""One results template: a config dataclass -> ``run()`` -> rows -> render -> one JSON line.

- **Flags from fields.** :func:`add_flags` turns a dataclass's fields into argparse flags (``--snake-case`` of the
  field name, help from ``field(metadata=...)``); :func:`from_args` builds the dataclass back from the parsed
  namespace. The dataclass validates itself in ``__post_init__``; every error names the flag.
- **Cells.** A long evaluation is a set of cells; :class:`CellStore` writes each cell as its own JSON, atomically
  (temp file + rename, via ``runs.store``), with run metadata (provenance asked of git), and a cell whose JSON reads
  back as ``ok`` is skipped on the next run (a damaged one is computed again). A cell records the settings that
  shaped it; resuming into a directory made with other settings is refused before anything is loaded.

Nothing here knows about models: the eval (``evals.runner``) and the benches (``bench.registry``) plug in their
config classes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import types
import typing
from pathlib import Path
from typing import Any

from .store import STATUS_OK, CellFolder, atomic_write_json, json_safe, run_metadata


def opt(default: Any, help: str, **meta: Any) -> Any:
    """A dataclass field that becomes one CLI flag. ``meta``: ``choices`` (per item for lists), ``nargs=True`` (a list
    given as separate words instead of comma-separated), ``sep`` (a list's separator, default ``,``), ``flag``
    (override the flag name), ``aliases`` (more flag names), ``negate=True`` (a bool field whose flag, e.g.
    ``--no-hf``, sets it False), ``preset`` (a bool field whose flag gives other fields these values unless they are
    given too, e.g. ``--quick``), ``cli=False`` (not a flag), ``lo``/``hi`` (an int's, or each int item's, range,
    checked by :func:`check_fields`), ``check=False`` (left to the config's own ``__post_init__``)."""
    if isinstance(default, list | dict):
        raise TypeError("use tuples for list defaults")
    return dataclasses.field(default=default, metadata={"help": help, **meta})


def flag_name(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def cli_fields(cls) -> list[dataclasses.Field]:
    """The fields of ``cls`` that are flags."""
    return [f for f in dataclasses.fields(cls) if f.metadata.get("cli", True)]


def flags_of(cls) -> dict[str, str]:
    """field name -> its flag, for the fields of ``cls`` that are flags."""
    return {f.name: flag_name(f) for f in cli_fields(cls)}


def changed(cfg, *names: str, given=None) -> list[str]:
    """The flags of the fields among ``names`` whose value differs from the field's default; with ``given`` (the
    parsed namespace), only those given on the command line (a value a preset set counts as not given)."""
    fields = {f.name: f for f in dataclasses.fields(cfg)}
    return [flag_name(fields[n]) for n in names if getattr(cfg, n) != fields[n].default
            and (given is None or getattr(given, n, None) is not None)]


def _kind(cls, f: dataclasses.Field) -> tuple[str, type, bool]:
    """(kind, item type, optional) with kind in scalar | list | bool."""
    hint = typing.get_type_hints(cls)[f.name]
    optional = False
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        optional, hint = True, args[0]
    if hint is bool:
        return "bool", bool, optional
    if typing.get_origin(hint) is tuple:
        return "list", typing.get_args(hint)[0], optional
    return "scalar", hint, optional


def _parse_item(typ: type, text: str, flag: str, choices) -> Any:
    text = text.strip()
    try:
        v = typ(text)
    except ValueError:
        raise ValueError(f"{flag}: {text!r} is not a{'n' if typ is int else ''} {typ.__name__}") from None
    if choices is not None and v not in choices:
        raise ValueError(f"{flag}: {text!r} is not one of {', '.join(map(str, choices))}")
    return v


def add_flags(parser, cls) -> None:
    """One flag per field of ``cls`` (fields with ``cli=False`` are skipped). Values stay raw strings here and are
    converted by :func:`from_args`, so a bad value gets the dataclass's own message, not argparse's."""
    for f in cli_fields(cls):
        kind, typ, optional = _kind(cls, f)
        default, sep = f.default, f.metadata.get("sep", ",")
        shown = ("none" if default is None else sep.join(map(str, default)) if isinstance(default, tuple)
                 else default)
        help_ = f.metadata.get("help", "").replace("%", "%%")  # argparse %-formats help strings
        shown = str(shown).replace("%", "%%")
        names = (flag_name(f), *f.metadata.get("aliases", ()))
        if kind == "bool":
            parser.add_argument(*names, dest=f.name, action="store_true", default=None, help=help_)
        elif kind == "list" and f.metadata.get("nargs"):
            parser.add_argument(*names, dest=f.name, nargs="+", action="extend", default=None, metavar="X",
                                help=f"{help_} (repeatable; default: {shown})")
        else:
            meta = f"A{sep}B{sep}..." if kind == "list" else typ.__name__.upper()
            parser.add_argument(*names, dest=f.name, default=None, metavar=meta, help=f"{help_} (default: {shown})")


def _split(raw: str, flag: str, sep: str) -> list[str]:
    """``a,b,c`` -> items; nothing given -> no items (the config says whether that is allowed); an empty item is an
    error rather than dropped."""
    if not raw.strip():
        return []
    items = raw.split(sep)
    if any(not x.strip() for x in items):
        raise ValueError(f"{flag} {raw!r} has an empty item; give a '{sep}'-separated list, e.g. {flag} "
                         f"{sep.join(x.strip() for x in items if x.strip()) or 'A'}")
    return items


def from_args(cls, ns, **fixed: Any):
    """Build ``cls`` from a namespace made by a parser with :func:`add_flags` (flags not given keep the defaults, or
    take a given preset flag's values)."""
    kw: dict[str, Any] = dict(fixed)
    for f in cli_fields(cls):
        raw = getattr(ns, f.name, None)
        if f.name in fixed or raw is None:
            continue
        kind, typ, optional = _kind(cls, f)
        flag, choices, sep = flag_name(f), f.metadata.get("choices"), f.metadata.get("sep", ",")
        if kind == "bool":
            kw[f.name] = not raw if f.metadata.get("negate") else bool(raw)
        elif kind == "list" and f.metadata.get("nargs"):
            kw[f.name] = tuple(_parse_item(typ, x, flag, choices) for x in raw)
        elif kind == "list":
            kw[f.name] = tuple(_parse_item(typ, x, flag, choices) for x in _split(str(raw), flag, sep))
        elif optional and str(raw).strip().lower() in ("none", ""):
            kw[f.name] = None
        else:
            kw[f.name] = _parse_item(typ, str(raw), flag, choices)
    for f in cli_fields(cls):  # a preset flag (e.g. --quick) fills the fields that were not given
        if kw.get(f.name) is True and "preset" in f.metadata:
            kw = {**f.metadata["preset"], **kw}
    return cls(**kw)


def check_fields(cfg) -> None:
    """Each field's declaration, checked with ``mspeckv.validate`` in field order (the first bad one raises): its type
    (bool, int, float, str: non-empty; ``X | None``: None allowed too), ``choices``, and ``lo``/``hi`` for ints; a
    tuple of ints is non-empty and distinct, one of strings with ``choices`` too. Fields with ``check=False``, and
    tuples of other items, are the config's own to check."""
    from .. import validate as v

    for f in dataclasses.fields(cfg):
        if not f.metadata.get("check", True):
            continue
        kind, typ, optional = _kind(type(cfg), f)
        x, lo, hi, choices = getattr(cfg, f.name), f.metadata.get("lo"), f.metadata.get("hi"), f.metadata.get("choices")
        if kind == "bool":
            v.boolean(f.name, x, optional)
        elif kind == "list" and (choices or typ is int):
            v.choices(f.name, x, choices) if choices else v.integers(f.name, x, lo, hi)
        elif kind == "scalar" and typ is int:
            v.integer(f.name, x, lo, hi, optional)
        elif kind == "scalar" and typ is float and not (optional and x is None):
            v.number(f.name, x)
        elif kind == "scalar" and typ is str:
            v.choice(f.name, x, choices, optional) if choices else v.text(f.name, x, optional)


def check(cond: bool, flag: str, message: str) -> None:
    """One validation rule of a config's ``__post_init__``: raise ``ValueError('<flag> <message>')``."""
    if not cond:
        raise ValueError(f"{flag} {message}")


# ------------------------------------------------------------------------------------------------------------ cells
_SAFE = re.compile(r"[^A-Za-z0-9._+=~-]+")


def cell_name(metric: str, variant: str, context: int) -> str:
    safe = lambda s: _SAFE.sub("-", str(s)).strip("-") or "_"
    return f"{safe(metric)}__{safe(variant)}__ctx={int(context)}.json"


class Partial:
    """Per-item checkpoint of one long cell (``<dir>/partial/<cell>.jsonl``): a header line with the settings, then
    one line per finished item (a dict with a unique ``index``), each with the commit that computed it. An
    interrupted cell resumes from its items; ``CellStore.save`` removes the file once the cell is written. Without
    a store (tests) nothing is kept."""

    def __init__(self, path: Path | None, settings: dict):
        self.path, self.rows = path, []
        self.commit = run_metadata().get("git_commit")
        want = self._settings = json_safe(settings)
        if path is None or not path.exists():
            return
        lines = []
        for x in path.read_text(encoding="utf-8").splitlines():
            try:
                d = json.loads(x) if x.strip() else None
            except ValueError:  # a line cut short (a job killed mid-write, or another job's append read half-way):
                d = None  # its item is scored again
            if isinstance(d, dict):
                lines.append(d)
        have = lines[0].get("settings") if lines else None
        if have != want:
            raise ValueError(f"{path} holds items made with other settings ({have!r} vs {want!r}); delete it or use "
                             f"the same settings")
        # parallel jobs append to one file: a second header (a race on the first line) is skipped, rows are unique
        self.rows = list({r["index"]: r for r in lines[1:] if "settings" not in r}.values())

    def add(self, row: dict) -> None:
        """Record a finished item (``row`` gains the commit that computed it)."""
        row["commit"] = self.commit
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        first = not self.path.exists()
        text = json.dumps(json_safe(row)) + "\n"
        if first:
            text = json.dumps({"settings": self._settings}) + "\n" + text
        elif not _ends_line(self.path):  # a cut line: start afresh, so only that one is lost
            text = "\n" + text
        with self.path.open("a", encoding="utf-8") as f:
            f.write(text)  # one write: parallel jobs' lines do not interleave
            f.flush()


def _ends_line(path: Path) -> bool:
    with path.open("rb") as f:
        if f.seek(0, 2) == 0:
            return True
        f.seek(-1, 2)
        return f.read(1) == b"\n"


class CellStore(CellFolder):
    """``<dir>/cells/<metric>__<variant>__ctx=<n>.json``: one resumable unit of an evaluation each (the rule for
    done, damaged and foreign files is :class:`~mspeckv.runs.store.CellFolder`'s)."""

    keys = ("metric", "variant", "context", "status")
    kind = "an eval cell"

    def __init__(self, dir: str | Path):
        self.dir = Path(dir)
        self.cells_dir = self.dir / "cells"
        super().__init__(self.cells_dir)

    def path(self, metric: str, variant: str, context: int) -> Path:
        return self.cells_dir / cell_name(metric, variant, context)

    def load(self, metric: str, variant: str, context: int) -> dict | None:
        return self.load_path(self.path(metric, variant, context))

    def done(self, metric: str, variant: str, context: int) -> bool:
        return self.done_path(self.path(metric, variant, context))

    def save(self, metric: str, variant: str, context: int, results: dict, settings: dict,
             info: dict | None = None) -> Path:
        rec = {"metric": metric, "variant": variant, "context": int(context), "status": STATUS_OK,
               "results": results, "settings": settings, "variant_info": info or {}, "meta": run_metadata()}
        out = atomic_write_json(self.path(metric, variant, context), rec)
        self.partial_path(metric, variant, context).unlink(missing_ok=True)  # the cell supersedes its items
        return out

    def partial_path(self, metric: str, variant: str, context: int) -> Path:
        return self.dir / "partial" / (cell_name(metric, variant, context)[:-len(".json")] + ".jsonl")

    def partial(self, metric: str, variant: str, context: int, settings: dict) -> Partial:
        """The per-item checkpoint of a cell not yet written (items already computed, and ``add``)."""
        return Partial(self.partial_path(metric, variant, context), settings)

    def all(self) -> list[dict]:
        """The cells (damaged and foreign files left out: :meth:`scan` names them)."""
        return self.scan()[0]

    def expect(self, cells: list[tuple[str, str, int]]) -> None:
        """Record the cells an invocation asks for (``expected/<digest>.json``, one file per distinct request, so
        parallel jobs into one folder never overwrite each other's), so a report can name those missing."""
        rows = sorted({(m, v, int(c)) for m, v, c in cells})
        digest = hashlib.sha1(json.dumps(rows).encode()).hexdigest()[:16]
        atomic_write_json(self.dir / "expected" / f"{digest}.json", rows)

    def expected(self) -> set[tuple[str, str, int]]:
        """The cells some invocation asked for (empty for a folder written before invocations recorded them)."""
        out: set[tuple[str, str, int]] = set()
        for p in sorted((self.dir / "expected").glob("*.json")):
            try:
                out |= {(m, v, int(c)) for m, v, c in json.loads(p.read_text(encoding="utf-8"))}
            except (OSError, ValueError, TypeError) as e:
                raise ValueError(f"{p} is damaged ({e}); delete it (the next run of that command writes it again)"
                                 ) from None
        return out

    def check_settings(self, metric: str, settings: dict) -> None:
        """Refuse to mix cells made with other settings into this directory (one clear error naming them)."""
        want = json_safe(settings)
        for d in self.all():
            if d.get("metric") != metric:
                continue
            have = d.get("settings", {})
            diff = sorted(k for k in want if k in have and have[k] != want[k])
            if diff:
                shown = ", ".join(f"{k}: stored {have[k]!r} vs asked {want[k]!r}" for k in diff)
                raise ValueError(f"{self.dir} already holds '{metric}' cells made with other settings ({shown}); "
                                 f"use another --output-dir or the same settings")
