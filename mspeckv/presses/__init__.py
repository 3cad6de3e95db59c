"""Presses: which KV rows are kept after prefill, and in what form (see ``presses/base.py``).

``parse_press`` turns ``name:k=v,...``, a preset name or a YAML file into a press; ``PRESSES`` lists them all.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path

import yaml

from .adakv import AdaKVPress
from .base import Press, ScorePress
from .h2o import H2OPress
from .hybrid import HybridPress
from .kivi import KIVIPress
from .lowrank import LowRankPress
from .pyramid import PyramidKVPress
from .retrieval import RetrievalPress
from .snapkv import SnapKVPress
from .streaming import StreamingLLMPress

PRESSES: dict[str, type[Press]] = {p.name: p for p in (
    StreamingLLMPress, SnapKVPress, H2OPress, PyramidKVPress, AdaKVPress, RetrievalPress, KIVIPress, LowRankPress,
    HybridPress)}
PRESET_DIR = Path(__file__).resolve().parent.parent / "configs" / "presses"

__all__ = ["PRESSES", "Press", "ScorePress", "parse_press", "presets", "press_from_dict"]


def presets() -> dict[str, Path]:
    return {p.stem: p for p in sorted(PRESET_DIR.glob("*.yaml"))}


def _convert(cls, name: str, raw):
    """A CLI/YAML value -> the field's type (int, float, bool, str, tuple of budgets)."""
    hint = typing.get_type_hints(cls)[name]
    opts = typing.get_args(hint) if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union \
        else (hint,)
    if isinstance(raw, str):
        s = raw.strip()
        if tuple in opts or any(typing.get_origin(o) is tuple for o in opts):
            return tuple(_number(x, f"{cls.name}.{name}") for x in s.split("/"))
        if bool in opts:
            if s.lower() in ("true", "1", "yes"):
                return True
            if s.lower() in ("false", "0", "no"):
                return False
        if int in opts or float in opts:
            return _number(s, f"{cls.name}.{name}")
        return s
    if isinstance(raw, list):
        return tuple(raw)
    return raw


def _number(s: str, what: str):
    try:
        return int(s)
    except ValueError:
        try:
            return float(s)
        except ValueError:
            raise ValueError(f"{what} must be a number, got {s!r}") from None


def press_from_dict(d: dict, where: str = "press") -> Press:
    d = dict(d)
    name = d.pop("press", None)
    if name not in PRESSES:
        raise ValueError(f"{where}: 'press' must name one of {', '.join(PRESSES)}, got {name!r}")
    cls = PRESSES[name]
    known = {f.name for f in dataclasses.fields(cls)}
    for key in d:
        if key not in known:
            raise ValueError(f"{where}: {name} has no field '{key}'; its fields are {', '.join(sorted(known))}")
    return cls(**{k: _convert(cls, k, v) for k, v in d.items()})


def parse_press(spec: str | Press | None, flag: str = "--press") -> Press | None:
    """``snapkv:budget=0.25,window=32`` | a preset name (``aggressive``) | a YAML file | a Press | None. ``flag``: the
    option the spec came from, named in the errors."""
    if spec is None or isinstance(spec, Press):
        return spec
    s = spec.strip()
    if s in ("", "none"):
        return None
    if s.endswith((".yaml", ".yml")) or s in presets():
        path = presets().get(s) or Path(s)
        if not path.is_file():
            raise ValueError(f"{flag} {s}: no such YAML file")
        try:
            d = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise ValueError(f"{flag} {s}: not valid YAML ({e})") from None
        if not isinstance(d, dict):
            raise ValueError(f"{flag} {s}: the YAML must be a mapping with a 'press' key")
        return press_from_dict(d, where=str(path.name))
    name, _, rest = s.partition(":")
    if name not in PRESSES:
        raise ValueError(f"{flag}: unknown press '{name}'; use one of {', '.join(PRESSES)}, a preset "
                         f"({', '.join(presets())}) or a .yaml file")
    d = {"press": name}
    for item in filter(None, rest.split(",")):
        k, eq, v = item.partition("=")
        if not eq:
            raise ValueError(f"{flag} {s}: '{item}' is not key=value")
        d[k.strip()] = v
    return press_from_dict(d, where=f"{flag} {s}")
