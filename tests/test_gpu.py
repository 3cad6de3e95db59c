"""CUDA-only checks (copy streams, events, Triton dequant): run on a GPU machine with ``pytest -m gpu``."""

import pytest
import torch

from mspeckv.cache import make_cache
from mspeckv.kv.dense import DenseKV
from mspeckv.kv.placement import Placement
from tests.tiny import tiny_config

pytestmark = pytest.mark.gpu


def cuda_model(layers=6, dtype=torch.bfloat16):
    from mspeckv.model.llama import CausalLM

    cfg = tiny_config("llama", num_hidden_layers=layers, hidden_size=256, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=512, vocab_size=512, max_position_embeddings=4096)
    torch.manual_seed(0)
    m = CausalLM.from_hf_config(cfg, device="cuda", dtype=dtype)
    with torch.no_grad():
        for n, p in m.named_parameters():
            p.copy_(torch.ones_like(p) if n.endswith("norm.weight") else torch.randn_like(p) * 0.05)
    return m.eval()


def drive(m, cache, ids, prefill=700, chunk=256, steps=40):
    outs = []
    with torch.inference_mode():
        outs.append(m.prefill(ids[:, :prefill], cache, chunk=chunk))
        outs.append(m(ids[:, prefill:prefill + 9], cache, num_logits=None))  # a verification
        cache.rollback(5)
        t = prefill + 4
        for i in range(steps):
            outs.append(m(ids[:, t + i:t + i + 1], cache))
    torch.cuda.synchronize()
    return outs


@pytest.mark.parametrize("p", [
    Placement(on_chip=2),
    Placement(on_chip=0, resident_layers=2),
    Placement(on_chip=3, resident_layers=3),
    Placement(on_chip=2, resident_layers=2, resident_policy="static"),
])
def test_streamed_bf16_equals_all_on_gpu(p):
    m = cuda_model()
    ids = torch.randint(0, 512, (1, 800), device="cuda")
    ref = drive(m, DenseKV.for_model(m, 1, 1024), ids)
    got = drive(m, make_cache(m, p, 1, 1024), ids)
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b, atol=2e-2, rtol=2e-2)  # bf16: same math, different kernels/strides


def test_transfer_accounting_times_every_fetch():
    """The copy stream's busy time covers every fetched byte, and the rate it implies is a PCIe rate (not 0, not a
    device-copy rate)."""
    m = cuda_model()
    ids = torch.randint(0, 512, (1, 800), device="cuda")
    cache = make_cache(m, Placement(on_chip=2), 1, 1024)
    drive(m, cache, ids)
    rep = cache.memory_report()
    assert rep["h2d_bytes_total"] > 0 and cache.stats.h2d_timed_bytes == rep["h2d_bytes_total"]
    assert rep["h2d_busy_s"] > 0 and 0.5 < rep["h2d_achieved_GBps"] < 500


@pytest.mark.parametrize("fmt,bound", [("int8", 0.03), ("int4", 0.3)])
@pytest.mark.parametrize("res", [(0, "dequant"), (2, "dequant"), (2, "quant")])
def test_quantized_stream_close(fmt, bound, res):
    m = cuda_model()
    ids = torch.randint(0, 512, (1, 800), device="cuda")
    ref = drive(m, DenseKV.for_model(m, 1, 1024), ids)
    got = drive(m, make_cache(m, Placement(on_chip=2, kv_quant=fmt, resident_layers=res[0],
                                           resident_format=res[1]), 1, 1024), ids)
    err = max(float((a - b).float().norm() / b.float().norm()) for a, b in zip(got[1:], ref[1:], strict=True))
    assert 0 < err < bound


def test_triton_dequant_matches_torch():
    from mspeckv.kv.quant import selfcheck
    from mspeckv.kv.triton_flag import HAS_TRITON

    if not HAS_TRITON:
        pytest.skip("triton not installed")
    rows = selfcheck(bench=False)
    assert rows and all(r["ok"] for r in rows), [r for r in rows if not r["ok"]]


@pytest.mark.parametrize("mode", ["vanilla", "mspeckv"])
def test_graphed_speculation_equals_ar_fp32(mode):
    """CUDA graphs + static caches on the GPU: greedy output equals AR greedy (fp32, so exact)."""
    from mspeckv.config import GenerationConfig
    from mspeckv.decoding.autoregressive import generate
    from mspeckv.decoding.speculative import SpecConfig, speculative_generate

    target, draft = cuda_model(layers=4, dtype=torch.float32), cuda_model(layers=2, dtype=torch.float32)
    with torch.no_grad():
        for p in draft.parameters():
            p.mul_(1.01)  # a related but different draft
    base = torch.randint(0, 512, (1, 100), device="cuda")
    ids = torch.cat([base, base, base], 1)
    gen = GenerationConfig(max_new_tokens=48, stop_on_eos=False, prefill_chunk=128)
    ar_eager = generate(target, ids, gen, graphs=False).tokens
    ar_graph = generate(target, ids, gen, graphs=True).tokens
    spec = SpecConfig(mode=mode, gamma=6, draft_gamma=3, budget=64, chunk=8, draft_sinks=4, draft_window=40,
                      graphs=True)
    sp = speculative_generate(target, draft, ids, gen, spec)
    assert ar_graph == ar_eager
    assert sp.tokens == ar_eager
    assert sp.levels["verify_l2"]["rounds"] >= 1  # random weights: acceptance itself is meaningless here


@pytest.mark.parametrize("l1", ["snapkv:budget=512", "streaming:budget=512", "snapkv:budget=0.25",
                                "kivi:k_bits=2,v_bits=2,group_size=32,residual=128"])
def test_graphed_mspeckv_with_a_middle_press_equals_ar_fp32(l1):
    """Any press as the middle level, graphed where it is dense, on a prompt longer than its budget (the
    configuration of `mspeckv eval accept`, which hit an illegal memory access on the H200 at 8K/4096)."""
    from mspeckv.config import GenerationConfig
    from mspeckv.decoding.autoregressive import generate
    from mspeckv.decoding.speculative import SpecConfig, speculative_generate

    target, draft = cuda_model(layers=4, dtype=torch.float32), cuda_model(layers=2, dtype=torch.float32)
    with torch.no_grad():
        for p in draft.parameters():
            p.mul_(1.01)
    base = torch.randint(0, 512, (1, 200), device="cuda")
    ids = torch.cat([base] * 5, 1)  # 1000 tokens, repetitive so that drafts get accepted
    gen = GenerationConfig(max_new_tokens=64, stop_on_eos=False, prefill_chunk=256)
    ar = generate(target, ids, gen, graphs=False).tokens
    spec = SpecConfig(mode="mspeckv", gamma=8, draft_gamma=4, l1_press=l1, draft_sinks=4, draft_window=64,
                      graphs=True)
    sp = speculative_generate(target, draft, ids, gen, spec)
    torch.cuda.synchronize()
    assert sp.tokens == ar
    assert sp.levels["verify_l1"]["rounds"] >= 1


OFFLOADED = [Placement(on_chip=2), Placement(on_chip=2, kv_quant="int8"), Placement(on_chip=0, kv_quant="int4"),
             Placement(on_chip=2, kv_quant="int8", resident_layers=4, resident_format="quant"),
             Placement(on_chip=3, resident_layers=3)]


@pytest.mark.parametrize("p", OFFLOADED, ids=lambda p: f"on{p.on_chip}-{p.kv_quant}-r{p.resident_layers}")
def test_graphed_offloaded_ar_equals_eager_fp32(p):
    """Issue 11 item 2: the static PlacedKV replays CUDA graphs (copies from pinned memory as graph nodes, bucketed
    sizes, device-side lengths). fp32 greedy tokens equal the eager offloaded cache's; most steps replay graphs;
    a small copy bucket makes decoding cross buckets (new captures) and flushes (eager steps) on the way."""
    from mspeckv.config import GenerationConfig
    from mspeckv.decoding.autoregressive import generate

    m = cuda_model(layers=6, dtype=torch.float32)
    ids = torch.randint(0, 512, (1, 700), device="cuda")
    gen = GenerationConfig(max_new_tokens=200, stop_on_eos=False, prefill_chunk=256)
    ref = generate(m, ids, gen, cache=make_cache(m, p, 1, 1024), graphs=False).tokens
    cache = make_cache(m, p, 1, 1024, graphs=True)
    cache.copy_block = 128  # 700 -> 900 tokens cross buckets at 768 and 896
    out = generate(m, ids, gen, cache=cache, graphs=True)
    torch.cuda.synchronize()
    assert out.tokens == ref
    s = cache.stats
    assert s.static_forwards >= 190 and s.forwards >= 200  # flushes every 64 tokens run eagerly: 3-4 of 200


@pytest.mark.parametrize("press", ["snapkv:budget=0.25", "streaming:budget=0.25", "pyramidkv:budget=0.25",
                                   "h2o:budget=0.25", "adakv:budget=0.25"])
def test_graphed_pressed_greedy_equals_eager_fp32(press):
    """A press that keeps dense rows gets a static PressedKV from make_cache(graphs=True): the eval's greedy decode
    replays CUDA graphs through it (no eager step after the first token) and gives the eager pressed tokens in fp32."""
    from mspeckv.evals.generation import greedy
    from mspeckv.evals.variants import Variant

    m = cuda_model(layers=6, dtype=torch.float32)
    ids = torch.randint(0, 512, (700,), generator=torch.Generator().manual_seed(3)).tolist()
    v = Variant(press=press)
    eager = greedy(m, v, ids, 64, prefill_chunk=256, eos=False)
    graphed = greedy(m, v, ids, 64, prefill_chunk=256, eos=False, graphs=True)
    torch.cuda.synchronize()
    assert graphed.graphed and graphed.eager_steps == 0
    assert graphed.tokens == eager.tokens


def test_graphed_speculation_over_a_pressed_target_equals_ar_over_it_fp32():
    """The target's own KV pressed (a static PressedKV under graphs): replayed verifications and rollbacks give AR
    over the same press, token for token, in fp32."""
    from mspeckv.config import GenerationConfig
    from mspeckv.decoding.autoregressive import generate
    from mspeckv.decoding.speculative import SpecConfig, speculative_generate

    m, d = cuda_model(layers=6, dtype=torch.float32), cuda_model(layers=2, dtype=torch.float32)
    ids = torch.randint(0, 512, (1, 700), device="cuda")
    gen = GenerationConfig(max_new_tokens=96, stop_on_eos=False, prefill_chunk=256)
    press = "snapkv:budget=0.25"
    ar = generate(m, ids, gen, cache=make_cache(m, None, 1, 796, press=press)).tokens
    sp = speculative_generate(m, d, ids, gen, SpecConfig(mode="vanilla", gamma=4, graphs=True), press=press)
    torch.cuda.synchronize()
    assert sp.tokens == ar


def test_graphed_offloaded_speculation_equals_ar_fp32():
    """The full-KV verification level over an offloaded (int8, streamed) target replays graphs too."""
    from mspeckv.config import GenerationConfig
    from mspeckv.decoding.autoregressive import generate
    from mspeckv.decoding.speculative import SpecConfig, speculative_generate

    target, draft = cuda_model(layers=4, dtype=torch.float32), cuda_model(layers=2, dtype=torch.float32)
    with torch.no_grad():
        for q in draft.parameters():
            q.mul_(1.01)
    base = torch.randint(0, 512, (1, 200), device="cuda")
    ids = torch.cat([base] * 4, 1)
    gen = GenerationConfig(max_new_tokens=64, stop_on_eos=False, prefill_chunk=256)
    p = Placement(on_chip=1, kv_quant="int8")
    ar = generate(target, ids, gen, cache=make_cache(target, p, 1, 1024), graphs=False).tokens
    for mode in ("vanilla", "mspeckv"):
        spec = SpecConfig(mode=mode, gamma=6, draft_gamma=3, budget=128, chunk=8, draft_sinks=4, draft_window=40,
                          graphs=True)
        sp = speculative_generate(target, draft, ids, gen, spec, placement=p)
        torch.cuda.synchronize()
        assert sp.tokens == ar, mode
        assert sp.stats["memory"]["static_forwards"] >= 1, mode


def _ulp_close(got, want):
    """Within about one rounding of the dtype at the terms' magnitude (inputs are O(1) here): the kernels reduce in
    another order than torch, and the compiler may contract a rounded product into the following add."""
    if got.dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    else:
        torch.testing.assert_close(got.float(), want.float(), rtol=2 ** -7, atol=2 ** -7)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fused_kernels_match_torch(dtype):
    from mspeckv.model import fused

    g = torch.Generator(device="cuda").manual_seed(0)
    x, r = (torch.randn(3, 5, 1536, device="cuda", generator=g).to(dtype) for _ in range(2))
    w = (1 + 0.1 * torch.randn(1536, device="cuda", generator=g)).to(dtype)
    for res in (None, r):
        y, h = fused.rms_norm(x, w, 1e-6, res)
        y0, h0 = fused.rms_norm_torch(x, w, 1e-6, res)
        assert torch.equal(h, h0)
        _ulp_close(y, y0)
    qkv = torch.randn(2, 7, (12 + 2 + 2) * 128, device="cuda", generator=g).to(dtype)
    q = qkv[..., :1536].view(2, 7, 12, 128).transpose(1, 2)
    k = qkv[..., 1536:1792].view(2, 7, 2, 128).transpose(1, 2)
    ang = torch.rand(7, 64, device="cuda", generator=g) * 100
    cos, sin = torch.cat([ang.cos()] * 2, -1).to(dtype), torch.cat([ang.sin()] * 2, -1).to(dtype)
    qo, ko = fused.rope_qk(q, k, cos, sin)
    assert qo.is_contiguous() and ko.shape == (2, 2, 7, 128)
    _ulp_close(qo, fused.rotate_half_torch(q, cos, sin))
    _ulp_close(ko, fused.rotate_half_torch(k, cos, sin))
    gu = torch.randn(3, 2, 2 * 8960, device="cuda", generator=g).to(dtype)
    _ulp_close(fused.silu_mul(gu), fused.silu_mul_torch(gu))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fused_model_matches_unfused(dtype, monkeypatch):
    """The whole forward with the fused kernels and projections against the torch path (MSPECKV_NO_TRITON=1)."""
    m = cuda_model(dtype=dtype)
    ids = torch.randint(0, 512, (1, 300), device="cuda")
    outs = {}
    for flag in ("0", "1"):
        monkeypatch.setenv("MSPECKV_NO_TRITON", flag)
        outs[flag] = drive(m, DenseKV.for_model(m, 1, 1024), ids, prefill=200, chunk=128, steps=20)
    for a, b in zip(outs["0"], outs["1"], strict=True):
        tol = dict(atol=2e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=0.1, rtol=0.05)
        torch.testing.assert_close(a, b, **tol)
    same = [torch.equal(a.argmax(-1), b.argmax(-1)) for a, b in zip(outs["0"], outs["1"], strict=True)]
    assert sum(same) >= len(same) - (0 if dtype == torch.float32 else 2)


@pytest.mark.parametrize("T", [1, 9])
def test_per_kv_head_mask_attention_on_cuda_matches_the_cpu(T):
    """AdaKV's per-head padded rows: the (B, Hkv, T, S) mask through the CUDA fold path (fp32-score bmm) equals the
    CPU path (SDPA over folded queries) in fp32."""
    from mspeckv.model.llama import attention

    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(1, 12, T, 128, generator=g), torch.randn(1, 2, 3000, 128, generator=g), \
        torch.randn(1, 2, 3000, 128, generator=g)
    mask = torch.rand(1, 2, T, 3000, generator=g) > 0.3
    mask[..., 0] = True
    ref = attention(q, k, v, mask)
    got = attention(q.cuda(), k.cuda(), v.cuda(), mask.cuda()).cpu()
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------- batched engine (issue 25)
@pytest.mark.parametrize("T", [1, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_kernel_with_a_bound_per_sequence_matches_torch(T, dtype):
    """lens (B, T): each sequence's rows are bounded by its own length (the BatchKV decode/verification path)."""
    from mspeckv.model.decode_attention import decode_attention_torch, decode_attention_triton

    torch.manual_seed(0)
    B, Hq, Hkv, S, D = 4, 8, 2, 700, 64
    q = torch.randn(B, Hq, T, D, device="cuda", dtype=dtype)
    k = torch.randn(B, Hkv, S, D, device="cuda", dtype=dtype)
    v = torch.randn(B, Hkv, S, D, device="cuda", dtype=dtype)
    base = torch.tensor([3, 650, 128, 0], device="cuda")
    lens = (base[:, None] + torch.arange(T, device="cuda") + 1).int()  # (B, T)
    got = decode_attention_triton(q, k, v, lens=lens)
    for b in range(B):
        want = decode_attention_torch(q[b:b + 1], k[b:b + 1], v[b:b + 1], lens=lens[b])
        torch.testing.assert_close(got[b:b + 1], want, rtol=2e-2 if dtype == torch.bfloat16 else 1e-4,
                                   atol=2e-2 if dtype == torch.bfloat16 else 1e-4)


def test_fused_rope_with_a_table_per_sequence_matches_torch():
    from mspeckv.model.fused import rope_qk
    from mspeckv.model.rope import apply_rope

    m = cuda_model(2)
    pos = torch.tensor([[5, 6, 7], [900, 901, 902]], device="cuda")
    cos, sin = m.rope.cos_sin(pos, 903, torch.bfloat16)  # (2, 3, D)
    q = torch.randn(2, 4, 3, 64, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(2, 2, 3, 64, device="cuda", dtype=torch.bfloat16)
    qo, ko = rope_qk(q, k, cos, sin)
    torch.testing.assert_close(qo, apply_rope(q, cos, sin), rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(ko, apply_rope(k, cos, sin), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_graphed_batch_engine_matches_each_prompt_alone(dtype):
    """Greedy per sequence, ragged prompts, leave and join, graphed per bucket: identical in fp32; in bf16 the
    agreement is printed (batched matmuls round differently from batch 1)."""
    from mspeckv.config import GenerationConfig
    from mspeckv.decoding.autoregressive import generate
    from mspeckv.decoding.batch import generate_batch

    m = cuda_model(4, dtype)
    g = torch.Generator().manual_seed(1)
    ps = [torch.randint(3, 500, (n,), generator=g).tolist() for n in (300, 17, 1200, 64, 800)]
    gen = GenerationConfig(max_new_tokens=24, stop_on_eos=False, prefill_chunk=256)
    r = generate_batch(m, ps, gen, max_batch=3, graphs=True)
    assert r.stats["captures"] >= 1 and r.stats["eager_steps"] == 0
    agree = []
    for p, s in zip(ps, r.seqs, strict=True):
        solo = generate(m, torch.tensor([p], device="cuda"), gen, graphs=True).tokens[0]
        agree.append(sum(a == b for a, b in zip(s.tokens, solo, strict=True)) / len(solo))
        if dtype == torch.float32:
            assert s.tokens == solo
    print(f"batch engine vs alone, {dtype}: token agreement {agree}")


@pytest.mark.parametrize("mode,auto,draft_window", [("self", False, None), ("self", True, None),
                                                    ("vanilla", False, None), ("vanilla", True, None),
                                                    ("vanilla", False, 48), ("mspeckv", False, 48)])
def test_graphed_batch_speculation_equals_each_prompt_alone_fp32(mode, auto, draft_window):
    """Speculation at batch with every forward graphed (the self draft through the kernel's window): greedy output
    per sequence equals that prompt's AR alone in fp32, ragged prompts, leave and join; nothing ran eagerly."""
    from mspeckv.config import GenerationConfig
    from mspeckv.decoding.autoregressive import generate
    from mspeckv.decoding.batch_spec import BatchSpecConfig, generate_batch_spec

    m = cuda_model(4, torch.float32)
    draft = cuda_model(2, torch.float32) if mode != "self" else None
    g = torch.Generator().manual_seed(2)
    ps = [torch.randint(3, 500, (n,), generator=g).tolist() for n in (300, 17, 1200, 64, 800)]
    gen = GenerationConfig(max_new_tokens=24, stop_on_eos=False, prefill_chunk=256)
    spec = BatchSpecConfig(mode, 4, sinks=4, window=64, auto=auto, draft_window=draft_window)  # the draft's too
    r = generate_batch_spec(m, draft, ps, gen, spec, max_batch=3, graphs=True)
    st = r.stats
    assert st["eager_steps"] == 0 and st["draft_eager_steps"] == 0 and st["draft_captures"] >= 1
    assert (st["cost_model"] is not None) == auto
    for p, s in zip(ps, r.seqs, strict=True):
        assert s.tokens == generate(m, torch.tensor([p], device="cuda"), gen, graphs=True).tokens[0]
    print(f"graphed batch speculation {mode} auto={auto}: acceptance {st['acceptance']}, cost {st['cost_model']}")
