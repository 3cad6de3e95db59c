"""The server's scheduler: requests that arrive over time, decoded together by the batched engine.

One background thread owns the model and runs rounds (torch work never runs on the asyncio loop). A round:
1. takes the requests submitted since the last round (the waiting queue is bounded: ``submit`` raises ``QueueFull``);
2. drops the cancelled and the timed-out ones (a request in a slot leaves it, which frees its KV);
3. prefills: with ``interleave`` (default), at most ``prefill_chunk`` prompt tokens per round, one chunk forward per
   joining request in arrival order, so a long prompt takes several rounds and the running streams keep flowing in
   between; without it, each joining request's whole prompt, in chunks, before the round's decoding;
4. decodes one segment of every slot whose prompt is complete (a slot still being prefilled sits it out);
5. hands each request its new text: up to its EOS, ``max_tokens`` or the first stop string (the text stops before
   it). A request's events go to its ``emit`` callback, from this thread.

Every request brings its own sampling and, when seeded, its own generator: a greedy request decodes exactly as
``mspeckv generate`` decodes that prompt alone, and a seeded one draws as ``generate --seed`` does, whatever else is in
the batch.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .. import validate as v
from ..config import GenerationConfig, SamplingConfig
from ..decoding.batch import BatchEngine, Sequence
from ..decoding.sampling import make_generator

log = logging.getLogger("mspeckv.serve")


@dataclass(frozen=True)
class SchedulerConfig:
    max_batch: int = 8  # sequences decoded together (KV slots)
    capacity: int = 4096  # KV rows per slot: a request's prompt + max_tokens
    queue: int = 64  # requests waiting for a slot; one more is refused (QueueFull)
    timeout_s: float | None = None  # per request, from its submission (None: none)
    prefill_chunk: int = 512  # prompt tokens per prefill forward (and per round with interleave)
    interleave: bool = True  # one chunk per round between decode segments (False: whole prompts at once)
    check_every: int | None = None  # decode steps per segment (the engine's default: 16 on CUDA, 1 on the CPU)

    def __post_init__(self):
        v.integer("max_batch", self.max_batch, lo=1)
        v.integer("capacity", self.capacity, lo=2)
        v.integer("queue", self.queue, lo=1)
        if self.timeout_s is not None:
            v.number("timeout_s", self.timeout_s, lo=0, lo_open=True)
        v.integer("prefill_chunk", self.prefill_chunk, lo=1)
        v.boolean("interleave", self.interleave)
        v.integer("check_every", self.check_every, lo=1, optional=True)


class QueueFull(Exception):
    """The waiting queue holds ``queue`` requests already: try again later."""


class Closed(Exception):
    """The scheduler is shutting down and takes no new request."""


@dataclass
class Event:
    """What a request hears: ``text`` (new text and the tokens so far), then one ``done`` or ``error``."""

    kind: str  # "text" | "done" | "error"
    text: str = ""
    finish: str | None = None  # done: "stop" (EOS or a stop string) | "length"
    usage: dict | None = None  # done: prompt_tokens, completion_tokens, total_tokens
    error: str | None = None  # error: why
    code: str | None = None  # error: "timeout" | "shutdown" | "internal"


_ids = itertools.count()


@dataclass(eq=False)
class Request:
    prompt: list[int]
    max_tokens: int
    sampling: SamplingConfig = SamplingConfig()
    stop: tuple[str, ...] = ()
    emit: Callable[[Event], None] = lambda e: None
    id: int = field(default_factory=lambda: next(_ids))
    # the scheduler's state
    seq: Sequence | None = None
    submitted: float = 0.0
    text: str = ""  # the text so far (cut at a stop string)
    raw: str = ""  # the text of tokens [0, read)
    ctx: int = 0  # tokens [ctx, read) are decoded again as the context of the new ones
    read: int = 0
    searched: int = 0  # characters of ``raw`` searched for stop strings
    sent: int = 0  # characters of ``text`` emitted
    counted: int = 0  # tokens counted in the metrics
    finished: bool = False
    cancelled: bool = False

    def cancel(self) -> None:
        """Leave as soon as the scheduler sees it (between rounds): a waiting request is dropped, a running one
        leaves its slot. No event follows."""
        self.cancelled = True


class Scheduler:
    """Continuous batching over a ``BatchEngine``. ``start()``, then ``submit(request)`` from any thread."""

    def __init__(self, model, decode: Callable[[list[int]], str], cfg: SchedulerConfig, cache=None, eos_ids=None,
                 spec=None, draft=None):
        self.model, self.decode, self.cfg = model, decode, cfg
        gen = GenerationConfig(max_new_tokens=cfg.capacity - 1, prefill_chunk=cfg.prefill_chunk)
        self.spec = spec  # a BatchSpecConfig: rounds of speculation at batch (decoding/batch_spec.py)
        if spec is not None:
            from ..decoding.batch_spec import BatchSpecEngine

            if cache is not None:
                raise ValueError("speculation at batch runs over the dense batched KV: no placed or pressed cache")
            self.engine = BatchSpecEngine(model, draft, cfg.max_batch, cfg.capacity, gen, spec, eos_ids=eos_ids)
        else:
            self.engine = BatchEngine(model, cfg.max_batch, cfg.capacity, gen, eos_ids=eos_ids,
                                      check_every=cfg.check_every, cache=cache)
        self.engine.capture(cfg.max_batch)  # every bucket's graph now, not inside a request (CUDA only)
        self.cv = threading.Condition()
        self.inbox: deque[Request] = deque()
        self.waiting: deque[Request] = deque()  # in arrival order, no slot yet
        self.active: list[Request] = []  # in a slot (prefilling or decoding)
        self.closing: float | None = None  # when set: no new request; in-flight ones must finish by this time
        self.stopped = False
        self.thread = threading.Thread(target=self.loop, name="mspeckv-scheduler", daemon=True)
        self.t0 = time.perf_counter()
        # counters read by the metrics endpoint (written by the scheduler thread only)
        self.stats = {"generated_tokens": 0, "prompt_tokens": 0, "decode_steps": 0, "rounds": 0,
                      "finished": {"stop": 0, "length": 0, "cancelled": 0, "timeout": 0, "error": 0, "shutdown": 0},
                      "ttft_count": 0, "ttft_sum_s": 0.0}
        self.recent: deque[tuple[float, int]] = deque()  # (time, tokens) of the last rounds, for tokens/s

    # ------------------------------------------------------------------------------------------------ any thread
    def check(self, prompt_len: int, max_tokens: int) -> None:
        """Refuse (ValueError) a request that cannot fit: before it is queued."""
        if prompt_len < 1:
            raise ValueError("the prompt encodes to 0 tokens; give some text")
        v.integer("max_tokens", max_tokens, lo=1)
        need = prompt_len + max_tokens
        if need > self.model.cfg.max_position:
            raise ValueError(f"the prompt ({prompt_len} tokens) + max_tokens ({max_tokens}) = {need} tokens exceed the "
                             f"model's context of {self.model.cfg.max_position} tokens; shorten the prompt or lower "
                             f"max_tokens")
        if need > self.cfg.capacity:
            raise ValueError(f"the prompt ({prompt_len} tokens) + max_tokens ({max_tokens}) = {need} tokens exceed the "
                             f"server's {self.cfg.capacity} KV rows per sequence (--max-context); shorten the prompt "
                             f"or lower max_tokens")

    def submit(self, req: Request) -> None:
        self.check(len(req.prompt), req.max_tokens)
        if self.spec is not None and req.sampling.seed is not None and not req.sampling.greedy:
            raise ValueError("seed: a sampled request's draws are not reproducible under speculation at batch (the "
                             "batch shares one generator); drop seed, use temperature 0, or serve with --mode ar")
        if req.sampling.seed is not None:
            req_gen = make_generator(self.engine.device, req.sampling.seed)
        elif not req.sampling.greedy:  # its own draws, from a fresh random seed
            req_gen = make_generator(self.engine.device, int(torch.randint(0, 2**62, (1,)).item()))
        else:
            req_gen = None
        req.seq = Sequence(req.id, list(req.prompt), req.max_tokens, sampling=req.sampling, generator=req_gen)
        with self.cv:
            if self.closing is not None or self.stopped:
                raise Closed("the server is shutting down; no new request is taken")
            if len(self.inbox) + len(self.waiting) >= self.cfg.queue:
                raise QueueFull(f"{self.cfg.queue} requests are already waiting; retry later")
            req.submitted = time.perf_counter()
            self.inbox.append(req)
            self.cv.notify()

    def start(self) -> Scheduler:
        self.thread.start()
        return self

    def close(self, grace_s: float) -> None:
        """Take no new request; those in flight may finish within ``grace_s`` seconds, then get an error."""
        with self.cv:
            if self.closing is None:
                self.closing = time.perf_counter() + grace_s
            self.cv.notify()

    def stop(self, timeout: float = 30.0) -> None:
        """End the thread now: every request still in flight gets an error event."""
        with self.cv:
            self.stopped = True
            self.cv.notify()
        if self.thread.is_alive():
            self.thread.join(timeout)

    def wake(self) -> None:
        with self.cv:
            self.cv.notify()

    def snapshot(self) -> dict:
        """Counts for the metrics (racy reads of ints, never torch)."""
        now = time.perf_counter()
        recent = [(t, n) for t, n in list(self.recent) if now - t <= 10.0]
        window = min(10.0, now - self.t0)
        kv = self.engine.cache.memory_report()
        return {**self.stats, "finished": dict(self.stats["finished"]),
                "running": len(self.active), "queued": len(self.inbox) + len(self.waiting),
                "tokens_per_s": sum(n for _, n in recent) / window if window > 0 else 0.0,
                "kv_bytes_held": kv.get("kv_bytes_held", 0), "kv_bytes_allocated": kv.get("kv_bytes_allocated", 0),
                # every byte count of the cache's own report (a placed cache: GPU, pinned host, streamed H2D)
                "kv_report": {k: x for k, x in kv.items() if isinstance(x, int | float) and not isinstance(x, bool)
                              and "bytes" in k},
                "slots": self.cfg.max_batch, "capacity": self.cfg.capacity,
                "spec_rounds": getattr(self.engine, "rounds", 0), "spec_drafted": getattr(self.engine, "drafted", 0),
                "spec_accepted": getattr(self.engine, "accepted", 0)}

    # ------------------------------------------------------------------------------------------------ the thread
    def idle(self) -> bool:
        return not (self.inbox or self.waiting or self.active)

    def loop(self) -> None:
        with torch.inference_mode():
            while True:
                with self.cv:
                    while self.idle() and not self.stopped:
                        self.cv.wait(0.5)
                    if self.stopped:
                        break
                    self.waiting.extend(self.inbox)
                    self.inbox.clear()
                try:
                    self.round()
                except Exception as e:  # a failed forward: every request in flight gets the error, the loop goes on
                    log.exception("scheduler round failed")
                    self.fail_all(f"the server failed on this request: {type(e).__name__}: {e}", "internal", "error")
        self.fail_all("the server shut down before this request finished", "shutdown", "shutdown")

    def round(self) -> None:
        now = time.perf_counter()
        self.sweep(now)
        self.prefill(now)
        n0 = self.engine.steps
        self.engine.decode_segment(now)
        self.stats["decode_steps"] += self.engine.steps - n0
        self.stats["rounds"] += 1
        self.publish()

    def sweep(self, now: float) -> None:
        """Drop the cancelled, the timed-out and (past the shutdown grace) every request."""
        late = self.closing is not None and now >= self.closing
        for r in [*self.waiting, *self.active]:
            timed_out = self.cfg.timeout_s is not None and now - r.submitted > self.cfg.timeout_s
            if r.cancelled:
                self.finish(r, "cancelled")
            elif late:
                self.finish(r, "shutdown", error="the server shut down before this request finished", code="shutdown")
            elif timed_out:
                why = f"the request did not finish within the server's {self.cfg.timeout_s:g} s timeout (--timeout)"
                self.finish(r, "timeout", error=why, code="timeout")

    def prefill(self, now: float) -> None:
        """Interleaved: at most ``prefill_chunk`` prompt tokens this round, in arrival order (a request that is being
        prefilled continues first). Otherwise every joining request's whole prompt."""
        eng = self.engine
        budget = self.cfg.prefill_chunk if self.cfg.interleave else None
        while budget is None or budget > 0:
            r = next((r for r in self.active if not r.seq.prefilled), None)
            if r is None:
                if not self.waiting or not eng.cache.free_slots():
                    return
                r = self.waiting.popleft()
                eng.start(r.seq)
                self.active.append(r)
                self.stats["prompt_tokens"] += len(r.prompt)
            n = self.cfg.prefill_chunk if budget is None else min(self.cfg.prefill_chunk, budget)
            n = min(n, len(r.prompt) - r.seq.fed)
            eng.feed(r.seq, n, r.submitted)
            if budget is not None:
                budget -= n

    def publish(self) -> None:
        """New text to each running request; the finished ones leave."""
        tokens = 0
        for r in list(self.active):
            s = r.seq
            if not s.prefilled:
                continue
            tokens += len(s.tokens) - r.counted
            r.counted = len(s.tokens)
            self.advance(r)
        if tokens:
            self.stats["generated_tokens"] += tokens
            self.recent.append((time.perf_counter(), tokens))
        while self.recent and time.perf_counter() - self.recent[0][0] > 10.0:
            self.recent.popleft()

    def advance(self, r: Request) -> None:
        """Decode ``r``'s new tokens to text; cut at the first stop string; emit what can no longer change.

        Incremental: only the tokens since the last complete text are decoded, after the few before them (their
        context, e.g. a leading space), so a round costs the new tokens, not the whole output. Text that ends in an
        incomplete character waits for the next token."""
        s = r.seq
        head = self.decode(s.tokens[r.ctx:r.read])
        tail = self.decode(s.tokens[r.ctx:])
        if len(tail) > len(head) and (not tail.endswith("\ufffd") or s.finish is not None):
            r.raw += tail[len(head):]
            r.ctx, r.read = r.read, len(s.tokens)
        finish = {"eos": "stop", "length": "length"}.get(s.finish)
        text = r.raw
        if r.stop:
            start = max(0, r.searched - max(map(len, r.stop)))
            hits = [i for i in (text.find(x, start) for x in r.stop) if i >= 0]
            if hits:
                text, finish = text[:min(hits)], "stop"
            r.searched = len(text)
        r.text = text
        if finish is not None:
            self.finish(r, finish)
            return
        hold = max((len(x) for x in r.stop), default=1) - 1  # a stop string may be starting at the end
        upto = len(text) - hold
        if upto > r.sent:
            r.emit(Event("text", text[r.sent:upto]))
            r.sent = upto

    def usage(self, r: Request) -> dict:
        n = len(r.seq.tokens) if r.seq is not None else 0
        return {"prompt_tokens": len(r.prompt), "completion_tokens": n, "total_tokens": len(r.prompt) + n}

    def finish(self, r: Request, how: str, error: str | None = None, code: str | None = None) -> None:
        """``r`` leaves (its slot freed) with its last text and ``done``, an error, or nothing (cancelled)."""
        if r.finished:
            return
        r.finished = True
        if r in self.waiting:
            self.waiting.remove(r)
        if r in self.active:
            self.active.remove(r)
        if r.seq is not None:
            self.engine.retire(r.seq, how)
        self.stats["finished"][how if how in self.stats["finished"] else "error"] += 1
        try:
            if error is not None:
                r.emit(Event("error", error=error, code=code))
            elif how != "cancelled":
                if r.seq is not None and r.seq.ttft_s is not None:  # arrival -> first token (queue + prefill)
                    self.stats["ttft_count"] += 1
                    self.stats["ttft_sum_s"] += r.seq.ttft_s
                if len(r.text) > r.sent:
                    r.emit(Event("text", r.text[r.sent:]))
                    r.sent = len(r.text)
                r.emit(Event("done", finish=how, usage=self.usage(r)))
        except Exception:  # a listener that went away must not stop the loop
            log.exception("a request's listener failed")

    def fail_all(self, message: str, code: str, how: str) -> None:
        with self.cv:
            self.waiting.extend(self.inbox)
            self.inbox.clear()
        for r in [*self.waiting, *self.active]:
            self.finish(r, how, error=message, code=code)
        self.engine.cache.abort()  # a forward that raised between begin and end
        for s in self.engine.slot_seq:  # a failed round may leave a slot behind
            if s is not None:
                self.engine.retire(s, how)
