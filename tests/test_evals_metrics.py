"""The eval arithmetic on hand-made inputs with known answers."""

from __future__ import annotations

import math

import pytest
import torch

from mspeckv.evals.metrics import (
    Accumulator,
    cosine,
    expected_calibration_error,
    kl_divergence,
    perplexity,
    relative_mse,
    token_nll,
)


def test_kl_of_identical_distributions_is_zero_and_positive_otherwise():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 11, generator=g) * 3
    assert torch.equal(kl_divergence(logits, logits.clone()), torch.zeros(5))
    assert kl_divergence(logits, logits + 7.0).abs().max() < 1e-6  # same distribution, shifted logits (rounding)
    other = torch.randn(5, 11, generator=g)
    kl = kl_divergence(logits, other)
    assert (kl > 0).all()
    p, q = torch.softmax(logits, -1).double(), torch.softmax(other, -1).double()
    torch.testing.assert_close(kl.double(), (p * (p / q).log()).sum(-1), rtol=1e-4, atol=1e-5)


def test_ece_of_a_perfectly_calibrated_toy_is_zero():
    # 10 predictions at confidence 0.7, 7 right; 4 at 0.25, 1 right; 5 at 1.0, all right
    conf = torch.tensor([0.7] * 10 + [0.25] * 4 + [1.0] * 5, dtype=torch.float64)
    correct = torch.tensor([1] * 7 + [0] * 3 + [1] + [0] * 3 + [1] * 5, dtype=torch.bool)
    assert expected_calibration_error(conf, correct) == pytest.approx(0.0, abs=1e-12)
    # overconfident: always 0.9 but right half the time -> ECE 0.4
    assert expected_calibration_error(torch.full((10,), 0.9), torch.arange(10) % 2 == 0) == pytest.approx(0.4)


def test_ppl_equals_exp_mean_nll_by_hand():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.0], [-1.0, 3.0, 1.0]])
    targets = torch.tensor([0, 2, 1])
    by_hand = []
    for row, t in zip(logits.tolist(), targets.tolist(), strict=True):
        z = sum(math.exp(x) for x in row)
        by_hand.append(-math.log(math.exp(row[t]) / z))
    assert token_nll(logits, targets).tolist() == pytest.approx(by_hand, rel=1e-6)
    acc = Accumulator()
    acc.add_tokens(logits[:2], targets[:2], None)  # two chunks combine exactly
    acc.add_tokens(logits[2:], targets[2:], None)
    r = acc.results()
    assert r["ppl"] == pytest.approx(math.exp(sum(by_hand) / 3), rel=1e-6)
    assert r["kl_mean"] == 0 and r["top1_agreement"] == 1.0
    assert perplexity(sum(by_hand), 3) == pytest.approx(r["ppl"])


def test_accumulator_against_a_reference_and_cosines():
    ref = torch.tensor([[3.0, 0.0], [0.0, 3.0]])
    acc = Accumulator()
    acc.add_tokens(torch.tensor([[3.0, 0.0], [3.0, 0.0]]), torch.tensor([0, 1]), ref)
    r = acc.results()
    assert r["top1_agreement"] == 0.5 and r["kl_mean"] > 0
    acc.add_cosines([torch.tensor([1.0, 0.5])] * 2)
    assert acc.results()["attn_cosine_per_layer"] == [0.75, 0.75]


def test_cosine_and_relative_mse():
    a = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0]])
    b = torch.tensor([[2.0, 0.0], [-1.0, -1.0], [0.0, 0.0]])
    torch.testing.assert_close(cosine(a, b), torch.tensor([1.0, -1.0, 1.0]))
    x = torch.randn(2, 3, 4, 5)
    assert relative_mse(x, x) == 0.0
    assert relative_mse(torch.zeros_like(x), x) == pytest.approx(1.0)
    assert relative_mse(1.1 * x, x) == pytest.approx(0.01, rel=1e-4)


@pytest.mark.parametrize("placement", [None, "int8"])
def test_graphed_greedy_generates_what_eager_generates(placement):
    """``--gsm8k-graphs``: the eval's greedy decode through a GraphRunner (eager forwards on the CPU, the same static
    layouts and per-layout bookkeeping as on CUDA) gives the eager tokens, for the full cache and a placement."""
    from mspeckv.evals.generation import greedy
    from mspeckv.evals.variants import Variant
    from mspeckv.kv.placement import Placement
    from tests.tiny import tiny_model

    m = tiny_model("llama", num_hidden_layers=3)
    p = None if placement is None else Placement(on_chip=0, kv_quant=placement, kv_group_size=8, rollback_slack=4)
    ids = torch.randint(3, m.cfg.vocab_size, (70,), generator=torch.Generator().manual_seed(1)).tolist()
    v = Variant(placement=p)
    eager = greedy(m, v, ids, 40, prefill_chunk=16, eos=False)
    graphed = greedy(m, v, ids, 40, prefill_chunk=16, eos=False, graphs=True)
    assert graphed.tokens == eager.tokens and len(eager.tokens) == 40
    assert graphed.kv_bytes == eager.kv_bytes
