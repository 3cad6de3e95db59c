"""KIVI-style asymmetric low-bit quantization of KV chunks (pure functions, no state).

Keys are quantized per channel: each channel's group of `group_size` consecutive tokens shares one
(scale, zero). Values are quantized per token: each token's group of `group_size` consecutive channels
shares one (scale, zero). Codes are packed into uint8 (int4: 2 codes/byte, int2: 4 codes/byte, low bits
first), scales and zero points are stored in `spec.scale_dtype` (fp16 by default).

Rounding (per group, computed in fp32):
    zero  = min(x)            rounded DOWN to scale_dtype   (so every x >= zero)
    scale = (max(x)-zero)/L   rounded UP to scale_dtype     (so every x <= zero + L*scale), L = 2**bits - 1
    scale = 1 where it would be 0 (constant group; its codes are all 0 and it round-trips exactly)
    code  = clamp(round((x - zero) / scale), 0, L)
    x_hat = code * scale + zero                             (fp32, then cast to the output dtype)
Because zero/scale are rounded *outward* before the codes are computed, |x_hat - x| <= scale/2 holds
with the STORED scale (up to fp32 arithmetic and the final cast). Inputs must lie inside the
scale_dtype's finite range (|x| < 65504 for fp16; use scale_dtype=torch.bfloat16 otherwise).
Quantizing on CPU or on CUDA gives bit-identical codes/scales/zeros; dequantize uses Triton on CUDA
(mspeckv.kv.quant_triton; MSPECKV_NO_TRITON=1 forces the torch path) and torch elsewhere.

Storage layouts (every field has the token axis at dim 2, so a store can be preallocated for T_max tokens,
appended to by whole groups and its valid prefix sliced with `qt_slice`):
    keys   codes (B, H, T//g, D, g*bits/8)  uint8, packed along the tokens of a group
           scale (B, H, T//g, D)            zero likewise                -> dim 2 counts GROUPS of g tokens
    values codes (B, H, T, D*bits/8)        uint8, packed along channels
           scale (B, H, T, D//g)            zero likewise                -> dim 2 counts TOKENS
`qt_slice`/`qt_copy_` take token offsets for both kinds and do the unit conversion.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

BITS: dict[str, int] = {"int8": 8, "int4": 4, "int2": 2}
_SCALE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Bound on ||x_hat - x|| / ||x|| for standard gaussian data, group_size <= 128 (measurements in error_bound).
_ERROR_BOUND: dict[str, float] = {"int8": 0.01, "int4": 0.15, "int2": 0.6}

Kind = Literal["k", "v"]


def _fmt_list() -> str:
    return ", ".join(repr(f) for f in BITS)


@dataclass(frozen=True)
class QuantSpec:
    fmt: str
    group_size: int = 64
    scale_dtype: torch.dtype = torch.float16

    def __post_init__(self) -> None:
        if self.fmt not in BITS:
            raise ValueError(f"unknown KV quant format {self.fmt!r}; expected one of {_fmt_list()}")
        if not isinstance(self.group_size, int) or self.group_size <= 0:
            raise ValueError(f"kv_group_size must be a positive int, got {self.group_size!r}")
        if self.group_size % self.per_byte:
            raise ValueError(
                f"kv_group_size {self.group_size} must be a multiple of {self.per_byte} for {self.fmt} "
                f"({self.per_byte} codes are packed per byte)"
            )
        if self.scale_dtype not in _SCALE_DTYPES:
            raise ValueError(f"scale_dtype must be one of {_SCALE_DTYPES}, got {self.scale_dtype}")

    @property
    def bits(self) -> int:
        return BITS[self.fmt]

    @property
    def per_byte(self) -> int:  # codes per uint8
        return 8 // BITS[self.fmt]

    @property
    def qmax(self) -> int:  # L = 2**bits - 1
        return (1 << BITS[self.fmt]) - 1

    def bytes_per_element(self) -> float:
        """Stored bytes per K or V element, scale and zero included (int8 g64 fp16 -> 1 + 4/64)."""
        s = torch.finfo(self.scale_dtype).bits // 8
        return self.bits / 8 + 2 * s / self.group_size

    def check_head_dim(self, head_dim: int) -> None:
        """Values group along channels: group_size must divide head_dim."""
        if head_dim % self.group_size:
            cands = [d for d in (8, 16, 32, 64, 128, 256, 512) if d <= head_dim and head_dim % d == 0]
            cands = [d for d in cands if d % self.per_byte == 0][-3:] or [head_dim]
            sugg = cands[0] if len(cands) == 1 else ", ".join(map(str, cands[:-1])) + f" or {cands[-1]}"
            raise ValueError(
                f"kv_group_size {self.group_size} does not divide head_dim {head_dim}; use a divisor such as {sugg}"
            )


@dataclass
class QTensor:
    """One quantized K or V chunk (or a preallocated store / a slice of one). See module doc for layouts."""

    codes: Tensor  # uint8, packed along the last dim
    scale: Tensor
    zero: Tensor
    shape: tuple[int, ...]  # logical (B, H, T, D)

    @property
    def is_key(self) -> bool:  # key codes are 5-D (B, H, T//g, D, g*bits/8), value codes 4-D
        return self.codes.dim() == 5

    @property
    def kind(self) -> Kind:
        return "k" if self.is_key else "v"

    @property
    def device(self) -> torch.device:
        return self.codes.device

    @property
    def group_size(self) -> int:
        """Tokens per group of a key QTensor (shape[2] tokens live in codes.shape[2] groups)."""
        if not self.is_key:
            raise ValueError("group_size is only recorded in key QTensors; use the QuantSpec")
        if self.codes.shape[2] == 0:
            raise ValueError("cannot infer the group size of an empty key QTensor")
        return self.shape[2] // self.codes.shape[2]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scale, self.zero))


def error_bound(fmt: str) -> float:
    """Documented bound on ||x_hat - x|| / ||x|| for standard gaussian data, valid for group_size <= 128 and
    fp16 or bf16 scales (it grows slowly with the group size).

    Measured (B=2, H=8, T=512, D=128, gaussian, fp32 out; keys and values agree to 3 digits):
        g=32: int8 0.0046  int4 0.078  int2 0.39
        g=64: int8 0.0053  int4 0.090  int2 0.45
        g=128: int8 0.0059 int4 0.100  int2 0.50
    """
    if fmt not in _ERROR_BOUND:
        raise ValueError(f"unknown KV quant format {fmt!r}; expected one of {_fmt_list()}")
    return _ERROR_BOUND[fmt]


# ---------------------------------------------------------------------------------------------------------
# packing (along the last dim; element j of a byte sits in bits [j*bits, (j+1)*bits))


def pack_codes(codes: Tensor, bits: int) -> Tensor:
    """(..., n) uint8 codes < 2**bits -> (..., n*bits/8) uint8."""
    if bits == 8:
        return codes.to(torch.uint8)
    per = 8 // bits
    c = codes.to(torch.uint8).unflatten(-1, (-1, per))  # (..., n/per, per)
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=codes.device)  # (per,)
    return (c << shifts).sum(-1, dtype=torch.uint8)  # disjoint bit ranges: sum == bitwise or


def unpack_codes(packed: Tensor, bits: int) -> Tensor:
    """(..., m) uint8 -> (..., m*8/bits) uint8 codes."""
    if bits == 8:
        return packed
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)  # (per,)
    c = (packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)  # (..., m, per)
    return c.flatten(-2)


# ---------------------------------------------------------------------------------------------------------
# quantize / dequantize (torch reference; dequantize dispatches to Triton on CUDA)


def _round_down(x: Tensor, dtype: torch.dtype) -> Tensor:
    """fp32 -> dtype, rounding toward -inf (largest representable value <= x)."""
    y = x.to(dtype)
    if dtype == torch.float32:
        return y
    return torch.where(y.float() > x, torch.nextafter(y, torch.full_like(y, -float("inf"))), y)


def _round_up(x: Tensor, dtype: torch.dtype) -> Tensor:
    y = x.to(dtype)
    if dtype == torch.float32:
        return y
    return torch.where(y.float() < x, torch.nextafter(y, torch.full_like(y, float("inf"))), y)


def _quantize_groups(x: Tensor, spec: QuantSpec) -> tuple[Tensor, Tensor, Tensor]:
    """x: (..., g) fp32 (or fp64) -> codes (..., g) uint8, scale (...), zero (...) in spec.scale_dtype."""
    L = spec.qmax
    zero = _round_down(x.amin(-1), spec.scale_dtype)  # (...)
    zf = zero.float()
    # multiply by an fp32 1/L rather than divide: CUDA turns division by a scalar into that multiply anyway,
    # so CPU and GPU give bit-identical scales (and codes)
    scale = _round_up((x.amax(-1) - zf) * (1.0 / L), spec.scale_dtype)
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)  # constant group -> codes 0, exact
    codes = ((x - zf.unsqueeze(-1)) / scale.float().unsqueeze(-1)).round_().clamp_(0, L).to(torch.uint8)
    return codes, scale, zero


def _wide(x: Tensor) -> Tensor:
    """The dtype codes are computed in: fp32, or fp64 for fp64 input (rounding fp64 to fp32 first would put the
    codes of two inputs that differ only in fp64 rounding on either side of an fp32 grid point)."""
    return x.double() if x.dtype == torch.float64 else x.float()


def quantize_keys(k: Tensor, spec: QuantSpec) -> QTensor:
    """k: (B, H, T, D) with T % group_size == 0 -> per-channel groups of group_size tokens."""
    B, H, T, D = k.shape
    g = spec.group_size
    if T % g:
        raise ValueError(f"quantize_keys needs whole groups: T={T} is not a multiple of kv_group_size {g}")
    x = _wide(k).view(B, H, T // g, g, D).transpose(-1, -2)  # (B, H, NG, D, g)
    codes, scale, zero = _quantize_groups(x, spec)  # (B, H, NG, D, g), (B, H, NG, D) x2
    return QTensor(pack_codes(codes, spec.bits), scale, zero, (B, H, T, D))


def quantize_values(v: Tensor, spec: QuantSpec) -> QTensor:
    """v: (B, H, T, D) -> per-token groups of group_size channels (group_size must divide D)."""
    B, H, T, D = v.shape
    spec.check_head_dim(D)
    g = spec.group_size
    x = _wide(v).view(B, H, T, D // g, g)
    codes, scale, zero = _quantize_groups(x, spec)  # (B, H, T, D//g, g), (B, H, T, D//g) x2
    return QTensor(pack_codes(codes.view(B, H, T, D), spec.bits), scale, zero, (B, H, T, D))


def _check(q: QTensor, spec: QuantSpec, is_key: bool) -> None:
    name = "keys" if is_key else "values"
    if q.is_key != is_key:
        raise ValueError(f"dequantize_{name} got a {'key' if q.is_key else 'value'} QTensor")
    B, H, T, D = q.shape
    if q.scale.dtype != spec.scale_dtype:
        raise ValueError(f"QTensor scale dtype {q.scale.dtype} != spec.scale_dtype {spec.scale_dtype}")
    g = spec.group_size
    if is_key:
        want = (B, H, T // g, D, g * spec.bits // 8), (B, H, T // g, D)
    else:
        want = (B, H, T, D * spec.bits // 8), (B, H, T, D // g)
    got = tuple(q.codes.shape), tuple(q.scale.shape)
    if got != want or (is_key and T % g) or q.zero.shape != q.scale.shape:
        raise ValueError(f"QTensor (codes, scale) shapes {got} for logical {q.shape} do not match {spec}")


def dequantize_keys_torch(q: QTensor, spec: QuantSpec, dtype: torch.dtype) -> Tensor:
    B, H, T, D = q.shape
    c = unpack_codes(q.codes, spec.bits)  # (B, H, NG, D, g)
    x = c.float() * q.scale.float().unsqueeze(-1) + q.zero.float().unsqueeze(-1)
    return x.to(dtype).transpose(-1, -2).reshape(B, H, T, D)


def dequantize_values_torch(q: QTensor, spec: QuantSpec, dtype: torch.dtype) -> Tensor:
    B, H, T, D = q.shape
    g = spec.group_size
    c = unpack_codes(q.codes, spec.bits).view(B, H, T, D // g, g)
    x = c.float() * q.scale.float().unsqueeze(-1) + q.zero.float().unsqueeze(-1)
    return x.to(dtype).view(B, H, T, D)


def _use_triton(q: QTensor) -> bool:
    if not q.codes.is_cuda or os.environ.get("MSPECKV_NO_TRITON", "0") == "1":
        return False
    from .triton_flag import HAS_TRITON

    return HAS_TRITON


def dequantize_keys_into(q: QTensor, spec: QuantSpec, out: Tensor) -> Tensor:
    """Write dequantized keys into a preallocated (B, H, T, D) tensor (any strides, e.g. a prefix view)."""
    _check(q, spec, True)
    if _use_triton(q):
        from .quant_triton import dequantize_keys_into as tri

        return tri(q, spec, out)
    return out.copy_(dequantize_keys_torch(q, spec, out.dtype))


def dequantize_values_into(q: QTensor, spec: QuantSpec, out: Tensor) -> Tensor:
    _check(q, spec, False)
    if _use_triton(q):
        from .quant_triton import dequantize_values_into as tri

        return tri(q, spec, out)
    return out.copy_(dequantize_values_torch(q, spec, out.dtype))


def dequantize_keys(q: QTensor, spec: QuantSpec, dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """-> (B, H, T, D) in dtype. Triton on CUDA when available, torch otherwise."""
    _check(q, spec, True)
    if _use_triton(q):
        return dequantize_keys_into(q, spec, torch.empty(q.shape, dtype=dtype, device=q.device))
    return dequantize_keys_torch(q, spec, dtype)


def dequantize_values(q: QTensor, spec: QuantSpec, dtype: torch.dtype = torch.bfloat16) -> Tensor:
    _check(q, spec, False)
    if _use_triton(q):
        return dequantize_values_into(q, spec, torch.empty(q.shape, dtype=dtype, device=q.device))
    return dequantize_values_torch(q, spec, dtype)


# ---------------------------------------------------------------------------------------------------------
# preallocated stores: empty / slice / copy (token offsets; keys must be group-aligned)


def empty_like_store(
    spec: QuantSpec,
    B: int,
    H: int,
    T_max: int,
    D: int,
    device: torch.device | str,
    pin: bool = False,
    *,
    kind: Kind,
) -> QTensor:
    """Uninitialized store for up to T_max tokens. kind='k' rounds T_max up to a multiple of group_size.

    pin=True allocates page-locked host memory (device must be cpu) so that copies to the GPU can be async.
    """
    g, bits, sdt = spec.group_size, spec.bits, spec.scale_dtype
    kw = dict(device=device, pin_memory=pin)
    if kind == "k":
        NG = -(-T_max // g)
        codes = torch.empty((B, H, NG, D, g * bits // 8), dtype=torch.uint8, **kw)
        scale = torch.empty((B, H, NG, D), dtype=sdt, **kw)
        zero = torch.empty((B, H, NG, D), dtype=sdt, **kw)
        return QTensor(codes, scale, zero, (B, H, NG * g, D))
    if kind == "v":
        spec.check_head_dim(D)
        codes = torch.empty((B, H, T_max, D * bits // 8), dtype=torch.uint8, **kw)
        scale = torch.empty((B, H, T_max, D // g), dtype=sdt, **kw)
        zero = torch.empty((B, H, T_max, D // g), dtype=sdt, **kw)
        return QTensor(codes, scale, zero, (B, H, T_max, D))
    raise ValueError(f"kind must be 'k' or 'v', got {kind!r}")


def _row_units(q: QTensor, t: int, what: str) -> int:
    """Token offset -> index along dim 2 of q's fields."""
    if not q.is_key:
        return t
    g = q.group_size
    if t % g:
        raise ValueError(f"key {what}={t} is not a multiple of the group size {g}")
    return t // g


def qt_slice(q: QTensor, t0: int, t1: int) -> QTensor:
    """Tokens [t0, t1) as views (no copy). For keys t0 and t1 must be multiples of the group size."""
    B, H, T, D = q.shape
    if not 0 <= t0 <= t1 <= T:
        raise ValueError(f"qt_slice [{t0}, {t1}) out of range for T={T}")
    r0, r1 = _row_units(q, t0, "t0"), _row_units(q, t1, "t1")
    return QTensor(q.codes[:, :, r0:r1], q.scale[:, :, r0:r1], q.zero[:, :, r0:r1], (B, H, t1 - t0, D))


def _copy_field(dst: Tensor, src: Tensor, non_blocking: bool) -> None:
    host = src if src.device.type == "cpu" else dst
    if src.device != dst.device and not host.is_contiguous():
        # torch stages a cross-device copy whose host side is non-contiguous through a fresh, unpinned host
        # buffer, which makes it synchronous; the (b, h) rows of a dim-2 slice are contiguous: copy row by row.
        for b in range(src.shape[0]):
            for h in range(src.shape[1]):
                dst[b, h].copy_(src[b, h], non_blocking=non_blocking)
        return
    dst.copy_(src, non_blocking=non_blocking)


def qt_copy_(dst: QTensor, src: QTensor, t0: int, non_blocking: bool = False) -> QTensor:
    """Write src into dst at token offset t0 (keys: group-aligned). Works across devices; returns dst."""
    if dst.is_key != src.is_key:
        raise ValueError("qt_copy_ between a key and a value QTensor")
    B, H, T, D = dst.shape
    Bs, Hs, Ts, Ds = src.shape
    if (B, H, D) != (Bs, Hs, Ds) or t0 < 0 or t0 + Ts > T:
        raise ValueError(f"qt_copy_: src {src.shape} does not fit dst {dst.shape} at t0={t0}")
    if dst.codes.shape[3:] != src.codes.shape[3:] or dst.scale.shape[3:] != src.scale.shape[3:]:
        raise ValueError(
            f"qt_copy_: field shapes differ (format/group mismatch): {dst.codes.shape} vs {src.codes.shape}"
        )
    if dst.scale.dtype != src.scale.dtype:
        raise ValueError(f"qt_copy_: scale dtype {src.scale.dtype} != {dst.scale.dtype}")
    if dst.is_key and src.codes.shape[2] and src.group_size != dst.group_size:
        raise ValueError(f"qt_copy_: key group size {src.group_size} != {dst.group_size}")
    r0 = _row_units(dst, t0, "t0")
    n = src.codes.shape[2]
    for d, s in ((dst.codes, src.codes), (dst.scale, src.scale), (dst.zero, src.zero)):
        _copy_field(d[:, :, r0 : r0 + n], s, non_blocking)
    return dst


def qt_to(q: QTensor, device: torch.device | str, non_blocking: bool = False) -> QTensor:
    """Copy to another device into fresh contiguous tensors (pinned-friendly for slices of a pinned store)."""
    f = lambda t: torch.empty(t.shape, dtype=t.dtype, device=device)
    out = QTensor(f(q.codes), f(q.scale), f(q.zero), q.shape)
    for d, s in ((out.codes, q.codes), (out.scale, q.scale), (out.zero, q.zero)):
        _copy_field(d, s, non_blocking)
    return out


# ---------------------------------------------------------------------------------------------------------
# GPU self-check of the Triton kernels (quant_triton): kernel vs torch reference on data with outliers, plus timings


def _test_data(B: int, H: int, T: int, D: int, kind: str, gen: torch.Generator) -> Tensor:
    x = torch.randn(B, H, T, D, generator=gen, device="cuda")
    if kind == "k":  # a few outlier channels, the reason keys are quantized per channel
        ch = torch.randperm(D, generator=gen, device="cuda")[: max(1, D // 32)]
        x[..., ch] *= 50.0
    else:  # a few outlier tokens
        tok = torch.randperm(T, generator=gen, device="cuda")[: max(1, T // 64)]
        x[:, :, tok] *= 20.0
    return x.to(torch.bfloat16)


def _case(
    kind: str, spec: QuantSpec, H: int, T: int, D: int, strided: bool, out_dtype: torch.dtype, bench: bool
) -> dict:
    from .quant_triton import dequantize_keys_into, dequantize_values_into
    from .triton_flag import triton

    B = 1
    gen = torch.Generator(device="cuda").manual_seed(1000 * H + T + D)
    qfn = quantize_keys if kind == "k" else quantize_values
    ref_fn = dequantize_keys_torch if kind == "k" else dequantize_values_torch
    tri_fn = dequantize_keys_into if kind == "k" else dequantize_values_into
    x = _test_data(B, H, T, D, kind, gen)
    q = qfn(x, spec)
    if strided:  # q: prefix slice of a 2T store; out: prefix view of a 2T buffer (NaN past the prefix)
        store = empty_like_store(spec, B, H, 2 * T, D, "cuda", kind=kind)
        q = qt_slice(qt_copy_(store, q, 0), 0, T)
        big = torch.full((B, H, 2 * T, D), float("nan"), dtype=out_dtype, device="cuda")
        out = big[:, :, :T]
    else:
        out = torch.empty((B, H, T, D), dtype=out_dtype, device="cuda")
    ref = ref_fn(q, spec, out_dtype)
    tri_fn(q, spec, out)
    diff = (out.float() - ref.float()).abs()
    tol = 2.0**-7 * ref.float().abs() + 1e-6 * ref.float().abs().max()
    ok = bool((diff <= tol).all()) and not bool(out.isnan().any())
    if strided:
        ok = ok and bool(big[:, :, T:].isnan().all())  # nothing written past the prefix
    xf = x.float()
    row = dict(kind=kind, fmt=spec.fmt, H=H, T=T, D=D, strided=strided, ok=ok)
    row.update(exact=float((out == ref).float().mean()), max_abs_diff=float(diff.max()))
    row.update(rel_err=float((out.float() - xf).norm() / xf.norm()))
    if bench:
        t_tri = triton.testing.do_bench(lambda: tri_fn(q, spec, out), return_mode="median")
        t_ref = triton.testing.do_bench(lambda: ref_fn(q, spec, out_dtype), return_mode="median")
        nbytes = q.nbytes() + out.numel() * out.element_size()
        row.update(triton_us=1e3 * t_tri, torch_us=1e3 * t_ref, speedup=t_ref / t_tri)
        row.update(triton_GBps=nbytes / (t_tri * 1e-3) / 1e9)
    return row


def selfcheck(
    fmts: tuple[str, ...] = tuple(BITS),
    Hs: tuple[int, ...] = (8, 32),
    Ts: tuple[int, ...] = (64, 512, 2048, 8192),
    Ds: tuple[int, ...] = (64, 128),
    group_size: int = 64,
    out_dtype: torch.dtype = torch.bfloat16,
    bench: bool = True,
    verbose: bool = True,
) -> list[dict]:
    """Compare the Triton kernels with the torch reference on CUDA (B=1) and time both (do_bench median).

    Rows: kind, fmt, H, T, D, strided, ok, exact (fraction of bit-identical outputs), max_abs_diff, rel_err
    (round trip vs the bf16 input, which has outliers), and when bench: triton_us, torch_us, speedup,
    triton_GBps (bytes read + written per second). The first case per (kind, fmt) uses strided operands: the
    QTensor is a prefix slice of a twice-as-long store and out a prefix view of a twice-as-long buffer.
    """
    from .triton_flag import HAS_TRITON

    if not (HAS_TRITON and torch.cuda.is_available()):
        raise RuntimeError("selfcheck needs CUDA and triton")
    rows: list[dict] = []
    for kind in ("k", "v"):
        for fmt in fmts:
            spec = QuantSpec(fmt, group_size)
            cases = [(H, D, T) for H in Hs for D in Ds for T in Ts]
            for i, (H, D, T) in enumerate(cases):
                row = _case(kind, spec, H, T, D, i == 0, out_dtype, bench)
                rows.append(row)
                if verbose:
                    print({k: round(v, 5) if isinstance(v, float) else v for k, v in row.items()}, flush=True)
    return rows
