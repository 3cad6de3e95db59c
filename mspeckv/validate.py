"""Type and range checks for the config dataclasses, with messages in the user's terms.

A config's ``__post_init__`` calls these with its field names. A message names the field, the value and what is
allowed; the field is written as the API spells it (``on_chip``) or, inside ``flag_names()`` (the CLI), as the flag
(``--on-chip``). Bools are not integers here, and NaN/inf are not numbers.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from contextvars import ContextVar
from numbers import Integral, Real

_FLAGS: ContextVar[bool] = ContextVar("mspeckv_flag_names", default=False)
# fields whose flag is not "--" + the field name with dashes
FLAG_OF = {"prefills": "--contexts", "hf_reference": "--no-hf", "graphs": "--no-graphs", "graphed": "--no-graphs",
           "target": "--model"}


class ConfigError(ValueError):
    """A config value of the wrong type or outside its range; the message says which, and what is allowed."""


@contextlib.contextmanager
def flag_names() -> Iterator[None]:
    """Name fields by their CLI flags in messages raised inside this block."""
    token = _FLAGS.set(True)
    try:
        yield
    finally:
        _FLAGS.reset(token)


def in_cli() -> bool:
    """True inside ``flag_names()``."""
    return _FLAGS.get()


def name(field: str) -> str:
    """``field`` as the user wrote it: the API field name, or the CLI flag inside ``flag_names()``."""
    if not _FLAGS.get():
        return field
    return FLAG_OF.get(field, "--" + field.replace("_", "-"))


def _range(lo, hi, lo_open: bool = False, hi_open: bool = False) -> str:
    if lo is not None and hi is not None:
        return f" in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    if lo is not None:
        return f" {'>' if lo_open else '>='} {lo}"
    if hi is not None:
        return f" {'<' if hi_open else '<='} {hi}"
    return ""


def _fail(field: str, value, want: str):
    raise ConfigError(f"{name(field)} must be {want}, got {value!r}")


def integer(field: str, value, lo: int | None = None, hi: int | None = None, optional: bool = False) -> None:
    """An int (not a bool) in [lo, hi]; ``optional``: None is allowed too."""
    if value is None and optional:
        return
    want = "an integer" + _range(lo, hi) + (" (or None)" if optional and not _FLAGS.get() else "")
    if isinstance(value, bool) or not isinstance(value, Integral):
        _fail(field, value, want)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        _fail(field, value, want)


def number(field: str, value, lo: float | None = None, hi: float | None = None, lo_open: bool = False,
           hi_open: bool = False) -> None:
    """A finite real number (int or float, not a bool) in the given range."""
    want = "a finite number" + _range(lo, hi, lo_open, hi_open)
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
        _fail(field, value, want)
    if lo is not None and (value <= lo if lo_open else value < lo):
        _fail(field, value, want)
    if hi is not None and (value >= hi if hi_open else value > hi):
        _fail(field, value, want)


def boolean(field: str, value, optional: bool = False) -> None:
    if value is None and optional:
        return
    if not isinstance(value, bool):
        _fail(field, value, "True or False" + (" (or None)" if optional else ""))


def choice(field: str, value, options, optional: bool = False) -> None:
    if value is None and optional:
        return
    if not isinstance(value, str) or value not in options:
        _fail(field, value, "one of " + ", ".join(options))


def text(field: str, value, optional: bool = False) -> None:
    """A non-empty string."""
    if value is None and optional:
        return
    if not isinstance(value, str) or not value:
        _fail(field, value, "a non-empty string")


def integers(field: str, values, lo: int | None = None, hi: int | None = None) -> None:
    """A non-empty tuple of distinct ints in [lo, hi]."""
    want = "a non-empty tuple of distinct integers" + _range(lo, hi)
    if not isinstance(values, tuple) or not values or len(set(values)) != len(values):
        _fail(field, values, want)
    for v in values:
        if isinstance(v, bool) or not isinstance(v, Integral) or (lo is not None and v < lo) or \
                (hi is not None and v > hi):
            _fail(field, values, want)


def choices(field: str, values, options) -> None:
    """A non-empty tuple of distinct strings from ``options``."""
    want = "a non-empty tuple of distinct values from " + ", ".join(options)
    if not isinstance(values, tuple) or not values or len(set(values)) != len(values) or \
            any(v not in options for v in values):
        _fail(field, values, want)


# ------------------------------------------------------------------------------------------- where a setting acts
def ignored(given: dict[str, str], applies: dict[str, dict[str, tuple]], facts: dict, say) -> None:
    """Refuse settings this run would not read, from each setting's declaration of where it acts.

    ``given``: setting -> how the user wrote it (``--l1-press``), for the settings given a non-default value;
    ``applies``: setting -> {fact: the values of that fact under which the setting is read} (a setting or fact not
    declared: read everywhere); ``facts``: this run's value of each fact (a tuple: several values, e.g. the metrics
    asked for, of which one in the declared values is enough); ``say(fact, value)``: that fact in the user's words.
    Raises one ConfigError for the first fact that ignores something, naming every setting it ignores."""
    blocked: dict[tuple[str, tuple], list[str]] = {}  # (fact, the values that would read them) -> settings
    for setting, shown in given.items():
        for fact, values in applies.get(setting, {}).items():
            have = facts[fact]
            if not (set(have) & set(values) if isinstance(have, tuple) else have in values):
                blocked.setdefault((fact, tuple(values)), []).append(shown)
                break
    for (fact, values), shown in blocked.items():
        one = len(shown) == 1
        raise ConfigError(f"{', '.join(shown)} would be ignored: {say(fact, facts[fact])}; "
                          f"{'it acts' if one else 'they act'} only with "
                          f"{' or '.join(dict.fromkeys(say(fact, x) for x in values))}; drop {'it' if one else 'them'}")
