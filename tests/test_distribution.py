"""Every drawn token follows the verifier's distribution: accepted drafts, the correction at a rejection, and the
bonus token drawn after all γ proposals are accepted, for one level (draft -> target) and two (draft -> mid ->
target), checked against distributions fixed in the test (not derived from the code under test).

Each χ² test states its power: the chance of failing (p < ALPHA) when the tested tokens' distribution is off by
0.05 in total variation. With n samples and df degrees of freedom the noncentrality is at least n (2·0.05)^2
(Cauchy-Schwarz: sum (p1 - p0)^2 / p0 >= (sum |p1 - p0|)^2), so power >= ncx2.sf(chi2.ppf(1 - ALPHA, df), df, n/100);
each test asserts its own power >= 0.99 from the sample sizes it actually got.
"""

import numpy as np
import torch
from scipy.stats import chi2, ncx2

from mspeckv.config import SamplingConfig
from mspeckv.decoding.accept import speculative_accept
from mspeckv.decoding.speculative import DraftLevel, Runner, Seq, Timers, VerifyLevel
from tests.test_sampling_reference import ref_probs

ALPHA = 1e-3
V = 6


def power(n: float, df: int, tv: float = 0.05) -> float:
    return float(ncx2.sf(chi2.ppf(1 - ALPHA, df), df, n * (2 * tv) ** 2))


def conditional_chi2(ctx: np.ndarray, tok: np.ndarray, table: np.ndarray) -> tuple[float, float]:
    """Goodness of fit of tokens ``tok`` given contexts ``ctx`` to ``table[ctx]`` (rows: context, cols: token).
    Returns (p-value, power at TV 0.05). Contexts with no sample are skipped; df = sum over used contexts of
    (support - 1)."""
    stat, df, n = 0.0, 0, 0
    for c in np.unique(ctx):
        obs = np.bincount(tok[ctx == c], minlength=table.shape[1]).astype(float)
        exp = table[c] * obs.sum()
        assert obs[exp == 0].sum() == 0, f"token outside the support in context {c}"
        keep = exp > 0
        stat += float(((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum())
        df += int(keep.sum()) - 1
        n += int(obs.sum())
    return float(chi2.sf(stat, df)), power(n, df)


def tables(g: torch.Generator, *shape: int) -> torch.Tensor:
    """Random strictly positive distributions over V, (*shape, V), Dirichlet(1)."""
    x = torch._standard_gamma(torch.ones(*shape, V, dtype=torch.float64), generator=g) + 0.02
    return (x / x.sum(-1, keepdim=True)).float()


def draw(p: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    return torch.multinomial(p.reshape(-1, p.shape[-1]), 1, generator=g).view(p.shape[:-1])


def check(ctx, tok, table, mask=None, min_power=0.99):
    ctx, tok = np.asarray(ctx), np.asarray(tok)
    if mask is not None:
        ctx, tok = ctx[np.asarray(mask)], tok[np.asarray(mask)]
    pv, pw = conditional_chi2(ctx, tok, np.asarray(table, dtype=np.float64))
    assert pw >= min_power, f"too few samples: power {pw:.3f}"
    assert pv > ALPHA, f"p = {pv:.2e}"


def test_one_level_every_position_including_the_bonus():
    """γ = 3, each distribution conditioned on the previous token: target P_i[prev], draft Q_i[prev]. Among rows
    that reach position i, token i given token i-1 follows P_i[token i-1]; the bonus (position 3, all accepted) is
    also tested on its own. N = 200000 rows; ~47% reach the bonus: power at TV .05 = 1.00 for every check
    (e.g. the bonus alone: ~94000 samples, df 30)."""
    N, G = 200_000, 3
    g = torch.Generator().manual_seed(0)
    P = tables(g, G + 1, V)  # P[i, prev] over the token at position i (prev of position 0: token 0)
    Q = tables(g, G, V)
    Q = 0.5 * Q + 0.5 * P[:G]  # closer to the target: the bonus is reached often
    x = torch.zeros(N, G, dtype=torch.long)
    prev = torch.zeros(N, dtype=torch.long)
    for i in range(G):
        x[:, i] = draw(Q[i][prev], g)
        prev = x[:, i]
    ctx = torch.cat([torch.zeros(N, 1, dtype=torch.long), x], 1)  # context of position i: x_{i-1}
    target = torch.stack([P[i][ctx[:, i]] for i in range(G + 1)], 1)  # (N, γ+1, V)
    draft = torch.stack([Q[i][ctx[:, i]] for i in range(G)], 1)
    n, nxt = speculative_accept(draft, target, x, g)
    out = torch.cat([x, torch.zeros(N, 1, dtype=torch.long)], 1).scatter(1, n[:, None], nxt[:, None])
    for i in range(G + 1):
        reach = n >= i
        check(ctx[:, i], out[:, i], P[i].numpy(), reach)
    check(ctx[:, G], out[:, G], P[G].numpy(), n == G)  # the bonus token alone
    acc = torch.minimum(P[0][0], Q[0][0]).sum()  # first acceptance rate = sum min(p, q)
    assert abs((n >= 1).float().mean() - acc) < 0.005


def test_two_levels_every_position_including_both_bonuses():
    """draft -> mid -> target as the runner composes them (VerifyLevel.propose with k = 2, draft_gamma = 2): a mid
    round of one draft (min(2, k - 0 - 1)), and when it is rejected a second mid round of zero drafts (the mid's
    token alone); the mid's probabilities are the top's proposal distribution. Checked: both mid tokens (and the
    mid's bonus alone) against M, every top token (and the top's bonus alone) against P. N = 200000: power at TV
    .05 >= 0.999 for each check."""
    N = 200_000
    g = torch.Generator().manual_seed(1)
    P = tables(g, 3, V)
    M = 0.6 * tables(g, 3, V) + 0.4 * P
    D = 0.5 * tables(g, 1, V) + 0.5 * M[:1]
    zero = torch.zeros(N, dtype=torch.long)
    # mid round 1: one draft x0 ~ D0, verified against [M0, M1[x0]]
    x0 = draw(D[0][zero], g)
    n1, nxt1 = speculative_accept(D[0][zero][:, None], torch.stack([M[0][zero], M[1][x0]], 1), x0[:, None], g)
    y0 = torch.where(n1 == 1, x0, nxt1)
    # mid round 2 where round 1 stopped after one token: no drafts, the mid's own token at position 1
    n1b, nxt1b = speculative_accept(torch.empty(N, 0, V), M[1][y0][:, None], torch.empty(N, 0, dtype=torch.long), g)
    assert (n1b == 0).all()
    y1 = torch.where(n1 == 1, nxt1, nxt1b)
    check(zero, y0, M[0].numpy())
    check(y0, y1, M[1].numpy())
    check(y0, y1, M[1].numpy(), n1 == 1)  # the mid's bonus alone
    # top: verify (y0, y1) with the mid's distributions against [P0, P1[y0], P2[y1]]
    q = torch.stack([M[0][zero], M[1][y0]], 1)
    n2, nxt2 = speculative_accept(q, torch.stack([P[0][zero], P[1][y0], P[2][y1]], 1), torch.stack([y0, y1], 1), g)
    out = torch.stack([y0, y1, zero], 1).scatter(1, n2[:, None], nxt2[:, None])
    ctx = torch.stack([zero, out[:, 0], out[:, 1]], 1)
    for i in range(3):
        check(ctx[:, i], out[:, i], P[i].numpy(), n2 >= i)
    check(ctx[:, 2], out[:, 2], P[2].numpy(), n2 == 2)  # the top's bonus alone


# ---------------------------------------------------------------------------- the runner's levels (speculative.py)

class TableModel:
    """A fake model whose next-token logits depend only on the absolute position: log(table[(pos) % period]) for
    the token at ``pos``. Drives the real Runner / DraftLevel / VerifyLevel code (feeds, rollbacks, bonus writes)."""

    def __init__(self, table: torch.Tensor):
        self.table = table

    def __call__(self, ids, cache, pos0: int, num_logits: int):
        T = ids.shape[1]
        cache.n += T
        out = torch.arange(pos0 + T - num_logits, pos0 + T) + 1  # positions of the predicted tokens
        return self.table[out % len(self.table)].log()[None]


class Count:
    def __init__(self, n):
        self.n = n

    def rollback(self, k):
        assert 0 <= k <= self.n
        self.n -= k


class Recording(VerifyLevel):
    """Records, per round, the emitted tokens' positions and whether the round ended with the bonus."""

    def verify(self, seq, L, n, q):
        a, p = super().verify(seq, L, n, q)
        self.log = getattr(self, "log", [])
        self.log.append((L, n, a, seq.tokens[0, L:L + a + 1].tolist()))
        return a, p


def test_runner_levels_every_drawn_token():
    """The hierarchy as speculative_generate drives it (gamma 3 over draft_gamma 2), sampled at temperature 0.8
    with top-k 4 of 6, on fake models whose distributions depend on the position mod 3 only, so the output tokens
    are independent and the token at position t must follow ref(target_table[t % 3]) (the independent reference of
    test_sampling_reference). 12000 generated tokens, df 9: power at TV .05 = 1.00 for all tokens and for the mid
    level's emitted tokens; the top level's ~2400 bonus tokens alone: power 0.67 (full power for the bonus is in
    the vectorised tests above). torch runs single-threaded here: on a busy 2-core machine OpenMP spin-waits
    made each tiny softmax take ~10 ms."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _runner_levels()
    finally:
        torch.set_num_threads(threads)


def _runner_levels():
    g = torch.Generator().manual_seed(2)
    per = 3
    Pt = tables(g, per)
    Pm = 0.2 * tables(g, per) + 0.8 * Pt  # close levels: rounds often end with the bonus
    Pd = 0.2 * tables(g, per) + 0.8 * Pm
    s = SamplingConfig(temperature=0.8, top_k=4, seed=5)
    ref = lambda tab: np.array([ref_probs(tab[r].log().tolist(), 0.8, 4) for r in range(per)])
    gen = torch.Generator().manual_seed(5)
    T0, M = 5, 12_000
    seq = Seq(torch.zeros(1, T0, dtype=torch.long), T0 + M + 16, host=False)
    seq.tokens[0, T0] = 0
    seq.len = T0 + 1  # token T0 stands for the prefill's token; generation starts at T0 + 1
    timers = Timers(torch.device("cpu"))
    draft = DraftLevel(Runner(TableModel(Pd), Count(T0), T0), s, gen, timers)
    mid = Recording("verify_l1", Runner(TableModel(Pm), Count(T0), T0), draft, 2, s, gen, timers)
    top = Recording("verify_l2", Runner(TableModel(Pt), Count(T0), T0), mid, 3, s, gen, timers)
    made = 1
    while made < M:
        L = seq.len
        k = min(3, M - made - 1)
        n, q = mid.propose(seq, k) if k > 0 else (0, None)
        assert n == k and (q is None or q.shape[1] == k)  # the mid level hands up exactly k proposals
        a, _ = top.verify(seq, L, n, q)
        made += a + 1
    pos = np.arange(T0 + 1, T0 + M)
    toks = seq.tokens[0, T0 + 1:T0 + M].numpy()
    check(pos % per, toks, ref(Pt))
    bonus = [(L + a, toks_[-1]) for L, n, a, toks_ in top.log if a == n and n > 0]
    bp, bt = np.array(bonus).T
    check(bp % per, bt, ref(Pt), min_power=0.5)
    emitted = [(L + i, t) for L, n, a, ts in mid.log for i, t in enumerate(ts)]
    ep, et = np.array(emitted).T
    check(ep % per, et, ref(Pm))
    assert 0.3 < top.stats.accepted / top.stats.proposed < 0.95 and mid.stats.accepted > 0
