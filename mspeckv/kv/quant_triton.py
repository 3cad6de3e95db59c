"""Triton dequantization kernels for `mspeckv.kv.quant` (keys per-channel, values per-token; int8/int4/int2).

Each kernel reads packed uint8 codes + scales/zeros (any strides along B, H, T, e.g. a prefix slice of a
preallocated store) and writes x_hat = code * scale + zero (fp32 math, then cast) straight into a preallocated
output of any float dtype and any strides (e.g. a prefix view of a GPU KV buffer). The torch functions
`quant.dequantize_*_torch` are the reference; results agree to within one rounding of the output dtype
(Triton may fuse the multiply-add into an FMA); ``quant.selfcheck`` compares them on a GPU. This module imports
nothing of ``quant`` (which dispatches here): the codes' layout is passed in through ``q`` and ``spec``.
"""

from __future__ import annotations

from torch import Tensor

from .triton_flag import HAS_TRITON, tl, triton

if HAS_TRITON:

    @triton.jit
    def _dq_keys_kernel(
        codes_ptr,  # (B, H, NG, D, G*BITS/8) uint8
        scale_ptr,  # (B, H, NG, D)
        zero_ptr,  # (B, H, NG, D)
        out_ptr,  # (B, H, NG*G, D)
        H,
        D,
        n_dblk,
        s_cb,
        s_ch,
        s_cg,
        s_cd,
        s_cj,
        s_sb,
        s_sh,
        s_sg,
        s_sd,
        s_zb,
        s_zh,
        s_zg,
        s_zd,
        s_ob,
        s_oh,
        s_ot,
        s_od,
        G: tl.constexpr,
        BITS: tl.constexpr,
        PER: tl.constexpr,  # codes per byte, 8 // BITS
        BLOCK_G: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        MASK = (1 << BITS) - 1
        pid = tl.program_id(0)  # grp * n_dblk + dblk
        grp = (pid // n_dblk).to(tl.int64)
        dblk = pid % n_dblk
        pid_bh = tl.program_id(1)
        b = (pid_bh // H).to(tl.int64)
        h = (pid_bh % H).to(tl.int64)

        t = tl.arange(0, BLOCK_G)  # token within the group
        d = dblk * BLOCK_D + tl.arange(0, BLOCK_D)
        mt = t < G
        md = d < D
        m = mt[:, None] & md[None, :]  # (BLOCK_G, BLOCK_D)

        c_base = codes_ptr + b * s_cb + h * s_ch + grp * s_cg
        byte = tl.load(c_base + d[None, :] * s_cd + (t // PER)[:, None] * s_cj, mask=m, other=0).to(tl.int32)
        code = (byte >> ((t % PER) * BITS)[:, None]) & MASK  # (BLOCK_G, BLOCK_D)

        sc = tl.load(scale_ptr + b * s_sb + h * s_sh + grp * s_sg + d * s_sd, mask=md, other=0.0).to(tl.float32)
        zr = tl.load(zero_ptr + b * s_zb + h * s_zh + grp * s_zg + d * s_zd, mask=md, other=0.0).to(tl.float32)
        x = code.to(tl.float32) * sc[None, :] + zr[None, :]

        o_base = out_ptr + b * s_ob + h * s_oh + grp * G * s_ot
        tl.store(o_base + t[:, None] * s_ot + d[None, :] * s_od, x.to(out_ptr.dtype.element_ty), mask=m)

    @triton.jit
    def _dq_values_kernel(
        codes_ptr,  # (B, H, T, D*BITS/8) uint8
        scale_ptr,  # (B, H, T, D//G)
        zero_ptr,  # (B, H, T, D//G)
        out_ptr,  # (B, H, T, D)
        H,
        T,
        D,
        s_cb,
        s_ch,
        s_ct,
        s_cj,
        s_sb,
        s_sh,
        s_st,
        s_sj,
        s_zb,
        s_zh,
        s_zt,
        s_zj,
        s_ob,
        s_oh,
        s_ot,
        s_od,
        G: tl.constexpr,
        BITS: tl.constexpr,
        PER: tl.constexpr,  # codes per byte, 8 // BITS
        BLOCK_T: tl.constexpr,
        BLOCK_D: tl.constexpr,
        SPLIT: tl.constexpr,
    ):
        MASK = (1 << BITS) - 1
        pid_t = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = (pid_bh // H).to(tl.int64)
        h = (pid_bh % H).to(tl.int64)

        t = (pid_t * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
        d = tl.arange(0, BLOCK_D)
        m = (t < T)[:, None] & (d < D)[None, :]  # (BLOCK_T, BLOCK_D)

        if SPLIT:  # G is a power of two: load whole bytes and one scale/zero per group, unpack by reshape
            jb = tl.arange(0, BLOCK_D // PER)
            mb = (t < T)[:, None] & (jb < D // PER)[None, :]
            c_ptr = codes_ptr + b * s_cb + h * s_ch + t[:, None] * s_ct + jb[None, :] * s_cj
            byte = tl.load(c_ptr, mask=mb, other=0).to(tl.int32)  # (BLOCK_T, NB)
            if BITS == 8:
                code = byte
            else:
                sh = tl.arange(0, PER) * BITS
                code = tl.reshape((byte[:, :, None] >> sh[None, None, :]) & MASK, (BLOCK_T, BLOCK_D))
            jg = tl.arange(0, BLOCK_D // G)
            mg = (t < T)[:, None] & (jg < D // G)[None, :]
            sc = tl.load(scale_ptr + b * s_sb + h * s_sh + t[:, None] * s_st + jg[None, :] * s_sj, mask=mg, other=0.0)
            zr = tl.load(zero_ptr + b * s_zb + h * s_zh + t[:, None] * s_zt + jg[None, :] * s_zj, mask=mg, other=0.0)
            x = tl.reshape(code.to(tl.float32), (BLOCK_T, BLOCK_D // G, G))
            x = x * sc.to(tl.float32)[:, :, None] + zr.to(tl.float32)[:, :, None]
            x = tl.reshape(x, (BLOCK_T, BLOCK_D))
        else:  # generic: gather the byte and the scale/zero of every element
            c_ptr = codes_ptr + b * s_cb + h * s_ch + t[:, None] * s_ct + (d // PER)[None, :] * s_cj
            byte = tl.load(c_ptr, mask=m, other=0).to(tl.int32)
            code = (byte >> ((d % PER) * BITS)[None, :]) & MASK
            j = (d // G)[None, :]  # group index of each channel
            sc = tl.load(scale_ptr + b * s_sb + h * s_sh + t[:, None] * s_st + j * s_sj, mask=m, other=0.0)
            zr = tl.load(zero_ptr + b * s_zb + h * s_zh + t[:, None] * s_zt + j * s_zj, mask=m, other=0.0)
            x = code.to(tl.float32) * sc.to(tl.float32) + zr.to(tl.float32)

        o_ptr = out_ptr + b * s_ob + h * s_oh + t[:, None] * s_ot + d[None, :] * s_od
        tl.store(o_ptr, x.to(out_ptr.dtype.element_ty), mask=m)


def _check_out(q, out: Tensor) -> None:
    if tuple(out.shape) != tuple(q.shape):
        raise ValueError(f"out shape {tuple(out.shape)} != logical shape {tuple(q.shape)}")
    if out.device != q.codes.device or not out.is_cuda:
        raise ValueError(f"Triton dequant needs q and out on the same CUDA device ({q.codes.device}, {out.device})")


def dequantize_keys_into(q, spec, out: Tensor) -> Tensor:
    """Dequantize a key ``QTensor`` (checked against its ``QuantSpec`` by ``quant.dequantize_keys_into``, which
    calls this) into out (B, H, T, D) on CUDA, any float dtype and strides. Returns out."""
    if not HAS_TRITON:
        raise RuntimeError("triton is not installed; use mspeckv.kv.quant.dequantize_keys_into")
    _check_out(q, out)
    B, H, T, D = q.shape
    g = spec.group_size
    NG = T // g
    if NG == 0 or B * H == 0 or D == 0:
        return out
    BLOCK_G = triton.next_power_of_2(g)
    BLOCK_D = min(triton.next_power_of_2(D), max(16, 8192 // BLOCK_G))
    n_dblk = triton.cdiv(D, BLOCK_D)
    c, s, z = q.codes, q.scale, q.zero
    _dq_keys_kernel[(NG * n_dblk, B * H)](
        c, s, z, out, H, D, n_dblk,
        *c.stride(), *s.stride(), *z.stride(), *out.stride(),
        G=g, BITS=spec.bits, PER=spec.per_byte, BLOCK_G=BLOCK_G, BLOCK_D=BLOCK_D, num_warps=4,
    )  # fmt: skip
    return out


def dequantize_values_into(q, spec, out: Tensor) -> Tensor:
    """Dequantize a value ``QTensor`` (checked by ``quant.dequantize_values_into``, which calls this) into out
    (B, H, T, D) on CUDA, any float dtype and strides. Returns out."""
    if not HAS_TRITON:
        raise RuntimeError("triton is not installed; use mspeckv.kv.quant.dequantize_values_into")
    _check_out(q, out)
    B, H, T, D = q.shape
    if T == 0 or B * H == 0 or D == 0:
        return out
    g = spec.group_size
    split = g & (g - 1) == 0  # power-of-two groups: vector loads + reshape unpack (~2.5 TB/s on H100 vs ~1.5)
    BLOCK_D = triton.next_power_of_2(D)
    BLOCK_T = max(1, 4096 // BLOCK_D) if split else 16
    c, s, z = q.codes, q.scale, q.zero
    _dq_values_kernel[(triton.cdiv(T, BLOCK_T), B * H)](
        c, s, z, out, H, T, D,
        *c.stride(), *s.stride(), *z.stride(), *out.stride(),
        G=g, BITS=spec.bits, PER=spec.per_byte, BLOCK_T=BLOCK_T, BLOCK_D=BLOCK_D, SPLIT=split, num_warps=4,
    )  # fmt: skip
    return out
