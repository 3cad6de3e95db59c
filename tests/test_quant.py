"""KIVI-style KV quantization: round-trip error, per-group bound, packing, store slice/copy, errors."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mspeckv.kv.quant import (
    BITS,
    QTensor,
    QuantSpec,
    dequantize_keys,
    dequantize_keys_into,
    dequantize_values,
    dequantize_values_into,
    empty_like_store,
    error_bound,
    pack_codes,
    qt_copy_,
    qt_slice,
    qt_to,
    quantize_keys,
    quantize_values,
    unpack_codes,
)

FMTS = list(BITS)
QUANT = {"k": quantize_keys, "v": quantize_values}
DEQUANT = {"k": dequantize_keys, "v": dequantize_values}


def rel_err(xh: torch.Tensor, x: torch.Tensor) -> float:
    return float((xh.float() - x.float()).norm() / x.float().norm())


def group_view(t: torch.Tensor, kind: str, g: int) -> torch.Tensor:
    """(B, H, T, D) -> (B, H, n_groups..., g) with the quantization group last."""
    B, H, T, D = t.shape
    if kind == "k":
        return t.reshape(B, H, T // g, g, D).transpose(-1, -2)  # (B, H, NG, D, g)
    return t.reshape(B, H, T, D // g, g)  # (B, H, T, D//g, g)


# ---------------------------------------------------------------------------------------------------------
# round-trip error on gaussian data


@pytest.mark.parametrize("kind", ["k", "v"])
@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("g", [32, 64, 128])
@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.bfloat16])
def test_roundtrip_gaussian(kind: str, fmt: str, g: int, scale_dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    spec = QuantSpec(fmt, g, scale_dtype)
    x = torch.randn(2, 4, 256, 128)
    q = QUANT[kind](x, spec)
    assert q.codes.dtype == torch.uint8 and q.scale.dtype == scale_dtype and q.zero.dtype == scale_dtype
    assert q.shape == (2, 4, 256, 128) and q.kind == kind
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        xh = DEQUANT[kind](q, spec, dtype)
        assert xh.shape == x.shape and xh.dtype == dtype
        assert rel_err(xh, x) <= error_bound(fmt)


def test_error_ordering_and_bf16_input() -> None:
    torch.manual_seed(1)
    x = torch.randn(1, 8, 512, 64, dtype=torch.bfloat16)
    errs = [rel_err(dequantize_keys(quantize_keys(x, QuantSpec(f)), QuantSpec(f), torch.float32), x) for f in FMTS]
    assert errs[0] < errs[1] < errs[2]  # int8 < int4 < int2
    assert errs[0] < 0.01


@pytest.mark.parametrize("fmt", ["int4", "int2"])
def test_keys_per_channel_handles_outlier_channels(fmt: str) -> None:
    """Outlier channels inflate per-token scales; per-channel key groups keep the normal channels accurate."""
    torch.manual_seed(2)
    spec = QuantSpec(fmt)
    x = torch.randn(1, 4, 256, 128)
    out_ch = torch.tensor([3, 40, 77, 100])
    x[..., out_ch] *= 50.0
    normal = torch.ones(128, dtype=torch.bool)
    normal[out_ch] = False
    per_channel = dequantize_keys(quantize_keys(x, spec), spec, torch.float32)
    per_token = dequantize_values(quantize_values(x, spec), spec, torch.float32)
    e_ch = rel_err(per_channel[..., normal], x[..., normal])
    e_tok = rel_err(per_token[..., normal], x[..., normal])
    assert e_ch <= error_bound(fmt)
    assert e_ch < 0.14 * e_tok  # measured ratio 0.056 (int4), 0.069 (int2)


# ---------------------------------------------------------------------------------------------------------
# property test: per-element bound, constant groups, sizes


@st.composite
def cases(draw: st.DrawFn) -> tuple:
    kind = draw(st.sampled_from(["k", "v"]))
    fmt = draw(st.sampled_from(FMTS))
    g = draw(st.sampled_from([4, 8, 16, 32, 64]))
    scale_dtype = draw(st.sampled_from([torch.float16, torch.bfloat16]))
    in_dtype = draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
    B, H = draw(st.integers(1, 2)), draw(st.integers(1, 3))
    if kind == "k":
        T, D = g * draw(st.integers(1, 3)), draw(st.sampled_from([4, 8, 24, 64]))
    else:
        T, D = draw(st.integers(1, 9)), g * draw(st.integers(1, 3))
    seed = draw(st.integers(0, 2**31 - 1))
    return kind, QuantSpec(fmt, g, scale_dtype), in_dtype, (B, H, T, D), seed


@settings(max_examples=150, deadline=None)
@given(cases())
def test_property_per_group_bound(case: tuple) -> None:
    kind, spec, in_dtype, shape, seed = case
    B, H, T, D = shape
    g = spec.group_size
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen) * torch.rand(1, generator=gen) * 10
    if kind == "k":  # a few channels x50: the reason keys are quantized per channel
        x[..., torch.randperm(D, generator=gen)[: max(1, D // 16)]] *= 50.0
    else:
        x[:, :, torch.randperm(T, generator=gen)[: max(1, T // 4)]] *= 50.0
    # one constant group per (b, h), value representable in every scale dtype
    xg = group_view(x, kind, g)  # view: writes go into x
    xg[:, :, 0, 0, :] = float(torch.randint(-64, 64, (1,), generator=gen)) / 8
    x = x.to(in_dtype)

    q = QUANT[kind](x, spec)
    xh = DEQUANT[kind](q, spec, torch.float32)
    assert xh.shape == x.shape

    err = group_view((xh - x.float()).abs(), kind, g)  # (..., g)
    scale = q.scale.float().unsqueeze(-1)
    zero = q.zero.float().unsqueeze(-1)
    xf = group_view(x.float(), kind, g)
    tol = scale / 2 * (1 + 1e-5) + 2.0**-20 * (zero.abs() + xf.abs())  # fp32 arithmetic slack
    assert bool((err <= tol).all()), float((err - tol).max())
    assert bool((scale > 0).all())

    # constant groups round-trip exactly
    assert bool((err[:, :, 0, 0, :] == 0).all())

    # real compression: bytes == elements * bytes_per_element, vs bf16's 2 bytes
    n = x.numel()
    assert q.nbytes() == pytest.approx(n * spec.bytes_per_element())
    assert q.nbytes() == n * (spec.bits / 8 + 2 * 2 / g)  # bits per element + a 2-byte scale and zero per group


@pytest.mark.parametrize(
    ("fmt", "ratio"), [("int8", 2 / (1 + 4 / 64)), ("int4", 2 / (0.5 + 4 / 64)), ("int2", 2 / (0.25 + 4 / 64))]
)
def test_bytes_vs_bf16(fmt: str, ratio: float) -> None:
    spec = QuantSpec(fmt)
    x = torch.randn(1, 8, 128, 128, dtype=torch.bfloat16)
    for kind in ("k", "v"):
        q = QUANT[kind](x, spec)
        assert x.numel() * x.element_size() / q.nbytes() == pytest.approx(ratio)
    assert spec.bytes_per_element() == pytest.approx(2 / ratio)
    assert QuantSpec("int8").bytes_per_element() == 1 + 4 / 64
    assert QuantSpec("int4", 128, torch.float32).bytes_per_element() == 0.5 + 8 / 128


# ---------------------------------------------------------------------------------------------------------
# packing


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_pack_unpack_exact(bits: int) -> None:
    c = torch.randint(0, 1 << bits, (3, 5, 64), dtype=torch.uint8)
    p = pack_codes(c, bits)
    assert p.dtype == torch.uint8 and p.shape == (3, 5, 64 * bits // 8)
    assert torch.equal(unpack_codes(p, bits), c)


def test_pack_bit_order() -> None:
    assert pack_codes(torch.tensor([1, 2], dtype=torch.uint8), 4).tolist() == [0x21]  # first code in low bits
    assert pack_codes(torch.tensor([0, 1, 2, 3], dtype=torch.uint8), 2).tolist() == [0b11100100]
    assert unpack_codes(torch.tensor([0xE4], dtype=torch.uint8), 2).tolist() == [0, 1, 2, 3]


def test_storage_layouts() -> None:
    x = torch.randn(2, 3, 128, 64)
    spec = QuantSpec("int2", 32)
    k = quantize_keys(x, spec)
    assert k.codes.shape == (2, 3, 4, 64, 8) and k.scale.shape == (2, 3, 4, 64) and k.zero.shape == (2, 3, 4, 64)
    assert k.is_key and k.group_size == 32
    v = quantize_values(x, spec)
    assert v.codes.shape == (2, 3, 128, 16) and v.scale.shape == (2, 3, 128, 2) and not v.is_key


# ---------------------------------------------------------------------------------------------------------
# preallocated store: empty / copy / slice


@pytest.mark.parametrize("kind", ["k", "v"])
@pytest.mark.parametrize("fmt", FMTS)
def test_store_copy_slice(kind: str, fmt: str) -> None:
    torch.manual_seed(3)
    spec = QuantSpec(fmt, 32)
    B, H, D = 1, 3, 64
    T1, T2 = (64, 32) if kind == "k" else (5, 7)
    store = empty_like_store(spec, B, H, 200, D, "cpu", kind=kind)
    assert store.shape == (B, H, 224 if kind == "k" else 200, D)  # keys round T_max up to whole groups
    x1, x2 = torch.randn(B, H, T1, D), torch.randn(B, H, T2, D) * 3
    q1, q2 = QUANT[kind](x1, spec), QUANT[kind](x2, spec)
    assert qt_copy_(store, q1, 0) is store
    qt_copy_(store, q2, T1)

    pre = qt_slice(store, 0, T1 + T2)
    assert pre.shape == (B, H, T1 + T2, D)
    assert pre.nbytes() == q1.nbytes() + q2.nbytes()
    assert pre.codes.data_ptr() == store.codes.data_ptr()  # a view, not a copy
    want = torch.cat([DEQUANT[kind](q1, spec, torch.float32), DEQUANT[kind](q2, spec, torch.float32)], dim=2)
    assert torch.equal(DEQUANT[kind](pre, spec, torch.float32), want)
    assert torch.equal(DEQUANT[kind](qt_slice(store, T1, T1 + T2), spec, torch.float32), want[:, :, T1:])

    # dequantize into a strided prefix view of a larger buffer
    big = torch.full((B, H, 300, D), float("nan"), dtype=torch.bfloat16)
    into = dequantize_keys_into if kind == "k" else dequantize_values_into
    into(pre, spec, big[:, :, : T1 + T2])
    assert torch.equal(big[:, :, : T1 + T2], want.to(torch.bfloat16))
    assert bool(big[:, :, T1 + T2 :].isnan().all())

    moved = qt_to(pre, "cpu")
    assert moved.codes.is_contiguous() and torch.equal(DEQUANT[kind](moved, spec, torch.float32), want)


def test_store_errors() -> None:
    spec = QuantSpec("int4", 32)
    ks = empty_like_store(spec, 1, 2, 128, 64, "cpu", kind="k")
    q = quantize_keys(torch.randn(1, 2, 32, 64), spec)
    with pytest.raises(ValueError, match="multiple of the group size"):
        qt_slice(ks, 0, 48)
    with pytest.raises(ValueError, match="multiple of the group size"):
        qt_copy_(ks, q, 16)
    with pytest.raises(ValueError, match="does not fit"):
        qt_copy_(ks, q, 128)
    with pytest.raises(ValueError, match="key and a value"):
        qt_copy_(empty_like_store(spec, 1, 2, 128, 64, "cpu", kind="v"), q, 0)
    with pytest.raises(ValueError, match="group size"):
        qt_copy_(ks, quantize_keys(torch.randn(1, 2, 64, 64), QuantSpec("int2", 64)), 0)
    with pytest.raises(ValueError, match="kind"):
        empty_like_store(spec, 1, 2, 128, 64, "cpu", kind="x")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="do not match"):
        dequantize_keys(q, QuantSpec("int8", 32), torch.float32)
    with pytest.raises(ValueError, match="value QTensor"):
        dequantize_keys(quantize_values(torch.randn(1, 2, 4, 64), spec), spec, torch.float32)


# ---------------------------------------------------------------------------------------------------------
# validation


def test_bad_group_size_message() -> None:
    spec = QuantSpec("int4", 48)
    msg = "kv_group_size 48 does not divide head_dim 128; use a divisor such as 32, 64 or 128"
    with pytest.raises(ValueError) as e:
        quantize_values(torch.randn(1, 1, 4, 128), spec)
    assert str(e.value) == msg
    with pytest.raises(ValueError, match="kv_group_size 48 does not divide head_dim 128"):
        spec.check_head_dim(128)
    with pytest.raises(ValueError, match="kv_group_size 48 does not divide head_dim 128"):
        empty_like_store(spec, 1, 1, 16, 128, "cpu", kind="v")
    with pytest.raises(ValueError, match="not a multiple of kv_group_size 64"):
        quantize_keys(torch.randn(1, 1, 100, 128), QuantSpec("int8"))
    with pytest.raises(ValueError, match="multiple of 4"):
        QuantSpec("int2", 6)
    with pytest.raises(ValueError):
        QuantSpec("int8", 0)


def test_unknown_format() -> None:
    for bad in ("fp8", "int3", "none"):
        with pytest.raises(ValueError) as e:
            QuantSpec(bad)
        for f in ("'int8'", "'int4'", "'int2'"):
            assert f in str(e.value)
    with pytest.raises(ValueError, match="'int8', 'int4', 'int2'"):
        error_bound("fp8")
    with pytest.raises(ValueError, match="scale_dtype"):
        QuantSpec("int8", 64, torch.int8)


def test_qtensor_is_plain_dataclass() -> None:
    q = quantize_values(torch.randn(1, 1, 2, 64), QuantSpec("int8"))
    r = QTensor(q.codes, q.scale, q.zero, q.shape)
    spec = QuantSpec("int8")
    assert torch.equal(dequantize_values(r, spec, torch.float32), dequantize_values(q, spec, torch.float32))


# ---------------------------------------------------------------------------------------------------------
# CUDA only: Triton kernel vs torch reference, pinned store -> GPU copy


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind", ["k", "v"])
@pytest.mark.parametrize("fmt", FMTS)
def test_cuda_triton_matches_torch_and_pinned_store(kind: str, fmt: str) -> None:
    from mspeckv.kv import quant_triton
    from mspeckv.kv.quant import dequantize_keys_torch, dequantize_values_torch

    assert quant_triton.HAS_TRITON
    spec = QuantSpec(fmt)
    torch.manual_seed(4)
    x = torch.randn(1, 8, 512, 128, device="cuda", dtype=torch.bfloat16)
    q = QUANT[kind](x, spec)
    ref = (dequantize_keys_torch if kind == "k" else dequantize_values_torch)(q, spec, torch.bfloat16)
    tri = DEQUANT[kind](q, spec, torch.bfloat16)
    assert (tri.float() - ref.float()).abs().le(2.0**-7 * ref.float().abs() + 1e-6).all()
    assert rel_err(tri, x) <= error_bound(fmt)

    # CPU quantization == GPU quantization (same codes, scales, zeros)
    qc = QUANT[kind](x.cpu(), spec)
    for name, a, b in (("codes", q.codes, qc.codes), ("scale", q.scale, qc.scale), ("zero", q.zero, qc.zero)):
        assert torch.equal(a.cpu(), b), (name, int((a.cpu() != b).sum()), a.numel())

    # pinned store, prefix slice (non-contiguous across heads) -> GPU, then dequantize
    store = empty_like_store(spec, 1, 8, 1024, 128, "cpu", pin=True, kind=kind)
    qt_copy_(store, q, 0, non_blocking=True)  # GPU -> pinned host at offset 0
    torch.cuda.synchronize()
    gpu = qt_to(qt_slice(store, 0, 512), "cuda", non_blocking=True)
    assert torch.equal(DEQUANT[kind](gpu, spec, torch.bfloat16), tri)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize(
    ("kind", "g", "D"), [("k", 48, 96), ("k", 32, 80), ("v", 48, 96), ("v", 32, 96), ("v", 16, 64)]
)
def test_cuda_triton_odd_shapes(fmt: str, kind: str, g: int, D: int) -> None:
    from mspeckv.kv.quant import dequantize_keys_torch, dequantize_values_torch

    spec = QuantSpec(fmt, g)
    x = torch.randn(2, 3, g * 3, D, device="cuda") * 4
    q = QUANT[kind](x, spec)
    ref = (dequantize_keys_torch if kind == "k" else dequantize_values_torch)(q, spec, torch.float16)
    out = torch.full((2, 3, g * 4, D), float("nan"), device="cuda", dtype=torch.float16)
    (dequantize_keys_into if kind == "k" else dequantize_values_into)(q, spec, out[:, :, : g * 3])
    assert torch.equal(out[:, :, : g * 3], ref) and bool(out[:, :, g * 3 :].isnan().all())


@pytest.mark.parametrize("kind", ["k", "v"])
def test_fp64_input_is_coded_in_fp64(kind: str) -> None:
    """A value 1e-12 below the boundary between codes 3 and 4 gets code 3 in fp64. Rounded to fp32 first, it would sit
    exactly on the boundary and round half-to-even to 4: the TP tests rely on fp64 input staying fp64."""
    spec = QuantSpec("int8", group_size=8)
    s = 0.25  # exact in fp16: group [0, 255 * s] gives zero 0 and scale s
    x = torch.zeros(8, dtype=torch.float64)
    x[1], x[2] = 255 * s, 3.5 * s - 1e-12
    assert x[2].float().item() == 3.5 * s  # fp32 cannot hold the difference
    t = x.view(1, 1, 8, 1) if kind == "k" else x.view(1, 1, 1, 8)  # keys group tokens, values group channels
    q = QUANT[kind](t, spec)
    assert q.scale.flatten().tolist() == [s] and q.zero.flatten().tolist() == [0.0]
    assert unpack_codes(q.codes, 8).flatten()[2].item() == 3
    assert unpack_codes(QUANT[kind](t.float(), spec).codes, 8).flatten()[2].item() == 4  # the fp32 path differs
