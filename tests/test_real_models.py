"""Slow tests on the real embedded models (run with --runslow or MSPECKV_SLOW=1; they prepare the models first)."""

import pytest
import torch

from mspeckv.config import GenerationConfig
from mspeckv.decoding.autoregressive import generate
from mspeckv.decoding.speculative import SpecConfig, speculative_generate
from mspeckv.kv.dense import DenseKV

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def draft():
    from mspeckv.model.api import load

    return load("qwen2.5-coder-0.5b", "cpu")


def test_real_0_5b_logits_and_greedy_match_transformers(draft):
    from transformers import AutoModelForCausalLM

    model, tok, d = draft
    hf = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    ids = torch.tensor([tok("def quicksort(arr):\n    ", add_special_tokens=False).input_ids])
    with torch.no_grad():
        ref = hf(ids).logits.float()
        ours = model(ids, DenseKV.for_model(model, 1, 64), num_logits=None)
    torch.testing.assert_close(ours, ref, atol=2e-3, rtol=2e-3)
    ar = generate(model, ids, GenerationConfig(max_new_tokens=16, stop_on_eos=False)).tokens[0]
    hf_out = hf.generate(ids, max_new_tokens=16, do_sample=False, min_new_tokens=16)[0, ids.shape[1]:].tolist()
    assert ar == hf_out


def test_real_pair_speculation_equals_ar(draft):
    """1.5B target + 0.5B draft, fp32 on the CPU: greedy vanilla and MSpecKV equal AR token for token."""
    from mspeckv.data.corpora import long_prompt
    from mspeckv.model.api import load

    target, tok, _ = load("qwen2.5-coder-1.5b", "cpu")
    ids = torch.tensor([long_prompt(tok, 400, seed=1)])
    gen = GenerationConfig(max_new_tokens=20, stop_on_eos=False, prefill_chunk=256)
    ar = generate(target, ids, gen).tokens
    for spec in (SpecConfig(mode="vanilla", gamma=4),
                 SpecConfig(mode="mspeckv", gamma=6, draft_gamma=3, budget=128, chunk=8, draft_window=64)):
        sp = speculative_generate(target, draft[0], ids, gen, spec)
        assert sp.tokens == ar, spec.mode
        assert sp.stats["accepted"] > 0  # a real draft of the same family gets tokens accepted
