"""Low-rank KV in the style of Palu (Chang et al., 2024): per layer and KV head, an orthonormal basis ``P`` (D, r) from
the SVD of real keys/values (calibration), latents ``x @ P`` stored instead of rows, ``x ~= latent @ P^T`` on read.

RoPE: our caches receive keys after RoPE, so the key basis is fitted to post-RoPE keys and reconstruction needs no
RoPE re-application (Palu fits pre-RoPE keys and re-applies RoPE in a fused kernel; post-RoPE keys rotate with the
position, so they need a higher rank for the same error). ``v_only=True`` (the default) compresses only values.

Calibration (``mspeckv presses calibrate --model M --data FILE --out DIR``): prefill real text, take every layer's
K and V rows, and keep per head the top right-singular vectors: ``P_h = Vt_h[:r_max].T``. Saved as safetensors
(``layer.{i}.k`` / ``layer.{i}.v``, (H_kv, D, r_max) fp32); a press takes the first ``rank`` columns."""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import ClassVar

import torch
from torch import Tensor

from ..kv.quant import QuantSpec
from ..kv.stores import LowRank
from .base import Press, check_range


@lru_cache(maxsize=4)
def load_projections(path: str) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    p = Path(path)
    f = p / "projections.safetensors" if p.is_dir() else p
    if not f.is_file():
        raise FileNotFoundError(f"lowrank.calib: no calibration at {f}; make one with "
                                f"`mspeckv presses calibrate --model M --data FILE --out {p}`")
    return load_file(str(f))


@dataclass(frozen=True)
class LowRankPress(Press):
    name: ClassVar[str] = "lowrank"
    calib: str = ""  # calibration file or folder (projections.safetensors)
    rank: int = 0  # latent dimension; 0: from ratio
    ratio: float = 0.5  # rank = ceil(ratio * head_dim) when rank is 0
    v_only: bool = True
    latent_bits: int = 16  # 16: latents in the model dtype; 8: int8 latents (per token, groups of latent_group)
    latent_group: int = 32

    def __post_init__(self):
        if not self.calib:
            raise ValueError("lowrank.calib is required: the calibration file from `mspeckv presses calibrate`")
        check_range(self, "rank", 0)
        check_range(self, "ratio", 0.0, 1.0, kind=float)
        if self.latent_bits not in (8, 16):
            raise ValueError(f"lowrank.latent_bits must be 16 or 8, got {self.latent_bits!r}")
        if not isinstance(self.v_only, bool):
            raise ValueError(f"lowrank.v_only must be true or false, got {self.v_only!r}")
        check_range(self, "latent_group", 1)

    def rank_for(self, head_dim: int) -> int:
        return self.rank or max(1, math.ceil(self.ratio * head_dim))

    def projection(self, layer: int, kind: str, head_dim: int, device) -> Tensor:
        P = load_projections(self.calib)
        key = f"layer.{layer}.{kind}"
        if key not in P:
            raise ValueError(f"lowrank.calib {self.calib} has no '{key}': it was made for another model")
        r = self.rank_for(head_dim)
        if r > P[key].shape[-1]:
            raise ValueError(f"lowrank rank {r} exceeds the calibrated {P[key].shape[-1]}; calibrate with a larger "
                             f"--max-rank or lower the rank")
        return P[key][..., :r].to(device)

    def encode(self, layer, k, v, pos, obs):
        D = k.shape[-1]
        r = self.rank_for(D)
        lat = None
        if self.latent_bits == 8:
            lat = QuantSpec("int8", self.latent_group)
            if r % self.latent_group:
                raise ValueError(f"lowrank: rank {r} must be a multiple of latent_group {self.latent_group} for "
                                 f"int8 latents")
        vp = self.projection(layer, "v", D, k.device)
        kp = None if self.v_only else self.projection(layer, "k", D, k.device)
        return [LowRank.encode(k.clone() if self.v_only else k, v, pos, vp, kp, lat)]


@torch.inference_mode()
def calibrate(model, texts_ids: list[Tensor], max_rank: int | None = None, chunk: int = 1024) -> dict[str, Tensor]:
    """Per layer and KV head, the top right-singular vectors of the calibration rows: {'layer.i.k'|v: (H, D, r)}."""
    from ..kv.dense import DenseKV

    c = model.cfg
    r = max_rank or c.head_dim
    rows: dict[str, list[Tensor]] = {}
    for ids in texts_ids:
        cache = DenseKV.for_model(model, 1, ids.shape[1])
        model.prefill(ids.to(model.device), cache, chunk=chunk)
        for i in range(c.n_layers):
            for kind, x in zip("kv", cache.read(i), strict=True):  # (1, H, L, D)
                rows.setdefault(f"layer.{i}.{kind}", []).append(x[0].float().cpu())
    out = {}
    for key, xs in rows.items():
        X = torch.cat(xs, 1)  # (H, N, D)
        _, _, Vh = torch.linalg.svd(X, full_matrices=False)  # Vh (H, D, D): rows are right-singular vectors
        out[key] = Vh[:, :r].transpose(1, 2).contiguous()  # (H, D, r)
    return out
