"""PlacedKV: on-chip layers in GPU tensors, the rest in pinned CPU memory streamed in on a copy stream.

Per offloaded layer the history ``[0:len)`` is split in two:
- ``[0:flushed)`` lives in the CPU **store** (bf16, or KIVI codes + scales + zeros), token-major so that the valid
  prefix is one contiguous block: exactly that prefix is copied host-to-device, nothing past it;
- ``[flushed:len)`` (fewer than ``group + 2 * rollback_slack`` tokens) lives in a full-precision GPU **residual**.
  Whole groups older than the slack are quantized on the GPU and copied to the store (device-to-host on the copy
  stream), so a rollback of up to ``rollback_slack`` tokens never touches quantized data and stays exact, and a
  cache that is rolled back equals one that never saw the rejected tokens.
- A forward attends to its **own** rows in the precision they were produced in, even those it flushes (a prefill
  chunk longer than the slack): they are quantized into the store, but the attention view keeps them full-precision
  until this layer's attention is enqueued (a bf16 resident slot, read again later, then gets their stored form).
  Rows of earlier forwards that a forward flushes are read in their stored form, as every later forward reads them.
  Full-precision tail: between forwards fewer than ``group + 2 * rollback_slack`` rows (the residual); during a
  forward of n rows at most ``group + rollback_slack + n`` rows of the view are full-precision, in the staging or
  slot buffer the view already is (no extra memory).

Decoding one token runs, for offloaded layer i, with no host synchronisation:
    copy stream:    [wait: buffer free] H2D prefix of layer i+1  -> record ready[i+1]
    compute stream: [wait ready[i]] (dequant) + residual + new rows -> attention of layer i
bf16 staging is double-buffered; quantized layers stream into a ring of code buffers (``code_stages``: as many as
fit in two bf16 layers), so several short copies run ahead of the compute. Every buffer is guarded by CUDA events.
Resident layers (an LRU of GPU slots) skip the copy; new tokens go to the slot and, through the residual and flushes,
to the CPU store, so an eviction loses nothing.
On the CPU (tests, CI) the same code runs with synchronous copies.

**Static layout** (``static=True``, what ``make_cache(..., graphs=True)`` builds): a forward that flushes nothing
and keeps the residency plan as it is (every decode step and verification between flushes, once the resident
slots are filled) runs a host-independent sequence that a CUDA graph can capture and replay:
- the copy of each layer's store is a **bucket** of ``nb`` rows, ``flushed`` rounded up to ``copy_block`` tokens
  (rows past ``flushed`` are zeros or stale, never visible): the bytes are fixed per bucket, so one graph serves
  every length until the next bucket;
- residual and new rows land at device-side indices (``fl_dev + arange(R)``, ``pos + arange(n)``), attention reads
  a fixed ``nb + R``-row view under a mask (row i sees keys up to its own position), and the residual is read back
  from the same ``R``-row window;
- copy-stream work forks from the compute stream at ``begin`` and joins it at ``end`` (graph capture needs both),
  and the fetches are not timed (events inside a graph do not time anything).
``graph_key(n)`` names the graph a forward can replay, or None when it must run eagerly (a flush every
``kv_group_size`` tokens, a slot being filled or evicted, a prefill chunk). Those forwards run the eager path on the
same buffers, so the two paths keep one state. On-chip layers are then a ``StaticKV``.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import Tensor

from .base import KVCache, check_begin, check_rollback, check_shape
from .dense import DenseKV
from .placement import Placement
from .quant import QTensor, QuantSpec, dequantize_keys_into, dequantize_values_into, quantize_keys, quantize_values
from .static import StaticKV

COPY_BLOCK = 1024  # static layout: the store rows copied per forward are rounded up to this many tokens


def _pinned_empty(shape, dtype, pin: bool, zero: bool = False) -> Tensor:
    try:
        return (torch.zeros if zero else torch.empty)(shape, dtype=dtype, pin_memory=pin)
    except RuntimeError as e:
        n = torch.Size(shape).numel() * dtype.itemsize
        raise MemoryError(
            f"could not allocate {n / 2**30:.2f} GiB of pinned CPU memory for offloaded KV ({e}); lower the "
            f"context, keep more layers --on-chip, or use a quantized --kv-quant"
        ) from e


class _Fields:
    """A K or V store in token-major layout: one contiguous ``(rows, row_bytes)`` uint8 buffer whose row r packs
    every field's row r (bf16: the K or V rows; quantized: codes, scales and zeros), so a prefix of tokens is ONE
    contiguous block: one copy per store across the link (six copies of small fields ran at 43-49 GB/s, one bf16
    copy at 55; results/profile/h200-graphed). ``t`` holds the fields as typed views into that buffer (dim 0 is
    rows: tokens, or groups of tokens for quantized keys)."""

    def __init__(self, buf: Tensor, fields: dict[str, tuple[tuple[int, ...], torch.dtype]], per_row: int):
        self.buf, self.per_row = buf, per_row  # tokens per row (group size for quantized keys, else 1)
        self.t, off = {}, 0
        for name, (shape, dt) in fields.items():  # shape: one row's
            n = math.prod(shape) * dt.itemsize
            self.t[name] = buf[:, off:off + n].view(dt).view(buf.shape[0], *shape)
            off += n

    def nbytes(self, tokens: int | None = None) -> int:
        rows = self.buf.shape[0] if tokens is None else tokens // self.per_row
        return rows * self.buf.shape[1]

    def rows(self, tokens: int) -> int:
        return tokens // self.per_row

    def prefix(self, tokens: int) -> dict[str, Tensor]:
        return {k: x[: tokens // self.per_row] for k, x in self.t.items()}

    def pack(self, parts: dict[str, Tensor]) -> Tensor:
        """Rows of every field (same names, token-major) -> the packed (n, row_bytes) rows, on their device."""
        n = next(iter(parts.values())).shape[0]
        out = torch.empty((n, self.buf.shape[1]), dtype=torch.uint8, device=next(iter(parts.values())).device)
        off = 0
        for name, x in self.t.items():
            w = math.prod(x.shape[1:]) * x.element_size()
            out[:, off:off + w].view(x.dtype).view(n, *x.shape[1:]).copy_(parts[name])
            off += w
        return out

    def view_of(self, packed: Tensor) -> dict[str, Tensor]:
        """Typed field views of packed rows (e.g. a prefix copied to the GPU in one piece)."""
        return _Fields(packed, {k: (tuple(x.shape[1:]), x.dtype) for k, x in self.t.items()}, self.per_row).t


def code_stages(bf16_layer_bytes: int, code_layer_bytes: int, n_streamed: int) -> int:
    """How many code-staging buffers a quantized PlacedKV keeps: as many as fit in two bf16 layers' bytes (int8: 3,
    int4: 7, int2: 12 at group 64), at least 2, at most one per streamed layer. Each lets one more layer's copy run
    ahead of the compute, so the copy engine keeps busy while the on-chip layers compute (with two, the copies of a
    short quantized layer stalled behind the first offloaded layer's attention)."""
    return max(2, min(n_streamed, 2 * bf16_layer_bytes // max(1, code_layer_bytes)))


def _alloc_fields(kind: str, spec: QuantSpec | None, T: int, B: int, H: int, D: int, dtype, device, pin,
                  zero: bool = False) -> _Fields:
    """Zeroed (``zero``) where a static forward reads rows that were never written: masked keys must still be
    finite numbers (0 x NaN would leak into the attention output). Every field's bytes per row are even (a
    2-byte scale after an odd run of codes would be misaligned), which the packing formats guarantee; checked."""
    if spec is None:
        rows, per_row, fields = T, 1, {"x": ((B, H, D), dtype)}
    elif kind == "k":
        g, b, sdt = spec.group_size, spec.bits, spec.scale_dtype
        rows, per_row = T // g, g
        fields = {"codes": ((B, H, D, g * b // 8), torch.uint8), "scale": ((B, H, D), sdt), "zero": ((B, H, D), sdt)}
    else:
        g, b, sdt = spec.group_size, spec.bits, spec.scale_dtype  # values: grouped along channels
        rows, per_row = T, 1
        fields = {"codes": ((B, H, D * b // 8), torch.uint8), "scale": ((B, H, D // g), sdt),
                  "zero": ((B, H, D // g), sdt)}
    widths = [math.prod(s) * dt.itemsize for s, dt in fields.values()]
    if any(w % 2 for w in widths[:-1]):
        raise ValueError(f"KV store fields of {widths} bytes per row cannot be packed with 2-byte alignment; "
                         f"use an even kv_group_size / head_dim")
    shape = (rows, sum(widths))
    if device == "cpu-pinned":
        buf = _pinned_empty(shape, torch.uint8, pin, zero)
    else:
        buf = (torch.zeros if zero else torch.empty)(shape, dtype=torch.uint8, device=device)
    return _Fields(buf, fields, per_row)


def _as_qtensor(f: dict[str, Tensor], kind: str, tokens: int, B: int, H: int, D: int) -> QTensor:
    """Token-major fields -> a (B, H, T, ...) QTensor view (no copy)."""
    perm = (lambda x: x.permute(1, 2, 0, 3, 4)) if kind == "k" else (lambda x: x.permute(1, 2, 0, 3))
    sperm = lambda x: x.permute(1, 2, 0, 3)
    return QTensor(perm(f["codes"]), sperm(f["scale"]), sperm(f["zero"]), (B, H, tokens, D))


def _token_major(q: QTensor) -> dict[str, Tensor]:
    perm = (2, 0, 1, 3, 4) if q.is_key else (2, 0, 1, 3)
    return {"codes": q.codes.permute(*perm).contiguous(), "scale": q.scale.permute(2, 0, 1, 3).contiguous(),
            "zero": q.zero.permute(2, 0, 1, 3).contiguous()}


@dataclass
class TransferStats:
    h2d_bytes: int = 0
    d2h_bytes: int = 0
    hits: int = 0
    misses: int = 0
    forwards: int = 0
    h2d_busy_ms: float = 0.0  # copy-stream time spent in H2D copies (CUDA events around each fetch)
    h2d_timed_bytes: int = 0  # the bytes those timed fetches moved
    static_forwards: int = 0  # forwards that ran the static path (replayed graphs included)


class PlacedKV(KVCache):
    """KVCache over a ``Placement``. Layer order of access is assumed 0..L-1 within a forward (the model's)."""

    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int, placement: Placement, batch: int,
                 max_len: int, dtype: torch.dtype, device: torch.device | str, static: bool = False,
                 copy_block: int = COPY_BLOCK):
        super().__init__()
        p = self.p = placement
        p.validate(n_layers, head_dim)
        check_shape(batch, max_len)
        self.n_layers, self.B, self.H, self.D = n_layers, batch, n_kv_heads, head_dim
        self.batch = batch
        self.dtype, self.device = dtype, torch.device(device)
        self.n_on = p.n_on_chip(n_layers)
        self.off = list(range(self.n_on, n_layers))
        self.spec = p.quant
        self.g = p.kv_group_size
        self.max_len = max_len
        T = self.T = -(-max_len // self.g) * self.g  # store capacity, whole groups
        R = self.R = self.g + 2 * p.rollback_slack  # see begin(): the residual never holds more
        cuda = self.device.type == "cuda"
        self.copy_stream = torch.cuda.Stream(self.device) if cuda else None
        self.static = self.graphable = static
        z = static  # a static forward reads rows past the valid ones (masked): they must be finite
        if not self.n_on:
            self.dense = None
        elif static:
            self.dense = StaticKV(self.n_on, batch, n_kv_heads, head_dim, max_len, 1, dtype, device)
        else:
            self.dense = DenseKV(self.n_on, batch, n_kv_heads, head_dim, max_len, dtype, device)
        # GPU buffers hold T + R rows: a static forward writes the residual window at [flushed, flushed + R)
        gpu = lambda: _alloc_fields("x", None, T + R, batch, n_kv_heads, head_dim, dtype, self.device, False, z)
        self.store = {l: (_alloc_fields("k", self.spec, T, batch, n_kv_heads, head_dim, dtype, "cpu-pinned", cuda, z),
                          _alloc_fields("v", self.spec, T, batch, n_kv_heads, head_dim, dtype, "cpu-pinned", cuda, z))
                      for l in self.off}
        self.residual = {l: (torch.zeros((R, batch, n_kv_heads, head_dim), dtype=dtype, device=self.device),
                             torch.zeros((R, batch, n_kv_heads, head_dim), dtype=dtype, device=self.device))
                         for l in self.off}
        # staging: bf16 x2 (format none: H2D lands there), or a ring of code buffers (code_stages) + one bf16 (the
        # codes are dequantized into it on the compute stream)
        if self.spec is None:
            self.stage = [(gpu(), gpu()), (gpu(), gpu())]
        else:
            mkq = lambda kind: _alloc_fields(kind, self.spec, T, batch, n_kv_heads, head_dim, dtype, self.device, False,
                                             z)
            self.stage = [(gpu(), gpu())]
            self.qstage = [(mkq("k"), mkq("v"))]
            n_q = code_stages(sum(f.nbytes() for f in self.stage[0]), sum(f.nbytes() for f in self.qstage[0]),
                              len(self.off))
            self.qstage += [(mkq("k"), mkq("v")) for _ in range(n_q - 1)]
        # resident slots: bf16 copies of the whole layer (dequant) or GPU codes (quant)
        self.slot_quant = p.resident_format == "quant"
        if self.slot_quant:
            mkq = lambda kind: _alloc_fields(kind, self.spec, T, batch, n_kv_heads, head_dim, dtype, self.device, False,
                                             z)
            self.slots = [(mkq("k"), mkq("v")) for _ in range(p.resident_layers)]
        else:
            self.slots = [(gpu(), gpu()) for _ in range(p.resident_layers)]
        self.slot_of: OrderedDict[int, int] = OrderedDict()  # layer -> slot, LRU order (oldest first)
        self.free_ev: dict[tuple, torch.cuda.Event] = {}  # buffer key -> event after its last reader
        self.to_release: list[tuple] = []
        self.after_attn: list[tuple[Tensor, Tensor]] = []  # (slot rows, their stored form): written after attention
        self._len = self.flushed = 0
        self._pending: int | None = None
        self.stats = TransferStats()
        self._timed: list[tuple] = []  # (start event, end event, bytes) of fetches not yet folded into stats
        self.stage_i = 0
        self.failed = False
        self.fetch_rows = 0  # store rows a fetch copies: flushed (eager) or its bucket (static)
        self.static_fwd = False  # the forward in progress runs the static path
        self._after_static = False  # the copy stream must wait for the compute stream before the next eager fetch
        if static:
            if not isinstance(copy_block, int) or copy_block < 1:
                raise ValueError(f"copy_block must be a positive int, got {copy_block!r}")
            self.copy_block = math.lcm(copy_block, self.g)  # buckets are whole quantization groups
            dev = self.device
            self.pos = torch.zeros((), dtype=torch.long, device=dev)  # == length, on the device
            self.fl_dev = torch.zeros((), dtype=torch.long, device=dev)  # == flushed, on the device
            self.ar_R = torch.arange(R, device=dev)
            self.cols = torch.arange(T + R, device=dev)

    # ------------------------------------------------------------------------------------------------ interface
    def length(self) -> int:
        return self._len

    def capacity(self) -> int:
        return self.max_len

    def _flush_target(self, n_new: int) -> int:
        """Where ``flushed`` will be after a forward of n_new tokens. Whole groups older than the slack are flushed.
        Only committed tokens count, so a forward whose tokens are later rolled back never changes what was flushed;
        a forward longer than the slack (a prefill chunk, which cannot be rolled back past the slack anyway) may
        also flush its own tokens, which bounds the residual. Flushing them stores them quantized for LATER forwards:
        this forward still attends to them full-precision (``_flush``)."""
        upto = self._len + (n_new if n_new > self.p.rollback_slack else 0)
        return self.flushed + self.g * max(0, (upto - self.flushed - self.p.rollback_slack) // self.g)

    def graph_key(self, n_new: int):
        """The static forward's identity, (bucket rows, residency plan), or None if this forward must run eagerly:
        not a static cache, a flush is due, a resident slot would be filled or evicted, or the cache is full."""
        return self._layout(n_new, self._plan()) if self.static else None

    def _layout(self, n_new: int, planned: tuple) -> tuple | None:
        """graph_key for the next forward's plan (``_plan()``, computed once by the caller)."""
        if not self.static or self.failed or self._len + n_new > self.max_len:
            return None
        if self._flush_target(n_new) > self.flushed:
            return None
        plan, slot_of = planned[0], planned[1]
        if dict(slot_of) != dict(self.slot_of):
            return None
        nb = min(self.T, -(-self.flushed // self.copy_block) * self.copy_block)
        return nb, tuple(plan[l] for l in self.off)

    def begin(self, n_new: int) -> None:
        if self.failed:
            raise RuntimeError("this offloaded KV cache saw a failed forward and is no longer consistent; "
                               "build a new one (make_cache)")
        check_begin(self._len, n_new, self.max_len, self._pending)
        planned = self._plan()  # layer -> (hit, slot or None), the slot map after, hits, misses
        key = self._layout(n_new, planned)
        self._pending = n_new
        if self.dense is not None:
            self.dense.begin(n_new)
        self.flush_to = self._flush_target(n_new)
        capturing = self.copy_stream is not None and torch.cuda.is_current_stream_capturing()
        self.plan, self.slot_of, hits, misses = planned
        if not capturing:  # a capture executes nothing: its replays count themselves (prepare)
            self.stats.hits += hits
            self.stats.misses += misses
        self.static_fwd = key is not None
        cs, cur = self.copy_stream, (torch.cuda.current_stream(self.device) if self.copy_stream else None)
        if self.static_fwd:
            self.fetch_rows = key[0]
            self.view_rows = key[0] + self.R
            self.ridx = self.fl_dev + self.ar_R  # (R,) the residual window [flushed, flushed + R), on the device
            self.nidx = self.pos + torch.arange(n_new, device=self.device)  # (n,) the new rows
            self.mask_off = self.cols[None, :self.view_rows] <= self.nidx[:, None]  # (n, nb + R)
            if cs is not None:  # fork: this forward's copies follow everything enqueued before it, and only that
                cs.wait_stream(cur)
                self.free_ev.clear()
        else:
            self.fetch_rows = self.flushed
            if cs is not None and self._after_static:  # buffer-free events of a static forward are not kept
                cs.wait_stream(cur)
                self._after_static = False
        self.ready: dict[int, object] = {}
        self.busy: set = set()
        self.next_fetch = 0  # index into self.off of the next layer whose transfer is not yet issued
        self._prefetch_next()

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        if layer < self.n_on:
            out = self.dense.update(layer, k, v)
            self.attn_mask, self.attn_lens = self.dense.attn_mask, self.dense.attn_lens
            return out
        self._release_now()
        self._prefetch_next()  # a transfer held back for a busy buffer (possibly this layer's own)
        hit, slot = self.plan[layer]
        kbuf, vbuf, complete, key = self._acquire(layer, hit, slot)
        self.busy = {("slot", slot)} if slot is not None else set()
        if key is not None:
            self.busy.add(key)
        self._prefetch_next()
        t0, n = self._len, self._pending
        res = self.residual[layer]
        if self.static_fwd:  # device-side rows: [flushed, flushed + R) from the residual, then the new rows
            for buf, r, new in ((kbuf, res[0], k), (vbuf, res[1], v)):
                if not complete:
                    buf.index_copy_(0, self.ridx, r)
                buf.index_copy_(0, self.nidx, new.permute(2, 0, 1, 3))  # (B, H, n, D) -> token-major rows
                torch.index_select(buf, 0, self.ridx, out=r)  # no flush: the residual is the same window, updated
            self.to_release.append((slot, key))
            self.attn_mask, self.attn_lens = self.mask_off, None  # the residual window sits after a gap: no prefix
            view = lambda b: b[:self.view_rows].permute(1, 2, 0, 3)  # (B, H, nb + R, D), masked
            return view(kbuf), view(vbuf)
        rows = self._len - self.flushed
        for buf, r, new in ((kbuf, res[0], k), (vbuf, res[1], v)):
            if not complete and rows:
                buf[self.flushed:self._len] = r[:rows]
            buf[t0:t0 + n] = new.permute(2, 0, 1, 3)  # (B, H, n, D) -> token-major rows
        if self.flush_to > self.flushed:
            self._flush(layer, kbuf, vbuf, slot)
        keep = t0 + n - self.flush_to
        res[0][:keep] = kbuf[self.flush_to:t0 + n]
        res[1][:keep] = vbuf[self.flush_to:t0 + n]
        self.to_release.append((slot, key))
        self.attn_mask = self.attn_lens = None
        view = lambda b: b[:t0 + n].permute(1, 2, 0, 3)  # (B, H, S, D)
        return view(kbuf), view(vbuf)

    def end(self) -> None:
        self._release_now()
        if self.dense is not None:
            self.dense.end()
        n = self._pending
        self._len += n
        capturing = self.copy_stream is not None and torch.cuda.is_current_stream_capturing()
        if self.static:
            self.pos.add_(n)
            if self.flush_to != self.flushed:
                self.fl_dev.fill_(self.flush_to)
        self.flushed = self.flush_to
        self._pending = None
        if self.static_fwd and self.copy_stream is not None:  # join: a capture must end on its own stream
            torch.cuda.current_stream(self.device).wait_stream(self.copy_stream)
            self.free_ev.clear()
            self._after_static = True
        was_static, self.static_fwd = self.static_fwd, False
        if not capturing:
            self.stats.forwards += 1
            self.stats.static_forwards += was_static
            self._fold_timings(wait=False)

    # ---------------------------------------------------------------------------- graph replays (GraphedForward)
    def prepare(self, n_new: int) -> None:
        """Host side of a static forward's begin(), for a replay of the graph ``graph_key(n_new)`` names: the
        residency plan's bookkeeping and the bytes the replay's copies move."""
        planned = self._plan()
        key = self._layout(n_new, planned)
        if key is None or self._pending is not None:
            raise RuntimeError("PlacedKV.prepare: this forward cannot replay a graph (a flush or a slot change is "
                               "due, or a forward is in progress); run it eagerly (GraphRunner does)")
        if self.dense is not None:
            self.dense.prepare(n_new)
        self.plan, self.slot_of, hits, misses = planned
        self.stats.hits += hits
        self.stats.misses += misses
        self.stats.h2d_bytes += sum(st.nbytes(key[0]) for l in self.off if self._needs_transfer(l, key[0])
                                    for st in self.store[l])
        if self.copy_stream is not None:  # eager flushes (D2H into the store) land before the replay reads it
            torch.cuda.current_stream(self.device).wait_stream(self.copy_stream)
            self._after_static = True

    def commit(self, n: int) -> None:
        """Host side of end() after a replay (the graph advanced ``pos`` itself); ``-n`` undoes a capture's."""
        if self.dense is not None:
            self.dense.commit(n)
        self._len += n
        if n > 0:
            self.stats.forwards += 1
            self.stats.static_forwards += 1

    def _fold_timings(self, wait: bool) -> None:
        """Add finished fetches' copy times to the stats: without waiting (end of a forward: only those whose end
        event has completed, so no host sync), or all of them (``memory_report``)."""
        keep = []
        for t0, t1, nbytes in self._timed:
            if wait:
                t1.synchronize()
            elif not t1.query():
                keep.append((t0, t1, nbytes))
                continue
            self.stats.h2d_busy_ms += t0.elapsed_time(t1)
            self.stats.h2d_timed_bytes += nbytes
        self._timed = keep

    def abort(self) -> None:
        """A forward failed half-way: layers already updated rewrote their residual and slots were reassigned, so
        the cache no longer describes one history. It refuses further use instead of serving mixed state."""
        if self.dense is not None:
            self.dense.abort()
        self._pending = None
        self.failed = True

    def rollback(self, n: int) -> None:
        check_rollback(n, self._len)
        if n > self._len - self.flushed:
            raise ValueError(
                f"rollback({n}) reaches tokens already flushed to the CPU store (only the newest "
                f"{self._len - self.flushed} are rollback-safe); raise Placement.rollback_slack above {n}"
            )
        if self.dense is not None:
            self.dense.rollback(n)
        self._len -= n
        if self.static:
            self.pos.sub_(n)

    def read(self, layer: int) -> tuple[Tensor, Tensor]:
        """The committed history of one layer on the GPU (a blocking fetch for offloaded layers)."""
        if layer < self.n_on:
            return self.dense.read(layer)
        if self.copy_stream is not None:
            self.copy_stream.synchronize()  # pending flushes must land in the store first
        out = []
        for i, st in enumerate(self.store[layer]):
            buf = torch.empty((self._len, self.B, self.H, self.D), dtype=self.dtype, device=self.device)
            self._load_prefix(st, buf, "kv"[i], self.flushed)
            buf[self.flushed:] = self.residual[layer][i][:self._len - self.flushed]
            out.append(buf.permute(1, 2, 0, 3))
        return out[0], out[1]

    # ------------------------------------------------------------------------------------------------ internals
    def _plan(self) -> tuple[dict, OrderedDict, int, int]:
        """Residency plan of the next forward, computed without changing the cache: (layer -> (hit, slot), the
        layer -> slot map after it, hits, misses). Misses may take a slot (insert, evicting LRU)."""
        slot_of, plan, hits = OrderedDict(self.slot_of), {}, 0
        for layer in self.off:
            if layer in slot_of:
                slot_of.move_to_end(layer)
                hits += 1
                plan[layer] = (True, slot_of[layer])
                continue
            if not self.slots or (len(slot_of) >= len(self.slots) and self.p.resident_policy != "lru"):
                plan[layer] = (False, None)  # no slots, or static and full: the first R layers keep theirs
                continue
            if len(slot_of) < len(self.slots):
                slot = len(slot_of)
            else:
                _, slot = slot_of.popitem(last=False)
            slot_of[layer] = slot
            plan[layer] = (False, slot)
        return plan, slot_of, hits, len(self.off) - hits

    def _needs_transfer(self, layer: int, rows: int | None = None) -> bool:
        hit, _ = self.plan[layer]
        return not hit and (self.fetch_rows if rows is None else rows) > 0

    def _prefetch_next(self) -> None:
        """Issue the H2D copies of the next offloaded layers that need one, never into a buffer being read (then at
        the next layer, after the release). Into bf16 staging or a slot, at most one transfer is ahead; into the ring
        of code buffers, up to its size - 1: the buffer a copy reuses was last read by a layer before the current
        one, whose release (or dequantization) is already enqueued, and the copy waits on that event."""
        while self.next_fetch < len(self.off):
            layer = self.off[self.next_fetch]
            if not self._needs_transfer(layer):
                self.next_fetch += 1
                continue
            dst, key = self._dest(layer)
            ahead = len(self.qstage) - 1 if key[0] == "q" else 1
            if len(self.ready) >= ahead or key in self.busy:
                return
            self.next_fetch += 1
            self._issue_fetch(layer, dst, key)

    def _dest(self, layer: int) -> tuple[tuple, tuple]:
        _, slot = self.plan[layer]
        if self.spec is None and slot is None:
            i = self.stage_i % 2
            return self.stage[i], ("s", i)
        if slot is not None and (self.spec is None or self.slot_quant):
            return self.slots[slot], ("slot", slot)
        i = self.stage_i % len(self.qstage)
        return self.qstage[i], ("q", i)  # codes, dequantized later on the compute stream

    def _issue_fetch(self, layer: int, dst: tuple, key: tuple) -> None:
        if key[0] != "slot":
            self.stage_i += 1
        cs = self.copy_stream
        nbytes = sum(st.nbytes(self.fetch_rows) for st in self.store[layer])
        timed = cs is not None and not self.static_fwd  # events inside a captured graph would time nothing
        with torch.cuda.stream(cs) if cs is not None else nullcontext():
            if cs is not None and key in self.free_ev:
                cs.wait_event(self.free_ev[key])
            t0 = None
            if timed:  # timed after the wait: the interval is the copies' own time on the link
                t0 = torch.cuda.Event(enable_timing=True)
                t0.record(cs)
            for src, d in zip(self.store[layer], dst, strict=True):  # one contiguous block per store
                r = src.rows(self.fetch_rows)
                d.buf[:r].copy_(src.buf[:r], non_blocking=True)
            ev = None
            if cs is not None:
                ev = torch.cuda.Event(enable_timing=timed)
                ev.record(cs)
                if timed:
                    self._timed.append((t0, ev, nbytes))
        if not (cs is not None and torch.cuda.is_current_stream_capturing()):
            self.stats.h2d_bytes += nbytes
        self.ready[layer] = (ev, dst, key)

    def _acquire(self, layer: int, hit: bool, slot: int | None) -> tuple[Tensor, Tensor, bool, tuple | None]:
        """Token-major bf16 buffers holding layer's [0:flushed) prefix, ready on the compute stream.

        Returns (k_buf, v_buf, complete, key): ``complete`` if the buffers already hold [0:len) (a bf16 slot hit);
        ``key`` names a transfer buffer to mark free once this layer's attention is enqueued.
        """
        src, key = None, None
        if layer in self.ready:
            ev, src, key = self.ready.pop(layer)
            if ev is not None:
                torch.cuda.current_stream(self.device).wait_event(ev)
        bf16_slot = slot is not None and not self.slot_quant
        if bf16_slot:
            kb, vb = self.slots[slot]
        elif self.spec is None:
            if src is None:  # nothing fetched (nothing flushed yet): the staging buffer holds only new rows, but
                key = ("s", self.stage_i % 2)  # a later fetch into it must still wait until this attention is done
            kb, vb = src if src is not None else self.stage[self.stage_i % 2]
        else:
            kb, vb = self.stage[0]  # dequantized on the compute stream: one buffer is enough
        if self.spec is not None and self.fetch_rows:
            codes = src if src is not None else (self.slots[slot] if hit and self.slot_quant else None)
            if codes is not None:
                n = self.fetch_rows
                dequantize_keys_into(_as_qtensor(codes[0].prefix(n), "k", n, self.B, self.H, self.D), self.spec,
                                     kb.t["x"][:n].permute(1, 2, 0, 3))
                dequantize_values_into(_as_qtensor(codes[1].prefix(n), "v", n, self.B, self.H, self.D), self.spec,
                                       vb.t["x"][:n].permute(1, 2, 0, 3))
                if key is not None and key[0] == "q":  # codes staging is free once dequantized
                    self._mark_free(key)
                    key = None
        return kb.t["x"], vb.t["x"], hit and bf16_slot, key

    def _flush(self, layer: int, kbuf: Tensor, vbuf: Tensor, slot: int | None) -> None:
        """Move rows [flushed:flush_to) to the CPU store (quantized on the GPU first), D2H on the copy stream."""
        f0, f1 = self.flushed, self.flush_to
        old = max(0, min(f1, self._len) - f0)  # flushed rows written by earlier forwards; the rest are this one's
        outs = []
        for i, buf in enumerate((kbuf, vbuf)):
            rows = buf[f0:f1]  # (n, B, H, D)
            if self.spec is None:  # a view: pack() below copies it before the compute stream rewrites these rows
                outs.append({"x": rows})
                continue
            x = rows.permute(1, 2, 0, 3)
            q = quantize_keys(x, self.spec) if i == 0 else quantize_values(x, self.spec)
            outs.append(_token_major(q))
            # The attention view (bf16 slot or staging) must read earlier forwards' rows as every later forward will
            # read them from the store: the quantized form (the stored copy's dequantization, not a fake
            # compression). This forward's own rows stay as they were produced while it attends; a bf16 slot, which
            # later forwards read instead of the store, gets their stored form once the attention is enqueued.
            deq = (dequantize_keys_into if i == 0 else dequantize_values_into)(q, self.spec, torch.empty_like(x))
            x[:, :, :old] = deq[:, :, :old]
            if slot is not None and not self.slot_quant and old < f1 - f0:
                self.after_attn.append((x[:, :, old:], deq[:, :, old:]))
            if slot is not None and self.slot_quant:
                for name, t in outs[-1].items():
                    r0 = f0 // self.slots[slot][i].per_row
                    self.slots[slot][i].t[name][r0:r0 + t.shape[0]] = t
        packed = [st.pack(out) for st, out in zip(self.store[layer], outs, strict=True)]  # on the compute stream
        cs = self.copy_stream
        if cs is not None:
            ev = torch.cuda.Event()
            ev.record(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(cs) if cs is not None else nullcontext():
            if cs is not None:
                cs.wait_event(ev)
            for st, t in zip(self.store[layer], packed, strict=True):
                r0 = f0 // st.per_row
                st.buf[r0:r0 + t.shape[0]].copy_(t, non_blocking=True)  # one contiguous block per store
                if cs is not None:
                    t.record_stream(cs)
                self.stats.d2h_bytes += t.numel()

    def _mark_free(self, key) -> None:
        if self.copy_stream is None:
            return
        ev = torch.cuda.Event()
        ev.record(torch.cuda.current_stream(self.device))
        self.free_ev[key] = ev

    def _release_now(self) -> None:
        """The previous offloaded layer's attention is enqueued: its own flushed rows in a bf16 slot take their stored
        form (``_flush``), then its buffers are free once that work is done."""
        for dst, deq in self.after_attn:
            dst.copy_(deq)
        self.after_attn = []
        for slot, key in self.to_release:
            if key is not None:
                self._mark_free(key)
            if slot is not None:
                self._mark_free(("slot", slot))
        self.to_release = []
        self.busy = set()

    def _load_prefix(self, st: _Fields, out: Tensor, kind: str, n: int) -> None:
        if not n:
            return
        pre = st.view_of(st.buf[:st.rows(n)].to(self.device, non_blocking=False))  # one copy, typed views
        if self.spec is None:
            out[:n] = pre["x"]
            return
        q = _as_qtensor(pre, kind, n, self.B, self.H, self.D)
        (dequantize_keys_into if kind == "k" else dequantize_values_into)(q, self.spec, out[:n].permute(1, 2, 0, 3))

    # ------------------------------------------------------------------------------------------------ accounting
    def memory_report(self) -> dict:
        self._fold_timings(wait=True)
        nb = lambda fs: sum(f.nbytes() for pair in fs for f in pair)
        staging = nb(self.stage) + (nb(self.qstage) if self.spec is not None else 0)
        res = sum(t.numel() * t.element_size() for pair in self.residual.values() for t in pair)
        return {
            "on_gpu_kv_bytes": self.dense.nbytes() if self.dense is not None else 0,
            "resident_slot_bytes": nb(self.slots),
            "staging_bytes": staging,
            "residual_bytes": res,
            "pinned_cpu_kv_bytes": nb(self.store.values()),
            "h2d_bytes_total": self.stats.h2d_bytes,
            "h2d_busy_s": self.stats.h2d_busy_ms / 1e3 if self.copy_stream is not None else None,
            "h2d_achieved_GBps": (self.stats.h2d_timed_bytes / self.stats.h2d_busy_ms / 1e6
                                  if self.stats.h2d_busy_ms > 0 else None),
            "d2h_bytes_total": self.stats.d2h_bytes,
            "resident_hits": self.stats.hits,
            "resident_misses": self.stats.misses,
            "resident_hit_rate": self.stats.hits / max(1, self.stats.hits + self.stats.misses),
            "forwards": self.stats.forwards,
            "static_forwards": self.stats.static_forwards,  # graph replays and eager forwards on the static path
        }
