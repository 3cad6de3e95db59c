"""Mutation testing of the core modules with mutmut (not run in CI): ``python tools/mutation.py [group ...]``.

Each group (a few source files + the fast test files that exercise them) runs in its own scratch copy of the
working tree, so mutmut's ``mutants/`` folder and config never touch the repository. Results go to
``results/tests/mutation/<group>.json`` and a combined ``results/tests/mutation/summary.md`` (score = killed /
(killed + survived); timeouts count as killed, mutants no test reaches are listed separately).

The machine is shared: everything runs under ``nice -n 15`` with one mutmut child by default (``--children``).
Surviving mutants are listed in the report with their diff; reasons (equivalent / gap closed by test X) are kept in
``results/tests/mutation/survivors.md``, written by hand after reading them.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "results" / "tests" / "mutation"

# group -> (files to mutate, test files that exercise them). Tests are the fast CPU ones only.
GROUPS: dict[str, tuple[list[str], list[str]]] = {
    "sampling_accept": (["mspeckv/decoding/sampling.py", "mspeckv/decoding/accept.py"],
                        ["tests/test_sampling_reference.py", "tests/test_accept.py",
                         "tests/test_cache_sampling.py"]),
    "speculative": (["mspeckv/decoding/speculative.py", "mspeckv/decoding/runner.py"],
                    ["tests/test_levels.py", "tests/test_distribution.py::test_runner_levels_every_drawn_token",
                     "tests/test_speculative.py::test_errors",
                     "tests/test_speculative.py::test_graph_counts_no_capture_inside_the_decode_loop",
                     "tests/test_presses.py::test_greedy_mspeckv_with_any_middle_press_equals_ar"]),
    "autoregressive_drafters": (["mspeckv/decoding/autoregressive.py", "mspeckv/decoding/drafters.py"],
                                ["tests/test_drafters.py", "tests/test_cache_sampling.py"]),
    "kv_small": (["mspeckv/kv/base.py", "mspeckv/kv/dense.py", "mspeckv/kv/retrieval.py", "mspeckv/kv/static.py"],
                 ["tests/test_cache_boundaries.py", "tests/test_streaming_retrieval.py", "tests/test_cache_sampling.py",
                  *[f"tests/test_levels.py::{t}" for t in (
                      "test_gqa_max_and_mean_pick_different_chunks", "test_select_chunks_matches_reference",
                      "test_check_budget_edges", "test_last_queries_roll_over_forwards",
                      "test_select_chunks_batch_rows_are_independent")]]),
    "presses": (["mspeckv/kv/pressed.py", "mspeckv/kv/stores.py", "mspeckv/presses/base.py",
                 "mspeckv/presses/streaming.py", "mspeckv/presses/snapkv.py", "mspeckv/presses/h2o.py",
                 "mspeckv/presses/pyramid.py", "mspeckv/presses/adakv.py", "mspeckv/presses/retrieval.py",
                 "mspeckv/presses/kivi.py", "mspeckv/presses/lowrank.py", "mspeckv/presses/hybrid.py"],
                ["tests/test_presses.py", "tests/test_streaming_retrieval.py", "tests/test_cache_boundaries.py",
                 "tests/test_levels.py::test_retrieval_capacity_and_rollback_edges",
                 "tests/test_levels.py::test_retrieval_refresh_keeps_static_buffers"]),
    # issue 29.2: the presses, their stores, the pressed cache and the transformers cache, one module family per
    # group, each against the hand-computed tests (test_press_arith/fields, test_pressed_layout) + a few fast ones
    "presses_select": (["mspeckv/presses/__init__.py", "mspeckv/presses/base.py", "mspeckv/presses/streaming.py",
                        "mspeckv/presses/snapkv.py", "mspeckv/presses/h2o.py", "mspeckv/presses/pyramid.py",
                        "mspeckv/presses/adakv.py", "mspeckv/presses/retrieval.py"],
                       ["tests/test_press_arith.py", "tests/test_press_fields.py",
                        *[f"tests/test_presses.py::{t}" for t in (
                            "test_bad_fields_get_one_clear_error", "test_errors_name_the_flag_the_spec_came_from",
                            "test_spec_round_trips", "test_yaml_press_file", "test_presets_load_and_mirror_table_4",
                            "test_snap_scores_match_a_loop_reference",
                            "test_forced_window_never_takes_more_than_its_share_of_the_budget",
                            "test_adakv_max_rows_bounds_one_head_taking_every_pooled_row")]]),
    "presses_encode": (["mspeckv/presses/kivi.py", "mspeckv/presses/lowrank.py", "mspeckv/presses/hybrid.py",
                        "mspeckv/kv/stores.py"],
                       ["tests/test_press_arith.py", "tests/test_press_fields.py", "tests/test_pressed_layout.py",
                        *[f"tests/test_presses.py::{t}" for t in (
                            "test_bad_fields_get_one_clear_error", "test_bytes_per_token_by_hand",
                            "test_offloaded_pressed_stores_stream_fewer_bytes")]]),
    "kv_pressed": (["mspeckv/kv/pressed.py"],
                   ["tests/test_pressed_layout.py", "tests/test_press_fields.py", "tests/test_streaming_retrieval.py",
                    *[f"tests/test_presses.py::{t}" for t in (
                        "test_static_layout_replays_like_the_eager_one",
                        "test_rollback_is_exact_and_bounded_by_the_tail",
                        "test_compress_every_keeps_memory_bounded", "test_offloaded_pressed_stores_stream_fewer_bytes",
                        "test_bytes_per_token_by_hand")]]),
    "hf_cache": (["mspeckv/hf/cache.py"],
                 ["tests/test_pressed_layout.py::test_hf_mask_offset_after_eviction", "tests/test_hf_cache.py",
                  "tests/test_hf_cache_mutants.py"]),
    "kv_quant_offload": (["mspeckv/kv/quant.py", "mspeckv/kv/offload.py", "mspeckv/kv/placement.py",
                          "mspeckv/cache.py"],
                         ["tests/test_quant.py", "tests/test_placement.py", "tests/test_cache_boundaries.py",
                          "tests/test_levels.py::test_one_factory_decides_the_layout_and_one_runner_follows_it",
                          "tests/test_presses.py::test_make_cache_graphs_gives_dense_presses_a_static_layout_with_the_"
                          "eager_tokens"]),
    "rope": (["mspeckv/model/rope.py"], ["tests/test_rope.py"]),
    "model": (["mspeckv/model/llama.py", "mspeckv/model/fused.py"],
              ["tests/test_model.py", "tests/test_rope.py::test_fused_kernels_torch_reference_equals_apply_rope"]),
    "stats": (["mspeckv/bench/stats.py"], ["tests/test_stats_report.py"]),
    "evals_report": (["mspeckv/evals/report.py"], ["tests/test_evals_report.py"]),
}
# h2o.py alone, against presses_select's tests: re-measured without re-running the other presses
GROUPS["presses_h2o"] = (["mspeckv/presses/h2o.py"], GROUPS["presses_select"][1])
# issue 25/26: the batched engine's caches and loops and the cost model of speculation at batch, against their fast
# CPU tests and the hand-computed ones (test_batch_mutants.py)
GROUPS["batch"] = (["mspeckv/kv/batch.py", "mspeckv/kv/stack.py", "mspeckv/decoding/batch.py",
                    "mspeckv/decoding/batch_spec.py", "mspeckv/decoding/cost.py"],
                   ["tests/test_batch_engine.py", "tests/test_batch_mutants.py",
                    *[f"tests/test_batch_spec.py::{t}" for t in ("test_greedy_at_batch_equals_each_prompt_alone",
                                                                   "test_leave_at_eos_and_join_during_speculation",
                                                                   "test_bad_configs",
                                                                   "test_sampling_with_top_k_1_is_greedy_through_the_"
                                                                   "sampled_path",
                                                                   "test_window_kv_hands_the_kernel_the_mask_it_applies",
                                                                   "test_cost_model_arithmetic_and_choices",
                                                                   "test_auto_gamma_keeps_greedy_output_whatever_it_"
                                                                   "picks",
                                                                   "test_each_rows_own_sampling_is_applied",
                                                                   "test_a_new_buckets_cost_model_starts_from_the_"
                                                                   "acceptance_seen",
                                                                   "test_the_draft_model_reads_its_window_only")],
                    "tests/test_batch_cli.py::test_gpu_memory_budget_counts_weights_kv_and_workspace"])
# Not mutated: mspeckv/kv/quant_triton.py and the Triton parts of model/fused.py (GPU only: no CPU test reaches them).
# Optional mutant-name patterns (fnmatch) per group, to time-box a slow group to its most important functions.
PATTERNS: dict[str, list[str]] = {
    # the decoder's CPU paths touched by the kernel fusion; the Triton dispatch branches of fused.py run on CUDA only
    "model": [f"mspeckv.model.llama.x\u01c1{c}\u01c1*" for c in ("Fused", "Block", "MLP", "RMSNorm")]
             + [f"mspeckv.model.llama.x\u01c1{m}*" for m in ("Attention\u01c1project", "CausalLM\u01c1forward",
                                                              "CausalLM\u01c1fuse_projections")]
             + [f"mspeckv.model.fused.x_{f}*" for f in ("rms_norm_torch", "rotate_half_torch", "silu_mul_torch",
                                                        "use_fused")],
}

IGNORE = shutil.ignore_patterns(".git", "__pycache__", "*.pyc", "mutants", "results", ".pytest_cache",
                                ".ruff_cache", "*.egg-info")


def _setup_cfg(files: list[str], tests: list[str]) -> str:
    lines = ["[mutmut]", "source_paths=mspeckv", "only_mutate="]
    lines += [f"    {f}" for f in files]
    lines += ["pytest_add_cli_args_test_selection="] + [f"    {t}" for t in tests]
    lines += ["use_git_change_detection=false", ""]
    return "\n".join(lines)


def run_group(name: str, scratch: Path, children: int, timeout: int, patterns: list[str] | None = None,
              rerun: bool = False) -> dict:
    """One mutmut run over a group. ``rerun``: keep the previous scratch copy and its results, bring in the
    current tests, re-collect which tests cover what, and re-run only the previous survivors."""
    files, tests = GROUPS[name]
    work = scratch / name
    if rerun:
        prev = json.loads((OUT / f"{name}.json").read_text())
        patterns = list(prev["survivors"])
        for dst in (work / "tests", work / "mutants" / "tests"):
            shutil.rmtree(dst)
            shutil.copytree(ROOT / "tests", dst, ignore=IGNORE)
        (work / "mutants" / "mutmut-stats.json").unlink(missing_ok=True)
        for cfg in (work / "setup.cfg", work / "mutants" / "setup.cfg"):  # the group's tests may have grown
            cfg.write_text(_setup_cfg(files, tests))
    else:
        if work.exists():
            shutil.rmtree(work)
        shutil.copytree(ROOT, work, ignore=IGNORE)
        (work / "setup.cfg").write_text(_setup_cfg(files, tests))
        (work / "mutants").mkdir()  # must exist before Python starts, or the import system caches it as missing
    env = {**os.environ, "PYTHONPATH": str(work / "mutants"), "CUDA_VISIBLE_DEVICES": "",
           "OMP_NUM_THREADS": "1"}  # tiny tensors: OpenMP spin-waits on a busy machine cost ~10 ms per op
    patterns = patterns or PATTERNS.get(name, [])
    cmd = ["nice", "-n", "15", "mutmut", "run", "--max-children", str(children), *patterns]
    t0 = time.time()
    p = subprocess.Popen(cmd, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True)
    timed_out = False
    try:
        out, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:  # time box: stop this run's process group; results so far are kept
        os.killpg(p.pid, signal.SIGTERM)
        out, _ = p.communicate()
        timed_out = True
    secs = time.time() - t0
    log = out[-4000:]
    res = subprocess.run(["mutmut", "results", "--all", "true"], cwd=work, env=env, capture_output=True, text=True)
    status: dict[str, str] = {}
    for line in res.stdout.splitlines():
        m = re.match(r"\s*(\S+): (.+)$", line)
        if m:
            status[m.group(1)] = m.group(2).strip()
    survivors = {}
    for mutant, st in status.items():
        if st == "survived":
            diff = subprocess.run(["mutmut", "show", mutant], cwd=work, env=env, capture_output=True, text=True)
            survivors[mutant] = {"status": st, "diff": diff.stdout[-1500:]}
        elif st == "no tests":  # named only: `mutmut show` takes seconds each on a busy machine
            survivors[mutant] = {"status": st, "diff": ""}
    counts: dict[str, int] = {}
    for st in status.values():
        counts[st] = counts.get(st, 0) + 1
    by_module: dict[str, dict[str, int]] = {}  # per source module: the goal is per module, not per group
    for mutant, st in status.items():
        mod = mutant.split(".x")[0] if ".x" in mutant else mutant.rsplit(".", 1)[0]
        c = by_module.setdefault(mod, {})
        c[st] = c.get(st, 0) + 1
    killed = counts.get("killed", 0) + counts.get("timeout", 0)
    survived = counts.get("survived", 0)
    score = killed / (killed + survived) if killed + survived else None
    return {"group": name, "files": files, "tests": tests, "command": " ".join(cmd), "seconds": round(secs, 1),
            "returncode": p.returncode, "timed_out": timed_out, "counts": counts, "killed": killed,
            "survived": survived, "by_module": by_module,
            "no_tests": counts.get("no tests", 0), "score": score, "survivors": survivors,
            "log_tail": log if p.returncode else "", "not_checked": counts.get("not checked", 0)}


def write_summary() -> None:
    rows = []
    for f in sorted(OUT.glob("*.json")):
        r = json.loads(f.read_text())
        sc = "-" if r["score"] is None else f"{100 * r['score']:.1f}%"
        rows.append(f"| {r['group']} | {', '.join(r['files'])} | {r['killed']} | {r['survived']} | {r['no_tests']} | "
                    f"{sc} | {r['seconds']:.0f} |")
    md = ["# Mutation testing (mutmut)", "",
          "Score = killed / (killed + survived), timeouts counted as killed; 'no tests' = mutants in code no fast "
          "CPU test reaches (listed in the group's JSON). Reasons for each survivor: survivors.md.", "",
          "| group | files | killed | survived | no tests | score | wall s |", "|---|---|---:|---:|---:|---:|---:|",
          *rows, "", f"Command: `python tools/mutation.py {' '.join(sys.argv[1:])}`".rstrip(), ""]
    (OUT / "summary.md").write_text("\n".join(md))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("groups", nargs="*", help=f"default: all of {', '.join(GROUPS)}")
    ap.add_argument("--children", type=int, default=1, help="parallel mutmut workers (default 1: shared machine)")
    ap.add_argument("--scratch", default="/tmp/mspeckv-mutation", help="where the working copies go")
    ap.add_argument("--timeout", type=int, default=1800, help="seconds per group before giving up")
    ap.add_argument("--rerun-survivors", action="store_true", help="re-run only the survivors of the previous run "
                    "of each group, against the current tests")
    ap.add_argument("--only", action="append", default=[], help="mutant-name pattern (fnmatch) to restrict a run "
                    "to, e.g. '*ǁVerifyLevelǁ*'; repeatable")
    a = ap.parse_args(argv)
    OUT.mkdir(parents=True, exist_ok=True)
    for name in a.groups or list(GROUPS):
        if name not in GROUPS:
            ap.error(f"unknown group {name}; choose from {', '.join(GROUPS)}")
        print(f"[mutation] {name} ...", flush=True)
        r = run_group(name, Path(a.scratch), a.children, a.timeout, a.only, a.rerun_survivors)
        if a.rerun_survivors:
            r["command"] += " (re-run of the previous survivors: python tools/mutation.py --rerun-survivors)"
        (OUT / f"{name}.json").write_text(json.dumps(r, indent=1))
        print(f"[mutation] {name}: {r['counts']} score {r['score']} in {r['seconds']} s", flush=True)
        write_summary()
    return 0


if __name__ == "__main__":
    sys.exit(main())
