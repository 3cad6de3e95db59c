"""Greedy generation through a variant's cache, with the press applied before the first generated token.

The prompt minus its last token is prefilled, ``cache.compress()`` is called, and the last prompt token is fed
through the compressed/placed cache: so the first generated token, like every later one, is computed from the
compressed history (a prefill's own last logits would come from uncompressed attention). Times are wall-clock with
device synchronisation: TTFT = prefill + compress + first token; TPOT = decode seconds / tokens after the first;
setup = building the cache and capturing graphs, outside both.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..decoding.runner import GraphRunner, Runner, make_runner
from ..runs.harness import sync
from .variants import Variant, build_cache, kv_bytes


@dataclass
class Generated:
    tokens: list[int]
    ttft_s: float
    decode_s: float
    kv_bytes: int  # held right after the prompt (compressed), before any generated token is appended
    prompt_len: int
    kv_bytes_end: int | None = None  # held once the last generated token is fed too (feed_last=True)
    graphed: bool = False  # the decode steps replayed CUDA graphs (a static cache and graphs asked), but for...
    eager_steps: int = 0  # ... these, which the cache could not run statically (a flush, a slot fill)
    setup_s: float = 0.0  # building the cache before the prompt, capturing graphs after the first token

    @property
    def tpot_s(self) -> float | None:
        return self.decode_s / (len(self.tokens) - 1) if len(self.tokens) > 1 else None

    @property
    def tok_per_s(self) -> float | None:
        return (len(self.tokens) - 1) / self.decode_s if len(self.tokens) > 1 and self.decode_s > 0 else None


@torch.inference_mode()
def greedy(model, variant: Variant, ids: list[int], max_new: int, prefill_chunk: int = 1024,
           stop: Callable[[list[int]], bool] | None = None, stop_every: int = 8, eos: bool = True,
           feed_last: bool = False, graphs: bool = False) -> Generated:
    """Greedy tokens (EOS kept, if any) for one prompt; ``stop(tokens)`` is checked every ``stop_every`` tokens.
    ``feed_last``: after the timed loop, feed the last generated token too and count the bytes held then (the
    sequence is then ``len(ids) + max_new`` tokens long). ``graphs``: decode through a ``GraphRunner`` where the
    variant's cache has a static layout (captured before the timed loop; TTFT and decode time exclude it)."""
    device = model.device
    t_start = time.perf_counter()
    T = len(ids)
    if T < 1 or max_new < 1:
        raise ValueError(f"need a prompt and max_new >= 1 (got {T} tokens, max_new {max_new})")
    model.check_context(T + max_new)
    eos_ids = set(model.cfg.eos_token_ids) if eos else set()
    cache = build_cache(model, variant, 1, T + max_new, tail=max_new + 1, graphs=graphs)
    x = torch.tensor([ids], device=device)
    sync(device)
    t0 = time.perf_counter()
    if T > 1:
        model.prefill(x[:, :-1], cache, chunk=prefill_chunk)
    cache.compress()
    tok = model(x[:, -1:], cache)[:, -1].argmax(-1)
    out = [int(tok)]
    sync(device)
    t_first = time.perf_counter()
    held = kv_bytes(cache)
    n = cache.next_position()
    runner = make_runner(model, cache, n) if graphs else Runner(model, cache, n)
    if len(out) < max_new:
        runner.precapture([(1, 1)])
    sync(device)
    t1 = time.perf_counter()
    while len(out) < max_new and out[-1] not in eos_ids:
        tok = runner.step(tok[:, None])[:, -1].argmax(-1)
        out.append(int(tok))  # a host sync per token: the eval needs the token for EOS/stop checks anyway
        if stop is not None and len(out) % stop_every == 0 and stop(out):
            break
    sync(device)
    t_end = time.perf_counter()
    graphed = isinstance(runner, GraphRunner) and device.type == "cuda"
    eager = runner.eager_steps if graphed else 0  # timed steps only (the feed_last step below is not)
    end = None
    if feed_last:
        runner.step(tok[:, None])
        end = kv_bytes(cache)
    return Generated(out, t_first - t0, t_end - t1, held, T, end, graphed, eager, t0 - t_start + t1 - t_first)
