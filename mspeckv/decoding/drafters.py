"""Prompt-lookup (n-gram) drafting: propose the tokens that followed the latest earlier occurrence of the suffix.

Runs on the host on token ids the host already holds. The proposal is deterministic, i.e. a one-hot q, which
``speculative_accept`` verifies losslessly (x_i is accepted with probability p_i(x_i)).

Lookup is O(max_ngram) per call after an incremental index: ``index[ngram] = start of the tokens that followed its
latest occurrence``. An n-gram is indexed only once a token follows it, so the history's own suffix is never its own
match. Each call checks that the history extends the one already indexed (else it re-indexes from scratch).
"""

from __future__ import annotations

import torch
from torch import Tensor


class NGramDrafter:
    def __init__(self, max_ngram: int = 3, min_ngram: int = 1, k: int = 4):
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got min_ngram={min_ngram}, max_ngram={max_ngram}")
        if k < 1:
            raise ValueError(f"k (tokens per proposal) must be >= 1, got {k}")
        self.max_ngram, self.min_ngram, self.k = max_ngram, min_ngram, k
        self.reset()

    def reset(self) -> None:
        self._hist: list[int] = []
        self._index: dict[tuple[int, ...], int] = {}

    def _sync(self, history: list[int]) -> None:
        n_old = len(self._hist)
        if len(history) < n_old or history[:n_old] != self._hist:
            self.reset()
            n_old = 0
        h = self._hist = list(history)
        # n-grams ending at position e get indexed once token e+1 exists; the newest indexed end is len - 2.
        for e in range(max(n_old - 1, 0), len(h) - 1):
            for n in range(self.min_ngram, min(self.max_ngram, e + 1) + 1):
                self._index[tuple(h[e - n + 1:e + 1])] = e + 1

    def propose(self, history: list[int] | Tensor, k: int | None = None) -> list[int]:
        """Up to ``k`` (default ``self.k``) tokens following the most recent earlier occurrence of the longest
        matching suffix n-gram (n from max_ngram down to min_ngram); fewer if the history ends first; [] if none."""
        if isinstance(history, Tensor):
            history = history.tolist()  # host ids expected: a device tensor would sync here
        self._sync(history)
        k = self.k if k is None else k
        h = self._hist
        for n in range(min(self.max_ngram, len(h)), self.min_ngram - 1, -1):
            start = self._index.get(tuple(h[-n:]))
            if start is not None:
                return h[start:start + k]
        return []

    @staticmethod
    def proposal_probs(tokens: list[int], vocab: int, device: torch.device | str = "cpu",
                       dtype: torch.dtype = torch.float32) -> Tensor:
        """One-hot proposal distributions (1, len(tokens), vocab) for ``speculative_accept``."""
        t = torch.tensor(tokens, dtype=torch.long, device=device).view(1, -1, 1)
        return torch.zeros(1, t.shape[1], vocab, dtype=dtype, device=device).scatter_(-1, t, 1.0)
