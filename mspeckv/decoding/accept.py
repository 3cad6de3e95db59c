"""Lossless acceptance of drafted tokens: one function used by every level of the speculation hierarchy.

Shapes (B = batch rows, each verified independently; γ = drafted tokens per row; V = vocabulary):
    draft_probs  (B, γ, V)    q_i: the distribution each drafted token x_i was drawn from
    target_probs (B, γ+1, V)  p_i: the verifier's distribution at the same positions, plus the bonus position γ
    draft_tokens (B, γ)       x_i, int64
    -> n_accepted (B,) int64 in [0, γ], next_token (B,) int64

A row's output is ``x_0 .. x_{n-1}, next``: ``n`` accepted drafts followed by one token from the verifier, so every
round emits ``n + 1`` tokens. Token i is accepted with probability min(1, p_i(x_i) / q_i(x_i)), sequentially; at the
first rejection j the next token is drawn from norm(max(p_j - q_j, 0)); when all γ are accepted it is drawn from p_γ.
The outputs are then distributed exactly as p (Leviathan et al. 2023, Chen et al. 2023), whatever q is, so levels
compose: a level's output stream is distributed as its verifier, and that verifier's probs are the next level's q.

A deterministic proposal (n-gram lookup) is the one-hot q: x_i is accepted with probability p_i(x_i).
Everything stays on the device: no ``.item()``, no host sync.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .sampling import sample

# Residual mass below which a rejection falls back to p_j. The residual's mass is TV(p_j, q_j), which is also the
# probability of rejecting at j, so the fallback changes the output distribution by at most this much in total
# variation; it only fires when p_j == q_j up to float noise (an exact tie makes the residual all zero).
RESIDUAL_EPS = 1e-6


def _check(draft_tokens: Tensor, n_target: int) -> tuple[int, int]:
    if draft_tokens.dim() != 2:
        raise ValueError(f"draft_tokens must be (B, γ), got shape {tuple(draft_tokens.shape)}")
    B, g = draft_tokens.shape
    if n_target != g + 1:
        raise ValueError(f"target distributions must cover γ+1 = {g + 1} positions (γ drafts + bonus), got {n_target}")
    return B, g


def speculative_accept(draft_probs: Tensor, target_probs: Tensor, draft_tokens: Tensor,
                       generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Verify γ drafted tokens per row against the target. Returns (n_accepted (B,), next_token (B,)), see module doc.

    Probabilities need not be normalised exactly (fp32 noise is fine); they are used as given.
    """
    B, g = _check(draft_tokens, target_probs.shape[1])
    if draft_probs.shape[:2] != (B, g) or draft_probs.shape[-1] != target_probs.shape[-1]:
        raise ValueError(
            f"draft_probs {tuple(draft_probs.shape)} must be (B, γ, V) = ({B}, {g}, {target_probs.shape[-1]})"
        )
    V = target_probs.shape[-1]
    p = target_probs.float()  # (B, γ+1, V)
    q = draft_probs.float()  # (B, γ, V)
    x = draft_tokens.long()[..., None]  # (B, γ, 1)
    p_x = p[:, :g].gather(-1, x).squeeze(-1)  # (B, γ)
    q_x = q.gather(-1, x).squeeze(-1)  # (B, γ)
    # Accept iff u * q(x) < p(x), u ~ U[0, 1): probability min(1, p/q) for q(x) > 0, and no division, so q(x) = 0
    # (impossible for a token drawn from q) cannot give NaN: it accepts iff p(x) > 0.
    u = torch.rand((B, g), generator=generator, device=p.device)
    n = (u * q_x < p_x).long().cumprod(-1).sum(-1)  # (B,) accepted prefix length
    # Distribution of the next token: residual at the first rejection, p_γ (q padded with 0) when all accepted.
    at = n[:, None, None].expand(B, 1, V)
    p_n = p.gather(1, at).squeeze(1)  # (B, V)
    q_n = torch.cat([q, q.new_zeros(B, 1, V)], 1).gather(1, at).squeeze(1)  # (B, V)
    res = (p_n - q_n).clamp_min(0.0)
    res = torch.where(res.sum(-1, keepdim=True) > RESIDUAL_EPS, res, p_n)
    return n, sample(res, generator)  # the exponential race needs no normalisation


def greedy_accept(draft_tokens: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """Greedy verification. draft_tokens (B, γ), target logits or probs (B, γ+1, V).

    Accepts while x_i == argmax target_i; next_token is the target argmax at the first mismatch (or the bonus
    position γ). Returns (n_accepted (B,) int64, next_token (B,) int64), no host sync.
    """
    _check(draft_tokens, target.shape[1])
    best = target.argmax(-1)  # (B, γ+1)
    g = draft_tokens.shape[1]
    n = (draft_tokens.long() == best[:, :g]).long().cumprod(-1).sum(-1)  # (B,)
    return n, best.gather(1, n[:, None]).squeeze(1)
