"""Pure sampling functions: logits -> probs (temperature, top-k, top-p), sync-free draws, speculative acceptance.

Nothing here calls ``.item()`` or ``.cpu()``: every function stays on the device so a decode loop never stalls.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..config import SamplingConfig


def logits_to_probs(logits: Tensor, s: SamplingConfig) -> Tensor:
    """logits (..., V) -> fp32 probs (..., V). Greedy configs give a one-hot on the argmax."""
    logits = logits.float()
    if s.greedy:
        return torch.zeros_like(logits).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
    logits = logits / s.temperature
    if s.top_k and s.top_k < logits.shape[-1]:
        kth = torch.topk(logits, s.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if s.top_p < 1.0:
        sorted_logits, idx = torch.sort(logits, dim=-1, descending=True)
        ps = sorted_logits.softmax(-1)
        drop = (ps.cumsum(-1) - ps) >= s.top_p  # mass strictly before this token already reaches p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, idx, sorted_logits)
    return logits.softmax(-1)


def sample(probs: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Draw one index per row of probs (..., V) without a host sync (exponential race: argmax p_i / E_i)."""
    e = torch.empty_like(probs).exponential_(1.0, generator=generator)
    return (probs / e).argmax(-1)


def next_token(logits: Tensor, s: SamplingConfig, generator: torch.Generator | None = None) -> Tensor:
    """logits (B, V) -> (B,) token ids, greedy or sampled."""
    if s.greedy:
        return logits.argmax(-1)
    return sample(logits_to_probs(logits, s), generator)


def make_generator(device: torch.device | str, seed: int | None) -> torch.Generator | None:
    if seed is None:
        return None
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g
