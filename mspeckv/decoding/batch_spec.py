"""Speculation at batch: every live sequence drafts γ tokens, one rectangular verification of γ+1 tokens covers the
batch, and each sequence accepts its own prefix (greedy, or rejection sampling with the bonus token). Lossless per
sequence: its output is distributed as the target's (equal to AR token for token when greedy).

One round over the slots ``[0, bucket)`` of the engine (``decoding/batch.py``), for both drafters:
- ``vanilla``: a draft model with its own ``BatchKV`` (same slots);
- ``self``: the target itself over a StreamingLLM view of its own KV (``WindowKV``: the first ``sinks`` rows and the
  newest ``window``), MagicDec's self-speculation. The draft's rows go to the target's buffer past each sequence's
  length and are forgotten before the verification, which writes the target's own rows there.

Per round (B sequences, γ drafts):
    draft  γ+1 forwards of 1 token: [last, d1 .. dγ]  -> proposals d1..dγ (and q_i when sampling); the last forward
           only gives the draft its row for dγ, so every sequence's draft KV is complete whatever it accepts
    verify 1 forward of γ+1 tokens: [last, d1 .. dγ]  -> p_0..p_γ
    accept n_b in [0, γ] per sequence, next_b from the target; emit d1..d_nb, next_b
    rollback the target by γ - n_b rows, the draft by γ - n_b (vanilla) or γ + 1 (self: its rows were scratch)
One host sync per round: the rollback counts (and the tokens, for EOS and the limits).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ..kv.base import KVCache
from ..kv.batch import BatchKV
from .accept import greedy_accept, speculative_accept
from .batch import BatchEngine, BatchResult, Sequence, buckets, sync
from .sampling import logits_to_probs, sample

MODES = ("vanilla", "self")


@dataclass(frozen=True)
class BatchSpecConfig:
    mode: str = "self"
    gamma: int = 4  # drafted tokens per round
    sinks: int = 4  # self: the first rows every draft step reads
    window: int = 256  # self: the newest rows every draft step reads

    def __post_init__(self):
        from .. import validate as v

        v.choice("mode", self.mode, MODES)
        v.integer("gamma", self.gamma, lo=1)
        v.integer("sinks", self.sinks, lo=0)
        v.integer("window", self.window, lo=1)


class WindowKV(KVCache):
    """The target's ``BatchKV`` seen through a StreamingLLM window: a forward writes its rows there like any forward,
    and each query row attends to keys ``j < sinks`` or ``pos - window < j <= pos`` of its own sequence."""

    ragged = True

    def __init__(self, base: BatchKV, sinks: int, window: int):
        super().__init__()
        self.base, self.sinks, self.window = base, sinks, window
        self.n_layers = base.n_layers

    @property
    def batch(self):
        return self.base.batch

    def length(self) -> int:
        return self.base.length()

    def capacity(self) -> int:
        return self.base.capacity()

    def token_positions(self, n_new: int):
        return self.base.token_positions(n_new)

    def begin(self, n_new: int) -> None:
        self.base.begin(n_new)
        rows = self.base.token_positions(n_new)  # (B, T)
        cols = self.base.cols[None, None, None, :self.base.hi]
        near = cols > rows[:, None, :, None] - self.window
        self.attn_mask = self.base.attn_mask & ((cols < self.sinks) | near)  # (B, 1, T, S)
        self.attn_lens = None  # not a prefix any more: the mask says it

    def update(self, layer, k, v):
        return self.base.update(layer, k, v)

    def end(self) -> None:
        self.base.end()

    def abort(self) -> None:
        self.base.abort()

    def rollback(self, n) -> None:
        self.base.rollback(n)


class BatchSpecEngine(BatchEngine):
    """``BatchEngine`` whose decode is speculation rounds; ``draft`` is the draft model (vanilla) or None (self)."""

    def __init__(self, model, draft, max_batch: int, capacity: int, gen, spec: BatchSpecConfig, eos_ids=None):
        if (spec.mode == "vanilla") != (draft is not None):
            raise ValueError("mode 'vanilla' needs a draft model and 'self' none")
        self.slack = spec.gamma + 1
        super().__init__(model, max_batch, capacity + self.slack, gen, graphs=False, eos_ids=eos_ids)
        self.spec, self.draft = spec, draft
        self.dcache = BatchKV.for_model(draft, self.max_batch, capacity + self.slack) if draft is not None else \
            WindowKV(self.cache, spec.sinks, spec.window)
        self.rounds = self.seq_rounds = self.accepted = 0

    def admit(self, seq: Sequence, t_run: float) -> None:
        if self.draft is not None:  # the draft's own KV of the prompt, in the slot the target will take
            slot = self.cache.free_slots()[0]
            assert self.dcache.join() == slot
            self.dcache.focus(slot, 1)
            sync(self.device)
            t0 = time.perf_counter()
            self.draft.prefill(torch.tensor([seq.prompt], device=self.device), self.dcache,
                               chunk=self.gen.prefill_chunk)
            self.prefill_s += time.perf_counter() - t0
        super().admit(seq, t_run)

    def append(self, seq: Sequence, toks: list[int], t_run: float) -> None:
        super().append(seq, toks, t_run)
        if seq.finish is not None and self.draft is not None:
            self.dcache.leave(seq.slot)

    def decode_segment(self, t_run: float) -> None:
        """One speculation round over every live sequence."""
        live = [s for s in self.slot_seq if s is not None]
        bucket = next(b for b in buckets(self.max_batch) if b > max(s.slot for s in live))
        g, samp = self.spec.gamma, self.gen.sampling
        self.cache.focus(0, bucket)
        if self.draft is not None:
            self.dcache.focus(0, bucket)
        dmodel = self.draft if self.draft is not None else self.model
        sync(self.device)
        t0 = time.perf_counter()
        cur = self.last[:bucket]
        drafts, qs = [], []
        for i in range(g + 1):  # the last forward only writes dγ's row
            logits = dmodel(cur[:, None], self.dcache)[:, -1]  # (B, V)
            if i == g:
                break
            if samp.greedy:
                cur = logits.argmax(-1)
            else:
                q = logits_to_probs(logits, samp)
                cur = sample(q, self.g)
                qs.append(q)
            drafts.append(cur)
        d = torch.stack(drafts, 1)  # (B, γ)
        if self.draft is None:
            self.cache.rollback(g + 1)  # the draft's rows were scratch in the target's buffer
        ids = torch.cat([self.last[:bucket, None], d], 1)  # (B, γ+1)
        logits = self.model(ids, self.cache, num_logits=None)  # (B, γ+1, V)
        if samp.greedy:
            n, nxt = greedy_accept(d, logits)
        else:
            n, nxt = speculative_accept(torch.stack(qs, 1), logits_to_probs(logits, samp), d, self.g)
        self.last[:bucket] = nxt
        rows = torch.cat([d, nxt[:, None], n[:, None]], 1).tolist()  # the round's one sync: tokens and counts
        n_host = [r.pop() for r in rows]  # rows: d1..dγ, next
        back = [g - k for k in n_host]
        self.cache.rollback(back)
        if self.draft is not None:
            self.dcache.rollback(back)
        self.decode_s += time.perf_counter() - t0
        self.steps += 1
        self.rounds += 1
        for s in live:
            k = n_host[s.slot]
            self.seq_rounds += 1
            self.accepted += k
            self.append(s, rows[s.slot][:k] + rows[s.slot][g:], t_run)  # d1..dk, then the target's next


def generate_batch_spec(model, draft, prompts, gen, spec: BatchSpecConfig, max_batch: int | None = None,
                        eos_ids=None) -> BatchResult:
    """Speculative decoding over many prompts of any lengths, ``max_batch`` in flight; results in input order, with
    the acceptance in ``stats``."""
    prompts = [list(p) for p in prompts]
    if not prompts:
        raise ValueError("no prompts: give at least one")
    slots = min(max_batch or len(prompts), len(prompts))
    cap = max(len(p) for p in prompts) + gen.max_new_tokens
    eng = BatchSpecEngine(model, draft, slots, cap, gen, spec, eos_ids)
    res = eng.run(prompts)
    sr = eng.seq_rounds  # one per live sequence per round
    res.stats.update(mode=spec.mode, gamma=spec.gamma, rounds=eng.rounds, sequence_rounds=sr,
                     acceptance=eng.accepted / (sr * spec.gamma) if sr else None,
                     tokens_per_round=(eng.accepted + sr) / sr if sr else None)  # per sequence, before limits cut
    return res
