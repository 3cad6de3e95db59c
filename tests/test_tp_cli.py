"""``mspeckv generate --tp`` and ``mspeckv bench tp`` on the CPU (gloo ranks): same text as --tp 1, one clear error
per bad input (before any rank starts or any file is written), and a bench that resumes and records failed cells."""

from __future__ import annotations

import json

import pytest

from mspeckv.cli import main
from mspeckv.parallel.launch import MULTICAST_OFF, check_world
from tests.tiny import save_tiny_pair

PROMPT = "The committee met on Tuesday to discuss the budget; the vote was delayed until March. "


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    return save_tiny_pair(tmp_path_factory.mktemp("tp_models"))


def test_generate_tp2_prints_the_tp1_text(dirs, capfd):
    t, d = dirs
    base = ["generate", "--model", t, "--prompt", PROMPT, "--max-new-tokens", "12", "--device", "cpu",
            "--mode", "vanilla", "--draft", d, "--gamma", "3"]
    assert main(base) == 0
    one, err1 = capfd.readouterr()
    assert main(base + ["--tp", "2"]) == 0
    two, err2 = capfd.readouterr()
    assert two == one and one.strip()  # rank 0 alone printed, the same text
    assert "| tp 2 on cpu]" in err2 and err2.count("tokens") == 1


@pytest.mark.parametrize("extra, message", [
    (["--tp", "3"], "--tp 3 does not divide the model's 2 KV heads"),
    (["--tp", "0"], "--tp must be an integer >= 1"),
    (["--tp", "2", "--backend", "hf"], "drop --backend hf"),
    (["--tp", "2", "--press", "snapkv"], "--press would be ignored: --tp 2 does not support it"),
    (["--tp", "2", "--mode", "mspeckv", "--l1-press", "snapkv"], "--l1-press would be ignored"),
    (["--tp", "2", "--device", "cuda"], "no CUDA GPU"),
])
def test_generate_tp_bad_input_is_one_error(dirs, capfd, extra, message):
    t, _ = dirs
    rc = main(["generate", "--model", t, "--prompt", PROMPT, "--device", "cpu", *extra])
    _, err = capfd.readouterr()
    assert rc == 2 and message in err and err.count("\n") == 1, err


def test_more_ranks_than_gpus_is_refused(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match="--tp 2 needs 2 GPUs .* torch sees 1"):
        check_world(2, "cuda")


def test_multicast_stays_off_in_the_ranks_environment(monkeypatch):
    from mspeckv.parallel.launch import multicast_off

    monkeypatch.setenv("NCCL_NVLS_ENABLE", "0")  # a value already set is kept, never unset
    for k in ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "NVSHMEM_DISABLE_NVLS"):
        monkeypatch.delenv(k, raising=False)
    multicast_off()
    import os

    assert {k: os.environ[k] for k in MULTICAST_OFF} == MULTICAST_OFF


def test_plan_accounts_per_rank(capsys):
    """One rank of --tp 2 holds half the KV heads: at the same per-GPU budget, twice the layers fit on chip."""
    argv = ["plan", "--model", "random:tiny", "--context", "1000", "--gpu-kv-budget", "0.003"]
    rows = []
    for tp in ("1", "2"):
        assert main([*argv, "--tp", tp]) == 0
        rows.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1]))
    assert rows[0]["on_chip"] < rows[1]["on_chip"] and rows[1]["tp"] == 2
    assert rows[1]["predicted_pinned_bytes"] < rows[0]["predicted_pinned_bytes"]
    assert main([*argv, "--tp", "3"]) == 2 and "use --tp 1, 2, 4" in capsys.readouterr().err


QUICK = ["bench", "tp", "--device", "cpu", "--quick", "--formats", "int8", "--no-graphs"]


def test_bench_tp_smoke_resumes(tmp_path, capfd, monkeypatch):
    out = tmp_path / "tp"
    assert main([*QUICK, "--out-dir", str(out)]) == 0
    text, err = capfd.readouterr()
    line = json.loads(text.strip().splitlines()[-1])
    assert line["bench"] == "tp" and line["complete"] and "cpu" in line["machine"]
    rows = {(r["ctx"], r["kind"]): r for r in line["rows"]}
    assert set(rows) == {(256, "gpu"), (256, "int8")}
    int8 = rows[(256, "int8")]
    assert int8["tp1"]["ms"] > 0 and int8["tp2"]["ms"] > 0
    assert int8["tp2"]["vs_tp1"] == pytest.approx(int8["tp2"]["ms"] / int8["tp1"]["ms"])
    assert 0 <= int8["tp2"]["comm_share"] <= 1 and int8["tp1"]["comm_share"] is None
    res = json.loads((out / "tp.json").read_text())
    cell = json.loads((out / "cells" / "tp2-ctx256-int8.json").read_text())
    per_rank = [r["h2d_bytes_per_step"] for r in cell["ranks"]]
    tp1 = json.loads((out / "cells" / "tp1-ctx256-int8.json").read_text())["ranks"][0]["h2d_bytes_per_step"]
    assert per_rank[0] == per_rank[1] and 2 * per_rank[0] == tp1  # each rank streams its half of the KV heads
    assert {"git_commit", "torch", "gpu", "hostname"} <= set(cell["meta"])
    assert len(res["links"]["2"]["h2d_together_GBps"]) == 2
    assert "Tensor parallelism" in (out / "summary.md").read_text() and "[bench tp]" in err
    # a second run finds every cell: no rank is started
    import mspeckv.parallel.launch as launch_mod

    monkeypatch.setattr(launch_mod, "launch", lambda *a, **k: pytest.fail("relaunched finished cells"))
    assert main([*QUICK, "--out-dir", str(out)]) == 0


def test_bench_tp_records_a_failed_cell_and_runs_the_rest(tmp_path, capfd, monkeypatch):
    """Rank 1 dies in the first cell of the first launch; the cell is recorded as failed, the rest run in a new
    launch, the summary says PARTIAL and the command exits 1."""
    monkeypatch.setenv("MSPECKV_TP_FAIL", f"1:20:exit:{tmp_path / 'fired'}")
    out = tmp_path / "tp"
    assert main([*QUICK, "--tps", "2", "--out-dir", str(out)]) == 1
    text, err = capfd.readouterr()
    failed = json.loads((out / "cells" / "tp2-ctx256-gpu.json").read_text())
    assert "rank 1 of 2 exited with code 3" in failed["error"]
    assert json.loads((out / "cells" / "tp2-ctx256-int8.json").read_text())["error"] is None
    assert "PARTIAL" in (out / "summary.md").read_text() and "tp2-ctx256-gpu" in text
    assert err.count("launching") == 2


@pytest.mark.parametrize("extra, message", [
    (["--tps", "3"], "--tps 3 does not divide the model's 4 KV heads"),
    (["--on-chip", "4"], "--on-chip 4 leaves nothing offloaded"),
    (["--contexts", "5000"], "exceed tiny's maximum context"),
    (["--formats", "int9"], "--formats: 'int9' is not one of none, int8, int4, int2"),
    (["--model", "x"], "bench tp: error: unrecognized arguments: --model x"),
])
def test_bench_tp_bad_input_writes_nothing(tmp_path, capfd, extra, message):
    out = tmp_path / "never"
    try:
        rc = main([*QUICK, "--out-dir", str(out), *extra])
    except SystemExit as e:  # argparse's usage errors (a flag bench tp does not take)
        rc = e.code
    _, err = capfd.readouterr()
    assert rc == 2 and message in err and err.count("\n") == 1, err
    assert not out.exists()


@pytest.mark.parametrize("mode", ["ar", "vanilla", "self"])
def test_generate_prompts_tp2_writes_the_tp1_lines(dirs, tmp_path, capfd, mode):
    """--prompts at --tp 2: the batched engine on two gloo ranks (2 slots for 3 prompts); rank 0 writes the same
    lines as --tp 1, token for token."""
    t, d = dirs
    f = tmp_path / "p.jsonl"
    f.write_text("".join(json.dumps({"prompt": PROMPT[:n]}) + "\n" for n in (80, 40, 60)))
    spec = {"ar": [], "vanilla": ["--mode", "vanilla", "--draft", d, "--gamma", "3"],
            "self": ["--mode", "self", "--gamma", "3", "--self-window", "16"]}[mode]
    base = ["generate", "--model", t, "--prompts", str(f), "--max-new-tokens", "8", "--batch", "2", "--device", "cpu",
            *spec]
    outs = []
    for tp in ("1", "2"):
        out = tmp_path / f"out{tp}.jsonl"
        assert main(base + ["--tp", tp, "--out", str(out)]) == 0
        outs.append([json.loads(x)["tokens"] for x in out.read_text().splitlines()])
        err = capfd.readouterr().err
    assert outs[0] == outs[1] and len(outs[0]) == 3 and all(outs[0])
    assert "| tp 2]" in err and err.count("prompts,") == 1  # rank 0 alone reported


@pytest.mark.parametrize("extra, message", [
    (["--mode", "self", "--auto-gamma"], "--auto-gamma is not supported with --tp"),
    (["--gpu-memory", "8"], "drop it"),
    (["--press", "snapkv"], "--press would be ignored: --tp 2 does not support it"),
])
def test_generate_prompts_tp_refusals(dirs, tmp_path, capfd, extra, message):
    t, _ = dirs
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"prompt": PROMPT}) + "\n")
    rc = main(["generate", "--model", t, "--prompts", str(f), "--device", "cpu", "--tp", "2", *extra])
    _, err = capfd.readouterr()
    assert rc == 2 and message in err and err.count("\n") == 1, err
