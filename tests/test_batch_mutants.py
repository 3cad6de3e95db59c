"""Hand-computed checks of the batched engine's pieces (kv/batch.py, kv/stack.py, decoding/batch.py,
decoding/batch_spec.py, decoding/cost.py), written against the survivors of the ``batch`` mutation group
(``tools/mutation.py``). Every value below is computed by hand; the caches are driven through the forward protocol
directly (begin / update per layer / end), without a model, and the engines' clocks are replaced by a counter that
advances by one at each read, so their timings are exact integers. Fast: tiny tensors, tiny models."""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest
import torch

import mspeckv.decoding.batch as batch_mod
import mspeckv.decoding.batch_spec as spec_mod
import mspeckv.decoding.runner as runner_mod
from mspeckv.config import GenerationConfig
from mspeckv.decoding.autoregressive import generate
from mspeckv.decoding.batch import BatchEngine, generate_batch
from mspeckv.decoding.batch_spec import BatchSpecConfig, BatchSpecEngine, WindowKV, generate_batch_spec, timed
from mspeckv.decoding.cost import CostModel, expected_tokens
from mspeckv.decoding.runner import GraphRunner, Runner
from mspeckv.kv.base import CacheFullError, KVCache
from mspeckv.kv.batch import BatchKV, check_focus, first_free
from mspeckv.kv.placement import Placement
from mspeckv.kv.stack import SeqStackKV
from tests.tiny import tiny_model


def prompts(lens, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 97, (n,), generator=g).tolist() for n in lens]


def exact(msg: str) -> str:
    return "^" + re.escape(msg) + "$"


class Clock:
    """A perf_counter that advances by one second per read."""

    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        self.t += 1.0
        return self.t


@pytest.fixture
def clock(monkeypatch):
    c = Clock()
    fake = SimpleNamespace(perf_counter=c)
    monkeypatch.setattr(batch_mod, "time", fake)
    monkeypatch.setattr(spec_mod, "time", fake)
    monkeypatch.setattr(runner_mod, "time", SimpleNamespace(perf_counter=Clock()))  # each capture: 1 s
    return c


# ---------------------------------------------------------------------------------------------------- BatchKV
def forward(cache, T, fill=1.0, layers=None):
    """One forward of T tokens over the focused slots, no model: keys/values of ``fill`` (B, H, T, D)."""
    cache.begin(T)
    B, H, D = cache.batch, cache.k[0].shape[1], cache.k[0].shape[3]
    out = []
    for layer in range(layers or cache.n_layers):
        k = torch.full((B, H, T, D), fill, dtype=cache.k[0].dtype, device=cache.k[0].device)
        out.append(cache.update(layer, k, k + 1))
    cache.end()
    return out


def test_batch_kv_buffers_follow_the_dtype_and_device_asked_for():
    c = BatchKV(2, 3, 1, 2, 8, torch.bfloat16, "meta")
    for t in c.k + c.v:
        assert t.dtype == torch.bfloat16 and t.device.type == "meta" and t.shape == (3, 1, 8, 2)
    for t in (c.lens, c.live, c.cols):
        assert t.device.type == "meta"
    assert c.lens.dtype == c.live.dtype == torch.long
    model = SimpleNamespace(cfg=SimpleNamespace(n_layers=2, n_kv_heads=1, head_dim=2), dtype=torch.float16,
                            device=torch.device("meta"))
    f = BatchKV.for_model(model, 2, 5)
    assert f.k[1].dtype == f.v[0].dtype == torch.float16 and f.v[1].device.type == "meta" and f.cap == 5


def test_batch_kv_fresh_state_and_abort():
    c = BatchKV(1, 3, 1, 2, 8, torch.float32, "cpu")
    assert c.first == 0 and c.batch == 3 and c.lengths() == [0, 0, 0] and c.length() == 0
    assert c.host_lens == [0, 0, 0] and c.memory_report()["rows_held"] == 0
    c.begin(2)
    c.abort()
    c.begin(1)  # abort ended the forward: a new one may begin, and focus is allowed again after end
    c.end()
    c.focus(1, 2)


def test_batch_kv_refusals_in_full():
    c = BatchKV(1, 2, 1, 2, 4, torch.float32, "cpu")
    c.join()
    c.focus(0, 1)
    c.begin(1)
    with pytest.raises(RuntimeError, match=exact("focus() inside a forward (between begin and end)")):
        c.focus(0, 1)
    with pytest.raises(RuntimeError, match=exact("cache.begin() called twice without end(): a previous forward did "
                                                 "not finish")):
        c.begin(1)
    c.abort()
    with pytest.raises(ValueError, match=exact("a forward needs at least one token, got 0")):
        c.begin(0)
    with pytest.raises(ValueError, match=exact("slots [1, 3) outside this cache's 2 slots")):
        c.focus(1, 2)
    c.leave(0)
    with pytest.raises(ValueError, match=exact("slot 0 holds no sequence")):
        c.leave(0)


def test_check_focus_bounds_and_first_free():
    for first, n in ((0, 1), (0, 3), (2, 1), (1, 2)):
        check_focus(first, n, 3)
    for first, n in ((-1, 1), (0, 0), (2, 2), (0, 4), (3, 1)):
        with pytest.raises(ValueError, match=exact(f"slots [{first}, {first + n}) outside this cache's 3 slots")):
            check_focus(first, n, 3)
    assert first_free([2, 4], 5) == 2
    with pytest.raises(CacheFullError, match=exact("all 5 slots hold a sequence; one must leave before another "
                                                   "joins")):
        first_free([], 5)


def test_batch_kv_fills_to_exactly_its_capacity():
    c = BatchKV(1, 1, 1, 2, 4, torch.float32, "cpu")
    c.join()
    c.focus(0, 1)
    forward(c, 4)  # exactly the capacity: legal
    assert c.lengths() == [4]
    with pytest.raises(CacheFullError, match=exact("slot 0 holds 4 of 4 rows; 1 more were asked for: build the "
                                                   "cache with a larger capacity")):
        c.begin(1)


def test_batch_kv_leave_clears_the_device_state():
    c = BatchKV(1, 2, 1, 2, 8, torch.float32, "cpu")
    c.join(), c.join()
    c.focus(0, 2)
    forward(c, 3)
    c.leave(1)
    assert c.live.tolist() == [1, 0] and c.lens.tolist() == [3, 0]
    forward(c, 1)  # the free slot's row is computed, but its length does not advance
    assert c.lens.tolist() == [4, 0] and c.lengths() == [4, 0]


def test_batch_kv_reads_only_the_rows_that_can_be_visible():
    """An eager forward reads rows [0, longest live length in the focused range + T), whatever other slots hold."""
    c = BatchKV(1, 3, 1, 2, 32, torch.float32, "cpu")
    for _ in range(3):
        c.join()
    c.focus(0, 1)
    forward(c, 20)  # slot 0: 20 rows, outside the next focus
    c.focus(1, 1)
    forward(c, 3)
    c.focus(1, 2)
    (k, v), = forward(c, 2)
    assert k.shape == v.shape == (2, 1, 5, 2)  # slot 1 holds 3 and slot 2 none: 3 + 2 rows
    assert c.attn_mask.shape == (2, 1, 2, 5)
    assert c.attn_lens.dtype == torch.int32 and c.attn_lens.tolist() == [[4, 5], [1, 2]]
    assert torch.equal(c.attn_mask[:, 0].sum(-1).to(torch.int32), c.attn_lens)  # the kernel's bound = the mask's
    c.leave(1), c.leave(2)
    (k, _), = forward(c, 1)  # no live sequence in the range: throwaway rows only
    assert k.shape[2] == 1 and c.lengths() == [0, 0]


def test_batch_kv_rollback_checks_each_slot_it_names():
    c = BatchKV(1, 3, 1, 2, 16, torch.float32, "cpu")
    for s, n in ((0, 5), (1, 2), (2, 9)):
        c.join()
        c.focus(s, 1)
        forward(c, n)
    c.focus(0, 2)
    with pytest.raises(ValueError, match=exact("rollback(3) of slot 1 outside [0, 2]")):
        c.rollback([0, 3])
    with pytest.raises(ValueError, match=exact("rollback(-1) of slot 0 outside [0, 5]")):
        c.rollback([-1, 0])
    c.rollback([5, 2])  # a whole sequence may be rolled back
    assert c.lengths() == [0, 0] and c.lens.tolist() == [0, 0, 9]


def test_batch_kv_read_and_read_slot_by_hand():
    c = BatchKV(2, 3, 1, 2, 8, torch.float32, "cpu")
    for s, fill in ((0, 1.0), (1, 2.0), (2, 3.0)):
        c.join()
        c.focus(s, 1)
        forward(c, 2, fill)
    c.focus(1, 2)
    k, v = c.read(1)
    assert k.shape == v.shape == (2, 1, 2, 2)
    assert k[:, 0, :, 0].tolist() == [[2.0, 2.0], [3.0, 3.0]] and v[:, 0, :, 0].tolist() == [[3.0, 3.0], [4.0, 4.0]]
    for s in (0, 1, 2):
        k, v = c.read_slot(0, s)
        assert k.shape == v.shape == (1, 1, 2, 2)
        assert k.flatten().tolist() == [s + 1.0] * 4 and v.flatten().tolist() == [s + 2.0] * 4
    c.leave(2)
    c.focus(1, 2)
    with pytest.raises(ValueError, match=exact("the focused slots hold different lengths [2, 0]: read them one by "
                                               "one with read_slot()")):
        c.read(0)


def test_batch_kv_bytes_per_row_with_layers_of_one_shape():
    c = BatchKV(3, 2, 2, 4, 8, torch.bfloat16, "cpu")
    assert c.bytes_per_row() == 2 * 3 * 2 * 4 * 2
    assert c.memory_report() == {"kv_bytes_allocated": 2 * 3 * 2 * 2 * 8 * 4 * 2, "kv_bytes_held": 0,
                                 "rows_held": 0, "live_sequences": 0, "slots": 2, "capacity": 8}


# ------------------------------------------------------------------------------------------------- SeqStackKV
class Recording(KVCache):
    """A batch-1 cache that records what the stack hands it; ``mask``: the attn_mask its update sets."""

    def __init__(self, mask=None, device="cpu", report=None):
        super().__init__()
        self.n_layers, self.batch = 2, 1
        self.k: list = [None, None]
        self.v: list = [None, None]
        self.n, self.mask, self.device, self.report = 0, mask, torch.device(device), report
        self.queries, self.updates, self.rolled = [], [], []

    def length(self):
        return self.n

    def next_position(self):
        return self.n + 100  # a press kept fewer rows than positions seen

    def capacity(self):
        return 64

    def begin(self, n_new):
        self.t = n_new

    def on_query(self, layer, q):
        self.queries.append((layer, q))

    def update(self, layer, k, v):
        self.k[layer] = k if self.k[layer] is None else torch.cat([self.k[layer], k], 2)
        self.v[layer] = v if self.v[layer] is None else torch.cat([self.v[layer], v], 2)
        self.attn_mask = self.mask
        return self.k[layer], self.v[layer]

    def on_update(self, layer, k, v, k_all, mask):
        self.updates.append((layer, k, v, k_all, mask))

    def end(self):
        self.n += self.t
        self.attn_mask = None

    def rollback(self, n):
        self.rolled.append(n)

    def read(self, layer):
        return self.k[layer], self.v[layer]

    def memory_report(self):
        return self.report or {}


def test_seq_stack_construction_and_fresh_state():
    with pytest.raises(ValueError, match=exact("slots must be >= 1, got 0")):
        SeqStackKV(Recording, 0, 8, "cpu")
    one = SeqStackKV(Recording, 1, 8, "cpu")
    assert one.lengths() == [0] and one.n_layers is None
    st = SeqStackKV(Recording, 3, 8, "cpu")
    assert st.first == 0 and st.batch == 3 and st.lengths() == [0, 0, 0] and st.next_position() == 0
    assert st.join() == 0 and st.n_layers == 2


def test_seq_stack_factory_must_build_batch_1_caches():
    wide = SimpleNamespace(batch=2, n_layers=1)
    with pytest.raises(ValueError, match=exact("the factory must build batch-1 caches, got batch 2")):
        SeqStackKV(lambda: wide, 2, 8, "cpu").join()
    bare = SimpleNamespace(n_layers=1)  # no batch attribute at all: accepted
    assert SeqStackKV(lambda: bare, 2, 8, "cpu").join() == 0
    any_batch = SimpleNamespace(batch=None, n_layers=1)
    assert SeqStackKV(lambda: any_batch, 2, 8, "cpu").join() == 0
    st = SeqStackKV(Recording, 1, 8, "cpu")
    st.join()
    with pytest.raises(CacheFullError, match=exact("all 1 slots hold a sequence; one must leave before another "
                                                   "joins")):
        st.join()
    st.leave(0)
    with pytest.raises(ValueError, match=exact("slot 0 holds no sequence")):
        st.leave(0)


def test_seq_stack_positions_and_lengths_with_a_free_slot():
    st = SeqStackKV(Recording, 3, 8, "meta")
    assert st.token_positions(2).device.type == "meta"
    st = SeqStackKV(Recording, 3, 8, "cpu")
    st.join(), st.join(), st.join()
    st.caches[0].n, st.caches[2].n = 4, 7
    st.leave(1)
    assert st.lengths() == [4, 0, 7] and st.length() == 7
    assert st.next_position() == 107
    assert st.token_positions(2).tolist() == [[104, 105], [0, 1], [107, 108]]
    st.focus(1, 1)
    assert st.next_position() == 0 and st.lengths() == [0]


def test_seq_stack_update_pads_views_and_masks_by_hand():
    """Slot 0: a cache with no mask (its last T rows are new); slot 1 free (it sees its own new rows, causal);
    slot 2: a cache with a per-head 4-D mask. Views are padded to the longest, padding masked."""
    H, T, D = 2, 2, 1
    per_head = torch.tensor([[[True, False, True, False], [True, True, True, True]],
                             [[False, False, True, False], [False, True, True, True]]])[None]  # (1, H, T, 4)
    caches = iter([Recording(), Recording(), Recording(mask=per_head)])
    st = SeqStackKV(lambda: next(caches), 3, 16, "cpu")
    for _ in range(3):
        st.join()
    st.leave(1)
    st.caches[0].k[0] = st.caches[0].v[0] = torch.zeros(1, H, 1, D)  # slot 0 holds 1 row before
    st.caches[2].k[0] = st.caches[2].v[0] = torch.zeros(1, H, 2, D)  # slot 2 holds 2 rows before
    st.begin(T)
    q = torch.arange(3.0)[:, None, None, None].expand(3, 4, T, D)
    st.on_query(0, q)
    k = torch.arange(1.0, 4.0)[:, None, None, None].expand(3, H, T, D).clone()
    k_all, v_all = st.update(0, k, -k)
    assert k_all.shape == v_all.shape == (3, H, 4, D)
    assert k_all[:, 0, :, 0].tolist() == [[0, 1, 1, 0], [2, 2, 0, 0], [0, 0, 3, 3]]
    assert v_all[:, 1, :, 0].tolist() == [[0, -1, -1, 0], [-2, -2, 0, 0], [0, 0, -3, -3]]
    m = st.attn_mask
    assert m.shape == (3, H, T, 4) and m.dtype == torch.bool
    assert m[0, 0].tolist() == m[0, 1].tolist() == [[True, True, False, False], [True, True, True, False]]
    assert m[1, 0].tolist() == m[1, 1].tolist() == [[True, False, False, False], [True, True, False, False]]
    assert torch.equal(m[2], per_head[0])
    st.on_update(0, k, -k, k_all, m)
    st.end()
    assert st.attn_mask is None
    for b in (0, 2):
        (layer, qb), = st.caches[b].queries
        assert layer == 0 and qb.shape == (1, 4, T, D) and qb.flatten().unique().tolist() == [float(b)]
        (layer, kb, vb, kall, mb), = st.caches[b].updates
        assert kb.shape == vb.shape == (1, H, T, D) and kb.unique().tolist() == [b + 1.0]
        assert vb.unique().tolist() == [-(b + 1.0)] and kall.shape[2] == (3 if b == 0 else 4)
    assert st.caches[0].updates[0][4].tolist() == [[True, True, False], [True, True, True]]
    assert st.caches[2].updates[0][4] is per_head
    assert st.caches[0].n == 2 and st.caches[2].n == 2


def test_seq_stack_free_slots_only_on_another_device():
    st = SeqStackKV(Recording, 2, 8, "meta")
    st.begin(2)
    k = torch.zeros(2, 1, 2, 1, device="meta")
    k_all, _ = st.update(0, k, k)
    assert k_all.device.type == "meta" and st.attn_mask.device.type == "meta"
    st.abort()
    assert st.attn_mask is None and st._views == {}


def test_seq_stack_fallback_mask_on_the_cache_device():
    rec = Recording(device="meta")
    st = SeqStackKV(lambda: rec, 1, 8, "meta")
    st.join()
    st.begin(1)
    k = torch.zeros(1, 1, 1, 1, device="meta")
    st.update(0, k, k)
    assert st.attn_mask.device.type == "meta"


def test_seq_stack_rollback_read_and_memory_report():
    reports = iter([{"kv_bytes": 10, "rows_held": 3, "flag_bytes": True, "name_bytes": "x", "pinned_bytes_total": 7},
                    {"kv_bytes": 5, "pinned_bytes_total": 1, "other": 2.5}])
    st = SeqStackKV(lambda: Recording(report=next(reports)), 3, 8, "cpu")
    st.join(), st.join()
    st.rollback(2)  # an int: the same count for every focused slot (the free one takes none)
    st.rollback([1, 0, 5])
    assert st.caches[0].rolled == [2, 1] and st.caches[1].rolled == [2, 0]
    with pytest.raises(ValueError, match=exact("rollback needs one count per focused slot (3), got 2")):
        st.rollback([1, 1])
    assert st.memory_report() == {"live_sequences": 2, "slots": 3, "kv_bytes": 15, "pinned_bytes_total": 8}
    st.caches[1].k = ["layer 0", "layer 1"]
    st.focus(1, 1)
    assert st.read(1) == ("layer 1", None)
    for first, n in ((2, 1), (0, 2)):
        st.focus(first, n)
        with pytest.raises(ValueError, match=exact("read() of a SeqStackKV reads one live slot: focus(slot, 1) "
                                                   "first")):
            st.read(0)


# ------------------------------------------------------------------------------------------------ BatchEngine
def test_engine_timings_by_a_counting_clock(clock):
    """Every timing read twice per interval: alloc, each feed, each decode segment = 1 s."""
    m = tiny_model("llama")
    gen = GenerationConfig(max_new_tokens=4, stop_on_eos=False)
    eng = BatchEngine(m, 2, 20, gen)
    assert eng.alloc_s == 1.0 and eng.capture_s == eng.prefill_s == eng.decode_s == 0.0 and eng.steps == 0
    assert type(eng.runner) is Runner and eng.every == 1
    r = eng.run(prompts((3, 6)))
    assert r.prefill_s == 2.0 and r.decode_s == 3.0 and r.decode_steps == 3 and r.setup_s == 1.0
    assert r.seqs[0].ttft_s == 3.0  # t_run, feed's start, its end, then the first token's time
    assert all(0 < s.ttft_s < s.done_s <= clock.t - 1000 for s in r.seqs)
    assert r.max_batch == 2 and r.stats["mode"] == "ar" and r.stats["captures"] == 0
    assert r.stats["capture_s"] == 0.0 and r.stats["eager_steps"] == 0 and r.stats["graphs"] is False


def test_engine_segments_stop_at_the_nearest_token_limit(clock):
    m = tiny_model("llama")
    gen = GenerationConfig(max_new_tokens=4, stop_on_eos=False)
    eng = BatchEngine(m, 2, 20, gen, check_every=2)
    r = eng.run(prompts((3, 6)))
    assert r.decode_steps == 3 and r.decode_s == 2.0  # 3 tokens after the first: a segment of 2, then 1
    r = generate_batch(m, prompts((3, 6)), GenerationConfig(max_new_tokens=7, stop_on_eos=False), check_every=3)
    assert r.decode_steps == 6 and r.decode_s == 2.0


def test_engine_graphed_on_the_cpu_captures_each_bucket_once(clock):
    m = tiny_model("llama")
    gen = GenerationConfig(max_new_tokens=3, stop_on_eos=False)
    eng = BatchEngine(m, 3, 20, gen, graphs=True)
    assert eng.graphs and type(eng.runner) is GraphRunner
    eng.capture(2)  # buckets 1, 2 (not 3)
    assert sorted(eng.runner.graphs) == [(1, 1, ("slots", 0, 1)), (1, 1, ("slots", 0, 2))]
    assert eng.capture_s == 1.0
    eng.capture(3)
    assert len(eng.runner.graphs) == 3 and eng.capture_s == 2.0
    r = eng.run(prompts((3, 6)))
    assert r.setup_s == 1.0 + 3.0 and r.stats["captures"] == 3 and r.stats["graphs"] is True
    assert r.stats["capture_s"] == 3.0  # the runner's own count: one second per capture
    r = generate_batch(m, prompts((3, 6)), gen, graphs=True)
    assert r.stats["graphs"] is True and r.stats["captures"] == 2 and r.setup_s == 2.0
    plain = BatchEngine(m, 2, 20, gen, graphs=False)
    plain.capture(2)
    assert plain.capture_s == 0.0 and type(plain.runner) is Runner


def test_engine_refusals_in_full():
    m = tiny_model("llama")
    gen = GenerationConfig(max_new_tokens=4)
    with pytest.raises(ValueError, match=exact("no prompts: give at least one")):
        BatchEngine(m, 1, 8, gen).run([])
    with pytest.raises(ValueError, match=exact("no prompts: give at least one")):
        generate_batch(m, [], gen)
    with pytest.raises(ValueError, match=exact("prompt 0 (3 tokens) + 4 new tokens exceed the cache's 6 rows per "
                                               "sequence")):
        BatchEngine(m, 1, 6, gen).run([[5, 6, 7]])
    with pytest.raises(ValueError, match=exact("max_batch must be an integer >= 1, got 0")):
        generate_batch(m, [[5, 6]], gen, max_batch=0)
    with pytest.raises(ValueError):  # one token limit per prompt
        BatchEngine(m, 2, 16, gen).run([[5], [6]], max_new=[2])


def test_generate_batch_takes_tensor_prompts_and_the_placement():
    m = tiny_model("llama")
    gen = GenerationConfig(max_new_tokens=3, stop_on_eos=False)
    ps = prompts((4, 7))
    r = generate_batch(m, [torch.tensor(p) for p in ps], gen)
    for p, s in zip(ps, r.seqs, strict=True):
        assert s.prompt == p and all(type(t) is int for t in s.prompt)
    r = generate_batch(m, ps, gen, max_batch=1, placement=Placement(on_chip=1))
    assert r.stats["slots"] == 1 and "kv_bytes_allocated" not in r.stats and "capacity" not in r.stats  # SeqStackKV
    for p, s in zip(ps, r.seqs, strict=True):
        assert s.tokens == generate(m, torch.tensor([p]), gen).tokens[0]


# ------------------------------------------------------------------------------------------- speculation at batch
def test_spec_config_bounds_and_messages():
    for kw, msg in ((dict(mode="x"), "mode must be one of vanilla, self, mspeckv, got 'x'"),
                    (dict(gamma=0), "gamma must be an integer >= 1, got 0"),
                    (dict(sinks=-1), "sinks must be an integer >= 0, got -1"),
                    (dict(window=0), "window must be an integer >= 1, got 0")):
        with pytest.raises(ValueError, match=exact(msg)):
            BatchSpecConfig(**kw)
    c = BatchSpecConfig("vanilla", 1, sinks=0, window=1)
    assert (c.mode, c.gamma, c.sinks, c.window, c.auto) == ("vanilla", 1, 0, 1, False)
    d = BatchSpecConfig()
    assert (d.mode, d.gamma, d.sinks, d.window, d.auto) == ("self", 4, 4, 256, False)
    assert BatchSpecConfig(gamma=8, auto=True).gammas() == [1, 2, 4, 8]
    assert BatchSpecConfig(gamma=5, auto=True).gammas() == [1, 2, 4, 5]
    assert BatchSpecConfig(gamma=1, auto=True).gammas() == [1]
    assert BatchSpecConfig(gamma=9, auto=True).gammas() == [1, 2, 4, 8, 9]
    assert BatchSpecConfig(gamma=8).gammas() == [8]


def test_window_kv_delegates_to_its_base():
    base = BatchKV(2, 3, 1, 2, 16, torch.float32, "cpu")
    for s, n in ((0, 5), (1, 2)):
        base.join()
        base.focus(s, 1)
        forward(base, n)
    base.focus(0, 2)
    w = WindowKV(base, sinks=1, window=3)
    assert w.n_layers == 2 and w.batch == 2 and w.length() == 5 and w.capacity() == 16
    assert torch.equal(w.token_positions(2), torch.tensor([[5, 6], [2, 3]]))
    w.begin(2)
    assert w.attn_lens is base.attn_lens and w.attn_window.sinks == 1 and w.attn_window.span == 4
    assert w.attn_window.starts.tolist() == [[3, 4], [0, 1]]
    assert w.attn_mask[0, 0].tolist() == [[True, False, False, True, True, True, False],
                                          [True, False, False, False, True, True, True]]
    k = torch.full((2, 1, 2, 2), 7.0)
    for layer in (0, 1):
        kk, vv = w.update(layer, k, k)
        assert kk.shape == (2, 1, 7, 2) and kk[0, 0, 5:, 0].tolist() == [7.0, 7.0]
    w.end()
    assert base.lengths() == [7, 4]
    w.rollback([1, 2])
    assert base.lengths() == [6, 2]
    w.prepare(1)
    base._n = 1
    w.commit(1)  # the host half of a replayed forward
    assert base.lengths() == [7, 3] and base._n is None
    w.begin(1)
    w.abort()
    assert base._n is None and base.lengths() == [7, 3]
    with pytest.raises(CacheFullError):
        w.prepare(10)


def test_timed_takes_the_median_after_a_warm_up(monkeypatch):
    ticks = iter([0.0, 5.0, 10.0, 11.0, 20.0, 23.0])  # reps of 5, 1 and 3 s
    monkeypatch.setattr(spec_mod, "time", SimpleNamespace(perf_counter=lambda: next(ticks)))
    calls = []
    assert timed(torch.device("cpu"), lambda: calls.append(1)) == 3.0
    assert len(calls) == 4
    ticks = iter([0.0, 2.0, 3.0, 7.0])
    assert timed(torch.device("cpu"), lambda: calls.append(1), reps=2) == 4.0


@pytest.mark.parametrize("mode", ["self", "vanilla"])
def test_spec_engine_layout_and_captures(mode, clock):
    m = tiny_model("llama")
    draft = tiny_model("llama", seed=1, num_hidden_layers=1) if mode == "vanilla" else None
    gen = GenerationConfig(max_new_tokens=5, stop_on_eos=False)
    spec = BatchSpecConfig(mode, 2, sinks=1, window=6, auto=True)
    eng = BatchSpecEngine(m, draft, 3, 20, gen, spec, graphs=True)
    assert eng.slack == 3 and eng.cache.capacity() == 23 and eng.max_batch == 3
    assert eng.rounds == eng.seq_rounds == eng.accepted == eng.drafted == 0 and eng.costs == {}
    assert eng.calib_s == 0.0 and type(eng.drunner) is GraphRunner
    if mode == "vanilla":
        assert isinstance(eng.dcache, BatchKV) and eng.dcache.slots == 3 and eng.dcache.capacity() == 23
        assert eng.dcache.n_layers == 1 and eng.drunner.model is draft
    else:
        assert isinstance(eng.dcache, WindowKV) and eng.dcache.base is eng.cache
        assert (eng.dcache.sinks, eng.dcache.window) == (1, 6) and eng.drunner.model is m
    eng.capture(2)
    dkey = (lambda b: ("slots", 0, b)) if mode == "vanilla" else (lambda b: ("window", ("slots", 0, b)))
    assert sorted(eng.runner.graphs) == sorted((T, T, ("slots", 0, b)) for T in (1, 2, 3) for b in (1, 2))
    assert sorted(eng.drunner.graphs) == [(1, 1, dkey(1)), (1, 1, dkey(2))]
    assert eng.capture_s == 1.0
    eng.capture(3)
    assert eng.capture_s == 2.0 and len(eng.drunner.graphs) == 3
    plain = BatchSpecEngine(m, draft, 2, 20, gen, BatchSpecConfig(mode, 2), graphs=False)
    assert type(plain.drunner) is Runner and type(plain.runner) is Runner
    plain.capture(2)
    assert plain.capture_s == 0.0


def test_spec_run_with_no_round_and_no_prompt():
    m = tiny_model("llama")
    gen = GenerationConfig(max_new_tokens=1, stop_on_eos=False)
    r = generate_batch_spec(m, None, prompts((4, 6)), gen, BatchSpecConfig("self", 2))
    assert r.stats["rounds"] == r.stats["sequence_rounds"] == 0 and r.stats["acceptance"] is None
    assert r.stats["tokens_per_round"] is None and all(len(s.tokens) == 1 for s in r.seqs)
    with pytest.raises(ValueError, match=exact("no prompts: give at least one")):
        generate_batch_spec(m, None, [], gen, BatchSpecConfig())


def test_spec_engine_needs_the_draft_its_mode_names():
    m = tiny_model("llama")
    gen = GenerationConfig(max_new_tokens=4)
    for mode, draft, msg in (("vanilla", None, "mode 'vanilla' needs a draft model"),
                             ("mspeckv", None, "mode 'mspeckv' needs a draft model"),
                             ("self", m, "mode 'self' drafts with the model itself: no draft model")):
        with pytest.raises(ValueError, match=exact(msg)):
            BatchSpecEngine(m, draft, 2, 32, gen, BatchSpecConfig(mode))
    with pytest.raises(ValueError, match=exact("prompt 0 (6 tokens) + 4 new tokens + 4 rows of drafts exceed the "
                                               "cache's 13 rows per sequence")):
        BatchSpecEngine(m, None, 1, 9, gen, BatchSpecConfig("self", 3)).run([[5] * 6])


def test_vanilla_draft_cache_follows_the_target_slots(clock):
    m = tiny_model("llama")
    draft = tiny_model("llama", seed=1, num_hidden_layers=1)
    gen = GenerationConfig(max_new_tokens=6, stop_on_eos=False, prefill_chunk=4)
    eng = BatchSpecEngine(m, draft, 2, 20, gen, BatchSpecConfig("vanilla", 2))
    seq = batch_mod.Sequence(0, prompts((9,))[0], 6)
    forwards = []
    hook = draft.register_forward_hook(lambda mod, args, out: forwards.append(args[0].shape[1]))
    eng.admit(seq, clock())
    hook.remove()
    assert forwards == [4, 4, 1]  # the draft's prefill in the generation's chunks too
    assert eng.dcache.live_slots() == [0] and eng.dcache.host_lens[0] == 9 and eng.cache.host_lens[0] == 9
    assert eng.prefill_s == 3.0 + 3.0  # per chunk: the draft's forward, then the target's
    eng.admit(batch_mod.Sequence(1, [5, 6], 6), clock())
    assert eng.prefill_s == 6.0 + 1.0 + 1.0 and eng.dcache.live_slots() == [0, 1]
    r = eng.run(prompts((5, 8, 3), seed=2))
    assert eng.dcache.live_slots() == [] and eng.cache.live_slots() == []  # the admitted one decoded with them
    assert all(len(s.tokens) == 6 for s in [seq, *r.seqs])


def test_spec_counters_by_hand_when_every_draft_is_accepted(clock):
    """A window over everything: the self draft is the target, each round emits γ + 1 = 3 tokens per sequence."""
    m = tiny_model("llama")
    gen = GenerationConfig(max_new_tokens=7, stop_on_eos=False)
    ps = prompts((9, 5))
    r = generate_batch_spec(m, None, ps, gen, BatchSpecConfig("self", 2, sinks=0, window=10_000), graphs=True)
    st = r.stats
    assert r.max_batch == 2 and st["capacity"] == 9 + 7 + 3 and st["graphs"] is True
    assert st["rounds"] == 2 == r.decode_steps and st["sequence_rounds"] == 4 and r.decode_s == 2.0
    assert st["acceptance"] == 1.0 and st["tokens_per_round"] == 3.0
    assert (st["mode"], st["gamma"], st["auto"], st["cost_model"]) == ("self", 2, False, None)
    assert st["calibration_s"] == 0.0 and st["draft_captures"] == 2 and st["captures"] == 4
    assert st["draft_eager_steps"] == 0 and st["draft_capture_s"] == 2.0 and st["capture_s"] == 4.0
    assert r.setup_s == 2.0  # alloc and capture, one tick each; no calibration
    r = generate_batch_spec(m, None, ps, gen, BatchSpecConfig("self", 2, sinks=0, window=10_000), max_batch=1)
    assert r.max_batch == 1 and r.stats["rounds"] == 4 and r.stats["captures"] == 0
    for p, s in zip(ps, r.seqs, strict=True):
        assert s.tokens == generate(m, torch.tensor([p]), gen).tokens[0]


@pytest.mark.parametrize("mode", ["self", "vanilla"])
def test_spec_cost_model_is_timed_once_per_bucket_without_moving_a_sequence(mode, clock):
    """Each step is timed with the shape it runs with (the graphs captured for the round: none is captured here),
    a warm-up and 3 reps each, and rolled back; with the counting clock every rep takes 1 s and the calibration
    6 reads per timed step + 1."""
    m = tiny_model("llama")
    draft = tiny_model("llama", seed=1, num_hidden_layers=1) if mode == "vanilla" else None
    gen = GenerationConfig(max_new_tokens=6, stop_on_eos=False)
    eng = BatchSpecEngine(m, draft, 2, 30, gen, BatchSpecConfig(mode, 2, sinks=1, window=4, auto=True), graphs=True)
    eng.capture(2)
    graphs = (sorted(eng.runner.graphs, key=str), sorted(eng.drunner.graphs, key=str))
    t = 0.0
    for p in prompts((7, 4)):
        eng.admit(batch_mod.Sequence(0, p, 6), t)
    calls = []
    for name, r in (("target", eng.runner), ("draft", eng.drunner)):
        def step(ids, num_logits=1, eager=False, f=r.step, name=name):
            calls.append((name, ids.shape[1], num_logits))
            return f(ids, num_logits, eager)
        r.step = step
    eng.cache.focus(0, 2)
    if draft is not None:
        eng.dcache.focus(0, 2)
    before = (eng.cache.lengths(), eng.cache.lens.tolist(), eng.dcache.length(), eng.dcache.token_positions(1))
    cm = eng.cost_model(2)
    after = (eng.cache.lengths(), eng.cache.lens.tolist(), eng.dcache.length(), eng.dcache.token_positions(1))
    assert after[:3] == before[:3] and torch.equal(after[3], before[3])
    assert calls == [("target", 1, 1)] * 4 + [("draft", 1, 1)] * 4 + [("target", 2, 2)] * 4 + [("target", 3, 3)] * 4
    assert (sorted(eng.runner.graphs, key=str), sorted(eng.drunner.graphs, key=str)) == graphs
    assert cm.t_ar == cm.t_draft == 1.0 and cm.t_verify == {1: 1.0, 2: 1.0} and cm.draft_extra == (mode == "vanilla")
    assert eng.calib_s == 6 * 4 + 1
    assert eng.cost_model(2) is cm and eng.calib_s == 25 and list(eng.costs) == [2]
    eng.cache.focus(0, 1)
    if draft is not None:
        eng.dcache.focus(0, 1)
    eng.cost_model(1)
    assert eng.calib_s == 50 and sorted(eng.costs) == [1, 2]


def test_auto_record_and_setup_include_the_calibration():
    m = tiny_model("llama")
    gen = GenerationConfig(max_new_tokens=6, stop_on_eos=False)
    ps = prompts((7, 4, 9))
    r = generate_batch_spec(m, None, ps, gen, BatchSpecConfig("self", 2, sinks=1, window=4, auto=True), max_batch=2)
    st = r.stats
    assert st["auto"] is True and st["calibration_s"] > 0 and r.setup_s > st["calibration_s"]
    assert set(st["cost_model"]) <= {1, 2} and 2 in st["cost_model"]
    rec = st["cost_model"][2]
    assert sum(rec["rounds_per_gamma"].values()) >= 1 and rec["t_ar_ms"] > 0
    for p, s in zip(ps, r.seqs, strict=True):
        assert s.tokens == generate(m, torch.tensor([p]), gen).tokens[0]


# -------------------------------------------------------------------------------------------------- cost model
def test_expected_tokens_by_hand():
    assert expected_tokens(0.0, 5) == 1.0 and expected_tokens(0.3, 0) == 1.0
    assert expected_tokens(0.5, 2) == 1.75 and expected_tokens(0.5, 1) == 1.5
    assert expected_tokens(1.0, 3) == 4.0 and expected_tokens(1.25, 3) == 4.0  # α >= 1: every draft accepted


def test_cost_model_refusals_in_full():
    with pytest.raises(ValueError, match=exact("the cost model needs at least one γ with a measured verification")):
        CostModel(1.0, 1.0, {})
    for args, msg in (((0.0, 1.0, {2: 1.0}), "t_ar must be a measured time > 0 s, got 0.0"),
                      ((1.0, -1.0, {2: 1.0}), "t_draft must be a measured time > 0 s, got -1.0"),
                      ((1.0, 1.0, {2: 1.0, 4: 0.0}), "t_verify[4] must be a measured time > 0 s, got 0.0"),
                      ((float("nan"), 1.0, {2: 1.0}), "t_ar must be a measured time > 0 s, got nan")):
        with pytest.raises(ValueError, match=exact(msg)):
            CostModel(*args)
    cm = CostModel(1.0, 1.0, {4: 1.0})
    assert (cm.draft_extra, cm.prior, cm.probe_every, cm.accepted, cm.rejected, cm.picks, cm.since_probe) == \
        (0, 0.7, 16, 0, 0, {}, 0)
    for g, ns, msg in ((4, [5], "accepted count 5 outside [0, 4]"), (2, [-1], "accepted count -1 outside [0, 2]")):
        with pytest.raises(ValueError, match=exact(msg)):
            cm.observe(g, ns)


def test_cost_model_alpha_rates_and_ties_by_hand():
    cm = CostModel(t_ar=0.5, t_draft=0.25, t_verify={1: 0.25, 2: 0.5}, prior=0.0)
    assert cm.alpha == 0.0 and cm.round_s(0) == 0.5 and cm.round_s(1) == 0.5 and cm.round_s(2) == 1.0
    assert cm.rate(0) == cm.rate(1) == 2.0 and cm.best() == 0  # a tie: AR, the cheaper to run
    assert cm.rate(2, alpha=0.5) == 1.75 and cm.rate(1, alpha=1.0) == 4.0
    cm.observe(2, [2, 2, 0, 1])  # 5 accepted, 2 rounds cut by a rejection
    assert (cm.accepted, cm.rejected) == (5, 2) and cm.alpha == 5 / 7
    cm.observe(1, [0, 1])
    assert (cm.accepted, cm.rejected) == (6, 3)
    v = CostModel(t_ar=0.5, t_draft=0.25, t_verify={2: 0.5}, draft_extra=1)
    assert v.round_s(0) == 0.75 and v.round_s(2) == 1.25


def test_cost_model_probes_every_n_ar_steps():
    cm = CostModel(t_ar=0.5, t_draft=0.25, t_verify={1: 1.0, 2: 1.25}, prior=0.5, probe_every=2)
    # rates at α = 0.5: AR 2.0, γ=1 1.5/1.25 = 1.2, γ=2 1.75/1.75 = 1.0
    assert [cm.pick() for _ in range(5)] == [0, 1, 0, 1, 0]
    assert cm.picks == {0: 3, 1: 2} and cm.since_probe == 1
    # α = 0.5: γ=1 1.5/0.375 = 4.0 beats γ=2 1.75/0.5 = 3.5 and AR 1.0
    fast = CostModel(t_ar=1.0, t_draft=0.125, t_verify={1: 0.25, 2: 0.25}, prior=0.5, probe_every=1)
    assert [fast.pick() for _ in range(3)] == [1, 1, 1] and fast.since_probe == 0  # speculation wins: no counting


def test_cost_model_record_by_hand():
    cm = CostModel(t_ar=0.5, t_draft=0.25, t_verify={2: 0.5, 1: 0.25}, prior=0.5)
    cm.pick()
    rec = cm.record()
    # α = 0.5: AR 2.0 tok/s; γ=1 1.5/0.5 = 3.0; γ=2 1.75/1.0 = 1.75
    assert rec == {"t_ar_ms": 500.0, "t_draft_ms": 250.0, "t_verify_ms": {1: 250.0, 2: 500.0}, "alpha": 0.5,
                   "rounds_per_gamma": {1: 1}, "expected_speedup_vs_ar": {0: 1.0, 1: 1.5, 2: 0.875},
                   "reason": "at α = 0.500 γ = 1 expects 1.50× AR's tokens per second"}
    assert list(rec["t_verify_ms"]) == [1, 2]
    slow = CostModel(t_ar=0.25, t_draft=0.25, t_verify={2: 0.5}, prior=0.5)
    slow.picks = {2: 1, 0: 3}
    rec = slow.record()
    assert list(rec["rounds_per_gamma"]) == [0, 2] and rec["expected_speedup_vs_ar"] == {0: 1.0, 2: 0.4375}
    assert rec["reason"] == "at α = 0.500 γ = 0 expects 1.00× AR's tokens per second (AR: speculation does not pay)"


# ------------------------------------------------------------------------------- the server's pieces (engine API)
def test_sample_rows_by_their_own_sampling_or_the_engines():
    from mspeckv.config import SamplingConfig
    from mspeckv.decoding.batch import Sequence
    from mspeckv.decoding.sampling import make_generator, next_token

    m = tiny_model("llama")
    logits = torch.randn(4, 97, generator=torch.Generator().manual_seed(0)) * 3
    hot = SamplingConfig(temperature=1.0, seed=7)
    own = Sequence(0, [1], 4, sampling=hot, generator=make_generator("cpu", 11))
    greedy_own = Sequence(1, [1], 4, sampling=SamplingConfig())
    engine_row = Sequence(2, [1], 4)

    def want(row, seed, s=hot):
        return int(next_token(logits[row:row + 1], s, make_generator("cpu", seed))[0])

    eng = BatchEngine(m, 4, 16, GenerationConfig(max_new_tokens=2, sampling=hot))
    assert eng.sample(logits, [engine_row, None, None, None]).tolist() == \
        next_token(logits, hot, make_generator("cpu", 7)).tolist()  # nobody brings its own: the engine's draws
    eng.g = make_generator("cpu", 7)
    tok = eng.sample(logits, [own, engine_row, None, None])
    engine_draw = next_token(logits, hot, make_generator("cpu", 7))
    assert tok[0] == want(0, 11) and tok[1:].tolist() == engine_draw[1:].tolist()
    eng.g = make_generator("cpu", 7)
    tok = eng.sample(logits, [None, own.__class__(0, [1], 4, sampling=hot, generator=make_generator("cpu", 3)),
                              greedy_own, None])
    assert tok.tolist() == [int(logits[0].argmax()), want(1, 3), int(logits[2].argmax()), int(logits[3].argmax())]
    greedy_eng = BatchEngine(m, 4, 16, GenerationConfig(max_new_tokens=2))
    own.generator = make_generator("cpu", 11)
    tok = greedy_eng.sample(logits, [engine_row, own, None, greedy_own])
    assert tok.tolist() == [int(logits[0].argmax()), want(1, 11), int(logits[2].argmax()), int(logits[3].argmax())]


def test_own_greedy_row_beside_engine_sampled_rows_is_greedy():
    from mspeckv.config import SamplingConfig
    from mspeckv.decoding.batch import Sequence

    m = tiny_model("llama")
    logits = torch.randn(2, 97, generator=torch.Generator().manual_seed(0)) * 3
    eng = BatchEngine(m, 2, 16, GenerationConfig(max_new_tokens=2, sampling=SamplingConfig(temperature=1.0, seed=7)))
    rows = [Sequence(0, [1], 4, sampling=SamplingConfig()), Sequence(1, [1], 4)]
    assert all(eng.sample(logits, rows)[0] == logits[0].argmax() for _ in range(20))


def test_start_feed_hold_and_retire():
    """A sequence still being prefilled sits the decode segments out (its slot held); each chunk is one forward;
    a held slot near its capacity shortens the segment; retire frees a slot at once, once."""
    from mspeckv.decoding.batch import Sequence

    m = tiny_model("llama")
    gen = GenerationConfig(max_new_tokens=6, stop_on_eos=False)
    pa, pb = prompts((5, 15), seed=9)
    eng = BatchEngine(m, 2, 24, gen, check_every=8)
    a, b = Sequence(0, pa, 6), Sequence(1, pb, 6)
    eng.start(a)
    assert eng.feed(a, 100, 0.0) and a.prefilled and len(a.tokens) == 1 and eng.prefill_s > 0
    eng.start(b)
    assert (b.slot, b.fed) == (1, 0) and eng.slot_seq == [a, b]
    outs = []
    hook = m.register_forward_hook(lambda mod, args, out: outs.append(tuple(out.shape)))
    assert not eng.feed(b, 8, 0.0) and b.fed == 8 and b.tokens == [] and b.ttft_s is None
    assert not eng.feed(b, 6, 0.0) and b.fed == 14
    hook.remove()
    assert outs == [(1, 1, 97), (1, 1, 97)]  # each chunk one forward, the last position's logits only
    eng.decode_segment(0.0)  # b holds 14 of 24 rows: 24 - 14 = 10 > a's 5 left: a finishes, b sits out
    assert eng.steps == 5 and a.finish == "length" and eng.cache.host_lens[1] == 14 and int(eng.cache.lens[1]) == 14
    assert int(eng.cache.live[1]) == 1 and eng.slot_seq == [None, b]
    assert eng.feed(b, 8, 0.0) and len(b.tokens) == 1
    while b.finish is None:
        eng.decode_segment(0.0)
    for p, s in ((pa, a), (pb, b)):
        assert s.tokens == generate(m, torch.tensor([p]), gen).tokens[0]
    eng2 = BatchEngine(m, 2, 20, gen, check_every=8)
    c, d = Sequence(0, pa, 6), Sequence(1, pb, 6)
    eng2.start(c), eng2.feed(c, 100, 0.0)
    eng2.start(d), eng2.feed(d, 3, 0.0), eng2.feed(d, 14 - 3, 0.0)
    eng2.decode_segment(0.0)  # d holds 14 of 20: at most 6 steps, c has 5 left
    assert eng2.steps == 5
    eng2.feed(d, 1, 0.0)
    eng2.retire(d, "stop")
    assert d.finish == "stop" and eng2.slot_seq[d.slot] is None and eng2.cache.free_slots() == [0, 1]
    eng2.retire(d, "cancelled")  # twice: nothing more, the first reason stays
    assert d.finish == "stop"
    never = Sequence(3, pa, 6)
    eng2.retire(never, "cancelled")  # never started: no slot to free
    assert never.finish == "cancelled" and eng2.cache.free_slots() == [0, 1]


def test_held_slot_near_its_capacity_shortens_the_segment():
    from mspeckv.decoding.batch import Sequence

    m = tiny_model("llama")
    gen = GenerationConfig(max_new_tokens=8, stop_on_eos=False)
    pa, pb = prompts((4, 12), seed=10)
    eng = BatchEngine(m, 2, 14, gen, check_every=8)
    a, b = Sequence(0, pa, 8), Sequence(1, pb, 2)
    eng.start(a), eng.feed(a, 100, 0.0)
    eng.start(b), eng.feed(b, 11, 0.0)  # b: 11 of its 12 prompt rows, in a cache of 14 rows
    eng.decode_segment(0.0)
    assert eng.steps == 3 and len(a.tokens) == 4 and eng.cache.host_lens[1] == 11  # 14 - 11 = 3 steps, not 7


def test_auto_observes_every_accepted_draft():
    m = tiny_model("llama")
    gen = GenerationConfig(max_new_tokens=9, stop_on_eos=False)
    spec = BatchSpecConfig("self", 2, sinks=0, window=10_000, auto=True)
    eng = BatchSpecEngine(m, None, 2, 20, gen, spec)
    eng.costs[2] = CostModel(1.0, 1e-9, {1: 1e-3, 2: 1e-3}, prior=0.5)  # speculation always wins
    r = eng.run(prompts((6, 3)))
    cm = eng.costs[2]
    assert cm.rejected == 0 and cm.accepted == eng.accepted == eng.drafted and cm.alpha == 1.0
    assert sum(cm.picks.values()) == eng.rounds and eng.seq_rounds == 2 * eng.rounds
    assert r.decode_steps == eng.rounds and all(len(s.tokens) == 9 for s in r.seqs)


def test_sampled_speculation_draws_from_the_engines_generator_and_rejection_samples():
    """Sampled rounds draw from the engine's seeded generator only (the global RNG does not matter), and accept by
    rejection sampling: 8 copies of one prompt do not all continue greedily after their first token (greedy
    acceptance would make each continuation the argmax path)."""
    from mspeckv.config import SamplingConfig

    m = tiny_model("llama")
    p = prompts((7,), seed=12)[0]
    gen = GenerationConfig(max_new_tokens=6, stop_on_eos=False, sampling=SamplingConfig(temperature=1.0, seed=5))
    runs = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        eng = BatchSpecEngine(m, None, 8, 20, gen, BatchSpecConfig("self", 3, sinks=1, window=6))
        runs.append([s.tokens for s in eng.run([p] * 8).seqs])
    assert runs[0] == runs[1]
    greedy = GenerationConfig(max_new_tokens=5, stop_on_eos=False)
    conts = [generate(m, torch.tensor([p + t[:1]]), greedy).tokens[0] for t in runs[0]]
    assert sum(t[1:] == c for t, c in zip(runs[0], conts, strict=True)) < 8


@pytest.mark.parametrize("mode", ["self", "vanilla"])
def test_an_ar_round_under_auto_by_hand(mode):
    """When the cost model picks AR: self runs the engine's AR segment on the target's KV alone (no round counted);
    vanilla runs one AR step and the draft's forward of the same token, so the draft's KV keeps up (no speculation
    round counted either: the counters mean the same in both modes).
    Two sequences in a bucket of 2 of 4 slots."""
    from mspeckv.decoding.batch import Sequence

    m = tiny_model("llama")
    draft = tiny_model("llama", seed=1, num_hidden_layers=1) if mode == "vanilla" else None
    gen = GenerationConfig(max_new_tokens=6, stop_on_eos=False)
    eng = BatchSpecEngine(m, draft, 4, 30, gen, BatchSpecConfig(mode, 2, sinks=1, window=4, auto=True))
    eng.costs[2] = CostModel(1e-3, 1.0, {1: 1.0, 2: 1.0}, probe_every=100, draft_extra=int(mode == "vanilla"))
    ps = prompts((7, 4), seed=13)
    seqs = [Sequence(i, p, 6) for i, p in enumerate(ps)]
    for s in seqs:
        eng.admit(s, 0.0)
    eng.decode_segment(0.0)
    assert eng.costs[2].picks == {0: 1} and eng.steps == 1 and all(len(s.tokens) == 2 for s in seqs)
    assert eng.cache.host_lens[:2] == [8, 5]
    if mode == "vanilla":
        assert eng.dcache.host_lens[:2] == [8, 5]
    assert eng.rounds == eng.seq_rounds == eng.drafted == 0
    while any(s.finish is None for s in seqs):
        eng.decode_segment(0.0)
    for p, s in zip(ps, seqs, strict=True):
        assert s.tokens == generate(m, torch.tensor([p]), gen).tokens[0]


def test_own_sampling_rows_draw_their_own_tokens_even_when_held():
    """Sequences that bring their own sampling and generator draw one token of their own per token, as generate()
    draws for that prompt alone, whatever the engine samples and whether they sat a segment out (held)."""
    from mspeckv.config import SamplingConfig
    from mspeckv.decoding.batch import Sequence
    from mspeckv.decoding.sampling import make_generator

    m = tiny_model("llama")
    pa, pb = prompts((5, 12), seed=14)
    eng = BatchEngine(m, 2, 24, GenerationConfig(max_new_tokens=6, stop_on_eos=False), check_every=3)
    samp = {0: SamplingConfig(temperature=1.0, seed=3), 1: SamplingConfig(temperature=0.8, top_k=20, seed=4)}
    seqs = [Sequence(i, p, 6, sampling=samp[i], generator=make_generator("cpu", samp[i].seed))
            for i, p in enumerate((pa, pb))]
    a, b = seqs
    eng.start(b), eng.feed(b, 6, 0.0)  # b takes slot 0, half prefilled
    eng.start(a), eng.feed(a, 100, 0.0)
    eng.decode_segment(0.0)  # bucket 2: b's row is a throwaway inside it (held), its generator untouched
    assert (a.slot, b.slot, len(a.tokens), b.tokens) == (1, 0, 4, [])
    eng.feed(b, 100, 0.0)
    while any(s.finish is None for s in seqs):
        eng.decode_segment(0.0)
    for p, s in zip((pa, pb), seqs, strict=True):
        want = generate(m, torch.tensor([p]), GenerationConfig(max_new_tokens=6, stop_on_eos=False,
                                                               sampling=s.sampling)).tokens[0]
        assert s.tokens == want


# ------------------------------------------------------------------------ mspeckv at batch (hier_round), compaction
def test_mspeckv_config_draft_gamma_slack_and_auto_refusal():
    with pytest.raises(ValueError, match=exact("draft_gamma must be an integer >= 1, got 0")):
        BatchSpecConfig("mspeckv", draft_gamma=0)
    with pytest.raises(ValueError, match=exact("auto (the cost model's γ) runs modes self and vanilla; mspeckv takes "
                                               "a fixed gamma and draft_gamma")):
        BatchSpecConfig("mspeckv", auto=True)
    c = BatchSpecConfig("mspeckv", 3, draft_gamma=1)
    assert c.draft_gamma == 1 and BatchSpecConfig().draft_gamma == 4
    assert c.slack == (3 + 2) * (1 + 1) and BatchSpecConfig("mspeckv", 2, draft_gamma=4).slack == 4 * 5
    assert BatchSpecConfig("self", 3, draft_gamma=1).slack == 4 == BatchSpecConfig("vanilla", 3).slack


def test_mspeckv_engine_layout_and_captures(clock):
    """The middle level is the target over a window of its own KV: one graph per bucket for its draft_gamma + 1
    tokens; the draft model runs over its own KV, one token a step."""
    m = tiny_model("llama")
    draft = tiny_model("llama", seed=1, num_hidden_layers=1)
    gen = GenerationConfig(max_new_tokens=5, stop_on_eos=False)
    eng = BatchSpecEngine(m, draft, 3, 20, gen, BatchSpecConfig("mspeckv", 2, sinks=1, window=6, draft_gamma=2),
                          graphs=True)
    assert eng.slack == 4 * 3 and eng.cache.capacity() == 32 and eng.dcache.capacity() == 32
    assert isinstance(eng.dcache, BatchKV) and eng.drunner.model is draft and type(eng.wrunner) is GraphRunner
    assert eng.wrunner.model is m and isinstance(eng.wrunner.cache, WindowKV) and eng.wrunner.cache.base is eng.cache
    assert (eng.wrunner.cache.sinks, eng.wrunner.cache.window) == (1, 6)
    assert eng.l1_rounds == eng.l1_drafted == eng.l1_accepted == 0
    eng.capture(2)
    assert sorted(eng.wrunner.graphs) == [(3, 3, ("window", ("slots", 0, b))) for b in (1, 2)]
    assert [tuple(g.ids.shape) for _, g in sorted(eng.wrunner.graphs.items())] == [(1, 3), (2, 3)]  # each bucket's rows
    assert sorted(eng.drunner.graphs) == [(1, 1, ("slots", 0, b)) for b in (1, 2)]
    plain = BatchSpecEngine(m, draft, 2, 20, gen, BatchSpecConfig("mspeckv", 2), graphs=False)
    assert type(plain.wrunner) is Runner and plain.wrunner.model is m
    assert BatchSpecEngine(m, None, 2, 20, gen, BatchSpecConfig("self", 2)).wrunner is None


def spy_steps(eng, calls):
    """Record (runner, tokens, num_logits) of every step of the draft (d), middle (w) and full (t) runners."""
    for name, r in (("t", eng.runner), ("d", eng.drunner), ("w", eng.wrunner)):
        def step(ids, num_logits=1, eager=False, f=r.step, name=name):
            calls.append((name, ids.shape[1], num_logits))
            return f(ids, num_logits, eager)
        r.step = step


def test_mspeckv_round_by_hand_when_every_level_accepts(clock):
    """Draft = target and a window over everything: every draft is accepted at both levels. With draft_gamma 1 and
    gamma 3, a round is two middle runs (2 tokens each: exactly γ + 1 = 4), then one full verification of 3 drafts
    that keeps all of them: 4 tokens per sequence per round. Every cache then holds the kept tokens but the newest."""
    m = tiny_model("llama")
    draft = tiny_model("llama")  # the same weights
    gen = GenerationConfig(max_new_tokens=9, stop_on_eos=False)
    spec = BatchSpecConfig("mspeckv", 3, sinks=0, window=10_000, draft_gamma=1)
    eng = BatchSpecEngine(m, draft, 2, 20, gen, spec)
    ps = prompts((9, 5), seed=15)
    seqs = [batch_mod.Sequence(i, p, 9) for i, p in enumerate(ps)]
    for s in seqs:
        eng.admit(s, 0.0)
    calls = []
    spy_steps(eng, calls)
    eng.decode_segment(0.0)
    assert calls == ([("d", 1, 1)] * 2 + [("w", 2, 2)]) * 2 + [("t", 4, 4)]
    assert [len(s.tokens) for s in seqs] == [5, 5]
    assert eng.cache.host_lens[:2] == [9 + 4, 5 + 4] == eng.dcache.host_lens[:2]
    assert eng.cache.lens.tolist()[:2] == [13, 9] == eng.dcache.lens.tolist()[:2]
    assert (eng.l1_rounds, eng.l1_drafted, eng.l1_accepted) == (2, 4, 4)
    assert (eng.rounds, eng.steps, eng.seq_rounds, eng.accepted, eng.drafted) == (1, 1, 2, 6, 6)
    assert eng.decode_s == 1.0  # one read before the round, one after
    eng.decode_segment(0.0)
    assert all(s.finish == "length" for s in seqs) and eng.decode_s == 2.0
    assert (eng.l1_rounds, eng.l1_drafted, eng.l1_accepted) == (4, 8, 8)
    assert (eng.rounds, eng.seq_rounds, eng.accepted, eng.drafted) == (2, 4, 12, 12)
    for p, s in zip(ps, seqs, strict=True):
        assert s.tokens == generate(m, torch.tensor([p]), gen).tokens[0]
    r = generate_batch_spec(m, draft, ps, gen, spec)
    st = r.stats
    assert (st["draft_gamma"], st["l1_runs"], st["l1_acceptance"]) == (1, 4, 1.0)
    assert (st["rounds"], st["sequence_rounds"], st["acceptance"], st["tokens_per_round"]) == (2, 4, 1.0, 4.0)
    one = generate_batch_spec(m, draft, ps, GenerationConfig(max_new_tokens=1, stop_on_eos=False), spec)
    assert (one.stats["draft_gamma"], one.stats["l1_runs"], one.stats["l1_acceptance"]) == (1, 0, None)


@pytest.mark.parametrize("mode", ["self", "vanilla", "mspeckv"])
@pytest.mark.parametrize("temperature", [None, 1.0])
def test_a_slot_still_prefilling_sits_a_draft_round_out(mode, temperature):
    """A sequence half prefilled (its slot held) inside the bucket of a round: neither its target KV nor its draft KV
    moves, on the host or the device; it then decodes as alone (greedy) or by its own length (sampled)."""
    from mspeckv.config import SamplingConfig

    m = tiny_model("llama")
    draft = tiny_model("llama", seed=1, num_hidden_layers=1) if mode != "self" else None
    samp = SamplingConfig(temperature=temperature, seed=0) if temperature else SamplingConfig()
    gen = GenerationConfig(max_new_tokens=6, stop_on_eos=False, sampling=samp)
    eng = BatchSpecEngine(m, draft, 2, 30, gen, BatchSpecConfig(mode, 3, sinks=1, window=4, draft_gamma=1))
    pa, pb = prompts((5, 15), seed=16)
    a, b = batch_mod.Sequence(0, pa, 6), batch_mod.Sequence(1, pb, 6)
    with torch.inference_mode():
        eng.start(b), eng.feed(b, 8, 0.0)  # b in slot 0, held inside the bucket that a in slot 1 sets
        eng.start(a), eng.feed(a, 100, 0.0)
        eng.decode_segment(0.0)
        assert b.tokens == [] and len(a.tokens) > 1 and (a.slot, b.slot) == (1, 0)
        for c in (eng.cache, eng.dcache) if mode != "self" else (eng.cache,):  # self: its draft KV is the target's
            assert c.host_lens[0] == 8 == int(c.lens[0]) and int(c.live[0]) == 1
            assert c.host_lens[1] == 5 + len(a.tokens) - 1 == int(c.lens[1])
        eng.feed(b, 100, 0.0)
        while any(s.finish is None for s in (a, b)):
            eng.decode_segment(0.0)
    assert len(a.tokens) == len(b.tokens) == 6
    if temperature is None:
        for p, s in ((pa, a), (pb, b)):
            assert s.tokens == generate(m, torch.tensor([p]), gen).tokens[0]


def spy_verify(eng, rec):
    orig = eng.verify

    def verify(d, q, rows, runner=None, last=None, keep_p=False):
        out = orig(d, q, rows, runner=runner, last=last, keep_p=keep_p)
        rec.append(SimpleNamespace(d=d.clone(), q=None if q is None else q.clone(), runner=runner,
                                   last=None if last is None else last.clone(), keep_p=keep_p, n=out[0].tolist(),
                                   nxt=out[1].tolist(), p=out[2]))
        return out
    eng.verify = verify


@pytest.mark.parametrize("own", [False, True])
def test_mspeckv_sampled_round_proposes_the_middle_levels_distributions(own):
    """Sampling (the engine's, or one row's own in a greedy engine): each middle run is verified by rejection sampling
    over the window (its probabilities kept), the next run starts from its last token, and the full level is given,
    per sequence, the first γ tokens the middle runs produced (accepted drafts, then the run's own token) with the
    middle level's distribution at each as the proposal; each sequence keeps its accepted prefix and the full level's
    token."""
    from mspeckv.config import SamplingConfig

    m = tiny_model("llama")
    draft = tiny_model("llama", seed=1, num_hidden_layers=1)
    samp = SamplingConfig() if own else SamplingConfig(temperature=1.0, seed=0)
    gen = GenerationConfig(max_new_tokens=12, stop_on_eos=False, sampling=samp)
    eng = BatchSpecEngine(m, draft, 2, 40, gen, BatchSpecConfig("mspeckv", 3, sinks=1, window=4, draft_gamma=1))
    ps = prompts((9, 6), seed=17)
    seqs = [batch_mod.Sequence(i, p, 12) for i, p in enumerate(ps)]
    if own:  # row 0 samples with its own settings; row 1 follows the greedy engine
        mine = SamplingConfig(temperature=1.0, seed=3)
        seqs[0] = batch_mod.Sequence(0, ps[0], 12, sampling=mine, generator=torch.Generator().manual_seed(3))
    for s in seqs:
        eng.admit(s, 0.0)
    rec = []
    spy_verify(eng, rec)
    rounds = 0
    while any(s.finish is None for s in seqs):
        eng.compact()  # as the round begins: a sequence left alone in slot 1 moves to slot 0
        live = sorted((s for s in seqs if s.finish is None), key=lambda s: s.slot)
        start = {s.slot: len(s.tokens) for s in live}
        last0 = eng.last[:len(live)].tolist()
        sampled = not own or seqs[0].finish is None  # a greedy row alone in a greedy engine: greedy rounds
        rec.clear()
        eng.decode_segment(0.0)
        rounds += 1
        *mid, full = rec
        toks, probs, mins = {b: [] for b in start}, {b: [] for b in start}, []
        cur = last0
        for r in mid:
            assert r.runner is eng.wrunner and r.keep_p == sampled == (r.q is not None) and r.last.tolist() == cur
            for b in start:
                k = r.n[b]
                toks[b] += r.d[b, :k].tolist() + [r.nxt[b]]
                probs[b] += list(r.p[b, :k + 1]) if sampled else []
            cur = r.nxt
            mins.append(min(len(t) for t in toks.values()))
        assert mins[-1] >= 4 and all(n < 4 for n in mins[:-1])  # the middle runs stop once each has γ + 1
        assert full.runner is None and full.d.tolist() == [toks[b][:3] for b in start]
        for b, s in zip(start, live, strict=True):
            assert full.q is None if not sampled else torch.equal(full.q[b], torch.stack(probs[b][:3]))
            k = full.n[b]
            assert s.tokens[start[b]:] == (toks[b][:k] + [full.nxt[b]])[:12 - start[b]]
        if own and len(live) == 2:  # row 0's proposals are its own temperature-1 distributions, row 1's one-hots
            assert full.q[0].max() < 1 and torch.equal(full.q[1].max(-1).values, torch.ones(3))
    assert rounds >= 3
    if own:
        greedy = GenerationConfig(max_new_tokens=12, stop_on_eos=False)
        assert seqs[1].tokens == generate(m, torch.tensor([ps[1]]), greedy).tokens[0]


def test_move_is_refused_inside_a_forward_and_between_empty_slots():
    c = BatchKV(1, 2, 1, 2, 8, torch.float32, "cpu")
    c.join()
    c.focus(0, 1)
    c.begin(1)
    with pytest.raises(RuntimeError, match=exact("move() inside a forward (between begin and end)")):
        c.move(0, 1)
    c.abort()
    st = SeqStackKV(lambda: BatchKV(1, 1, 1, 2, 8, torch.float32, "cpu"), 2, 8, "cpu")
    with pytest.raises(ValueError, match=exact("move needs a sequence in slot 1 and slot 0 free")):
        st.move(1, 0)  # both slots free: nothing to move
    assert st.caches == [None, None]


def test_spec_engine_start_checks_the_draft_slot_and_retire_keeps_the_reason():
    m = tiny_model("llama")
    draft = tiny_model("llama", seed=1, num_hidden_layers=1)
    gen = GenerationConfig(max_new_tokens=4, stop_on_eos=False)
    eng = BatchSpecEngine(m, draft, 2, 20, gen, BatchSpecConfig("vanilla", 2))
    eng.dcache.join()  # the draft's KV out of step: its first free slot is 1
    with pytest.raises(RuntimeError, match=exact("the draft's KV and the target's disagree on the free slot (0)")):
        eng.start(batch_mod.Sequence(0, [5, 6, 7], 4))
    eng = BatchSpecEngine(m, draft, 2, 20, gen, BatchSpecConfig("vanilla", 2))
    seq = batch_mod.Sequence(0, [5, 6, 7], 4)
    eng.admit(seq, 0.0)
    eng.retire(seq, "cancelled")
    assert seq.finish == "cancelled" and eng.cache.free_slots() == [0, 1] == eng.dcache.free_slots()


def test_auto_with_a_held_slot_follows_the_buckets_cost_model():
    """A held slot skips the timing of a new cost model (its row would be timed as a live one), but a bucket that has
    one still picks by it: here AR."""
    m = tiny_model("llama")
    gen = GenerationConfig(max_new_tokens=6, stop_on_eos=False)
    eng = BatchSpecEngine(m, None, 2, 40, gen, BatchSpecConfig("self", 2, sinks=1, window=4, auto=True))
    eng.costs[2] = CostModel(1e-3, 1.0, {1: 1.0, 2: 1.0}, probe_every=100)
    pa, pb = prompts((5, 15), seed=18)
    a, b = batch_mod.Sequence(0, pa, 6), batch_mod.Sequence(1, pb, 6)
    eng.start(b), eng.feed(b, 8, 0.0)  # b in slot 0, held: a in slot 1 sets the bucket of 2
    eng.start(a), eng.feed(a, 100, 0.0)
    eng.decode_segment(0.0)
    assert eng.costs[2].picks == {0: 1} and eng.rounds == 0 and list(eng.costs) == [2]
    assert eng.cache.host_lens[0] == 8 and len(a.tokens) > 1 and b.tokens == []


def test_auto_rounds_of_gamma_1_are_counted_and_observed():
    m = tiny_model("llama")
    gen = GenerationConfig(max_new_tokens=6, stop_on_eos=False)
    eng = BatchSpecEngine(m, None, 2, 40, gen, BatchSpecConfig("self", 2, sinks=1, window=4, auto=True))
    cm = eng.costs[2] = CostModel(1.0, 1e-9, {1: 1e-3, 2: 1.0})  # γ = 1 wins whatever α
    for i, p in enumerate(prompts((5, 9), seed=19)):
        eng.admit(batch_mod.Sequence(i, p, 6), 0.0)
    eng.decode_segment(0.0)
    assert cm.picks == {1: 1} and (eng.rounds, eng.seq_rounds, eng.drafted) == (1, 2, 2)
    assert cm.accepted + cm.rejected == 2 and cm.accepted == eng.accepted


@pytest.mark.parametrize("mode", ["self", "vanilla"])
def test_own_sampling_row_samples_in_a_greedy_engine(mode):
    """A greedy engine with one row that samples (its own temperature 1): the round takes the sampled path, so that
    row's tokens are drawn (not greedy's), while the other row still decodes as greedy AR alone."""
    from mspeckv.config import SamplingConfig

    m = tiny_model("llama")
    draft = tiny_model("llama", seed=1, num_hidden_layers=1) if mode == "vanilla" else None
    gen = GenerationConfig(max_new_tokens=8, stop_on_eos=False)
    eng = BatchSpecEngine(m, draft, 2, 40, gen, BatchSpecConfig(mode, 3, sinks=1, window=4))
    pa, pb = prompts((7, 10), seed=20)
    mine = SamplingConfig(temperature=1.0, seed=3)
    a = batch_mod.Sequence(0, pa, 8, sampling=mine, generator=torch.Generator().manual_seed(3))
    b = batch_mod.Sequence(1, pb, 8)
    with torch.inference_mode():
        for s in (a, b):
            eng.admit(s, 0.0)
        while any(s.finish is None for s in (a, b)):
            eng.decode_segment(0.0)
    assert a.tokens[1:] != generate(m, torch.tensor([pa + a.tokens[:1]]), gen).tokens[0][:7]
    assert b.tokens == generate(m, torch.tensor([pb]), gen).tokens[0]


def test_rollback_ignores_the_count_of_a_free_slot():
    c = BatchKV(1, 3, 1, 2, 16, torch.float32, "cpu")
    for _ in range(3):
        c.join()
    for s, n in ((0, 5), (2, 4)):
        c.focus(s, 1)
        forward(c, n)
    c.leave(1)
    c.focus(0, 3)
    c.rollback([1, 3, 2])  # slot 1 is free: nothing to forget, its count is not checked
    assert c.lens.tolist() == [4, 0, 2] and c.host_lens == [4, 0, 2]


def test_compact_by_hand():
    """Buckets of max_batch 5: 1, 2, 4, 5. Compaction moves the sequences of the slots at or above the smallest bucket
    that holds them all into that bucket's free slots, lowest first; nothing when no smaller bucket is gained."""
    m = tiny_model("llama")
    eng = BatchEngine(m, 5, 20, GenerationConfig(max_new_tokens=4, stop_on_eos=False))
    seqs = [batch_mod.Sequence(i, p, 4) for i, p in enumerate(prompts((3, 4, 5, 6, 7), seed=21))]
    for s in seqs:
        eng.admit(s, 0.0)
    last = eng.last.tolist()
    eng.compact()  # all five: nothing to gain
    assert eng.slot_seq == seqs and eng.cache.host_lens == [3, 4, 5, 6, 7]
    for i in (2, 3):
        eng.retire(seqs[i], "stop")
    eng.compact()  # slots 0, 1, 4 -> bucket 4: slot 4 moves to 2 (slot 3 stays free)
    assert eng.slot_seq == [seqs[0], seqs[1], seqs[4], None, None] and seqs[4].slot == 2
    assert eng.cache.host_lens == [3, 4, 7, 0, 0] and eng.cache.host_live == [True] * 3 + [False] * 2
    assert eng.last.tolist()[:3] == [last[0], last[1], last[4]]
    eng.compact()  # slots 0, 1, 2 hold bucket 4 already
    assert eng.slot_seq == [seqs[0], seqs[1], seqs[4], None, None]
    eng.retire(seqs[0], "stop"), eng.retire(seqs[4], "stop")
    eng.compact()  # slot 1 alone: bucket 2 -> 1, it moves to slot 0
    assert eng.slot_seq == [seqs[1], None, None, None, None] and seqs[1].slot == 0 and eng.last[0] == last[1]
    assert eng.cache.host_lens == [4, 0, 0, 0, 0]
    eng.retire(seqs[1], "stop")
    eng.compact()  # no sequence: nothing
    assert eng.slot_seq == [None] * 5


def test_throwaway_rows_beside_own_sampling_rows_draw_nothing_from_the_engine():
    """Only rows with their own sampling and free slots: the free slots' rows (thrown away) take the argmax, and the
    engine's generator is not drawn from."""
    from mspeckv.config import SamplingConfig
    from mspeckv.decoding.batch import Sequence
    from mspeckv.decoding.sampling import make_generator, next_token

    m = tiny_model("llama")
    logits = torch.randn(3, 97, generator=torch.Generator().manual_seed(1)) * 3
    hot = SamplingConfig(temperature=1.0, seed=7)
    eng = BatchEngine(m, 3, 16, GenerationConfig(max_new_tokens=2, sampling=hot))
    state = eng.g.get_state().clone()
    rows = [None, Sequence(1, [1], 4, sampling=hot, generator=make_generator("cpu", 5)), None]
    tok = eng.sample(logits, rows)
    assert torch.equal(eng.g.get_state(), state)
    assert tok.tolist() == [int(logits[0].argmax()), int(next_token(logits[1:2], hot, make_generator("cpu", 5))[0]),
                            int(logits[2].argmax())]
