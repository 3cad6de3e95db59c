"""RoPE against transformers' rotary embedding modules, for every supported scaling type."""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from transformers import LlamaConfig, MistralConfig, Qwen2Config
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb
from transformers.models.mistral.modeling_mistral import MistralRotaryEmbedding
from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding

from mspeckv.model.rope import Rope, RopeConfig, apply_rope

MAX_POS = 64  # original context; test positions go well past it so scaling kicks in
ATOL = 1e-6

# name -> (rope_parameters without rope_theta, max_position_embeddings)
CASES: dict[str, tuple[dict[str, Any], int]] = {
    "default": ({"rope_type": "default"}, MAX_POS),
    "linear": ({"rope_type": "linear", "factor": 4.0}, MAX_POS),
    "yarn": ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": MAX_POS}, 4 * MAX_POS),
    "yarn_attn_factor": (
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": MAX_POS, "attention_factor": 0.8},
        4 * MAX_POS,
    ),
    "yarn_mscale": (
        {
            "rope_type": "yarn",
            "factor": 8.0,
            "original_max_position_embeddings": MAX_POS,
            "mscale": 1.0,
            "mscale_all_dim": 0.5,
            "beta_fast": 16,
            "beta_slow": 2,
        },
        8 * MAX_POS,
    ),
    "yarn_no_truncate": (
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": MAX_POS, "truncate": False},
        4 * MAX_POS,
    ),
    "llama3": (
        {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": MAX_POS,
        },
        8 * MAX_POS,
    ),
    # edges found by mutation testing: low_freq_factor != 1 (lo wavelength = ctx / low), beta_fast == beta_slow
    # (a zero-width ramp), a small beta_slow (ramp end clamped to dim - 1), mscale alone, mscale != 1
    "llama3_low2": (
        {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 2.0, "high_freq_factor": 8.0,
         "original_max_position_embeddings": MAX_POS},
        8 * MAX_POS,
    ),
    "yarn_flat_ramp": (
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": MAX_POS, "beta_fast": 4,
         "beta_slow": 4, "truncate": False},
        4 * MAX_POS,
    ),
    "yarn_wide_ramp": (
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": MAX_POS, "beta_fast": 64,
         "beta_slow": 1e-8},
        4 * MAX_POS,
    ),
    "yarn_mscale_only": (
        {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": MAX_POS, "mscale": 2.0},
        8 * MAX_POS,
    ),
    "yarn_mscale2": (
        {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": MAX_POS, "mscale": 2.0,
         "mscale_all_dim": 1.0},
        8 * MAX_POS,
    ),
}


def llama_config(params: dict[str, Any], max_pos: int, theta: float = 10000.0, **kw: Any) -> LlamaConfig:
    return LlamaConfig(
        hidden_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=256,
        num_hidden_layers=1,
        vocab_size=32,
        max_position_embeddings=max_pos,
        rope_parameters={**params, "rope_theta": theta},
        **kw,
    )


def hf_cos_sin(rot: torch.nn.Module, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.zeros(1, dtype=torch.float32)
    cos, sin = rot(x, pos[None])
    return cos[0], sin[0]


def ours(cfg: Any, pos: torch.Tensor, seq_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    rope = Rope(RopeConfig.from_hf(cfg))
    return rope.cos_sin(pos, seq_len if seq_len is not None else int(pos.max()) + 1, torch.float32)


def unscaled_cos(cfg: Any, pos: torch.Tensor) -> torch.Tensor:
    rc = RopeConfig.from_hf(cfg)
    return Rope(RopeConfig(head_dim=rc.head_dim, theta=rc.theta)).cos_sin(pos, int(pos.max()) + 1, torch.float32)[0]


@pytest.mark.parametrize("name", list(CASES))
def test_matches_hf_llama(name: str) -> None:
    params, max_pos = CASES[name]
    cfg = llama_config(params, max_pos)
    pos = torch.arange(0, 200)
    cos, sin = ours(cfg, pos)
    hcos, hsin = hf_cos_sin(LlamaRotaryEmbedding(cfg), pos)
    assert cos.shape == (200, 32)
    torch.testing.assert_close(cos, hcos, atol=ATOL, rtol=0)
    torch.testing.assert_close(sin, hsin, atol=ATOL, rtol=0)
    if name != "default":  # scaling must actually change the embedding
        assert (cos - unscaled_cos(cfg, pos)).abs().max() > 1e-3


def test_yarn_attention_scaling_values() -> None:
    # attention_factor: explicit > mscale/mscale_all_dim > 0.1 ln(factor) + 1
    cases = {"yarn": 0.1 * torch.tensor(4.0).log().item() + 1, "yarn_attn_factor": 0.8}
    for name, want in cases.items():
        params, max_pos = CASES[name]
        assert Rope(RopeConfig.from_hf(llama_config(params, max_pos))).attention_scaling == pytest.approx(want)
    params, max_pos = CASES["yarn_mscale"]
    ln8 = torch.tensor(8.0).log().item()
    want = (0.1 * 1.0 * ln8 + 1) / (0.1 * 0.5 * ln8 + 1)
    assert Rope(RopeConfig.from_hf(llama_config(params, max_pos))).attention_scaling == pytest.approx(want)


@pytest.mark.parametrize("seq_len", [10, MAX_POS, MAX_POS + 1, 100, 200])
def test_dynamic_matches_hf_monotonic(seq_len: int) -> None:
    cfg = llama_config({"rope_type": "dynamic", "factor": 2.0}, MAX_POS)
    pos = torch.arange(seq_len)
    cos, sin = ours(cfg, pos, seq_len)
    hcos, hsin = hf_cos_sin(LlamaRotaryEmbedding(cfg), pos)  # fresh module: no stale HF state
    torch.testing.assert_close(cos, hcos, atol=ATOL, rtol=0)
    torch.testing.assert_close(sin, hsin, atol=ATOL, rtol=0)
    if seq_len > MAX_POS + 1:
        assert (cos - unscaled_cos(cfg, pos)).abs().max() > 1e-3


def test_dynamic_decode_steps_match_hf() -> None:
    # prefill 60 then decode one token at a time past the original max: one HF module reused, like generation
    cfg = llama_config({"rope_type": "dynamic", "factor": 2.0}, MAX_POS)
    rot, rope = LlamaRotaryEmbedding(cfg), Rope(RopeConfig.from_hf(cfg))
    steps = [torch.arange(60)] + [torch.tensor([t]) for t in range(60, 120)]
    for pos in steps:
        seq_len = int(pos[-1]) + 1
        cos, sin = rope.cos_sin(pos, seq_len, torch.float32)
        hcos, hsin = hf_cos_sin(rot, pos)
        torch.testing.assert_close(cos, hcos, atol=ATOL, rtol=0)
        torch.testing.assert_close(sin, hsin, atol=ATOL, rtol=0)


def test_dynamic_cache_and_reset() -> None:
    rope = Rope(RopeConfig(head_dim=32, theta=10000.0, rope_type="dynamic", factor=2.0, max_position_embeddings=64))
    a = rope._inv_freq(100, torch.device("cpu"))
    assert rope._inv_freq(100, torch.device("cpu")) is a  # cached for the same seq_len
    assert not torch.equal(rope._inv_freq(150, torch.device("cpu")), a)
    assert rope._inv_freq(50, torch.device("cpu")) is rope.inv_freq  # back under max: original frequencies


def test_qwen2_yarn_explicit_head_dim() -> None:
    # Qwen2.5 long-context recipe: yarn with factor 4 over the original context; head_dim given explicitly
    cfg = Qwen2Config(
        hidden_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        intermediate_size=256,
        num_hidden_layers=1,
        vocab_size=32,
        max_position_embeddings=MAX_POS,
        rope_parameters={
            "rope_type": "yarn",
            "factor": 4.0,
            "original_max_position_embeddings": MAX_POS,
            "rope_theta": 1e6,
        },
    )
    pos = torch.arange(200)
    cos, sin = ours(cfg, pos)
    hcos, hsin = hf_cos_sin(Qwen2RotaryEmbedding(cfg), pos)
    assert cos.shape == (200, 64)
    torch.testing.assert_close(cos, hcos, atol=ATOL, rtol=0)
    torch.testing.assert_close(sin, hsin, atol=ATOL, rtol=0)
    assert (cos - unscaled_cos(cfg, pos)).abs().max() > 1e-3


@pytest.mark.parametrize("name", ["linear", "llama3"])
def test_mistral_explicit_head_dim(name: str) -> None:
    params, max_pos = CASES[name]
    cfg = MistralConfig(
        hidden_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=48,  # != hidden_size // num_attention_heads
        intermediate_size=256,
        num_hidden_layers=1,
        vocab_size=32,
        max_position_embeddings=max_pos,
        rope_parameters={**params, "rope_theta": 1e6},
    )
    assert RopeConfig.from_hf(cfg).head_dim == 48
    pos = torch.arange(200)
    cos, sin = ours(cfg, pos)
    hcos, hsin = hf_cos_sin(MistralRotaryEmbedding(cfg), pos)
    assert cos.shape == (200, 48)
    torch.testing.assert_close(cos, hcos, atol=ATOL, rtol=0)
    torch.testing.assert_close(sin, hsin, atol=ATOL, rtol=0)
    assert (cos - unscaled_cos(cfg, pos)).abs().max() > 1e-3


def test_batched_positions_and_dtype() -> None:
    params, max_pos = CASES["yarn"]
    cfg = llama_config(params, max_pos)
    rope = Rope(RopeConfig.from_hf(cfg))
    pos = torch.stack([torch.arange(100, 110), torch.arange(180, 190)])  # (B, T)
    cos, sin = rope.cos_sin(pos, 190, torch.bfloat16)
    assert cos.shape == sin.shape == (2, 10, 32) and cos.dtype == torch.bfloat16
    hcos, hsin = LlamaRotaryEmbedding(cfg)(torch.zeros(1, dtype=torch.bfloat16), pos)
    torch.testing.assert_close(cos, hcos, atol=0, rtol=0)
    torch.testing.assert_close(sin, hsin, atol=0, rtol=0)


def test_v4_rope_scaling_layout() -> None:
    # transformers v4 configs: rope_scaling dict ('type' alias) + top-level rope_theta
    base = dict(hidden_size=128, num_attention_heads=4, max_position_embeddings=4 * MAX_POS, rope_theta=5e5)
    v4 = SimpleNamespace(
        **base, rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": MAX_POS}
    )
    params, max_pos = CASES["yarn"]
    assert RopeConfig.from_hf(v4) == RopeConfig.from_hf(llama_config(params, max_pos, theta=5e5))
    plain = RopeConfig.from_hf(SimpleNamespace(**base, rope_scaling=None))
    assert plain == RopeConfig(head_dim=32, theta=5e5, max_position_embeddings=4 * MAX_POS)
    linear = RopeConfig.from_hf(SimpleNamespace(**base, rope_scaling={"rope_type": "linear", "factor": 2.0}))
    assert (linear.rope_type, linear.factor) == ("linear", 2.0)


def test_partial_rotary_factor() -> None:
    cfg = SimpleNamespace(
        hidden_size=128,
        num_attention_heads=4,
        max_position_embeddings=MAX_POS,
        rope_theta=1e4,
        partial_rotary_factor=0.5,
        rope_scaling=None,
    )
    rope = Rope(RopeConfig.from_hf(cfg))
    assert rope.cfg.rotary_dim == 16
    cos, sin = rope.cos_sin(torch.arange(8), 8, torch.float32)
    assert cos.shape == (8, 16)
    x = torch.randn(2, 3, 8, 32)
    out = apply_rope(x, cos, sin)
    torch.testing.assert_close(out[..., 16:], x[..., 16:], atol=0, rtol=0)  # pass-through dims untouched
    torch.testing.assert_close(out[..., :16], apply_rope(x[..., :16].contiguous(), cos, sin))


@pytest.mark.parametrize("batched", [False, True])
def test_apply_rope_matches_hf(batched: bool) -> None:
    torch.manual_seed(0)
    cfg = llama_config(*CASES["yarn"][:1], CASES["yarn"][1])
    rope = Rope(RopeConfig.from_hf(cfg))
    B, H, KV, T, D = 2, 4, 2, 12, 32
    pos = torch.arange(150, 150 + T)
    if batched:
        pos = torch.stack([pos, pos + 7])  # (B, T)
    cos, sin = rope.cos_sin(pos, int(pos.max()) + 1, torch.float32)
    q, k = torch.randn(B, H, T, D), torch.randn(B, KV, T, D)
    hcos, hsin = (cos, sin) if batched else (cos[None].expand(B, T, D), sin[None].expand(B, T, D))
    hq, hk = apply_rotary_pos_emb(q, k, hcos, hsin)
    torch.testing.assert_close(apply_rope(q, cos, sin), hq, atol=1e-6, rtol=0)
    torch.testing.assert_close(apply_rope(k, cos, sin), hk, atol=1e-6, rtol=0)


def test_apply_rope_is_a_rotation() -> None:
    torch.manual_seed(0)
    rope = Rope(RopeConfig(head_dim=16, theta=10000.0))
    x = torch.randn(1, 2, 5, 16)
    cos, sin = rope.cos_sin(torch.arange(5), 5, torch.float32)
    y = apply_rope(x, cos, sin)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1))
    torch.testing.assert_close(y[:, :, 0], x[:, :, 0])  # position 0 is the identity


def test_unsupported_types_raise() -> None:
    longrope = llama_config(
        {
            "rope_type": "longrope",
            "short_factor": [1.0] * 16,
            "long_factor": [2.0] * 16,
            "original_max_position_embeddings": MAX_POS,
        },
        4 * MAX_POS,
    )
    with pytest.raises(ValueError, match="Unsupported rope_type 'longrope'"):
        RopeConfig.from_hf(longrope)
    mrope = SimpleNamespace(
        hidden_size=128,
        num_attention_heads=4,
        max_position_embeddings=MAX_POS,
        rope_theta=1e4,
        rope_scaling={"type": "mrope", "mrope_section": [4, 6, 6]},
    )
    with pytest.raises(ValueError, match="Unsupported rope_type 'mrope'"):
        RopeConfig.from_hf(mrope)
    with pytest.raises(ValueError, match="mrope_section"):
        RopeConfig.from_hf(
            SimpleNamespace(**{**vars(mrope), "rope_scaling": {"rope_type": "default", "mrope_section": [4, 6, 6]}})
        )
    with pytest.raises(ValueError, match="Unsupported rope_type"):
        RopeConfig(head_dim=32, theta=1e4, rope_type="su")


def test_from_hf_fields_and_defaults() -> None:
    """Parsed fields, each read from where transformers puts it (v5 rope_parameters, v4 top level), with the
    documented defaults when absent."""
    ns = SimpleNamespace(hidden_size=96, num_attention_heads=4)  # nothing else: every default
    rc = RopeConfig.from_hf(ns)
    assert (rc.head_dim, rc.theta, rc.max_position_embeddings, rc.rope_type, rc.partial_rotary_factor) == \
        (24, 10000.0, 2048, "default", 1.0)
    assert isinstance(rc.head_dim, int)
    v5 = SimpleNamespace(hidden_size=96, num_attention_heads=4, max_position_embeddings=512, rope_parameters={
        "rope_type": "yarn", "rope_theta": 5e5, "factor": 4.0, "partial_rotary_factor": 0.5})
    rc = RopeConfig.from_hf(v5)
    assert (rc.rope_type, rc.theta, rc.factor, rc.partial_rotary_factor, rc.beta_fast, rc.beta_slow) == \
        ("yarn", 5e5, 4.0, 0.5, 32.0, 1.0)
    # yarn without a factor: max_pos / original (the original context given at the top level, v4 style)
    v4 = SimpleNamespace(hidden_size=96, num_attention_heads=4, max_position_embeddings=512,
                         original_max_position_embeddings=128, rope_scaling={"type": "yarn"})
    rc = RopeConfig.from_hf(v4)
    assert (rc.factor, rc.original_max_position_embeddings) == (4.0, 128)
    l3 = SimpleNamespace(hidden_size=96, num_attention_heads=4, max_position_embeddings=512, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 2.0, "high_freq_factor": 6.0})
    rc = RopeConfig.from_hf(l3)
    assert (rc.low_freq_factor, rc.high_freq_factor) == (2.0, 6.0)
    with pytest.raises(ValueError, match="llama3 RoPE needs 'high_freq_factor'"):
        RopeConfig.from_hf(SimpleNamespace(**{**vars(l3), "rope_scaling": {"rope_type": "llama3", "factor": 8.0,
                                                                          "low_freq_factor": 2.0}}))
    with pytest.raises(ValueError, match="rope_type 'linear' needs a 'factor'"):
        RopeConfig.from_hf(SimpleNamespace(**{**vars(l3), "rope_scaling": {"rope_type": "linear"}}))
    with pytest.raises(ValueError, match="Per-layer-type RoPE parameters \\(keys \\['full_attention'"):
        RopeConfig.from_hf(SimpleNamespace(**{**vars(l3), "rope_parameters": {"full_attention": {}}}))


def test_rope_config_validation_edges() -> None:
    RopeConfig(head_dim=2, theta=1e4)  # the smallest rotary dim
    for kw, msg in ((dict(head_dim=0), "head_dim must be positive, got 0"),
                    (dict(head_dim=1), "rotary dim must be even and >= 2, got 1 \\(head_dim=1\\)"),
                    (dict(head_dim=8, partial_rotary_factor=0.0),
                     "partial_rotary_factor must be in \\(0, 1\\], got 0.0"),
                    (dict(head_dim=8, partial_rotary_factor=1.5), "partial_rotary_factor must be in"),
                    (dict(head_dim=6, partial_rotary_factor=0.5), "rotary dim must be even"),
                    (dict(head_dim=8, factor=0.0), "RoPE factor must be positive, got 0.0"),
                    (dict(head_dim=8, rope_type="llama3", low_freq_factor=4.0, high_freq_factor=4.0),
                     "llama3 RoPE needs high_freq_factor > low_freq_factor, got 4.0 <= 4.0"),
                    (dict(head_dim=8, rope_type="su"), "MSpecKV supports default, linear")):
        with pytest.raises(ValueError, match=msg):
            RopeConfig(theta=1e4, **kw)
    RopeConfig(head_dim=8, theta=1e4, low_freq_factor=4.0, high_freq_factor=4.0)  # only llama3 checks the pair


def test_yarn_factor_one_has_no_attention_scaling() -> None:
    rope = Rope(RopeConfig(head_dim=32, theta=1e4, rope_type="yarn", factor=1.0, max_position_embeddings=64))
    assert rope.attention_scaling == 1.0
    rope = Rope(RopeConfig(head_dim=32, theta=1e4, rope_type="yarn", factor=2.0, max_position_embeddings=64))
    assert rope.attention_scaling == pytest.approx(0.1 * math.log(2.0) + 1.0)
    rope = Rope(RopeConfig(head_dim=32, theta=1e4, rope_type="yarn", factor=0.5, max_position_embeddings=64))
    assert rope.attention_scaling == 1.0  # no scaling below factor 1
    rope = Rope(RopeConfig(head_dim=32, theta=1e4, rope_type="yarn", factor=2.0, attention_factor=2.0))
    cos, sin = rope.cos_sin(torch.arange(3), 3, torch.float32)
    assert torch.equal(cos[0], torch.full((32,), 2.0))  # position 0: cos = 1, times the attention factor


@pytest.mark.parametrize("prf", [1.0, 0.5])
def test_apply_rope_keeps_the_input_dtype(prf: float) -> None:
    rope = Rope(RopeConfig(head_dim=16, theta=1e4, partial_rotary_factor=prf))
    cos, sin = rope.cos_sin(torch.arange(4), 4, torch.float32)
    x = torch.randn(1, 2, 4, 16).to(torch.bfloat16)
    y = apply_rope(x, cos, sin)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), apply_rope(x.float(), cos, sin), atol=2e-2, rtol=0)


def test_fused_kernels_torch_reference_equals_apply_rope():
    """The fused RoPE kernel is checked on the GPU against ``rotate_half_torch``; that reference is the model's RoPE."""
    from mspeckv.model.fused import rotate_half_torch
    from mspeckv.model.rope import Rope, RopeConfig, apply_rope

    torch.manual_seed(0)
    rope = Rope(RopeConfig(head_dim=16, theta=10000.0))
    cos, sin = rope.cos_sin(torch.arange(3, 10), 10, torch.float32)  # (7, 16)
    for x in (torch.randn(2, 3, 7, 16), torch.randn(2, 7, 3, 16).transpose(1, 2)):
        assert torch.equal(rotate_half_torch(x, cos, sin), apply_rope(x, cos, sin))
    xb, cb16, sb16 = torch.randn(2, 3, 7, 16).bfloat16(), cos.bfloat16(), sin.bfloat16()  # bf16: same roundings
    assert rotate_half_torch(xb, cb16, sb16).dtype == torch.bfloat16
    assert torch.equal(rotate_half_torch(xb, cb16, sb16), apply_rope(xb, cb16, sb16))
    cb, sb = cos[None].expand(2, 7, 16), sin[None].expand(2, 7, 16)  # batched positions (B, T, D)
    assert torch.equal(rotate_half_torch(x, cb, sb), apply_rope(x, cb, sb))
