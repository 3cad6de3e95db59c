"""TriForce's chunk retrieval: whole chunks of ``chunk`` rows ranked by ``q . mean(K_chunk)`` of the last query, plus
the sink chunk and the ragged tail. The MSpecKV hierarchy's default middle level (``mspeckv/kv/retrieval.py`` has the
selection rule and its documentation)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..kv.base import LastQueries
from ..kv.retrieval import check_budget, select_chunks
from .base import Press, last_queries


@dataclass(frozen=True)
class RetrievalPress(Press):
    name: ClassVar[str] = "retrieval"
    budget: int = 4096  # rows kept, a multiple of chunk (a count: chunks are whole)
    chunk: int = 8
    n_queries: int = 1  # newest query rows that score the chunks

    def __post_init__(self):
        for f in ("budget", "chunk", "n_queries"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"retrieval.{f} must be an int >= 1, got {v!r}")
        check_budget(self.budget, self.chunk)

    def observers(self, n_layers):
        return [LastQueries(n_layers, self.n_queries)]

    def max_rows(self, L, n_layers, n_kv_heads=1):
        return min(L, self.budget)

    def select(self, layer, n_layers, k, pos, obs):
        if self.budget >= k.shape[2]:
            return None
        return select_chunks(k, last_queries(obs, layer), self.budget, self.chunk)
