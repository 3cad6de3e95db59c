"""Chunk retrieval (TriForce): the selection rule behind ``RetrievalPress`` (``mspeckv/presses/retrieval.py``), the
MSpecKV middle level's default press.

Selection (``select_chunks``), per layer, per batch row and per KV head independently (one batched gather, no loop
over heads): the committed history ``[0, L)`` is cut into ``L // chunk`` full chunks plus a ragged tail of
``L % chunk`` tokens.
  * always kept: chunk 0 (the attention sinks) and the ragged tail (the newest tokens; never scored);
  * scored: every full chunk c by ``s = q . mean(K_c) / sqrt(D)``, turned into an estimated attention mass per query
    row by a softmax over the full chunks, then reduced by MAX over the KV head's G query heads and the nq query
    tokens (a chunk matters if any head of the group wants it; the softmax makes heads of different scale
    comparable, and with a single query row it ranks chunks exactly like the raw dot product);
  * kept: the ``(budget - chunk - tail) // chunk`` best full chunks among 1.. (chunk 0 is already in), in original
    order. So ``n_kept = chunk * (1 + k) + tail <= budget`` (equal when the tail is empty).
``budget`` must be a multiple of ``chunk`` and at least 2 chunks. ``budget >= L`` would keep everything:
``select_chunks`` raises ``BudgetCoversPrompt`` (the press keeps every row instead, and the speculation engine skips
a middle level that would equal the full cache).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


class BudgetCoversPrompt(ValueError):
    """The retrieval budget holds the whole history: use the full cache instead."""


def check_budget(budget: int, chunk: int) -> None:
    from .. import validate as v

    b, c = v.name("budget"), v.name("chunk")
    if chunk < 1:
        raise ValueError(f"{c} must be >= 1, got {chunk}")
    if budget % chunk:
        raise ValueError(f"{b} {budget} is not a multiple of {c} {chunk}")
    if budget < 2 * chunk:
        raise ValueError(f"{b} {budget} must hold at least 2 chunks of {chunk} (the sink chunk + one retrieved)")


def chunk_scores(k: Tensor, q: Tensor, chunk: int) -> Tensor:
    """k (B, Hkv, L, D) committed keys, q (B, Hq, nq, D) queries -> (B, Hkv, L // chunk) score per full chunk."""
    B, Hkv, L, D = k.shape
    n = L // chunk
    G = q.shape[1] // Hkv
    means = k[:, :, :n * chunk].reshape(B, Hkv, n, chunk, D).mean(3, dtype=torch.float32)  # (B, Hkv, n, D)
    qg = q.float().reshape(B, Hkv, G * q.shape[2], D)  # query head h = kv * G + g, as in the model's GQA fold
    mass = (qg @ means.transpose(-1, -2) / math.sqrt(D)).softmax(-1)  # (B, Hkv, G*nq, n)
    return mass.amax(2)


def select_chunks(k: Tensor, q: Tensor, budget: int, chunk: int) -> Tensor:
    """Token indices to keep, (B, Hkv, n_retrieved) int64, increasing along the last axis. See module doc."""
    check_budget(budget, chunk)
    B, Hkv, L, _ = k.shape
    if budget >= L:
        raise BudgetCoversPrompt(f"budget {budget} covers the whole history of {L} tokens; use the full cache")
    n, tail = L // chunk, L % chunk
    n_top = (budget - chunk - tail) // chunk  # < n - 1 because budget < L
    scores = chunk_scores(k, q, chunk)[..., 1:]  # (B, Hkv, n-1): chunk 0 is always kept
    top = scores.topk(n_top, dim=-1).indices.sort(-1).values + 1  # (B, Hkv, n_top) chunk ids
    first = torch.zeros(B, Hkv, 1, dtype=torch.long, device=k.device)
    chunks = torch.cat([first, top], -1)  # (B, Hkv, 1 + n_top)
    ar = torch.arange(chunk, device=k.device)
    idx = (chunks[..., None] * chunk + ar).flatten(2)  # (B, Hkv, (1 + n_top) * chunk)
    tail_idx = torch.arange(n * chunk, L, device=k.device).expand(B, Hkv, tail)
    return torch.cat([idx, tail_idx], -1)
