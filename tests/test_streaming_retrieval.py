"""The streaming press (the draft's sinks + recent window, re-pressed only between rounds) and the retrieval press
(top chunks per KV head, the MSpecKV middle level), both over PressedKV."""

from types import SimpleNamespace

import pytest
import torch

from mspeckv.cache import streaming_cache
from mspeckv.kv.base import CacheFullError, KVCache, LastQueries
from mspeckv.kv.dense import DenseKV
from mspeckv.kv.pressed import PressedKV
from mspeckv.kv.retrieval import select_chunks
from mspeckv.presses.retrieval import RetrievalPress
from tests.tiny import tiny_model


def fwd(cache, layer_kvs):
    """Drive the cache as the model does: begin, update each layer, end."""
    cache.begin(layer_kvs[0][0].shape[2])
    views = [cache.update(i, k, v) for i, (k, v) in enumerate(layer_kvs)]
    cache.end()
    return views


def pos_kv(p0: int, n: int, layers: int = 2, H: int = 2):
    """K/V rows whose values are their absolute positions (V = -position), (1, H, n, 1) per layer."""
    k = torch.arange(p0, p0 + n, dtype=torch.float32).view(1, 1, n, 1).expand(1, H, n, 1)
    return [(k.clone(), -k.clone()) for _ in range(layers)]


def held(cache) -> list[int]:
    return cache.read(0)[0][0, 0, :, 0].long().tolist()


TINY = SimpleNamespace(cfg=SimpleNamespace(n_layers=2, n_kv_heads=2, head_dim=1), dtype=torch.float32,
                       device=torch.device("cpu"))


def stream(**kw):
    """The draft's StreamingLLM cache: 4 sinks + 8 recent rows, forwards of <= 3 rows, re-pressed when more than
    room + slack = 5 rows were appended since the last press."""
    return streaming_cache(TINY, **{"window": 8, "sinks": 4, "room": 3, "slack": 2, **kw})


# ------------------------------------------------------------------------------------------------ streaming press

def test_streaming_keeps_sinks_and_recent_window():
    c = stream()
    assert isinstance(c, KVCache) and c.capacity() == 4 + 8 + 3 + 2
    sizes = [3, 1, 2, 3, 1, 1, 3, 2, 2, 1] * 8
    for n in sizes:
        t0 = c.next_position()
        views = fwd(c, pos_kv(t0, n))
        # the view handed to attention: everything held, the new rows last
        assert views[1][0][0, 0, -n:, 0].tolist() == list(range(t0, t0 + n))
        assert c.length() <= c.capacity()
        pos = c.positions(0)[0, 0].tolist()
        assert held(c) == pos
        assert pos[:4] == list(range(min(4, t0 + n)))
        recent = pos[4:]
        assert recent == list(range(t0 + n - len(recent), t0 + n))  # contiguous, ends at the newest token
        assert len(recent) >= min(t0 + n - 4, 8)  # never fewer than `window` recent tokens
        assert held(c) == [-x for x in c.read(1)[1][0, 1, :, 0].long().tolist()]  # V moved with K, every layer
    assert c.next_position() == sum(sizes) and c.next_position() - c.length() > 0 and c.compressions > 10


def test_streaming_rollback_exact_and_not_across_a_press():
    c, ref = stream(), stream()
    fwd(c, pos_kv(0, 3))
    fwd(c, pos_kv(3, 2))
    c.rollback(2)
    fwd(ref, pos_kv(0, 3))
    assert c.next_position() == ref.next_position() == 3 and held(c) == held(ref)
    assert torch.equal(c.read(1)[1], ref.read(1)[1])
    for _ in range(5):
        fwd(c, pos_kv(c.next_position(), 3))  # 18 tokens: pressed down to 4 sinks + the newest rows
    assert c.length() <= 17 and held(c)[:4] == [0, 1, 2, 3] and held(c)[-1] == 17
    before, n_tail = held(c), c.n_tail
    fwd(c, pos_kv(18, 1))
    c.rollback(1)  # appended since the last press: exact
    assert held(c) == before and c.next_position() == 18
    c.rollback(n_tail)  # the rows of the forward that triggered the press are still rollback-able
    with pytest.raises(ValueError, match="only rows appended since the last"):
        c.rollback(1)


def test_streaming_reserve_makes_a_round_rollback_safe():
    c = stream()
    for _ in range(5):
        fwd(c, pos_kv(c.next_position(), 3))
    c.reserve(4)  # a round of up to 4 rows: press now if they would not fit
    assert c.n_tail + 4 <= 5
    before = held(c)
    for _ in range(4):
        fwd(c, pos_kv(c.next_position(), 1))
    c.rollback(4)
    assert held(c) == before
    with pytest.raises(CacheFullError, match="tail of 5"):
        fwd(c, pos_kv(c.next_position(), 6))


def test_streaming_bad_input():
    with pytest.raises(ValueError, match="sinks must be in"):
        stream(sinks=-1)
    with pytest.raises(ValueError, match="room"):
        stream(room=0)
    c = stream()
    with pytest.raises(ValueError, match="rollback"):
        c.rollback(1)


def test_streaming_large_window_equals_dense_and_model_runs_with_gaps():
    m = tiny_model("llama")
    torch.manual_seed(0)
    ids = torch.randint(3, 97, (1, 40))
    dense = DenseKV.for_model(m, 1, 64)
    big = streaming_cache(m, window=64, sinks=4, room=8)
    small = streaming_cache(m, window=8, sinks=4, room=8, slack=0)
    with torch.no_grad():
        for s in range(0, 40, 8):
            chunk = ids[:, s:s + 8]
            ref = m(chunk, dense, num_logits=None)
            got = m(chunk, big, num_logits=None)
            torch.testing.assert_close(got, ref, atol=0, rtol=0)
            out = m(chunk, small, num_logits=None)
            assert out.shape == ref.shape and torch.isfinite(out).all()
        assert small.next_position() - small.length() > 0 and small.positions(0)[0, 0, :4].tolist() == [0, 1, 2, 3]
        for _ in range(5):  # decode one token at a time
            tok = m(ids[:, -1:], small)[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, tok], 1)
        assert small.next_position() == 45 and small.length() <= small.capacity()
    # a streaming prefill skips the middle of the prompt; the kept rows keep their true positions
    c = streaming_cache(m, window=8, sinks=4, room=8)
    with torch.no_grad():
        m(ids[:, :4], c, pos0=0)
        c.skip(40 - 8 - 4)
        m(ids[:, 32:40], c, pos0=32)
    assert c.positions(0)[0, 0].tolist() == [0, 1, 2, 3, *range(32, 40)] and c.next_position() == 40


# ------------------------------------------------------------------------------------------------ retrieval press

def retrieval(full, queries, budget, chunk, extra):
    """The middle level as the engine builds it: the retrieval press over ``full``'s rows, given the last queries."""
    obs = LastQueries(len(queries), n_last=queries[0].shape[2])
    obs.queries = list(queries)
    return PressedKV.build(RetrievalPress(budget=budget, chunk=chunk, n_queries=queries[0].shape[2]), full, [obs],
                           tail=extra)


class FakeFull(KVCache):
    """A committed full cache with given K/V per layer, (B, Hkv, L, D)."""

    def __init__(self, ks, vs):
        self.ks, self.vs, self.n_layers = ks, vs, len(ks)

    def positions(self, layer):  # every row at its own position (without counting a read)
        return torch.arange(self.length()).expand(*self.ks[layer].shape[:2], -1)

    def length(self):
        return self.ks[0].shape[2]

    def read(self, layer):
        self.reads = getattr(self, "reads", 0) + 1  # for an offloaded cache each read is a transfer
        return self.ks[layer], self.vs[layer]


def chunked_keys(means: torch.Tensor, chunk: int, tail: int) -> torch.Tensor:
    """means (B, Hkv, n, D) -> K (B, Hkv, n*chunk + tail, D) whose chunk c has exactly mean means[..., c, :]."""
    B, H, n, D = means.shape
    wobble = torch.randn(B, H, n, chunk, D) * 0.1
    k = means[:, :, :, None] + wobble - wobble.mean(3, keepdim=True)  # zero-mean perturbation within each chunk
    return torch.cat([k.flatten(2, 3), torch.randn(B, H, tail, D)], 2)


def expected_index(chunks: list[int], chunk: int, L: int) -> list[int]:
    tail = list(range(L // chunk * chunk, L))
    return [c * chunk + i for c in sorted(chunks) for i in range(chunk)] + tail


@pytest.mark.parametrize("tail", [0, 3])
def test_retrieval_picks_top_chunks_per_head(tail):
    torch.manual_seed(0)
    chunk, n, D = 4, 8, 4
    L = n * chunk + tail
    # head h scores chunk c by a[h, c] along e0; the query is e0 for both heads (MHA: G = 1)
    a = torch.tensor([[0.0, 5, 1, 4, 2, 7, 3, 6], [9, 1, 8, 2, 7, 3, 6, 0]])
    means = torch.zeros(1, 2, n, D)
    means[0, :, :, 0] = a
    k = chunked_keys(means, chunk, tail)
    v = torch.randn_like(k)
    q = torch.zeros(1, 2, 1, D)
    q[..., 0] = 1.0
    budget = 16
    n_top = (budget - chunk - tail) // chunk  # 3 without a tail, 2 with one
    full = FakeFull([k, k], [v, v])
    rc = retrieval(full, [q, q], budget=budget, chunk=chunk, extra=4)
    assert full.reads == 1 + 2  # one read for the shape, then one per layer (select and gather share it)
    for h in range(2):
        ranked = [c for c in a[h].argsort(descending=True).tolist() if c != 0][:n_top]
        exp = expected_index([0, *ranked], chunk, L)
        assert rc.positions(0)[0, h].tolist() == exp
        torch.testing.assert_close(rc.read(1)[0][0, h], k[0, h, exp])
        torch.testing.assert_close(rc.read(1)[1][0, h], v[0, h, exp])
    assert rc.n_fixed == [chunk * (1 + n_top) + tail] * 2 and rc.length() == rc.n_fixed[0] <= budget


def test_retrieval_gqa_groups_query_heads_by_kv_head_with_max():
    torch.manual_seed(1)
    chunk, n, D = 4, 8, 4
    means = torch.randn(1, 2, n, D) * 0.1
    means[0, 0, 3, 0] = means[0, 0, 5, 1] = 6.0  # kv head 0: q-head 0 (e0) wants chunk 3, q-head 1 (e1) chunk 5
    means[0, 1, 1, 2] = means[0, 1, 6, 3] = 6.0  # kv head 1: q-head 2 (e2) wants chunk 1, q-head 3 (e3) chunk 6
    k = chunked_keys(means, chunk, 0)
    q = torch.eye(4).view(1, 4, 1, D)  # (B, Hq=4, nq=1, D): query head h is e_h
    idx = select_chunks(k, q, budget=12, chunk=chunk)  # sink + 2 chunks per KV head
    assert idx[0, 0].tolist() == expected_index([0, 3, 5], chunk, 32)
    assert idx[0, 1].tolist() == expected_index([0, 1, 6], chunk, 32)
    # several query tokens per head: a chunk wanted by any token of the group is kept
    q2 = torch.zeros(1, 4, 2, D)
    q2[0, 0, 0, 0] = q2[0, 0, 1, 1] = 1.0  # head 0's two tokens want chunks 3 and 5; head 1 is silent
    q2[0, 2, 0, 2] = q2[0, 3, 1, 3] = 1.0
    idx2 = select_chunks(k, q2, budget=12, chunk=chunk)
    assert torch.equal(idx2, idx)


def test_retrieval_budget_checks_and_full_budget():
    k = torch.randn(1, 2, 40, 4)
    full = FakeFull([k], [k])
    q = [torch.randn(1, 2, 1, 4)]
    with pytest.raises(ValueError, match="budget 100 is not a multiple of chunk 8"):
        RetrievalPress(budget=100, chunk=8)
    with pytest.raises(ValueError, match="at least 2 chunks"):
        RetrievalPress(budget=8, chunk=8)
    rc = retrieval(full, q, budget=40, chunk=8, extra=2)  # a budget covering the history keeps every row as it is
    assert rc.n_fixed == [40] and torch.equal(rc.read(0)[0], k)
    assert retrieval(full, q, budget=16, chunk=8, extra=2).n_fixed == [16]


def test_retrieval_rollback_and_append_external():
    torch.manual_seed(2)
    k = torch.randn(1, 2, 32, 4)
    full = FakeFull([k, k + 1], [-k, -k - 1])
    rc = retrieval(full, [torch.randn(1, 2, 1, 4)] * 2, budget=16, chunk=4, extra=5)
    assert rc.capacity() == 16 + 5
    retrieved = [t.clone() for t in rc.read(0)]
    fwd(rc, [(torch.ones(1, 2, 3, 4), torch.ones(1, 2, 3, 4))] * 2)
    assert rc.length() == 19 and rc.n_tail == 3
    rc.rollback(2)
    assert rc.length() == 17
    with pytest.raises(ValueError, match="only rows appended since the last"):
        rc.rollback(2)
    ext = [(torch.full((1, 2, 2, 4), 7.0), torch.full((1, 2, 2, 4), -7.0)) for _ in range(2)]
    rc.append_external(ext)
    assert rc.n_tail == 3
    kk, vv = rc.read(1)
    assert (kk[:, :, -2:] == 7).all() and (vv[:, :, -2:] == -7).all() and (kk[:, :, 16] == 1).all()
    rc.rollback(3)
    assert all(torch.equal(a, b) for a, b in zip(rc.read(0), retrieved, strict=True))  # retrieved rows untouched
    with pytest.raises(CacheFullError):
        rc.append_external([(torch.zeros(1, 2, 6, 4), torch.zeros(1, 2, 6, 4))] * 2)


def decode_compare(m, ids, dense, other, steps=4, tol=None):
    """Feed the same tokens (pos0 explicit) to both caches; logits must match."""
    tol = tol or dict(atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        for _ in range(steps):
            pos = dense.length()
            ref = m(ids[:, -1:], dense)
            got = m(ids[:, -1:], other, pos0=pos)
            torch.testing.assert_close(got, ref, **tol)
            ids = torch.cat([ids, ref[:, -1].argmax(-1, keepdim=True)], 1)
    return ids


def test_retrieval_with_all_rows_equals_dense_and_external_rows_keep_it_exact():
    m = tiny_model("qwen2")
    torch.manual_seed(3)
    ids = torch.randint(3, 97, (2, 37))
    full = DenseKV.for_model(m, 2, 64)
    with torch.no_grad():
        m.prefill(ids[:, :-1], full, chunk=16)
    rc = PressedKV.build(RetrievalPress(budget=48, chunk=8), full, [], tail=8)  # the budget covers every row
    ids = decode_compare(m, ids, full, rc, steps=3)
    # the retrieval cache drops its own 3 rows, takes the full target's exact rows instead: still identical
    rc.rollback(3)
    rc.append_external([tuple(t[:, :, 36:39] for t in full.read(i)) for i in range(m.cfg.n_layers)])
    decode_compare(m, ids, full, rc, steps=2)


def test_retrieval_subset_forward_equals_dense_over_the_same_rows():
    """A budget < prompt selection, per head different, attends exactly like a dense cache holding those rows."""
    m = tiny_model("llama")
    torch.manual_seed(4)
    ids = torch.randint(3, 97, (1, 45))
    full = DenseKV.for_model(m, 1, 64)
    cap = LastQueries(m.cfg.n_layers, n_last=4)
    full.observers.append(cap)
    with torch.no_grad():
        m.prefill(ids, full, chunk=11)  # last chunk has 1 token: the captured rows roll over forwards
    assert all(q.shape == (1, 4, 4, 16) for q in cap.queries) and full.length() == 45
    rc = retrieval(full, cap.queries, budget=24, chunk=4, extra=8)
    n = rc.n_fixed[0]
    assert n == 4 + 4 * 4 + 1  # sink chunk + 4 chunks + 1 tail token (45 = 11 * 4 + 1)
    assert any(not torch.equal(rc.positions(i)[0, 0], rc.positions(i)[0, 1]) for i in range(m.cfg.n_layers))
    sub = DenseKV.for_model(m, 1, 64)
    for i in range(m.cfg.n_layers):
        k, v = rc.read(i)
        sub.k[i][:, :, :n], sub.v[i][:, :, :n] = k, v
    sub._len = n
    tok = torch.tensor([[5]])
    with torch.no_grad():
        for p in range(45, 49):
            a = m(tok, sub, pos0=p)
            assert rc.next_position() == p
            b = m(tok, rc)  # the pressed cache knows the next position
            torch.testing.assert_close(b, a, atol=0, rtol=0)
            tok = a[:, -1].argmax(-1, keepdim=True)
    # the captured queries are the last 4 prompt positions' queries (same as a one-shot prefill's)
    one, c1 = LastQueries(m.cfg.n_layers, n_last=4), DenseKV.for_model(m, 1, 64)
    c1.observers.append(one)
    with torch.no_grad():
        m(ids, c1)
    for a, b in zip(cap.queries, one.queries, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_retrieval_rebuild_after_growth():
    torch.manual_seed(5)
    k = torch.randn(1, 2, 64, 4)
    grow = FakeFull([k[:, :, :40]], [k[:, :, :40]])
    rc = retrieval(grow, [torch.randn(1, 2, 1, 4)], budget=16, chunk=4, extra=4)
    fwd(rc, [(torch.zeros(1, 2, 2, 4), torch.zeros(1, 2, 2, 4))])
    rc.press_obs[0].queries = [torch.randn(1, 2, 1, 4)]
    rc.compress(FakeFull([k[:, :, :63]], [k[:, :, :63]]))  # re-press from the grown full cache
    assert rc.n_tail == 0 and rc.source_len == 63 and rc.next_position() == 63 and rc.n_fixed == [4 + 2 * 4 + 3]
    assert rc.positions(0)[0, 0, -3:].tolist() == [60, 61, 62]


def test_static_streaming_equals_eager_and_refuses_rollback_across_a_press():
    """The CUDA-graph layout of the draft's cache (fixed buffer, device-side positions, masked rows) gives the eager
    layout's logits, and a rollback stops at the last press as there."""
    m = tiny_model()
    a = streaming_cache(m, sinks=2, window=4, room=2, slack=0)
    c = streaming_cache(m, sinks=2, window=4, room=2, slack=0, static=True)  # 2 + 4 + 2 rows
    ids = torch.randint(3, m.cfg.vocab_size, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for t in range(9):  # presses at 3, 5, 7, 9 tokens: down to 2 sinks + 4 recent from the 7th on
            torch.testing.assert_close(m(ids[:, t:t + 1], c, pos0=t), m(ids[:, t:t + 1], a, pos0=t),
                                       atol=1e-6, rtol=1e-6)
    assert c.attn_mask.shape == (1, 8) and c.length() == 7 and c.next_position() == 9
    c.rollback(1)  # the token appended after the last press: fine
    with pytest.raises(ValueError, match="only rows appended since the last"):
        c.rollback(1)
