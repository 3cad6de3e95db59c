"""The batched engine (decoding/batch.py over kv/batch.py): a length per sequence, ragged prompts, leave and join.

Every sequence of a batch must decode exactly as that prompt alone (fp32, greedy), whatever else shares its forwards.
"""

import pytest
import torch

from mspeckv.cache import make_cache
from mspeckv.config import GenerationConfig, SamplingConfig
from mspeckv.decoding.autoregressive import generate
from mspeckv.decoding.batch import BatchEngine, batch_cache, buckets, generate_batch
from mspeckv.kv.base import CacheFullError
from mspeckv.kv.batch import BatchKV, kv_bytes
from mspeckv.kv.placement import Placement
from mspeckv.kv.stack import SeqStackKV
from tests.tiny import tiny_model

LENS = (5, 17, 9, 30, 2, 11)


def prompts(lens=LENS, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 97, (n,), generator=g).tolist() for n in lens]


def solo(m, p, gen, eos_ids=None):
    return generate(m, torch.tensor([p]), gen, eos_ids=eos_ids).tokens[0]


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
@pytest.mark.parametrize("max_batch,graphs", [(1, False), (3, False), (6, False), (4, True)])
def test_ragged_batch_equals_each_prompt_alone(family, max_batch, graphs):
    m = tiny_model(family)
    gen = GenerationConfig(max_new_tokens=10, stop_on_eos=False)
    ps = prompts()
    r = generate_batch(m, ps, gen, max_batch=max_batch, graphs=graphs)
    assert [s.index for s in r.seqs] == list(range(len(ps)))
    for p, s in zip(ps, r.seqs, strict=True):
        assert s.tokens == solo(m, p, gen), f"prompt of {len(p)} tokens"
        assert s.finish == "length" and s.ttft_s is not None and s.done_s >= s.ttft_s
    assert r.n_generated == 10 * len(ps)
    assert r.decode_steps >= 9 * -(-len(ps) // max_batch)


def test_sequences_leave_at_eos_and_others_join_in_their_slot():
    m = tiny_model("llama", seed=1)
    ps = prompts(seed=3)
    base = GenerationConfig(max_new_tokens=16, stop_on_eos=False)
    # an EOS that some sequences produce early and others never: leave at different steps
    eos = solo(m, ps[0], base)[3]
    gen = GenerationConfig(max_new_tokens=16, stop_on_eos=True)
    r = generate_batch(m, ps, gen, max_batch=2, eos_ids=[eos])
    finishes = set()
    for p, s in zip(ps, r.seqs, strict=True):
        want = solo(m, p, gen, eos_ids=[eos])
        assert s.tokens == want
        assert s.finish == ("eos" if want[-1] == eos else "length")
        finishes.add(s.finish)
    assert finishes == {"eos", "length"}
    assert r.stats["live_sequences"] == 0 and r.stats["kv_bytes_held"] == 0  # everyone left


def test_per_sequence_token_limits():
    m = tiny_model("qwen2")
    ps = prompts((4, 8, 6))
    gen = GenerationConfig(max_new_tokens=9, stop_on_eos=False)
    eng = BatchEngine(m, 3, 20, gen)
    r = eng.run(ps, max_new=[1, 9, 4])
    assert [len(s.tokens) for s in r.seqs] == [1, 9, 4]
    for p, s, n in zip(ps, r.seqs, (1, 9, 4), strict=True):
        assert s.tokens == solo(m, p, GenerationConfig(max_new_tokens=n, stop_on_eos=False))


def test_buckets():
    assert buckets(1) == [1]
    assert buckets(6) == [1, 2, 4, 6]
    assert buckets(8) == [1, 2, 4, 8]


# ------------------------------------------------------------------------------------------------------ BatchKV
def fill(m, cache, slot, ids):
    cache.focus(slot, 1)
    return m(torch.tensor([ids]), cache, num_logits=1)


def test_rollback_per_sequence_equals_a_cache_that_never_saw_the_rows():
    m = tiny_model("llama")
    a, b = prompts((6, 9), seed=5)
    extra = [[40, 41, 42], [50, 51, 52]]
    cache = BatchKV.for_model(m, 2, 32)
    for s, p in enumerate((a, b)):
        assert cache.join() == s
        fill(m, cache, s, p)
    cache.focus(0, 2)
    m(torch.tensor(extra), cache)  # 3 more rows each
    assert cache.lengths() == [9, 12]
    cache.rollback([1, 3])  # slot 0 keeps 2 of the 3, slot 1 none
    assert cache.lengths() == [8, 9] and cache.lens.tolist() == [8, 9]
    nxt = torch.tensor([[7], [8]])
    got = m(nxt, cache)[:, -1]
    ref = BatchKV.for_model(m, 2, 32)
    for s, p in enumerate((a + extra[0][:2], b)):
        ref.join()
        fill(m, ref, s, p)
    ref.focus(0, 2)
    torch.testing.assert_close(got, m(nxt, ref)[:, -1], rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="one count per focused slot"):
        cache.rollback([1])
    with pytest.raises(ValueError, match="outside"):
        cache.rollback([0, 11])


def test_leave_frees_the_slot_and_its_held_bytes():
    m = tiny_model("llama")
    cache = BatchKV.for_model(m, 3, 16)
    assert cache.nbytes() == kv_bytes(m.cfg, 3, 16, 4)
    for p in prompts((4, 7)):
        fill(m, cache, cache.join(), p)
    rep = cache.memory_report()
    assert rep["rows_held"] == 11 and rep["kv_bytes_held"] == 11 * cache.bytes_per_row()
    assert cache.bytes_per_row() == 2 * 3 * 2 * 16 * 4  # K+V, layers, KV heads, head dim, fp32
    cache.leave(0)
    assert cache.memory_report()["kv_bytes_held"] == 7 * cache.bytes_per_row()
    assert cache.free_slots() == [0, 2] and cache.live_slots() == [1]
    assert cache.join() == 0 and cache.host_lens[0] == 0 and int(cache.lens[0]) == 0
    with pytest.raises(ValueError, match="holds no sequence"):
        cache.leave(2)


def test_cache_limits_and_focus_errors():
    m = tiny_model("llama")
    cache = BatchKV.for_model(m, 2, 8)
    fill(m, cache, cache.join(), [5] * 6)
    cache.focus(0, 1)
    with pytest.raises(CacheFullError, match="slot 0 holds 6 of 8"):
        m(torch.tensor([[1, 2, 3]]), cache)
    with pytest.raises(ValueError, match="outside this cache's 2 slots"):
        cache.focus(1, 2)
    cache.join()
    with pytest.raises(CacheFullError, match="all 2 slots"):
        cache.join()
    cache.focus(0, 2)
    with pytest.raises(ValueError, match="different lengths"):
        cache.read(0)
    k, _ = cache.read_slot(0, 0)
    assert k.shape[2] == 6


def test_a_free_slot_between_live_ones_changes_nothing():
    """A decode bucket covers free slots too: their rows are computed and thrown away, never attended."""
    m = tiny_model("qwen2")
    a, b = prompts((5, 8), seed=7)
    cache = BatchKV.for_model(m, 3, 16)
    for p in (a, [9, 9], b):
        fill(m, cache, cache.join(), p)
    cache.leave(1)
    cache.focus(0, 3)
    got = m(torch.tensor([[4], [60], [6]]), cache)[:, -1]
    assert cache.lengths() == [6, 0, 9]
    for s, p, t in ((0, a, 4), (2, b, 6)):
        one = BatchKV.for_model(m, 1, 16)
        fill(m, one, one.join(), p)
        torch.testing.assert_close(got[s], m(torch.tensor([[t]]), one)[0, -1], rtol=0, atol=1e-5)


# --------------------------------------------------------------------------------------------------------- errors
def test_bad_input_gets_one_clear_error():
    m = tiny_model("llama")
    gen = GenerationConfig(max_new_tokens=4)
    with pytest.raises(ValueError, match="no prompts"):
        generate_batch(m, [], gen)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate_batch(m, [[5, 6], []], gen)
    with pytest.raises(ValueError, match="max_batch"):
        generate_batch(m, [[5, 6]], gen, max_batch=0)
    with pytest.raises(ValueError, match="exceed the cache's 6 rows"):
        BatchEngine(m, 1, 6, gen).run([[5, 6, 7]])
    with pytest.raises(ValueError, match="outside this model's vocabulary"):
        generate_batch(m, [[5, 600]], gen)
    with pytest.raises(ValueError, match="token id 600 is outside"):  # a short prompt is checked as well as the longest
        generate_batch(m, [[5, 6, 7, 8], [600]], gen)
    with pytest.raises(ValueError, match="maximum context of 512"):
        generate_batch(m, [[5] * 510], gen)


def test_sampled_batch_is_reproducible_with_a_seed():
    m = tiny_model("llama")
    gen = GenerationConfig(max_new_tokens=6, stop_on_eos=False, sampling=SamplingConfig(temperature=1.0, seed=3))
    ps = prompts((4, 6, 3))
    a = generate_batch(m, ps, gen, max_batch=2)
    b = generate_batch(m, ps, gen, max_batch=2)
    assert [s.tokens for s in a.seqs] == [s.tokens for s in b.seqs]


# ------------------------------------------------------------------------ every placement and press (SeqStackKV)
PER_SEQ = [
    (Placement(on_chip=1), None),
    (Placement(on_chip=1, kv_quant="int8", kv_group_size=16), None),
    (Placement(on_chip=0, kv_quant="int4", kv_group_size=16, resident_layers=3), None),
    (Placement(on_chip=1, kv_quant="int2", kv_group_size=16, resident_layers=1, resident_format="quant",
               resident_policy="static"), None),
    (None, "snapkv:budget=24"),
    (None, "h2o:budget=24"),
    (None, "kivi:group_size=16"),
    (None, "streaming:budget=24,sinks=4"),
    (Placement(on_chip=2), "pyramidkv:budget=24"),
]


@pytest.mark.parametrize("placement,press", PER_SEQ, ids=[f"{p}-{q}" for p, q in PER_SEQ])
def test_every_placement_and_press_at_batch_equals_each_prompt_alone(placement, press):
    m = tiny_model("llama")
    ps = prompts((40, 17, 70, 33), seed=11)
    gen = GenerationConfig(max_new_tokens=8, stop_on_eos=False, prefill_chunk=32)
    r = generate_batch(m, ps, gen, max_batch=3, placement=placement, press=press)  # the 4th joins a freed slot
    for p, s in zip(ps, r.seqs, strict=True):
        want = generate(m, torch.tensor([p]), gen, cache=make_cache(m, placement, 1, len(p) + 8, press=press))
        assert s.tokens == want.tokens[0], f"prompt of {len(p)} tokens"


def test_batch_cache_picks_the_backend():
    m = tiny_model("llama")
    assert isinstance(batch_cache(m, 2, 16), BatchKV)
    assert isinstance(batch_cache(m, 2, 16, Placement()), BatchKV)  # nothing offloaded: the dense graphable one
    assert isinstance(batch_cache(m, 2, 16, Placement(on_chip=1)), SeqStackKV)
    assert isinstance(batch_cache(m, 2, 16, None, "snapkv:budget=8"), SeqStackKV)
    with pytest.raises(ValueError, match="unknown press"):
        batch_cache(m, 2, 16, None, "nope")


def test_seq_stack_leave_drops_the_sequences_bytes_and_rolls_back_per_sequence():
    m = tiny_model("llama")
    st = batch_cache(m, 2, 40, Placement(on_chip=1))
    a, b = prompts((9, 14), seed=2)
    for p in (a, b):
        s = st.join()
        st.focus(s, 1)
        m.prefill(torch.tensor([p]), st)
    both = st.memory_report()
    assert both["live_sequences"] == 2 and both["pinned_cpu_kv_bytes"] > 0
    st.focus(0, 2)
    m(torch.tensor([[5, 6], [7, 8]]), st)
    assert st.lengths() == [11, 16]
    st.rollback([2, 1])
    assert st.lengths() == [9, 15]
    st.leave(0)
    one = st.memory_report()
    assert one["live_sequences"] == 1 and one["pinned_cpu_kv_bytes"] == both["pinned_cpu_kv_bytes"] // 2
    assert st.free_slots() == [0] and st.join() == 0
    with pytest.raises(ValueError, match="one count per focused slot"):
        st.rollback([1])
    with pytest.raises(ValueError, match="focus\\(slot, 1\\) first"):
        st.read(0)


def test_seq_stack_with_a_free_slot_inside_the_batch_and_limits_per_sequence():
    """Sequences leave at different steps, so later forwards cover a free slot between live ones (computed, never
    attended); each sequence still equals its run alone."""
    m = tiny_model("llama")
    ps = prompts((20, 9, 31, 14), seed=8)
    pl = Placement(on_chip=1, kv_quant="int8", kv_group_size=16)
    gen = GenerationConfig(max_new_tokens=9, stop_on_eos=False)
    eng = BatchEngine(m, 4, 40, gen, cache=batch_cache(m, 4, 40, pl))
    r = eng.run(ps, max_new=[2, 9, 3, 6])
    for p, s, n in zip(ps, r.seqs, (2, 9, 3, 6), strict=True):
        want = generate(m, torch.tensor([p]), GenerationConfig(max_new_tokens=n, stop_on_eos=False),
                        cache=make_cache(m, pl, 1, len(p) + n))
        assert s.tokens == want.tokens[0] and s.finish == "length"


def test_result_records_by_hand():
    from mspeckv.decoding.batch import BatchResult, Sequence

    s = Sequence(3, [5, 6, 7], 4, slot=1, tokens=[9, 8], finish="eos", ttft_s=0.5, done_s=1.5)
    assert s.to_dict() == {"index": 3, "prompt_len": 3, "tokens": [9, 8], "n_generated": 2, "finish_reason": "eos",
                           "ttft_s": 0.5, "latency_s": 1.5}
    t = Sequence(4, [1], 2, tokens=[2, 3, 4])
    r = BatchResult([s, t], 2, 0.5, 1.0, 2.0, 3, stats={"mode": "ar"})
    assert r.n_generated == 5 and r.tok_per_s == (5 - 2) / 2.0 and r.e2e_s == 3.5 and r.e2e_tok_per_s == 5 / 3.5
    assert r.summary() == {"sequences": 2, "max_batch": 2, "n_generated": 5, "setup_s": 0.5, "prefill_s": 1.0,
                           "decode_s": 2.0, "decode_steps": 3, "tok_per_s": 1.5, "e2e_s": 3.5,
                           "e2e_tok_per_s": 5 / 3.5, "mode": "ar"}
    empty = BatchResult([t], 1, 0.0, 0.0, 0.0, 0)
    assert empty.tok_per_s != empty.tok_per_s and empty.e2e_tok_per_s != empty.e2e_tok_per_s  # nan, not a division


def test_engine_counts_and_memory_report():
    m = tiny_model("llama")
    gen = GenerationConfig(max_new_tokens=5, stop_on_eos=False)
    eng = BatchEngine(m, 2, 30, gen, check_every=2)
    assert eng.every == 2 and eng.max_batch == 2 and not eng.graphs and eng.eos == set()
    r = eng.run(prompts((7, 12)))
    assert r.decode_steps == 4  # one forward per token after the first, the two sequences together
    assert r.stats["kv_bytes_allocated"] == kv_bytes(m.cfg, 2, 30, 4) and r.stats["slots"] == 2
    assert r.stats["capacity"] == 30 and r.stats["rows_held"] == 0 and r.stats["graphs"] is False
    assert r.prefill_s > 0 and r.decode_s > 0 and r.setup_s >= 0
    eos_eng = BatchEngine(m, 1, 30, GenerationConfig(max_new_tokens=5), eos_ids=[7, 9])
    assert eos_eng.eos == {7, 9} and eos_eng.every == 1


def test_move_copies_a_sequence_to_a_free_slot():
    m = tiny_model("llama")
    c = BatchKV.for_model(m, 3, 32)
    for _ in range(3):
        c.join()
    c.focus(2, 1)
    m(torch.tensor([[5, 6, 7, 8]]), c)
    c.leave(0)
    k2 = [t[2, :, :4].clone() for t in c.k + c.v]
    c.move(2, 0)
    assert c.host_lens == [4, 0, 0] and c.host_live == [True, True, False] and c.lens.tolist() == [4, 0, 0]
    assert c.live.tolist() == [1, 1, 0] and all(torch.equal(t[0, :, :4], x) for t, x in zip(c.k + c.v, k2, strict=True))
    with pytest.raises(ValueError, match="a sequence in slot 2 and slot 0 free"):
        c.move(2, 0)  # slot 2 is empty now, slot 0 taken
    with pytest.raises(ValueError, match="a sequence in slot 0 and slot 1 free"):
        c.move(0, 1)  # slot 1 holds a sequence
    st = SeqStackKV(lambda: make_cache(m, None, 1, 32), 2, 32, "cpu")
    st.join()
    first = st.caches[0]
    st.move(0, 1)
    assert st.caches == [None, first]
    with pytest.raises(ValueError, match="move needs"):
        st.move(0, 1)


@pytest.mark.parametrize("graphs", [False, True])
def test_stragglers_move_to_low_slots_and_the_bucket_shrinks(graphs, monkeypatch):
    """Sequences of different token limits: as the early ones leave, the ones left in high slots move down, so the
    forwards cover a smaller bucket; every output still equals its prompt alone."""
    m = tiny_model("llama")
    ps = [torch.randint(3, 90, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (9, 14, 7, 21, 5)]
    limits = [3, 4, 2, 12, 3]
    gen = GenerationConfig(max_new_tokens=12, stop_on_eos=False)
    eng = BatchEngine(m, 5, 40, gen, graphs=graphs, check_every=2)
    focused = []
    real_focus = eng.cache.focus
    monkeypatch.setattr(eng.cache, "focus", lambda first, n: (focused.append(n), real_focus(first, n))[1])
    res = eng.run(ps, limits)
    for p, n, s in zip(ps, limits, res.seqs, strict=True):
        assert s.tokens == generate(m, torch.tensor([p]), GenerationConfig(max_new_tokens=n,
                                                                          stop_on_eos=False)).tokens[0]
    assert focused[-1] == 1 and res.seqs[3].slot == 0  # the last straggler ran alone in slot 0


def test_uniform_rollback_forgets_only_what_advanced():
    """rollback(n) subtracts n where the device advanced (live slots), like end() added it: a held slot (still being
    prefilled) and a free one keep their lengths; no per-slot list crosses to the device."""
    m = tiny_model("llama")
    c = BatchKV.for_model(m, 3, 32)
    for _ in range(2):
        c.join()
    for s, ids in ((0, [5, 6, 7]), (1, [8, 9])):
        c.focus(s, 1)
        m(torch.tensor([ids]), c)
    c.focus(0, 3)
    with c.held([1]):
        m(torch.tensor([[3], [4], [5]]), c)
        m(torch.tensor([[3], [4], [5]]), c)
        c.rollback(2)
    assert c.lens.tolist() == [3, 2, 0] and c.host_lens == [3, 2, 0]


@pytest.mark.parametrize("mode", ["ar", "vanilla"])
def test_prefill_time_counts_every_chunks_device_work(monkeypatch, mode):
    """On a GPU a forward returns before its work is done; the work is paid at the next sync. Every prefill chunk's
    work must land in ``prefill_s``. A fake device on a virtual clock: each prefill forward leaves 1 s of work
    pending, which ``sync`` pays (the clock moves only then)."""
    import mspeckv.decoding.batch as batch_mod
    import mspeckv.decoding.batch_spec as spec_mod
    from mspeckv.decoding.batch_spec import BatchSpecConfig, generate_batch_spec

    clock, pending = [0.0], [0.0]

    def fake_sync(device):
        clock[0] += pending[0]
        pending[0] = 0.0

    m, d = tiny_model("llama"), tiny_model("llama", seed=1)
    for model in (m, d):
        def slow(ids, *a, _fwd=model.forward, **k):
            pending[0] += ids.shape[0] == 1  # a prefill chunk (one sequence); decode forwards cover the batch
            return _fwd(ids, *a, **k)

        monkeypatch.setattr(model, "forward", slow)
    monkeypatch.setattr(batch_mod, "sync", fake_sync)
    monkeypatch.setattr(spec_mod, "sync", fake_sync)
    monkeypatch.setattr(batch_mod.time, "perf_counter", lambda: clock[0])
    gen = GenerationConfig(max_new_tokens=2, stop_on_eos=False, prefill_chunk=4)
    ps = prompts((13, 9))  # 4 + 3 chunks: 5 are not the last of their prompt
    if mode == "ar":
        r = generate_batch(m, ps, gen, graphs=False)
        assert r.prefill_s == 5  # a prompt's last chunk is paid by its first token's .item() on a GPU, not here
    else:
        r = generate_batch_spec(m, d, ps, gen, BatchSpecConfig("vanilla", 2), graphs=False)
        assert r.prefill_s == 5 + 7  # and every chunk of the draft's prefill
