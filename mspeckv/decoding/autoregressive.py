"""Autoregressive decoding: chunked prefill, then one token per forward. The baseline every speedup is measured from."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..cache import make_cache
from ..config import GenerationConfig
from .runner import Runner, make_runner, use_graphs
from .sampling import make_generator, next_token


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class GenerationResult:
    tokens: list[list[int]]  # generated ids per row, cut after the first EOS (EOS kept)
    prompt_len: int
    prefill_s: float
    ttft_s: float  # prefill + first token
    decode_s: float  # every token after the first
    stats: dict = field(default_factory=dict)
    setup_s: float = 0.0  # outside TTFT and decode: building the caches and capturing graphs

    @property
    def e2e_s(self) -> float:
        """The request end to end: setup + TTFT (prefill and first token) + decode."""
        return self.setup_s + self.ttft_s + self.decode_s

    @property
    def e2e_tok_per_s(self) -> float:
        """Generated tokens per second of the whole request (setup and prefill included)."""
        return self.n_generated / self.e2e_s if self.e2e_s > 0 else float("nan")

    @property
    def n_generated(self) -> int:
        return sum(len(t) for t in self.tokens)

    @property
    def decode_steps(self) -> int:
        """Forwards after the first token (includes steps past EOS that ran before the host noticed)."""
        return self.stats.get("forwards", max(len(t) for t in self.tokens)) - 1

    @property
    def ms_per_token(self) -> float:
        """Mean ms per decoded token after the first (one forward each for AR)."""
        return 1e3 * self.decode_s / max(self.decode_steps, 1)

    @property
    def tok_per_s(self) -> float:
        """Generated tokens per second of decoding, first token excluded (it is part of TTFT)."""
        return (self.n_generated - len(self.tokens)) / self.decode_s if self.decode_s > 0 else float("nan")

    def summary(self) -> dict:
        return {"prompt_len": self.prompt_len, "n_generated": self.n_generated, "prefill_s": self.prefill_s,
                "ttft_s": self.ttft_s, "decode_s": self.decode_s, "ms_per_token": self.ms_per_token,
                "tok_per_s": self.tok_per_s, "setup_s": self.setup_s, "e2e_s": self.e2e_s,
                "e2e_tok_per_s": self.e2e_tok_per_s, **self.stats}


def trim_at_eos(rows: list[list[int]], eos: set[int]) -> list[list[int]]:
    out = []
    for r in rows:
        cut = next((i for i, t in enumerate(r) if t in eos), None)
        out.append(r if cut is None else r[:cut + 1])
    return out


@torch.inference_mode()
def generate(model, input_ids: Tensor, gen: GenerationConfig, cache=None, eos_ids=None,
             eos_check_every: int | None = None, progress=None, graphs: bool | None = None) -> GenerationResult:
    """Generate up to ``gen.max_new_tokens`` per row. input_ids: (B, T), all rows the same length.

    EOS is checked on the host every ``eos_check_every`` steps (default: every step on CPU, every 16 on CUDA, so
    the GPU queue never drains); tokens produced past a row's EOS are discarded. Without an explicit cache, CUDA
    decodes through a static-shape cache replaying one CUDA graph per step (``graphs``, default on CUDA); an
    explicit cache replays graphs when it is graphable (``make_cache(..., graphs=True)``). Graphs are captured after
    the prefill and outside every timed interval (``capture_s`` in the stats); a layout change later in decoding (a
    ``PlacedKV`` crossing a copy bucket) captures inside the decode time, which counts it.
    """
    device = model.device
    t_start = time.perf_counter()  # setup: the cache (when built here) and the graph capture
    model.check_prompt(input_ids)
    input_ids = input_ids.to(device)
    B, T = input_ids.shape
    model.check_context(T + gen.max_new_tokens)
    graphs = use_graphs(model, graphs)
    if cache is None:
        cache = make_cache(model, None, B, T + gen.max_new_tokens, graphs=graphs)
    eos = set(model.cfg.eos_token_ids if eos_ids is None else eos_ids) if gen.stop_on_eos else set()
    every = eos_check_every or (16 if device.type == "cuda" else 1)
    g = make_generator(device, gen.sampling.seed)
    eos_t = torch.tensor(sorted(eos) or [-1], device=device)

    runner = make_runner(model, cache) if graphs else Runner(model, cache)
    sync(device)
    t0 = time.perf_counter()
    logits = model.prefill(input_ids, cache, chunk=gen.prefill_chunk, progress=progress)
    cache.compress()  # a press (if the cache has one) runs after prefill, inside TTFT
    sync(device)
    t_prefill = time.perf_counter()
    tok = next_token(logits, gen.sampling, g)  # (B,)
    out = [tok]
    done = torch.isin(tok, eos_t)
    sync(device)
    t_first = time.perf_counter()
    runner.n = cache.next_position()
    if gen.max_new_tokens > 1:
        runner.precapture([(1, 1)], batch=B)  # nothing on the CPU or for an eager runner
    h2d0 = (cache.memory_report() or {}).get("h2d_bytes_total")  # streamed by prefill and capture (outside decode)
    sync(device)
    t_dec = time.perf_counter()  # decode time starts after the capture
    capture_s = t_dec - t_first
    for i in range(1, gen.max_new_tokens):
        if eos and i % every == 0 and bool(done.all()):
            break
        logits = runner.step(tok[:, None])[:, -1]
        tok = next_token(logits, gen.sampling, g)
        out.append(tok)
        done |= torch.isin(tok, eos_t)
    sync(device)
    t_end = time.perf_counter()
    rows = torch.stack(out, 1).tolist()
    rows = trim_at_eos(rows, eos) if eos else rows
    return GenerationResult(rows, T, t_prefill - t0, t_first - t0, t_end - t_dec,
                            stats={"mode": "ar", "forwards": len(out), "capture_s": capture_s,
                                   "h2d_bytes_before_decode": h2d0}, setup_s=t0 - t_start + capture_s)
