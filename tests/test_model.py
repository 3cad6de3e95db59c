"""Our forward against transformers on tiny random configs: prefill, chunked prefill, token-by-token decode."""

import pytest
import torch

from mspeckv.kv.dense import DenseKV
from tests.tiny import tiny_pair

FAMILIES = ["llama", "qwen2", "mistral"]
ROPES = [
    None,
    {"rope_type": "linear", "factor": 2.0},
    {"rope_type": "dynamic", "factor": 2.0},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 16},
]
TOL = dict(atol=2e-4, rtol=1e-4)


def hf_logits(hf, ids):
    with torch.no_grad():
        return hf(ids).logits.float()


@pytest.mark.parametrize("family", FAMILIES)
def test_prefill_chunked_and_decode_match_transformers(family):
    hf, ours = tiny_pair(family)
    torch.manual_seed(1)
    ids = torch.randint(3, 97, (2, 40))
    ref = hf_logits(hf, ids)
    # one-shot prefill, all logits
    cache = DenseKV.for_model(ours, 2, 64)
    with torch.no_grad():
        full = ours(ids, cache, num_logits=None)
    torch.testing.assert_close(full, ref, **TOL)
    # chunked prefill (uneven chunk) then token-by-token decode of the rest
    cache = DenseKV.for_model(ours, 2, 64)
    last = ours.prefill(ids[:, :29], cache, chunk=7)
    torch.testing.assert_close(last, ref[:, 28], **TOL)
    with torch.no_grad():
        for t in range(29, 40):
            step = ours(ids[:, t:t + 1], cache)[:, -1]
            torch.testing.assert_close(step, ref[:, t], **TOL)
    assert cache.length() == 40


@pytest.mark.parametrize("rope", ROPES, ids=lambda r: r and r["rope_type"] or "default")
def test_rope_scalings_match_transformers(rope):
    kw = {"max_position_embeddings": 32}
    if rope is not None:
        kw["rope_scaling"] = rope
    hf, ours = tiny_pair("llama", seed=3, **kw)
    ids = torch.randint(3, 97, (1, 72))  # beyond the original context, so scaling matters
    ref = hf_logits(hf, ids)
    cache = DenseKV.for_model(ours, 1, 80)
    # dynamic NTK is stateful in HF; compare on the monotonic path (one forward)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids, cache, num_logits=None), ref, **TOL)


def test_multi_token_verify_after_cache_matches():
    """A (gamma+1)-token forward on top of a cache equals the full forward (the verification shape)."""
    hf, ours = tiny_pair("qwen2")
    ids = torch.randint(3, 97, (1, 30))
    ref = hf_logits(hf, ids)
    cache = DenseKV.for_model(ours, 1, 32)
    ours.prefill(ids[:, :21], cache, chunk=8)
    with torch.no_grad():
        out = ours(ids[:, 21:], cache, num_logits=None)
    torch.testing.assert_close(out, ref[:, 21:], **TOL)


def test_context_limit_error():
    _, ours = tiny_pair("llama", max_position_embeddings=32)
    with pytest.raises(ValueError, match="maximum context of 32"):
        ours.check_context(33)


@pytest.mark.parametrize("family", FAMILIES)
def test_fused_projections_are_views_of_one_weight(family):
    """q/k/v (and gate/up) are row slices of one tensor: loading writes into it, one matmul gives all three, and
    a parameter replaced later (module.to) is noticed instead of leaving the fused weight stale."""
    import torch.nn.functional as F

    from mspeckv.model.fused import silu_mul_torch

    hf, ours = tiny_pair(family)
    attn, mlp = ours.model.layers[1].self_attn, ours.model.layers[1].mlp
    w, b = attn.qkv.get()
    assert attn.q_proj.weight.data_ptr() == w.data_ptr()
    assert torch.equal(w, torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]))
    assert torch.equal(w, torch.cat([hf.model.layers[1].self_attn.q_proj.weight.float(),
                                     hf.model.layers[1].self_attn.k_proj.weight.float(),
                                     hf.model.layers[1].self_attn.v_proj.weight.float()]))
    assert (b is None) == (attn.q_proj.bias is None)
    x = torch.randn(2, 5, ours.cfg.dim)
    nq, nk = attn.q_proj.weight.shape[0], attn.k_proj.weight.shape[0]
    y = F.linear(x, w, b)
    torch.testing.assert_close(y[..., :nq], attn.q_proj(x))
    torch.testing.assert_close(y[..., nq + nk:], attn.v_proj(x))
    gw, gb = mlp.gate_up.get()
    gu = F.linear(x, gw, gb)
    torch.testing.assert_close(silu_mul_torch(gu), mlp.act(mlp.gate_proj(x)) * mlp.up_proj(x))
    if attn.q_proj.bias is not None:  # a replaced bias alone also unfuses
        attn.q_proj.bias = torch.nn.Parameter(attn.q_proj.bias.detach().clone())
        assert attn.qkv.get() is None
    ours.double()  # new parameters: the fused tensors are stale now
    assert attn.qkv.get() is None and mlp.gate_up.get() is None


@pytest.mark.parametrize("family", FAMILIES)
def test_one_matmul_per_projection_group_and_the_unfused_fallback(family, monkeypatch):
    """A decode step runs 4 matmuls per layer (QKV, o_proj, gate/up, down) + the LM head. Once the views are broken
    (``double()``), each layer falls back to its 7 separate projections and still matches transformers."""
    import torch.nn.functional as F

    hf, ours = tiny_pair(family)
    calls = []
    linear = F.linear
    monkeypatch.setattr(F, "linear", lambda *a, **k: calls.append(1) or linear(*a, **k))
    ids = torch.randint(3, 97, (1, 12))
    L = ours.cfg.n_layers
    with torch.no_grad():
        ours(ids, DenseKV.for_model(ours, 1, 16), num_logits=None)
        assert len(calls) == 4 * L + 1
        calls.clear()
        hf, ours = hf.double(), ours.double()
        got = ours(ids, DenseKV.for_model(ours, 1, 16), num_logits=None)
        assert len(calls) == 7 * L + 1
        want = hf(ids).logits
    torch.testing.assert_close(got, want.float(), atol=1e-6, rtol=1e-6)  # ours returns fp32 logits


def test_rms_norm_reference_matches_transformers_in_bf16():
    """The RMSNorm reference (the CPU path and the fused kernel's GPU reference) rounds as transformers does."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from mspeckv.model.fused import rms_norm_torch

    torch.manual_seed(0)
    hf = LlamaRMSNorm(64, eps=1e-6).bfloat16()
    with torch.no_grad():
        hf.weight.copy_(1 + 0.1 * torch.randn(64))
    x, r = torch.randn(3, 5, 64).bfloat16(), torch.randn(3, 5, 64).bfloat16()
    y, h = rms_norm_torch(x, hf.weight.detach(), 1e-6, r)
    assert y.dtype == torch.bfloat16 and torch.equal(h, x + r)
    assert torch.equal(y, hf(x + r).detach())


@pytest.mark.parametrize("kw", [dict(hidden_act="gelu_pytorch_tanh"), dict(mlp_bias=True, attention_bias=True)],
                         ids=["gelu", "biases"])
def test_other_activations_and_biases_match_transformers(kw):
    """The fused gate/up path is SiLU-only (a GELU MLP runs unfused); MLP and attention biases go through the fused
    weights' biases."""
    hf, ours = tiny_pair("llama", **kw)
    ids = torch.randint(3, 97, (2, 20))
    with torch.no_grad():
        got = ours(ids, DenseKV.for_model(ours, 2, 24), num_logits=None)
    torch.testing.assert_close(got, hf_logits(hf, ids), **TOL)


def test_sliding_window_checkpoint_is_refused_past_its_window_only():
    """Full attention only: a sliding-window checkpoint runs while the sequence fits its window (pos0 + T <= w, where
    sliding and full attention agree) and gets one clear error from the first token past it."""
    _, ours = tiny_pair("mistral", sliding_window=16)
    assert ours.cfg.sliding_window == 16
    cache = DenseKV.for_model(ours, 1, 32)
    with torch.no_grad():
        ours(torch.randint(3, 97, (1, 10)), cache)
        ours(torch.randint(3, 97, (1, 6)), cache)  # reaches exactly 16 tokens: allowed
        with pytest.raises(ValueError, match=r"sliding-window attention \(window 16\) and the sequence reaches 17 "
                                             r"tokens; MSpecKV implements full attention only"):
            ours(torch.randint(3, 97, (1, 1)), cache)


def test_cache_built_for_another_batch_is_refused():
    _, ours = tiny_pair("llama")
    with torch.no_grad(), pytest.raises(ValueError, match=r"built for batch 1 but input_ids has 2 row\(s\); build "
                                                           r"the cache with batch=2"):
        ours(torch.randint(3, 97, (2, 4)), DenseKV.for_model(ours, 1, 8))


@pytest.mark.parametrize("T", [1, 9, 40])  # folded (G*T <= 64) and the repeat path (G*T > 64)
def test_attention_with_a_per_kv_head_mask_matches_each_head_by_hand(T):
    """A (B, Hkv, T, S) mask (heads that keep different rows) goes through the same paths as a (T, S) one; each query
    head must see its KV head's mask. Reference: a softmax per query head, masked by hand."""
    from mspeckv.model.llama import attention

    g = torch.Generator().manual_seed(0)
    B, Hkv, G, S, D = 1, 2, 3, 50, 16
    q = torch.randn(B, Hkv * G, T, D, generator=g)
    k, v = torch.randn(B, Hkv, S, D, generator=g), torch.randn(B, Hkv, S, D, generator=g)
    mask = torch.rand(B, Hkv, T, S, generator=g) > 0.4
    mask[..., 0] = True  # every row sees at least one key
    y = attention(q, k, v, mask)
    for h in range(Hkv * G):
        kv = h // G
        sc = (q[:, h] @ k[:, kv].transpose(-1, -2)) * D ** -0.5  # (B, T, S)
        ref = sc.masked_fill(~mask[:, kv], float("-inf")).softmax(-1) @ v[:, kv]
        torch.testing.assert_close(y[:, h], ref, atol=1e-5, rtol=1e-5)
