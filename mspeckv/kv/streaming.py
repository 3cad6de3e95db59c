"""StreamingCache: the draft model's bounded KV (StreamingLLM policy): ``sinks`` first tokens + a recent window.

Layout per layer: one preallocated ``(B, H_kv, capacity, D)`` buffer, ``capacity = sinks + window + room + slack``.
Rows ``[0, sinks)`` hold the first tokens forever; rows ``[sinks, length)`` hold the most recent ``length - sinks``
tokens, oldest first. Held non-sink tokens are always one contiguous run ending at the newest token, so the absolute
positions are implicit (see ``positions()``).

Positions. Keys are stored after RoPE with their ORIGINAL absolute positions; once tokens have been evicted the
held positions have a gap (``sinks - 1`` then ``n_seen - (length - sinks)``). RoPE scores depend only on
``pos_q - pos_k``, so attention over the gapped set is exactly what the model would compute over those tokens at
their true positions. The caller must pass ``pos0=cache.n_seen`` to the model (its default, ``cache.length()``, is
wrong once anything was evicted).

Eviction happens ONLY in ``begin(n_new)`` (or an explicit ``reserve``), never inside update/end, and only when
``length + n_new > capacity``. It then drops old non-sink tokens down to exactly ``window`` of them, so the first new
token still sees ``sinks + window`` old tokens, and the next eviction is ``room + slack - n_new`` tokens away
(``slack`` amortises the O(window) compaction copy). A ``rollback(n)`` of tokens appended since the last eviction is
exact (same state as if they had never been fed); rolling back further would need evicted tokens back and raises.

Speculative drafting: call ``reserve(γ + 1)`` (or the total of the round's forwards) at the start of a round so no
eviction happens mid-round and any rollback of that round is legal.
"""

from __future__ import annotations

import torch

from .base import CacheFullError, check_begin, check_rollback
from .dense import DenseKV


class StreamingCache(DenseKV):
    """DenseKV's buffers and append/view; eviction, positions and the rollback limit are its own."""

    def __init__(self, n_layers: int, batch: int, n_kv_heads: int, head_dim: int, *, window: int, sinks: int = 16,
                 room: int = 8, slack: int | None = None, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu"):
        if sinks < 0:
            raise ValueError(f"sinks must be >= 0, got {sinks}")
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        if room < 1:
            raise ValueError(f"room must be >= 1 (the largest forward fed to this cache), got {room}")
        slack = window // 4 if slack is None else slack
        if slack < 0:
            raise ValueError(f"slack must be >= 0, got {slack}")
        super().__init__(n_layers, batch, n_kv_heads, head_dim, sinks + window + room + slack, dtype, device)
        self.sinks, self.window, self.room, self.slack = sinks, window, room, slack
        self.n_seen = 0  # tokens fed minus rolled back = absolute position of the next token
        self.n_evicted = 0  # tokens dropped so far (n_seen - n_evicted == length)
        self._since_evict = 0  # committed tokens appended since the last eviction: the rollback limit

    @classmethod
    def for_model(cls, model, batch: int, *, window: int, sinks: int = 16, room: int = 8, slack: int | None = None,
                  device=None, dtype=None) -> StreamingCache:
        c = model.cfg
        p = next(model.parameters())
        return cls(c.n_layers, batch, c.n_kv_heads, c.head_dim, window=window, sinks=sinks, room=room, slack=slack,
                   dtype=dtype or p.dtype, device=device or p.device)

    def positions(self) -> list[int]:
        """Absolute positions of the held rows, in row order (host ints, no device work)."""
        s = min(self.sinks, self._len)
        return list(range(s)) + list(range(self.n_seen - (self._len - s), self.n_seen))

    def _evict(self) -> None:
        """Keep the sinks and the newest ``window`` non-sink tokens; one copy of the survivors per layer."""
        s, keep = self.sinks, self.window
        drop = self._len - s - keep
        if drop <= 0:
            return
        for t in self.k + self.v:  # source and destination overlap: copy the survivors out first
            t[:, :, s:s + keep] = t[:, :, s + drop:self._len].clone()
        self._len -= drop
        self.n_evicted += drop
        self._since_evict = 0

    def reserve(self, n: int) -> None:
        """Evict now if needed so that forwards totalling ``n`` tokens fit without any eviction (rollback-safe)."""
        if self._pending is not None:
            raise RuntimeError("reserve() inside a forward (between begin and end)")
        if n > self.room + self.slack:
            raise ValueError(f"reserve({n}) exceeds room + slack = {self.room + self.slack}; build the cache with "
                             f"a larger room")
        if self._len + n > self.max_len:
            self._evict()

    def begin(self, n_new: int) -> None:
        if n_new > self.room:
            raise CacheFullError(
                f"a forward of {n_new} tokens exceeds this streaming cache's room of {self.room}; build it with "
                f"room >= the largest forward (γ+1 when drafting, the prefill chunk when prefilling)"
            )
        if self._pending is None and self._len + n_new > self.max_len:
            self._evict()
        check_begin(self._len, n_new, self.max_len, self._pending)
        self._pending = n_new

    def end(self) -> None:
        self._len += self._pending
        self.n_seen += self._pending
        self._since_evict += self._pending
        self._pending = None

    def skip(self, n: int) -> None:
        """Advance the absolute position by ``n`` tokens that are never fed (a StreamingLLM prefill feeds the sinks
        and the last ``window`` prompt tokens only): they count as seen and evicted, so ``n_seen`` and
        ``positions()`` stay true. Only between forwards, and only right after the sinks (no window rows yet)."""
        if self._pending is not None:
            raise RuntimeError("skip() inside a forward (between begin and end)")
        if n < 0 or self._len > self.sinks:
            raise ValueError(f"skip({n}) needs n >= 0 and nothing past the sinks yet (length {self._len})")
        self.n_seen += n
        self.n_evicted += n

    def rollback(self, n: int) -> None:
        check_rollback(n, self._len)
        if n > self._since_evict:
            raise ValueError(
                f"rollback({n}) crosses an eviction: only {self._since_evict} tokens were appended since the last "
                f"one; call reserve(total tokens of the round) before a speculation round"
            )
        self._len -= n
        self.n_seen -= n
        self._since_evict -= n
