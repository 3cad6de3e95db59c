"""The run layer's one rule for resumable cells (benches and evals alike), the files it writes, and that every
committed kind of result folder renders as it did before the run layer moved (goldens rendered by the old code)."""

import json
import os
import shutil
import stat
import subprocess
import time
from pathlib import Path

import pytest

from mspeckv.bench import report as bench_report
from mspeckv.evals import report as eval_report
from mspeckv.evals.runner import EvalConfig, asked, plan
from mspeckv.runs import store
from mspeckv.runs.store import RunSpec, RunStore, atomic_write_json, atomic_write_text, run_sweep
from mspeckv.runs.template import CellStore

FIXTURES = Path(__file__).parent / "fixtures"
INT8 = "kv=int8/g16/res16/onchip0"


def _truncate(p: Path) -> None:
    p.write_text(p.read_text()[: len(p.read_text()) // 2])


# ------------------------------------------------------------------------------------------- damaged cells: evals
def test_truncated_eval_cell_is_not_done_and_is_planned_again(tmp_path):
    store = CellStore(tmp_path)
    cfg = EvalConfig(metrics=("ppl",), context=(128,), scored=32, kv_quant=("int8",), kv_group_size=16)
    for v in cfg.variants():
        store.save("ppl", v.name, 128, {"ppl": 1.0}, {"model": cfg.model, "scored": 32})
    assert plan(cfg, store) == []
    bad = store.path("ppl", cfg.variants()[1].name, 128)
    _truncate(bad)
    assert not store.done("ppl", cfg.variants()[1].name, 128) and store.load("ppl", cfg.variants()[1].name, 128) is None
    todo = plan(cfg, store)
    assert [(f.name, c, [v.name for v in vs]) for f, c, vs in todo] == [("lm", 128, [v.name for v in cfg.variants()])]
    cells, skipped = store.scan()
    assert len(cells) == 1 and [s.name for s in skipped] == [bad.name] and skipped[0].damaged


def _eval_copy(tmp_path: Path) -> Path:
    d = tmp_path / "run"
    shutil.copytree(FIXTURES / "evals", d)
    return d


def test_eval_report_marks_partial_and_names_an_unreadable_cell(tmp_path):
    d = _eval_copy(tmp_path)
    bad = d / "cells" / "kl__kv=int8-g16-res16-onchip0__ctx=128.json"
    _truncate(bad)
    s = eval_report.render(d, plots=False)
    assert s["partial"] and s["n_damaged"] == 1 and s["n_cells"] == 13
    assert len(s["skipped"]) == 1 and bad.name in s["skipped"][0] and "unreadable" in s["skipped"][0]
    md = (d / "summary.md").read_text()
    assert md.splitlines()[0] == "# Quality evaluation (PARTIAL: 1 unreadable)"
    assert f"1 file(s) in cells/ hold no cell (not counted): {bad}" in md


def test_eval_report_marks_partial_and_names_a_missing_cell(tmp_path):
    d = _eval_copy(tmp_path)
    CellStore(d).expect([("ppl", "full", 128), ("ppl", INT8, 128), ("ppl", INT8, 256)])
    s = eval_report.render(d, plots=False)
    assert s["partial"] and s["missing"] == [f"ppl {INT8} ctx=256"] and s["skipped"] == []
    md = (d / "summary.md").read_text()
    assert md.splitlines()[0] == "# Quality evaluation (PARTIAL: 1 cell(s) missing)"
    assert f"> **Missing:** ppl {INT8} ctx=256" in md


def test_eval_report_names_and_counts_foreign_json_without_partial(tmp_path):
    d = _eval_copy(tmp_path)
    (d / "cells" / "notes.json").write_text('{"note": "mine"}')
    (d / "cells" / "list.json").write_text("[1, 2]")
    s = eval_report.render(d, plots=False)
    assert not s["partial"] and s["n_cells"] == 14 and s["n_damaged"] == 0 and len(s["skipped"]) == 2
    assert any("notes.json (not an eval cell: no metric, variant, context, status)" in x for x in s["skipped"])
    assert any("list.json (a JSON array, not an eval cell)" in x for x in s["skipped"])
    assert "2 file(s) in cells/ hold no cell" in (d / "summary.md").read_text()
    assert (d / "summary.md").read_text().splitlines()[0] == "# Quality evaluation"


def test_expected_cells_are_what_the_plan_runs(tmp_path):
    cfg = EvalConfig(metrics=("ppl", "kl"), context=(128, 256), scored=32, kv_quant=("int8",), kv_group_size=16)
    cells = asked(cfg)
    names = [v.name for v in cfg.variants()]
    assert sorted(cells) == sorted((m, v, c) for m in ("ppl", "kl") for v in names for c in (128, 256))
    store = CellStore(tmp_path)
    store.expect(cells[:2])
    store.expect(cells[1:3])
    assert store.expected() == set(cells[:3])


# ------------------------------------------------------------------------------------------- damaged runs: benches
def _specs():
    return [RunSpec("t", m, "x", 1, s, {}) for m in ("a", "b") for s in (0, 1)]


def test_truncated_run_is_run_again_and_named_until_then(tmp_path):
    store = RunStore(tmp_path)
    calls = []
    fn = lambda s: calls.append((s.method, s.seed)) or {"v": 1.0}
    run_sweep(store, _specs(), fn, progress=False)
    assert len(calls) == 4
    bad = store.path_for(_specs()[2])
    _truncate(bad)
    records, skipped = store.scan()
    assert len(records) == 3 and [s.name for s in skipped] == [bad.name] and skipped[0].damaged
    summary = bench_report.render(tmp_path, plots=False)
    assert summary["partial"] and bad.name in summary["warnings"][0]
    calls.clear()
    run_sweep(store, _specs(), fn, progress=False)
    assert calls == [("b", 0)] and store.done(_specs()[2])


# ---------------------------------------------------------------------------------------------------- the files
def test_result_files_are_written_0644(tmp_path):
    old = os.umask(0o077)  # even a strict umask: results are meant to be read by others
    try:
        a = atomic_write_json(tmp_path / "a.json", {"x": 1})
        b = atomic_write_text(tmp_path / "b.md", "x")
        c = CellStore(tmp_path).save("ppl", "full", 8, {}, {})
    finally:
        os.umask(old)
    for p in (a, b, c):
        assert stat.S_IMODE(p.stat().st_mode) == 0o644, p


def test_stale_temp_files_are_removed_on_resume_and_fresh_ones_kept(tmp_path):
    store = RunStore(tmp_path)
    store.runs_dir.mkdir(parents=True)
    stale = store.runs_dir / ".t__a__x=1__seed0.json.k3j2.tmp"
    stale_summary = tmp_path / ".summary.md.x8a1.tmp"
    fresh = store.runs_dir / ".t__b__x=1__seed0.json.a1b2.tmp"  # another job's write in progress
    for p in (stale, stale_summary, fresh):
        p.write_text("{")
    old = time.time() - 3600
    for p in (stale, stale_summary):
        os.utime(p, (old, old))
    run_sweep(store, _specs(), lambda s: {"v": 1.0}, progress=False)
    assert not stale.exists() and not stale_summary.exists() and fresh.exists()

    cells = CellStore(tmp_path / "ev")
    cells.cells_dir.mkdir(parents=True)
    left = cells.cells_dir / ".ppl__full__ctx=8.json.zz.tmp"
    left.write_text("{")
    os.utime(left, (old, old))
    assert cells.clean() == [left] and not left.exists()


# ------------------------------------------------------------------------------------------ committed folders render
def _same_json(got: dict, want: dict, skip=("dir", "files")) -> None:
    for k, v in want.items():
        if k not in skip:
            assert got.get(k) == v, k


@pytest.mark.parametrize("name", ["evals", "sweep_a1"])
def test_fixture_folders_render_as_before(tmp_path, name):
    """summary.md/.csv byte for byte, and every field of summary.json, as the code before the run layer rendered
    them (tests/fixtures/rendered/, made from tests/fixtures/{evals,sweep_a1}; ``{DIR}`` stands for the folder)."""
    d = tmp_path / name
    shutil.copytree(FIXTURES / name, d)
    render = eval_report.render if name == "evals" else bench_report.render
    render(d, plots=False)
    want = lambda f: (FIXTURES / "rendered" / name / f).read_text().replace("{DIR}", str(d))
    for f in ("summary.md", "summary.csv"):
        assert (d / f).read_text() == want(f), f
    _same_json(json.loads((d / "summary.json").read_text()), json.loads(want("summary.json")))


# ------------------------------------------------------------------------------------------------- provenance
def _git(d: Path, *args: str) -> str:
    cmd = ["git", "-C", str(d), "-c", "user.email=t@example.com", "-c", "user.name=t", *args]
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture
def repo(tmp_path):
    """A git checkout holding a package folder laid out like mspeckv's (``__init__.py``, the ``COMMIT`` template)."""
    root = tmp_path / "repo"
    pkg = root / "pkg"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("x = 1\n")
    (pkg / "COMMIT").write_text((Path(store.__file__).parent.parent / "COMMIT").read_text())
    (root / ".gitattributes").write_text("pkg/COMMIT export-subst\n")
    _git(root, "init", "-q")
    _git(root, "add", ".")
    _git(root, "commit", "-qm", "one")
    return root, pkg, _git(root, "rev-parse", "HEAD")


PIN = {"MSPECKV_GIT_COMMIT": "f" * 40, "MSPECKV_GIT_DIRTY": "0"}


def test_provenance_asks_git_in_a_checkout_and_ignores_the_env(repo):
    root, pkg, head = repo
    assert store.provenance(pkg, PIN) == {"git_commit": head, "git_dirty": False, "commit_source": "git"}
    (pkg / "__init__.py").write_text("x = 2\n")
    assert store.provenance(pkg, PIN) == {"git_commit": head, "git_dirty": True, "commit_source": "git"}


def test_provenance_reads_the_stamp_of_a_git_archive_copy(repo, tmp_path):
    root, pkg, head = repo
    copy = tmp_path / "copy"
    copy.mkdir()
    tar = subprocess.run(["git", "-C", str(root), "archive", "HEAD"], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(copy)], input=tar, check=True)
    assert (copy / "pkg" / "COMMIT").read_text().strip() == head
    assert store.provenance(copy / "pkg", PIN) == {"git_commit": head, "git_dirty": None, "commit_source": "stamp"}


def test_provenance_takes_the_env_only_without_git_or_stamp(repo, tmp_path):
    _, pkg, _ = repo
    bare = tmp_path / "bare"
    shutil.copytree(pkg, bare)  # a copy of the files: no .git, the COMMIT template not filled in
    assert store.provenance(bare, PIN) == {"git_commit": "f" * 40, "git_dirty": None, "commit_source": "env"}
    dirty = {**PIN, "MSPECKV_GIT_DIRTY": "1"}
    assert store.provenance(bare, dirty) == {"git_commit": "f" * 40, "git_dirty": True, "commit_source": "env"}
    assert store.provenance(bare, {}) == {"git_commit": None, "git_dirty": None, "commit_source": "unknown"}


def test_the_package_carries_the_stamp_template():
    """mspeckv/COMMIT is filled in by ``git archive`` (export-subst); in a checkout it is the template."""
    pkg = Path(store.__file__).parent.parent
    assert (pkg / "COMMIT").read_text().strip() == "$Format:%H$"
    assert "mspeckv/COMMIT export-subst" in (pkg.parent / ".gitattributes").read_text().splitlines()
    meta = store.run_metadata()
    assert meta["commit_source"] in ("git", "stamp", "env", "unknown") and "git_dirty" in meta


def test_check_fields_applies_each_fields_declaration():
    """A field's type, choices and range, declared once on the field, are what ``check_fields`` enforces."""
    from dataclasses import dataclass

    from mspeckv.runs.template import check_fields, opt
    from mspeckv.validate import ConfigError

    @dataclass(frozen=True)
    class C:
        n: int = opt(2, "n", lo=2)
        xs: tuple[int, ...] = opt((1,), "xs", lo=0)
        kind: str = opt("a", "kind", choices=("a", "b"))
        name: str | None = opt(None, "name")
        flag: bool = opt(False, "flag")
        free: int = opt(0, "left to the config", check=False)

        def __post_init__(self):
            check_fields(self)

    C(free=-5)  # check=False: not this function's to refuse
    for kw, msg in (({"n": 1}, "n must be an integer >= 2, got 1"), ({"n": True}, "n must be an integer"),
                    ({"xs": (1, 1)}, "xs must be a non-empty tuple of distinct integers >= 0"),
                    ({"xs": ()}, "xs must be a non-empty tuple"), ({"kind": "c"}, "kind must be one of a, b"),
                    ({"name": ""}, "name must be a non-empty string"), ({"flag": 1}, "flag must be True or False")):
        with pytest.raises(ConfigError, match=msg):
            C(**kw)


def test_md_table_aligns_columns_and_keeps_written_rows(tmp_path):
    from mspeckv.runs.tables import csv_text, md_table

    text = md_table(["a", "b", "c"], [[1, "x", None], "| raw | | |"], "rl")
    assert text.splitlines() == ["| a | b | c |", "|---:|---|---|", "| 1 | x | None |", "| raw | | |"]
    assert csv_text([{"a": 1, "b": None}, {"b": 2, "z": 9}], ["a", "b"]).splitlines() == ["a,b", "1,", ",2"]


def test_read_json_object_is_empty_for_what_holds_no_object(tmp_path):
    from mspeckv.runs.store import read_json_object

    (tmp_path / "ok.json").write_text('{"planned": [1]}')
    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / "cut.json").write_text('{"planned": [')
    assert read_json_object(tmp_path / "ok.json") == {"planned": [1]}
    assert read_json_object(tmp_path / "list.json") == read_json_object(tmp_path / "cut.json") == {}
    assert read_json_object(tmp_path / "absent.json") == {}


def test_changed_with_given_counts_only_flags_on_the_command_line():
    from argparse import Namespace
    from dataclasses import dataclass

    from mspeckv.runs.template import changed, opt

    @dataclass(frozen=True)
    class C:
        budget: int = opt(8, "budget")
        chunk: int = opt(4, "chunk")

    cfg = C(budget=16, chunk=2)  # say --budget was typed and a preset set chunk
    assert changed(cfg, "budget", "chunk") == ["--budget", "--chunk"]
    assert changed(cfg, "budget", "chunk", given=Namespace(budget="16", chunk=None)) == ["--budget"]
