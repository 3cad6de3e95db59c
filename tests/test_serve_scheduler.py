"""The server's scheduler (mspeckv/serve/scheduler.py) over the engine's hooks (decoding/batch.py: start, feed, held
slots, per-sequence sampling): requests arriving over time decode exactly as each prompt alone."""

import time

import pytest
import torch

from mspeckv.config import GenerationConfig, SamplingConfig
from mspeckv.decoding.autoregressive import generate
from mspeckv.decoding.batch import BatchEngine, Sequence, batch_cache
from mspeckv.decoding.sampling import make_generator
from mspeckv.serve.scheduler import QueueFull, Request, Scheduler, SchedulerConfig
from tests.tiny import tiny_model


def prompts(lens, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 97, (n,), generator=g).tolist() for n in lens]


GREEDY = SamplingConfig()


def solo(m, p, n, sampling=GREEDY):
    return generate(m, torch.tensor([p]), GenerationConfig(max_new_tokens=n, sampling=sampling)).tokens[0]


def text(ids):
    return " ".join(map(str, ids))


def wait(events, n, limit=30.0):
    t = time.time()
    while time.time() - t < limit and not all(e and e[-1].kind in ("done", "error") for e in events[:n]):
        time.sleep(0.02)
    assert all(e and e[-1].kind in ("done", "error") for e in events[:n]), "requests did not finish in time"


def run(m, reqs, spec=None, draft=None, **cfg):
    """Submit (prompt, max_tokens, kwargs) requests; their events."""
    sch = Scheduler(m, text, SchedulerConfig(**{"max_batch": 3, "capacity": 128, "prefill_chunk": 8, **cfg}),
                    spec=spec, draft=draft).start()
    events = [[] for _ in reqs]
    try:
        for i, (p, n, kw) in enumerate(reqs):
            sch.submit(Request(p, n, emit=events[i].append, **kw))
        wait(events, len(reqs))
    finally:
        sch.stop()
    assert sch.engine.cache.live_slots() == []  # every slot freed
    return events, sch


def joined(ev):
    return "".join(e.text for e in ev if e.kind == "text")


# ------------------------------------------------------------------------------------------------ engine hooks
@pytest.mark.parametrize("kind", ["batch", "stack"])
def test_chunked_prefill_between_decode_segments_equals_each_prompt_alone(kind):
    """A slot prefilled chunk by chunk while others decode (it sits their segments out) decodes as the prompt alone;
    planted bug: a held slot that took part in the decode forwards would get rows in the middle of its prompt."""
    m = tiny_model("llama")
    a, b = prompts((6, 41))
    cache = batch_cache(m, 2, 64) if kind == "batch" else batch_cache(m, 2, 64, press="streaming:budget=1.0")
    eng = BatchEngine(m, 2, 64, GenerationConfig(max_new_tokens=12, stop_on_eos=False), cache=cache)
    sa, sb = Sequence(0, a, 12), Sequence(1, b, 8)
    with torch.inference_mode():
        eng.start(sb)  # slot 0: inside the decode range of the running sequence in slot 1
        eng.admit(sa, 0.0)
        assert (sb.slot, sa.slot) == (0, 1)
        chunks = 0
        while not eng.feed(sb, 5, 0.0):  # one chunk, then one decode step of the running sequence
            eng.decode_segment(0.0)
            chunks += 1
        while any(eng.slot_seq):
            eng.decode_segment(0.0)
    assert chunks == 8 and len(sa.tokens) == 12
    gen = GenerationConfig(max_new_tokens=12, stop_on_eos=False)
    assert sa.tokens == generate(m, torch.tensor([a]), gen).tokens[0]
    gen = GenerationConfig(max_new_tokens=8, stop_on_eos=False)
    assert sb.tokens == generate(m, torch.tensor([b]), gen).tokens[0]


def test_a_sequence_with_its_own_seed_draws_as_generate_alone():
    m = tiny_model("qwen2")
    ps = prompts((5, 9, 7), seed=2)
    s = SamplingConfig(temperature=0.8, top_k=20, seed=11)
    eng = BatchEngine(m, 3, 32, GenerationConfig(max_new_tokens=10, stop_on_eos=False,
                                                 sampling=SamplingConfig(temperature=1.0, seed=0)))
    seqs = [Sequence(i, p, 10, sampling=s if i == 1 else None,
                     generator=make_generator("cpu", 11) if i == 1 else None) for i, p in enumerate(ps)]
    with torch.inference_mode():
        for q in seqs:
            eng.admit(q, 0.0)
        while any(eng.slot_seq):
            eng.decode_segment(0.0)
    want = generate(m, torch.tensor([ps[1]]), GenerationConfig(max_new_tokens=10, stop_on_eos=False, sampling=s))
    assert seqs[1].tokens == want.tokens[0]


# ------------------------------------------------------------------------------------------------ the scheduler
def test_requests_over_time_each_decode_as_alone():
    m = tiny_model("llama")
    ps = prompts((5, 40, 9, 70, 3, 33, 17))
    events, sch = run(m, [(p, 10, {}) for p in ps])
    for p, ev in zip(ps, events, strict=True):
        assert joined(ev) == text(solo(m, p, 10))
        assert ev[-1].kind == "done" and ev[-1].usage["prompt_tokens"] == len(p)
        assert ev[-1].usage["completion_tokens"] == len(solo(m, p, 10))
    assert sch.stats["prompt_tokens"] == sum(map(len, ps))


def test_seeded_request_is_reproducible_whatever_else_runs():
    m = tiny_model("llama")
    p, *others = prompts((12, 30, 8, 21), seed=4)
    s = SamplingConfig(temperature=0.9, top_p=0.9, seed=7)
    alone, _ = run(m, [(p, 10, {"sampling": s})])
    crowd, _ = run(m, [(o, 10, {"sampling": SamplingConfig(temperature=1.0)}) for o in others[:1]]
                   + [(p, 10, {"sampling": s})] + [(o, 10, {}) for o in others[1:]])
    assert joined(alone[0]) == joined(crowd[1]) == text(solo(m, p, 10, s))


def test_stop_string_cuts_the_text_and_frees_the_slot():
    m = tiny_model("llama")
    p = prompts((9,), seed=1)[0]
    full = text(solo(m, p, 20))
    stop = full[len(full) // 2:len(full) // 2 + 3]
    events, sch = run(m, [(p, 20, {"stop": (stop,)})])
    assert joined(events[0]) == full[:full.find(stop)]
    assert events[0][-1].finish == "stop"
    assert stop not in joined(events[0])


def test_cancel_and_timeout_leave_their_slots():
    m = tiny_model("llama")
    slow = lambda ids: (time.sleep(0.005), text(ids))[1]  # noqa: E731  (>= 5 ms a round: 400 tokens take > 2 s)
    sch = Scheduler(m, slow, SchedulerConfig(max_batch=2, capacity=500, timeout_s=0.5)).start()
    ev = [[], [], []]
    try:
        reqs = [Request(p, 400, emit=ev[i].append) for i, p in enumerate(prompts((5, 6, 7)))]
        for r in reqs:
            sch.submit(r)
        t = time.time()
        while not ev[0] and time.time() - t < 10:
            time.sleep(0.01)
        reqs[0].cancel()
        wait(ev[1:], 2, 30)
    finally:
        sch.stop()
    assert ev[1][-1].kind == ev[2][-1].kind == "error" and ev[1][-1].code == "timeout"
    assert ev[0][-1].kind == "text"  # a cancelled request hears nothing more
    assert sch.stats["finished"]["cancelled"] == 1 and sch.stats["finished"]["timeout"] == 2
    assert sch.engine.cache.live_slots() == []


def test_bounded_queue_and_fit_checks():
    m = tiny_model("llama")
    sch = Scheduler(m, text, SchedulerConfig(max_batch=1, capacity=64, queue=2))  # not started: nothing leaves
    for p in prompts((3, 4)):
        sch.submit(Request(p, 4))
    with pytest.raises(QueueFull):
        sch.submit(Request([5, 6], 4))
    with pytest.raises(ValueError, match="64 KV rows"):
        sch.check(60, 5)
    with pytest.raises(ValueError, match="context of 512"):
        Scheduler(m, text, SchedulerConfig(max_batch=1, capacity=600)).check(500, 50)
    with pytest.raises(ValueError, match="max_tokens"):
        sch.check(5, 0)


@pytest.mark.parametrize("interleave", [True, False])
def test_interleaving_keeps_running_streams_flowing(interleave):
    """A long prompt joins while another request decodes: interleaved, the running one gets tokens between its
    chunks; not interleaved, none until the long prompt's first token."""
    m = tiny_model("llama")
    short, long_ = prompts((4, 200), seed=6)
    sch = Scheduler(m, text, SchedulerConfig(max_batch=2, capacity=256, prefill_chunk=16,
                                             interleave=interleave)).start()
    log = []
    try:
        sch.submit(Request(short, 40, emit=lambda e: log.append(("short", e.kind))))
        t = time.time()
        while not log and time.time() - t < 10:
            time.sleep(0.005)
        submitted = len(log)
        sch.submit(Request(long_, 2, emit=lambda e: log.append(("long", e.kind))))
        t = time.time()
        while ("long", "done") not in log and time.time() - t < 30:
            time.sleep(0.01)
    finally:
        sch.stop()
    first_long = log.index(next(x for x in log if x[0] == "long"))
    between = sum(1 for x in log[submitted:first_long] if x == ("short", "text"))
    if interleave:
        assert between >= 8, log  # 200 tokens in chunks of 16: 13 rounds, a decode step in each
    else:
        assert between <= 2, log


def test_a_failed_round_fails_its_requests_and_the_loop_goes_on(monkeypatch):
    m = tiny_model("llama")
    sch = Scheduler(m, text, SchedulerConfig(max_batch=2, capacity=64)).start()
    ev = [[], []]
    try:
        real = sch.engine.decode_segment
        calls = {"n": 0}

        def boom(t):
            calls["n"] += 1
            if calls["n"] == 2:
                raise RuntimeError("planted failure")
            return real(t)

        monkeypatch.setattr(sch.engine, "decode_segment", boom)
        sch.submit(Request(prompts((5,))[0], 10, emit=ev[0].append))
        wait(ev, 1)
        p = prompts((7,), seed=3)[0]
        sch.submit(Request(p, 6, emit=ev[1].append))
        wait(ev, 2)
    finally:
        sch.stop()
    assert ev[0][-1].kind == "error" and ev[0][-1].code == "internal" and "planted failure" in ev[0][-1].error
    assert ev[1][-1].kind == "done" and joined(ev[1]) == text(solo(m, p, 6))


# ------------------------------------------------------------------------------------------------ speculation
@pytest.mark.parametrize("mode", ["self", "vanilla"])
def test_speculation_in_the_server_decodes_each_request_as_alone(mode):
    """--mode self|vanilla: requests join over time, their prompts chunked and interleaved with speculation rounds
    (a prefilling slot sits the round out); greedy requests give each prompt's AR output, a sampled one among them
    runs through the same rounds; a seeded sampled request is refused (not reproducible under a shared generator)."""
    from mspeckv.decoding.batch_spec import BatchSpecConfig

    m = tiny_model("llama")
    draft = tiny_model("llama", seed=1, num_hidden_layers=1) if mode == "vanilla" else None
    spec = BatchSpecConfig(mode, 3, sinks=1, window=6)
    ps = prompts((5, 40, 9, 70, 3), seed=2)
    reqs = [(p, 10, {}) for p in ps] + [(ps[0], 6, {"sampling": SamplingConfig(temperature=0.8)})]
    events, sch = run(m, reqs, spec=spec, draft=draft)
    for p, ev in zip(ps, events[:-1], strict=True):
        assert joined(ev) == text(solo(m, p, 10)) and ev[-1].kind == "done"
    assert events[-1][-1].kind == "done" and 1 <= events[-1][-1].usage["completion_tokens"] <= 6  # EOS may come
    snap = sch.snapshot()
    assert snap["spec_rounds"] >= 3 and 0 <= snap["spec_accepted"] <= snap["spec_drafted"]
    if draft is not None:
        assert sch.engine.dcache.live_slots() == []
    with pytest.raises(ValueError, match="not reproducible under speculation"):
        sch.submit(Request(ps[0], 4, emit=lambda e: None, sampling=SamplingConfig(temperature=0.7, seed=3)))
