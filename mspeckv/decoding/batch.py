"""Batched autoregressive decoding with a length per sequence: prompts of any lengths, sequences that finish and
leave, queued ones that join in their place. The engine under ``generate --prompts``, ``bench batch`` and the server.

One loop, three parts (nano-vllm's shape: a scheduler, a cache of slots, a runner):
- **admit**: a queued sequence takes a free slot of the ``BatchKV`` and is prefilled alone into it (no padding: its
  forwards cover that one slot), which gives its first token;
- **decode**: every live slot advances one token per forward, in segments of up to ``check_every`` steps with no
  host sync inside (a segment also ends where a sequence reaches its token limit, so no slot outgrows its capacity);
  a forward covers slots ``[0, bucket)``, the smallest captured batch size holding every live slot (free slots in
  between compute throwaway rows), and replays that bucket's CUDA graph;
- **retire**: at a segment's end the tokens come to the host; a sequence that produced EOS or its last token leaves
  (tokens past its EOS are dropped) and frees its slot for the next admission.

Greedy output per sequence equals that prompt decoded alone (``tests/test_batch_engine.py``): sequences share
forwards but never attend to each other. Sampled output draws from one generator for the whole batch, so a sampled
sequence depends on what else is in the batch, unless the sequence brings its own sampling and generator
(``Sequence.sampling``/``generator``): then its draws are its own, one per token as ``generate`` draws them alone.

The server (``serve/scheduler.py``) drives the same pieces one at a time: ``start`` takes a slot, ``feed`` prefills
one chunk of the prompt into it (the last chunk gives the first token), and ``decode_segment`` advances every slot
whose prompt is complete while a slot still being prefilled sits the segment out (the cache's ``held``); ``retire``
frees a slot early (a stop string, a cancelled request).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..config import GenerationConfig, SamplingConfig
from ..kv.batch import BatchKV
from ..runs.harness import sync
from .runner import Runner, make_runner, use_graphs
from .sampling import make_generator, next_token


def buckets(max_batch: int) -> list[int]:
    """Batch sizes a graph is captured for: powers of two below ``max_batch``, and ``max_batch``."""
    out, b = [], 1
    while b < max_batch:
        out.append(b)
        b *= 2
    return out + [max_batch]


@dataclass
class Sequence:
    index: int  # position in the caller's list
    prompt: list[int]
    max_new: int
    slot: int | None = None
    tokens: list[int] = field(default_factory=list)
    finish: str | None = None  # "eos" | "length" once it left
    ttft_s: float | None = None  # run start -> first token (queueing + prefill)
    done_s: float | None = None  # run start -> last token on the host
    sampling: SamplingConfig | None = None  # its own sampling (None: the engine's)
    generator: torch.Generator | None = None  # its own draws (with ``sampling``)
    fed: int = 0  # prompt tokens in its slot so far

    @property
    def prefilled(self) -> bool:
        return self.fed == len(self.prompt)

    def to_dict(self) -> dict:
        return {"index": self.index, "prompt_len": len(self.prompt), "tokens": self.tokens,
                "n_generated": len(self.tokens), "finish_reason": self.finish, "ttft_s": self.ttft_s,
                "latency_s": self.done_s}


@dataclass
class BatchResult:
    seqs: list[Sequence]  # in input order
    max_batch: int
    setup_s: float  # the cache and the graph captures
    prefill_s: float  # every admission's prefill and first token
    decode_s: float  # every decode segment
    decode_steps: int
    stats: dict = field(default_factory=dict)

    @property
    def n_generated(self) -> int:
        return sum(len(s.tokens) for s in self.seqs)

    @property
    def tok_per_s(self) -> float:
        """Decode-only: tokens after each sequence's first over the decode time."""
        n = self.n_generated - len(self.seqs)
        return n / self.decode_s if self.decode_s > 0 else float("nan")

    @property
    def e2e_s(self) -> float:
        return self.setup_s + self.prefill_s + self.decode_s

    @property
    def e2e_tok_per_s(self) -> float:
        return self.n_generated / self.e2e_s if self.e2e_s > 0 else float("nan")

    def summary(self) -> dict:
        return {"sequences": len(self.seqs), "max_batch": self.max_batch, "n_generated": self.n_generated,
                "setup_s": self.setup_s, "prefill_s": self.prefill_s, "decode_s": self.decode_s,
                "decode_steps": self.decode_steps, "tok_per_s": self.tok_per_s, "e2e_s": self.e2e_s,
                "e2e_tok_per_s": self.e2e_tok_per_s, **self.stats}


class BatchEngine:
    """AR over a ``BatchKV`` of ``max_batch`` slots of ``capacity`` rows. ``run(prompts)`` decodes them all."""

    slack = 0  # rows a sequence may hold past prompt + max_new (speculation's drafts beyond the last kept token)

    def __init__(self, model, max_batch: int, capacity: int, gen: GenerationConfig, graphs: bool | None = None,
                 eos_ids=None, check_every: int | None = None, cache: BatchKV | None = None):
        self.model, self.gen = model, gen
        self.device = model.device
        t0 = time.perf_counter()
        self.cache = cache or BatchKV.for_model(model, max_batch, capacity)
        self.max_batch = self.cache.slots
        self.graphs = use_graphs(model, graphs)
        self.runner = make_runner(model, self.cache) if self.graphs else Runner(model, self.cache)
        self.eos = set(model.cfg.eos_token_ids if eos_ids is None else eos_ids) if gen.stop_on_eos else set()
        self.every = check_every or (16 if self.device.type == "cuda" else 1)
        self.g = make_generator(self.device, gen.sampling.seed)
        self.last = torch.zeros(self.max_batch, dtype=torch.long, device=self.device)  # each slot's newest token
        self.slot_seq: list[Sequence | None] = [None] * self.max_batch
        self.alloc_s = time.perf_counter() - t0
        self.capture_s = 0.0  # wall time of the captures before the run (setup); the runner counts every capture
        self.prefill_s = self.decode_s = 0.0
        self.steps = 0

    # ------------------------------------------------------------------------------------------------ graphs
    def capture(self, up_to: int) -> None:
        """Capture the decode graph of every bucket up to the one holding ``up_to`` sequences (CUDA only)."""
        if not self.graphs:
            return
        sync(self.device)
        t0 = time.perf_counter()
        for b in buckets(self.max_batch):
            self.cache.focus(0, b)
            self.runner.precapture([(1, 1)], batch=b)
            if b >= up_to:
                break
        sync(self.device)
        self.capture_s += time.perf_counter() - t0

    # ------------------------------------------------------------------------------------------------ the loop
    def admit(self, seq: Sequence, t_run: float) -> None:
        """Prefill ``seq`` alone into a free slot; its first token."""
        self.start(seq)
        while not self.feed(seq, self.gen.prefill_chunk, t_run):
            pass

    def start(self, seq: Sequence) -> None:
        """Give ``seq`` a free slot, nothing prefilled yet."""
        slot = self.cache.join()
        seq.slot, seq.fed, self.slot_seq[slot] = slot, 0, seq

    def feed(self, seq: Sequence, n: int, t_run: float) -> bool:
        """Prefill the next ``n`` (at most) prompt tokens of ``seq`` into its slot in one forward; the last chunk
        samples its first token (then True)."""
        sync(self.device)
        t0 = time.perf_counter()
        self.cache.focus(seq.slot, 1)
        ids = torch.tensor([seq.prompt[seq.fed:seq.fed + n]], device=self.device)
        logits = self.model(ids, self.cache, num_logits=1)[:, -1]  # (1, V), as model.prefill's chunks
        seq.fed += ids.shape[1]
        if not seq.prefilled:
            sync(self.device)  # this chunk's GPU time is prefill's (not the next chunk's wait before its clock starts)
            self.prefill_s += time.perf_counter() - t0
            return False
        self.cache.compress()  # a press (per-sequence caches) runs after its prefill, inside TTFT
        tok = self.sample(logits, [seq])
        self.last[seq.slot] = tok[0]
        t = tok.item()  # one sync per admission: the first token decides whether the sequence is already done
        self.prefill_s += time.perf_counter() - t0
        seq.ttft_s = time.perf_counter() - t_run
        self.append(seq, [t], t_run)
        return True

    def sample(self, logits: Tensor, rows: list[Sequence | None]) -> Tensor:
        """logits (B, V) -> (B,) tokens: row b by ``rows[b]``'s own sampling and generator where it has them, else by
        the engine's (a free slot's row: the engine's, thrown away)."""
        own = [b for b, s in enumerate(rows) if s is not None and s.sampling is not None]
        if not own:
            return next_token(logits, self.gen.sampling, self.g)
        engine_rows = any(s is not None and s.sampling is None for s in rows)
        if engine_rows and not self.gen.sampling.greedy:
            tok = next_token(logits, self.gen.sampling, self.g)
        else:  # greedy, or throwaway rows only (free slots)
            tok = logits.argmax(-1)
        for b in own:  # one draw of its own per token, as generate() draws for that prompt alone
            if not rows[b].sampling.greedy:
                tok[b] = next_token(logits[b:b + 1], rows[b].sampling, rows[b].generator)[0]
            elif engine_rows and not self.gen.sampling.greedy:  # a greedy row among engine-sampled ones
                tok[b] = logits[b].argmax()
        return tok

    def append(self, seq: Sequence, toks: list[int], t_run: float) -> None:
        """Give ``seq`` its new tokens up to its EOS or limit; it leaves when it is done."""
        for t in toks:
            seq.tokens.append(t)
            if t in self.eos or len(seq.tokens) >= seq.max_new:
                seq.finish = "eos" if t in self.eos else "length"
                break
        if seq.finish is not None:
            seq.done_s = time.perf_counter() - t_run
            self.retire(seq, seq.finish)

    def retire(self, seq: Sequence, finish: str) -> None:
        """``seq`` leaves its slot now (done, stopped or cancelled); the slot is free for the next."""
        seq.finish = seq.finish or finish
        if seq.slot is not None and self.slot_seq[seq.slot] is seq:
            self.cache.leave(seq.slot)
            self.slot_seq[seq.slot] = None

    def compact(self) -> None:
        """Move the sequences in the highest slots into free low ones when that lets a smaller bucket cover them all:
        a forward covers slots [0, bucket) with the bucket set by the highest occupied slot, so without this a batch
        whose early slots finished keeps paying for the whole bucket while its stragglers run."""
        used = [s for s in range(self.max_batch) if self.slot_seq[s] is not None]
        if not used:
            return
        target = next(b for b in buckets(self.max_batch) if b >= len(used))
        if target >= next(b for b in buckets(self.max_batch) if b > used[-1]):
            return  # no smaller bucket to gain
        free = [s for s in range(target) if self.slot_seq[s] is None]
        for src, dst in zip([s for s in used if s >= target], free, strict=False):
            self.move(src, dst)

    def move(self, src: int, dst: int) -> None:
        """Slot ``src``'s sequence to the free slot ``dst``: its KV, its newest token, its record."""
        self.cache.move(src, dst)
        self.last[dst] = self.last[src]
        seq = self.slot_seq[src]
        self.slot_seq[dst], self.slot_seq[src], seq.slot = seq, None, dst

    def decode_segment(self, t_run: float) -> None:
        """Up to ``check_every`` decode steps of every slot whose prompt is complete (a slot still being prefilled
        sits them out); nothing when there is none."""
        self.compact()
        live = [s for s in self.slot_seq if s is not None and s.prefilled]
        if not live:
            return
        held = [s for s in self.slot_seq if s is not None and not s.prefilled]
        n = min(self.every, min(s.max_new - len(s.tokens) for s in live),
                *(self.cache.capacity() - s.fed for s in held))  # a held slot's capacity check counts the steps
        bucket = next(b for b in buckets(self.max_batch) if b > max(s.slot for s in live))
        rows = [s if s is not None and s.prefilled else None for s in self.slot_seq[:bucket]]
        self.cache.focus(0, bucket)
        sync(self.device)
        t0 = time.perf_counter()
        out = []
        with self.cache.held([s.slot for s in held if s.slot < bucket]):
            for _ in range(n):
                self.runner.n = self.cache.length()
                logits = self.runner.step(self.last[:bucket, None])[:, -1]  # (bucket, V)
                tok = self.sample(logits, rows)
                self.last[:bucket] = tok
                out.append(tok)
            toks = torch.stack(out, 1).tolist()  # (bucket, n): the segment's one sync
        self.decode_s += time.perf_counter() - t0
        self.steps += n
        for s in live:
            self.append(s, toks[s.slot], t_run)

    def run(self, prompts: list[list[int]], max_new: list[int] | None = None) -> BatchResult:
        """Decode every prompt (lists of token ids); results in input order."""
        if not prompts:
            raise ValueError("no prompts: give at least one")
        max_new = max_new or [self.gen.max_new_tokens] * len(prompts)
        seqs = [Sequence(i, list(p), m) for i, (p, m) in enumerate(zip(prompts, max_new, strict=True))]
        for s in seqs:
            if not s.prompt:
                raise ValueError(f"prompt {s.index} is empty (0 tokens); every prompt needs at least one token")
            if len(s.prompt) + s.max_new + self.slack > self.cache.capacity():
                raise ValueError(f"prompt {s.index} ({len(s.prompt)} tokens) + {s.max_new} new tokens"
                                 f"{f' + {self.slack} rows of drafts' if self.slack else ''} exceed the cache's "
                                 f"{self.cache.capacity()} rows per sequence")
            self.model.check_context(len(s.prompt) + s.max_new)
        self.model.check_prompt(torch.tensor([[t for s in seqs for t in s.prompt]]))  # every prompt's ids at once
        self.capture(min(len(seqs), self.max_batch))
        queue = deque(seqs)
        t_run = time.perf_counter()
        with torch.inference_mode():
            while queue or any(self.slot_seq):
                while queue and self.cache.free_slots():
                    self.admit(queue.popleft(), t_run)
                if any(self.slot_seq):
                    self.decode_segment(t_run)
        e, c, cs = self.runner.graph_counts()
        return BatchResult(seqs, self.max_batch, self.alloc_s + self.capture_s, self.prefill_s, self.decode_s,
                           self.steps, stats={"mode": "ar", "capture_s": cs, "graphs": self.graphs,
                                              "eager_steps": e, "captures": c,
                                              **self.cache.memory_report()})


def batch_cache(model, slots: int, capacity: int, placement=None, press=None):
    """The engine's cache: a graphable ``BatchKV`` (dense KV on the device), or with a ``placement`` that offloads or a
    ``press``, a ``SeqStackKV`` of per-sequence caches built by ``make_cache`` (eager)."""
    from ..cache import make_cache

    offloads = placement is not None and placement.n_on_chip(model.cfg.n_layers) < model.cfg.n_layers
    if not offloads and press is None:
        return BatchKV.for_model(model, slots, capacity)
    from ..kv.stack import SeqStackKV
    from ..presses import parse_press

    press = None if press is None else parse_press(press)  # a bad spec fails here, before any slot allocates
    return SeqStackKV(lambda: make_cache(model, placement, 1, capacity, press=press), slots, capacity, model.device)


def generate_batch(model, prompts: list[list[int]] | list[Tensor], gen: GenerationConfig, max_batch: int | None = None,
                   graphs: bool | None = None, eos_ids=None, check_every: int | None = None, placement=None,
                   press=None) -> BatchResult:
    """Greedy or sampled AR over many prompts of any lengths, ``max_batch`` (default: all) in flight at once; with a
    ``placement`` or ``press``, each sequence's KV is placed or pressed as ``make_cache`` does for one."""
    from .. import validate as v

    prompts = [p.tolist() if isinstance(p, Tensor) else list(p) for p in prompts]
    if not prompts:
        raise ValueError("no prompts: give at least one")
    max_batch = len(prompts) if max_batch is None else max_batch
    v.integer("max_batch", max_batch, lo=1)
    cap = max(len(p) for p in prompts) + gen.max_new_tokens
    slots = min(max_batch, len(prompts))
    eng = BatchEngine(model, slots, cap, gen, graphs, eos_ids, check_every,
                      cache=batch_cache(model, slots, cap, placement, press))
    return eng.run(prompts)
