"""The cache factory, above storage (``kv/``) and policy (``presses/``): ``make_cache`` builds the backend a
``Placement`` implies, with a press over it when one is given; ``streaming_cache`` the draft's StreamingLLM cache;
``plan_placement`` picks a placement for a GPU KV budget.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import validate as v
from .kv.placement import Placement
from .kv.quant import QuantSpec


def make_cache(model, placement: Placement | None, batch: int, max_len: int, press=None,
               tail: int | None = None, compress_every: int | None = None, graphs: bool = False):
    """The one cache factory. The KV backend a placement implies (DenseKV when nothing is offloaded, else PlacedKV),
    and with a ``press`` (a Press or a spec string) a ``PressedKV`` over it: the prefill fills the backend, then
    ``cache.compress()`` presses it. ``tail`` rows (default ``max_len``) hold what is appended after a compress; the
    offloaded layers of the placement keep their pressed stores in pinned CPU memory.

    ``graphs``: ask for a static (CUDA-graph) layout: a ``StaticKV`` when every layer is on the GPU, a ``PlacedKV``
    in its static layout when layers are offloaded (its decode steps and verifications between flushes replay
    graphs; see ``kv/offload.py``). With a press: a static ``PressedKV`` when the press keeps dense rows (eviction
    only) and no layer is offloaded; its buffers hold ``press.max_rows(max_len)`` rows + ``tail`` per layer, the
    prefill still fills an ordinary cache, and ``compress()`` lays the kept rows into the static buffers. A press
    that stores codes or latents, an offloaded pressed layer, or a cache re-pressed every ``compress_every``
    tokens runs eagerly. ``cache.graphable`` says what was
    built, and ``decoding.runner.make_runner`` follows it."""
    from .kv.dense import DenseKV

    c = model.cfg
    placement = placement or Placement()
    if not isinstance(placement, Placement):
        raise v.ConfigError(f"placement must be a Placement or None, got {placement!r}")
    if placement.n_on_chip(c.n_layers) == c.n_layers:
        placement.validate(c.n_layers, c.head_dim)  # e.g. resident layers with nothing offloaded: an error
        if graphs and press is None:
            from .kv.static import StaticKV

            return StaticKV.for_model(model, max_len, batch=batch)
        inner = DenseKV.for_model(model, batch, max_len)
    else:
        from .kv.offload import PlacedKV  # validates the placement itself

        inner = PlacedKV(c.n_layers, c.n_kv_heads, c.head_dim, placement, batch, max_len, model.dtype, model.device,
                         static=graphs and press is None)
    if press is None:
        return inner
    from .kv.pressed import PressedKV
    from .presses import parse_press

    press = parse_press(press)
    off = frozenset(range(placement.n_on_chip(c.n_layers), c.n_layers))
    static = graphs and press.dense and not off and compress_every is None
    cap = press.max_rows(max_len, c.n_layers, c.n_kv_heads) if static else 0
    return PressedKV(press, c.n_layers, batch, c.n_kv_heads, c.head_dim, tail or max_len, model.dtype, model.device,
                     inner=inner, offload=off, compress_every=compress_every, static=static, fixed_cap=cap)


def streaming_cache(model, *, sinks: int, window: int, room: int, slack: int | None = None, static: bool = False):
    """The draft's StreamingLLM cache: ``sinks`` first rows + the newest ``window``, re-pressed only when a forward
    (or ``reserve``) would overflow ``room + slack`` appended rows, so rollbacks within a round are exact. ``slack``
    (default window // 4) amortises the re-press."""
    from .kv.pressed import PressedKV
    from .presses.streaming import StreamingLLMPress

    if room < 1:
        raise ValueError(f"room must be >= 1 (the largest forward fed to this cache), got {room}")
    slack = max(window // 4, 0) if slack is None else slack
    c = model.cfg
    press = StreamingLLMPress(budget=sinks + window, sinks=sinks)
    return PressedKV(press, c.n_layers, 1, c.n_kv_heads, c.head_dim, room + slack, model.dtype, model.device,
                     static=static, fixed_cap=sinks + window, compress_every=room + slack)


# ------------------------------------------------------------------------------------------- batch memory budget
WORKSPACE = 2 << 30  # GPU bytes kept for activations, logits, the graph pool (with --gpu-memory)


def weight_bytes(model_cfg, dtype_bytes: int) -> int:
    """Bytes of a model's weights from its config alone (before anything loads)."""
    c = model_cfg
    q, kv = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    attn = c.dim * (q + 2 * kv) + q * c.dim + (q + 2 * kv if c.qkv_bias else 0)
    layer = attn + 3 * c.dim * c.intermediate + 2 * c.dim
    embed = c.vocab_size * c.dim * (1 if c.tie_embeddings else 2)
    return (c.n_layers * layer + embed + c.dim) * dtype_bytes


def batch_memory(model_cfg, slots: int, capacity: int, dtype_bytes: int) -> dict[str, int]:
    """What a batched run allocates on the GPU: weights, a ``BatchKV`` of ``slots`` x ``capacity`` rows, workspace."""
    from .kv.batch import kv_bytes

    w, kv = weight_bytes(model_cfg, dtype_bytes), kv_bytes(model_cfg, slots, capacity, dtype_bytes)
    return {"weights": w, "kv": kv, "workspace": WORKSPACE, "total": w + kv + WORKSPACE}


def check_gpu_memory(model_cfg, slots: int, capacity: int, dtype_bytes: int, budget_gb: float | None,
                     flag: str = "--gpu-memory") -> dict[str, int]:
    """Refuse, before anything allocates, a batched run that exceeds ``budget_gb`` (None: no cap)."""
    m = batch_memory(model_cfg, slots, capacity, dtype_bytes)
    if budget_gb is not None and m["total"] > budget_gb * 1e9:
        fit = max(0, int((budget_gb * 1e9 - m["weights"] - m["workspace"]) // (m["kv"] / slots)))
        raise ValueError(
            f"{flag} {budget_gb:g} GB is too small: weights {m['weights'] / 1e9:.2f} GB + KV {m['kv'] / 1e9:.2f} GB "
            f"({slots} sequences x {capacity} rows) + workspace {m['workspace'] / 1e9:.1f} GB = "
            f"{m['total'] / 1e9:.2f} GB; raise it, or run at most {fit} sequences of this length at once")
    return m


def offload_placement(model_cfg, weight_bytes: int, batch: int, capacity: int, dtype_bytes: int, budget_gb: float):
    """The most on-chip layers that fit the budget beside the weights, the workspace and two bf16 staging layers; the
    rest streamed in bf16 from pinned memory (lossless)."""
    layer = 2 * batch * capacity * model_cfg.n_kv_heads * model_cfg.head_dim * dtype_bytes
    free = budget_gb * 1e9 - weight_bytes - WORKSPACE - 2 * layer
    on_chip = int(max(0, min(model_cfg.n_layers - 1, free // layer)))
    if free < 0:
        raise ValueError(f"--gpu-memory {budget_gb:g} GB cannot hold the weights, the workspace and two staging layers "
                         f"({2 * layer / 1e9:.1f} GB) at {batch} x {capacity}")
    return Placement(on_chip=on_chip)


# ------------------------------------------------------------------------------------------------------- planner
@dataclass(frozen=True)
class Plan:
    placement: Placement
    gpu_kv_bytes: int  # on-chip KV + resident slots + staging, predicted
    pinned_bytes: int
    h2d_bytes_per_token: int  # predicted bytes streamed per decode step at this context
    note: str


def plan_placement(model_cfg, context: int, gpu_kv_budget: int, batch: int = 1, dtype_bytes: int = 2,
                   group_size: int = 64, prefer_quant: str = "int8") -> Plan:
    """Pick on_chip, resident_layers and kv_quant so the GPU-side KV fits ``gpu_kv_budget`` bytes.

    Greedy on the decode-time equation t ~ gpu_time + streamed_bytes / B_pcie: keep as many layers on chip as fit;
    if anything is offloaded, quantize it (``prefer_quant``), then spend what is left on resident layers (stored
    in the ``quant`` resident format, which fits more layers per byte than bf16 copies).
    """
    c = model_cfg
    v.integer("context", context, lo=1)
    v.integer("batch", batch, lo=1)
    v.integer("kv_group_size", group_size, lo=1)
    v.number("gpu_kv_budget", gpu_kv_budget, lo=0, lo_open=True)
    elems = batch * c.n_kv_heads * c.head_dim * context * 2  # K and V elements of one layer
    layer_bf16 = elems * dtype_bytes
    if layer_bf16 * c.n_layers <= gpu_kv_budget:
        return Plan(Placement(), layer_bf16 * c.n_layers, 0, 0, "the whole KV fits on the GPU")
    spec = QuantSpec(prefer_quant, group_size)
    layer_q = int(elems * spec.bytes_per_element())
    # what PlacedKV allocates to stream a quantized layer: one bf16 layer (the dequantized view) and a ring of code
    # buffers (at most two bf16 layers' bytes: see offload.code_stages); bf16 streaming would take two bf16 layers
    from .kv.offload import code_stages

    staging = layer_bf16 + code_stages(layer_bf16, layer_q, c.n_layers) * layer_q
    on_chip = int(max(0, min(c.n_layers - 1, (gpu_kv_budget - staging) // layer_bf16)))
    if on_chip == 0 and gpu_kv_budget < staging:
        raise ValueError(
            f"--gpu-kv-budget {gpu_kv_budget / 2**30:.2f} GiB cannot hold even the staging buffers for one "
            f"streamed layer ({staging / 2**30:.2f} GiB at context {context}); raise it or shorten the context"
        )
    n_off = c.n_layers - on_chip
    left = gpu_kv_budget - staging - on_chip * layer_bf16
    resident = int(min(n_off, max(0, left) // layer_q))
    p = Placement(on_chip=on_chip, kv_quant=prefer_quant, kv_group_size=group_size, resident_layers=resident,
                  resident_format="quant", resident_policy="static")
    gpu = on_chip * layer_bf16 + resident * layer_q + staging
    h2d = (n_off - resident) * layer_q
    return Plan(p, gpu, n_off * layer_q, h2d,
                f"{on_chip} layers fit on chip; {n_off} streamed as {prefer_quant}, {resident} of them resident")
