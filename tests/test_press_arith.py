"""What each press keeps, and in what form, computed here independently of the press code (issue 29, item 2).

Every expectation is written from the paper's rule on small tensors: loops, sets and hand-computed numbers, never by
calling the press's own helpers. The quantizer itself (``kv/quant.py``) is the reference for the stored form of a
quantized row: it has its own tests (``test_quant.py``); what is pinned here is which rows go to which quantizer,
at which width, in which order.
"""

from __future__ import annotations

import math

import pytest
import torch

from mspeckv.kv.base import LastQueries
from mspeckv.kv.quant import QuantSpec, dequantize_keys, dequantize_values, quantize_keys, quantize_values
from mspeckv.kv.stores import LowRank, QuantRows, Rows
from mspeckv.presses import AdaKVPress, H2OPress, StreamingLLMPress
from mspeckv.presses.adakv import AdaKVPress as _Ada
from mspeckv.presses.h2o import AttentionMass
from mspeckv.presses.hybrid import HybridPress
from mspeckv.presses.kivi import KIVIPress
from mspeckv.presses.lowrank import LowRankPress, load_projections
from mspeckv.presses.pyramid import PyramidKVPress
from mspeckv.presses.retrieval import RetrievalPress
from mspeckv.presses.snapkv import SnapKVPress

D = 16


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def positions(B, H, L):
    return torch.arange(L).expand(B, H, L).clone()


def lastq(q, n_layers=1):
    o = LastQueries(n_layers, q.shape[2])
    for i in range(n_layers):
        o.queries[i] = q
    return [o]


# ------------------------------------------------------------------------------------------------- reference scores
def ref_snap(q, k, kernel, reduce):
    """SnapKV by its definition, in loops: for each KV head and each query head of its group, the mean over the w
    observation queries (query i at position L - w + i, causal) of the softmax attention, then a mean over a window
    of ``kernel`` rows centred on each row (only rows that exist count), then max or mean over the group."""
    B, Hq, w, _ = q.shape
    _, Hkv, L, _ = k.shape
    G = Hq // Hkv
    out = torch.zeros(B, Hkv, L)
    for b in range(B):
        for h in range(Hkv):
            per_g = []
            for g in range(G):
                acc = [0.0] * L
                for i in range(w):
                    p = L - w + i
                    s = [float(k[b, h, j] @ q[b, h * G + g, i]) / math.sqrt(D) for j in range(p + 1)]
                    m = max(s)
                    e = [math.exp(x - m) for x in s]
                    for j in range(p + 1):
                        acc[j] += e[j] / sum(e) / w
                lo = -(kernel // 2)
                pooled = []
                for j in range(L):
                    win = [acc[t] for t in range(j + lo, j + lo + kernel) if 0 <= t < L]
                    pooled.append(sum(win) / len(win))
                per_g.append(pooled)
            for j in range(L):
                col = [pg[j] for pg in per_g]
                out[b, h, j] = max(col) if reduce == "max" else sum(col) / G
    return out


def ref_keep(scores, n, sinks, window):
    """Rows a score press keeps: the first ``sinks``, the newest ``window``, then the best scores (a set per head)."""
    L = scores.shape[-1]
    forced = set(range(min(sinks, L))) | set(range(L - window, L))
    rest = sorted((j for j in range(L) if j not in forced), key=lambda j: -float(scores[j]))
    return sorted(forced | set(rest[: n - len(forced)]))


# ------------------------------------------------------------------------------------------------- StreamingLLM
@pytest.mark.parametrize("budget,sinks,L,want", [
    (7, 3, 20, [0, 1, 2, 16, 17, 18, 19]),
    (0.3, 2, 20, [0, 1, 16, 17, 18, 19]),  # ceil(0.3 * 20) = 6
    (5, 10, 20, [0, 1, 2, 3, 4]),  # more sinks than the budget: the first rows only
    (4, 0, 10, [6, 7, 8, 9]),
])
def test_streaming_keeps_sinks_then_newest(budget, sinks, L, want):
    p = StreamingLLMPress(budget=budget, sinks=sinks)
    k = rand(1, 2, L, D)
    idx = p.select(0, 1, k, positions(1, 2, L), [])
    assert idx.shape == (1, 2, len(want)) and idx.tolist() == [[want, want]]
    assert p.max_rows(L, 3) == len(want)
    assert StreamingLLMPress(budget=L, sinks=sinks).select(0, 1, k, positions(1, 2, L), []) is None


# ------------------------------------------------------------------------------------------------- SnapKV
@pytest.mark.parametrize("kernel,reduce", [(1, "mean"), (3, "max"), (5, "mean"), (4, "max")])
def test_snapkv_keeps_sinks_window_and_top_pooled_attention(kernel, reduce):
    B, Hq, Hkv, L, w = 1, 4, 2, 24, 3
    k, q = rand(B, Hkv, L, D, seed=1), rand(B, Hq, w, D, seed=2) * 2
    p = SnapKVPress(budget=10, sinks=2, window=3, obs_window=w, kernel=kernel, reduce=reduce)
    idx = p.select(0, 1, k, positions(B, Hkv, L), lastq(q))
    ref = ref_snap(q, k, kernel, reduce)
    for h in range(Hkv):
        assert idx[0, h].tolist() == ref_keep(ref[0, h], 10, 2, 3)
    assert torch.allclose(p.score(0, k, positions(B, Hkv, L), lastq(q)), ref, atol=1e-5)


def test_window_share_caps_the_forced_window():
    """window_share 0.25 of a 12-row budget forces only the newest 3 rows in, not the 8 of ``window``."""
    L = 30
    k, q = rand(1, 1, L, D, seed=3), rand(1, 2, 4, D, seed=4)
    ref = ref_snap(q, k, 5, "mean")[0, 0]
    for share, forced in ((1.0, 8), (0.25, 3), (0.0, 0)):
        p = SnapKVPress(budget=12, sinks=1, window=8, obs_window=4, window_share=share)
        assert p.select(0, 1, k, positions(1, 1, L), lastq(q))[0, 0].tolist() == ref_keep(ref, 12, 1, forced)


def test_layer_budgets_pick_each_layers_count():
    L = 20
    k, q = rand(1, 1, L, D, seed=5), rand(1, 2, 2, D, seed=6)
    p = SnapKVPress(budget=0.5, sinks=1, window=2, obs_window=2, layer_budgets=(3, 0.25, 20))
    obs = lastq(q, 3)
    assert [None if (i := p.select(l, 3, k, positions(1, 1, L), obs)) is None else i.shape[-1]
            for l in range(3)] == [3, 5, None]
    assert p.max_rows(L, 3) == 20
    with pytest.raises(ValueError, match="3 entries for a model with 2 layers"):
        p.select(0, 2, k, positions(1, 1, L), obs)


# ------------------------------------------------------------------------------------------------- PyramidKV
def test_pyramid_budgets_by_hand():
    # budget * (1 + spread * (1 - 2 l / (L - 1))), L = 3 layers, spread 0.5: 1.5x, 1x, 0.5x (exact in binary)
    p = PyramidKVPress(budget=0.25, spread=0.5)
    assert [p.layer_budget(l, 3) for l in range(3)] == [0.375, 0.25, 0.125]
    assert [PyramidKVPress(budget=16, spread=0.5).layer_budget(l, 3) for l in range(3)] == [24, 16, 8]
    assert [PyramidKVPress(budget=10, spread=0.25).layer_budget(l, 5) for l in range(5)] == [12, 11, 10, 9, 8]
    assert PyramidKVPress(budget=0.8, spread=0.5).layer_budget(0, 3) == 1.0  # capped at every row
    assert PyramidKVPress(budget=3, spread=0.9).layer_budget(2, 3) == 1  # at least one row
    assert PyramidKVPress(budget=0.25, spread=0.5).layer_budget(0, 1) == 0.375  # one layer: the first's share
    L = 40
    k, q = rand(1, 1, L, D, seed=7), rand(1, 2, 4, D, seed=8)
    obs = lastq(q, 3)
    counts = [p.select(l, 3, k, positions(1, 1, L), obs).shape[-1] for l in range(3)]
    assert counts == [15, 10, 5] and p.max_rows(L, 3) == 15


# ------------------------------------------------------------------------------------------------- AdaKV
class FixedScores(_Ada):
    """AdaKV with given scores, so the allocation rule is tested alone."""

    def score(self, layer, k, pos, obs):
        return self._s


def test_adakv_allocation_by_hand():
    """Two heads, 10 rows, budget 4 per head (8 in all), floor 0.5: each head keeps its own 2 best, and the 4 left go
    to the best remaining scores of either head (scores scaled to [0, 1] per head first). sinks = window = 0."""
    s = torch.tensor([[[0.1, 0.9, 0.2, 0.8, 0.3, 0.05, 0.04, 0.03, 0.02, 0.01],  # head 0 (max 0.9)
                       [0.50, 0.49, 0.48, 0.47, 0.46, 0.45, 0.44, 0.43, 0.42, 1.0]]])  # head 1 (max 1.0)
    p = FixedScores(budget=4, sinks=0, window=0, floor=0.5)
    object.__setattr__(p, "_s", s)
    k = rand(1, 2, 10, D)
    idx, valid = p.select_adaptive(0, 1, k, positions(1, 2, 10), [])
    # own: head 0 {1, 3}, head 1 {9, 0}. Left, scaled: head 0: 0.3/0.9=.333, 0.2/0.9=.222, 0.1/0.9=.111 ...;
    # head 1: .49 .48 .47 .46 ... -> the 4 best are all head 1's: rows 1, 2, 3, 4
    want = [[1, 3], [0, 1, 2, 3, 4, 9]]
    assert valid.tolist() == [[[True, True, False, False, False, False], [True] * 6]]
    assert idx[0, 0, :2].tolist() == want[0] and idx[0, 1].tolist() == want[1]
    store = p.compress(0, 1, k, rand(1, 2, 10, D, seed=1), positions(1, 2, 10), [])[0]
    assert isinstance(store, Rows) and store.valid.tolist() == valid.tolist()
    assert torch.equal(store.k[0, 1], k[0, 1, want[1]]) and store.pos[0, 1].tolist() == want[1]
    assert store.pos.dtype == torch.int32
    # floor 1.0: every head keeps exactly its own 4
    p1 = FixedScores(budget=4, sinks=0, window=0, floor=1.0)
    object.__setattr__(p1, "_s", s)
    idx1, valid1 = p1.select_adaptive(0, 1, k, positions(1, 2, 10), [])
    assert valid1.all() and idx1[0].tolist() == [[1, 2, 3, 4], [0, 1, 2, 9]]
    # own rows never fewer than sinks + the forced window
    assert FixedScores(budget=10, sinks=2, window=3, floor=0.0)._n_own(10) == 5
    assert FixedScores(budget=10, sinks=2, window=3, floor=0.8)._n_own(10) == 8


def test_adakv_max_rows_by_hand():
    # n = 8 per head of 4 heads, n_own = max(int(0.25 * 8), sinks 1 + window 2) = 3: one head can hold 3 + 3 * 5 = 18
    p = AdaKVPress(budget=8, sinks=1, window=2, floor=0.25)
    assert p.max_rows(100, 2, 4) == 8 * 4 - 3 * 3  # n*H - n_own*(H-1)
    assert p.max_rows(20, 2, 4) == 20  # capped at the rows there are
    assert p.max_rows(8, 2, 4) == 8  # the budget covers every row


# ------------------------------------------------------------------------------------------------- H2O
def ref_mass(q, k_all, keys_before):
    """Accumulated attention by definition: query row i of T sits at position keys_before + i and sees keys
    j <= keys_before + i; its softmax probabilities are added to the keys, summed over the group's query heads."""
    B, Hq, T, _ = q.shape
    Hkv, S = k_all.shape[1], k_all.shape[2]
    G = Hq // Hkv
    out = torch.zeros(B, Hkv, S)
    for b in range(B):
        for h in range(Hkv):
            for g in range(G):
                for i in range(T):
                    vis = keys_before + i + 1
                    s = k_all[b, h, :vis] @ q[b, h * G + g, i] / math.sqrt(D)
                    out[b, h, :vis] += s.softmax(-1)
    return out


@pytest.mark.parametrize("q_block", [1, 2, 3, 7, 256])
def test_h2o_mass_is_causal_across_query_blocks(q_block):
    B, Hq, Hkv, T, before = 1, 4, 2, 7, 5
    k_all, q = rand(B, Hkv, before + T, D, seed=1), rand(B, Hq, T, D, seed=2)
    o = AttentionMass(1, q_block)
    o.on_query(0, q)
    o.on_update(0, None, None, k_all, None)
    torch.testing.assert_close(o.mass[0], ref_mass(q, k_all, before))
    assert o.q[0] is None
    # a second forward of 3 rows adds its mass (the new keys start at 0)
    q2, k2 = rand(B, Hq, 3, D, seed=3), rand(B, Hkv, before + T + 3, D, seed=4)
    k2[:, :, :before + T] = k_all
    first = o.mass[0].clone()
    o.on_query(0, q2)
    o.on_update(0, None, None, k2, None)
    want = ref_mass(q2, k2, before + T)
    want[..., :before + T] += first
    torch.testing.assert_close(o.mass[0], want)


@pytest.mark.parametrize("q_block", [1, 3, 256])
def test_h2o_mass_with_a_static_mask_and_in_place_accumulation(q_block):
    """Static layout: a (T, S) mask (2-D, shared by the heads) or a per-head (B, H_kv, T, S) one decides visibility;
    with the same S every forward, the mass accumulates into the same tensor."""
    B, Hq, Hkv, T, S = 1, 4, 2, 3, 9
    k_all, q = rand(B, Hkv, S, D, seed=5), rand(B, Hq, T, D, seed=6)
    rows = torch.tensor([2, 3, 4])  # the new rows' places: keys 5.. are unused buffer rows
    m2 = torch.arange(S)[None, :] <= rows[:, None]
    o = AttentionMass(1, q_block)
    o.on_query(0, q)
    o.on_update(0, None, None, k_all, m2)
    torch.testing.assert_close(o.mass[0], torch.nn.functional.pad(ref_mass(q, k_all[:, :, :5], 2), (0, S - 5)))
    held = o.mass[0]
    o.on_query(0, q)
    o.on_update(0, None, None, k_all, m2)
    assert o.mass[0] is held  # in place
    torch.testing.assert_close(held, 2 * torch.nn.functional.pad(ref_mass(q, k_all[:, :, :5], 2), (0, S - 5)))
    # per-head mask: head 1 also hides key 0
    m4 = m2.expand(B, Hkv, T, S).clone()
    m4[:, 1, :, 0] = False
    o = AttentionMass(1, q_block)
    o.on_query(0, q)
    o.on_update(0, None, None, k_all, m4)
    want0 = ref_mass(q[:, :2], k_all[:, :1, :5], 2)[0, 0]
    want1 = ref_mass(q[:, 2:], k_all[:, 1:2, 1:5], 1)[0, 0]  # head 1 over keys 1..4: query i sees up to 2 + i
    torch.testing.assert_close(o.mass[0][0, 0, :5], want0)
    torch.testing.assert_close(o.mass[0][0, 1, 1:5], want1)
    assert o.mass[0][0, 1, 0] == 0


def test_h2o_keeps_heavy_hitters_and_reindex():
    L = 16
    o = AttentionMass(1)
    o.mass[0] = torch.tensor([[[5.0, 0.1, 3.0, 0.2, 0.3, 4.0, 0.1, 0.1, 2.0, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1]]])
    p = H2OPress(budget=6, sinks=1, window=2)
    k = rand(1, 1, L, D)
    assert p.select(0, 1, k, positions(1, 1, L), [o])[0, 0].tolist() == [0, 2, 5, 8, 14, 15]
    # score pads a shorter mass (rows appended since) and cuts a longer one
    assert p.score(0, rand(1, 1, 18, D), None, [o]).shape[-1] == 18
    assert p.score(0, rand(1, 1, 10, D), None, [o]).tolist() == [[o.mass[0][0, 0, :10].tolist()]]
    o.reindex(0, torch.tensor([[[5, 0, 2]]]))
    assert o.mass[0].tolist() == [[[4.0, 5.0, 3.0]]]



def test_h2o_mass_follows_the_keys_device_and_stays_fp32():
    """Every tensor the observer makes lives on the keys' device: on 'meta' keys (no data, no GPU needed) a CPU
    tensor would either fail to mix or leave the mass on the CPU. The mass is fp32 whatever torch's default dtype
    (a float64 default here), and the observer's default slice size is H2OPress's."""
    B, Hq, Hkv, T, before = 1, 4, 2, 3, 2
    o = AttentionMass(1, 2)
    o.on_query(0, torch.empty(B, Hq, T, D, device="meta"))
    o.on_update(0, None, None, torch.empty(B, Hkv, before + T, D, device="meta"), None)
    assert o.mass[0].device.type == "meta" and o.mass[0].shape == (B, Hkv, before + T)
    k_all, q = rand(B, Hkv, before + T, D, seed=9), rand(B, Hq, T, D, seed=10)
    want = ref_mass(q, k_all, before)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        o = AttentionMass(1, 2)
        o.on_query(0, q)
        o.on_update(0, None, None, k_all, None)
    finally:
        torch.set_default_dtype(default)
    assert o.mass[0].dtype == torch.float32
    torch.testing.assert_close(o.mass[0], want)
    assert AttentionMass(1).q_block == H2OPress().q_block == 256


def test_h2o_score_pads_by_rows_not_heads():
    """4 KV heads, 3 rows held, mass for 2 of them (the third was appended since): padded with a zero per head. The
    comparison is on the row dimension, whatever the head count."""
    o = AttentionMass(1)
    o.mass[0] = torch.tensor([[[1.0, 2.0]] * 4])
    assert H2OPress().score(0, rand(1, 4, 3, D), None, [o]).tolist() == [[[1.0, 2.0, 0.0]] * 4]


# ------------------------------------------------------------------------------------------------- retrieval
def test_retrieval_keeps_sink_chunk_best_chunks_and_tail():
    """L 27 = 6 chunks of 4 + a tail of 3; budget 16 keeps chunk 0, (16 - 4 - 3) // 4 = 2 best chunks, the tail.
    Keys are constant per chunk, so each chunk's mean (and score q . mean) is set by hand: chunks 4 and 2 win."""
    L, c = 27, 4
    level = [0.0, 1.0, 5.0, -2.0, 9.0, 3.0]
    k = torch.zeros(1, 1, L, D)
    for ch, x in enumerate(level):
        k[0, 0, ch * c:(ch + 1) * c, 0] = x
    k[0, 0, 24:, 0] = 100.0  # the tail is never scored
    q = torch.zeros(1, 2, 1, D)
    q[0, :, 0, 0] = 1.0
    p = RetrievalPress(budget=16, chunk=c)
    idx = p.select(0, 1, k, positions(1, 1, L), lastq(q))[0, 0].tolist()
    assert idx == [0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26]
    assert p.max_rows(L, 1) == 16 and p.max_rows(10, 1) == 10
    assert RetrievalPress(budget=28, chunk=c).select(0, 1, k, positions(1, 1, L), lastq(q)) is None


# ------------------------------------------------------------------------------------------------- KIVI
def fakeq(x, bits, g, key):
    spec = QuantSpec({8: "int8", 4: "int4", 2: "int2"}[bits], g)
    return (dequantize_keys(quantize_keys(x, spec), spec, x.dtype) if key else
            dequantize_values(quantize_values(x, spec), spec, x.dtype))


def decode(stores, B, H):
    n = sum(s.n for s in stores)
    k, v = torch.empty(B, H, n, D), torch.empty(B, H, n, D)
    n0 = 0
    for s in stores:
        s.decode_into(k[:, :, n0:n0 + s.n], v[:, :, n0:n0 + s.n])
        n0 += s.n
    return k, v, torch.cat([s.pos for s in stores], -1)


@pytest.mark.parametrize("kb,vb", [(4, 2), (2, 8), (8, 4)])
def test_kivi_no_guard_layout_by_hand(kb, vb):
    """n 23, residual 5: 18 rows may be quantized; groups of 4 -> 16 quantized (keys at kb bits, values at vb), then
    the 2 that do not fill a group and the 5 residual rows in full precision, in that order."""
    B, H, n, g = 1, 2, 23, 4
    k, v = rand(B, H, n, D, seed=1), rand(B, H, n, D, seed=2)
    p = KIVIPress(k_bits=kb, v_bits=vb, group_size=g, residual=5)
    stores = p.encode(0, k, v, positions(B, H, n), [])
    assert [type(s) for s in stores] == [QuantRows, Rows] and [s.n for s in stores] == [16, 7]
    q = stores[0]
    assert (q.kspec.bits, q.vspec.bits, q.kspec.group_size, q.vspec.group_size) == (kb, vb, g, g)
    kk, vv, pos = decode(stores, B, H)
    assert pos.tolist() == [[list(range(23))] * 2]
    assert torch.equal(kk[:, :, :16], fakeq(k[:, :, :16], kb, g, True))
    assert torch.equal(vv[:, :, :16], fakeq(v[:, :, :16], vb, g, False))
    assert torch.equal(kk[:, :, 16:], k[:, :, 16:]) and torch.equal(vv[:, :, 16:], v[:, :, 16:])
    # stored bytes: 16 rows x 2 heads x 16 channels at kb / vb bits, + a 4-byte scale and zero per group, + int32 pos
    assert q.nbytes() == 2 * 16 * 16 * (kb + vb) // 8 + 2 * (2 * 16 * 16 // 4) * 4 + 2 * 16 * 4


def test_kivi_everything_in_the_residual_and_group_remainder():
    B, H, g = 1, 1, 8
    k, v = rand(B, H, 12, D), rand(B, H, 12, D, seed=1)
    s = KIVIPress(group_size=g, residual=12).encode(0, k, v, positions(B, H, 12), [])
    assert len(s) == 1 and isinstance(s[0], Rows) and torch.equal(s[0].k, k)
    s = KIVIPress(group_size=g, residual=5).encode(0, k, v, positions(B, H, 12), [])  # 7 quantizable < one group
    assert len(s) == 1 and isinstance(s[0], Rows) and s[0].n == 12
    s = KIVIPress(group_size=g, residual=0).encode(0, k, v, positions(B, H, 12), [])
    assert [x.n for x in s] == [8, 4] and s[1].pos.tolist() == [[[8, 9, 10, 11]]]


@pytest.mark.parametrize("guard_bits", [8, 16])
def test_kivi_guard_keeps_the_most_attended_rows_at_guard_bits(guard_bits):
    """n 31, residual 6: 25 quantizable rows; guard 0.4 -> 10 rows, rounded down to whole groups of 4 at int8 (8
    rows), kept exactly at 16 bits (10 rows). The guard rows are the best SnapKV scores (kernel 5, mean) of
    the obs_window last queries among the 24, in position order; the other rows fill whole low-bit groups and their
    remainder joins the full-precision rows: low groups | guard | remainder | residual window."""
    B, Hq, H, n, g, w = 1, 2, 1, 31, 4, 3
    k, v, q = rand(B, H, n, D, seed=3), rand(B, H, n, D, seed=4), rand(B, Hq, w, D, seed=5) * 3
    p = KIVIPress(k_bits=2, v_bits=4, group_size=g, residual=6, guard=0.4, guard_bits=guard_bits, obs_window=w)
    assert isinstance(p.observers(1)[0], LastQueries) and p.observers(1)[0].n_last == w
    stores = p.encode(0, k, v, positions(B, H, n), lastq(q))
    score = ref_snap(q, k, 5, "mean")[0, 0, :25]
    n_guard = 8 if guard_bits == 8 else 10
    top = sorted(sorted(range(25), key=lambda j: -float(score[j]))[:n_guard])
    low = [j for j in range(25) if j not in top]
    n_low = len(low) // g * g
    kk, vv, pos = decode(stores, B, H)
    got = pos[0, 0].tolist()
    want = low[:n_low] + top + low[n_low:] + list(range(25, 31))
    assert len(low) % g == (1 if guard_bits == 8 else 3)  # 17 or 15 low rows: a group remainder of 1 or 3
    if guard_bits == 8:
        assert [type(s) for s in stores] == [QuantRows, QuantRows, Rows]
        assert (stores[1].kspec.bits, stores[1].vspec.bits) == (8, 8)
    else:
        assert [type(s) for s in stores] == [QuantRows, Rows]
    assert (stores[0].kspec.bits, stores[0].vspec.bits) == (2, 4)
    assert got == want
    kl, vl = k[:, :, low[:n_low]], v[:, :, low[:n_low]]
    assert torch.equal(kk[:, :, :n_low], fakeq(kl, 2, g, True))
    assert torch.equal(vv[:, :, :n_low], fakeq(vl, 4, g, False))
    kt, vt = k[:, :, top], v[:, :, top]
    gk, gv = kk[:, :, n_low:n_low + n_guard], vv[:, :, n_low:n_low + n_guard]
    if guard_bits == 8:
        assert torch.equal(gk, fakeq(kt, 8, g, True)) and torch.equal(gv, fakeq(vt, 8, g, False))
    else:
        assert torch.equal(gk, kt) and torch.equal(gv, vt)
    rest = want[n_low + n_guard:]
    assert torch.equal(kk[:, :, n_low + n_guard:], k[:, :, rest])


# ------------------------------------------------------------------------------------------------- low rank
@pytest.fixture(scope="module")
def proj_file(tmp_path_factory):
    """Known per-head orthonormal bases, different for K and V and per layer."""
    from safetensors.torch import save_file

    P = {}
    for layer in range(2):
        for i, kind in enumerate("kv"):
            Q = torch.linalg.qr(rand(2, D, D, seed=10 + 2 * layer + i))[0]  # (H, D, D), columns orthonormal
            P[f"layer.{layer}.{kind}"] = Q[..., :12].contiguous()
    path = tmp_path_factory.mktemp("lr") / "projections.safetensors"
    save_file(P, str(path))
    load_projections.cache_clear()
    return str(path), P


@pytest.mark.parametrize("v_only", [True, False])
@pytest.mark.parametrize("rank,ratio,r", [(0, 0.5, 8), (4, 0.9, 4), (0, 0.3, 5)])
def test_lowrank_projects_on_the_first_rank_columns_of_its_own_basis(proj_file, v_only, rank, ratio, r):
    path, P = proj_file
    B, H, n = 1, 2, 6
    k, v = rand(B, H, n, D, seed=1), rand(B, H, n, D, seed=2)
    press = LowRankPress(calib=path, rank=rank, ratio=ratio, v_only=v_only)
    (s,) = press.encode(1, k, v, positions(B, H, n), [])
    assert isinstance(s, LowRank) and s.v_lat.shape == (B, H, n, r)
    Pv, Pk = P["layer.1.v"][..., :r], P["layer.1.k"][..., :r]
    torch.testing.assert_close(s.v_lat, torch.einsum("bhnd,hdr->bhnr", v, Pv))
    kk, vv = torch.empty_like(k), torch.empty_like(v)
    s.decode_into(kk, vv)
    torch.testing.assert_close(vv, torch.einsum("bhnr,hdr->bhnd", torch.einsum("bhnd,hdr->bhnr", v, Pv), Pv))
    if v_only:
        assert s.k_lat is None and torch.equal(kk, k) and s.k_rows is not k  # a copy, not the caller's tensor
        assert s.nbytes() == B * H * n * (r + D) * 4 + B * H * n * 4
    else:
        want_k = torch.einsum("bhnr,hdr->bhnd", torch.einsum("bhnd,hdr->bhnr", k, Pk), Pk)
        torch.testing.assert_close(kk, want_k)
        assert s.k_rows is None and s.nbytes() == B * H * n * 2 * r * 4 + B * H * n * 4
    assert s.shared_nbytes() == H * D * r * 4 * (1 if v_only else 2)


def test_lowrank_int8_latents(proj_file):
    path, P = proj_file
    k, v = rand(1, 2, 6, D, seed=1), rand(1, 2, 6, D, seed=2)
    (s,) = LowRankPress(calib=path, rank=8, latent_bits=8, latent_group=4).encode(0, k, v, positions(1, 2, 6), [])
    Pv = P["layer.0.v"][..., :8]
    spec = QuantSpec("int8", 4)
    lat = dequantize_values(quantize_values(torch.einsum("bhnd,hdr->bhnr", v, Pv), spec), spec, torch.float32)
    kk, vv = torch.empty_like(k), torch.empty_like(v)
    s.decode_into(kk, vv)
    torch.testing.assert_close(vv, torch.einsum("bhnr,hdr->bhnd", lat, Pv))
    with pytest.raises(ValueError, match="multiple of latent_group"):
        LowRankPress(calib=path, rank=6, latent_bits=8, latent_group=4).encode(0, k, v, positions(1, 2, 6), [])
    with pytest.raises(ValueError, match="exceeds the calibrated 12"):
        LowRankPress(calib=path, rank=13).encode(0, k, v, positions(1, 2, 6), [])
    with pytest.raises(ValueError, match="has no 'layer.5.v'"):
        LowRankPress(calib=path, rank=4).encode(5, k, v, positions(1, 2, 6), [])


# ------------------------------------------------------------------------------------------------- hybrid
def test_hybrid_is_pyramid_selection_then_kivi_with_its_fields():
    h = HybridPress(retain=0.4, k_bits=2, v_bits=8, guard=0.3, group_size=4, window=5, spread=0.25, obs_window=3,
                    sinks=2, window_share=0.75)
    s, e = h.selector, h.encoder
    assert (s.budget, s.spread, s.sinks, s.window, s.obs_window, s.window_share) == (0.4, 0.25, 2, 5, 3, 0.75)
    assert (e.k_bits, e.v_bits, e.group_size, e.residual, e.guard, e.guard_bits, e.obs_window) == \
        (2, 8, 4, 5, 0.3, 8, 3)
    assert [type(o) for o in h.observers(2)] == [LastQueries] and h.observers(2)[0].n_last == 3


# ------------------------------------------------------------------------------------------------- stores
def test_store_bytes_and_decode_by_hand():
    k, v = rand(1, 2, 8, D), rand(1, 2, 8, D, seed=1)
    pos = positions(1, 2, 8).to(torch.int32)
    r = Rows(k, v, pos)
    assert r.nbytes() == 2 * (2 * 8 * D * 4) + 2 * 8 * 4 and r.n == 8
    valid = torch.ones(1, 2, 8, dtype=torch.bool)
    assert Rows(k, v, pos, valid).nbytes() == r.nbytes() + 16
    kk, vv = torch.empty_like(k), torch.empty_like(v)
    r.decode_into(kk, vv)
    assert torch.equal(kk, k) and torch.equal(vv, v)
    r2 = r.to("cpu")
    assert torch.equal(r2.k, k) and torch.equal(r2.v, v) and torch.equal(r2.pos, pos) and r2.valid is None
    ks, vs = QuantSpec("int4", 8), QuantSpec("int2", 8)
    q = QuantRows.encode(k, v, pos.long(), ks, vs)
    assert q.pos.dtype == torch.int32 and q.n == 8
    q.decode_into(kk, vv)
    assert torch.equal(kk, fakeq(k, 4, 8, True)) and torch.equal(vv, fakeq(v, 2, 8, False))
    q2 = q.to("cpu")
    q2.decode_into(kk, vv)
    assert torch.equal(kk, fakeq(k, 4, 8, True)) and torch.equal(vv, fakeq(v, 2, 8, False))


# ------------------------------------------------------------------------------------------------- field bounds
# (press, field, a value at the bound that is accepted, a value past it, the error's words): each field's own check,
# with its own message (a value past one bound must not be caught later by another check with other words)
BOUNDS = [
    (KIVIPress, "k_bits", 2, 3, "kivi.k_bits must be one of 8, 4, 2"),
    (KIVIPress, "v_bits", 8, 16, "kivi.v_bits must be one of 8, 4, 2"),
    (KIVIPress, "group_size", 4, 0, "KIVIPress.group_size must be in [1, inf]"),
    (KIVIPress, "residual", 0, -1, "KIVIPress.residual must be in [0, inf]"),
    (KIVIPress, "guard", 1.0, 1.5, "KIVIPress.guard must be in [0.0, 1.0]"),
    (KIVIPress, "guard", 0.0, -0.1, "KIVIPress.guard must be in [0.0, 1.0]"),
    (KIVIPress, "guard_bits", 16, 4, "kivi.guard_bits must be 8 or 16, got 4"),
    (KIVIPress, "obs_window", 1, 0, "KIVIPress.obs_window must be in [1, inf]"),
    (LowRankPress, "calib", "x", "", "lowrank.calib is required"),
    (LowRankPress, "rank", 0, -1, "LowRankPress.rank must be in [0, inf]"),
    (LowRankPress, "ratio", 1.0, 1.5, "LowRankPress.ratio must be in [0.0, 1.0]"),
    (LowRankPress, "ratio", 0.0, -0.5, "LowRankPress.ratio must be in [0.0, 1.0]"),
    (LowRankPress, "latent_bits", 8, 4, "lowrank.latent_bits must be 16 or 8, got 4"),
    (LowRankPress, "v_only", False, "yes", "lowrank.v_only must be true or false, got 'yes'"),
    (LowRankPress, "latent_group", 1, 0, "LowRankPress.latent_group must be in [1, inf]"),
    (HybridPress, "retain", 1, 0, "hybrid.retain as a token count must be >= 1"),
    (HybridPress, "window", 0, -1, "HybridPress.window must be in [0, inf]"),
    (HybridPress, "k_bits", 8, 3, "kivi.k_bits must be one of 8, 4, 2"),  # its parts are checked when it is built
    (HybridPress, "spread", 0.0, 1.0, "PyramidKVPress.spread must be in [0.0, 0.99]"),
    (StreamingLLMPress, "budget", 1, 0, "streaming.budget as a token count must be >= 1"),
    (StreamingLLMPress, "sinks", 0, -1, "StreamingLLMPress.sinks must be in [0, inf]"),
    (SnapKVPress, "budget", 1.0, 1.5, "snapkv.budget as a ratio must be in (0, 1]"),
    (SnapKVPress, "sinks", 0, -1, "SnapKVPress.sinks must be in [0, inf]"),
    (SnapKVPress, "window", 0, -1, "SnapKVPress.window must be in [0, inf]"),
    (SnapKVPress, "window_share", 1.0, 1.01, "SnapKVPress.window_share must be in [0.0, 1.0]"),
    (SnapKVPress, "obs_window", 1, 0, "SnapKVPress.obs_window must be in [1, inf]"),
    (SnapKVPress, "kernel", 1, 0, "SnapKVPress.kernel must be in [1, inf]"),
    (SnapKVPress, "reduce", "max", "sum", "snapkv.reduce must be mean or max, got 'sum'"),
    (SnapKVPress, "layer_budgets", (1, 1.0), (1, 0), "snapkv.layer_budgets[1] as a token count must be >= 1"),
    (H2OPress, "q_block", 1, 0, "H2OPress.q_block must be in [1, inf]"),
    (PyramidKVPress, "spread", 0.99, 0.995, "PyramidKVPress.spread must be in [0.0, 0.99]"),
    (AdaKVPress, "floor", 1.0, 1.1, "AdaKVPress.floor must be in [0.0, 1.0]"),
    (RetrievalPress, "budget", 16, 12, "budget 12 is not a multiple of chunk 8"),
    (RetrievalPress, "chunk", 8, 0, "retrieval.chunk must be an int >= 1, got 0"),
    (RetrievalPress, "n_queries", 1, True, "retrieval.n_queries must be an int >= 1, got True"),
]


@pytest.mark.parametrize("cls,field,ok,bad,msg", BOUNDS, ids=[f"{c.name}.{f}={b!r}" for c, f, _, b, _ in BOUNDS])
def test_each_field_is_checked_at_its_bound(cls, field, ok, bad, msg):
    base = {"calib": "x"} if cls is LowRankPress else {}
    if cls is RetrievalPress:
        base = {"budget": 16, "chunk": 8}
    cls(**{**base, field: ok})
    with pytest.raises(ValueError) as e:
        cls(**{**base, field: bad})
    assert msg in str(e.value)


# ------------------------------------------------------------------------------------------------- small edges
def test_kivi_edges_observers_and_all_quantized():
    assert KIVIPress(guard=0.0).observers(2) == [] and len(KIVIPress(guard=0.1).observers(2)) == 1
    k, v = rand(1, 1, 16, D), rand(1, 1, 16, D, seed=1)
    s = KIVIPress(group_size=8, residual=0).encode(0, k, v, positions(1, 1, 16), [])
    assert [type(x) for x in s] == [QuantRows] and s[0].n == 16  # nothing left over: no empty dense store
    # group 1 (int8): every row past the residual is a group of its own; none when the residual holds them all
    s = KIVIPress(k_bits=8, v_bits=8, group_size=1, residual=16).encode(0, k, v, positions(1, 1, 16), [])
    assert [type(x) for x in s] == [Rows] and s[0].pos.dtype == torch.int32
    s = KIVIPress(k_bits=8, v_bits=8, group_size=1, residual=15).encode(0, k, v, positions(1, 1, 16), [])
    assert [x.n for x in s] == [1, 15]


def test_lowrank_rank_edges(proj_file):
    path, _ = proj_file
    assert LowRankPress(calib=path, ratio=0.01).rank_for(16) == 1  # ceil(0.16): at least 1, never more
    assert LowRankPress(calib=path, ratio=0.0).rank_for(16) == 1
    assert LowRankPress(calib=path, rank=3, ratio=0.9).rank_for(16) == 3
    assert LowRankPress(calib=path, rank=12).projection(0, "v", D, "cpu").shape == (2, D, 12)  # all calibrated


def test_lowrank_in_bf16_with_int8_latents_and_copies(proj_file):
    """A bf16 model's rows with fp32 projections: latents are stored in the rows' dtype, decoded into bf16; int8
    latents count their codes, scales and zeros; ``to`` keeps every part."""
    path, P = proj_file
    k, v = rand(1, 2, 6, D, seed=1).bfloat16(), rand(1, 2, 6, D, seed=2).bfloat16()
    pos = positions(1, 2, 6)
    (s,) = LowRankPress(calib=path, rank=8, v_only=False).encode(0, k, v, pos, [])
    assert s.v_lat.dtype == torch.bfloat16 and s.k_lat.dtype == torch.bfloat16
    kk, vv = torch.empty_like(k), torch.empty_like(v)
    s.decode_into(kk, vv)
    Pv, Pk = P["layer.0.v"][..., :8], P["layer.0.k"][..., :8]
    proj = lambda x, p: torch.einsum("bhnr,hdr->bhnd", torch.einsum("bhnd,hdr->bhnr", x.float(), p), p)
    torch.testing.assert_close(vv.float(), proj(v, Pv), atol=0.1, rtol=0.05)
    torch.testing.assert_close(kk.float(), proj(k, Pk), atol=0.1, rtol=0.05)
    (q,) = LowRankPress(calib=path, rank=8, latent_bits=8, latent_group=4).encode(0, k, v, pos, [])
    # 2 heads x 6 rows x 8 latents at 1 byte + a 2-byte scale and zero per 4 latents, bf16 keys, int32 positions
    assert q.nbytes() == 2 * 6 * 8 + 2 * 6 * 2 * 2 * 2 + 2 * 6 * D * 2 + 2 * 6 * 4
    q.decode_into(kk, vv)
    q2 = q.to("cpu")
    k2, v2 = torch.empty_like(k), torch.empty_like(v)
    q2.decode_into(k2, v2)
    assert torch.equal(k2, kk) and torch.equal(v2, vv) and torch.equal(q2.pos, q.pos) and q2.lat_spec == q.lat_spec
    assert torch.equal(k2, k)
    (f,) = LowRankPress(calib=path, rank=8, v_only=False).encode(0, k, v, pos, [])
    f2 = f.to("cpu")
    f2.decode_into(k2, v2)
    assert f2.k_rows is None and torch.equal(f2.k_proj, f.k_proj)
    s.decode_into(kk, vv)
    assert torch.equal(k2, kk) and torch.equal(v2, vv)


def test_store_copies_keep_every_part():
    k, v = rand(1, 2, 8, D), rand(1, 2, 8, D, seed=1)
    pos = positions(1, 2, 8).to(torch.int32)
    valid = torch.rand(1, 2, 8, generator=torch.Generator().manual_seed(0)) > 0.5
    r = Rows(k, v, pos, valid).to("cpu")
    assert torch.equal(r.valid, valid) and torch.equal(r.pos, pos)
    q = QuantRows.encode(k, v, pos, QuantSpec("int4", 8), QuantSpec("int8", 8)).to("cpu")
    assert torch.equal(q.pos, pos) and q.kspec.bits == 4 and q.vspec.bits == 8


# ------------------------------------------------------------------------------------------------- more edges
def test_adakv_pools_on_per_head_scaled_scores():
    """Head 0's scores are small (max 0.2) but its runner-up is 0.75 of its max; head 1's runner-ups are half its
    max: scaled per head, head 0's rows win the pooled share (unscaled, head 1's would)."""
    s = torch.tensor([[[0.2, 0.15, 0.15, 0.01, 0.01, 0.01],
                       [1.0, 0.5, 0.5, 0.01, 0.01, 0.01]]])
    p = FixedScores(budget=2, sinks=0, window=0, floor=0.5)
    object.__setattr__(p, "_s", s)
    idx, valid = p.select_adaptive(0, 1, rand(1, 2, 6, D), positions(1, 2, 6), [])
    assert valid.tolist() == [[[True, True, True], [True, False, False]]]
    assert idx[0, 0].tolist() == [0, 1, 2] and idx[0, 1, 0] == 0


def test_adakv_full_budget_keeps_every_row_unpadded():
    k, v = rand(1, 2, 6, D), rand(1, 2, 6, D, seed=1)
    p = AdaKVPress(budget=6, sinks=0, window=0)
    assert p.select_adaptive(0, 1, k, positions(1, 2, 6), []) == (None, None)
    (r,) = p.compress(0, 1, k, v, positions(1, 2, 6), [])
    assert r.valid is None and torch.equal(r.k, k) and torch.equal(r.v, v) and r.pos.tolist() == [[list(range(6))] * 2]


def test_forced_rows_when_the_budget_is_smaller_than_sinks_plus_window():
    """Budget 5, sinks 3, window 4: the sinks first, then the newest rows (newest first), never by score."""
    L = 20
    k, q = rand(1, 1, L, D, seed=3), rand(1, 2, 2, D, seed=4)
    p = SnapKVPress(budget=5, sinks=3, window=4, obs_window=2)
    assert p.select(0, 1, k, positions(1, 1, L), lastq(q))[0, 0].tolist() == [0, 1, 2, 18, 19]


def test_pyramid_two_layers_and_refusal():
    p = PyramidKVPress(budget=0.25, spread=0.5)
    assert [p.layer_budget(l, 2) for l in range(2)] == [0.375, 0.125]
    with pytest.raises(ValueError, match="use snapkv with layer_budgets for an explicit schedule"):
        PyramidKVPress(layer_budgets=(0.5,))


@pytest.mark.parametrize("T", [1, 2, 5])
def test_h2o_batch_rows_and_short_forwards(T):
    B, Hq, Hkv, before = 2, 4, 2, 3
    k_all, q = rand(B, Hkv, before + T, D, seed=7), rand(B, Hq, T, D, seed=8)
    o = AttentionMass(1, 2)
    o.on_query(0, q)
    o.on_update(0, None, None, k_all, None)
    torch.testing.assert_close(o.mass[0], ref_mass(q, k_all, before))


def test_h2o_observer_and_score_lookup():
    p = H2OPress(q_block=2)
    (o,) = p.observers(4)
    assert isinstance(o, AttentionMass) and o.q_block == 2 and len(o.mass) == 4
    o.mass[1] = torch.ones(1, 1, 5)
    other = LastQueries(4)  # an observer of another kind comes first: skipped
    assert p.score(1, rand(1, 1, 5, D), None, [other, o]).tolist() == [[[1.0] * 5]]
    with pytest.raises(RuntimeError, match="^h2o saw no attention: run a prefill through the cache before "
                                           "compress\\(\\)$"):
        p.score(0, rand(1, 1, 5, D), None, [other, o])


def test_no_press_spec_and_retrieval_full_budget():
    from mspeckv.presses import Press, parse_press

    k, v = rand(1, 2, 4, D), rand(1, 2, 4, D, seed=1)
    (r,) = Press().encode(0, k, v, positions(1, 2, 4), [])
    assert r.pos.dtype == torch.int32 and torch.equal(r.k, k) and r.k is not k
    assert StreamingLLMPress().spec() == "streaming" and str(StreamingLLMPress(sinks=2)) == "streaming:sinks=2"
    p = SnapKVPress(layer_budgets=(0.25, 8))
    assert p.spec() == "snapkv:layer_budgets=0.25/8" and parse_press(p.spec()) == p
    kk = rand(1, 1, 32, D)
    assert RetrievalPress(budget=32, chunk=8).select(0, 1, kk, positions(1, 1, 32), lastq(rand(1, 2, 1, D))) is None


def test_shared_checks_and_helpers():
    from mspeckv.presses.base import last_queries, n_keep

    for bad, msg in (("x", "streaming.budget must be a ratio in (0, 1] or a token count >= 1, got 'x'"),
                     (0.0, "streaming.budget as a ratio must be in (0, 1], got 0.0"),
                     (True, "streaming.budget must be a ratio")):
        with pytest.raises(ValueError) as e:
            StreamingLLMPress(budget=bad)
        assert msg in str(e.value)
    assert n_keep(0.01, 20) == 1 and n_keep(0.5, 7) == 4 and n_keep(30, 20) == 20 and n_keep(3, 20) == 3
    for bad, msg in ((1.5, "KIVIPress.residual must be int, got 1.5"), ("8", "KIVIPress.residual must be int")):
        with pytest.raises(ValueError) as e:
            KIVIPress(residual=bad)
        assert msg in str(e.value)
    with pytest.raises(ValueError, match="KIVIPress.guard must be in"):
        KIVIPress(guard=float("nan"))
    with pytest.raises(RuntimeError, match="the press saw no queries: run a prefill through the cache before"):
        last_queries([LastQueries(2)], 1)
    with pytest.raises(RuntimeError, match="this press needs a LastQueries observer on the cache it compresses"):
        last_queries([], 0)


def test_batch_rows_are_pressed_independently():
    """Two batch rows, each keeping its own rows (StreamingLLM via the shared gather, AdaKV per row)."""
    k, v = rand(2, 2, 10, D), rand(2, 2, 10, D, seed=1)
    (r,) = StreamingLLMPress(budget=4, sinks=1).compress(0, 1, k, v, positions(2, 2, 10), [])
    assert torch.equal(r.k, k[:, :, [0, 7, 8, 9]]) and torch.equal(r.v, v[:, :, [0, 7, 8, 9]])
    s = torch.rand(2, 2, 10, generator=torch.Generator().manual_seed(3))
    p = FixedScores(budget=3, sinks=0, window=0, floor=0.5)
    object.__setattr__(p, "_s", s)
    (r,) = p.compress(0, 1, k, v, positions(2, 2, 10), [])
    for b in range(2):
        object.__setattr__(p, "_s", s[b:b + 1])
        (one,) = p.compress(0, 1, k[b:b + 1], v[b:b + 1], positions(1, 2, 10), [])
        n = one.k.shape[2]
        assert torch.equal(r.k[b:b + 1, :, :n][one.valid], one.k[one.valid])
