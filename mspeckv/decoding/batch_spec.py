"""Speculation at batch: every live sequence drafts γ tokens, one rectangular verification of γ+1 tokens covers the
batch, and each sequence accepts its own prefix (greedy, or rejection sampling with the bonus token). Lossless per
sequence: its output is distributed as the target's (equal to AR token for token when greedy).

One round over the slots ``[0, bucket)`` of the engine (``decoding/batch.py``), for both drafters:
- ``vanilla``: a draft model with its own ``BatchKV`` (same slots);
- ``self``: the target itself over a StreamingLLM view of its own KV (``WindowKV``: the first ``sinks`` rows and the
  newest ``window``), MagicDec's self-speculation. The draft's rows go to the target's buffer past each sequence's
  length and are forgotten before the verification, which writes the target's own rows there.

Per round (B sequences, γ drafts):
    draft  γ forwards of 1 token: [last, d1 .. dγ-1] -> proposals d1..dγ (and q_i when sampling); vanilla runs one
           more, [dγ], which only gives the draft its row for dγ, so its KV is complete whatever is accepted
    verify 1 forward of γ+1 tokens: [last, d1 .. dγ]  -> p_0..p_γ
    accept n_b in [0, γ] per sequence, next_b from the target; emit d1..d_nb, next_b
    rollback the target by γ - n_b rows, the draft by γ - n_b (vanilla) or γ before the verification (self: its rows
           were scratch)
One host sync per round: the rollback counts (and the tokens, for EOS and the limits).

On CUDA every forward replays a graph captured per batch bucket: the draft step (1 token), the verification (γ+1)
and, with ``auto``, the AR step. The self draft's graph reads only each sequence's sinks and window: ``WindowKV``
hands the attention kernel a ``Window`` (``kv/base.py``), so its step costs the window, not the context.
With ``auto`` the cost model (``decoding/cost.py``) picks γ, or AR, per round, from the draft, verification and AR
steps timed on the running batch (once per bucket, charged to setup) and the acceptance seen so far.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from ..kv.base import KVCache, Window
from ..kv.batch import BatchKV
from .accept import greedy_accept, speculative_accept
from .batch import BatchEngine, BatchResult, Sequence, buckets, sync
from .cost import CostModel
from .runner import Runner, make_runner
from .sampling import logits_to_probs, sample

MODES = ("vanilla", "self", "mspeckv")


@dataclass(frozen=True)
class BatchSpecConfig:
    mode: str = "self"
    gamma: int = 4  # drafted tokens per round (with auto: the most); mspeckv: tokens the full KV verifies per round
    sinks: int = 4  # self, mspeckv: the first rows every windowed step reads
    window: int = 256  # self, mspeckv: the newest rows every windowed step reads
    auto: bool = False  # the cost model picks γ in gammas(), or AR, per round (self, vanilla)
    draft_gamma: int = 4  # mspeckv: the draft's tokens per windowed verification
    draft_window: int | None = None  # vanilla, mspeckv: the draft model's steps read draft_sinks + its newest rows
    draft_sinks: int = 4  # (StreamingLLM over the draft's own KV, which still holds every row); None: its full KV

    def __post_init__(self):
        from .. import validate as v

        v.choice("mode", self.mode, MODES)
        v.integer("gamma", self.gamma, lo=1)
        v.integer("sinks", self.sinks, lo=0)
        v.integer("window", self.window, lo=1)
        v.integer("draft_gamma", self.draft_gamma, lo=1)
        v.integer("draft_sinks", self.draft_sinks, lo=0)
        if self.draft_window is not None:
            v.integer("draft_window", self.draft_window, lo=1)
            if self.mode == "self":
                raise v.ConfigError("draft_window is the draft model's window (vanilla, mspeckv); self drafts over "
                                    "window")
        if self.auto and self.mode == "mspeckv":
            raise v.ConfigError("auto (the cost model's γ) runs modes self and vanilla; mspeckv takes a fixed gamma "
                                "and draft_gamma")

    @property
    def slack(self) -> int:
        """Rows a sequence may hold past its kept tokens within a round: γ+1 drafts; mspeckv: the windowed level's
        tokens (it runs until every sequence has γ+1, each run adding at most draft_gamma+1) and one more run's."""
        if self.mode != "mspeckv":
            return self.gamma + 1
        return (self.gamma + 2) * (self.draft_gamma + 1)

    def gammas(self) -> list[int]:
        """The γ a round may use: ``gamma``, or with ``auto`` also 1, 2, 4, 8 below it."""
        return sorted({self.gamma} | ({g for g in (1, 2, 4, 8) if g < self.gamma} if self.auto else set()))


class WindowKV(KVCache):
    """A ``BatchKV`` (the target's for self and the middle level, the draft model's with ``draft_window``) seen
    through a StreamingLLM window: a forward writes its rows there like any forward,
    and each query row attends to keys ``j < sinks`` or ``pos - window < j <= pos`` of its own sequence (a mask for
    the torch paths, a ``Window`` for the kernel, which then reads those keys alone)."""

    ragged = True
    graphable = True

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

    def graph_key(self, n_new: int):
        return ("window", self.base.graph_key(n_new))

    def token_positions(self, n_new: int):
        return self.base.token_positions(n_new)

    def prepare(self, n_new: int) -> None:
        self.base.prepare(n_new)

    def commit(self, n: int) -> None:
        self.base.commit(n)

    def begin(self, n_new: int) -> None:
        self.base.begin(n_new)
        rows = self.base.token_positions(n_new)  # (B, T)
        starts = rows - (self.window - 1)  # row (b, t) sees its newest `window` keys: j >= pos - window + 1
        cols = self.base.cols[None, None, None, :self.base.hi]
        self.attn_mask = self.base.attn_mask & ((cols < self.sinks) | (cols >= starts[:, None, :, None]))
        self.attn_lens = self.base.attn_lens  # (B, T): with the window, the kernel's bound
        self.attn_window = Window(self.sinks, starts, self.sinks + self.window)

    def update(self, layer, k, v):
        return self.base.update(layer, k, v)

    def end(self) -> None:
        self.base.end()

    def abort(self) -> None:
        self.base.abort()

    def rollback(self, n) -> None:
        self.base.rollback(n)


def timed(device, fn, reps: int = 3) -> float:
    """Median seconds of ``fn()`` (CUDA events on the GPU, after one warm-up call)."""
    fn()
    out = []
    for _ in range(reps):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            out.append(a.elapsed_time(b) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
    return sorted(out)[len(out) // 2]


class BatchSpecEngine(BatchEngine):
    """``BatchEngine`` whose decode is speculation rounds; ``draft`` is the draft model (vanilla) or None (self)."""

    def __init__(self, model, draft, max_batch: int, capacity: int, gen, spec: BatchSpecConfig, eos_ids=None,
                 graphs: bool | None = None):
        if (spec.mode == "self") != (draft is None):
            raise ValueError(f"mode {spec.mode!r} needs a draft model" if draft is None else
                             "mode 'self' drafts with the model itself: no draft model")
        self.slack = spec.slack
        super().__init__(model, max_batch, capacity + self.slack, gen, graphs=graphs, eos_ids=eos_ids)
        self.spec, self.draft = spec, draft
        # the draft's KV (slots, lengths, rollback) and the view its steps read: self reads a window of the target's
        # KV; a draft model its own KV, whole or (draft_window) a window of it, which it still fills in full
        if draft is not None:
            self.dcache = BatchKV.for_model(draft, self.max_batch, capacity + self.slack)
            dview = self.dcache if spec.draft_window is None else WindowKV(self.dcache, spec.draft_sinks,
                                                                           spec.draft_window)
        else:
            self.dcache = dview = WindowKV(self.cache, spec.sinks, spec.window)
        dmodel = draft if draft is not None else model
        self.drunner = make_runner(dmodel, dview) if self.graphs else Runner(dmodel, dview)
        self.wrunner = None  # mspeckv: the target over a window of its own KV, the middle level
        if spec.mode == "mspeckv":
            wkv = WindowKV(self.cache, spec.sinks, spec.window)
            self.wrunner = make_runner(model, wkv) if self.graphs else Runner(model, wkv)
        self.l1_rounds = self.l1_drafted = self.l1_accepted = 0
        self.rounds = self.seq_rounds = self.accepted = 0
        self.drafted = 0  # drafts proposed to live sequences (every round's γ, per sequence)
        self.costs: dict[int, CostModel] = {}  # bucket -> its measured costs and acceptance (auto)
        self.calib_s = 0.0

    def capture(self, up_to: int) -> None:
        """The draft step's and each γ's verification graph (and with auto, the AR step's) of every bucket up to the
        one holding ``up_to`` sequences."""
        if not self.graphs:
            return
        sync(self.device)
        t0 = time.perf_counter()
        shapes = [(g + 1, g + 1) for g in self.spec.gammas()] + ([(1, 1)] if self.spec.auto else [])
        for b in buckets(self.max_batch):
            self.cache.focus(0, b)
            self.runner.precapture(shapes, batch=b)
            if self.wrunner is not None:
                k = self.spec.draft_gamma + 1
                self.wrunner.precapture([(k, k)], batch=b)
            if self.draft is not None:
                self.dcache.focus(0, b)
            self.drunner.precapture([(1, 1)], batch=b)
            if b >= up_to:
                break
        sync(self.device)
        self.capture_s += time.perf_counter() - t0

    # ------------------------------------------------------------------------------------------------ slots
    def start(self, seq: Sequence) -> None:
        super().start(seq)
        if self.draft is not None:  # the draft's KV takes the same slot
            if self.dcache.join() != seq.slot:
                raise RuntimeError(f"the draft's KV and the target's disagree on the free slot ({seq.slot})")

    def feed(self, seq: Sequence, n: int, t_run: float) -> bool:
        """The next prompt chunk into the target's slot, and into the draft's (vanilla) first."""
        if self.draft is not None:
            sync(self.device)
            t0 = time.perf_counter()
            self.dcache.focus(seq.slot, 1)
            self.draft(torch.tensor([seq.prompt[seq.fed:seq.fed + n]], device=self.device), self.dcache,
                       num_logits=1)
            sync(self.device)  # the draft's chunk is prefill's time, not a wait inside the target's chunk
            self.prefill_s += time.perf_counter() - t0
        return super().feed(seq, n, t_run)

    def move(self, src: int, dst: int) -> None:
        super().move(src, dst)
        if self.draft is not None:  # the draft's KV follows (self's draft KV is the target's)
            self.dcache.move(src, dst)

    def retire(self, seq: Sequence, finish: str) -> None:
        if self.draft is not None and seq.slot is not None and self.slot_seq[seq.slot] is seq:
            self.dcache.leave(seq.slot)
        super().retire(seq, finish)

    # ------------------------------------------------------------------------------------------------ one round
    def probs(self, logits, rows: list[Sequence | None]):
        """logits (B, ..., V) -> probabilities, row b by ``rows[b]``'s own sampling where it has one (a greedy row: a
        one-hot, which rejection sampling then accepts exactly when greedy would), else the engine's."""
        p = logits_to_probs(logits, self.gen.sampling)
        for b, s in enumerate(rows):
            if s is not None and s.sampling is not None:
                p[b] = logits_to_probs(logits[b], s.sampling)
        return p

    def draft_tokens(self, g: int, rows: list[Sequence | None] | None, active: list[int], last=None):
        """γ proposals per sequence (B, γ), and their distributions (B, γ, V) when sampling (``rows``: whose sampling
        each row follows; None: every row greedy); the draft's KV then holds the round's rows (a draft model: γ+1 of
        them; self: none, its scratch rows are forgotten here). ``active``: 1 per slot that advances, 0 per held one;
        ``last``: each slot's token before the drafts (default: the newest kept one)."""
        cur, drafts, qs = self.last[:len(active)] if last is None else last, [], []
        self.drunner.n = self.dcache.length()
        for i in range(g + (self.draft is not None)):  # vanilla's last forward only writes dγ's row
            logits = self.drunner.step(cur[:, None])[:, -1]  # (B, V)
            if i == g:
                break
            if rows is not None:
                q = self.probs(logits, rows)
                cur = sample(q, self.g)
                qs.append(q)
            else:
                cur = logits.argmax(-1)
            drafts.append(cur)
        if self.draft is None:  # the draft's rows were scratch in the target's buffer (held slots did not advance)
            self.cache.rollback(g)
        if not drafts:  # γ = 0: vanilla's draft only took the token's row
            return cur.new_zeros(cur.shape[0], 0), None
        return torch.stack(drafts, 1), (torch.stack(qs, 1) if rows is not None else None)

    def verify(self, d, q, rows: list[Sequence | None] | None, runner=None, last=None, keep_p: bool = False):
        """(B, γ+1) logits of the target (``runner``: over its full KV by default, or the window) over [last, d1 ..
        dγ] -> accepted counts (B,), next tokens (B,) [and the verifier's probabilities (B, γ+1, V) with keep_p]."""
        runner = runner or self.runner
        g = d.shape[1]
        runner.n = self.cache.length()
        last = self.last[:d.shape[0]] if last is None else last
        logits = runner.step(torch.cat([last[:, None], d], 1), num_logits=g + 1)  # (B, γ+1, V)
        if q is None:
            return (*greedy_accept(d, logits), None)
        p = self.probs(logits, rows)
        return (*speculative_accept(q, p, d, self.g), p if keep_p else None)

    def held_draft(self, slots: list[int]):
        """The draft's KV sits the held slots out too (vanilla); self's draft KV is the target's."""
        return self.dcache.held(slots) if self.draft is not None else nullcontext()

    def cost_model(self, bucket: int) -> CostModel:
        """This bucket's costs, timed on the running batch the first time it decodes (each timed forward is rolled
        back, so the sequences are untouched); the time is setup's."""
        if bucket not in self.costs:
            sync(self.device)
            t0 = time.perf_counter()
            last = self.last[:bucket, None]

            def ar():
                self.runner.n = self.cache.length()
                self.runner.step(last)
                self.cache.rollback(1)

            def draft():
                self.drunner.n = self.dcache.length()
                self.drunner.step(last)
                self.dcache.rollback(1)

            def verify(g):
                self.runner.n = self.cache.length()
                self.runner.step(last.expand(-1, g + 1), num_logits=g + 1)
                self.cache.rollback(g + 1)

            with torch.inference_mode():
                cm = CostModel(timed(self.device, ar), timed(self.device, draft),
                               {g: timed(self.device, lambda g=g: verify(g)) for g in self.spec.gammas()},
                               draft_extra=int(self.draft is not None))
            # the acceptance is the sequences', not the bucket's: a new bucket starts from what was seen so far
            cm.accepted = sum(c.accepted for c in self.costs.values())
            cm.rejected = sum(c.rejected for c in self.costs.values())
            self.costs[bucket] = cm
            sync(self.device)
            self.calib_s += time.perf_counter() - t0
        return self.costs[bucket]

    def hier_round(self, live: list[Sequence], held: list[int], bucket: int, t_run: float) -> None:
        """One mspeckv round: the draft model proposes ``draft_gamma`` tokens to the target over a window of its KV
        (the middle level), run after run, until every sequence has γ+1 tokens the middle level accepted; then the
        target over its full KV verifies the first γ of each, and each sequence keeps its accepted prefix.

        Every cache holds the kept tokens but the newest (``last``) at the round's start and end. During the middle
        runs the target's rows past that are scratch (computed over the window); they are forgotten before the full
        verification, which writes its own. The middle level's output is distributed as the target over the window,
        so its probabilities are the full level's proposal distribution when sampling."""
        g1, g2 = self.spec.draft_gamma, self.spec.gamma
        rows = [s if s is not None and s.prefilled else None for s in self.slot_seq[:bucket]]
        active = [int(s is not None) for s in rows]
        sampled = not self.gen.sampling.greedy or any(s.sampling is not None and not s.sampling.greedy for s in live)
        samp_rows = rows if sampled else None
        acc = [[] for _ in range(bucket)]  # the middle level's tokens per slot this round
        p1 = [[] for _ in range(bucket)]  # and its distribution at each (sampling)
        last0 = self.last[:bucket].clone()
        sync(self.device)
        t0 = time.perf_counter()
        hold = [h for h in held if h < bucket]
        with self.cache.held(hold), self.held_draft(hold):
            cur = last0
            while min(len(acc[s.slot]) for s in live) < g2 + 1:  # the middle level: draft -> target over the window
                d, q = self.draft_tokens(g1, samp_rows, active, last=cur)
                n, nxt, p = self.verify(d, q, samp_rows, runner=self.wrunner, last=cur, keep_p=sampled)
                out = torch.cat([d, nxt[:, None], n[:, None]], 1).tolist()  # one sync per middle run
                back = [(g1 - r[-1]) * a for r, a in zip(out, active, strict=True)]
                self.cache.rollback(back)
                self.dcache.rollback(back)
                for s in live:
                    k = out[s.slot][-1]
                    acc[s.slot] += out[s.slot][:k] + [out[s.slot][g1]]
                    if sampled:
                        p1[s.slot] += list(p[s.slot, :k + 1])
                    self.l1_drafted += g1
                    self.l1_accepted += k
                self.l1_rounds += 1
                cur = nxt
            c = [len(acc[b]) if active[b] else 0 for b in range(bucket)]
            self.cache.rollback(c)  # the middle level's rows were scratch: back to the kept tokens
            d2 = torch.tensor([acc[b][:g2] if active[b] else [0] * g2 for b in range(bucket)], device=self.device)
            q2 = None
            if sampled:  # free or held rows: any distribution (their output is dropped)
                V = p.shape[-1]
                q2 = torch.stack([torch.stack(p1[b][:g2]) if active[b] else torch.full((g2, V), 1.0 / V,
                                                                                         device=self.device)
                                  for b in range(bucket)])
            n2, nxt2, _ = self.verify(d2, q2, samp_rows, last=last0)
            self.last[:bucket] = torch.where(torch.tensor(active, device=nxt2.device, dtype=torch.bool), nxt2,
                                             self.last[:bucket])
            out = torch.cat([nxt2[:, None], n2[:, None]], 1).tolist()
            m = [r[1] for r in out]
            self.cache.rollback([(g2 - m[b]) * active[b] for b in range(bucket)])
            self.dcache.rollback([(c[b] - m[b] - 1) * active[b] for b in range(bucket)])
        self.decode_s += time.perf_counter() - t0
        self.steps += 1
        self.rounds += 1
        for s in live:
            k = m[s.slot]
            self.seq_rounds += 1
            self.accepted += k
            self.drafted += g2
            self.append(s, acc[s.slot][:k] + [out[s.slot][0]], t_run)

    def decode_segment(self, t_run: float) -> None:
        """One speculation round over every sequence whose prompt is complete (with auto: or an AR segment, as the
        cost model says); a slot still being prefilled (the server's chunked prefill) sits the round out."""
        self.compact()
        live = [s for s in self.slot_seq if s is not None and s.prefilled]
        if not live:
            return
        held = [s.slot for s in self.slot_seq if s is not None and not s.prefilled]
        bucket = next(b for b in buckets(self.max_batch) if b > max(s.slot for s in live))
        self.cache.focus(0, bucket)
        if self.draft is not None:
            self.dcache.focus(0, bucket)
        cm = self.cost_model(bucket) if self.spec.auto and not held else self.costs.get(bucket)
        g = cm.pick() if cm is not None else self.spec.gamma
        if self.wrunner is not None:
            return self.hier_round(live, held, bucket, t_run)
        if g == 0 and self.draft is None:  # AR segments, the target's KV alone
            return super().decode_segment(t_run)
        rows = [s if s is not None and s.prefilled else None for s in self.slot_seq[:bucket]]
        active = [int(s is not None) for s in rows]
        sampled = not self.gen.sampling.greedy or any(s.sampling is not None and not s.sampling.greedy for s in live)
        sync(self.device)
        t0 = time.perf_counter()
        with self.cache.held([h for h in held if h < bucket]), self.held_draft([h for h in held if h < bucket]):
            if g == 0:  # one AR step, and the draft's forward of the same token: its KV keeps up with the target's
                d, q = self.draft_tokens(0, None, active)
                nxt = self.sample(self.runner.step(self.last[:bucket, None])[:, -1], rows)
                n = torch.zeros_like(nxt)
            else:
                d, q = self.draft_tokens(g, rows if sampled else None, active)
                n, nxt, _ = self.verify(d, q, rows if sampled else None)
            self.last[:bucket] = torch.where(torch.tensor(active, device=nxt.device, dtype=torch.bool), nxt,
                                             self.last[:bucket])
            out = torch.cat([d, nxt[:, None], n[:, None]], 1).tolist()  # the round's one sync: tokens and counts
            n_host = [r.pop() for r in out]  # out: d1..dγ, next
            back = [(g - k) * a for k, a in zip(n_host, active, strict=True)]
            self.cache.rollback(back)
            if self.draft is not None:
                self.dcache.rollback(back)
        self.decode_s += time.perf_counter() - t0
        self.steps += 1
        self.rounds += g > 0  # an AR step (vanilla's γ = 0) is no speculation round, as self's AR segments are not
        if cm is not None and g > 0:
            cm.observe(g, [n_host[s.slot] for s in live])
        for s in live:
            k = n_host[s.slot]
            self.seq_rounds += g > 0
            self.accepted += k
            self.drafted += g
            self.append(s, out[s.slot][:k] + out[s.slot][g:], t_run)  # d1..dk, then the target's next


def generate_batch_spec(model, draft, prompts, gen, spec: BatchSpecConfig, max_batch: int | None = None,
                        eos_ids=None, graphs: bool | None = None) -> BatchResult:
    """Speculative decoding over many prompts of any lengths, ``max_batch`` in flight; results in input order, with
    the acceptance (and with auto, the cost model's record) in ``stats``."""
    prompts = [list(p) for p in prompts]
    if not prompts:
        raise ValueError("no prompts: give at least one")
    slots = min(max_batch or len(prompts), len(prompts))
    cap = max(len(p) for p in prompts) + gen.max_new_tokens
    eng = BatchSpecEngine(model, draft, slots, cap, gen, spec, eos_ids, graphs)
    res = eng.run(prompts)
    sr = eng.seq_rounds  # one per live sequence per round
    e, c, cs = eng.drunner.graph_counts()
    res.setup_s += eng.calib_s
    if spec.mode == "mspeckv":  # the middle level: its runs and acceptance of the draft model's tokens
        res.stats.update(draft_gamma=spec.draft_gamma, l1_runs=eng.l1_rounds,
                         l1_acceptance=eng.l1_accepted / eng.l1_drafted if eng.l1_drafted else None)
    res.stats.update(mode=spec.mode, gamma=spec.gamma, auto=spec.auto, rounds=eng.rounds, sequence_rounds=sr,
                     acceptance=eng.accepted / eng.drafted if eng.drafted else None,
                     tokens_per_round=(eng.accepted + sr) / sr if sr else None,  # per sequence, before limits cut
                     calibration_s=eng.calib_s, draft_captures=c, draft_capture_s=cs, draft_eager_steps=e,
                     cost_model={b: cm.record() for b, cm in eng.costs.items()} or None)
    res.stats["captures"] += c
    res.stats["capture_s"] += cs
    return res
