"""Slow (real embedded model): the eval's dense-cache perplexity equals a transformers perplexity on the same tokens.

Run with ``--runslow`` or ``MSPECKV_SLOW=1``; it prepares qwen2.5-coder-0.5b on first use."""

from __future__ import annotations

import math

import pytest
import torch

pytestmark = pytest.mark.slow


def test_dense_cache_ppl_matches_transformers_within_half_a_percent():
    from transformers import AutoModelForCausalLM

    from mspeckv.data.corpora import long_prompt
    from mspeckv.evals import lm
    from mspeckv.evals.runner import EvalConfig, EvalContext
    from mspeckv.evals.variants import Variant
    from mspeckv.model.api import load

    model, tok, d = load("qwen2.5-coder-0.5b", "cpu")
    C, S = 512, 128
    cfg = EvalConfig(metrics=("ppl",), context=(C,), scored=S, windows=1, score_chunk=16, prefill_chunk=256)
    ours = lm.run(EvalContext(cfg, model, tok, quiet=True), [Variant()], C)["ppl"]["full"]["ppl"]

    ids = torch.tensor([long_prompt(tok, C + 1, seed=cfg.seed, dataset=cfg.dataset)])  # the same window 0
    hf = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = hf(ids[:, :C]).logits[0, C - S:C].float()
    nll = torch.nn.functional.cross_entropy(logits, ids[0, C - S + 1:C + 1])
    ref = math.exp(float(nll))
    assert abs(ours / ref - 1) < 0.005, (ours, ref)
