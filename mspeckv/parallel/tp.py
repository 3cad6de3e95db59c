"""Tensor-parallel sharding of a ``CausalLM`` (Megatron style), and the check that ranks stay in lockstep.

Each rank holds an ordinary ``CausalLM`` whose ``ModelConfig`` has the rank's share of the heads and of the MLP:
    n_heads / world, n_kv_heads / world, intermediate / world
so the attention, the RoPE and every KV cache (``make_cache``: dense, static, offloaded, quantized, resident, pressed)
run unchanged on each rank over that rank's KV heads. The weights are split as:
    q_proj, k_proj, v_proj, gate_proj, up_proj   column-parallel: rank r keeps rows [r*n/world, (r+1)*n/world) of
                                                 the weight (and bias): its query heads, KV heads, MLP columns
    o_proj, down_proj                             row-parallel (``RowParallelLinear``): rank r keeps the matching
                                                 columns; partial outputs are summed by one all-reduce, then the
                                                 bias (if any) is added once
    embeddings, norms, LM head, RoPE tables       replicated (Llama-2-7B: 2 x 32000 x 4096 bf16 = 500 MiB per rank)
Query head h belongs to KV head h // G (the model's GQA fold), and a rank's query heads are a contiguous range of
``n_heads / world`` heads, so every GQA group stays whole on one rank. A block therefore costs two all-reduces of
(B, T, dim): one after attention, one after the MLP. After each all-reduce every rank holds the same hidden state,
so every rank computes the same logits and, sampling with the same seeded generator, draws the same tokens: nothing
else is communicated. ``check_ranks_agree`` verifies that at the end of a generation.
"""

from __future__ import annotations

import hashlib
import json
import os
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from ..model.llama import CausalLM, ModelConfig
from ..model.rope import Rope
from . import RanksDiverged

COLUMN_PARALLEL = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")  # output features split (weight, bias)
ROW_PARALLEL = ("o_proj", "down_proj")  # input features split (weight); bias replicated, added after the reduce


@dataclass(frozen=True)
class TPInfo:
    rank: int
    world: int
    full: ModelConfig  # the unsharded model's config (the rank's own is ``model.cfg``)


# ------------------------------------------------------------------------------------------------------ checks
def valid_tp(cfg: ModelConfig) -> list[int]:
    """The tensor-parallel sizes this model can be split into (whole KV heads and MLP columns per rank)."""
    return [t for t in range(1, cfg.n_kv_heads + 1) if cfg.n_kv_heads % t == 0 and cfg.intermediate % t == 0]


def check_tp(cfg: ModelConfig, world, flag: str = "--tp") -> None:
    """One clear error when ``world`` ranks cannot each hold whole KV heads (GQA groups) and MLP columns."""
    if isinstance(world, bool) or not isinstance(world, int) or world < 1:
        raise ValueError(f"{flag} must be an integer >= 1, got {world!r}")
    ok = ", ".join(map(str, valid_tp(cfg)))
    if cfg.n_kv_heads % world:
        raise ValueError(f"{flag} {world} does not divide the model's {cfg.n_kv_heads} KV heads (each rank keeps "
                         f"whole KV heads with their query heads, so GQA groups stay on one rank); use {flag} {ok}")
    if cfg.intermediate % world:
        raise ValueError(f"{flag} {world} does not divide the model's MLP width {cfg.intermediate}; use {flag} {ok}")


def shard_config(cfg: ModelConfig, world: int) -> ModelConfig:
    """The config of one rank's share: local query heads, KV heads and MLP width (what the planner sizes)."""
    check_tp(cfg, world)
    return replace(cfg, n_heads=cfg.n_heads // world, n_kv_heads=cfg.n_kv_heads // world,
                   intermediate=cfg.intermediate // world)


# ------------------------------------------------------------------------------------------------ collectives
class _Comm:
    enabled = True  # False: all-reduces are skipped (timing the step without communication; results are wrong)
    count = 0  # all-reduces issued by this process (the failure hook counts them)
    fail: tuple | None = None  # test hook (MSPECKV_TP_FAIL=RANK:N:exit|raise|hang[:ONCE_FILE])
    fail_read = False


def _fail_hook() -> None:
    """Test-only: ``MSPECKV_TP_FAIL=RANK:N:MODE[:ONCE_FILE]`` makes rank RANK exit (``exit``: os._exit(3)), raise
    (``raise``) or stop responding (``hang``) at its N-th all-reduce, in the middle of a forward while its peers wait
    in the same collective. With ONCE_FILE it fires only if that file does not exist yet (and creates it), so a
    relaunch runs clean."""
    if not _Comm.fail_read:
        _Comm.fail_read = True
        spec = os.environ.get("MSPECKV_TP_FAIL")
        if spec:
            r, n, mode, *once = spec.split(":", 3)
            _Comm.fail = (int(r), int(n), mode, once[0] if once else None)
    _Comm.count += 1
    f = _Comm.fail
    if f is None or dist.get_rank() != f[0] or _Comm.count != f[1]:
        return
    if f[3] is not None:
        if os.path.exists(f[3]):
            return
        Path(f[3]).touch()
    if f[2] == "exit":
        os._exit(3)
    if f[2] == "hang":
        import time

        time.sleep(3600)
    raise RuntimeError(f"injected failure at all-reduce {f[1]} (MSPECKV_TP_FAIL)")


def all_reduce(x: Tensor) -> Tensor:
    """Sum ``x`` over the ranks in place (NCCL or gloo); capturable in a CUDA graph with NCCL."""
    _fail_hook()
    if _Comm.enabled:
        dist.all_reduce(x)
    return x


@contextmanager
def no_collectives():
    """Skip the all-reduces inside (each rank computes alone): the step's time without communication."""
    _Comm.enabled = False
    try:
        yield
    finally:
        _Comm.enabled = True


class RowParallelLinear(nn.Module):
    """``y = all_reduce(x_local @ W_local^T) + b``: the output projection of a sharded attention or MLP. Parameter
    names (``weight``, ``bias``) match ``nn.Linear`` so state dicts keep Hugging Face's names."""

    def __init__(self, in_local: int, out_features: int, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_local))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        y = all_reduce(F.linear(x, self.weight))
        return y if self.bias is None else y + self.bias


# ------------------------------------------------------------------------------------------------- sharding
def shard_dim(name: str) -> int | None:
    """The dimension a parameter is split along (None: replicated)."""
    parts = name.split(".")
    if len(parts) < 2:
        return None
    if parts[-2] in COLUMN_PARALLEL:
        return 0
    if parts[-2] in ROW_PARALLEL and parts[-1] == "weight":
        return 1
    return None


def shard_tensor(name: str, t, rank: int, world: int):
    """Rank ``rank``'s slice of a full parameter (a Tensor, or a safetensors slice: read only that part)."""
    d = shard_dim(name)
    if d is None or world == 1:
        return t
    shape = t.shape if isinstance(t, Tensor) else t.get_shape()
    n = shape[d] // world
    return t[rank * n:(rank + 1) * n] if d == 0 else t[:, rank * n:(rank + 1) * n]


def build_rank_model(full: ModelConfig, rank: int, world: int, device, dtype) -> CausalLM:
    """An uninitialised rank model: local heads and MLP width, row-parallel output projections."""
    local = shard_config(full, world)
    with torch.device("meta"):
        m = CausalLM(local)
        for blk in m.model.layers:
            blk.self_attn.o_proj = RowParallelLinear(local.n_heads * local.head_dim, local.dim, local.o_bias)
            blk.mlp.down_proj = RowParallelLinear(local.intermediate, local.dim, local.mlp_bias)
    m = m.to_empty(device=device).to(dtype)
    m.rope = Rope(local.rope, device=device)
    if local.tie_embeddings:
        m.lm_head.weight = m.model.embed_tokens.weight
    m.fuse_projections()
    m.tp = TPInfo(rank, world, full)
    return m.eval()


@torch.no_grad()
def shard_model(model: CausalLM, rank: int, world: int) -> CausalLM:
    """Rank ``rank``'s share of a full model (world 1: the model itself), on the model's device and dtype."""
    if world == 1:
        return model
    m = build_rank_model(model.cfg, rank, world, model.device, model.dtype)
    full = model.state_dict()
    for name, p in m.state_dict().items():
        p.copy_(shard_tensor(name, full[name], rank, world))
    return m


def shape_config(shape: str) -> ModelConfig:
    """The ``ModelConfig`` of a named random shape (``model.api.RANDOM_SHAPES``)."""
    from transformers import AutoConfig

    from ..model.api import RANDOM_SHAPES

    if shape not in RANDOM_SHAPES:
        raise ValueError(f"unknown random shape '{shape}'; choose one of {sorted(RANDOM_SHAPES)}")
    kw = dict(RANDOM_SHAPES[shape])
    return ModelConfig.from_hf(AutoConfig.for_model(kw.pop("model_type"), **kw))


@torch.no_grad()
def random_tp_model(shape: str | ModelConfig, rank: int, world: int, device=None, dtype=None,
                    seed: int = 0) -> CausalLM:
    """Rank ``rank``'s share of ``random_model(shape, seed=seed)``: the same full weights as TP=1 (each full
    parameter is drawn in the same order from the same generator, then sliced), built on the rank's device one
    parameter at a time (peak: the rank's share plus the largest full parameter). ``shape`` may be the shape's
    ``ModelConfig`` (``shape_config``), which spares a rank importing transformers."""
    from ..model.api import default_dtype, parse_device, parse_dtype

    cfg = shape_config(shape) if isinstance(shape, str) else shape
    device = parse_device(device) if not isinstance(device, torch.device) else device
    dtype = parse_dtype(dtype) or default_dtype(device)
    if world == 1:  # the plain model, no row-parallel layers
        with torch.device("meta"):
            m = CausalLM(cfg)
        m = m.to_empty(device=device).to(dtype)
        m.rope = Rope(cfg.rope, device=device)
        if cfg.tie_embeddings:
            m.lm_head.weight = m.model.embed_tokens.weight
        m.fuse_projections()
        m.eval()
    else:
        m = build_rank_model(cfg, rank, world, device, dtype)
    with torch.device("meta"):
        order = CausalLM(cfg)  # names and shapes in random_model's order (tied weights listed once)
    own = dict(m.named_parameters())
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    for name, p in order.named_parameters():
        if name.endswith("norm.weight"):
            own[name].fill_(1.0)
            continue
        full = torch.empty(p.shape, dtype=dtype, device=device).normal_(0.0, 0.02, generator=g)
        own[name].copy_(shard_tensor(name, full, rank, world))
    return m


@torch.no_grad()
def load_tp(directory: str | Path, rank: int, world: int, device, dtype=None) -> CausalLM:
    """Rank ``rank``'s share of the safetensors checkpoint in ``directory`` (a resolved model directory): each rank
    reads only its slices (``safe_open(...).get_slice``)."""
    from transformers import AutoConfig

    from ..model.api import default_dtype, load_model, parse_dtype

    if world == 1:
        return load_model(directory, device, dtype, progress=False)[0]
    d = Path(directory)
    dtype = parse_dtype(dtype) or default_dtype(device)
    m = build_rank_model(ModelConfig.from_hf(AutoConfig.from_pretrained(d)), rank, world, device, dtype)

    def take(name, fh):  # this rank's slice of a split tensor, a replicated one whole
        return shard_tensor(name, fh.get_slice(name), rank, world) if shard_dim(name) is not None else \
            fh.get_tensor(name)

    return m.load_safetensors(d, take=take)


def replicated_bytes(model: CausalLM) -> int:
    """Bytes every rank holds in full: embeddings, LM head (once if tied), norms and biases that are not split."""
    seen, n = set(), 0
    for name, p in model.named_parameters():
        if shard_dim(name) is None and id(p) not in seen:
            seen.add(id(p))
            n += p.numel() * p.element_size()
    return n


# ---------------------------------------------------------------------------------------------------- lockstep
def comm_device() -> torch.device:
    """Where this process group's collectives take tensors (NCCL: the current GPU; gloo: the CPU)."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def check_ranks_agree(value, what: str) -> None:
    """Raise ``RanksDiverged`` on every rank unless every rank passes an equal ``value`` (JSON-serialisable).
    One all-gather of an 8-byte hash; a no-op outside a process group or with one rank."""
    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
        return
    h = int.from_bytes(hashlib.sha256(json.dumps(value).encode()).digest()[:7], "little")
    mine = torch.tensor([h], dtype=torch.int64, device=comm_device())
    out = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(out, mine)
    hs = [int(x) for x in out]
    if bad := [r for r, x in enumerate(hs) if x != hs[0]]:
        raise RanksDiverged(f"tensor-parallel ranks diverged: the {what} of rank(s) {', '.join(map(str, bad))} "
                            f"differ from rank 0's; every rank must compute the same logits and draw the same "
                            f"random numbers (same seed), so a non-deterministic kernel or an unseeded sampler is "
                            f"at fault")


def tp_generate(model, input_ids: Tensor, gen, **kw):
    """``decoding.autoregressive.generate`` on every rank, then the check that all ranks produced the same tokens."""
    from ..decoding.autoregressive import generate

    res = generate(model, input_ids, gen, **kw)
    check_ranks_agree(res.tokens, "generated tokens")
    return res


def tp_speculative_generate(target, draft, prompt: Tensor, gen, spec, **kw):
    """``speculative_generate`` on every rank (the draft replicated, the target sharded), then the check that all
    ranks accepted the same tokens."""
    from ..decoding.speculative import speculative_generate

    res = speculative_generate(target, draft, prompt, gen, spec, **kw)
    check_ranks_agree({"tokens": res.tokens, "accepted": {k: v["accepted"] for k, v in res.levels.items()}},
                      "generated tokens and accept counts")
    return res


def tp_generate_batch(model, prompts, gen, **kw):
    """``decoding.batch.generate_batch`` (many prompts, a length each) on every rank over its shard, then the check
    that all ranks produced the same tokens for every sequence."""
    from ..decoding.batch import generate_batch

    res = generate_batch(model, prompts, gen, **kw)
    check_ranks_agree([s.tokens for s in res.seqs], "generated tokens")
    return res


def tp_generate_batch_spec(target, draft, prompts, gen, spec, **kw):
    """``decoding.batch_spec.generate_batch_spec`` on every rank (the target sharded, a draft model replicated; self
    drafts with the rank's shard over a window of its own KV heads), then the check that all ranks generated and
    accepted the same. The cost model (``spec.auto``) is refused: each rank would time its own forwards and could pick
    another γ, and ranks whose forwards differ in shape cannot meet in an all-reduce."""
    from ..decoding.batch_spec import generate_batch_spec

    if spec.auto and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        raise ValueError("the cost model's γ (auto) is not supported under tensor parallelism yet: each rank would "
                         "pick from its own timings; give a fixed gamma")
    res = generate_batch_spec(target, draft, prompts, gen, spec, **kw)
    check_ranks_agree({"tokens": [s.tokens for s in res.seqs], "accepted": res.stats["acceptance"]},
                      "generated tokens and acceptance")
    return res
