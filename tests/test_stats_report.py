"""Stats on hand-computed inputs, report rendering from a fake fixture sweep, run store / sweep resume semantics."""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import pytest

from mspeckv.bench import plots as plots_mod
from mspeckv.bench.report import console_table, render, summary_line
from mspeckv.bench.stats import delta, fmt_pm, mean_std, paired, speedup
from mspeckv.runs.store import (
    RunRecord,
    RunSpec,
    RunStore,
    atomic_write_json,
    atomic_write_text,
    run_filename,
    run_metadata,
    run_sweep,
)

FIXTURE = Path(__file__).parent / "fixtures" / "sweep_a1"


# ------------------------------------------------------------------------------------------------------------ stats
def test_mean_std_known_values():
    m, s = mean_std([1.0, 2.0, 3.0, 4.0])
    assert m == 2.5
    assert s == pytest.approx(math.sqrt(5 / 3))  # ddof=1: (2.25+0.25+0.25+2.25)/3
    assert mean_std([5.0]) == (5.0, 0.0)
    assert mean_std([9.0, None, float("nan"), 11.0, float("inf")]) == (10.0, pytest.approx(math.sqrt(2)))
    m, s = mean_std([])
    assert math.isnan(m) and math.isnan(s)


def test_delta_paired_by_seed_uses_intersection():
    a = {0: 10.0, 1: 12.0, 2: 14.0, 5: 99.0}  # seed 5 only in a
    b = {0: 8.0, 1: 9.0, 2: 11.0, 3: 100.0}  # seed 3 only in b
    assert paired(a, b) == [(10.0, 8.0), (12.0, 9.0), (14.0, 11.0)]
    m, s = delta(a, b)  # diffs 2, 3, 3
    assert m == pytest.approx(8 / 3)
    assert s == pytest.approx(math.sqrt(1 / 3))
    # (seed, value) pairs work too; a failed run (None) drops its seed
    assert delta([(0, 5.0), (1, None)], [(0, 3.0), (1, 1.0)]) == (2.0, 0.0)
    m, s = delta({0: 1.0}, {1: 1.0})  # no common seed -> NA
    assert math.isnan(m) and math.isnan(s)
    assert fmt_pm(m, s) == "NA"


def test_speedup_throughput_and_latency():
    m, s = speedup({0: 2.0, 1: 4.0}, {0: 1.0, 1: 1.0})  # ratios 2, 4
    assert (m, s) == (3.0, pytest.approx(math.sqrt(2)))
    m, s = speedup({0: 5.0, 1: 4.0}, {0: 10.0, 1: 10.0}, higher_is_better=False)  # b/a: 2, 2.5
    assert m == pytest.approx(2.25)
    assert s == pytest.approx(0.5 / math.sqrt(2))
    m, s = speedup({0: 5.0, 1: 4.0, 2: None}, {1: 10.0, 2: 10.0, 3: 1.0}, higher_is_better=False)  # only seed 1
    assert (m, s) == (2.5, 0.0)
    assert all(math.isnan(v) for v in speedup({}, {0: 1.0}))


def test_fmt_pm():
    assert fmt_pm(12.3412, 0.5612) == "12.34 ± 0.56"
    assert fmt_pm(2.0, 0.0, digits=3) == "2.000 ± 0.000"
    assert fmt_pm(float("nan"), 1.0) == "NA"
    assert fmt_pm(None, None) == "NA"
    assert fmt_pm(3.0, float("nan")) == "3.00"


# ----------------------------------------------------------------------------------------------------------- report
@pytest.fixture
def sweep_dir(tmp_path: Path) -> Path:
    d = tmp_path / "sweep_a1"
    shutil.copytree(FIXTURE, d)
    return d


SPEEDUP_HEADER = "| prefill | vanilla_vs_base | no_kv_quant_vs_base | kv_quant_vs_base | quant_vs_no_quant |"


def test_report_renders_fixture(sweep_dir: Path):
    summary = render(sweep_dir)
    for name in ("summary.csv", "summary.json", "summary.md", "throughput.png", "latency.png", "breakdown.png"):
        assert (sweep_dir / name).is_file(), name
    assert not [p for p in sweep_dir.rglob("*") if p.name.endswith(".tmp") or ".tmp." in p.name]
    md = (sweep_dir / "summary.md").read_text()

    # header
    for line in ("- weights: random", "- GPU: FAKE-GPU-0", "- commit: ffffffffffff", "- seeds: 0, 1, 2"):
        assert line in md
    assert 'model: `"fake-model-for-tests"`' in md
    # mean ± std cells (hand-computed from the fixture)
    assert "| 2048 | 12.80 ± 0.80 | 16.00 ± 1.00 | 26.00 ± 1.00 | 52.00 ± 2.00 | 20.00 ± 0.00 |" in md
    assert "| 2048 | 10.00 ± 1.00 | 8.00 ± 0.80 | 4.83 ± 0.29 | 2.42 ± 0.14 | 6.00 ± 0.00 |" in md
    assert "| 2048 | NA | 2.50 ± 0.50 | 3.50 ± 0.50 | 3.50 ± 0.50 | 2.00 ± 0.00 |" in md
    # delta/speedup columns vs baseline: vanilla 2048 throughput diffs 3, 3.2, 3.4 and latency ratios 1.25
    assert "| Δ vanilla_specdec vs baseline | × vanilla_specdec vs baseline |" in md
    assert "| +3.20 ± 0.20 | 1.25 ± 0.00 |" in md
    assert "| -2.00 ± 0.20 | 1.25 ± 0.00 |" in md
    # failures: all 3 hf_assisted runs at 4096, and 1/3 mspeckv_kv_quant runs (partial -> footnote)
    assert "FAILED (3/3: OutOfMemoryError)" in md
    assert "| 4.90 ± 0.21 [^2] |" in md
    assert "[^2]: prefill=4096, mspeckv_kv_quant: 1/3 runs failed (OutOfMemoryError)" in md
    # latency speedup summary (baseline/vanilla, baseline/mspeckv, baseline/kv_quant, mspeckv/kv_quant, hf/kv_quant)
    assert SPEEDUP_HEADER + " kv_quant_vs_hf |" in md
    assert "| 2048 | 1.25 ± 0.00 | 2.07 ± 0.12 | 4.13 ± 0.23 | 2.00 ± 0.00 | 2.49 ± 0.15 |" in md
    assert "| 4096 | 1.25 ± 0.00 | 2.00 ± 0.00 | 3.98 ± 0.03 | 1.99 ± 0.01 | FAILED |" in md

    # json + csv
    data = json.loads((sweep_dir / "summary.json").read_text())
    assert data["n_runs"] == 30 and data["n_ok"] == 26 and data["n_failed"] == 4
    assert data["x_name"] == "prefill" and data["x_values"] == [2048, 4096]
    rows = {(r["x"], r["method"]): r for r in data["rows"]}
    assert len(rows) == 10
    assert rows[(2048, "mspeckv")]["latency_speedup_vs_baseline_mean"] == pytest.approx(2.0 + 0.2 / 3)
    assert rows[(2048, "mspeckv_kv_quant")]["latency_speedup_vs_mspeckv_mean"] == pytest.approx(2.0)
    assert rows[(4096, "hf_assisted")]["errors"] == {"OutOfMemoryError": 3}
    assert rows[(4096, "hf_assisted")]["tok_per_s_mean"] is None
    assert rows[(4096, "mspeckv_kv_quant")]["n_ok"] == 2
    with open(sweep_dir / "summary.csv", newline="") as f:
        csv_rows = list(csv.DictReader(f))
    assert len(csv_rows) == 10
    hf = next(r for r in csv_rows if r["x"] == "4096" and r["method"] == "hf_assisted")
    assert hf["n_failed"] == "3" and hf["errors"] == "OutOfMemoryError:3" and hf["tok_per_s_mean"] == ""

    assert summary["files"]["summary_md"].endswith("summary.md")
    table = console_table(summary)
    assert "prefill" in table and "mspeckv_kv_quant" in table and "0/3" in table
    line = summary_line(summary)
    assert "\n" not in line and json.loads(line)["n_failed"] == 4


def test_report_without_hf_and_without_matplotlib(sweep_dir: Path, monkeypatch: pytest.MonkeyPatch):
    for p in (sweep_dir / "runs").glob("*hf_assisted*"):
        p.unlink()

    def missing():
        raise plots_mod.PlotDependencyError(f"plots need matplotlib: {plots_mod.INSTALL_HINT}")

    monkeypatch.setattr(plots_mod, "figure_cls", missing)
    with pytest.warns(UserWarning, match="plots skipped"):
        summary = render(sweep_dir)
    md = (sweep_dir / "summary.md").read_text()
    assert SPEEDUP_HEADER + "\n" in md  # exactly these columns without hf_assisted
    assert "kv_quant_vs_hf" not in md and "hf_assisted" not in md
    assert not (sweep_dir / "throughput.png").exists() and not (sweep_dir / "breakdown.png").exists()
    assert summary["warnings"] and "mspeckv[plot]" in summary["warnings"][0]


def test_report_missing_dir(tmp_path: Path):
    with pytest.raises(FileNotFoundError):
        render(tmp_path / "nope")


# ---------------------------------------------------------------------------------------------------- store / sweep
def test_run_filename_deterministic_and_safe():
    assert run_filename("a1", "mspeckv", "prefill", 4096, 0) == "a1__mspeckv__prefill=4096__seed0.json"
    weird = run_filename("a/1", "m s", "x", "../etc", 1)
    assert "/" not in weird and " " not in weird and weird == run_filename("a/1", "m s", "x", "../etc", 1)
    assert run_filename("s", "m", "x", "a/b", 0) != run_filename("s", "m", "x", "a-b", 0)
    assert run_filename("s", "m", "x", 0.5, 0) != run_filename("s", "m", "x", 5, 0)


def test_fixture_files_match_store_paths():
    store = RunStore(FIXTURE)
    records = store.load_all()
    assert len(records) == 30
    for r in records:
        assert store.path_for(r).is_file()
        assert store.done(r) == (r["status"] == "ok")


class OutOfMemoryError(RuntimeError):  # stands in for torch.cuda.OutOfMemoryError (matched by name only)
    pass


def _plan() -> list[RunSpec]:
    return [
        RunSpec("t", m, "prefill", 128, seed, {"weights": "random"}) for m in ("baseline", "mspeckv") for seed in (0, 1)
    ]


def test_sweep_resume_skips_ok_and_retries_failed(tmp_path: Path):
    store = RunStore(tmp_path)
    calls: list[tuple[str, int]] = []
    fail = {("mspeckv", 1)}

    def fn(spec: RunSpec) -> dict:
        calls.append((spec.method, spec.seed))
        if (spec.method, spec.seed) in fail:
            raise OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return {"latency_s": 1.0 + spec.seed, "tok_per_s": 10.0}

    recs = run_sweep(store, _plan(), fn, progress=True)
    assert len(calls) == 4 and [r.status for r in recs] == ["ok", "ok", "ok", "failed"]
    assert recs[3].error == "OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"
    assert recs[0].meta["hostname"] and "wall_s" in recs[0].meta
    assert len(store.load_all()) == 4
    assert not store.done(_plan()[3]) and store.done(_plan()[0])

    calls.clear()
    fail.clear()
    recs = run_sweep(store, _plan(), fn, progress=False)
    assert calls == [("mspeckv", 1)]  # only the failed run is retried
    assert all(r.ok for r in recs) and recs[3].metrics["latency_s"] == 2.0

    calls.clear()
    run_sweep(store, _plan(), fn, progress=False)
    assert calls == []


def test_sweep_records_bad_return_and_keeps_going(tmp_path: Path):
    store = RunStore(tmp_path)
    recs = run_sweep(store, _plan()[:2], lambda s: None if s.seed == 0 else {"x": 1}, progress=False)
    assert recs[0].status == "failed" and recs[0].error.startswith("TypeError")
    assert recs[1].ok


def test_keyboard_interrupt_propagates_without_partial_file(tmp_path: Path):
    store = RunStore(tmp_path)

    def fn(spec: RunSpec) -> dict:
        if spec.seed == 1:
            raise KeyboardInterrupt
        return {"latency_s": 1.0}

    with pytest.raises(KeyboardInterrupt):
        run_sweep(store, _plan(), fn, progress=False)
    names = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert names == [run_filename("t", "baseline", "prefill", 128, 0)]


def test_atomic_write_leaves_no_temp_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    target = tmp_path / "sub" / "x.json"
    atomic_write_json(target, {"a": float("nan"), "b": (1, 2)})
    assert json.loads(target.read_text()) == {"a": None, "b": [1, 2]}
    assert [p.name for p in target.parent.iterdir()] == ["x.json"]

    def boom(src, dst):
        raise OSError("disk on fire")

    monkeypatch.setattr("mspeckv.runs.store.os.replace", boom)
    with pytest.raises(OSError, match="disk on fire"):
        atomic_write_text(target, "new content")
    assert json.loads(target.read_text())["b"] == [1, 2]  # old content intact
    assert [p.name for p in target.parent.iterdir()] == ["x.json"]


def test_store_done_ignores_corrupt_json(tmp_path: Path):
    store = RunStore(tmp_path)
    spec = _plan()[0]
    p = store.path_for(spec)
    p.parent.mkdir(parents=True)
    p.write_text("{not json")
    assert not store.done(spec)
    assert store.load_all() == []


def test_run_record_roundtrip_and_metadata():
    meta = run_metadata()
    for key in ("git_commit", "git_dirty", "python", "torch", "transformers", "hostname", "gpu", "timestamp"):
        assert key in meta
    assert meta["git_commit"] is None or len(meta["git_commit"]) == 40
    rec = RunRecord("s", "prefill", 1, "baseline", 0, "ok", config={"w": 1}, metrics={"v": float("inf")}, meta=meta)
    d = rec.to_dict()
    assert d["metrics"]["v"] is None and json.dumps(d)
    assert RunRecord.from_dict(d).config == {"w": 1}


def test_metadata_commit_from_env_when_there_is_no_git(monkeypatch: pytest.MonkeyPatch):
    from mspeckv.runs import store as results_mod

    monkeypatch.setattr(results_mod, "_git", lambda *a: None)  # e.g. a copy of the tree on a GPU machine
    monkeypatch.setenv("MSPECKV_GIT_COMMIT", "a" * 40)
    monkeypatch.setenv("MSPECKV_GIT_DIRTY", "1")
    results_mod._static_metadata.cache_clear()
    try:
        meta = run_metadata()
        assert meta["git_commit"] == "a" * 40 and meta["git_dirty"] is True
        monkeypatch.delenv("MSPECKV_GIT_COMMIT")
        results_mod._static_metadata.cache_clear()
        assert run_metadata()["git_commit"] is None  # nothing claimed without git or the variable
    finally:
        results_mod._static_metadata.cache_clear()


# -------------------------------------------------------------------------------------------------- breakdown
def test_breakdown_of_one_run_and_of_a_group():
    from mspeckv.bench.breakdown import group_breakdown, run_breakdown

    m = {"latency_s": 2.0, "per_level_s": {"prefill": 9.0, "draft": 0.5, "verify_l1": 0.4, "verify_l2": 1.0},
         "levels": {"verify_l1": {"rounds": 8, "proposed": 20}, "verify_l2": {"rounds": 4}}, "decode_ms_per_token": 7.8,
         "bytes_per_token": 2e6, "resident_hit_rate": 0.5}  # fmt: skip
    b = run_breakdown(m)
    assert b["draft_share"] == pytest.approx(0.25) and "draft_ms_per_call" not in b  # drafts have no rounds ...
    assert b["draft_ms_per_token"] == pytest.approx(25.0)  # ... but L1 counted the 20 tokens they proposed
    vanilla = run_breakdown({"latency_s": 1.0, "per_level_s": {"draft": 0.3, "verify_l2": 0.6},
                             "levels": {"verify_l2": {"rounds": 3, "proposed": 12}}})
    assert vanilla["draft_ms_per_token"] == pytest.approx(25.0) and vanilla["verify_l1_s"] is None
    assert b["verify_l1_ms_per_call"] == pytest.approx(50.0) and b["verify_l2_ms_per_call"] == pytest.approx(250.0)
    assert b["other_s"] == pytest.approx(0.1) and b["other_share"] == pytest.approx(0.05)  # prefill is not decode
    assert b["h2d_MB_per_token"] == pytest.approx(2.0) and b["resident_hit_rate"] == 0.5
    assert run_breakdown({**m, "decode_bytes_per_token": 1e6})["h2d_MB_per_token"] == pytest.approx(1.0)  # decode only
    base = run_breakdown({"latency_s": 3.0, "per_level_s": {"prefill": 1.0, "decode": 3.0}})
    assert base["draft_s"] is None and base["other_s"] is None and base["latency_s"] == 3.0
    g = group_breakdown([{"metrics": m}, {"metrics": {**m, "latency_s": 4.0}}])
    assert g["latency_s"] == pytest.approx(3.0) and g["draft_share"] == pytest.approx((0.25 + 0.125) / 2)


def test_report_has_the_breakdown_table(sweep_dir: Path):
    summary = render(sweep_dir)
    md = (sweep_dir / "summary.md").read_text()
    assert "## Where the decode time goes (mean over seeds)" in md
    assert "**Random weights.**" in md  # the fixture is labelled random
    # fixture: latencies 4.5, 5, 5 and levels 0.1/0.2/0.3 s -> shares 2%, 4%, 6%, other 4.23 s (88%)
    assert "| 2048 | mspeckv | 4.83 | 0.10 (2%) | – | 0.20 (4%) | – | 0.30 (6%) | – | 4.23 (88%) |" in md
    assert "| 2048 | hf_assisted |" not in md  # transformers exposes no per-level times
    rows = {(r["prefill"], r["method"]): r for r in summary["breakdown"]}
    assert rows[(2048, "mspeckv")]["other_s"] == pytest.approx(5 - 0.5 / 3 - 0.6)
    assert (4096, "hf_assisted") not in rows


def test_unusable_values_and_seed_order():
    """bools and non-numbers are not measurements; paired() orders numeric seeds numerically, then named ones."""
    from mspeckv.bench.stats import clean, mean_std, paired

    assert clean([True, False, "abc", object(), 2, None, float("nan")]) == [2.0]
    assert mean_std([True, 3.0, "x"]) == (3.0, 0.0)
    a = {"b": 1.0, 10: 2.0, "a": 3.0, 2: 4.0}
    b = {"a": 5.0, 2: 6.0, "b": 7.0, 10: 8.0}
    assert paired(a, b) == [(4.0, 6.0), (2.0, 8.0), (3.0, 5.0), (1.0, 7.0)]  # seeds 2, 10, "a", "b"
