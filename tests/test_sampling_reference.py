"""The sampling pipeline against an independent reference: hand-computed probabilities and a plain-Python
implementation written here from the definitions (no sorting, no torch), so a bug in temperature, top-k or top-p
cannot cancel out the way it does when the expected distribution comes from ``logits_to_probs`` itself.

Definitions (HF order): divide the logits by the temperature; top-k keeps every token whose scaled logit is >= the
k-th largest (ties at the k-th value are all kept); top-p then keeps, among those, every token whose strictly-larger
mass (under the softmax of the top-k survivors) is < p (the smallest prefix whose mass reaches p); renormalise.
"""

import math

import numpy as np
import pytest
import torch
from scipy.stats import chi2, chisquare, ncx2

from mspeckv.config import SamplingConfig
from mspeckv.decoding.sampling import logits_to_probs, make_generator, next_token, sample


def ref_probs(logits: list[float], temperature: float, top_k: int = 0, top_p: float = 1.0) -> list[float]:
    """Independent reference (plain Python, per token, no sort). Ties inside top-p must not straddle the cut."""
    z = [x / temperature for x in logits]
    V = len(z)
    keep = [True] * V
    if top_k and top_k < V:
        kth = min(x for x in z if sum(y > x for y in z) < top_k)  # k-th largest value, counting ties once each
        keep = [x >= kth for x in z]
    m = max(z[i] for i in range(V) if keep[i])
    w = [math.exp(z[i] - m) if keep[i] else 0.0 for i in range(V)]
    tot = sum(w)
    pr = [x / tot for x in w]
    if top_p < 1.0:
        keep = [keep[i] and sum(pr[j] for j in range(V) if z[j] > z[i] and keep[j]) < top_p for i in range(V)]
        w = [w[i] if keep[i] else 0.0 for i in range(V)]
        tot = sum(w)
    return [x / tot for x in w]


def probs(logits, **kw) -> list[float]:
    return logits_to_probs(torch.tensor([logits], dtype=torch.float32), SamplingConfig(**kw))[0].tolist()


def close(a, b, tol=1e-6):
    return np.allclose(a, b, atol=tol, rtol=0)


def test_hand_computed_temperature_with_top_k_and_top_p():
    L = [2.0, 1.0, 0.0, -1.0]
    # T = 0.5: z = [4, 2, 0, -2]; top-3 -> softmax(4, 2, 0) = [.8668, .1173, .0159]; mass before token 2 = .9841
    # >= .9 -> dropped; renormalised: [e^4, e^2] / (e^4 + e^2) = [sigmoid(2), 1 - sigmoid(2)]
    s2 = 1 / (1 + math.exp(-2))
    assert close(probs(L, temperature=0.5, top_k=3, top_p=0.9), [s2, 1 - s2, 0, 0])
    # T = 2: z = [1, .5, 0, -.5]; top-3 -> [.5065, .3072, .1863]; mass before token 2 = .8137 < .9 -> kept
    e = [math.exp(1), math.exp(0.5), 1.0]
    assert close(probs(L, temperature=2.0, top_k=3, top_p=0.9), [x / sum(e) for x in e] + [0])
    # T = 1: top-3 -> [.6652, .2447, .0900]; mass before token 2 = .9100 >= .9 -> dropped: [sigmoid(1), ...]
    s1 = 1 / (1 + math.exp(-1))
    assert close(probs(L, temperature=1.0, top_k=3, top_p=0.9), [s1, 1 - s1, 0, 0])
    # temperature alone: softmax(L / T)
    e = [math.exp(x / 0.7) for x in L]
    assert close(probs(L, temperature=0.7), [x / sum(e) for x in e])


def test_top_p_uses_the_top_k_renormalised_mass():
    """top-p after top-k: mass is measured among the top-k survivors. Logits [0, -.1, -.2, -2 x 6]: top_k=3
    then p=.66 keeps two tokens (renormalised mass before token 2 is .699 >= .66); measuring the mass over the full
    vocabulary instead (.539 before token 2) would keep three."""
    L = [0.0, -0.1, -0.2] + [-2.0] * 6
    got = probs(L, temperature=1.0, top_k=3, top_p=0.66)
    assert close(got, ref_probs(L, 1.0, 3, 0.66))
    assert sum(x > 0 for x in got) == 2


@pytest.mark.parametrize("T", [0.3, 0.8, 1.0, 1.7])
@pytest.mark.parametrize("top_k", [0, 1, 2, 5, 11, 12, 40])
@pytest.mark.parametrize("top_p", [1.0, 0.95, 0.6, 0.2])
def test_matches_reference_on_random_logits(T, top_k, top_p):
    g = torch.Generator().manual_seed(hash((T, top_k, top_p)) % 2**31)
    for _ in range(3):
        L = (torch.randn(12, generator=g) * 2).tolist()  # distinct values (ties below)
        assert close(probs(L, temperature=T, top_k=top_k, top_p=top_p), ref_probs(L, T, top_k, top_p), 2e-6)


def test_top_k_boundaries_and_ties():
    L = [3.0, 1.0, 3.0, 0.5, 1.0, -1.0]
    # k = 1 with a tie at the top: both maxima kept, each 1/2
    assert close(probs(L, temperature=1.0, top_k=1), [0.5, 0, 0.5, 0, 0, 0])
    # k = 2: the 2nd largest is 3 again -> same two tokens
    assert close(probs(L, temperature=1.0, top_k=2), [0.5, 0, 0.5, 0, 0, 0])
    # k = 3: the 3rd largest is 1.0, tied with token 4 -> 4 tokens kept
    e3, e1 = math.exp(3), math.exp(1)
    tot = 2 * e3 + 2 * e1
    assert close(probs(L, temperature=1.0, top_k=3), [e3 / tot, e1 / tot, e3 / tot, 0, e1 / tot, 0])
    # k = V - 1 drops exactly the smallest; k = V, k > V and k = 0 drop nothing
    full = np.exp(L) / np.exp(L).sum()
    assert close(probs(L, temperature=1.0, top_k=5), list(np.where(np.arange(6) == 5, 0, full / full[:5].sum())))
    for k in (0, 6, 7):
        assert close(probs(L, temperature=1.0, top_k=k), list(full))
    for k in range(1, 8):
        assert close(probs(L, temperature=0.6, top_k=k), ref_probs(L, 0.6, k))


def test_top_p_exact_boundary_and_ties():
    # uniform over 4 (probabilities exactly 1/4): mass before the 3rd token is exactly .5 -> p = .5 keeps 2 tokens,
    # whichever two the sort puts first (ties), each 1/2; p just above .5 keeps 3
    got = probs([0.0] * 4, temperature=1.0, top_p=0.5)
    assert sorted(got) == [0, 0, 0.5, 0.5]
    got = probs([0.0] * 4, temperature=1.0, top_p=0.5001)
    assert close(sorted(got), [0, 1 / 3, 1 / 3, 1 / 3])
    # the first token alone reaching p: kept alone (never an empty set)
    assert close(probs([5.0, 0.0, 0.0], temperature=1.0, top_p=0.2), [1, 0, 0])
    # p = 1 is off even with a tiny tail
    assert all(x > 0 for x in probs([30.0, 0.0, -30.0], temperature=1.0, top_p=1.0)[:2])


def test_greedy_and_next_token():
    L = torch.tensor([[0.1, 2.0, -1.0, 1.9], [5.0, 0.0, 0.0, 4.0]])
    assert logits_to_probs(L, SamplingConfig()).tolist() == [[0, 1, 0, 0], [1, 0, 0, 0]]
    assert next_token(L, SamplingConfig()).tolist() == [1, 0]
    # sampled next_token draws from the temperature/top-k distribution: top_k=1 is deterministic here
    assert next_token(L, SamplingConfig(temperature=3.0, top_k=1, seed=0), make_generator("cpu", 0)).tolist() == [1, 0]


def power_at_tv(n: int, df: int, alpha: float, tv: float = 0.05) -> float:
    """Power of a χ² goodness-of-fit test with n samples against the least detectable alternative at total
    variation ``tv``: by Cauchy-Schwarz sum (p1 - p0)^2 / p0 >= (sum |p1 - p0|)^2 = (2 tv)^2, so the noncentrality
    is at least n (2 tv)^2."""
    return float(ncx2.sf(chi2.ppf(1 - alpha, df), df, n * (2 * tv) ** 2))


def test_sampled_frequencies_match_the_reference():
    """End to end (logits -> probs -> exponential-race draw) against the reference, temperature + top-k + top-p.
    N = 20000 draws, 4 kept tokens (df 3), alpha 1e-3: power at TV 0.05 = 1.00 (power_at_tv(20000, 3, 1e-3))."""
    L = [1.2, 0.4, 2.0, -0.3, 0.9, -2.0, 0.0]
    T, k, p = 0.8, 5, 0.9
    ref = np.array(ref_probs(L, T, k, p))
    support = ref > 0
    assert support.sum() == 4
    N = 20_000
    assert power_at_tv(N, int(support.sum()) - 1, 1e-3) > 0.999
    pr = logits_to_probs(torch.tensor([L]).expand(N, -1), SamplingConfig(temperature=T, top_k=k, top_p=p))
    draws = sample(pr, make_generator("cpu", 11))
    obs = np.bincount(draws.numpy(), minlength=len(L))
    assert obs[~support].sum() == 0
    assert chisquare(obs[support], ref[support] * N).pvalue > 1e-3


def test_batched_3d_logits_match_the_reference_row_by_row():
    """The verifier calls logits_to_probs on (1, n+1, V) logits: every reduction must run over the last axis."""
    g = torch.Generator().manual_seed(3)
    L = torch.randn(2, 3, 9, generator=g) * 2
    for kw in (dict(temperature=0.7, top_k=4, top_p=0.8), dict(temperature=1.3, top_p=0.7), dict()):
        got = logits_to_probs(L, SamplingConfig(**kw))
        for b in range(2):
            for t in range(3):
                row = L[b, t].tolist()
                exp = ref_probs(row, kw.get("temperature", 1.0), kw.get("top_k", 0), kw.get("top_p", 1.0)) if kw \
                    else [float(i == int(np.argmax(row))) for i in range(9)]
                assert close(got[b, t].tolist(), exp, 2e-6)
