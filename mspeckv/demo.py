"""The demo's library side: the memory it needs (checked before any weight loads) and the row that pays on a CPU.

``mspeckv demo`` (``cli.cmd_demo``) compares AR with speculation on the embedded pair. On a CPU speculation cannot pay
(a forward costs about its tokens' compute), so the demo adds one row that does pay there: the same greedy AR output
from a prompt KV held several times smaller by a press, with the bytes measured from the cache itself.
"""

from __future__ import annotations

from dataclasses import dataclass

from .runs.harness import mem_available as available_bytes  # the name the memory check calls (tests patch it)

GB = 1 << 30
# Resident memory beyond the weights: the Python runtime with torch and transformers imported, the tokenizer,
# activations of a 512-token prefill chunk, logits and the KV caches. Measured 0.64 GiB over the pair's 4.48 GiB of
# bf16 weights (peak RSS 5.12 GiB, results/demo/memory.md); 0.8 GiB leaves room for another prompt.
DEMO_OVERHEAD_BYTES = int(0.8 * GB)
# The row that pays on a CPU: KIVI int4 keys and values in groups of 32, the newest 32 rows kept in full precision.
DEMO_PRESS = "kivi:k_bits=4,v_bits=4,group_size=32,residual=32"


def param_count(cfg) -> int:
    """Parameters of a decoder with ``ModelConfig`` ``cfg`` (embedding, blocks, final norm, untied head)."""
    d, hd = cfg.dim, cfg.head_dim
    q, kv = cfg.n_heads * hd, cfg.n_kv_heads * hd
    attn = d * q + 2 * d * kv + q * d + (q + 2 * kv if cfg.qkv_bias else 0) + (d if cfg.o_bias else 0)
    mlp = 3 * d * cfg.intermediate + ((2 * cfg.intermediate + d) if cfg.mlp_bias else 0)
    block = attn + mlp + 2 * d
    emb = cfg.vocab_size * d
    return emb + cfg.n_layers * block + d + (0 if cfg.tie_embeddings else emb)


@dataclass(frozen=True)
class MemoryNeed:
    weights_bytes: int
    overhead_bytes: int
    available_bytes: int | None

    @property
    def total(self) -> int:
        return self.weights_bytes + self.overhead_bytes

    @property
    def short(self) -> bool:
        return self.available_bytes is not None and self.available_bytes < self.total


def memory_need(cfgs, dtype_bytes: int, overhead: int = DEMO_OVERHEAD_BYTES) -> MemoryNeed:
    """What loading models of configs ``cfgs`` in ``dtype_bytes`` per weight and running the demo needs."""
    return MemoryNeed(sum(param_count(c) for c in cfgs) * dtype_bytes, overhead, available_bytes())


class NotEnoughMemoryError(ValueError):
    """The machine has less memory available than a command needs; raised before any weight loads."""


def check_memory(need: MemoryNeed, what: str = "the demo") -> None:
    """Refuse before any weight loads when the machine has less memory available than ``need`` (one clear line)."""
    if need.short:
        raise NotEnoughMemoryError(
            f"{what} needs about {need.total / GB:.1f} GiB of memory ({need.weights_bytes / GB:.1f} GiB of weights + "
            f"{need.overhead_bytes / GB:.1f} GiB for the rest) and {need.available_bytes / GB:.1f} GiB is "
            f"available; close other programs, or run a smaller pair (--model/--draft, e.g. --mode vanilla with "
            f"--model qwen2.5-coder-0.5b --draft qwen2.5-coder-0.5b)")


@dataclass(frozen=True)
class PressRow:
    """The press row: AR over a pressed prompt KV against AR over the full one."""

    result: object  # GenerationResult
    press: str
    prompt_kv_bytes: int  # what the press holds for the prompt (codes, scales, full-precision rows)
    full_prompt_kv_bytes: int  # the same prompt in the model's dtype, unpressed
    kv_bytes: int  # everything the pressed cache allocated (incl. the tail for new tokens)
    identical: bool
    first_difference: int | None  # index of the first generated token that differs from AR's

    @property
    def ratio(self) -> float:
        return self.full_prompt_kv_bytes / max(self.prompt_kv_bytes, 1)


def press_row(model, ids: list[int], gen, ar_tokens: list[int], press: str = DEMO_PRESS) -> PressRow:
    """Greedy AR with ``press`` applied to the prompt's KV after prefill; compares its tokens with ``ar_tokens``."""
    import torch

    from .cache import make_cache
    from .decoding.autoregressive import generate

    cache = make_cache(model, None, 1, len(ids) + gen.max_new_tokens, press=press)
    res = generate(model, torch.tensor([ids]), gen, cache=cache)
    rep = cache.memory_report()
    held = rep.get("store_bytes", 0) + rep.get("shared_bytes", 0)
    full = len(ids) * model.cfg.kv_bytes_per_token(model.dtype.itemsize)
    toks = res.tokens[0]
    diff = next((i for i, (x, y) in enumerate(zip(toks, ar_tokens, strict=False)) if x != y), None)
    if diff is None and len(toks) != len(ar_tokens):
        diff = min(len(toks), len(ar_tokens))
    return PressRow(res, press, held, full, rep.get("kv_bytes", held), diff is None, diff)
