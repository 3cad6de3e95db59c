"""Speculative decoding: vanilla (draft -> target) and the MSpecKV hierarchy
(draft + StreamingLLM cache -> target + retrieval cache -> target + full KV), lossless at every level.

Tokens live in one device buffer (``Seq``); each model runs through a ``Runner`` that knows how many of those
tokens its cache holds, so a forward feeds exactly the missing suffix (one token, or a few after a correction).
A level is a (proposer, verifier) pair and calls the one ``speculative_accept`` (or ``greedy_accept``):
    DraftLevel      proposes k tokens autoregressively (small model) or by prompt lookup (n-gram)
    VerifyLevel     verifies a lower level's proposals in one forward; as a proposer for the level above it repeats
                    rounds until it has k tokens, each distributed exactly as its own model (its probabilities are
                    handed up as the proposal distribution, so the top level's output is the target's).
The only host syncs are the accept counts each verification needs (plus EOS flags, read in the same transfer).

``accepted`` (reported) = mean number of proposed tokens the full-KV target accepts per verification, in [0, gamma];
each verification also yields one more token (the correction or the bonus), so tokens per verification = accepted+1.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from .. import validate as v
from ..cache import make_cache, streaming_cache
from ..config import GenerationConfig, SamplingConfig
from ..kv.base import NewRows
from ..kv.placement import Placement
from ..kv.pressed import PressedKV
from ..kv.retrieval import check_budget
from .accept import greedy_accept, speculative_accept
from .autoregressive import GenerationResult, sync, trim_at_eos
from .drafters import NGramDrafter
from .runner import Runner, Seq, make_runner, use_graphs

__all__ = ["DraftLevel", "Runner", "Seq", "SpecConfig", "SpecResult", "Timers", "VerifyLevel", "check_pair",
           "speculative_generate"]  # Runner and Seq live in .runner; they are re-exported for the levels' tests
from .sampling import logits_to_probs, make_generator, sample


@dataclass(frozen=True)
class SpecConfig:
    mode: str = "mspeckv"  # vanilla | mspeckv
    gamma: int = 8  # proposals per full-KV verification (level 2)
    draft_gamma: int = 4  # mspeckv: proposals per retrieval-level verification (level 1)
    budget: int = 4096  # retrieval cache: retrieved prompt tokens (multiple of chunk)
    chunk: int = 8
    l1_press: str | None = None  # the middle level's press (any press spec); None: retrieval:budget=..,chunk=..
    draft_sinks: int = 16
    draft_window: int | None = None  # default 256 - sinks - gamma
    refresh_every: int | None = None  # rebuild the retrieval selection every N generated tokens (None: once)
    drafter: str = "model"  # model | ngram (prompt lookup in place of the draft model)
    ngram_max: int = 3
    sync_retrieval: bool = True  # put the full target's exact K/V of accepted tokens into the retrieval cache
    graphs: bool | None = None  # static-shape caches + CUDA graphs for the draft and retrieval levels (None: on CUDA)

    def __post_init__(self):
        v.choice("mode", self.mode, ("vanilla", "mspeckv"))
        v.integer("gamma", self.gamma, lo=1)
        v.integer("draft_gamma", self.draft_gamma, lo=1)
        v.integer("budget", self.budget, lo=1)
        v.integer("chunk", self.chunk, lo=1)
        v.integer("draft_sinks", self.draft_sinks, lo=0)
        v.integer("draft_window", self.draft_window, lo=1, optional=True)
        v.integer("refresh_every", self.refresh_every, lo=1, optional=True)
        v.choice("drafter", self.drafter, ("model", "ngram"))
        v.integer("ngram_max", self.ngram_max, lo=1)
        v.boolean("sync_retrieval", self.sync_retrieval)
        v.boolean("graphs", self.graphs, optional=True)
        if self.mode == "mspeckv":  # only the hierarchy has a retrieval level and a streaming draft cache
            check_budget(self.budget, self.chunk)
            _ = self.middle_press  # a bad --l1-press fails here, before any model loads
            if self.drafter == "model" and self.window < 1:
                raise v.ConfigError(f"the draft's streaming window is {self.window} tokens: 256 - "
                                    f"{v.name('draft_sinks')} {self.draft_sinks} - {v.name('gamma')} {self.gamma}; "
                                    f"lower them or set {v.name('draft_window')} >= 1")

    @property
    def middle_press(self):
        from ..presses import parse_press
        from ..presses.retrieval import RetrievalPress

        return parse_press(self.l1_press, "--l1-press") or RetrievalPress(budget=self.budget, chunk=self.chunk)

    @property
    def window(self) -> int:
        return self.draft_window if self.draft_window is not None else 256 - self.draft_sinks - self.gamma

    # buffer sizes, in one place
    @property
    def room(self) -> int:
        """Rows a draft's streaming cache keeps free during a round (a round appends at most gamma + 1 rows per
        level, and nothing is evicted inside a round, so every rollback stays exact)."""
        return 2 * self.gamma + 4

    def capacity(self, prompt: int, max_new: int) -> int:
        """Rows of the full-KV level: prompt, output, and one verification's overshoot past the last kept token."""
        return prompt + max_new + 2 * self.gamma + 8

    def middle_tail(self, max_new: int) -> int:
        """Rows the middle level appends after its press (between re-presses), with a verification's overshoot."""
        return (self.refresh_every or max_new) + 4 * self.gamma + 8


class Timers:
    """Per-region elapsed time; CUDA events on the GPU (read once at the end), perf_counter on the CPU."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"
        self.ev: dict[str, list] = {}
        self.cpu: dict[str, float] = {}

    def __call__(self, name: str):
        t = self

        class _Region:
            def __enter__(self):
                if t.cuda:
                    self.s = torch.cuda.Event(enable_timing=True)
                    self.s.record()
                else:
                    self.s = time.perf_counter()

            def __exit__(self, *exc):
                if t.cuda:
                    e = torch.cuda.Event(enable_timing=True)
                    e.record()
                    t.ev.setdefault(name, []).append((self.s, e))
                else:
                    t.cpu[name] = t.cpu.get(name, 0.0) + time.perf_counter() - self.s

        return _Region()

    def seconds(self) -> dict[str, float]:
        if self.cuda:
            torch.cuda.synchronize()
            return {k: sum(s.elapsed_time(e) for s, e in v) / 1e3 for k, v in self.ev.items()}
        return dict(self.cpu)


@dataclass
class LevelStats:
    rounds: int = 0
    proposed: int = 0
    accepted: int = 0

    def as_dict(self) -> dict:
        return {"rounds": self.rounds, "proposed": self.proposed, "accepted": self.accepted,
                "acceptance_rate": self.accepted / self.proposed if self.proposed else None,
                "accepted_per_round": self.accepted / self.rounds if self.rounds else None}


class DraftLevel:
    """Level 0: a small model (streaming or full cache) or an n-gram table proposes k tokens."""

    def __init__(self, runner: Runner | None, s: SamplingConfig, g, timers: Timers, ngram: NGramDrafter | None = None):
        self.runner, self.s, self.g, self.t, self.ngram = runner, s, g, timers, ngram

    def propose(self, seq: Seq, k: int) -> tuple[int, Tensor | None]:
        if self.ngram is not None:
            toks = self.ngram.propose(seq.host, k)
            if toks:
                seq.tokens[0, seq.len:seq.len + len(toks)] = torch.tensor(toks, device=seq.tokens.device)
                seq.host.extend(toks)
                seq.len += len(toks)
            return len(toks), None  # one-hot proposals: q(x) = 1
        qs = []
        with self.t("draft"):
            for _ in range(k):
                logits = self.runner.feed(seq, seq.len, 1)[:, -1]  # (1, V)
                if self.s.greedy:
                    tok = logits.argmax(-1)
                else:
                    p = logits_to_probs(logits, self.s)
                    tok = sample(p, self.g)
                    qs.append(p)
                seq.tokens[0, seq.len] = tok[0]
                seq.len += 1
        return k, (torch.stack(qs, 1) if qs else None)

    def rollback_to(self, m: int) -> None:
        if self.runner is not None:
            self.runner.rollback_to(m)


class VerifyLevel:
    """Verifies a lower level's proposals with its own model; proposes to the level above in rounds."""

    def __init__(self, name: str, runner: Runner, lower, lower_gamma: int, s: SamplingConfig, g, timers: Timers,
                 eos: Tensor | None = None):
        self.name, self.runner, self.lower, self.lower_gamma = name, runner, lower, lower_gamma
        self.s, self.g, self.t, self.eos = s, g, timers, eos
        self.stats = LevelStats()
        self.saw_eos = False

    def _probs(self, logits: Tensor) -> Tensor:
        return logits_to_probs(logits, self.s)

    def verify(self, seq: Seq, L: int, n: int, q: Tensor | None) -> tuple[int, Tensor]:
        """Tokens [L, L+n) were proposed with distributions q (1, n, V) (None: greedy or one-hot).
        Returns (accepted, this level's distributions (1, accepted+1, V) for the accepted + next token)."""
        with self.t(self.name):
            logits = self.runner.feed(seq, L + n, n + 1)  # (1, n+1, V): positions L .. L+n
            drafted = seq.tokens[:, L:L + n]
            if self.s.greedy:
                acc, nxt = greedy_accept(drafted, logits)
                p = logits
            else:
                p = self._probs(logits)
                if q is None:  # deterministic proposals (n-gram): a one-hot proposal distribution
                    q = torch.zeros_like(p[:, :n]).scatter_(-1, drafted[..., None], 1.0)
                acc, nxt = speculative_accept(q, p, drafted, self.g)
            seq.tokens[0].index_copy_(0, L + acc, nxt)  # device-side index: no sync
            window = seq.tokens[0, L:L + n + 1]
            flags = torch.isin(window, self.eos).long() if self.eos is not None else torch.zeros_like(window)
            host = torch.cat([acc, window, flags]).tolist()  # the one sync: accept count (+ tokens, EOS flags)
        a = host[0]
        if seq.host is not None:
            del seq.host[L:]
            seq.host.extend(host[1:1 + a + 1])
        self.saw_eos = any(host[2 + n: 2 + n + a + 1])
        seq.len = L + a + 1
        self.rollback_to(L + a)
        self.stats.rounds += 1
        self.stats.proposed += n
        self.stats.accepted += a
        return a, p[:, :a + 1]

    def propose(self, seq: Seq, k: int) -> tuple[int, Tensor | None]:
        """k tokens (exactly) distributed as this level's model, with their distributions."""
        out, made = [], 0
        while made < k:
            L = seq.len
            n, q = self.lower.propose(seq, min(self.lower_gamma, k - made - 1))
            a, p = self.verify(seq, L, n, q)
            out.append(p)
            made += a + 1
        return made, (None if self.s.greedy else torch.cat(out, 1))

    def rollback_to(self, m: int) -> None:
        self.runner.rollback_to(m)
        self.lower.rollback_to(m)


def check_pair(target, draft, tok_t=None, tok_d=None) -> None:
    """Draft and target must share a vocabulary; a draft larger than the target is allowed but pointless."""
    if target.cfg.vocab_size != draft.cfg.vocab_size:
        raise ValueError(f"draft vocabulary ({draft.cfg.vocab_size}) differs from the target's "
                         f"({target.cfg.vocab_size}); pick a draft from the same model family and tokenizer")
    if tok_t is not None and tok_d is not None and tok_t.get_vocab() != tok_d.get_vocab():
        raise ValueError("draft and target tokenizers differ (same size, different tokens); speculative decoding "
                         "needs one tokenizer: pick a draft from the same model family")
    nt = sum(p.numel() for p in target.parameters())
    nd = sum(p.numel() for p in draft.parameters())
    if nd >= nt:
        warnings.warn(f"the draft ({nd / 1e6:.0f}M parameters) is not smaller than the target ({nt / 1e6:.0f}M): "
                      f"speculation will be slower than plain decoding", stacklevel=2)


@dataclass
class SpecResult(GenerationResult):
    levels: dict = field(default_factory=dict)

    @property
    def ms_per_token(self) -> float:
        """Mean ms per generated token after the first (several tokens per verification)."""
        return 1e3 * self.decode_s / max(self.n_generated - 1, 1)

    def summary(self) -> dict:
        return {**super().summary(), "levels": self.levels}


@torch.inference_mode()
def speculative_generate(target, draft, prompt: Tensor, gen: GenerationConfig, spec: SpecConfig,
                         placement: Placement | None = None, eos_ids=None, progress=None, press=None) -> SpecResult:
    """Generate with vanilla or MSpecKV speculation. prompt: (1, T). Greedy output equals AR greedy exactly.

    ``press`` compresses the target's own (full-level) KV after prefill: the output then equals AR over the same
    pressed cache, not AR over the full KV. ``spec.l1_press`` is the middle level's press, which stays lossless.
    ``setup_s``: building the caches before the prefill and capturing graphs after it (``graph_setup_s``)."""
    if draft is None and spec.drafter == "model":
        raise ValueError("speculative_generate got no draft model, and SpecConfig(drafter='model') proposes with one: "
                         "pass the draft, or use SpecConfig(drafter='ngram') (prompt lookup, no draft model)")
    t_start = time.perf_counter()
    target.check_prompt(prompt)
    if prompt.shape[0] != 1:
        raise ValueError("speculative decoding runs batch 1; use --mode ar for batched prompts")
    device = target.device
    prompt = prompt.to(device)
    T = prompt.shape[1]
    target.check_context(T + gen.max_new_tokens)
    if draft is not None:
        check_pair(target, draft)
    s = gen.sampling
    g = make_generator(device, s.seed)
    eos = set(target.cfg.eos_token_ids if eos_ids is None else eos_ids) if gen.stop_on_eos else set()
    eos_t = torch.tensor(sorted(eos), device=device) if eos else None
    timers = Timers(device)
    cap = spec.capacity(T, gen.max_new_tokens)
    mspeckv = spec.mode == "mspeckv"
    graphs = use_graphs(target, spec.graphs)
    if placement is not None and placement.rollback_slack < spec.gamma + 1:  # a verification rolls back <= gamma
        placement = replace(placement, rollback_slack=spec.gamma + 1)
    # level 2: the target over its full KV (graphed when nothing is offloaded or pressed)
    full_cache = make_cache(target, placement, 1, cap, press=press, graphs=graphs)
    full = make_runner(target, full_cache)
    new_rows = NewRows(target.cfg.n_layers)
    l1_press = spec.middle_press if mspeckv else None
    l1_obs = l1_press.observers(target.cfg.n_layers) if l1_press is not None else []
    full_cache.observers += [new_rows, *l1_obs]  # the middle level's press watches the full target's forwards
    seq = Seq(prompt, cap, host=spec.drafter == "ngram")

    sync(device)
    t0 = time.perf_counter()
    with timers("prefill"):
        logits = target.prefill(prompt, full.cache, chunk=gen.prefill_chunk, progress=progress)
        full_cache.compress()
        full.n = T
        first = logits.argmax(-1) if s.greedy else sample(logits_to_probs(logits, s), g)
        seq.tokens[0, T] = first[0]
        seq.len = T + 1
        if seq.host is not None:
            seq.host.append(int(first[0]))

        # level 0
        if spec.drafter == "ngram":
            lower0 = DraftLevel(None, s, g, timers, ngram=NGramDrafter(max_ngram=spec.ngram_max, k=spec.gamma))
            dcache = None
        elif mspeckv:
            dcache = streaming_cache(draft, sinks=spec.draft_sinks, window=spec.window, room=spec.room,
                                     static=graphs)
            druns = make_runner(draft, dcache)
            _prefill_streaming(druns, seq, T, spec.draft_sinks, spec.window, spec.room)
            lower0 = DraftLevel(druns, s, g, timers)
        else:
            dcache = make_cache(draft, None, 1, cap, graphs=graphs)
            druns = make_runner(draft, dcache)
            draft.prefill(prompt, dcache, chunk=gen.prefill_chunk)
            druns.n = T
            lower0 = DraftLevel(druns, s, g, timers)

        # level 1 (mspeckv): the target over a retrieval cache
        mid, mid_runner = lower0, None
        if mspeckv:
            extra = spec.middle_tail(gen.max_new_tokens)
            nl = target.cfg.n_layers
            rows = l1_press.max_rows(T + gen.max_new_tokens, nl, target.cfg.n_kv_heads)
            static = graphs and l1_press.dense  # codes/latents are decoded per forward: that level runs eagerly
            if l1_press.dense and l1_press.max_rows(T, nl) >= T:
                warnings.warn(f"--l1-press {l1_press} covers the whole {T}-token prompt: the middle level would equal "
                              f"the full cache, so it is skipped (draft -> full target)", stacklevel=2)
                rcache = None
            else:
                rcache = PressedKV.build(l1_press, full_cache, l1_obs, tail=extra, static=static, fixed_cap=rows)
            if rcache is not None:
                mid_runner = make_runner(target, rcache, n=T)
                mid = VerifyLevel("verify_l1", mid_runner, lower0, spec.draft_gamma, s, g, timers)
    sync(device)
    t_first = time.perf_counter()
    # capture the common shapes now (one-time setup, outside TTFT and decode time); rare ones lazily
    if lower0.runner is not None:
        lower0.runner.precapture([(1, 1), (2, 1)])
    if mid_runner is not None:
        mid_runner.precapture([(k + 1 + c, k + 1) for k in range(spec.draft_gamma + 1) for c in (0, 1)])
    # every verification shape: the last rounds propose fewer than gamma, and a graph captured then would be charged
    # to decode time (a capture runs three forwards)
    full.precapture([(k + 1, k + 1) for k in range(spec.gamma + 1)])
    h2d0 = (full_cache.memory_report() or {}).get("h2d_bytes_total")  # prefill and captures: outside decode
    sync(device)
    t_setup = time.perf_counter()
    runners = {"verify_l2": full, "verify_l1": mid_runner}  # mid_runner exists exactly when level 1 does
    at_setup = {k: r.graph_counts() for k, r in runners.items() if r is not None}  # the loop's counts start here
    top = VerifyLevel("verify_l2", full, mid, spec.gamma, s, g, timers, eos=eos_t)
    made = 1
    saw_eos = bool(eos) and int(first[0]) in eos
    last_build = T
    while made < gen.max_new_tokens and not saw_eos:
        L = seq.len
        if dcache is not None:
            dcache.reserve(spec.room)  # no eviction inside a round: every rollback stays exact
        if mid_runner is not None and spec.refresh_every and L - last_build >= spec.refresh_every:
            mid_runner.rollback_to(full.n)
            mid_runner.cache.compress(full_cache)  # re-press the grown full cache (same buffers: graphs stay valid)
            mid_runner.n, last_build = full.n, full.n
        k = min(spec.gamma, gen.max_new_tokens - made - 1)
        n, q = mid.propose(seq, k) if k > 0 else (0, None)
        fed_from = full.n
        a, _ = top.verify(seq, L, n, q)
        made += a + 1
        saw_eos = top.saw_eos
        if mid_runner is not None and spec.sync_retrieval and mid_runner.n >= fed_from:
            mid_runner.rollback_to(fed_from)  # replace level-1 K/V of accepted tokens by the full target's
            m = L + a - fed_from
            mid_runner.cache.append_external([(k_[:, :, :m], v_[:, :, :m]) for k_, v_ in new_rows.new])
            mid_runner.n = L + a
    sync(device)
    t_end = time.perf_counter()
    rows = [seq.tokens[0, T:T + min(made, gen.max_new_tokens)].tolist()]
    rows = trim_at_eos(rows, eos) if eos else rows
    secs = timers.seconds()
    levels = {"verify_l2": top.stats.as_dict()}
    if isinstance(mid, VerifyLevel):
        levels["verify_l1"] = mid.stats.as_dict()
    for k, (e0, c0, s0) in at_setup.items():
        e, c, cs = runners[k].graph_counts()
        levels[k].update(eager_forwards=e - e0, graph_captures=c - c0, capture_s=cs - s0)
    stats = {"mode": spec.mode, "drafter": spec.drafter, "accepted": levels["verify_l2"]["accepted_per_round"],
             "verifications": top.stats.rounds, "time_s": secs, "forwards": top.stats.rounds + 1}
    if report := full_cache.memory_report():
        stats["memory"] = report
    stats["graph_setup_s"] = t_setup - t_first
    stats["h2d_bytes_before_decode"] = h2d0
    return SpecResult(rows, T, secs.get("prefill", t_first - t0), t_first - t0, t_end - t_setup, stats=stats,
                      setup_s=t0 - t_start + t_setup - t_first, levels=levels)


def _prefill_streaming(r: Runner, seq: Seq, T: int, sinks: int, window: int, room: int) -> None:
    """StreamingLLM prefill of the draft: the sink tokens, then the last ``window`` prompt tokens at their real
    positions (what a streaming cache keeps anyway), in forwards of at most ``room`` tokens."""
    head = min(sinks, T)
    while r.n < head:
        r.feed(seq, min(head, r.n + room), 1, eager=True)
    r.cache.skip(max(head, T - window) - head)
    r.n = max(head, T - window)
    while r.n < T:
        r.feed(seq, min(T, r.n + room), 1, eager=True)
