"""Fused elementwise kernels for the decoder's decode step: RMSNorm (with the residual add), RoPE on q and k, SiLU·up.

A graphed 1.5B decode step ran 1209 kernels of 2.8 us on average; their sum was 3.42 of its 3.81 ms, while its bytes
need about 1 ms (``results/profile/h200-graphed``). Most of those kernels were elementwise pieces of three formulas,
each written out in torch as 4-10 launches per layer. Here each formula is one Triton kernel:

- ``rms_norm(x, w, eps, residual)``: ``h = x + residual`` (rounded to x's dtype), then
  ``w * (h * rsqrt(mean(h^2) + eps))`` with the normalization in fp32, cast to the dtype, then the weight: the torch
  path's roundings (``RMSNorm.forward``). Returns ``(y, h)``; without a residual ``h`` is x.
- ``rope_qk(q, k, cos, sin)``: HF's rotate-half RoPE, ``x * cos + cat(-x2, x1) * sin``; q and k (any strides, e.g.
  views of one fused QKV output) are read once and written contiguous (B, H, T, D).
- ``silu_mul(gu)``: ``silu(g) * u`` for the fused gate/up output ``gu = [g | u]`` (..., 2I), silu rounded to the dtype
  before the product, as ``F.silu(g) * u`` does.

The torch formulas are the reference and the CPU path; the kernels run on CUDA with Triton unless
``MSPECKV_NO_TRITON=1``. They are not bit-identical to it: the norm's fp32 sum runs in another order, and on the
H200 0.6% of bf16 RoPE outputs differed from torch's by more than one rounding of the output (at most 0.006 on O(1)
inputs: a rounded product contracted into the add). ``tests/test_gpu.py`` checks agreement within about one rounding
at the terms' magnitude, and the whole forward against the torch path.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor

from ..kv.triton_flag import HAS_TRITON, tl, triton


def use_fused(x: Tensor) -> bool:
    return x.is_cuda and HAS_TRITON and os.environ.get("MSPECKV_NO_TRITON", "0") != "1"


# ------------------------------------------------------------------------------------------------ torch references
def rms_norm_torch(x: Tensor, w: Tensor, eps: float, residual: Tensor | None = None) -> tuple[Tensor, Tensor]:
    h = x if residual is None else x + residual
    return w * F.rms_norm(h.float(), (h.shape[-1],), eps=eps).to(h.dtype), h


def rotate_half_torch(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x (B, H, T, D), cos/sin (T, D) or (B, T, D) over all D dims."""
    if cos.dim() == 3:
        cos, sin = cos[:, None], sin[:, None]
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return (x * cos + torch.cat((-x2, x1), dim=-1) * sin).to(x.dtype)


def silu_mul_torch(gu: Tensor) -> Tensor:
    g, u = gu.chunk(2, dim=-1)
    return F.silu(g) * u


# ---------------------------------------------------------------------------------------------------------- Triton
if HAS_TRITON:

    @triton.jit
    def _rms_norm_kernel(X, R, W, Y, H, sx, sr, sy, sh, N, eps, HAS_RES: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        m = cols < N
        x = tl.load(X + row * sx + cols, mask=m, other=0.0)
        if HAS_RES:
            # h = x + r in the dtype (torch rounds the sum), written back for the next residual
            x = (x.to(tl.float32) + tl.load(R + row * sr + cols, mask=m, other=0.0).to(tl.float32)).to(x.dtype)
            tl.store(H + row * sh + cols, x, mask=m)
        h = x.to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(h * h, axis=0) / N + eps)  # rsqrt(mean(h^2) + eps), fp32
        y = (h * rstd).to(x.dtype).to(tl.float32)  # normalized, rounded to the dtype (the torch path's .to(dtype))
        w = tl.load(W + cols, mask=m, other=0.0).to(tl.float32)
        tl.store(Y + row * sy + cols, (w * y).to(Y.dtype.element_ty), mask=m)

    @triton.jit
    def _rope_kernel(Q, K, C, S, QO, KO, T, HQ,
                     sqb, sqt, sqh, skb, skt, skh, scb, sct, ssb, sst, sob, soh, sot, skob, skoh, skot,
                     HALF: tl.constexpr):
        bt = tl.program_id(0)  # one (batch, token) pair ...
        h = tl.program_id(1)  # ... and one head: q heads [0, HQ), then k heads
        b = bt // T
        t = bt % T
        d = tl.arange(0, HALF)
        c1 = tl.load(C + b * scb + t * sct + d).to(tl.float32)  # scb = 0: one (T, D) table for every sequence
        c2 = tl.load(C + b * scb + t * sct + HALF + d).to(tl.float32)
        s1 = tl.load(S + b * ssb + t * sst + d).to(tl.float32)
        s2 = tl.load(S + b * ssb + t * sst + HALF + d).to(tl.float32)
        if h < HQ:
            src = Q + b * sqb + t * sqt + h * sqh
            dst = QO + b * sob + h * soh + t * sot
        else:
            src = K + b * skb + t * skt + (h - HQ) * skh
            dst = KO + b * skob + (h - HQ) * skoh + t * skot
        x1 = tl.load(src + d)
        x2 = tl.load(src + HALF + d)
        ty = x1.dtype
        x1 = x1.to(tl.float32)
        x2 = x2.to(tl.float32)
        # out = x * cos + cat(-x2, x1) * sin; the products are rounded to the dtype as torch rounds them (the
        # compiler may still contract one into the add: see the module doc)
        o1 = ((x1 * c1).to(ty).to(tl.float32) + (-x2 * s1).to(ty).to(tl.float32)).to(ty)
        o2 = ((x2 * c2).to(ty).to(tl.float32) + (x1 * s2).to(ty).to(tl.float32)).to(ty)
        tl.store(dst + d, o1)
        tl.store(dst + HALF + d, o2)

    @triton.jit
    def _silu_mul_kernel(GU, Y, sg, sy, I, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        m = cols < I
        g = tl.load(GU + row * sg + cols, mask=m, other=0.0)
        u = tl.load(GU + row * sg + I + cols, mask=m, other=0.0).to(tl.float32)
        gf = g.to(tl.float32)
        s = (gf / (1.0 + tl.exp(-gf))).to(g.dtype).to(tl.float32)  # silu(g), rounded to the dtype
        tl.store(Y + row * sy + cols, (s * u).to(Y.dtype.element_ty), mask=m)


def _rows(x: Tensor) -> Tensor:
    """(..., N) -> (rows, N) with unit stride along N (a view when possible)."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


# -------------------------------------------------------------------------------------------------------- dispatch
def rms_norm(x: Tensor, w: Tensor, eps: float, residual: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """-> (w * norm(h), h) with h = x (+ residual). One kernel on CUDA."""
    if not use_fused(x) or (residual is not None and residual.shape != x.shape):
        return rms_norm_torch(x, w, eps, residual)
    N = x.shape[-1]
    x2 = _rows(x)
    r2 = x2 if residual is None else _rows(residual)
    y = torch.empty(x2.shape, dtype=torch.promote_types(x.dtype, w.dtype), device=x.device)
    h = x2 if residual is None else torch.empty_like(x2)
    _rms_norm_kernel[(x2.shape[0],)](x2, r2, w, y, h, x2.stride(0), r2.stride(0), y.stride(0), h.stride(0), N, eps,
                                     HAS_RES=residual is not None, BLOCK=triton.next_power_of_2(N),
                                     num_warps=4 if N <= 2048 else 8)
    return y.view(x.shape), (x if residual is None else h.view(x.shape))


def rope_qk(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """q (B, Hq, T, D), k (B, Hkv, T, D) (any strides), cos/sin (T, D), or (B, T, D) for a position per sequence
    -> rotated (q, k), contiguous."""
    from .rope import apply_rope

    B, Hq, T, D = q.shape
    Hkv = k.shape[1]
    if (not use_fused(q) or cos.dim() not in (2, 3) or cos.shape[-1] != D or cos.shape[:-2] not in ((), (B,))
            or D & (D - 1) or q.stride(-1) != 1 or k.stride(-1) != 1 or cos.stride(-1) != 1 or sin.stride(-1) != 1
            or q.dtype != k.dtype):
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    qo = torch.empty((B, Hq, T, D), dtype=q.dtype, device=q.device)
    ko = torch.empty((B, Hkv, T, D), dtype=k.dtype, device=k.device)
    _rope_kernel[(B * T, Hq + Hkv)](
        q, k, cos, sin, qo, ko, T, Hq,
        q.stride(0), q.stride(2), q.stride(1), k.stride(0), k.stride(2), k.stride(1),
        cos.stride(0) if cos.dim() == 3 else 0, cos.stride(-2), sin.stride(0) if sin.dim() == 3 else 0, sin.stride(-2),
        qo.stride(0), qo.stride(1), qo.stride(2), ko.stride(0), ko.stride(1), ko.stride(2),
        HALF=D // 2, num_warps=1,
    )  # fmt: skip
    return qo, ko


def silu_mul(gu: Tensor) -> Tensor:
    """gu (..., 2I) = [gate | up] -> silu(gate) * up (..., I)."""
    if not use_fused(gu):
        return silu_mul_torch(gu)
    I2 = gu.shape[-1]
    g2 = _rows(gu)
    y = torch.empty((g2.shape[0], I2 // 2), dtype=gu.dtype, device=gu.device)
    BLOCK = 1024
    _silu_mul_kernel[(g2.shape[0], triton.cdiv(I2 // 2, BLOCK))](g2, y, g2.stride(0), y.stride(0), I2 // 2,
                                                                  BLOCK=BLOCK, num_warps=4)
    return y.view(*gu.shape[:-1], I2 // 2)
