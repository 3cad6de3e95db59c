"""PressedKV: a layer's rows after a press (its compressed stores) plus the full-precision tail appended since.

Life of a cache built by ``make_cache(..., press=P)``::

    prefill ---> the rows live in an ordinary cache (``inner``: DenseKV or PlacedKV); the press's observers watch
    compress() -> per layer: stores = P.compress(rows held, their positions, observations); ``inner`` is dropped
    decode ----> new rows go to the tail; attention reads  [stores, decoded | tail | new rows]
    compress() again (or every ``compress_every`` tokens) re-presses what is held, tail included

A cache can also be built from another cache's rows (``PressedKV.build``): that is the MSpecKV middle level, the target
over any press of its own full cache.

Layout per layer (``stores`` hold ``n_fixed`` rows, the tail ``tail_cap`` rows):
- *direct*: the press left one ``Rows`` store on the GPU. Its rows and the tail share one buffer
  ``(B, H, n_fixed + tail_cap, D)``, so attention reads a view, with no copy.
- *scratch*: codes, latents, or an offloaded layer. Each forward decodes the stores into a scratch buffer shared by
  all layers (one layer's worth: it is working memory, not storage, and is reported as such), then copies the tail
  after them. Offloaded layers keep their stores in pinned CPU memory and copy exactly their bytes per forward.

In the direct layout the tail starts right after a layer's ``n_fixed`` rows.

``static=True`` is the CUDA-graph layout (direct layouts only: dense rows): each layer's buffer has a fixed capacity
``fixed_cap + tail``, every forward reads all of it (fixed shapes), the next row of each layer lives on the device
(``pos``) and ``attn_mask`` hides the unused rows, as in ``StaticKV``. A re-press writes into the same buffers, so
captured graphs stay valid. ``GraphedForward`` drives it through ``prepare``/``commit``.

Positions: stored keys are post-RoPE at their original positions; ``next_position()`` is the position of the next
token (rows held < tokens seen once anything was evicted). Rollback reaches only tail rows appended since the last
compress.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import CacheFullError, KVCache, check_begin
from .stores import LowRank, Rows, Store


class PressedKV(KVCache):
    def __init__(self, press, n_layers: int, batch: int, n_kv_heads: int, head_dim: int, tail: int,
                 dtype: torch.dtype, device, *, inner: KVCache | None = None, static: bool = False,
                 offload: frozenset[int] = frozenset(), compress_every: int | None = None, fixed_cap: int = 0):
        super().__init__()
        if tail < 1:
            raise ValueError(f"a pressed cache needs room for at least one appended row, got tail={tail}")
        if compress_every is not None and (compress_every < 1 or compress_every > tail):
            raise ValueError(f"compress_every must be in [1, tail={tail}], got {compress_every}")
        self.press, self.inner = press, inner
        self.n_layers, self.B, self.H, self.D, self.batch = n_layers, batch, n_kv_heads, head_dim, batch
        self.dtype, self.device = dtype, torch.device(device)
        if static and (offload or fixed_cap < 1):
            raise ValueError("a static (CUDA-graph) pressed cache needs fixed_cap >= 1 and no offloaded layers")
        self.tail_cap, self.static, self.offload, self.compress_every = tail, static, offload, compress_every
        self.graphable = static
        self.fixed_cap = fixed_cap
        self.press_obs = press.observers(n_layers) if press is not None else []
        self.observers += self.press_obs
        self.stores: list[list[Store]] = [[] for _ in range(n_layers)]
        self.n_fixed = [0] * n_layers
        self.direct = [False] * n_layers
        self.buf: list[Tensor | None] = [None] * n_layers  # direct: rows + tail; scratch: tail only (k, v stacked)
        self.valid: list[Tensor | None] = [None] * n_layers
        self.scratch: Tensor | None = None  # (2, B, H, max fixed + tail, D), shared by the scratch layers
        self.n_tail = 0
        self.source_len = 0  # tokens the stores represent (positions [0, source_len))
        self.compressions = 0
        self.h2d_bytes = 0
        self._pending: int | None = None
        self.pos = torch.zeros(n_layers, dtype=torch.long, device=self.device)  # static: next row per layer
        if inner is None:  # built empty: rows arrive in the tail and are pressed every ``compress_every`` tokens
            empty = torch.zeros(batch, n_kv_heads, 0, head_dim, dtype=dtype, device=self.device)
            for i in range(n_layers):
                self._lay_out(i, [Rows(empty, empty, torch.zeros(batch, n_kv_heads, 0, dtype=torch.int32))])

    # ------------------------------------------------------------------------------------------------ building
    @classmethod
    def build(cls, press, source: KVCache, obs: list, tail: int, static: bool = False,
              fixed_cap: int = 0) -> PressedKV:
        """A pressed copy of ``source``'s rows (``source`` is left as it is); ``obs`` are the press's observers,
        attached to ``source`` during its prefill."""
        k0, _ = source.read(0)
        B, H, _, D = k0.shape
        self = cls(press, source.n_layers, B, H, D, tail, k0.dtype, k0.device, static=static, fixed_cap=fixed_cap)
        self.observers = [o for o in self.observers if o not in self.press_obs]
        self.press_obs = obs
        self.compress(source)
        return self

    def skip(self, n: int) -> None:
        """The next ``n`` tokens are not fed (a streaming prefill feeds the sinks, then only the last window):
        press what is held first, so the tail's positions stay contiguous."""
        if n < 0 or self._pending is not None or self.inner is not None:
            raise ValueError(f"skip({n}) needs n >= 0, a compressed cache and no forward in progress")
        if self.n_tail:
            self.compress()
        self.source_len += n

    @property
    def compressed(self) -> bool:
        return self.inner is None

    def _rows(self, layer: int, source: KVCache | None) -> tuple[Tensor, Tensor, Tensor]:
        """The rows to press: (k, v, pos) (B, H, L, D) x2 and (B, H, L) int64."""
        src = source or self.inner
        if src is not None:
            k, v = src.read(layer)
            return k, v, src.positions(layer).to(k.device).long()  # a pressed source has gaps
        k, v = self.read(layer)
        return k, v, self.positions(layer).long()

    @torch.no_grad()
    def compress(self, source: KVCache | None = None) -> None:
        """Press the rows held (or ``source``'s rows) into stores, layer by layer; the tail starts empty."""
        if self._pending is not None:
            raise RuntimeError("compress() inside a forward (between begin and end)")
        if self.press is None and source is None and self.inner is not None:
            return  # no press: the inner cache serves as it is
        total = (source or self.inner or self).next_position()  # tokens seen, not rows held
        new = []
        for i in range(self.n_layers):
            k, v, pos = self._rows(i, source)
            stores = self.press.compress(i, self.n_layers, k, v, pos, self.press_obs) if self.press else \
                [Rows(k.clone(), v.clone(), pos.to(torch.int32))]
            new.append(stores)
        self.inner = None  # frees the uncompressed rows (unless someone else holds them)
        if not self.compress_every:  # nothing will be re-pressed: stop paying for the press's observers
            self.observers = [o for o in self.observers if o not in self.press_obs]
        self.source_len, self.n_tail = total, 0
        for i, stores in enumerate(new):
            self._lay_out(i, stores)
        self.pos.copy_(torch.tensor(self.n_fixed))
        self._alloc_scratch()
        self.compressions += 1

    def _lay_out(self, i: int, stores: list[Store]) -> None:
        B, H, D, T = self.B, self.H, self.D, self.tail_cap
        n = sum(s.n for s in stores)
        self.n_fixed[i] = n
        self.valid[i] = next((s.valid for s in stores if isinstance(s, Rows) and s.valid is not None), None)
        if self.valid[i] is not None and len(stores) > 1:
            raise ValueError("per-head padded rows (head-adaptive budgets) must be the press's only store")
        self.direct[i] = i not in self.offload and len(stores) == 1 and isinstance(stores[0], Rows)
        if self.static and not self.direct[i]:
            raise ValueError(f"{self.press}: a CUDA-graph (static) cache holds dense rows only; this press stores "
                             f"codes or latents, so run its level eagerly (graphs off)")
        if self.static and n > self.fixed_cap:
            raise ValueError(f"{self.press} kept {n} rows in layer {i}, more than the static buffer's {self.fixed_cap}")
        if self.direct[i]:
            s = stores[0]
            cap = (self.fixed_cap if self.static else n) + T
            buf = self.buf[i] if self.static and self.buf[i] is not None else \
                torch.zeros(2, B, H, cap, D, dtype=self.dtype, device=self.device)
            buf[0, :, :, :n], buf[1, :, :, :n] = s.k, s.v
            self.buf[i] = buf
            self.stores[i] = [Rows(buf[0, :, :, :n], buf[1, :, :, :n], s.pos, s.valid)]  # views: no second copy
            if self.static:
                if self.valid[i] is not None or getattr(self, "_vfull", None) is not None:
                    if getattr(self, "_vfull", None) is None:
                        self._vfull = torch.ones(self.n_layers, B, H, cap, dtype=torch.bool, device=self.device)
                    self._vfull[i].fill_(True)
                    if self.valid[i] is not None:
                        self._vfull[i, :, :, :n] = self.valid[i]
        else:
            self.buf[i] = torch.zeros(2, B, H, T, D, dtype=self.dtype, device=self.device)
            self.stores[i] = [s.pin() if i in self.offload and self.device.type == "cuda" else s for s in
                              (st.to("cpu") if i in self.offload else st for st in stores)]

    def _alloc_scratch(self) -> None:
        need = [self.n_fixed[i] for i in range(self.n_layers) if not self.direct[i]]
        if not need:
            self.scratch = None
            return
        shape = (2, self.B, self.H, max(need) + self.tail_cap, self.D)
        if self.scratch is None or self.scratch.shape != shape:
            self.scratch = torch.zeros(shape, dtype=self.dtype, device=self.device)

    # ------------------------------------------------------------------------------------------------ interface
    def length(self) -> int:
        if self.inner is not None:
            return self.inner.length()
        return max(self.n_fixed) + self.n_tail

    def capacity(self) -> int:
        if self.inner is not None:
            return self.inner.capacity()
        return max(*self.n_fixed, self.fixed_cap) + self.tail_cap

    def next_position(self) -> int:
        return self.inner.next_position() if self.inner is not None else self.source_len + self.n_tail

    def prepare(self, n_new: int) -> None:
        """Host-side checks before a forward (eager or replayed): re-press if the tail would overflow."""
        self.reserve(n_new)
        if self.n_tail + n_new > self.tail_cap:
            raise CacheFullError(f"pressed cache: {self.n_tail} + {n_new} appended rows exceed its tail of "
                                 f"{self.tail_cap}; build it with a larger tail (or compress_every)")

    def begin(self, n_new: int) -> None:
        if self.inner is not None:
            self.inner.begin(n_new)
            return
        if self._pending is None:
            self.prepare(n_new)  # re-press first if the tail would overflow, else one clear error
        check_begin(self.n_tail, n_new, self.tail_cap, self._pending)
        self._pending = n_new

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        if self.inner is not None:
            return self.inner.update(layer, k, v)
        T, nf = self._pending, self.n_fixed[layer]
        buf = self.buf[layer]
        if self.static:  # rows at the device position: the same graph serves every length
            rows = self.pos[layer] + torch.arange(T, device=self.device)  # (T,)
            buf[0].index_copy_(2, rows, k)
            buf[1].index_copy_(2, rows, v)
            cols = torch.arange(buf.shape[3], device=self.device)
            m = cols[None, :] <= rows[:, None]  # (T, cap): row i sees every row up to its own
            vf = getattr(self, "_vfull", None)
            self.attn_mask = m if vf is None else m & vf[layer][:, :, None, :]
            self.attn_lens = (rows + 1).to(torch.int32) if vf is None else None
            return buf[0], buf[1]
        t0 = (nf if self.direct[layer] else 0) + self.n_tail  # the tail starts after the fixed rows (direct)
        buf[0, :, :, t0:t0 + T], buf[1, :, :, t0:t0 + T] = k, v
        end = self.n_tail + T
        if self.direct[layer]:
            kk, vv = buf[0, :, :, :nf + end], buf[1, :, :, :nf + end]
        else:
            s = self.scratch
            self._decode(layer, s[0, :, :, :nf], s[1, :, :, :nf])
            s[:, :, :, nf:nf + end] = buf[:, :, :, :end]
            kk, vv = s[0, :, :, :nf + end], s[1, :, :, :nf + end]
        self.attn_mask, self.attn_lens = self._mask(layer, T, end), None
        return kk, vv

    def _decode(self, layer: int, k: Tensor, v: Tensor) -> None:
        n0 = 0
        for s in self.stores[layer]:
            if layer in self.offload:  # pinned CPU store: exactly its bytes cross the bus (counted on a CPU run too)
                self.h2d_bytes += s.nbytes()
                if s.pos.device != k.device:
                    s = s.to(k.device, non_blocking=True)
            s.decode_into(k[:, :, n0:n0 + s.n], v[:, :, n0:n0 + s.n])
            n0 += s.n

    def _mask(self, layer: int, T: int, end: int) -> Tensor | None:
        """None (plain causal over the view) unless rows are padded per head."""
        valid, nf = self.valid[layer], self.n_fixed[layer]
        if valid is None:
            return None
        S = nf + end
        cols = torch.arange(S, device=self.device)
        rows = nf + self.n_tail + torch.arange(T, device=self.device)  # the new rows' own places in the view
        m = cols[None, :] <= rows[:, None]  # (T, S)
        fixed = torch.ones(self.B, self.H, S, dtype=torch.bool, device=self.device)
        fixed[..., :nf] = valid
        return m & fixed[:, :, None, :]  # (B, H, T, S)

    def end(self) -> None:
        if self.inner is not None:
            self.inner.end()
            return
        if self.static:
            self.pos.add_(self._pending)
        self.commit(self._pending)

    def commit(self, n: int) -> None:
        """Host side of end() (a replayed graph advances ``pos`` itself)."""
        self.n_tail += n
        self._pending = None

    def abort(self) -> None:
        if self.inner is not None:
            self.inner.abort()
        self._pending = None

    def rollback(self, n: int) -> None:
        if self.inner is not None:
            self.inner.rollback(n)
            return
        if not 0 <= n <= self.n_tail:
            raise ValueError(f"rollback({n}) outside [0, {self.n_tail}]: only rows appended since the last "
                             f"compress() can be rolled back (the pressed rows are fixed)")
        self.n_tail -= n
        self.pos.sub_(n)

    def reserve(self, n: int) -> None:
        if self.inner is None and self.compress_every and self.n_tail + n > self.compress_every:
            self.compress()

    def append_external(self, kv_per_layer: list[tuple[Tensor, Tensor]]) -> None:
        """Append rows computed elsewhere (the full target's exact K/V of accepted tokens), (B, H, m, D) per layer,
        post-RoPE at positions ``next_position()`` onwards."""
        if self._pending is not None or self.inner is not None:
            raise RuntimeError("append_external() needs a compressed cache and no forward in progress")
        if len(kv_per_layer) != self.n_layers:
            raise ValueError(f"need one (k, v) per layer ({self.n_layers}), got {len(kv_per_layer)}")
        m = kv_per_layer[0][0].shape[2]
        if not m:
            return
        self.prepare(m)
        for i, (k, v) in enumerate(kv_per_layer):
            t0 = (self.n_fixed[i] if self.direct[i] else 0) + self.n_tail
            self.buf[i][0, :, :, t0:t0 + m], self.buf[i][1, :, :, t0:t0 + m] = k, v
        self.n_tail += m
        self.pos.add_(m)

    def read(self, layer: int) -> tuple[Tensor, Tensor]:
        if self.inner is not None:
            return self.inner.read(layer)
        nf = self.n_fixed[layer]
        k = torch.empty(self.B, self.H, nf + self.n_tail, self.D, dtype=self.dtype, device=self.device)
        v = torch.empty_like(k)
        if self.direct[layer]:
            k.copy_(self.buf[layer][0, :, :, :nf + self.n_tail])
            v.copy_(self.buf[layer][1, :, :, :nf + self.n_tail])
        else:
            self._decode(layer, k[:, :, :nf], v[:, :, :nf])
            k[:, :, nf:], v[:, :, nf:] = self.buf[layer][0, :, :, :self.n_tail], self.buf[layer][1, :, :, :self.n_tail]
        return k, v

    def positions(self, layer: int) -> Tensor:
        if self.inner is not None:
            return self.inner.positions(layer)
        fixed = [s.pos.to(self.device).long() for s in self.stores[layer]]
        tail = torch.arange(self.source_len, self.source_len + self.n_tail, device=self.device)
        return torch.cat([*fixed, tail.expand(self.B, self.H, -1)], -1)

    # ------------------------------------------------------------------------------------------------ memory
    def store_bytes(self, layer: int | None = None) -> int:
        layers = range(self.n_layers) if layer is None else [layer]
        return sum(s.nbytes() for i in layers for s in self.stores[i])

    def shared_bytes(self) -> int:
        seen, n = set(), 0
        for stores in self.stores:
            for s in stores:
                if isinstance(s, LowRank):
                    for t in (s.v_proj, s.k_proj):
                        if t is not None and t.data_ptr() not in seen:
                            seen.add(t.data_ptr())
                            n += t.numel() * t.element_size()
        return n

    def bytes_per_token(self) -> float:
        """Bytes the stores hold per token they represent (indices included; shared projections not included:
        see ``memory_report``'s ``shared_bytes``)."""
        if self.inner is not None:
            raise RuntimeError("bytes_per_token() before compress(): nothing is pressed yet")
        return self.store_bytes() / max(self.source_len, 1)

    def full_bytes_per_token(self) -> int:
        return 2 * self.n_layers * self.H * self.D * self.B * torch.finfo(self.dtype).bits // 8

    def memory_report(self) -> dict:
        if self.inner is not None:
            return {"compressed": False, **self.inner.memory_report()}
        gpu_stores = sum(s.nbytes() for i in range(self.n_layers) if i not in self.offload for s in self.stores[i])
        tails = self.n_layers * 2 * self.B * self.H * self.tail_cap * self.D * self.dtype.itemsize
        scratch = 0 if self.scratch is None else self.scratch.numel() * self.scratch.element_size()
        row = 2 * self.B * self.H * self.D * self.dtype.itemsize
        # the static layout sizes every layer's rows for the press's largest layer: allocated, not held
        slack = sum((self.fixed_cap - self.n_fixed[i]) * row for i in range(self.n_layers) if self.static)
        bpt = self.bytes_per_token()
        return {"compressed": True, "press": str(self.press) if self.press else None,
                "tokens": self.source_len, "rows_kept": sum(self.n_fixed), "store_bytes": self.store_bytes(),
                "store_bytes_gpu": gpu_stores, "store_bytes_cpu": self.store_bytes() - gpu_stores,
                "shared_bytes": self.shared_bytes(), "tail_bytes": tails, "scratch_bytes": scratch,
                "static_slack_bytes": slack,
                "kv_bytes": self.store_bytes() + self.shared_bytes() + tails + scratch + slack,
                "bytes_per_token": bpt, "full_bytes_per_token": self.full_bytes_per_token(),
                "compression": self.full_bytes_per_token() / bpt if bpt else None, "h2d_bytes": self.h2d_bytes,
                "compressions": self.compressions}
