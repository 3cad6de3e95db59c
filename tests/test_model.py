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
    ours.double()  # new parameters: the fused tensors are stale now
    assert attn.qkv.get() is None and mlp.gate_up.get() is None
