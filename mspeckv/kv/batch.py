"""BatchKV: the batched engine's cache. ``slots`` sequences in fixed-capacity buffers, each with its own length.

Layout, per layer: K and V ``(slots, H_kv, capacity, D)``. Slot s holds its sequence in rows ``[0, lens[s])``;
rows past that are never attended (each query row is bounded by its own sequence's length) and are not counted as
held bytes. Prompts of different lengths are therefore never padded: each is prefilled alone into its slot.

A forward covers a contiguous range of slots, set by ``focus(first, n)``: a decode step covers ``[0, bucket)`` (a
captured batch size, see ``decoding/batch.py``); a joining sequence's prefill covers its slot alone. In a forward of
T tokens, slot b's token t goes to row ``lens[b] + t`` at absolute position ``lens[b] + t`` and sees keys
``j <= lens[b] + t`` (``attn_lens`` (B, T); ``attn_mask`` (B, 1, T, S) for the torch path).

Lengths live on the device (``lens``, so a replayed CUDA graph reads and advances them) and in a host mirror
(``host_lens``, for checks and rollback counts). A slot that holds no sequence (``live`` 0) inside a decode range
computes throwaway rows: its length stays 0 and its outputs are ignored. ``join`` takes a free slot, ``leave`` frees
one (its rows are simply forgotten: the buffers are preallocated, so leaving frees no allocation, it makes the slot
reusable).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import Tensor

from .base import CacheFullError, KVCache, check_shape


def check_focus(first: int, n: int, slots: int) -> None:
    if not (0 <= first and n >= 1 and first + n <= slots):
        raise ValueError(f"slots [{first}, {first + n}) outside this cache's {slots} slots")


def first_free(free: list[int], slots: int) -> int:
    """The slot a joining sequence takes: the lowest free one."""
    if not free:
        raise CacheFullError(f"all {slots} slots hold a sequence; one must leave before another joins")
    return free[0]


class BatchKV(KVCache):
    graphable = True
    ragged = True  # per-sequence lengths: positions come from token_positions(), not from one pos0

    def __init__(self, n_layers: int, slots: int, n_kv_heads: int, head_dim: int, capacity: int,
                 dtype: torch.dtype, device):
        super().__init__()
        check_shape(slots, capacity)
        self.n_layers, self.slots, self.cap = n_layers, slots, capacity
        shape = (slots, n_kv_heads, capacity, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.lens = torch.zeros(slots, dtype=torch.long, device=device)  # rows held per slot, on the device
        self.live = torch.zeros(slots, dtype=torch.long, device=device)  # 1 where a slot holds a sequence
        self.host_lens = [0] * slots
        self.host_live = [False] * slots
        self.cols = torch.arange(capacity, device=device)
        self.first, self.batch = 0, slots
        self._n: int | None = None

    @classmethod
    def for_model(cls, model, slots: int, capacity: int) -> BatchKV:
        c = model.cfg
        return cls(c.n_layers, slots, c.n_kv_heads, c.head_dim, capacity, model.dtype, model.device)

    # ------------------------------------------------------------------------------------------------- slots
    def focus(self, first: int, n: int) -> None:
        """The slots ``[first, first + n)`` the next forwards (and ``rollback``/``length``) cover."""
        if self._n is not None:
            raise RuntimeError("focus() inside a forward (between begin and end)")
        check_focus(first, n, self.slots)
        self.first, self.batch = first, n

    def join(self) -> int:
        """Take the lowest free slot for a new sequence (length 0) -> its index."""
        s = first_free(self.free_slots(), self.slots)
        self.host_live[s], self.host_lens[s] = True, 0
        self.live[s], self.lens[s] = 1, 0
        return s

    def leave(self, slot: int) -> None:
        """Forget slot ``slot``'s sequence; the slot can be joined again."""
        if not self.host_live[slot]:
            raise ValueError(f"slot {slot} holds no sequence")
        self.host_live[slot], self.host_lens[slot] = False, 0
        self.live[slot], self.lens[slot] = 0, 0

    def move(self, src: int, dst: int) -> None:
        """Move slot ``src``'s sequence (its rows and length) to the free slot ``dst``; ``src`` becomes free. A copy of
        the rows it holds, every layer (``compact`` in ``decoding/batch.py``: stragglers into the low slots, so the
        decode bucket shrinks with the batch)."""
        if self._n is not None:
            raise RuntimeError("move() inside a forward (between begin and end)")
        if not self.host_live[src] or self.host_live[dst]:
            raise ValueError(f"move needs a sequence in slot {src} and slot {dst} free")
        n = self.host_lens[src]
        for t in self.k + self.v:
            t[dst, :, :n] = t[src, :, :n]
        self.lens[dst], self.live[dst] = self.lens[src], 1
        self.lens[src], self.live[src] = 0, 0
        self.host_lens[dst], self.host_live[dst] = n, True
        self.host_lens[src], self.host_live[src] = 0, False

    @contextmanager
    def held(self, slots: list[int]):
        """The sequences in ``slots`` (still being prefilled) sit out the forwards inside: each such forward computes a
        throwaway row for them, as for a free slot (not live on the device, so the length does not advance; the row
        lands past the prompt so far, where the next prefill chunk writes), and their host lengths are restored."""
        lens = [self.host_lens[s] for s in slots]
        for s in slots:
            self.live[s] = 0
        try:
            yield
        finally:
            for s, n in zip(slots, lens, strict=True):
                self.live[s] = 1
                self.host_lens[s] = n

    def free_slots(self) -> list[int]:
        return [s for s in range(self.slots) if not self.host_live[s]]

    def live_slots(self) -> list[int]:
        return [s for s in range(self.slots) if self.host_live[s]]

    def lengths(self) -> list[int]:
        """Rows held per slot of the focused range (0 for a free slot)."""
        return self.host_lens[self.first:self.first + self.batch]

    def _range(self) -> slice:
        return slice(self.first, self.first + self.batch)

    # -------------------------------------------------------------------------------------------- KVCache protocol
    def length(self) -> int:
        """The longest sequence in the focused range (the only length when they are equal)."""
        return max(self.lengths(), default=0)

    def capacity(self) -> int:
        return self.cap

    def graph_key(self, n_new: int):
        return ("slots", self.first, self.batch)

    def token_positions(self, n_new: int) -> Tensor:
        """(B, T) absolute positions of the next forward's tokens, on the device (graph safe)."""
        return self.lens[self._range(), None] + self.cols[None, :n_new]

    def prepare(self, n_new: int) -> None:
        if self._n is not None:
            raise RuntimeError("cache.begin() called twice without end(): a previous forward did not finish")
        if n_new < 1:
            raise ValueError(f"a forward needs at least one token, got {n_new}")
        for s in range(self.first, self.first + self.batch):
            if self.host_live[s] and self.host_lens[s] + n_new > self.cap:
                raise CacheFullError(f"slot {s} holds {self.host_lens[s]} of {self.cap} rows; {n_new} more were "
                                     f"asked for: build the cache with a larger capacity")

    def begin(self, n_new: int) -> None:
        self.prepare(n_new)
        self._n = n_new
        B, T = self.batch, n_new
        rows = self.token_positions(T)  # (B, T): slot b's token t goes to row lens[b] + t
        H, D = self.k[0].shape[1], self.k[0].shape[3]
        self.idx = rows[:, None, :, None].expand(B, H, T, D)
        # a replayed graph reads the whole capacity (the kernel is bounded by attn_lens); an eager forward reads the
        # rows that can be visible only, so a prefill chunk costs its own length, not the capacity
        capturing = self.k[0].is_cuda and torch.cuda.is_current_stream_capturing()
        live = [self.host_lens[s] for s in range(self.first, self.first + B) if self.host_live[s]]
        self.hi = self.cap if capturing else min(self.cap, max(live, default=0) + T)
        self.attn_lens = (rows + 1).to(torch.int32)  # row (b, t) sees keys j < lens[b] + t + 1
        self.attn_mask = self.cols[None, None, None, :self.hi] <= rows[:, None, :, None]  # (B, 1, T, S)

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        r = self._range()
        kb, vb = self.k[layer][r], self.v[layer][r]  # (B, H, C, D) views of the focused slots
        kb.scatter_(2, self.idx, k)
        vb.scatter_(2, self.idx, v)
        return kb[:, :, :self.hi], vb[:, :, :self.hi]

    def end(self) -> None:
        r = self._range()
        self.lens[r] += self._n * self.live[r]
        self.commit(self._n)

    def commit(self, n: int) -> None:
        """Host side of end(); a replayed graph advances the device lengths itself. ``commit(-n)`` undoes a capture."""
        for s in range(self.first, self.first + self.batch):
            if self.host_live[s]:
                self.host_lens[s] += n
        self._n = None

    def abort(self) -> None:
        self._n = None

    def rollback(self, n) -> None:
        """Forget the newest ``n`` rows of every live sequence in the range (an int), or ``n[b]`` of slot
        ``first + b`` (a list, one count per focused slot): a length decrement."""
        counts = [n] * self.batch if isinstance(n, int) else list(n)
        if len(counts) != self.batch:
            raise ValueError(f"rollback needs one count per focused slot ({self.batch}), got {len(counts)}")
        for b, c in enumerate(counts):  # a free slot never advances (nothing to forget): its count is not checked
            s = self.first + b
            if self.host_live[s] and not 0 <= c <= self.host_lens[s]:
                raise ValueError(f"rollback({c}) of slot {s} outside [0, {self.host_lens[s]}]")
        r = self._range()
        if isinstance(n, int):  # as end() advanced them: the slots live on the device (a held one did not advance);
            self.lens[r] -= n * self.live[r]  # no host-to-device copy, so no sync inside a round
        else:
            self.lens[r] -= torch.tensor([c if self.host_live[self.first + b] else 0 for b, c in enumerate(counts)],
                                         device=self.lens.device)
        for b, c in enumerate(counts):
            if self.host_live[self.first + b]:
                self.host_lens[self.first + b] -= c

    def read(self, layer: int) -> tuple[Tensor, Tensor]:
        """(B, H, n, D) rows of the focused slots, when they all hold n rows (``read_slot`` otherwise)."""
        n = set(self.lengths())
        if len(n) != 1:
            raise ValueError(f"the focused slots hold different lengths {self.lengths()}: read them one by one "
                             f"with read_slot()")
        n = n.pop()
        r = self._range()
        return self.k[layer][r, :, :n], self.v[layer][r, :, :n]

    def read_slot(self, layer: int, slot: int) -> tuple[Tensor, Tensor]:
        n = self.host_lens[slot]
        return self.k[layer][slot:slot + 1, :, :n], self.v[layer][slot:slot + 1, :, :n]

    # ------------------------------------------------------------------------------------------------ memory
    def bytes_per_row(self) -> int:
        """K and V bytes of one token of one sequence, every layer."""
        k = self.k[0]
        return 2 * self.n_layers * k.shape[1] * k.shape[3] * k.element_size()

    def nbytes(self) -> int:
        """Bytes allocated (every slot at full capacity)."""
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def memory_report(self) -> dict:
        held = sum(n for n, live in zip(self.host_lens, self.host_live, strict=True) if live)
        return {"kv_bytes_allocated": self.nbytes(), "kv_bytes_held": held * self.bytes_per_row(),
                "rows_held": held, "live_sequences": sum(self.host_live), "slots": self.slots, "capacity": self.cap}


def kv_bytes(model_cfg, slots: int, capacity: int, dtype_bytes: int) -> int:
    """What ``BatchKV`` allocates for this model, slots and capacity (before allocating it)."""
    c = model_cfg
    return 2 * c.n_layers * slots * c.n_kv_heads * capacity * c.head_dim * dtype_bytes
