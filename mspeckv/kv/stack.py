"""SeqStackKV: any cache, one per sequence, behind the batched engine's slot interface (``kv/batch.py``).

Each slot holds its own batch-1 cache built by ``factory()`` (``cache.make_cache`` with any placement and press:
offloaded and quantized stores, resident slots, pressed rows), so every sequence keeps its own length, positions,
kept rows and press. A forward over the focused slots hands each sequence's new rows to its own cache, then pads the
views those caches return to the longest one for one batched attention: padding rows are masked, never attended,
and never held (they live only in this forward's view). ``join`` builds a fresh cache; ``leave`` drops it, which
frees its GPU and pinned bytes.

It runs eagerly (no CUDA graphs): ``BatchKV`` is the graphed fast path for dense KV on the GPU.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import KVCache
from .batch import check_focus, first_free


class SeqStackKV(KVCache):
    ragged = True

    def __init__(self, factory: Callable[[], KVCache], slots: int, capacity: int, device):
        super().__init__()
        if slots < 1:
            raise ValueError(f"slots must be >= 1, got {slots}")
        self.factory, self.slots, self.cap, self.device = factory, slots, capacity, torch.device(device)
        self.caches: list[KVCache | None] = [None] * slots
        self.first, self.batch = 0, slots
        self.n_layers = None
        self._views: dict[int, list] = {}

    # ------------------------------------------------------------------------------------------------- slots
    def focus(self, first: int, n: int) -> None:
        check_focus(first, n, self.slots)
        self.first, self.batch = first, n

    def join(self) -> int:
        s = first_free(self.free_slots(), self.slots)
        c = self.factory()
        if getattr(c, "batch", 1) not in (None, 1):
            raise ValueError(f"the factory must build batch-1 caches, got batch {c.batch}")
        self.caches[s] = c
        self.n_layers = c.n_layers
        return s

    def leave(self, slot: int) -> None:
        if self.caches[slot] is None:
            raise ValueError(f"slot {slot} holds no sequence")
        self.caches[slot] = None  # its buffers (GPU and pinned) go with it

    @contextmanager
    def held(self, slots: list[int]):
        """The sequences in ``slots`` (still being prefilled) sit out the forwards inside: their caches are set aside
        (the forwards see free slots there) and put back after."""
        kept = [self.caches[s] for s in slots]
        for s in slots:
            self.caches[s] = None
        try:
            yield
        finally:
            for s, c in zip(slots, kept, strict=True):
                self.caches[s] = c

    def move(self, src: int, dst: int) -> None:
        """Move slot ``src``'s cache to the free slot ``dst`` (the object itself: nothing is copied)."""
        if self.caches[src] is None or self.caches[dst] is not None:
            raise ValueError(f"move needs a sequence in slot {src} and slot {dst} free")
        self.caches[dst], self.caches[src] = self.caches[src], None

    def free_slots(self) -> list[int]:
        return [s for s in range(self.slots) if self.caches[s] is None]

    def live_slots(self) -> list[int]:
        return [s for s in range(self.slots) if self.caches[s] is not None]

    def _focused(self) -> list[tuple[int, KVCache | None]]:
        return [(b, self.caches[self.first + b]) for b in range(self.batch)]

    def lengths(self) -> list[int]:
        return [c.length() if c is not None else 0 for _, c in self._focused()]

    # -------------------------------------------------------------------------------------------- KVCache protocol
    def length(self) -> int:
        return max(self.lengths(), default=0)

    def next_position(self) -> int:
        return max((c.next_position() for _, c in self._focused() if c is not None), default=0)

    def capacity(self) -> int:
        return self.cap

    def graph_key(self, n_new: int):
        return None

    def token_positions(self, n_new: int) -> Tensor:
        starts = [c.next_position() if c is not None else 0 for _, c in self._focused()]
        return torch.tensor(starts, device=self.device)[:, None] + torch.arange(n_new, device=self.device)[None, :]

    def begin(self, n_new: int) -> None:
        for _, c in self._focused():
            if c is not None:
                c.begin(n_new)
        self._n = n_new

    def on_query(self, layer: int, q: Tensor) -> None:
        for b, c in self._focused():
            if c is not None:
                c.on_query(layer, q[b:b + 1])

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Each sequence's rows into its own cache; its view padded to the longest: (B, H, S, D) and a mask
        (B, H, T, S) (True where a query row may attend; a free slot sees its own new rows only)."""
        B, H, T, D = k.shape
        views = []
        for b, c in self._focused():
            if c is None:
                views.append((k[b:b + 1], v[b:b + 1], torch.ones(T, T, dtype=torch.bool, device=k.device).tril()))
                continue
            kb, vb = c.update(layer, k[b:b + 1], v[b:b + 1])
            m = c.attn_mask
            if m is None:  # the last T rows are the new ones: everything before, causal among them
                S = kb.shape[2]
                m = torch.arange(S, device=k.device)[None, :] <= torch.arange(S - T, S, device=k.device)[:, None]
            views.append((kb, vb, m))
        S = max(x[0].shape[2] for x in views)
        pad = lambda t: F.pad(t, (0, 0, 0, S - t.shape[2]))  # noqa: E731  (1, H, S_b, D) -> (1, H, S, D)
        k_all = torch.cat([pad(x[0]) for x in views])
        v_all = torch.cat([pad(x[1]) for x in views])
        masks = []
        for _, _, m in views:
            m = m if m.dim() == 4 else m[None, None]  # (1, 1 or H, T, S_b)
            masks.append(F.pad(m.expand(1, H, T, m.shape[-1]), (0, S - m.shape[-1]), value=False))
        self.attn_mask = torch.cat(masks)
        self._views[layer] = views
        return k_all, v_all

    def on_update(self, layer, k, v, k_all, mask) -> None:
        for (b, c), (kb, _, m) in zip(self._focused(), self._views.pop(layer), strict=True):
            if c is not None:
                c.on_update(layer, k[b:b + 1], v[b:b + 1], kb, m)

    def end(self) -> None:
        for _, c in self._focused():
            if c is not None:
                c.end()
        self.attn_mask = None

    def abort(self) -> None:
        for _, c in self._focused():
            if c is not None:
                c.abort()
        self._views.clear()
        self.attn_mask = None

    def rollback(self, n) -> None:
        counts = [n] * self.batch if isinstance(n, int) else list(n)
        if len(counts) != self.batch:
            raise ValueError(f"rollback needs one count per focused slot ({self.batch}), got {len(counts)}")
        for (_, c), k in zip(self._focused(), counts, strict=True):
            if c is not None:
                c.rollback(k)

    def compress(self) -> None:
        for _, c in self._focused():
            if c is not None:
                c.compress()

    def read(self, layer: int) -> tuple[Tensor, Tensor]:
        if self.batch != 1 or self.caches[self.first] is None:
            raise ValueError("read() of a SeqStackKV reads one live slot: focus(slot, 1) first")
        return self.caches[self.first].read(layer)

    def memory_report(self) -> dict:
        """Sums over the live sequences' caches (their own reports), with the count."""
        out: dict = {"live_sequences": len(self.live_slots()), "slots": self.slots}
        for c in self.caches:
            for key, x in (c.memory_report() if c is not None else {}).items():
                if isinstance(x, int | float) and not isinstance(x, bool) and key.endswith(("bytes", "bytes_total")):
                    out[key] = out.get(key, 0) + x
        return out
