"""The metric arithmetic, as pure functions on tensors (no model, no cache): the tests check these by hand.

Every aggregate is kept as sums (``Accumulator``) so that windows, chunks and resumed sessions combine exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

ECE_BINS = 10


def token_nll(logits: Tensor, targets: Tensor) -> Tensor:
    """Negative log-likelihood of each target: logits (N, V), targets (N,) -> (N,) fp32."""
    return torch.nn.functional.cross_entropy(logits.float(), targets, reduction="none")


def perplexity(nll_sum: float, n: int) -> float:
    """``exp(mean NLL)``."""
    if n <= 0:
        raise ValueError("perplexity of zero scored tokens")
    return math.exp(nll_sum / n)


def kl_divergence(logits_p: Tensor, logits_q: Tensor) -> Tensor:
    """KL(p || q) per row, in nats, for next-token distributions given as logits (N, V) -> (N,).

    p is the full-cache model, q the compressed/placed one; identical inputs give exactly 0 (clamped at 0 against
    rounding)."""
    lp = torch.log_softmax(logits_p.float(), -1)
    lq = torch.log_softmax(logits_q.float(), -1)
    return (lp.exp() * (lp - lq)).sum(-1).clamp_min(0.0)


def ece_bins(confidence: Tensor, correct: Tensor, n_bins: int = ECE_BINS) -> tuple[list[int], list[float], list[float]]:
    """Per-bin (count, sum of confidence, sum of correctness) over equal-width bins of [0, 1].

    Bin i holds confidences in ``(i/n, (i+1)/n]`` (bin 0 also holds 0)."""
    conf = confidence.double().flatten().cpu()
    corr = correct.double().flatten().cpu()
    idx = (torch.ceil(conf * n_bins).long() - 1).clamp(0, n_bins - 1)
    count = torch.bincount(idx, minlength=n_bins)
    csum = torch.bincount(idx, weights=conf, minlength=n_bins)
    asum = torch.bincount(idx, weights=corr, minlength=n_bins)
    return count.tolist(), csum.tolist(), asum.tolist()


def ece_from_bins(count: list[int], conf_sum: list[float], correct_sum: list[float]) -> float:
    """Expected calibration error: sum over bins of |bin| / n * |accuracy(bin) - confidence(bin)|."""
    n = sum(count)
    if n == 0:
        raise ValueError("ECE of zero predictions")
    return sum(abs(a - c) / n for k, c, a in zip(count, conf_sum, correct_sum, strict=True) if k)


def expected_calibration_error(confidence: Tensor, correct: Tensor, n_bins: int = ECE_BINS) -> float:
    return ece_from_bins(*ece_bins(confidence, correct, n_bins))


def top1(logits: Tensor) -> tuple[Tensor, Tensor]:
    """(top-1 probability, argmax) per row."""
    return tuple(torch.softmax(logits.float(), -1).max(-1))


def cosine(a: Tensor, b: Tensor) -> Tensor:
    """Cosine similarity along the last axis, in fp32 (rows of zeros give 1 if both are zero)."""
    a, b = a.float(), b.float()
    num = (a * b).sum(-1)
    den = a.norm(dim=-1) * b.norm(dim=-1)
    both_zero = (a.norm(dim=-1) == 0) & (b.norm(dim=-1) == 0)
    return torch.where(both_zero, torch.ones_like(num), num / den.clamp_min(1e-30))


def relative_mse(approx: Tensor, ref: Tensor) -> float:
    """``||approx - ref||^2 / ||ref||^2`` over all elements (fp32); 0 for an exact copy."""
    a, r = approx.float(), ref.float()
    den = float(r.pow(2).sum())
    num = float((a - r).pow(2).sum())
    return num / den if den > 0 else (0.0 if num == 0 else math.inf)


@dataclass
class Accumulator:
    """Running sums over scored positions for one config: NLL, KL and top-1 agreement against the full cache,
    ECE bins, and per-layer attention-output cosine sums."""

    n: int = 0
    nll_sum: float = 0.0
    kl_sum: float = 0.0
    agree: int = 0
    ece_count: list[int] = field(default_factory=lambda: [0] * ECE_BINS)
    ece_conf: list[float] = field(default_factory=lambda: [0.0] * ECE_BINS)
    ece_correct: list[float] = field(default_factory=lambda: [0.0] * ECE_BINS)
    cos_sum: list[float] = field(default_factory=list)
    cos_n: int = 0

    def add_tokens(self, logits: Tensor, targets: Tensor, ref_logits: Tensor | None) -> float:
        """logits (N, V) of this config, targets (N,), ref_logits (N, V) of the full cache (None for the full cache
        itself: KL 0 and agreement 1 by definition). Returns these tokens' NLL sum."""
        self.n += int(targets.numel())
        nll = float(token_nll(logits, targets).double().sum())
        self.nll_sum += nll
        conf, arg = top1(logits)
        c, s, a = ece_bins(conf, arg == targets)
        self.ece_count = [x + y for x, y in zip(self.ece_count, c, strict=True)]
        self.ece_conf = [x + y for x, y in zip(self.ece_conf, s, strict=True)]
        self.ece_correct = [x + y for x, y in zip(self.ece_correct, a, strict=True)]
        if ref_logits is None:
            self.agree += int(targets.numel())
        else:
            self.kl_sum += float(kl_divergence(ref_logits, logits).double().sum())
            self.agree += int((ref_logits.argmax(-1) == arg).sum())
        return nll

    def add_cosines(self, per_layer: list[Tensor]) -> None:
        """per_layer: one (N,) tensor of cosines per layer, for the same N sampled positions."""
        if not self.cos_sum:
            self.cos_sum = [0.0] * len(per_layer)
        for i, c in enumerate(per_layer):
            self.cos_sum[i] += float(c.double().sum())
        self.cos_n += int(per_layer[0].numel()) if per_layer else 0

    def results(self) -> dict:
        out = {"scored_tokens": self.n, "nll_mean": self.nll_sum / self.n, "ppl": perplexity(self.nll_sum, self.n),
               "kl_mean": self.kl_sum / self.n, "top1_agreement": self.agree / self.n,
               "ece": ece_from_bins(self.ece_count, self.ece_conf, self.ece_correct),
               "ece_bins": {"count": self.ece_count, "confidence_sum": self.ece_conf,
                            "correct_sum": self.ece_correct},
               "accuracy_top1": sum(self.ece_correct) / self.n}
        if self.cos_n:
            per_layer = [s / self.cos_n for s in self.cos_sum]
            out.update(attn_cosine_per_layer=per_layer, attn_cosine_mean=sum(per_layer) / len(per_layer),
                       attn_cosine_min=min(per_layer), attn_sampled_queries=self.cos_n)
        return out
