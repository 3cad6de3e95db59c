"""tools/project.py: the projection's arithmetic on hand-made sweep folders (one seed, round numbers)."""

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("project", ROOT / "tools" / "project.py")
project = importlib.util.module_from_spec(spec)
spec.loader.exec_module(project)


def _run(d: Path, method: str, x: int, seed: int, **metrics) -> None:
    rec = {"method": method, "x": x, "seed": seed, "status": "ok", "metrics": metrics,
           "config": {"target": "t", "draft": "d", "weights": "real"}, "meta": {"git_commit": "abc", "gpu": "G"}}
    (d / "runs").mkdir(parents=True, exist_ok=True)
    (d / "runs" / f"{method}_{x}_{seed}.json").write_text(json.dumps(rec))


def _spec(d, x, seed, draft_s, l1_s, l2_s, l1_rounds, l2_rounds, proposed, accepted_per_round):
    _run(d, "mspeckv", x, seed, per_level_s={"draft": draft_s, "verify_l1": l1_s, "verify_l2": l2_s},
         levels={"verify_l1": {"rounds": l1_rounds, "proposed": proposed},
                 "verify_l2": {"rounds": l2_rounds, "accepted_per_round": accepted_per_round}})


def test_projection_arithmetic(tmp_path):
    costs, acc = tmp_path / "costs", tmp_path / "acc"
    # costs at 32768: draft 1 ms/token (0.1 s / 100), L1 10 ms/call (0.2 s / 20), L2 50 ms/call (0.5 s / 10);
    # AR 100 ms/token. Seeds 1 and 2 identical: medians are these numbers.
    for seed in (1, 2):
        _spec(costs, 32768, seed, 0.1, 0.2, 0.5, 20, 10, 100, 0.0)
        _run(costs, "baseline", 32768, seed, decode_ms_per_token=100.0)
        _run(costs, "ar_gpu", 32768, seed, decode_ms_per_token=20.0)
    # acceptance at 32512 (nearest: 32768): per L2 round 7 tokens made, 3 L1 calls, 8 draft tokens;
    # at 8192: 9 tokens made, 4 L1 calls, 8 draft tokens (only in the range column)
    _spec(acc, 32512, 1, 9.0, 9.0, 9.0, 30, 10, 80, 6.0)
    _spec(acc, 8192, 1, 9.0, 9.0, 9.0, 40, 10, 80, 8.0)
    rows = project.project(project.costs(project._runs(costs)), project.acceptance(project._runs(acc)))
    (r,) = rows
    assert r["context_acceptance"] == 32512 and r["context_costs"] == 32768
    assert not r["acceptance_extrapolated"]
    assert r["tokens_per_round"] == 7 and r["l1_calls_per_round"] == 3 and r["draft_tokens_per_round"] == 8
    assert r["ms_per_round"] == pytest.approx(8 * 1.0 + 3 * 10.0 + 50.0)  # 88 ms
    assert r["projected_tok_s"] == pytest.approx(7 / 88e-3)
    assert r["projected_speedup_vs_baseline"] == pytest.approx(7 / 88e-3 / 10.0)  # AR: 10 tok/s
    assert r["projected_speedup_vs_ar_gpu"] == pytest.approx(7 / 88e-3 / 50.0)  # all on the GPU: 50 tok/s
    # 8192's acceptance: 8 x 1 + 4 x 10 + 50 = 98 ms for 9 tokens
    assert r["projected_tok_s_range"] == pytest.approx([7 / 88e-3, 9 / 98e-3])
    assert r["label"].startswith("PROJECTION") and r["draft_cost_from"] == "costs"
    # the acceptance folder's own draft: 9 s / 80 tokens = 112.5 ms per token replaces 1 ms
    (r2,) = project.project(project.costs(project._runs(costs)), project.acceptance(project._runs(acc)),
                            project.costs(project._runs(acc)))
    assert r2["draft_ms_per_token"] == pytest.approx(112.5) and r2["draft_cost_from"] == "acceptance"
    assert r2["ms_per_round"] == pytest.approx(8 * 112.5 + 3 * 10.0 + 50.0)
    md = project.render({"costs_source": {"folder": "c", **project._meta(project._runs(costs))},
                         "acceptance_source": {"folder": "a", **project._meta(project._runs(acc))}, "rows": rows})
    assert "PROJECTION" in md and "not a measurement" in md


def test_projection_refuses_empty_folders(tmp_path):
    (tmp_path / "runs").mkdir()
    with pytest.raises(ValueError, match="no successful runs"):
        project._runs(tmp_path)


def test_projection_marks_a_costs_context_beyond_the_acceptance(tmp_path):
    costs, acc = tmp_path / "costs", tmp_path / "acc"
    for x in (32768, 65536):
        _spec(costs, x, 1, 0.1, 0.2, 0.5, 20, 10, 100, 0.0)
    _spec(acc, 32512, 1, 9.0, 9.0, 9.0, 30, 10, 80, 6.0)
    rows = project.project(project.costs(project._runs(costs)), project.acceptance(project._runs(acc)))
    assert [(r["context_costs"], r["context_acceptance"], r["acceptance_extrapolated"]) for r in rows] == \
        [(32768, 32512, False), (65536, 32512, True)]
    assert rows[1]["baseline_tok_s"] is None and rows[1]["projected_speedup_vs_ar_gpu"] is None
    md = project.render({"costs_source": {"folder": "c", **project._meta(project._runs(costs))},
                         "acceptance_source": {"folder": "a", **project._meta(project._runs(acc))}, "rows": rows})
    assert "65536 / 32512 ⁺" in md and "longest measured acceptance stands in" in md
