"""Tensor parallelism over ``torch.distributed`` (NCCL on GPUs, gloo on the CPU), Megatron style.

- ``tp.py``: sharding a ``CausalLM`` across ranks (heads, KV heads, MLP columns; row-parallel output projections
  with one all-reduce per block half), sharded loading and random weights, and the check that ranks agree.
- ``launch.py``: running a function on N ranks, under ``torchrun`` or by spawning the ranks itself, with one clear
  error when a rank fails or dies.
- ``cli.py``: ``mspeckv generate --tp N``; ``bench.py``: ``mspeckv bench tp``.

Nothing here is imported by the single-GPU code paths; this module itself imports nothing heavy (the CLI reads
``RankFailed`` from it at startup).
"""

from __future__ import annotations

import os


def under_torchrun() -> bool:
    """This process is one rank started by torchrun (its environment names the rank and the world)."""
    return "TORCHELASTIC_RUN_ID" in os.environ or {"RANK", "WORLD_SIZE", "LOCAL_RANK"} <= set(os.environ)


class RankFailed(RuntimeError):
    """A tensor-parallel rank raised or died; the others were stopped. ``rank`` is the rank blamed (the first that
    failed for a reason other than losing its peers), ``detail`` the per-rank report."""

    def __init__(self, message: str, rank: int, detail: dict[int, str] | None = None):
        super().__init__(message)
        self.rank = rank
        self.detail = detail or {}


class RanksDiverged(RuntimeError):
    """Ranks that must hold identical results (sampled tokens, accepted counts) do not."""
