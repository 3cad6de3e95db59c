"""The cost model that picks γ per speculation round, AR (γ = 0) included: MagicDec's arithmetic on costs measured
for the batch, context and placement actually running, and on the acceptance measured so far.

A round of γ drafts costs ``draft_calls(γ) · t_draft + t_verify(γ)`` and yields, per sequence, Ω(α, γ) tokens in
expectation, where each draft is accepted with probability α until the first rejection:

    Ω(α, γ) = 1 + α + α² + … + α^γ = (1 − α^(γ+1)) / (1 − α)

An AR step costs ``t_ar`` (plus a draft forward with a separate draft model, whose KV must keep up) and yields one
token. The model picks the γ with the most expected tokens per second,
Ω(α, γ) / cost(γ), against 1 / t_ar. α is estimated from the rounds so far (the maximum-likelihood estimate of a
geometric run cut at γ: accepted drafts over accepted drafts plus rejections), starting from ``prior``. While AR
wins, one speculation round in every ``probe_every`` steps keeps α current (else a rise in acceptance is never seen).
"""

from __future__ import annotations

from dataclasses import dataclass, field


def expected_tokens(alpha: float, gamma: int) -> float:
    """Ω(α, γ): expected tokens per sequence per round (γ drafts, one target token)."""
    if gamma == 0:
        return 1.0
    if alpha >= 1.0:
        return gamma + 1.0
    return (1.0 - alpha ** (gamma + 1)) / (1.0 - alpha)


@dataclass
class CostModel:
    t_ar: float  # seconds of one AR step of the whole batch
    t_draft: float  # seconds of one draft forward (1 token per sequence)
    t_verify: dict[int, float]  # γ -> seconds of one verification of γ + 1 tokens per sequence
    draft_extra: int = 0  # draft forwards per round beyond γ (vanilla: 1, to write dγ's row into the draft's KV)
    prior: float = 0.7  # α before any round was seen
    probe_every: int = 16  # while AR wins: one speculation round per this many AR steps
    accepted: int = 0  # drafts accepted so far (every sequence, every round)
    rejected: int = 0  # rounds that ended at a rejection
    picks: dict[int, int] = field(default_factory=dict)  # γ -> rounds (0: AR steps)
    since_probe: int = 0

    def __post_init__(self):
        if not self.t_verify:
            raise ValueError("the cost model needs at least one γ with a measured verification")
        for name, t in (("t_ar", self.t_ar), ("t_draft", self.t_draft), *((f"t_verify[{g}]", t)
                                                                         for g, t in self.t_verify.items())):
            if not t > 0:
                raise ValueError(f"{name} must be a measured time > 0 s, got {t}")

    @property
    def alpha(self) -> float:
        seen = self.accepted + self.rejected
        return self.accepted / seen if seen else self.prior

    def round_s(self, gamma: int) -> float:
        if gamma == 0:  # vanilla's draft also takes the token (its KV keeps up)
            return self.t_ar + self.draft_extra * self.t_draft
        return (gamma + self.draft_extra) * self.t_draft + self.t_verify[gamma]

    def rate(self, gamma: int, alpha: float | None = None) -> float:
        """Expected tokens per second per sequence at γ (0: AR)."""
        a = self.alpha if alpha is None else alpha
        return expected_tokens(a, gamma) / self.round_s(gamma)

    def best(self) -> int:
        """The γ (0 = AR) with the most expected tokens per second now."""
        return max([0, *sorted(self.t_verify)], key=self.rate)

    def pick(self) -> int:
        """The γ for the next round: ``best()``, except a probing round of speculation every ``probe_every`` AR
        steps."""
        g = self.best()
        if g == 0:
            self.since_probe += 1
            if self.since_probe >= self.probe_every:
                self.since_probe = 0
                g = max(self.t_verify, key=lambda x: self.rate(x))
        self.picks[g] = self.picks.get(g, 0) + 1
        return g

    def observe(self, gamma: int, n_accepted: list[int]) -> None:
        """One round's accepted counts, one per live sequence."""
        for n in n_accepted:
            if not 0 <= n <= gamma:
                raise ValueError(f"accepted count {n} outside [0, {gamma}]")
            self.accepted += n
            self.rejected += n < gamma

    def record(self) -> dict:
        """What the run record keeps: the measured costs, the acceptance, the choices and why."""
        a = self.alpha
        rates = {g: self.rate(g, a) for g in [0, *sorted(self.t_verify)]}
        best = max(rates, key=rates.get)
        return {"t_ar_ms": self.t_ar * 1e3, "t_draft_ms": self.t_draft * 1e3,
                "t_verify_ms": {g: t * 1e3 for g, t in sorted(self.t_verify.items())},
                "alpha": a, "rounds_per_gamma": dict(sorted(self.picks.items())),
                "expected_speedup_vs_ar": {g: r / rates[0] for g, r in rates.items()},
                "reason": f"at α = {a:.3f} γ = {best} expects {rates[best] / rates[0]:.2f}× AR's tokens per second"
                          + (" (AR: speculation does not pay)" if best == 0 else "")}
