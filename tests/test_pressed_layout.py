"""Where a pressed cache puts every row, checked by hand on numbered rows (issue 29, item 2): the direct layout (kept
rows + tail in one buffer), the scratch layout (stores decoded, then the tail), per-head padding masks, the static
(CUDA-graph) layout's append, offloaded stores, and the transformers cache's mask offset after an eviction."""

from __future__ import annotations

import pytest
import torch

from mspeckv.kv.dense import DenseKV
from mspeckv.kv.pressed import PressedKV
from mspeckv.kv.quant import QuantSpec, dequantize_keys, dequantize_values, quantize_keys, quantize_values
from mspeckv.kv.stores import QuantRows, Rows
from mspeckv.presses import KIVIPress, StreamingLLMPress

B, H, D, NL = 1, 2, 8, 2


def rows(t0, n, layer=0, sign=1.0, b=B):
    """(b, H, n, D) rows whose every entry names its token and layer: token + layer / 10 (+ head / 100)."""
    t = torch.arange(t0, t0 + n, dtype=torch.float32)[None, None, :, None]
    h = torch.arange(H, dtype=torch.float32)[None, :, None, None] / 100
    return (sign * (t + layer / 10 + h)).expand(b, H, n, D).clone()


def filled(L, dtype=torch.float32, b=B):
    """A DenseKV holding L numbered tokens in every layer (K = +rows, V = -rows)."""
    c = DenseKV(NL, b, H, D, 64, dtype, "cpu")
    if L:
        c.begin(L)
        for i in range(NL):
            c.update(i, rows(0, L, i, b=b).to(dtype), rows(0, L, i, -1.0, b=b).to(dtype))
        c.end()
    return c


def tokens(x, layer=0):
    """The token numbers of (B, H, n, D) rows, head 0."""
    return torch.round(x[0, 0, :, 0] - layer / 10).long().tolist()


def forward(cache, t0, n):
    cache.begin(n)
    # clones: the scratch layout decodes every layer into one shared buffer
    out = [tuple(x.clone() for x in cache.update(i, rows(t0, n, i), rows(t0, n, i, -1.0))) for i in range(NL)]
    mask = cache.attn_mask
    cache.end()
    return out, mask


def test_direct_layout_appends_after_the_kept_rows():
    src = filled(20)
    c = PressedKV.build(StreamingLLMPress(budget=5, sinks=2), src, [], tail=6)
    assert c.direct == [True, True] and c.n_fixed == [5, 5] and c.source_len == 20
    assert c.next_position() == 20 and c.length() == 5
    (kv0, kv1), mask = forward(c, 20, 2)
    want = [0, 1, 17, 18, 19, 20, 21]
    assert tokens(kv0[0]) == want and tokens(-kv0[1]) == want and tokens(kv1[0], 1) == want and mask is None
    assert c.positions(0)[0, 0].tolist() == want and c.next_position() == 22 and c.length() == 7
    c.append_external([(rows(22, 3, i), rows(22, 3, i, -1.0)) for i in range(NL)])
    assert tokens(c.read(1)[0], 1) == want + [22, 23, 24] and c.next_position() == 25
    c.rollback(4)
    assert tokens(c.read(0)[0]) == [0, 1, 17, 18, 19, 20] and c.next_position() == 21
    with pytest.raises(ValueError, match="outside \\[0, 1\\]"):
        c.rollback(2)
    # source untouched; a re-press keeps the newest 3 of what is held, sinks first
    assert tokens(src.read(0)[0]) == list(range(20))
    c.compress()
    assert tokens(c.read(0)[0]) == [0, 1, 18, 19, 20] and c.positions(0)[0, 0].tolist() == [0, 1, 18, 19, 20]
    assert c.next_position() == 21 and c.n_tail == 0


def test_scratch_layout_decodes_the_stores_then_the_tail():
    src = filled(24)
    p = KIVIPress(k_bits=4, v_bits=2, group_size=8, residual=5)  # 19 quantizable -> 16 quantized, 8 full precision
    c = PressedKV.build(p, src, [], tail=4)
    assert c.direct == [False, False] and [type(s) for s in c.stores[0]] == [QuantRows, Rows]
    (kv0, kv1), _ = forward(c, 24, 2)
    ks, vs = QuantSpec("int4", 8), QuantSpec("int2", 8)
    for layer, (k, v) in enumerate((kv0, kv1)):
        assert k.shape[2] == 26
        torch.testing.assert_close(k[:, :, :16], dequantize_keys(quantize_keys(rows(0, 16, layer), ks), ks,
                                                                torch.float32))
        torch.testing.assert_close(v[:, :, :16], dequantize_values(quantize_values(rows(0, 16, layer, -1.0), vs), vs,
                                                                  torch.float32))
        assert tokens(k[:, :, 16:], layer) == list(range(16, 26))
        assert tokens(-v[:, :, 16:], layer) == list(range(16, 26))
    assert c.positions(1)[0, 1].tolist() == list(range(26))
    assert tokens(c.read(1)[0][:, :, 16:], 1) == list(range(16, 26))
    c.append_external([(rows(26, 2, i), rows(26, 2, i, -1.0)) for i in range(NL)])
    assert tokens(c.read(0)[0][:, :, 16:]) == list(range(16, 28))


def test_offloaded_stores_count_their_bytes_per_forward():
    src = filled(16)
    c = PressedKV(StreamingLLMPress(budget=6, sinks=2), NL, B, H, D, 4, torch.float32, "cpu", inner=src,
                  offload=frozenset({1}))
    c.compress()
    assert c.direct == [True, False] and c.stores[1][0].k.device.type == "cpu"
    per_store = c.stores[1][0].nbytes()
    assert per_store == 2 * B * H * 6 * D * 4 + B * H * 6 * 4
    (kv0, kv1), _ = forward(c, 16, 1)
    assert c.h2d_bytes == per_store and tokens(kv1[0], 1) == [0, 1, 12, 13, 14, 15, 16]
    assert c.memory_report()["store_bytes_cpu"] == per_store


def test_padded_heads_are_masked_per_head():
    """Heads keeping different counts (AdaKV): head 0 holds 2 valid rows of 3, head 1 all 3; new rows see every valid
    kept row and the new rows up to their own."""
    c = PressedKV(None, NL, B, H, D, 4, torch.float32, "cpu")
    k, v = rows(0, 3), rows(0, 3, sign=-1.0)
    valid = torch.tensor([[[True, True, False], [True, True, True]]])
    pos = torch.tensor([[[0, 5, 0], [1, 2, 5]]], dtype=torch.int32)
    for i in range(NL):
        c._lay_out(i, [Rows(k, v, pos, valid)])
    c.source_len = 6
    c.begin(2)
    c.update(0, rows(6, 2), rows(6, 2, sign=-1.0))
    m = c.attn_mask
    c.end()
    assert m.shape == (B, H, 2, 5)
    assert m[0, 0].tolist() == [[True, True, False, True, False], [True, True, False, True, True]]
    assert m[0, 1].tolist() == [[True, True, True, True, False], [True, True, True, True, True]]


def test_static_layout_appends_at_the_device_position():
    src = filled(20)
    c = PressedKV.build(StreamingLLMPress(budget=5, sinks=2), src, [], tail=6, static=True, fixed_cap=8)
    assert c.graphable and c.pos.tolist() == [5, 5] and c.capacity() == 14
    buf0 = c.buf[0]
    c.begin(2)
    k, v = c.update(0, rows(20, 2), rows(20, 2, sign=-1.0))
    assert k.shape[2] == 14 and c.attn_lens.tolist() == [6, 7]
    assert c.attn_mask.tolist() == [[j <= r for j in range(14)] for r in (5, 6)]
    c.update(1, rows(20, 2, 1), rows(20, 2, 1, -1.0))
    c.end()
    assert c.pos.tolist() == [7, 7] and tokens(c.buf[0][0][:, :, :7]) == [0, 1, 17, 18, 19, 20, 21]
    c.append_external([(rows(22, 2, i), rows(22, 2, i, -1.0)) for i in range(NL)])
    assert c.pos.tolist() == [9, 9] and tokens(c.read(1)[0], 1) == [0, 1, 17, 18, 19, 20, 21, 22, 23]
    c.begin(1)
    c.update(0, rows(24, 1), rows(24, 1, sign=-1.0))
    assert c.attn_lens.tolist() == [10]
    c.update(1, rows(24, 1, 1), rows(24, 1, 1, -1.0))
    c.end()
    assert tokens(c.buf[1][0][:, :, :10], 1) == [0, 1, 17, 18, 19, 20, 21, 22, 23, 24]
    c.rollback(2)
    assert c.pos.tolist() == [8, 8] and c.next_position() == 23
    c.compress()  # re-press into the same buffers: captured graphs stay valid
    assert c.buf[0] is buf0 and c.pos.tolist() == [5, 5] and tokens(c.read(0)[0]) == [0, 1, 20, 21, 22]
    with pytest.raises(ValueError, match="more than the static buffer's 4"):
        PressedKV.build(StreamingLLMPress(budget=5, sinks=2), src, [], tail=6, static=True, fixed_cap=4)


def test_static_layout_with_padded_heads_masks_the_padding():
    """A static buffer over per-head padded rows: the mask hides padding and rows past each query's position."""
    c = PressedKV(None, NL, B, H, D, 3, torch.float32, "cpu", static=True, fixed_cap=4)
    valid = torch.tensor([[[True, False, True], [True, True, True]]])
    pos = torch.tensor([[[0, 0, 2], [0, 1, 2]]], dtype=torch.int32)
    for i in range(NL):
        c._lay_out(i, [Rows(rows(0, 3), rows(0, 3, sign=-1.0), pos, valid)])
    c.pos.fill_(3)
    c.source_len = 3
    c.begin(1)
    c.update(0, rows(3, 1), rows(3, 1, sign=-1.0))
    m = c.attn_mask
    assert c.attn_lens is None and m.shape == (B, H, 1, 7)
    assert m[0, 0, 0].tolist() == [True, False, True, True, False, False, False]
    assert m[0, 1, 0].tolist() == [True, True, True, True, False, False, False]


# ------------------------------------------------------------------------------------------------- transformers
def test_hf_mask_offset_after_eviction():
    """transformers sizes the attention mask from ``get_mask_sizes``: kv_length = rows held + new rows, and the offset
    = tokens seen - rows held, so that a new row's index plus the offset is its absolute position."""
    from mspeckv.hf import MSpecKVCache, cache_argument
    from tests.tiny import tiny_pair

    hf, _ = tiny_pair("llama")
    ids = torch.randint(3, 97, (1, 20), generator=torch.Generator().manual_seed(0))
    cache = MSpecKVCache(hf, press="streaming:budget=8,sinks=2", max_len=64)
    assert cache.get_mask_sizes(5) == (5, 0) and cache.get_seq_length() == 0
    with torch.no_grad():
        hf(ids, **{cache_argument(hf): cache})
        assert cache.compressed and cache.inner.length() == 8 and cache.get_seq_length() == 20
        assert cache.get_mask_sizes(1) == (9, 12) and cache.get_mask_sizes(torch.arange(3)) == (11, 12)
        hf(ids[:, :1], **{cache_argument(hf): cache})
        assert cache.get_mask_sizes(1) == (10, 12) and cache.get_seq_length() == 21
    cache.crop(-1)
    assert cache.get_seq_length() == 20 and cache.get_mask_sizes(2) == (10, 12)
    # no press: no offset
    plain = MSpecKVCache(hf, max_len=64)
    with torch.no_grad():
        hf(ids, **{cache_argument(hf): plain})
    assert plain.get_mask_sizes(1) == (21, 0)
    plain.crop(15)  # transformers 4.x style: keep the first 15
    assert plain.get_seq_length() == 15


def test_memory_report_by_hand():
    """Direct layer 0 on the device, layer 1 offloaded; 20 tokens pressed to 5 rows each; a tail of 6."""
    src = filled(20)
    c = PressedKV(StreamingLLMPress(budget=5, sinks=2), NL, B, H, D, 6, torch.float32, "cpu", inner=src,
                  offload=frozenset({1}))
    with pytest.raises(RuntimeError, match="before compress"):
        c.bytes_per_token()
    assert c.memory_report()["compressed"] is False and c.length() == 20 and c.capacity() == 64
    c.compress()
    row = 2 * B * H * D * 4  # K and V of one token, fp32
    store = 5 * row + B * H * 5 * 4  # + int32 positions
    r = c.memory_report()
    assert (r["store_bytes"], r["store_bytes_gpu"], r["store_bytes_cpu"]) == (2 * store, store, store)
    assert r["tail_bytes"] == NL * 6 * row and r["rows_kept"] == 10 and r["tokens"] == 20
    assert r["scratch_bytes"] == (5 + 6) * row  # one layer's worth: the largest scratch layer's rows + the tail
    assert r["static_slack_bytes"] == 0 and r["shared_bytes"] == 0 and r["compressions"] == 1
    assert r["kv_bytes"] == 2 * store + NL * 6 * row + 11 * row
    assert r["bytes_per_token"] == 2 * store / 20 and r["full_bytes_per_token"] == NL * row
    assert r["compression"] == NL * row / (2 * store / 20) and r["press"] == "streaming:budget=5,sinks=2"
    assert c.capacity() == 5 + 6 and c.store_bytes(1) == store
    # the static layout reports the rows it allocates but does not hold
    s = PressedKV.build(StreamingLLMPress(budget=5, sinks=2), src, [], tail=6, static=True, fixed_cap=8)
    assert s.memory_report()["static_slack_bytes"] == NL * 3 * row


def test_errors_and_bookkeeping():
    with pytest.raises(ValueError, match="at least one appended row, got tail=0"):
        PressedKV(None, NL, B, H, D, 0, torch.float32, "cpu")
    with pytest.raises(ValueError, match="compress_every must be in \\[1, tail=4\\], got 5"):
        PressedKV(None, NL, B, H, D, 4, torch.float32, "cpu", compress_every=5)
    with pytest.raises(ValueError, match="compress_every must be in"):
        PressedKV(None, NL, B, H, D, 4, torch.float32, "cpu", compress_every=0)
    PressedKV(None, NL, B, H, D, 4, torch.float32, "cpu", compress_every=4)
    with pytest.raises(ValueError, match="fixed_cap >= 1 and no offloaded layers"):
        PressedKV(None, NL, B, H, D, 4, torch.float32, "cpu", static=True, fixed_cap=0)
    with pytest.raises(ValueError, match="fixed_cap >= 1 and no offloaded layers"):
        PressedKV(None, NL, B, H, D, 4, torch.float32, "cpu", static=True, fixed_cap=4, offload=frozenset({0}))
    # built empty with compress_every: rows arrive in the tail and are re-pressed when it would overflow
    c = PressedKV(StreamingLLMPress(budget=4, sinks=1), NL, B, H, D, 6, torch.float32, "cpu", compress_every=6)
    assert c.compressed and c.length() == 0 and c.next_position() == 0
    forward(c, 0, 5)
    assert c.compressions == 0 and c.n_tail == 5
    forward(c, 5, 2)  # 5 + 2 > 6: re-pressed first (keeps 4 of 5), then appended
    assert c.compressions == 1 and tokens(c.read(0)[0]) == [0, 2, 3, 4, 5, 6] and c.next_position() == 7
    with pytest.raises(RuntimeError, match="inside a forward"):
        c.begin(1)
        c.compress()
    c.abort()
    c.skip(3)  # the tail is pressed first, so positions stay contiguous
    assert c.next_position() == 10 and c.n_tail == 0 and c.positions(0)[0, 0].tolist() == [0, 4, 5, 6]
    with pytest.raises(ValueError, match="skip\\(-1\\)"):
        c.skip(-1)
    with pytest.raises(RuntimeError, match="needs a compressed cache"):
        PressedKV(None, NL, B, H, D, 4, torch.float32, "cpu", inner=filled(4)).append_external([])
    c2 = PressedKV(None, NL, B, H, D, 4, torch.float32, "cpu")
    with pytest.raises(ValueError, match="need one \\(k, v\\) per layer \\(2\\), got 1"):
        c2.append_external([(rows(0, 1), rows(0, 1))])
    c2.append_external([(rows(0, 0), rows(0, 0))] * NL)  # nothing to append
    assert c2.n_tail == 0
    from mspeckv.kv.base import CacheFullError

    with pytest.raises(CacheFullError, match="exceed its tail of 4"):
        c2.begin(5)


# ------------------------------------------------------------------------------------------------- edges (issue 29)
# Written for the survivors of the kv_pressed mutation run (results/tests/mutation/survivors.md): every value by hand.
def test_constructor_bounds_are_inclusive_and_the_refusals_read_in_full():
    c = PressedKV(None, NL, B, H, D, 1, torch.float32, "cpu", compress_every=1)  # tail 1, compress_every 1: legal
    assert c.capacity() == 1 and c.length() == 0 and c.n_fixed == [0, 0]  # fixed_cap defaults to 0
    s = PressedKV(None, NL, B, H, D, 2, torch.float32, "cpu", static=True, fixed_cap=1)
    assert s.capacity() == 1 + 2 and s.buf[0].shape == (2, B, H, 3, D)
    with pytest.raises(ValueError, match="^a static \\(CUDA-graph\\) pressed cache needs fixed_cap >= 1 and no "
                                         "offloaded layers$"):
        PressedKV(None, NL, B, H, D, 4, torch.float32, "cpu", static=True, fixed_cap=0)
    with pytest.raises(ValueError, match="^kivi:v_bits=2,group_size=8,residual=5: a CUDA-graph \\(static\\) "
                                         "cache holds dense rows only; this press stores codes or latents, so run its "
                                         "level eagerly \\(graphs off\\)$"):
        PressedKV.build(KIVIPress(k_bits=4, v_bits=2, group_size=8, residual=5), filled(24), [], tail=4, static=True,
                        fixed_cap=32)
    with pytest.raises(ValueError, match="^per-head padded rows \\(head-adaptive budgets\\) must be the press's only "
                                         "store$"):
        valid = torch.ones(B, H, 2, dtype=torch.bool)
        pos = torch.zeros(B, H, 2, dtype=torch.int32)
        c._lay_out(0, [Rows(rows(0, 2), rows(0, 2), pos, valid), Rows(rows(2, 2), rows(2, 2), pos)])
    # built from an empty source: no rows kept, so the capacity is the tail alone
    e = PressedKV.build(None, filled(0), [], tail=4)
    assert e.n_fixed == [0, 0] and e.capacity() == 4 and e.next_position() == 0


def test_press_observers_stay_the_press_own():
    """An observer attached to the cache later is not one of the press's (it would be handed to the press and dropped
    with them); ``build`` watches nothing itself: the source's prefill was watched by ``obs``."""
    from mspeckv.kv.base import LastQueries
    from mspeckv.presses import H2OPress

    c = PressedKV(H2OPress(budget=4), NL, B, H, D, 4, torch.float32, "cpu", inner=filled(8))
    (mass,) = c.press_obs
    assert c.observers == [mass]
    extra = LastQueries(NL)
    c.observers.append(extra)
    assert c.press_obs == [mass] and c.observers == [mass, extra]
    mass.mass = [torch.arange(8.0).expand(B, H, 8) for _ in range(NL)]  # what a prefill would have left
    b = PressedKV.build(H2OPress(budget=4, sinks=1, window=1), filled(8), [mass], tail=4)
    assert b.observers == [] and b.press_obs == [mass] and tokens(b.read(1)[0], 1) == [0, 5, 6, 7]


def test_before_compress_every_call_goes_to_the_inner_cache():
    c = PressedKV(StreamingLLMPress(budget=5, sinks=2), NL, B, H, D, 6, torch.float32, "cpu", inner=filled(20))
    assert tokens(c.read(1)[0], 1) == list(range(20)) and c.positions(1)[0, 1].tolist() == list(range(20))
    c.rollback(3)
    assert c.next_position() == 17 and c.length() == 17 and tokens(c.read(0)[0]) == list(range(17))
    with pytest.raises(ValueError, match="^skip\\(1\\) needs n >= 0, a compressed cache and no forward in progress$"):
        c.skip(1)
    c.compress()
    assert tokens(c.read(0)[0]) == [0, 1, 14, 15, 16]
    c.skip(0)  # skipping nothing is legal and changes nothing
    assert c.next_position() == 17 and c.compressions == 1
    c.rollback(0)  # so is rolling back nothing
    assert c.n_tail == 0 and c.pos.tolist() == [5, 5]
    c.begin(1)
    with pytest.raises(RuntimeError, match="begin\\(\\) called twice"):
        c.begin(1)
    with pytest.raises(ValueError, match="^skip\\(2\\) needs"):
        c.skip(2)
    c.abort()
    with pytest.raises(RuntimeError, match="^append_external\\(\\) needs a compressed cache and no forward in "
                                           "progress$"):
        c.begin(1)
        c.append_external([(rows(17, 1, i), rows(17, 1, i, -1.0)) for i in range(NL)])


def test_compress_every_fills_the_tail_exactly_before_re_pressing():
    c = PressedKV(StreamingLLMPress(budget=4, sinks=1), NL, B, H, D, 6, torch.float32, "cpu", compress_every=6)
    forward(c, 0, 5)
    forward(c, 5, 1)  # 5 + 1 == 6: fits, no re-press
    assert c.compressions == 0 and c.n_tail == 6 and tokens(c.read(1)[0], 1) == list(range(6))
    forward(c, 6, 1)  # 6 + 1 > 6: re-pressed to 4 rows first
    assert c.compressions == 1 and tokens(c.read(0)[0]) == [0, 3, 4, 5, 6] and c.n_tail == 1


def test_stores_are_views_of_the_kept_rows():
    c = PressedKV.build(StreamingLLMPress(budget=5, sinks=2), filled(20), [], tail=6)
    (st,) = c.stores[1]
    assert tokens(st.k, 1) == [0, 1, 17, 18, 19] and tokens(-st.v, 1) == [0, 1, 17, 18, 19]
    assert st.k.data_ptr() == c.buf[1][0].data_ptr() and st.pos[0, 0].tolist() == [0, 1, 17, 18, 19]


@pytest.mark.parametrize("press", ["streaming", "kivi"])
def test_buffers_hold_the_cache_dtype_and_the_bytes_reported(press):
    """bf16: what a forward and read() return, and every buffer, are bf16; the tail/scratch bytes of memory_report
    are the bytes allocated (direct: one buffer of kept rows + tail per layer; scratch: the tail, plus one shared
    scratch of the largest layer's rows + the tail)."""
    p = StreamingLLMPress(budget=5, sinks=2) if press == "streaming" else \
        KIVIPress(k_bits=4, v_bits=2, group_size=8, residual=5)
    c = PressedKV.build(p, filled(24, torch.bfloat16), [], tail=6)
    row = 2 * B * H * D * 2  # K and V of one token, bf16
    (kv0, kv1), _ = forward(c, 24, 2)
    assert {x.dtype for x in (*kv0, *kv1, *c.read(0), *c.read(1))} == {torch.bfloat16}
    assert tokens(kv1[0][:, :, -3:], 1) == [23, 24, 25]
    nbytes = [b.numel() * b.element_size() for b in c.buf]
    r = c.memory_report()
    if press == "streaming":
        assert c.direct == [True, True] and nbytes == [(5 + 6) * row] * NL and c.scratch is None
        assert r["tail_bytes"] == NL * 6 * row and r["scratch_bytes"] == 0
    else:
        assert c.direct == [False, False] and nbytes == [6 * row] * NL == [r["tail_bytes"] // NL] * NL
        assert c.scratch.dtype == torch.bfloat16 and r["scratch_bytes"] == (24 + 6) * row


def test_scratch_grows_with_the_rows_and_is_kept_when_their_count_is():
    """KIVI keeps every row (quantized groups + full-precision rest): 24 rows -> scratch of 24 + 4; after 2 more and a
    re-press, 26 + 4 (a 3-row forward then writes rows 26..28); a re-press to the same count keeps the tensor."""
    c = PressedKV.build(KIVIPress(k_bits=4, v_bits=2, group_size=8, residual=5), filled(24), [], tail=4)
    assert c.scratch.shape == (2, B, H, 28, D)
    forward(c, 24, 2)
    c.compress()
    s1 = c.scratch
    assert c.n_fixed == [26, 26] and s1.shape == (2, B, H, 30, D)
    c.compress()
    assert c.scratch is s1
    (kv0, kv1), _ = forward(c, 26, 3)
    assert kv0[0].shape[2] == 29 and tokens(kv0[0][:, :, 16:]) == list(range(16, 29))
    assert tokens(-kv1[1][:, :, 16:], 1) == list(range(16, 29))


def test_padded_heads_on_the_second_forward_and_in_the_store():
    """As test_padded_heads_are_masked_per_head, then a forward of one more row: it sits at view index 3 + 2 = 5. The
    padded store keeps its valid mask (counted in its bytes: one bool per row and head)."""
    c = PressedKV(None, NL, B, H, D, 4, torch.float32, "cpu")
    valid = torch.tensor([[[True, True, False], [True, True, True]]])
    pos = torch.tensor([[[0, 5, 0], [1, 2, 5]]], dtype=torch.int32)
    for i in range(NL):
        c._lay_out(i, [Rows(rows(0, 3), rows(0, 3, sign=-1.0), pos, valid)])
    c.source_len = 6
    assert torch.equal(c.stores[0][0].valid, valid)
    assert c.store_bytes(0) == 2 * B * H * 3 * D * 4 + B * H * 3 * 4 + B * H * 3
    forward(c, 6, 2)
    _, m = forward(c, 8, 1)
    assert m.shape == (B, H, 1, 6)
    assert m[0, 0].tolist() == [[True, True, False, True, True, True]]
    assert m[0, 1].tolist() == [[True] * 6]


def test_static_re_layout_without_padding_shows_every_row_again():
    """A static layer laid out with per-head padding, then re-laid out (a re-press) with every row valid: the padding
    mask of the first layout must not survive into the second."""
    c = PressedKV(None, NL, B, H, D, 3, torch.float32, "cpu", static=True, fixed_cap=4)
    valid = torch.tensor([[[True, False, True], [True, True, True]]])
    pos = torch.tensor([[[0, 0, 2], [0, 1, 2]]], dtype=torch.int32)
    for i in range(NL):
        c._lay_out(i, [Rows(rows(0, 3), rows(0, 3, sign=-1.0), pos, valid)])
    c._lay_out(0, [Rows(rows(0, 3), rows(0, 3, sign=-1.0), torch.arange(3).expand(B, H, 3).int())])
    c.pos.fill_(3)
    c.source_len = 3
    c.begin(1)
    c.update(0, rows(3, 1), rows(3, 1, sign=-1.0))
    assert c.attn_mask[0, 0, 0].tolist() == [True, True, True, True, False, False, False]
    c.update(1, rows(3, 1, 1), rows(3, 1, 1, -1.0))  # layer 1 keeps its padding
    assert c.attn_mask[0, 0, 0].tolist() == [True, False, True, True, False, False, False]
    c.end()


def test_static_lengths_are_int32():
    c = PressedKV.build(StreamingLLMPress(budget=5, sinks=2), filled(20), [], tail=6, static=True, fixed_cap=8)
    c.begin(2)
    c.update(0, rows(20, 2), rows(20, 2, sign=-1.0))
    assert c.attn_lens.dtype == torch.int32 and c.attn_lens.tolist() == [6, 7]  # what the Triton kernel reads
    c.abort()


def test_memory_report_of_a_batch_of_two_static_unpressed_cache():
    """Batch 2, no press, static buffers of 24 fixed rows for 20 tokens: 4 unused rows per layer are slack."""
    b = 2
    c = PressedKV.build(None, filled(20, b=b), [], tail=6, static=True, fixed_cap=24)
    row = 2 * b * H * D * 4
    store = 20 * row + b * H * 20 * 4
    r = c.memory_report()
    assert r["compressed"] is True and r["press"] is None and r["rows_kept"] == 40 and r["tokens"] == 20
    assert (r["store_bytes"], r["store_bytes_gpu"], r["store_bytes_cpu"]) == (2 * store, 2 * store, 0)
    assert r["tail_bytes"] == NL * 6 * row and r["scratch_bytes"] == 0 and r["static_slack_bytes"] == NL * 4 * row
    assert r["kv_bytes"] == 2 * store + NL * 6 * row + NL * 4 * row
    assert r["full_bytes_per_token"] == NL * row and type(r["full_bytes_per_token"]) is int
    assert r["bytes_per_token"] == 2 * store / 20


def test_memory_report_edges_one_token_and_none():
    one = PressedKV.build(None, filled(1), [], tail=4)
    assert one.bytes_per_token() == NL * (2 * B * H * D * 4 + B * H * 4)  # one token: divided by 1
    empty = PressedKV(None, NL, B, H, D, 4, torch.float32, "cpu")
    r = empty.memory_report()
    assert r["bytes_per_token"] == 0 and r["compression"] is None and r["tokens"] == 0
    with pytest.raises(RuntimeError, match="^bytes_per_token\\(\\) before compress\\(\\): nothing is pressed yet$"):
        PressedKV(None, NL, B, H, D, 4, torch.float32, "cpu", inner=filled(2)).bytes_per_token()


def test_shared_projections_are_counted_once():
    """Two layers' low-rank stores over one (H, D, r) projection: shared_bytes counts it once, and kv_bytes adds it."""
    from mspeckv.kv.stores import LowRank

    r_ = 4
    proj = torch.randn(H, D, r_, generator=torch.Generator().manual_seed(0))
    c = PressedKV(None, NL, B, H, D, 4, torch.float32, "cpu")
    pos = torch.arange(3).expand(B, H, 3)
    for i in range(NL):
        c._lay_out(i, [LowRank.encode(rows(0, 3, i), rows(0, 3, i, -1.0), pos, proj, None, None)])
    c.source_len = 3
    c._alloc_scratch()
    store = B * H * 3 * r_ * 4 + B * H * 3 * D * 4 + B * H * 3 * 4  # V latents + K rows + int32 positions
    row = 2 * B * H * D * 4
    r = c.memory_report()
    assert c.shared_bytes() == H * D * r_ * 4 == r["shared_bytes"] and c.store_bytes() == NL * store
    assert r["scratch_bytes"] == (3 + 4) * row
    assert r["kv_bytes"] == NL * store + H * D * r_ * 4 + NL * 4 * row + (3 + 4) * row


def test_every_tensor_follows_the_cache_device():
    """A cache on 'meta' (shapes only: no data, no GPU needed): every buffer, view, mask, length and position it makes
    is on 'meta' too. A tensor made without the cache's device lands on the CPU, and shows here or fails to mix."""
    M = "meta"

    def e(n):
        return torch.empty(B, H, n, D, device=M)

    def meta_forward(c, n):
        c.begin(n)
        out = [t for i in range(NL) for t in (*c.update(i, e(n), e(n)), c.attn_mask, c.attn_lens) if t is not None]
        c.end()
        return out

    # direct layout, built empty, re-pressed by compress_every
    c = PressedKV(StreamingLLMPress(budget=4, sinks=1), NL, B, H, D, 6, torch.float32, M, compress_every=6)
    got = meta_forward(c, 5) + meta_forward(c, 2)
    assert c.compressions == 1
    got += [c.pos, *c.read(0), c.positions(1), *c.buf, *(x for s in c.stores[0] for x in (s.k, s.v, s.pos))]
    # scratch layout: KIVI over a meta source
    src = DenseKV(NL, B, H, D, 64, torch.float32, M)
    src.begin(24)
    for i in range(NL):
        src.update(i, e(24), e(24))
    src.end()
    q = PressedKV.build(KIVIPress(k_bits=4, v_bits=2, group_size=8, residual=5), src, [], tail=4)
    got += meta_forward(q, 2) + [q.scratch, *q.buf, *q.read(1), q.positions(0)]
    # per-head padding, eager and static; the static layout's lengths
    valid = torch.ones(B, H, 3, dtype=torch.bool, device=M)
    pos = torch.zeros(B, H, 3, dtype=torch.int32, device=M)
    for static in (False, True):
        p = PressedKV(None, NL, B, H, D, 3, torch.float32, M, static=static, fixed_cap=4)
        for i in range(NL):
            p._lay_out(i, [Rows(e(3), e(3), pos, valid)])
        p.source_len = 3
        p.pos.fill_(3)
        got += meta_forward(p, 1)
    s = PressedKV(StreamingLLMPress(budget=4, sinks=1), NL, B, H, D, 3, torch.float32, M, static=True, fixed_cap=4)
    got += meta_forward(s, 2)
    assert s.attn_lens is not None and {t.device.type for t in got} == {"meta"}
