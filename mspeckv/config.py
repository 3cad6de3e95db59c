"""Typed configs shared by the CLI, the library and the benchmarks.

Each dataclass validates itself in ``__post_init__`` and raises one ``ValueError`` that says what to change.
Storage (``Placement``), presses and speculation (``SpecConfig``) configs live next to their code's domain but are
collected here so the CLI has one place to build them from.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import validate as v


@dataclass(frozen=True)
class SamplingConfig:
    """How a next token is drawn from logits. ``temperature == 0`` means greedy (argmax)."""

    temperature: float = 0.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off
    seed: int | None = None

    def __post_init__(self):
        v.number("temperature", self.temperature, lo=0)  # 0 = greedy
        v.integer("top_k", self.top_k, lo=0)  # 0 disables it
        v.number("top_p", self.top_p, lo=0, hi=1, lo_open=True)  # 1 disables it
        v.integer("seed", self.seed, lo=0, optional=True)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 64
    sampling: SamplingConfig = SamplingConfig()
    stop_on_eos: bool = True
    prefill_chunk: int = 1024  # tokens per prefill forward; bounds the attention-score memory

    def __post_init__(self):
        v.integer("max_new_tokens", self.max_new_tokens, lo=1)
        if not isinstance(self.sampling, SamplingConfig):
            raise v.ConfigError(f"sampling must be a SamplingConfig, got {self.sampling!r}")
        v.boolean("stop_on_eos", self.stop_on_eos)
        v.integer("prefill_chunk", self.prefill_chunk, lo=1)
