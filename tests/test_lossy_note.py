"""The lossy-format note comes from measured quality cells, and only above its threshold."""

import json

from mspeckv.evals.lossy import KL_NOTE, RESULTS, quality_note


def _summary(root, rows):
    d = root / "m"
    d.mkdir(parents=True)
    (d / "summary.json").write_text(json.dumps({"rows": rows}))
    return root


def test_note_from_measured_cells(tmp_path):
    rows = [{"metric": "kl", "variant": "kv=int2/g64/res64/onchip0", "context": 8192, "value": 0.13},
            {"metric": "ppl", "variant": "kv=int2/g64/res64/onchip0", "context": 8192, "value": 18.9,
             "delta_pct": 10.6},
            {"metric": "kl", "variant": "kv=int8/g64/res64/onchip0", "context": 8192, "value": KL_NOTE / 2},
            {"metric": "kl", "variant": "snapkv:budget=0.25", "context": 32768, "value": 0.009}]
    root = _summary(tmp_path, rows)
    note = quality_note("int2", root=root)
    assert note.startswith("note: --kv-quant int2 changes the model's output") and "KL 0.130" in note
    assert "PPL +10.6%" in note and "at 8192 tokens" in note
    assert quality_note("int8", root=root) is None  # measured, below the threshold
    assert quality_note("int4", root=root) is None  # not measured: no note, no guess
    assert "KL 0.009" in quality_note(press="snapkv:budget=0.25", root=root)
    assert quality_note(press="snapkv:budget=0.5", root=root) is None
    assert quality_note("none", root=root) is None


def test_committed_results_give_notes():
    """Against the committed results: int2 always gets a note; int8 gets one exactly when some committed model
    measured its KL at or above the threshold (the 0.5B at 32K: 0.0010; the 1.5B stays at 0.0006-0.0007)."""
    if not (RESULTS / "qwen2.5-coder-1.5b" / "summary.json").exists():
        return
    assert quality_note("int2") is not None
    kls = [r["value"] for f in RESULTS.glob("*/summary.json") for r in json.loads(f.read_text()).get("rows", [])
           if isinstance(r, dict) and r.get("metric") == "kl" and str(r.get("variant", "")).startswith("kv=int8/")
           and r.get("value") is not None]
    note = quality_note("int8")
    assert kls and (note is not None) == (max(kls) >= KL_NOTE)
    if note is not None:
        assert f"KL {max(kls):.3f}" in note
