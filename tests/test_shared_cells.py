"""The helpers the benches and evals now share (issue 24's line goal): table cells, needle hits, pooled acceptance,
and ar_gpu as our engine's AR without a placement."""

from types import SimpleNamespace

from mspeckv.evals import accept
from mspeckv.evals.goals import needle_hits
from mspeckv.runs import harness
from mspeckv.runs.tables import fmt, number


def test_number_and_fmt_take_ints_and_floats_only():
    assert number(3) and number(2.5) and not number(True) and not number(None) and not number("1")
    assert fmt(3, "{:.1f}") == "3.0" and fmt(2.345) == "2.35"
    assert fmt(True) == "–" and fmt(None, na="NA") == "NA" and fmt("failed: x", na="-") == "-"
    assert harness.fmt is fmt  # the benches' old import path still gives the same function


def test_needle_hits_reads_hits_else_rounds_accuracy():
    assert needle_hits({"hits": 7, "accuracy": 0.0, "n": 10}) == 7
    assert needle_hits({"accuracy": 0.75, "n": 8}) == 6  # cells from before ``hits`` was recorded


def test_accept_pools_levels_over_prompts():
    runs = [SimpleNamespace(levels={"verify_l1": {"accepted": 3, "proposed": 4}, "verify_l2": {"accepted": 5}}),
            SimpleNamespace(levels={"verify_l2": {"accepted": 2, "rounds": 1}})]  # no middle level in this one
    assert accept._pooled(runs, "verify_l1", "accepted") == 3 and accept._pooled(runs, "verify_l1", "proposed") == 4
    assert accept._pooled(runs, "verify_l2", "accepted") == 7 and accept._pooled(runs, "verify_l2", "rounds") == 1


def test_ar_gpu_runs_every_layer_on_the_gpu_without_the_sweeps_placement():
    from mspeckv.bench import methods
    from mspeckv.bench.sweep_settings import CONFIGS

    s = CONFIGS["context"](xs=(32,), methods=("ar_gpu", "baseline"), target="random:tiny", draft="random:tiny",
                           gen_len=3, on_chip=2, resident_layers=0, device="cpu", output_dir="unused")
    ctx = methods.load_context(s)
    ar, base = (methods.METHOD_FNS[m](ctx, 32, 1) for m in ("ar_gpu", "baseline"))
    assert ar["placement"] == "every layer on the GPU (graphed on CUDA)" and ar["resident_layers"] == 0
    assert "offloaded" in base["placement"]  # the baseline keeps the sweep's placement (2 of 4 layers on the chip)
    assert ar["n_generated"] == 3 and set(ar["per_level_s"]) == {"prefill", "decode"}
    assert ar["accepted"] is None and ar["levels"] is None and ar["verifications"] is None
    assert ar["bytes_transferred"] == 0 and ar["decode_bytes_per_token"] is None
    assert ar["e2e_s"] >= ar["ttft_s"] + ar["latency_s"]  # the request's wall clock, setup included
