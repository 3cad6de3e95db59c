"""Decode / verification attention for few query rows: one split-K (flash-decoding) Triton kernel + a torch reference.

``decode_attention(q, k, v, mask, lens=..., k_tail=..., v_tail=...)`` computes, for q (B, Hq, T, D) and K/V with
Hkv = Hq / G heads, ``softmax(q k^T / sqrt(D) + mask) v`` -> (B, Hq, T, D) in q's dtype.

* **GQA folded**: one program handles one KV head's G query heads x T query rows (row r = g*T + t, query head
  kv*G + g, as ``attention()`` in ``model/llama.py`` folds them), so each K/V row is read once for all of them.
* **Split-K**: the key axis is cut into ``num_splits`` ranges, each program computes a partial (max, sum, P·V) in
  fp32, and a second pass combines them. The ranges cover ``[0, max visible key)``, computed on the device from
  ``lens``/``mask``, so a static-capacity cache (buffer longer than its valid prefix) is not read past the valid rows
  and every launch has host-independent shapes (CUDA-graph safe).
* **Masking**: ``mask`` (T, S) bool (True = visible) is applied exactly; ``lens`` (T,) int gives each row's visible
  prefix (row t sees keys j < lens[t]); ``causal=True`` is the bottom-right causal mask among the new rows (row t
  sees j <= S - T + t) without any mask tensor. They combine (logical and). ``window`` (``kv.base.Window``, dense
  K/V with per-sequence ``lens`` (B, T)): row (b, t) also needs j < sinks or j >= starts[b, t], and the programs
  read only those keys (a StreamingLLM draft over the target's own buffer costs its window, not the sequence).
* **KV formats**: dense bf16/fp16/fp32 tensors of any strides (e.g. a prefix view or a whole static buffer), or
  KIVI ``QTensor`` codes (``mspeckv.kv.quant``: keys per channel grouped along tokens, values per token grouped
  along channels, int8/int4/int2, scale+zero) dequantized inside the kernel: the codes are read, never expanded.
  ``k_tail``/``v_tail`` (dense, B, Hkv, S_t, D) are keys appended after the quantized ones (a KIVI residual); key
  index j >= S_q addresses them. The tail is handled by one extra split.

The torch reference (``decode_attention_torch``) dequantizes, applies the same masks and does the math of
``attention()``'s few-row path (folded SDPA on the CPU, fp32-score bmm on CUDA). The dispatcher uses Triton on CUDA
when it is installed and ``MSPECKV_NO_TRITON`` is not ``1``, the reference elsewhere.

Measured on an H200 (``results/kernels/README.md``, random data): bf16 K/V reads at 72-104% of the device copy
bandwidth for 32 KV heads from 4K keys up, 54-68% for 2 KV heads at 32K-64K; a 9-row verification costs 1.0-1.1x a
decode at G = 1 but 2-3x at G = 6 (54 rows). Quantized K/V are dequantized in registers and run at ~2x the bf16 time
(int8 28%, int4 15% of copy bandwidth): compute-bound there, not yet at the memory floor. Options kept for tuning
(``num_splits``, ``block_n``, ``num_warps``, ``num_stages``, ``prefetch``, ``kfold``, ``f16``); ``f16=True`` (fp16
dequant arithmetic) gave wrong int4/int2 results at 64 padded query rows on the H200 and is off by default.
"""

from __future__ import annotations

import os
import weakref

import torch
import torch.nn.functional as F
from torch import Tensor

from ..kv.base import Window
from ..kv.quant import QTensor, unpack_codes
from ..kv.triton_flag import HAS_TRITON, tl, triton  # one optional Triton import for every kernel module

KV = Tensor | QTensor


# --------------------------------------------------------------------------------------------------------- helpers
def _key_group(k: QTensor) -> int:
    return k.shape[2] // k.codes.shape[2]


def _val_group(v: QTensor) -> int:
    return v.shape[3] // v.scale.shape[3]


def _bits(x: QTensor) -> int:
    """Bits per code, from the packed width."""
    B, H, T, D = x.shape
    if x.is_key:
        g = _key_group(x)
        return 8 * x.codes.shape[4] // g
    return 8 * x.codes.shape[3] // D


def dequant_torch(x: QTensor, dtype: torch.dtype) -> Tensor:
    """QTensor -> dense (B, H, S, D) in dtype (same math as ``quant.dequantize_*_torch``, spec inferred)."""
    B, H, S, D = x.shape
    bits = _bits(x)
    c = unpack_codes(x.codes, bits).float()
    if x.is_key:  # (B, H, NG, D, g)
        y = c * x.scale.float().unsqueeze(-1) + x.zero.float().unsqueeze(-1)
        return y.to(dtype).transpose(-1, -2).reshape(B, H, S, D)
    g = _val_group(x)
    y = c.view(B, H, S, D // g, g) * x.scale.float().unsqueeze(-1) + x.zero.float().unsqueeze(-1)
    return y.to(dtype).view(B, H, S, D)


def visible(T: int, S: int, device, mask: Tensor | None = None, lens: Tensor | None = None,
            causal: bool = False) -> Tensor | None:
    """The combined (T, S) bool mask of ``mask``, ``lens`` and ``causal`` (None when nothing is masked)."""
    m = None if mask is None else mask.to(device=device, dtype=torch.bool)
    j = torch.arange(S, device=device)[None, :]
    if lens is not None:
        lm = j < lens.to(device).view(T, 1)
        m = lm if m is None else m & lm
    if causal:
        cm = j <= S - T + torch.arange(T, device=device)[:, None]
        m = cm if m is None else m & cm
    return m


# --------------------------------------------------------------------------------------------------------- reference
def decode_attention_torch(q: Tensor, k: KV, v: KV, mask: Tensor | None = None, *, lens: Tensor | None = None,
                           causal: bool = False, k_tail: Tensor | None = None,
                           v_tail: Tensor | None = None) -> Tensor:
    """Reference: dequantize, concatenate the tail, mask, and do ``attention()``'s few-row math."""
    B, Hq, T, D = q.shape
    if isinstance(k, QTensor):
        k = dequant_torch(k, q.dtype)
    if isinstance(v, QTensor):
        v = dequant_torch(v, q.dtype)
    if k_tail is not None:
        k, v = torch.cat([k, k_tail], 2), torch.cat([v, v_tail], 2)
    Hkv, S = k.shape[1], k.shape[2]
    G = Hq // Hkv
    m = visible(T, S, q.device, mask, lens, causal)
    qf = q.reshape(B, Hkv, G * T, D)  # query head h = kv * G + g
    fm = None if m is None else m.repeat(G, 1)  # (G*T, S)
    if q.is_cuda and B == 1:
        sc = torch.bmm(qf[0] * D ** -0.5, k[0].transpose(1, 2), out_dtype=torch.float32)  # (Hkv, G*T, S)
        if fm is not None:
            sc.masked_fill_(~fm, float("-inf"))
        y = torch.bmm(sc.softmax(-1).to(v.dtype), v[0])[None]
    else:
        y = F.scaled_dot_product_attention(qf, k, v, attn_mask=fm)
    return y.reshape(B, Hq, T, D)


# --------------------------------------------------------------------------------------------------------- Triton
if HAS_TRITON:

    @triton.jit
    def _load_kq(k_base, ks_base, kz_base, n0, hi_s, s_kt, s_kd, s_kj, s_ksg, s_ksd,
                 D: tl.constexpr, BLOCK_N: tl.constexpr, KBITS: tl.constexpr, KG: tl.constexpr):
        """Key codes of tokens [n0, n0 + BLOCK_N) (inside one group of KG tokens): bytes (D, BLOCK_N*KBITS/8),
        the group's scale and zero (D,)."""
        KPER: tl.constexpr = 8 // KBITS
        d = tl.arange(0, D)
        if BLOCK_N == KG:  # whole groups: a plain range, so the byte loads vectorize
            jb = tl.arange(0, BLOCK_N // KPER)
        else:
            jb = (n0 % KG) // KPER + tl.arange(0, BLOCK_N // KPER)
        grp = n0 // KG
        ok = n0 < hi_s
        byte = tl.load(k_base + grp * s_kt + d[:, None] * s_kd + jb[None, :] * s_kj, mask=(d[:, None] < D) & ok,
                       other=0)
        sc = tl.load(ks_base + grp * s_ksg + d * s_ksd, mask=(d < D) & ok, other=0.0)
        zr = tl.load(kz_base + grp * s_ksg + d * s_ksd, mask=(d < D) & ok, other=0.0)
        return byte, sc, zr

    @triton.jit
    def _deq_k(byte, sc, zr, D: tl.constexpr, BLOCK_N: tl.constexpr, KBITS: tl.constexpr, F16: tl.constexpr):
        """-> K^T tile (D, BLOCK_N); codes are packed along tokens (token j*PER + p in bits p*KBITS). F16: fp16
        arithmetic (fp16 scales; codes and the result are exact or rounded once in fp16), else fp32."""
        KPER: tl.constexpr = 8 // KBITS
        byte = byte.to(tl.int32)
        if KBITS == 8:
            code = byte
        else:
            sh = tl.arange(0, KPER) * KBITS
            code = tl.reshape((byte[:, :, None] >> sh[None, None, :]) & ((1 << KBITS) - 1), (D, BLOCK_N))
        if F16:
            x = code.to(tl.float16) * sc[:, None] + zr[:, None]
        else:
            x = code.to(tl.float32) * sc.to(tl.float32)[:, None] + zr.to(tl.float32)[:, None]
        return x

    @triton.jit
    def _load_vq(v_base, vs_base, vz_base, n0, hi_s, s_vt, s_vd, s_vst, s_vsj,
                 D: tl.constexpr, BLOCK_N: tl.constexpr, VBITS: tl.constexpr, VG: tl.constexpr):
        """Value codes of tokens [n0, n0 + BLOCK_N): bytes (BLOCK_N, D*VBITS/8), scale, zero (BLOCK_N, D/VG)."""
        VPER: tl.constexpr = 8 // VBITS
        n = (n0 + tl.arange(0, BLOCK_N)).to(tl.int64)
        nv = n < hi_s
        jv = tl.arange(0, D // VPER)
        byte = tl.load(v_base + n[:, None] * s_vt + jv[None, :] * s_vd, mask=nv[:, None], other=0)
        jg = tl.arange(0, D // VG)
        sp = n[:, None] * s_vst + jg[None, :] * s_vsj
        sc = tl.load(vs_base + sp, mask=nv[:, None], other=0.0)
        zr = tl.load(vz_base + sp, mask=nv[:, None], other=0.0)
        return byte, sc, zr

    @triton.jit
    def _deq_v(byte, sc, zr, D: tl.constexpr, BLOCK_N: tl.constexpr, VBITS: tl.constexpr, VG: tl.constexpr,
               F16: tl.constexpr):
        """-> V tile (BLOCK_N, D); codes are packed along channels, one scale/zero per VG channels."""
        VPER: tl.constexpr = 8 // VBITS
        byte = byte.to(tl.int32)
        if VBITS == 8:
            code = byte
        else:
            sh = tl.arange(0, VPER) * VBITS
            code = tl.reshape((byte[:, :, None] >> sh[None, None, :]) & ((1 << VBITS) - 1), (BLOCK_N, D))
        if F16:
            x = tl.reshape(code.to(tl.float16), (BLOCK_N, D // VG, VG))
            x = x * sc[:, :, None] + zr[:, :, None]
        else:
            x = tl.reshape(code.to(tl.float32), (BLOCK_N, D // VG, VG))
            x = x * sc.to(tl.float32)[:, :, None] + zr.to(tl.float32)[:, :, None]
        return tl.reshape(x, (BLOCK_N, D))

    @triton.jit
    def _online(s, vis, m_i, l_i, qk_scale):
        s = tl.where(vis, s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_sf = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_sf[:, None])
        alpha = tl.exp2(m_i - m_sf)
        return p, alpha, l_i * alpha + tl.sum(p, 1), m_new

    @triton.jit
    def _split_kernel(
        q_ptr, k_ptr, v_ptr, ks_ptr, kz_ptr, vs_ptr, vz_ptr,  # K/V: dense tensors, or codes + scale + zero
        kt_ptr, vt_ptr,  # dense tail (TAIL)
        lens_ptr, mask_ptr,  # lens (T,) or (B, T) [+ a flag at [T]: mask is not a prefix mask]; mask (T, S) uint8
        start_ptr, n_sinks,  # WINDOW: row (b, t) also needs key j < n_sinks or j >= start[b, t] (start (B, T))
        op_ptr, ml_ptr,  # partials: (BH, NS, M, D) fp32, (BH, NS, M, 2) fp32
        Hkv, S_main, S_tail, n_split, sm_scale,
        s_qb, s_qh, s_qt, s_qd,
        s_kb, s_kh, s_kt, s_kd, s_kj,  # dense: t, d (kj unused); key codes: group, d, byte
        s_ksb, s_ksh, s_ksg, s_ksd,
        s_vb, s_vh, s_vt, s_vd,  # dense: t, d; value codes: t, byte
        s_vsb, s_vsh, s_vst, s_vsj,
        s_ktb, s_kth, s_ktt, s_ktd,
        s_vtb, s_vth, s_vtt, s_vtd,
        s_mt, s_mn, s_lb,  # s_lb: lens' batch stride (0: one (T,) bound for every sequence)
        T: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        KBITS: tl.constexpr, VBITS: tl.constexpr, VG: tl.constexpr,  # bits 0 = dense; VG: value group (channels)
        KG: tl.constexpr,  # key group (tokens), a multiple of BLOCK_N
        HAS_LENS: tl.constexpr, HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr, TAIL: tl.constexpr,
        IEEE: tl.constexpr, F16: tl.constexpr,  # F16: quantized K/V with fp16 scales, dots in fp16
        PREFETCH: tl.constexpr,  # quantized: load block i+1's codes by hand while block i is computed
        KFOLD: tl.constexpr,  # quantized keys (F16): fold the group's scale/zero into q instead of dequantizing
        WINDOW: tl.constexpr,  # dense K/V only: read keys [0, n_sinks) and [start, end) of each row, skip the rest
    ):
        M: tl.constexpr = G * T
        pid_s = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = (pid_bh // Hkv).to(tl.int64)
        h = (pid_bh % Hkv).to(tl.int64)
        S_tot = S_main + S_tail

        r = tl.arange(0, BLOCK_M)
        rt = r % T  # query row within the new tokens
        rg = r // T  # query head within the group
        rv = r < M
        d = tl.arange(0, D)

        # visible-key bound of each row, and of the whole program (device-side: graph safe)
        row_end = tl.full((BLOCK_M,), 0, tl.int32) + S_tot
        if HAS_LENS:
            row_end = tl.minimum(row_end, tl.load(lens_ptr + b * s_lb + rt, mask=rv, other=0).to(tl.int32))
        if CAUSAL:
            row_end = tl.minimum(row_end, S_tot - T + rt + 1)
        row_end = tl.where(rv, row_end, 0)
        hi = tl.max(row_end, 0)
        if HAS_MASK:
            mflag = tl.load(lens_ptr + T)  # 0: the mask is each row's prefix [0, lens): row_end says it all

        q_ptrs = q_ptr + b * s_qb + (h * G + rg)[:, None] * s_qh + rt[:, None] * s_qt + d[None, :] * s_qd
        qv = tl.load(q_ptrs, mask=rv[:, None], other=0.0)
        if F16:
            qv = qv.to(tl.float16)
        dt = qv.dtype
        qk_scale = sm_scale * 1.4426950408889634  # exp2 domain

        m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        l_i = tl.zeros((BLOCK_M,), tl.float32)
        acc = tl.zeros((BLOCK_M, D), tl.float32)

        L = tl.minimum(hi, S_main)
        skip = 0
        if WINDOW:  # the program reads [0, n_sinks) and [wlo, L): key u of that list is u, or u + skip past the sinks
            row_start = tl.load(start_ptr + b * s_lb + rt, mask=rv, other=0).to(tl.int32)
            row_start = tl.where(rv, row_start, S_tot)  # padding rows do not lower the program's start
            wlo = tl.minimum(tl.maximum(tl.min(row_start, 0), n_sinks), L)
            skip = tl.maximum(wlo - n_sinks, 0)
        Lv = L - skip
        nblk = tl.cdiv(tl.cdiv(Lv, BLOCK_N), n_split)
        lo = pid_s * nblk * BLOCK_N
        hi_s = tl.minimum(lo + nblk * BLOCK_N, Lv)
        k_base = k_ptr + b * s_kb + h * s_kh
        v_base = v_ptr + b * s_vb + h * s_vh
        ks_base = ks_ptr + b * s_ksb + h * s_ksh
        kz_base = kz_ptr + b * s_ksb + h * s_ksh
        vs_base = vs_ptr + b * s_vsb + h * s_vsh
        vz_base = vz_ptr + b * s_vsb + h * s_vsh
        # quantized operands go through registers (dequantized before the dot), which the compiler's pipelining does
        # not prefetch: load block i+1's codes while block i is computed
        if PREFETCH:
            if KBITS > 0:
                kq_b, kq_s, kq_z = _load_kq(k_base, ks_base, kz_base, lo, hi_s, s_kt, s_kd, s_kj, s_ksg, s_ksd,
                                            D, BLOCK_N, KBITS, KG)
            if VBITS > 0:
                vq_b, vq_s, vq_z = _load_vq(v_base, vs_base, vz_base, lo, hi_s, s_vt, s_vd, s_vst, s_vsj,
                                            D, BLOCK_N, VBITS, VG)
        for n0 in range(lo, hi_s, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            nv = n < hi_s
            if WINDOW:  # list index -> key index (dense K/V: each key's address is its own)
                n = tl.where(n >= n_sinks, n + skip, n)
            if KBITS > 0:
                if PREFETCH:
                    kb, ksc, kzr = kq_b, kq_s, kq_z
                    kq_b, kq_s, kq_z = _load_kq(k_base, ks_base, kz_base, n0 + BLOCK_N, hi_s, s_kt, s_kd, s_kj,
                                                s_ksg, s_ksd, D, BLOCK_N, KBITS, KG)
                else:
                    kb, ksc, kzr = _load_kq(k_base, ks_base, kz_base, n0, hi_s, s_kt, s_kd, s_kj, s_ksg, s_ksd,
                                            D, BLOCK_N, KBITS, KG)
            if VBITS > 0:
                if PREFETCH:
                    vb, vsc, vzr = vq_b, vq_s, vq_z
                    vq_b, vq_s, vq_z = _load_vq(v_base, vs_base, vz_base, n0 + BLOCK_N, hi_s, s_vt, s_vd, s_vst,
                                                s_vsj, D, BLOCK_N, VBITS, VG)
                else:
                    vb, vsc, vzr = _load_vq(v_base, vs_base, vz_base, n0, hi_s, s_vt, s_vd, s_vst, s_vsj,
                                            D, BLOCK_N, VBITS, VG)
            # ---- K^T tile (D, BLOCK_N)
            if KBITS == 0:
                kk = tl.load(k_base + n[None, :] * s_kt + d[:, None] * s_kd, mask=nv[None, :], other=0.0).to(dt)
                if IEEE:
                    s = tl.dot(qv, kk, input_precision="ieee")
                else:
                    s = tl.dot(qv, kk)
            elif KFOLD:  # q k = (q * scale) codes + q zero: the group's scale folds into q, the tile is codes only
                KPER: tl.constexpr = 8 // KBITS
                if KBITS == 8:
                    code = kb.to(tl.int32)
                else:
                    sh = tl.arange(0, KPER) * KBITS
                    code = tl.reshape((kb.to(tl.int32)[:, :, None] >> sh[None, None, :]) & ((1 << KBITS) - 1),
                                      (D, BLOCK_N))
                qs = (qv * ksc.to(dt)[None, :]).to(dt)
                bias = tl.sum(qv.to(tl.float32) * kzr.to(tl.float32)[None, :], 1)
                s = tl.dot(qs, code.to(dt)) + bias[:, None]
            else:
                kk = _deq_k(kb, ksc, kzr, D, BLOCK_N, KBITS, F16).to(dt)
                if IEEE:
                    s = tl.dot(qv, kk, input_precision="ieee")
                else:
                    s = tl.dot(qv, kk)
            vis = (n[None, :] < row_end[:, None]) & nv[None, :]
            if WINDOW:
                vis = vis & ((n[None, :] < n_sinks) | (n[None, :] >= row_start[:, None]))
            if HAS_MASK:
                if mflag != 0:
                    mk = tl.load(mask_ptr + rt[:, None] * s_mt + n[None, :] * s_mn, mask=rv[:, None] & nv[None, :],
                                 other=0)
                    vis = vis & (mk != 0)
            p, alpha, l_i, m_i = _online(s, vis, m_i, l_i, qk_scale)
            # ---- V tile (BLOCK_N, D)
            if VBITS == 0:
                vv = tl.load(v_base + n[:, None] * s_vt + d[None, :] * s_vd, mask=nv[:, None], other=0.0).to(dt)
            else:
                vv = _deq_v(vb, vsc, vzr, D, BLOCK_N, VBITS, VG, F16).to(dt)
            if IEEE:
                acc = acc * alpha[:, None] + tl.dot(p.to(dt), vv, input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(dt), vv)

        if TAIL:  # the last program reads the dense tail: keys [S_main, S_main + S_tail)
            lo_t = S_main
            hi_t = tl.where(pid_s == n_split, tl.minimum(hi, S_tot), S_main)  # the last program only
            kt_base = kt_ptr + b * s_ktb + h * s_kth
            vt_base = vt_ptr + b * s_vtb + h * s_vth
            for n0 in range(lo_t, hi_t, BLOCK_N):
                n = n0 + tl.arange(0, BLOCK_N)
                nv = n < hi_t
                kk = tl.load(kt_base + (n - S_main)[None, :] * s_ktt + d[:, None] * s_ktd, mask=nv[None, :],
                             other=0.0).to(dt)
                if IEEE:
                    s = tl.dot(qv, kk, input_precision="ieee")
                else:
                    s = tl.dot(qv, kk)
                vis = (n[None, :] < row_end[:, None]) & nv[None, :]
                if HAS_MASK:
                    if mflag != 0:
                        mk = tl.load(mask_ptr + rt[:, None] * s_mt + n[None, :] * s_mn,
                                     mask=rv[:, None] & nv[None, :], other=0)
                        vis = vis & (mk != 0)
                p, alpha, l_i, m_i = _online(s, vis, m_i, l_i, qk_scale)
                vv = tl.load(vt_base + (n - S_main)[:, None] * s_vtt + d[None, :] * s_vtd, mask=nv[:, None],
                             other=0.0).to(dt)
                if IEEE:
                    acc = acc * alpha[:, None] + tl.dot(p.to(dt), vv, input_precision="ieee")
                else:
                    acc = acc * alpha[:, None] + tl.dot(p.to(dt), vv)
        NS = tl.num_programs(0)
        base = pid_bh.to(tl.int64) * NS + pid_s
        tl.store(op_ptr + (base * M + r)[:, None] * D + d[None, :], acc, mask=rv[:, None])
        tl.store(ml_ptr + (base * M + r) * 2, m_i, mask=rv)
        tl.store(ml_ptr + (base * M + r) * 2 + 1, l_i, mask=rv)

    @triton.jit
    def _reduce_kernel(
        op_ptr, ml_ptr, o_ptr, NS, Hkv,
        s_ob, s_oh, s_ot, s_od,
        T: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BLOCK_S: tl.constexpr, DC: tl.constexpr,
    ):
        """One program per (KV head, query row, DC channels): all splits' partials in one tile."""
        M: tl.constexpr = G * T
        pid_bh = tl.program_id(0)
        r = tl.program_id(1)
        pid_d = tl.program_id(2)
        b = (pid_bh // Hkv).to(tl.int64)
        h = (pid_bh % Hkv).to(tl.int64)
        sidx = tl.arange(0, BLOCK_S)
        sv = sidx < NS
        row = pid_bh.to(tl.int64) * NS * M + r  # partial (s) of this row sits at row + s * M
        ms = tl.load(ml_ptr + (row + sidx * M) * 2, mask=sv, other=float("-inf"))
        ls = tl.load(ml_ptr + (row + sidx * M) * 2 + 1, mask=sv, other=0.0)
        m_all = tl.max(ms, 0)
        m_sf = tl.where(m_all == float("-inf"), 0.0, m_all)
        w = tl.exp2(ms - m_sf)
        den = tl.sum(w * ls, 0)
        d = pid_d * DC + tl.arange(0, DC)
        o = tl.load(op_ptr + (row + sidx * M)[:, None] * D + d[None, :], mask=sv[:, None], other=0.0)
        out = tl.sum(o * w[:, None], 0) / den
        t = r % T
        hq = h * G + r // T
        tl.store(o_ptr + b * s_ob + hq * s_oh + t * s_ot + d * s_od, out.to(o_ptr.dtype.element_ty))


_SM_COUNT: dict[int, int] = {}


def _sm_count(device: torch.device) -> int:
    i = device.index if device.index is not None else torch.cuda.current_device()
    if i not in _SM_COUNT:
        _SM_COUNT[i] = torch.cuda.get_device_properties(i).multi_processor_count
    return _SM_COUNT[i]


QBLOCK_N = 64  # tokens per iteration with quantized K/V (at most one key group)
QPREFETCH = True
QKFOLD = False
QF16 = False  # fp16 dequant arithmetic and dots: opt-in (wrong results seen with BLOCK_M=64, int4/int2, H200)
MAX_SPLITS = 512  # the reduction loads all of a row's partials in one tile


def default_splits(n_keys: int, block_n: int, programs_per_split: int, rows: int, sms: int,
                   per_sm: float = 2.0) -> int:
    """Splits of the key axis: about ``per_sm`` programs per multiprocessor in all, at least 4 key blocks per split,
    and at least 8 keys per query row per split (the fp32 partials, rows x D each, stay small next to the K/V)."""
    n_blk = -(-n_keys // block_n)
    min_blk = max(4, -(-8 * rows // block_n))
    want = max(1, int(per_sm * sms) // max(1, programs_per_split))
    return max(1, min(want, -(-n_blk // min_blk), MAX_SPLITS - 1))


_BOUND: list = [None, -1, None]  # weakref(mask), mask version, bounds: one entry, shared by the layers of a forward


def mask_bound(mask: Tensor) -> Tensor:
    """(T, S) bool -> (T + 1,) int32: [0:T] one past each row's last visible key (the key loop's bound), [T] 1 when
    some row is not a prefix (visible keys not exactly [0, bound)), so the kernel must also apply the mask itself.
    Computed on the device (graph safe); cached for the last mask object seen, so the layers of a forward share it."""
    ref, ver, val = _BOUND
    # inference tensors have no version counter: key those on identity alone (masks are built per forward, never
    # written in place outside a graph replay, which recomputes the bound itself)
    version = -1 if mask.is_inference() else mask._version
    if ref is not None and ref() is mask and ver == version:
        return val
    S = mask.shape[-1]
    idx = torch.arange(1, S + 1, device=mask.device, dtype=torch.int32)
    bound = torch.where(mask, idx, 0).amax(-1).to(torch.int32)
    count = mask.sum(-1, dtype=torch.int32)
    val = torch.cat([bound, (count != bound).any().to(torch.int32).view(1)])
    _BOUND[:] = [weakref.ref(mask), version, val]
    return val


def triton_supported(q: Tensor, k: KV, v: KV, mask: Tensor | None = None) -> bool:
    """Shapes/dtypes the kernel handles (else the dispatcher falls back to the reference)."""
    if not (HAS_TRITON and q.is_cuda):
        return False
    if mask is not None and (mask.dtype != torch.bool or mask.dim() != 2 or mask.shape[0] != q.shape[2]):
        return False
    D = q.shape[-1]
    if D < 16 or D & (D - 1) or D > 256 or q.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return False
    B, Hq, T, _ = q.shape
    if isinstance(k, QTensor):
        g = _key_group(k)
        if g < 16 or g > 256 or g & (g - 1):
            return False
    if isinstance(v, QTensor):
        gv = _val_group(v)
        if gv & (gv - 1) or gv > D:
            return False
    Hkv = k.shape[1]
    return Hq % Hkv == 0 and (Hq // Hkv) * T <= 128


def decode_attention_triton(q: Tensor, k: KV, v: KV, mask: Tensor | None = None, *, lens: Tensor | None = None,
                            causal: bool = False, k_tail: Tensor | None = None, v_tail: Tensor | None = None,
                            num_splits: int | None = None, block_n: int | None = None,
                            num_warps: int | None = None, num_stages: int | None = None,
                            prefetch: bool | None = None, kfold: bool | None = None,
                            f16: bool | None = None, window: Window | None = None) -> Tensor:
    B, Hq, T, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    M = G * T
    S_main = k.shape[2]
    S_tail = 0 if k_tail is None else k_tail.shape[2]
    S_tot = S_main + S_tail
    kq, vq = isinstance(k, QTensor), isinstance(v, QTensor)
    if kq:
        kg = _key_group(k)
        BLOCK_N = min(kg, block_n or QBLOCK_N)
        if kg % BLOCK_N:
            raise ValueError(f"block_n {BLOCK_N} must divide the key group {kg}")
        kbits = _bits(k)
        kt, ks, kz = k.codes, k.scale, k.zero
        s_k = (kt.stride(0), kt.stride(1), kt.stride(2), kt.stride(3), kt.stride(4))
        s_ks = ks.stride()
    else:
        BLOCK_N = block_n or (QBLOCK_N if vq else 64)
        kg = BLOCK_N
        kbits = 0
        kt, ks, kz = k, k, k
        s_k = (k.stride(0), k.stride(1), k.stride(2), k.stride(3), 0)
        s_ks = (0, 0, 0, 0)
    if vq:
        vbits, vg = _bits(v), _val_group(v)
        vt, vs, vz = v.codes, v.scale, v.zero
        s_v = v.codes.stride()
        s_vs = vs.stride()
        if vz.stride() != vs.stride():
            raise ValueError("value scale and zero must share strides")
    else:
        vbits, vg = 0, 1
        vt, vs, vz = v, v, v
        s_v = v.stride()
        s_vs = (0, 0, 0, 0)
    if kq and kz.stride() != ks.stride():
        raise ValueError("key scale and zero must share strides")
    BLOCK_M = max(16, triton.next_power_of_2(M))
    if num_splits is not None and not 1 <= num_splits < MAX_SPLITS:
        raise ValueError(f"num_splits must be in [1, {MAX_SPLITS})")
    # a bound per sequence (a ragged batch): the key axis is the longest sequence's, so short ones leave most splits
    # idle; four times as many splits keep the busy programs many and small (the SMs stay balanced)
    per_sm = (4.0 if kq or vq else 2.0) * (4 if lens is not None and lens.dim() == 2 else 1)
    n_keys = S_main
    if window is not None:
        if kq or vq or k_tail is not None or mask is not None or lens is None or lens.dim() != 2:
            raise ValueError("a window reads dense K/V with per-sequence lens (B, T), no tail and no mask")
        if tuple(window.starts.shape) != (B, T):
            raise ValueError(f"window starts must be ({B}, {T}), got {tuple(window.starts.shape)}")
        n_keys = min(S_main, window.span)  # the most keys a row reads: the splits cover that, not the capacity
    ns = num_splits or default_splits(n_keys, BLOCK_N, B * Hkv, M, _sm_count(q.device), per_sm)
    tail = S_tail > 0
    NS = ns + int(tail)
    dev = q.device
    op = torch.empty((B * Hkv, NS, M, D), dtype=torch.float32, device=dev)
    ml = torch.empty((B * Hkv, NS, M, 2), dtype=torch.float32, device=dev)
    kt_t = k_tail if tail else q
    vt_t = v_tail if tail else q
    s_kt = kt_t.stride() if tail else (0, 0, 0, 0)
    s_vt = vt_t.stride() if tail else (0, 0, 0, 0)
    s_lb = 0
    if lens is not None:
        if lens.dim() == 2:  # a bound per sequence: (B, T)
            if mask is not None or tuple(lens.shape) != (B, T):
                raise ValueError(f"per-sequence lens must be ({B}, {T}) and come without a mask, got "
                                 f"{tuple(lens.shape)}")
            lens = lens.to(device=dev, dtype=torch.int32).contiguous()
            s_lb = T
        else:
            lens = lens.to(device=dev, dtype=torch.int32).reshape(T)
    m_arg, s_m = q, (0, 0)
    if mask is not None:
        if mask.dtype != torch.bool or tuple(mask.shape) != (T, S_tot):
            raise ValueError(f"mask must be bool ({T}, {S_tot}), got {mask.dtype} {tuple(mask.shape)}")
        m_arg = mask.view(torch.uint8)
        s_m = m_arg.stride()
        mb = mask_bound(mask)
        if lens is not None:  # both: the tighter bound, and the mask applied
            mb = torch.cat([torch.minimum(lens, mb[:T]), torch.ones(1, dtype=torch.int32, device=dev)])
        lens = mb
    scale_dts = [x.scale.dtype for x in (k, v) if isinstance(x, QTensor)]
    f16 = QF16 if f16 is None else f16
    f16 = bool(f16 and scale_dts and q.dtype != torch.float32 and all(d == torch.float16 for d in scale_dts))
    nw = num_warps or (4 if BLOCK_M <= 32 else 8)
    if prefetch is None:
        prefetch = QPREFETCH
    if kfold is None:
        kfold = QKFOLD
    kfold = bool(kfold and f16 and kq)
    prefetch = bool(prefetch and (kq or vq))
    if num_stages is None:
        num_stages = 3
    _split_kernel[(NS, B * Hkv)](
        q, kt, vt, ks, kz, vs, vz, kt_t, vt_t, q if lens is None else lens, m_arg,
        q if window is None else window.starts.to(dtype=torch.int32).contiguous(),
        0 if window is None else window.sinks, op, ml,
        Hkv, S_main, S_tail, ns, D ** -0.5,
        *q.stride(), *s_k, *s_ks, *s_v, *s_vs, *s_kt, *s_vt, *s_m, s_lb,
        T=T, G=G, D=D, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, KBITS=kbits, VBITS=vbits, VG=vg, KG=kg,
        HAS_LENS=lens is not None, HAS_MASK=mask is not None, CAUSAL=causal, TAIL=tail,
        IEEE=q.dtype == torch.float32, F16=f16, PREFETCH=prefetch, KFOLD=kfold, WINDOW=window is not None,
        num_warps=nw, num_stages=num_stages,
    )  # fmt: skip
    # written (B, T, Hq, D) in memory, so the caller's transpose(1, 2).reshape(B, T, Hq * D) for o_proj is a view
    out = torch.empty((B, T, Hq, D), dtype=q.dtype, device=dev).transpose(1, 2)  # (B, Hq, T, D)
    BLOCK_S = triton.next_power_of_2(NS)
    DC = max(16, min(D, 8192 // BLOCK_S))
    _reduce_kernel[(B * Hkv, M, D // DC)](
        op, ml, out, NS, Hkv, *out.stride(), T=T, G=G, D=D, BLOCK_S=BLOCK_S, DC=DC, num_warps=4,
    )  # fmt: skip
    return out


# --------------------------------------------------------------------------------------------------------- dispatch
def use_triton(q: Tensor) -> bool:
    return q.is_cuda and HAS_TRITON and os.environ.get("MSPECKV_NO_TRITON", "0") != "1"


def decode_attention(q: Tensor, k: KV, v: KV, mask: Tensor | None = None, *, lens: Tensor | None = None,
                     causal: bool = False, k_tail: Tensor | None = None, v_tail: Tensor | None = None,
                     **triton_kw) -> Tensor:
    """Few-row attention: Triton split-K kernel on CUDA (see module doc), the torch reference elsewhere."""
    B, Hq, T, D = q.shape
    if k.shape[1] == 0 or Hq % k.shape[1] or tuple(v.shape[:3]) != tuple(k.shape[:3]):
        raise ValueError(f"q {tuple(q.shape)} does not fit k {tuple(k.shape)} / v {tuple(v.shape)}")
    if (k_tail is None) != (v_tail is None):
        raise ValueError("k_tail and v_tail go together")
    if use_triton(q) and triton_supported(q, k, v, mask):
        return decode_attention_triton(q, k, v, mask, lens=lens, causal=causal, k_tail=k_tail, v_tail=v_tail,
                                       **triton_kw)
    return decode_attention_torch(q, k, v, mask, lens=lens, causal=causal, k_tail=k_tail, v_tail=v_tail)
