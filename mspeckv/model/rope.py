"""Rotary position embeddings (RoPE) for Llama-family decoders, with the long-context scalings real checkpoints use.

Supported `rope_type`s: default, linear, dynamic (NTK), yarn, llama3. Parameters are read from a Hugging Face config,
either the transformers v5 layout (`config.rope_parameters = {'rope_type', 'rope_theta', 'factor', ...}`) or the v4
layout (`config.rope_scaling = {'type' | 'rope_type', 'factor', ...}` plus a top-level `config.rope_theta`).

Convention is the HF "rotate_half" one: the rotary dims are split into two halves [x1, x2], and the rotation of pair
(x1[i], x2[i]) uses frequency inv_freq[i]; cos/sin are laid out as cat(freqs, freqs).

Dynamic NTK is stateless here. For `seq_len > max_position_embeddings` the base becomes
    theta * (factor * seq_len / max_pos - (factor - 1)) ** (dim / (dim - 2))
and otherwise the original frequencies are used. HF's rotary module is stateful instead: it grows its frequencies
whenever max(position_ids) + 1 exceeds what it cached and resets only once a call is back under the original max.
The two agree whenever positions grow monotonically within one forward or across forwards (prefill then decode,
with `seq_len` = total length after the step), which is the decoding case. They differ if HF is fed a shorter
sequence after a longer one that is still above the original max (HF keeps the larger, stale scaling).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3")


@dataclass(frozen=True)
class RopeConfig:
    head_dim: int
    theta: float
    rope_type: str = "default"
    factor: float = 1.0
    max_position_embeddings: int = 2048
    original_max_position_embeddings: int | None = None  # yarn / llama3: pretraining context (None -> max_pos)
    partial_rotary_factor: float = 1.0  # rotate only the first int(head_dim * prf) dims of each head
    # yarn
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None  # None -> derived from factor (and mscale / mscale_all_dim if both set)
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True
    # llama3
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0

    def __post_init__(self) -> None:
        if self.rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(
                f"Unsupported rope_type {self.rope_type!r}; MSpecKV supports {', '.join(SUPPORTED_ROPE_TYPES)}."
            )
        if self.head_dim <= 0:
            raise ValueError(f"head_dim must be positive, got {self.head_dim}")
        if not 0.0 < self.partial_rotary_factor <= 1.0:
            raise ValueError(f"partial_rotary_factor must be in (0, 1], got {self.partial_rotary_factor}")
        if self.rotary_dim < 2 or self.rotary_dim % 2:
            raise ValueError(f"rotary dim must be even and >= 2, got {self.rotary_dim} (head_dim={self.head_dim})")
        if self.factor <= 0:
            raise ValueError(f"RoPE factor must be positive, got {self.factor}")
        if self.rope_type == "llama3" and self.high_freq_factor <= self.low_freq_factor:
            raise ValueError(
                f"llama3 RoPE needs high_freq_factor > low_freq_factor, got {self.high_freq_factor} <= "
                f"{self.low_freq_factor}"
            )

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def original_max(self) -> int:
        return self.original_max_position_embeddings or self.max_position_embeddings

    @classmethod
    def from_hf(cls, hf_config: Any) -> RopeConfig:
        """Build from a transformers config (v5 `rope_parameters` or v4 `rope_scaling` + `rope_theta`)."""
        params = getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None) or {}
        params = dict(params)
        if any(isinstance(v, dict) for v in params.values()):
            raise ValueError(
                f"Per-layer-type RoPE parameters (keys {sorted(params)}) are not supported; MSpecKV needs one global "
                "RoPE configuration."
            )
        rope_type = params.get("rope_type") or params.get("type") or "default"
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(
                f"Unsupported rope_type {rope_type!r} in the HF config; MSpecKV supports "
                f"{', '.join(SUPPORTED_ROPE_TYPES)} (not e.g. longrope, mrope, proportional)."
            )
        if params.get("mrope_section") is not None:
            raise ValueError("Multimodal RoPE (mrope_section) is not supported by MSpecKV.")

        head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
        theta = params.get("rope_theta") or getattr(hf_config, "rope_theta", None) or 10000.0
        prf = params.get("partial_rotary_factor") or getattr(hf_config, "partial_rotary_factor", None) or 1.0
        max_pos = int(getattr(hf_config, "max_position_embeddings", 2048))

        kw: dict[str, Any] = {}
        if rope_type in ("yarn", "llama3"):
            # a top-level attribute (Phi3-style) wins over the dict entry, as in transformers v5
            orig = getattr(hf_config, "original_max_position_embeddings", None)
            orig = orig or params.get("original_max_position_embeddings") or max_pos
            kw["original_max_position_embeddings"] = int(orig)
        factor = params.get("factor")
        if factor is None:
            if rope_type == "yarn":
                factor = max_pos / kw["original_max_position_embeddings"]
            elif rope_type != "default":
                raise ValueError(f"rope_type {rope_type!r} needs a 'factor' in the HF RoPE parameters")
            else:
                factor = 1.0
        if rope_type == "yarn":
            kw.update(
                beta_fast=float(params.get("beta_fast") or 32.0),
                beta_slow=float(params.get("beta_slow") or 1.0),
                attention_factor=params.get("attention_factor"),
                mscale=params.get("mscale"),
                mscale_all_dim=params.get("mscale_all_dim"),
                truncate=bool(params.get("truncate", True)),
            )
        elif rope_type == "llama3":
            for key in ("low_freq_factor", "high_freq_factor"):
                if params.get(key) is None:
                    raise ValueError(f"llama3 RoPE needs {key!r} in the HF RoPE parameters")
            kw.update(
                low_freq_factor=float(params["low_freq_factor"]), high_freq_factor=float(params["high_freq_factor"])
            )
        return cls(
            head_dim=int(head_dim),
            theta=float(theta),
            rope_type=rope_type,
            factor=float(factor),
            max_position_embeddings=max_pos,
            partial_rotary_factor=float(prf),
            **kw,
        )


def _base_inv_freq(theta: float, dim: int, device: torch.device | str | None) -> Tensor:
    # (dim/2,) fp32: theta^(-2i/dim)
    exponent = torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim
    return 1.0 / (theta**exponent)


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1.0 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn_inv_freq(cfg: RopeConfig, device: torch.device | str | None) -> tuple[Tensor, float]:
    dim, theta, factor = cfg.rotary_dim, cfg.theta, cfg.factor
    if cfg.attention_factor is not None:
        attn = float(cfg.attention_factor)
    elif cfg.mscale and cfg.mscale_all_dim:
        attn = _yarn_mscale(factor, cfg.mscale) / _yarn_mscale(factor, cfg.mscale_all_dim)
    else:
        attn = _yarn_mscale(factor)

    # dimension index whose wavelength makes `rotations` full turns over the original context
    def corr_dim(rotations: float) -> float:
        return dim * math.log(cfg.original_max / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    lo, hi = corr_dim(cfg.beta_fast), corr_dim(cfg.beta_slow)
    if cfg.truncate:
        lo, hi = math.floor(lo), math.ceil(hi)
    lo, hi = max(lo, 0), min(hi, dim - 1)
    if lo == hi:
        hi += 0.001

    freq = theta ** (torch.arange(0, dim, 2, device=device).float() / dim)  # (dim/2,) wavelengths / 2pi
    extrap = 1.0 / freq  # high-frequency dims: keep as trained
    interp = 1.0 / (factor * freq)  # low-frequency dims: position interpolation
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device=device) - lo) / (hi - lo)).clamp(0, 1)
    keep = 1 - ramp  # 1 -> pure extrapolation, 0 -> pure interpolation
    return interp * (1 - keep) + extrap * keep, attn


def _llama3_inv_freq(cfg: RopeConfig, device: torch.device | str | None) -> Tensor:
    inv_freq = _base_inv_freq(cfg.theta, cfg.rotary_dim, device)
    old_ctx, factor = cfg.original_max, cfg.factor
    lo_wavelen = old_ctx / cfg.low_freq_factor  # longer wavelengths: divide freq by factor
    hi_wavelen = old_ctx / cfg.high_freq_factor  # shorter wavelengths: unchanged
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > lo_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - cfg.low_freq_factor) / (cfg.high_freq_factor - cfg.low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= hi_wavelen) & (wavelen <= lo_wavelen)
    return torch.where(medium, smoothed, scaled)


class Rope:
    """Precomputed RoPE frequencies for one model; `cos_sin` is called once per forward and shared by all layers."""

    def __init__(self, cfg: RopeConfig, device: torch.device | str | None = None) -> None:
        self.cfg = cfg
        self.dim = cfg.rotary_dim
        self.attention_scaling = 1.0
        if cfg.rope_type == "yarn":
            inv_freq, self.attention_scaling = _yarn_inv_freq(cfg, device)
        elif cfg.rope_type == "llama3":
            inv_freq = _llama3_inv_freq(cfg, device)
        else:
            inv_freq = _base_inv_freq(cfg.theta, self.dim, device)
            if cfg.rope_type == "linear":
                inv_freq = inv_freq / cfg.factor
        self.inv_freq = inv_freq  # (dim/2,) fp32; for dynamic this is the unscaled set
        self._dyn: tuple[int, Tensor] | None = None  # dynamic NTK: (seq_len, inv_freq) of the last call

    def _inv_freq(self, seq_len: int, device: torch.device) -> Tensor:
        if self.inv_freq.device != device:
            self.inv_freq = self.inv_freq.to(device)
            self._dyn = None
        cfg = self.cfg
        if cfg.rope_type != "dynamic" or seq_len <= cfg.max_position_embeddings:
            return self.inv_freq
        if self._dyn is None or self._dyn[0] != seq_len:
            f, d = cfg.factor, self.dim
            # new base in fp32 on the host (a CPU scalar, no device sync): matches HF's rounding bit for bit
            s = torch.tensor(seq_len, dtype=torch.float32)
            base = float(cfg.theta * (f * s / cfg.max_position_embeddings - (f - 1)) ** (d / (d - 2)))
            self._dyn = (seq_len, _base_inv_freq(base, d, device))
        return self._dyn[1]

    def cos_sin(self, positions: Tensor, seq_len: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """positions: (T,) or (B, T) int absolute positions; seq_len: total length after this step (host int).

        Returns cos, sin of shape (..., T, rotary_dim) (rotary_dim == head_dim unless partial_rotary_factor < 1),
        scaled by `attention_scaling`, in `dtype`. Angles are computed in fp32; no host sync.
        """
        inv_freq = self._inv_freq(seq_len, positions.device)  # (dim/2,)
        freqs = positions[..., None].float() * inv_freq  # (..., T, dim/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (..., T, dim)
        cos, sin = emb.cos(), emb.sin()
        if self.attention_scaling != 1.0:
            cos, sin = cos * self.attention_scaling, sin * self.attention_scaling
        return cos.to(dtype), sin.to(dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x: (B, H, T, D); cos/sin: (T, R) or (B, T, R) with R <= D (R < D: only the first R dims rotate).

    HF rotate_half convention: out = x * cos + cat(-x2, x1) * sin over the rotary dims. Returns x's dtype.
    """
    if cos.dim() == 3:
        cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, R): broadcast over heads
    r = cos.shape[-1]
    xr = x[..., :r] if r < x.shape[-1] else x
    x1, x2 = xr[..., : r // 2], xr[..., r // 2 :]
    out = xr * cos + torch.cat((-x2, x1), dim=-1) * sin  # (B, H, T, R)
    if r < x.shape[-1]:
        out = torch.cat((out, x[..., r:].to(out.dtype)), dim=-1)
    return out.to(x.dtype)
