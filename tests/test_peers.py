"""The peers harness scores the windows our eval scores, with the same prefix and teacher-forced span: its full-cache
baseline (transformers) matches our eval's PPL on a tiny saved model, and kvpress's StreamingLLM matches ours where
both keep the same rows. Tests that run kvpress need an interpreter that imports it (``MSPECKV_PEERS_PYTHON``, or
this one); without one they skip."""

from __future__ import annotations

import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from mspeckv.evals.peers import PeersConfig, parse_peer, run_peers, score_window, windows
from tests.tiny import save_tiny_pair

TEXT = " ".join(f"def f{i}(x):\n    return x * {i} + {i % 7}\n" for i in range(300))
CTX, SCORED = 64, 16


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("peers")
    target, _ = save_tiny_pair(root)
    corpus = root / "code.txt"
    corpus.write_text(TEXT)
    return target, str(corpus), root


def _cfg(target, corpus, root, **kw):
    base = dict(model=target, context=CTX, windows=2, scored=SCORED, score_chunk=4, prefill_chunk=16, dataset=corpus,
                out_dir=str(root / "out"))
    return PeersConfig(**{**base, **kw})


def _ours(target, corpus, press=None):
    """Our eval's PPL (``evals/lm.py``, baseline first) on the same windows."""
    from mspeckv.evals import lm
    from mspeckv.evals.variants import Variant
    from mspeckv.model.api import load

    model, tok, _ = load(target, "cpu")
    cfg = SimpleNamespace(scored=SCORED, stride=None, windows=2, seed=0, dataset=corpus, score_chunk=4,
                          prefill_chunk=16, attn_queries=0, split="all", floor=0)
    ev = SimpleNamespace(cfg=cfg, model=model, tok=tok, progress=lambda msg: None)
    vs = [Variant()] + ([Variant(press=press)] if press else [])
    return {name: r["ppl"] for name, r in lm.run(ev, vs, CTX)["ppl"].items()}, tok


@pytest.mark.parametrize("spec, match", [
    ("kvpress:snapkv", "give keep=F"),
    ("kvpress:snapkv:keep=0", "give keep=F"),
    ("kvpress:nope:keep=0.5", "kvpress press 'nope' is not one of"),
    ("kvpress:snapkv:keep=half", "'half' is not a number"),
    ("kvpress:snapkv:keep", "is not k=v"),
    ("hf-quant:quanto:nbits=3", "nbits=N with N one of (2, 4)"),
    ("hf-quant:hqq:nbits=4,bits=2", "unknown setting(s) bits"),
    ("hf-quant:bnb:nbits=4", "backend 'bnb' is not one of"),
    ("snapkv:budget=0.25", "write kvpress:<press>:keep=F"),
])
def test_bad_peer_specs_are_one_clear_error(spec, match):
    with pytest.raises(ValueError, match=rf".*{match.replace('(', '[(]').replace(')', '[)]')}"):
        parse_peer(spec)


def test_peer_specs_parse():
    p = parse_peer("kvpress:snapkv:keep=0.25,window_size=32")
    assert (p.library, p.name, p.kw) == ("kvpress", "snapkv", {"keep": 0.25, "window_size": 32})
    assert parse_peer("hf-quant:hqq:nbits=2,group=32,residual=128").kw == {"group": 32, "nbits": 2, "residual": 128}


def test_config_refuses_before_anything_loads(setup):
    target, corpus, root = setup
    with pytest.raises(ValueError, match="--scored 64 must be less than --context 64"):
        _cfg(target, corpus, root, scored=CTX)
    with pytest.raises(ValueError, match="give keep=F"):
        _cfg(target, corpus, root, peers=("kvpress:snapkv",))
    with pytest.raises(ValueError, match="--python /no/python is not a file"):
        run_peers(_cfg(target, corpus, root, python="/no/python"))


def test_full_cache_baseline_is_our_evals_ppl_on_the_same_windows(setup):
    """The worker's scoring (transformers, full cache) against our eval's baseline: the same windows, prefix, span
    and targets give the same PPL (an off-by-one in the windows or the span would not)."""
    from transformers import AutoModelForCausalLM

    from mspeckv.evals.metrics import Accumulator

    target, corpus, root = setup
    ours, tok = _ours(target, corpus)
    hf = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32, attn_implementation="sdpa").eval()
    acc = Accumulator()
    with torch.inference_mode():
        for ids in windows(tok, _cfg(target, corpus, root)):
            logits, targets, held = score_window(hf, None, torch.tensor([ids]), SCORED, 4, 16)
            assert held == CTX - SCORED and len(targets) == SCORED
            acc.add_tokens(logits, targets, None)
    assert acc.results()["ppl"] == pytest.approx(ours["full"], rel=1e-4)


def _peers_python() -> str | None:
    py = os.environ.get("MSPECKV_PEERS_PYTHON", sys.executable)
    ok = subprocess.run([py, "-c", "import kvpress"], capture_output=True).returncode == 0
    return py if ok else None


def test_kvpress_streaming_matches_ours_and_keep_all_is_the_full_cache(setup):
    py = _peers_python()
    if py is None:
        pytest.skip("kvpress is not importable (set MSPECKV_PEERS_PYTHON to an interpreter that has it)")
    target, corpus, root = setup
    cfg = _cfg(target, corpus, root, python=py, peers=("kvpress:streaming:keep=1.0", "kvpress:streaming:keep=0.5",
                                                       "kvpress:snapkv:keep=0.5,window_size=8"))
    rows = {r["peer"]: r for r in run_peers(cfg)["rows"]}
    assert (root / "out" / "peers.json").is_file()
    assert all(r["status"] == "ok" for r in rows.values()), rows
    keep_all = rows["kvpress:streaming:keep=1.0"]
    assert keep_all["kl_mean"] == pytest.approx(0, abs=1e-6) and keep_all["ppl_delta_pct"] == pytest.approx(0, abs=1e-4)
    half = rows["kvpress:streaming:keep=0.5"]
    assert half["rows_per_layer_after_prefix"] == (CTX - SCORED) // 2 and half["kl_mean"] > 0
    ours, _ = _ours(target, corpus, press="streaming:budget=0.5")  # the same 4 sinks + newest rows, same positions
    assert rows["full"]["ppl"] == pytest.approx(ours["full"], rel=1e-4)
    assert half["ppl"] == pytest.approx(ours["streaming:budget=0.5"], rel=1e-4)
    assert rows["kvpress:snapkv:keep=0.5,window_size=8"]["rows_per_layer_after_prefix"] == (CTX - SCORED) // 2


def test_our_rows_and_the_side_by_side_table(tmp_path):
    from mspeckv.evals.peers import our_rows, table
    from mspeckv.runs.template import CellStore

    store, s = CellStore(tmp_path / "ours"), {"model": "m", "dataset": "pycode", "windows": 2}
    store.save("ppl", "full", 2048, {"ppl": 10.0, "windows": 2}, s)
    store.save("ppl", "snapkv:budget=0.25", 2048, {"ppl": 12.5, "windows": 2}, s)
    store.save("kl", "snapkv:budget=0.25", 2048, {"kl_mean": 0.3, "top1_agreement": 0.7}, s)
    store.save("ppl", "streaming:budget=0.25", 4096, {"ppl": 30.0, "windows": 2}, s)  # no baseline at 4096: no row
    rows = {r["peer"]: r for r in our_rows(tmp_path / "ours")}
    assert set(rows) == {"full", "snapkv:budget=0.25"}
    assert rows["snapkv:budget=0.25"]["ppl_delta_pct"] == pytest.approx(25.0)
    peer = {"peer": "kvpress:quanto", "library": "hf-quant", "context": 2048, "windows": 2, "status": "error",
            "error": "ImportError: no quanto"}
    md = table([*rows.values(), peer]).splitlines()
    assert md[0].startswith("| library | configuration |") and len(md) == 5
    assert "| mspeckv | snapkv:budget=0.25 | 2048 | 2 | 12.500 | 10.000 | +25.00 | 0.3000 | 0.700 |" in md
    assert "error: ImportError: no quanto" in md[-1]
