"""Speculative acceptance is lossless: χ² tests of the output distribution, broken rules that must fail."""

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from mspeckv.decoding.accept import greedy_accept, speculative_accept
from mspeckv.decoding.sampling import sample

N = 200_000
V = 6


def dists(g: torch.Generator, *shape: int, conc: float = 1.0) -> torch.Tensor:
    """Random distributions over V (Dirichlet(conc)), strictly positive."""
    x = torch._standard_gamma(torch.full((*shape, V), conc, dtype=torch.float64), generator=g) + 1e-3
    return (x / x.sum(-1, keepdim=True)).float()


def chi2_p(tokens: torch.Tensor, probs: torch.Tensor) -> float:
    """p-value of ``tokens`` (flat int ids in [0, probs.numel())) being draws from ``probs`` (flattened)."""
    probs = probs.double().flatten()
    obs = torch.bincount(tokens.flatten(), minlength=probs.numel()).double().numpy()
    exp = (probs / probs.sum() * obs.sum()).numpy()
    return float(chisquare(obs, exp).pvalue)


def draw(probs: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    return torch.multinomial(probs.reshape(-1, V), 1, generator=g).view(probs.shape[:-1])


def resample_from_p(draft_probs, target_probs, draft_tokens, generator=None):
    """BROKEN on purpose: on rejection draws from p_j instead of the residual max(p_j - q_j, 0)."""
    n, nxt = speculative_accept(draft_probs, target_probs, draft_tokens, generator)
    B, g = draft_tokens.shape
    p_n = target_probs.gather(1, n[:, None, None].expand(B, 1, V)).squeeze(1)
    return n, torch.where(n < g, sample(p_n, generator), nxt)


def accept_all(draft_probs, target_probs, draft_tokens, generator=None):
    """BROKEN on purpose: no verification at all."""
    B, g = draft_tokens.shape
    return torch.full((B,), g, dtype=torch.long), sample(target_probs[:, -1], generator)


class Problem:
    """γ = 2 with context-dependent distributions: p0, P1[x0], P2[x0, x1] (target) and q0, Q1[x0] (draft)."""

    def __init__(self, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.p0, self.q0 = dists(g), dists(g)
        self.P1, self.Q1 = dists(g, V), dists(g, V)
        self.P2 = dists(g, V, V)

    def first_two(self, accept, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Run ``accept`` on N rows; return the first two output tokens of each row (a second round when needed)."""
        g = torch.Generator().manual_seed(seed)
        x0 = draw(self.q0.expand(N, V), g)
        x1 = draw(self.Q1[x0], g)
        draft = torch.stack([self.q0.expand(N, V), self.Q1[x0]], 1)  # (N, 2, V)
        target = torch.stack([self.p0.expand(N, V), self.P1[x0], self.P2[x0, x1]], 1)  # (N, 3, V)
        n, nxt = accept(draft, target, torch.stack([x0, x1], 1), g)
        o0 = torch.where(n >= 1, x0, nxt)
        o1 = torch.where(n >= 2, x1, nxt)
        # rows that stopped after one token: a fresh round (γ=1) drafted from Q1[o0], verified against P1[o0]
        y = draw(self.Q1[o0], g)
        n2, nxt2 = accept(self.Q1[o0][:, None], torch.stack([self.P1[o0], self.P2[o0, y]], 1), y[:, None], g)
        o1 = torch.where(n == 0, torch.where(n2 >= 1, y, nxt2), o1)
        return o0, o1


@pytest.fixture(scope="module")
def problem():
    return Problem()


def test_first_token_and_joint_are_target_distributed(problem):
    o0, o1 = problem.first_two(speculative_accept, seed=1)
    assert chi2_p(o0, problem.p0) > 1e-3
    joint = problem.p0[:, None] * problem.P1  # (V, V): p(o0 = a, o1 = b) = p0(a) P1[a](b)
    assert chi2_p(o0 * V + o1, joint) > 1e-3


def test_second_token_given_first_accepted(problem):
    """Rows with x0 accepted: (x0, o1) ∝ min(p0, q0)(a) · P1[a](b) (o1 = x1 accepted or the residual draw)."""
    g = torch.Generator().manual_seed(2)
    x0 = draw(problem.q0.expand(N, V), g)
    x1 = draw(problem.Q1[x0], g)
    draft = torch.stack([problem.q0.expand(N, V), problem.Q1[x0]], 1)
    target = torch.stack([problem.p0.expand(N, V), problem.P1[x0], problem.P2[x0, x1]], 1)
    n, nxt = speculative_accept(draft, target, torch.stack([x0, x1], 1), g)
    ok = n >= 1
    o1 = torch.where(n >= 2, x1, nxt)
    joint = torch.minimum(problem.p0, problem.q0)[:, None] * problem.P1
    assert chi2_p((x0 * V + o1)[ok], joint) > 1e-3
    assert abs(ok.float().mean().item() - torch.minimum(problem.p0, problem.q0).sum().item()) < 0.01


@pytest.mark.parametrize("broken", [resample_from_p, accept_all])
def test_broken_rules_fail_the_same_test(problem, broken):
    o0, o1 = problem.first_two(broken, seed=1)
    joint = problem.p0[:, None] * problem.P1
    assert min(chi2_p(o0, problem.p0), chi2_p(o0 * V + o1, joint)) < 1e-6


def test_two_level_composition():
    """draft -> mid -> target: the mid level's outputs (dist q_mid) verified with proposal q_mid give p_target."""
    g = torch.Generator().manual_seed(3)
    q_draft, q_mid, p = dists(g), dists(g), dists(g)
    bonus = dists(g)
    x = draw(q_draft.expand(N, V), g)
    n, nxt = speculative_accept(q_draft.expand(N, 1, V), torch.stack([q_mid, bonus]).expand(N, 2, V), x[:, None], g)
    y = torch.where(n == 1, x, nxt)
    assert chi2_p(y, q_mid) > 1e-3
    n, nxt = speculative_accept(q_mid.expand(N, 1, V), torch.stack([p, bonus]).expand(N, 2, V), y[:, None], g)
    z = torch.where(n == 1, y, nxt)
    assert chi2_p(z, p) > 1e-3
    assert chi2_p(y, p) < 1e-6  # the mid level alone is not the target: the test can tell them apart


def test_one_hot_proposal_is_lossless():
    g = torch.Generator().manual_seed(4)
    p = dists(g)
    q = torch.zeros(V)
    q[3] = 1.0
    x = torch.full((N, 1), 3)
    n, nxt = speculative_accept(q.expand(N, 1, V), torch.stack([p, p]).expand(N, 2, V), x, g)
    assert chi2_p(torch.where(n == 1, 3, nxt), p) > 1e-3
    assert abs(n.float().mean().item() - p[3].item()) < 0.01


def test_residual_zero_falls_back_to_p_and_no_nan():
    # q(x) = 0 and p == q: ratio 0/0 -> reject; residual all zero -> draw from p (token 2), never NaN or token 0
    p = torch.tensor([0.0, 0.0, 1.0, 0.0, 0.0, 0.0])
    n, nxt = speculative_accept(p.expand(4, 1, V), p.expand(4, 2, V), torch.zeros(4, 1, dtype=torch.long))
    assert n.tolist() == [0] * 4 and nxt.tolist() == [2] * 4


def test_gamma_zero_and_shapes():
    g = torch.Generator().manual_seed(5)
    p = dists(g)
    n, nxt = speculative_accept(torch.empty(N, 0, V), p.expand(N, 1, V), torch.empty(N, 0, dtype=torch.long), g)
    assert n.shape == (N,) and n.dtype == torch.long and (n == 0).all()
    assert chi2_p(nxt, p) > 1e-3
    with pytest.raises(ValueError, match="γ\\+1"):
        speculative_accept(torch.rand(2, 3, V), torch.rand(2, 3, V), torch.zeros(2, 3, dtype=torch.long))


def test_greedy_accept():
    def onehots(rows):
        return torch.nn.functional.one_hot(torch.tensor(rows), V).float() * 5  # logits with argmax = given ids

    draft = torch.tensor([[1, 2, 3], [1, 2, 3], [1, 2, 3], [4, 4, 4]])
    target = onehots([[1, 2, 3, 5], [0, 2, 3, 5], [1, 2, 0, 5], [4, 1, 4, 4]])
    n, nxt = greedy_accept(draft, target)
    assert n.tolist() == [3, 0, 2, 1]  # all + bonus, first rejected, last rejected, middle rejected
    assert nxt.tolist() == [5, 0, 0, 1]
    n, nxt = greedy_accept(draft, target.softmax(-1))  # probs work the same
    assert n.tolist() == [3, 0, 2, 1] and nxt.tolist() == [5, 0, 0, 1]
    n, nxt = greedy_accept(torch.empty(1, 0, dtype=torch.long), onehots([[3]]))
    assert n.tolist() == [0] and nxt.tolist() == [3]


def test_greedy_probs_through_speculative_accept_match_greedy_accept():
    """One-hot target/draft probs (greedy configs) make speculative_accept deterministic and equal to greedy."""
    g = torch.Generator().manual_seed(6)
    draft = torch.randint(0, V, (64, 4), generator=g)
    tgt = torch.randint(0, V, (64, 5), generator=g)
    tgt[:32, :4] = draft[:32]  # half the rows fully accepted
    oh = lambda t: torch.nn.functional.one_hot(t, V).float()
    a = speculative_accept(oh(draft), oh(tgt), draft, g)
    b = greedy_accept(draft, oh(tgt))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert np.all(a[0][:32].numpy() == 4)


def test_input_checks_name_the_shapes():
    q, p = torch.full((2, 3, V), 1 / V), torch.full((2, 4, V), 1 / V)
    with pytest.raises(ValueError, match=r"draft_tokens must be \(B, γ\), got shape \(6,\)"):
        speculative_accept(q, p, torch.zeros(6, dtype=torch.long))
    with pytest.raises(ValueError, match=r"cover γ\+1 = 4 positions \(γ drafts \+ bonus\), got 3"):
        speculative_accept(q, p[:, :3], torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"draft_probs \(2, 3, 5\) must be \(B, γ, V\) = \(2, 3, 6\)"):
        speculative_accept(q[..., :5], p, torch.zeros(2, 3, dtype=torch.long))  # right (B, γ), wrong V
    with pytest.raises(ValueError, match=r"draft_probs \(2, 2, 6\)"):
        speculative_accept(q[:, :2], p, torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"cover γ\+1 = 3 positions"):
        greedy_accept(torch.zeros(1, 2, dtype=torch.long), torch.zeros(1, 2, V))


def test_seeded_generator_reproduces_acceptance_and_draws():
    """All randomness (the accept coins and the final draw) comes from the given generator."""
    g = torch.Generator().manual_seed(9)
    q, p = dists(g, 500, 3), dists(g, 500, 4)
    x = draw(q, g)
    runs = []
    for _ in range(2):
        torch.manual_seed(torch.randint(0, 10**6, ()).item())  # the global RNG moves on between the runs
        runs.append(speculative_accept(q, p, x, torch.Generator().manual_seed(1)))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


def test_residual_fallback_is_per_row():
    """Row 0 has p == q at the rejected position (residual all zero: falls back to p); row 1 does not, and must
    still draw from its own residual."""
    p0 = torch.tensor([0.0, 0.0, 1.0, 0.0, 0.0, 0.0])
    p1 = torch.tensor([0.0, 0.0, 1.0, 0.0, 0.0, 0.0])  # row 1's residual sits on row 0's token: no cross-talk
    q = torch.stack([p0, torch.tensor([0.0, 1.0, 0.0, 0.0, 0.0, 0.0])])[:, None]  # (2, 1, V)
    tgt_tokens = torch.tensor([[0], [1]])  # both drafts have p(x) = 0: rejected
    tgt = torch.stack([torch.stack([p0, p0]), torch.stack([p1, p1])])  # (2, 2, V)
    for _ in range(20):
        n, nxt = speculative_accept(q, tgt, tgt_tokens)
        assert n.tolist() == [0, 0] and nxt.tolist() == [2, 2]
