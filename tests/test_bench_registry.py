"""Every ``mspeckv bench NAME`` is built from its registry entry: its ``--help`` lists exactly its config's flags,
the flags round-trip the config's defaults, and a bad value is one error naming its flag, before anything is
written."""

from __future__ import annotations

import argparse
import dataclasses
import re
import typing

import pytest

from mspeckv import cli
from mspeckv.bench.registry import BENCH, BENCHES
from mspeckv.runs.template import add_flags, cli_fields, flag_name, flags_of, from_args

NAMES = [b.name for b in BENCHES]


def _config(name: str):
    return BENCH[name].load("config")


def _help_flags(name: str, capsys) -> set[str]:
    """The option strings of ``mspeckv bench NAME --help`` (its options section, not the flags its texts mention)."""
    with pytest.raises(SystemExit):
        cli.main(["bench", name, "--help"])
    text = capsys.readouterr().out
    section = text.split("options:", 1)[1]
    out = set()
    for line in section.splitlines():
        if m := re.match(r"\s+(-\S.*?)(\s{2,}|$)", line):
            out |= set(re.findall(r"--[\w-]+", m.group(1)))
    return out - {"--help"}


def _kind(cls, f: dataclasses.Field) -> tuple[type, type | None]:
    """(the field's type without None, the item type of a tuple or None)."""
    hint = typing.get_type_hints(cls)[f.name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) is tuple:
        return tuple, args[0]
    if len(args) == 1 and typing.get_origin(hint) is not None:  # X | None
        hint = args[0]
    return hint, None


def test_registry_names_its_functions():
    assert NAMES == ["decode", "placement", "spec", "presses", "hf", "batch", "serve", "tp"]
    for b in BENCHES:
        assert dataclasses.is_dataclass(b.load("config"))
        assert all(callable(b.load(k)) for k in ("run", "render", "line", *(("ok",) if b.ok else ())))


@pytest.mark.parametrize("name", NAMES)
def test_help_lists_its_flags_and_no_other_bench_flags(name, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")  # one line per option
    cls = _config(name)
    own = {flag_name(f) for f in cli_fields(cls)} | {a for f in cli_fields(cls) for a in f.metadata.get("aliases", ())}
    shown = _help_flags(name, capsys)
    assert shown == own
    others = {fl for n in NAMES if n != name for fl in flags_of(_config(n)).values()} - own
    assert not shown & others


@pytest.mark.parametrize("name", NAMES)
def test_flags_round_trip_the_defaults(name):
    cls = _config(name)
    ns = cli.build_parser().parse_args(["bench", name])
    assert from_args(cls, ns) == cls()
    argv = []  # every non-bool default given explicitly, as a user would type it
    for f in cli_fields(cls):
        typ, _ = _kind(cls, f)
        if typ is bool:
            continue
        d = f.default
        text = "none" if d is None else f.metadata.get("sep", ",").join(map(str, d)) if typ is tuple else str(d)
        argv += [flag_name(f), text]
    p = argparse.ArgumentParser()
    add_flags(p, cls)
    assert from_args(cls, p.parse_args(argv)) == cls()


def _bad(cls, want_list: bool) -> tuple[str, str] | None:
    """(flag, bad value) for the first int field, or the first list field, of ``cls`` (None: it has none)."""
    for f in cli_fields(cls):
        typ, item = _kind(cls, f)
        if want_list and typ is tuple:
            if item is int:
                return flag_name(f), "8,x"
            if f.metadata.get("choices"):
                return flag_name(f), "bogus"
            sep = f.metadata.get("sep", ",")
            return flag_name(f), f"a{sep}{sep}b"
        if not want_list and typ is int:
            return flag_name(f), "x"
    return None


@pytest.mark.parametrize("want_list", [False, True], ids=["int", "list"])
@pytest.mark.parametrize("name", NAMES)
def test_a_bad_value_is_one_error_naming_its_flag(name, want_list, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # default output folders would land here
    bad = _bad(_config(name), want_list)
    if bad is None:
        pytest.skip(f"bench {name} has no {'list' if want_list else 'int'} flag")
    flag, value = bad
    assert cli.main(["bench", name, flag, value]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mspeckv: error: ") and flag in err[0], err
    assert not any(tmp_path.iterdir())  # nothing written
