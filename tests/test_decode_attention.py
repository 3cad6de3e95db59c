"""Decode/verification attention (mspeckv.model.decode_attention): the torch reference against a naive float64
softmax(QK^T)V on the CPU; the Triton split-K kernel against the reference on CUDA (``gpu``-marked)."""

from __future__ import annotations

import pytest
import torch

from mspeckv.kv.quant import QuantSpec, quantize_keys, quantize_values
from mspeckv.model import decode_attention as da
from mspeckv.model.llama import attention, causal_mask


def naive(q, k, v, mask=None):
    """float64 softmax(q k^T / sqrt(D) + mask) v, K/V repeated per query head (no folding)."""
    B, Hq, T, D = q.shape
    G = Hq // k.shape[1]
    k = k.double().repeat_interleave(G, 1)
    v = v.double().repeat_interleave(G, 1)
    s = q.double() @ k.transpose(-1, -2) / D**0.5
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    return s.softmax(-1) @ v


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def make(B, Hkv, G, T, S, D=64, dtype=torch.float32, device="cpu", gen=None):
    f = lambda *s: torch.randn(*s, generator=gen, device=device).to(dtype)
    return f(B, Hkv * G, T, D), f(B, Hkv, S, D), f(B, Hkv, S, D)


# ------------------------------------------------------------------------------------------------------ CPU reference
@pytest.mark.parametrize("G", [1, 2, 3])
@pytest.mark.parametrize("T", [1, 4])
def test_reference_gqa_causal(G, T):
    q, k, v = make(2, 2, G, T, 37)
    for mask in (None, causal_mask(T, 37, "cpu")):
        ref = naive(q, k, v, mask)
        assert rel(da.decode_attention_torch(q, k, v, mask), ref) < 1e-5
        assert rel(da.decode_attention(q, k, v, mask), ref) < 1e-5  # CPU dispatch = reference
    got = da.decode_attention_torch(q, k, v, causal=True)
    assert rel(got, naive(q, k, v, causal_mask(T, 37, "cpu"))) < 1e-5


def test_reference_matches_attention_on_cpu():
    q, k, v = make(1, 2, 3, 5, 50)
    m = causal_mask(5, 50, "cpu")
    assert torch.equal(da.decode_attention_torch(q, k, v, m), attention(q, k, v, m))  # same math, bit for bit


def test_reference_lens_and_static_mask():
    T, S, C = 3, 20, 32
    q, k, v = make(1, 2, 2, T, C)
    lens = torch.tensor([S - 2, S - 1, S])
    cols = torch.arange(C)
    static = cols[None, :] <= (S - T + torch.arange(T))[:, None]  # StaticKV.begin's mask
    ref = naive(q, k[:, :, :S], v[:, :, :S], causal_mask(T, S, "cpu"))
    assert rel(da.decode_attention_torch(q, k, v, lens=lens), ref) < 1e-5
    assert rel(da.decode_attention_torch(q, k, v, static), ref) < 1e-5
    assert torch.equal(da.mask_bound(static), torch.cat([lens, torch.zeros(1, dtype=torch.long)]).int())  # prefix
    arb = torch.rand(T, C) < 0.5
    arb[:, 0] = True
    arb[:, 1] = False
    assert int(da.mask_bound(arb)[T]) == 1  # not a prefix: the kernel must apply it
    assert rel(da.decode_attention_torch(q, k, v, arb, lens=lens), naive(q, k, v, arb & (cols < lens[:, None]))) < 1e-5


@pytest.mark.parametrize("fmt", ["int8", "int4", "int2"])
def test_reference_quantized_with_tail(fmt):
    spec = QuantSpec(fmt, 32)
    T, Sq, St = 2, 64, 7
    q, k, v = make(1, 2, 3, T, Sq)
    kq, vq = quantize_keys(k, spec), quantize_values(v, spec)
    kt, vt = torch.randn(1, 2, St, 64), torch.randn(1, 2, St, 64)
    kd = torch.cat([da.dequant_torch(kq, torch.float32), kt], 2)
    vd = torch.cat([da.dequant_torch(vq, torch.float32), vt], 2)
    ref = naive(q, kd, vd, causal_mask(T, Sq + St, "cpu"))
    got = da.decode_attention_torch(q, kq, vq, causal=True, k_tail=kt, v_tail=vt)
    assert rel(got, ref) < 1e-5
    from mspeckv.kv.quant import dequantize_keys, dequantize_values

    assert torch.equal(da.dequant_torch(kq, torch.float32), dequantize_keys(kq, spec, torch.float32))
    assert torch.equal(da.dequant_torch(vq, torch.float32), dequantize_values(vq, spec, torch.float32))


def test_dispatch_checks():
    q, k, v = make(1, 2, 2, 1, 8)
    with pytest.raises(ValueError):
        da.decode_attention(q, k, v[:, :, :4])
    with pytest.raises(ValueError):
        da.decode_attention(q, k, v, k_tail=k)


def test_default_splits():
    for S, bh, rows in [(65536, 2, 6), (65536, 2, 54), (1024, 2, 6), (65536, 32, 9), (100, 2, 54), (1, 1, 1)]:
        ns = da.default_splits(S, 64, bh, rows, 132)
        assert 1 <= ns <= max(1, -(-S // 64))  # never more splits than key blocks
        assert ns * bh <= 4 * 132 or ns == 1
    assert da.default_splits(65536, 64, 2, 6, 132) >= 128  # long keys, 2 KV heads: the split fills the chip


# ------------------------------------------------------------------------------------------------------ GPU kernel
FORMATS = ["bf16", "int8", "int4", "int2"]
TOL = {"bf16": 1e-2, "fp16": 4e-3, "fp32": 1e-5, "int8": 1e-2, "int4": 1e-2, "int2": 1e-2}  # vs the reference


def _kv(fmt, k, v, g=64):
    if fmt in ("bf16", "fp16", "fp32"):
        return k, v
    spec = QuantSpec(fmt, g)
    return quantize_keys(k, spec), quantize_values(v, spec)


def _check(got, ref, fmt):
    assert got.shape == ref.shape and got.dtype == ref.dtype
    assert not got.isnan().any()
    assert rel(got, ref) < TOL[fmt], rel(got, ref)


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("G", [1, 2, 6, 7])
@pytest.mark.parametrize("T", [1, 2, 5, 9, 16])
def test_triton_matches_reference(fmt, G, T):
    gen = torch.Generator(device="cuda").manual_seed(100 * G + T)
    dt = torch.bfloat16
    S = 1000 if fmt == "bf16" else 960  # dense: not a multiple of the block; quantized: whole groups + a tail
    q, k, v = make(1, 2, G, T, S, 128, dt, "cuda", gen)
    kk, vv = _kv(fmt, k, v)
    tail = {} if fmt == "bf16" else dict(k_tail=make(1, 2, 1, 1, 37, 128, dt, "cuda", gen)[1],
                                         v_tail=make(1, 2, 1, 1, 37, 128, dt, "cuda", gen)[2])
    S_tot = S + (37 if tail else 0)
    mask = causal_mask(T, S_tot, "cuda") if T > 1 else None
    ref = da.decode_attention_torch(q, kk, vv, mask, **tail)
    _check(da.decode_attention_triton(q, kk, vv, mask, **tail), ref, fmt)
    _check(da.decode_attention_triton(q, kk, vv, causal=True, **tail), ref, fmt)  # no mask tensor
    _check(da.decode_attention(q, kk, vv, mask, **tail), ref, fmt)


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("G,T", [(1, 1), (6, 9), (7, 16), (8, 16)])
def test_triton_static_capacity_mask(fmt, G, T):
    """A StaticKV-style buffer: capacity > valid rows, mask (T, C) = cols <= pos + i. Rows past the valid prefix are
    NaN in the kernel's input (dense) so any read of them would show; the reference sees zeros there."""
    gen = torch.Generator(device="cuda").manual_seed(7 * G + T)
    dt = torch.bfloat16
    C, L = 4096, 1283 + T  # capacity, valid length after this forward
    q, k, v = make(1, 2, G, T, C, 128, dt, "cuda", gen)
    k[:, :, L:] = 0
    v[:, :, L:] = 0
    cols = torch.arange(C, device="cuda")
    mask = cols[None, :] <= (L - T + torch.arange(T, device="cuda"))[:, None]
    kk, vv = _kv(fmt, k, v)
    ref = da.decode_attention_torch(q, kk, vv, mask)
    if fmt == "bf16":
        kk, vv = k.clone(), v.clone()
        kk[:, :, L:] = float("nan")
        vv[:, :, L:] = float("nan")
    _check(da.decode_attention_triton(q, kk, vv, mask), ref, fmt)
    lens = L - T + 1 + torch.arange(T, device="cuda")
    _check(da.decode_attention_triton(q, kk, vv, lens=lens), ref, fmt)
    for ns in (1, 3, 64):  # any split count covers the keys exactly once
        _check(da.decode_attention_triton(q, kk, vv, mask, num_splits=ns), ref, fmt)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["fp16", "fp32"])
def test_triton_other_dtypes_strided(dtype):
    dt = {"fp16": torch.float16, "fp32": torch.float32}[dtype]
    gen = torch.Generator(device="cuda").manual_seed(3)
    q, k, v = make(2, 3, 4, 5, 2000, 64, dt, "cuda", gen)
    k, v = k[:, :, :777], v[:, :, :777]  # prefix views of longer buffers
    q = q.transpose(1, 2).contiguous().transpose(1, 2)  # (B, T, H, D) memory, as the model's projections give
    m = causal_mask(5, 777, "cuda")
    ref = da.decode_attention_torch(q, k, v, m)
    _check(da.decode_attention_triton(q, k, v, m), ref, dtype)
    full = naive(q, k, v, m)
    assert rel(da.decode_attention_triton(q, k, v, m), full) < 10 * TOL[dtype]


@pytest.mark.gpu
def test_arbitrary_mask_and_batch():
    gen = torch.Generator(device="cuda").manual_seed(5)
    q, k, v = make(3, 2, 6, 4, 700, 128, torch.bfloat16, "cuda", gen)
    m = torch.rand(4, 700, generator=gen, device="cuda") < 0.3
    m[:, 5] = True
    _check(da.decode_attention_triton(q, k, v, m), naive(q, k, v, m).to(torch.bfloat16), "bf16")


@pytest.mark.gpu
def test_attention_uses_kernel_and_matches_bmm_path(monkeypatch):
    gen = torch.Generator(device="cuda").manual_seed(11)
    q, k, v = make(1, 2, 6, 9, 3000, 128, torch.bfloat16, "cuda", gen)
    m = causal_mask(9, 3000, "cuda")
    got = attention(q, k, v, m)
    monkeypatch.setenv("MSPECKV_NO_TRITON", "1")
    old = attention(q, k, v, m)  # the fp32-score bmm path
    _check(got, old, "bf16")


@pytest.mark.gpu
def test_cuda_graph_capture_static_mask():
    """The kernel replays in a CUDA graph with the length only on the device (StaticKV's pattern)."""
    gen = torch.Generator(device="cuda").manual_seed(13)
    C, T = 2048, 9
    q, k, v = make(1, 2, 6, T, C, 128, torch.bfloat16, "cuda", gen)
    pos = torch.zeros((), dtype=torch.long, device="cuda")
    cols = torch.arange(C, device="cuda")
    ar = torch.arange(T, device="cuda")

    def step():
        mask = cols[None, :] <= (pos + ar)[:, None]
        return attention(q, k, v, mask)

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = step()
    for p in (0, 100, 1500, C - T):
        pos.fill_(p)
        g.replay()
        mask = cols[None, :] <= (p + ar)[:, None]
        _check(out.clone(), da.decode_attention_torch(q, k, v, mask), "bf16")


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("T", [1, 5])
def test_triton_bound_per_sequence_every_format(fmt, T):
    """A ragged batch (BatchKV): lens (B, T), each sequence bounded by its own length, in every KV format; against
    the reference run one sequence at a time (quantization is per sequence, head and group, so the per-sequence
    codes equal the batch's)."""
    gen = torch.Generator(device="cuda").manual_seed(7 + T)
    dt, B, S = torch.bfloat16, 4, 960
    q, k, v = make(B, 2, 6, T, S, 128, dt, "cuda", gen)
    base = torch.tensor([0, 900, 130, 511], device="cuda")
    lens = (base[:, None] + torch.arange(T, device="cuda") + 1).int()
    kk, vv = _kv(fmt, k, v)
    got = da.decode_attention_triton(q, kk, vv, lens=lens)
    for b in range(B):
        kb, vb = _kv(fmt, k[b:b + 1], v[b:b + 1])
        _check(got[b:b + 1], da.decode_attention_torch(q[b:b + 1], kb, vb, lens=lens[b]), fmt)
    with pytest.raises(ValueError, match="per-sequence lens must be"):
        da.decode_attention_triton(q, kk, vv, lens=lens[:2])


@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 3])
@pytest.mark.parametrize("sinks,window", [(0, 40), (4, 100), (70, 1)])
def test_triton_window_reads_sinks_and_newest_keys(T, sinks, window):
    """A StreamingLLM draft over a ragged batch (``Window``): row (b, t) sees keys j < sinks or j >= starts[b, t],
    within its lens; against the reference with that mask, one sequence at a time. The sequences' lengths put the
    window inside the sinks (short), straddling a block edge, and far from them (long)."""
    from mspeckv.kv.base import Window

    gen = torch.Generator(device="cuda").manual_seed(11 + T)
    B, S = 4, 1500
    q, k, v = make(B, 2, 6, T, S, 64, torch.float32, "cuda", gen)
    base = torch.tensor([2, 1400, 97, 600], device="cuda")
    lens = (base[:, None] + torch.arange(T, device="cuda") + 1).int()  # (B, T)
    starts = lens - window  # row sees its newest `window` keys
    got = da.decode_attention_triton(q, k, v, lens=lens, window=Window(sinks, starts, sinks + window))
    j = torch.arange(S, device="cuda")
    for b in range(B):
        m = (j[None, :] < lens[b, :, None]) & ((j[None, :] < sinks) | (j[None, :] >= starts[b, :, None]))  # (T, S)
        _check(got[b:b + 1], da.decode_attention_torch(q[b:b + 1], k[b:b + 1], v[b:b + 1], m), "fp32")
    with pytest.raises(ValueError, match="a window reads dense K/V"):
        da.decode_attention_triton(q, k, v, lens=lens[0], window=Window(sinks, starts, sinks + window))
    with pytest.raises(ValueError, match="window starts must be"):
        da.decode_attention_triton(q, k, v, lens=lens, window=Window(sinks, starts[:2], sinks + window))
