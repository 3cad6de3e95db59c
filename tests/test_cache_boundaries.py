"""Every cache at its edges: rollback of exactly the safe count and of one more, capacity exactly full and one
over, and the quantization group / flush boundaries of the offloaded cache."""

import pytest
import torch

from mspeckv.kv.base import CacheFullError
from mspeckv.kv.dense import DenseKV
from mspeckv.kv.offload import PlacedKV
from mspeckv.kv.placement import Placement
from mspeckv.kv.quant import QuantSpec, qt_slice, quantize_keys, quantize_values
from mspeckv.kv.static import StaticKV, StaticStreaming
from mspeckv.kv.streaming import StreamingCache

H, D = 2, 4


def kv(n, layers=2, p0=0):
    """Rows whose value is their absolute position, (1, H, n, D) per layer."""
    x = torch.arange(p0, p0 + n, dtype=torch.float32).view(1, 1, n, 1).expand(1, H, n, D).clone()
    return [(x, -x) for _ in range(layers)]


def fwd(c, n, p0=None):
    p0 = c.length() if p0 is None else p0
    c.begin(n)
    out = [c.update(i, k, v) for i, (k, v) in enumerate(kv(n, c.n_layers, p0))]
    c.end()
    return out


def held(c, layer=0):
    return c.read(layer)[0][0, 0, :, 0].long().tolist()


# ----------------------------------------------------------------------------------------- dense and static

@pytest.mark.parametrize("make", [lambda: DenseKV(2, 1, H, D, 10, torch.float32, "cpu"),
                                  lambda: StaticKV(2, 1, H, D, 10, 1, torch.float32, "cpu")], ids=["dense", "static"])
def test_full_cache_capacity_and_rollback_edges(make):
    c = make()
    fwd(c, 4)
    with pytest.raises(CacheFullError):
        c.begin(7)  # 4 + 7 = 11 > 10: one over
    assert c.length() == 4
    fwd(c, 6)  # exactly full
    assert c.length() == 10 == c.capacity() and held(c) == list(range(10))
    with pytest.raises(CacheFullError):
        c.begin(1)
    with pytest.raises(ValueError, match="rollback"):
        c.rollback(11)  # one more than held
    assert c.length() == 10
    c.rollback(10)  # exactly everything
    assert c.length() == 0
    c.rollback(0)
    with pytest.raises(ValueError, match="rollback"):
        c.rollback(1)
    with pytest.raises(ValueError, match="rollback"):
        c.rollback(-1)
    fwd(c, 10)
    assert held(c) == list(range(10))


def test_static_attention_mask_edges():
    c = StaticKV(1, 1, H, D, 8, 1, torch.float32, "cpu")
    fwd(c, 3)
    c.begin(2)
    m = c.attn_mask
    assert m.tolist() == [[True] * 4 + [False] * 4, [True] * 5 + [False] * 3]  # row i sees keys <= its position
    c.abort()
    assert c.length() == 3 and int(c.pos) == 3


# -------------------------------------------------------------------------------------------------- streaming

def test_streaming_eviction_and_room_edges():
    c = StreamingCache(2, 1, H, D, window=4, sinks=2, room=3, slack=1)  # capacity 10
    for _ in range(3):
        fwd(c, 3, c.n_seen)  # 9 held
    fwd(c, 1, c.n_seen)  # 9 + 1 = 10: exactly full, no eviction
    assert c.n_evicted == 0 and c.length() == 10
    fwd(c, 1, c.n_seen)  # one over: evict to sinks + window, then append
    assert c.n_evicted == 4 and held(c) == [0, 1, 6, 7, 8, 9, 10] and c.positions() == held(c)
    # rollback exactly what was appended since the eviction (the evicting forward's 1 token), then one more
    c.rollback(1)
    with pytest.raises(ValueError, match="crosses an eviction"):
        c.rollback(1)
    with pytest.raises(CacheFullError, match="room of 3"):
        c.begin(4)  # one over the room
    c.reserve(4)  # room + slack exactly
    with pytest.raises(ValueError, match="room \\+ slack"):
        c.reserve(5)
    fwd(c, 3, c.n_seen)  # room exactly
    assert c.positions() == held(c) and c.positions()[-1] == c.n_seen - 1


def test_streaming_reserve_only_evicts_when_needed():
    c = StreamingCache(1, 1, H, D, window=4, sinks=2, room=3, slack=1)
    fwd(c, 3, 0)
    fwd(c, 3, 3)  # 6 held, capacity 10
    c.reserve(4)  # 6 + 4 = 10: fits exactly, nothing evicted
    assert c.n_evicted == 0 and c.length() == 6
    fwd(c, 1, 6)
    c.reserve(4)  # 7 + 4 = 11: evict now
    assert c.n_evicted == 1 and held(c) == [0, 1, 3, 4, 5, 6]


def test_streaming_skip_keeps_positions_true():
    c = StreamingCache(1, 1, H, D, window=4, sinks=2, room=4, slack=0)
    fwd(c, 2, 0)
    c.skip(10)  # the StreamingLLM prefill drops the middle of the prompt
    fwd(c, 4, 12)
    assert c.positions() == [0, 1, 12, 13, 14, 15] == held(c) and c.n_seen == 16 and c.n_evicted == 10
    with pytest.raises(ValueError, match="skip"):
        c.skip(1)  # window rows already held


def test_static_streaming_compaction_and_floor_edges():
    c = StaticStreaming(1, 1, H, D, 2 + 4 + 2, 1, torch.float32, "cpu", sinks=2, window=4, room=2)
    for t in range(8):
        fwd(c, 1, t)  # exactly full: no compaction
    assert c.n_evicted == 0 and held(c) == list(range(8))
    c.rollback(8)  # no compaction yet: everything can be rolled back
    for t in range(8):
        fwd(c, 1, t)
    c.reserve(1)  # one over: compact to sinks + window
    assert c.n_evicted == 2 and held(c) == [0, 1, 4, 5, 6, 7]
    fwd(c, 1, 8)
    fwd(c, 1, 9)
    c.rollback(2)  # exactly back to the compaction floor
    with pytest.raises(ValueError, match="crosses a compaction"):
        c.rollback(1)
    with pytest.raises(CacheFullError):
        c.reserve(3)  # more than the room after compaction


# ------------------------------------------------------------------------------------------- offloaded (PlacedKV)

def placed(fmt="none", g=4, slack=2, max_len=40):
    p = Placement(on_chip=1, kv_quant=fmt, kv_group_size=g, rollback_slack=slack)
    return PlacedKV(2, H, D if fmt == "none" else 8, p, 1, max_len, torch.float32, "cpu")


@pytest.mark.parametrize("fmt", ["none", "int8"])
def test_placed_flush_boundary_and_rollback_edges(fmt):
    """Single-token forwards: at each begin, whole groups older than the slack are flushed, i.e. flushed becomes
    g * floor((length - slack) / g); exactly length - flushed tokens can be rolled back, one more is refused."""
    g, slack = 4, 2
    c = placed(fmt, g, slack)
    Dh = c.D
    per_token = H * Dh * 2 * (4 if fmt == "none" else 1 + 4 / g)  # K and V bytes of one token in the store
    flushed_before = 0
    for t in range(20):
        L0 = c.length()
        c.begin(1)
        for i in range(2):
            x = torch.full((1, H, 1, Dh), float(t))
            c.update(i, x, -x)
        c.end()
        exp = max(0, (L0 - slack) // g * g)
        assert c.flushed == exp, (t, c.flushed, exp)
        assert c.stats.d2h_bytes == pytest.approx(exp * per_token)  # one offloaded layer; each group sent once
        if c.flushed != flushed_before:
            assert c.flushed - flushed_before == g  # one whole group at a time
        flushed_before = c.flushed
    safe = c.length() - c.flushed
    assert slack <= safe < slack + g + 1
    with pytest.raises(ValueError, match="rollback_slack"):
        c.rollback(safe + 1)
    c.rollback(safe)
    assert c.length() == c.flushed
    k1 = c.read(1)[0]
    assert k1.shape[2] == c.flushed
    if fmt == "none":
        assert k1[0, 0, :, 0].tolist() == [float(t) for t in range(c.flushed)]


def test_placed_capacity_edges():
    c = placed(max_len=10)
    c.begin(10)  # exactly full in one (prefill-like) forward
    for i in range(2):
        c.update(i, torch.zeros(1, H, 10, D), torch.zeros(1, H, 10, D))
    c.end()
    with pytest.raises(CacheFullError):
        c.begin(1)
    assert c.length() == 10 and c.flushed == 8  # a forward longer than the slack flushes its own whole groups


def test_quant_group_boundaries():
    """Keys are quantized in groups of g tokens (per channel): T must be a multiple of g, and slices must be
    group-aligned; values group along the head dim."""
    spec = QuantSpec("int4", 4)
    k = quantize_keys(torch.randn(1, H, 8, 8), spec)
    assert qt_slice(k, 4, 8).shape == (1, H, 4, 8)  # exactly one group
    with pytest.raises(ValueError):
        qt_slice(k, 3, 8)  # one token off the group boundary
    with pytest.raises(ValueError):
        qt_slice(k, 4, 9)  # one past the end
    with pytest.raises(ValueError):
        quantize_keys(torch.randn(1, H, 7, 8), spec)  # one short of a whole group
    v = quantize_values(torch.randn(1, H, 3, 8), spec)
    assert qt_slice(v, 1, 2).shape == (1, H, 1, 8)  # values slice at any token
    with pytest.raises(ValueError):
        quantize_values(torch.randn(1, H, 3, 6), spec)  # head dim not a multiple of the group


# ------------------------------------------------------------------ constructor edges, dtypes, misuse (mutation gaps)

def test_streaming_constructor_edges_and_misuse():
    c = StreamingCache(1, 1, H, D, window=1, sinks=0, room=1)  # the smallest legal cache
    assert c.capacity() == 0 + 1 + 1 + 0  # default slack = window // 4
    assert StreamingCache(1, 1, H, D, window=8, sinks=2, room=3).capacity() == 2 + 8 + 3 + 2
    for kw, msg in ((dict(sinks=-1), "sinks must be >= 0, got -1"), (dict(window=0), "window must be >= 1, got 0"),
                    (dict(room=0), "room must be >= 1"), (dict(slack=-1), "slack must be >= 0, got -1")):
        with pytest.raises(ValueError, match=msg):
            StreamingCache(1, 1, H, D, **{"window": 4, "sinks": 2, "room": 2, **kw})
    c = StreamingCache(1, 1, H, D, window=4, sinks=2, room=3, slack=1)
    c.begin(1)
    with pytest.raises(RuntimeError, match="called twice"):
        c.begin(1)
    with pytest.raises(RuntimeError, match="reserve\\(\\) inside a forward"):
        c.reserve(1)
    with pytest.raises(RuntimeError, match="skip\\(\\) inside a forward"):
        c.skip(1)
    c.abort()
    c.skip(0)
    c.skip(3)
    c.skip(2)  # accumulates
    assert c.n_seen == 5 and c.n_evicted == 5 and c.length() == 0
    with pytest.raises(ValueError, match="skip\\(-1\\)"):
        c.skip(-1)


def test_streaming_reserve_exact_fit_with_droppable_rows():
    c = StreamingCache(1, 1, H, D, window=4, sinks=2, room=3, slack=1)  # capacity 10
    for t in range(7):
        fwd(c, 1, t)
    c.reserve(3)  # 7 + 3 = 10: fits, although one row could be dropped
    assert c.n_evicted == 0 and c.length() == 7


def test_static_streaming_constructor_and_repeated_compaction():
    StaticStreaming(1, 1, H, D, 0 + 1 + 1, 1, torch.float32, "cpu", sinks=0, window=1, room=1)  # smallest legal
    for s, w, r in ((-1, 2, 2), (1, 0, 3), (1, 3, 0)):
        with pytest.raises(ValueError, match="streaming cache needs sinks >= 0, window >= 1, room >= 1"):
            StaticStreaming(1, 1, H, D, 4, 1, torch.float32, "cpu", sinks=s, window=w, room=r)
    with pytest.raises(ValueError, match="capacity must equal sinks \\+ window \\+ room"):
        StaticStreaming(1, 1, H, D, 7, 1, torch.float32, "cpu", sinks=1, window=3, room=2)
    c = StaticStreaming(1, 1, H, D, 1 + 3 + 2, 1, torch.float32, "cpu", sinks=1, window=3, room=2)
    for t in range(6):
        fwd(c, 1, t)
    c.reserve(2)  # compact: sink 0 + the newest 3 (3, 4, 5), then exactly full again with 2 more
    assert held(c) == [0, 3, 4, 5] and c.n_evicted == 2
    fwd(c, 2, 6)
    assert c.length() == 6 == c.capacity()
    c.reserve(1)  # second compaction: evictions accumulate
    assert held(c) == [0, 5, 6, 7] and c.n_evicted == 4


def test_for_model_takes_dtype_device_batch_and_groups_from_the_model():
    from tests.tiny import tiny_model

    m = tiny_model("llama", dtype=torch.float64, num_hidden_layers=1)  # 4 query heads over 2 KV heads
    d = DenseKV.for_model(m, 3, 8)
    s = StaticKV.for_model(m, 8)
    st = StreamingCache.for_model(m, 2, window=4)
    ss = StaticStreaming.for_model(m, sinks=1, window=2, room=2, batch=2)
    assert d.k[0].dtype == d.v[0].dtype == s.k[0].dtype == s.v[0].dtype == st.k[0].dtype == ss.v[0].dtype
    assert d.k[0].dtype == torch.float64
    assert d.k[0].shape == (3, 2, 8, 16) and s.k[0].shape == (1, 2, 8, 16) and s.groups == 2
    assert st.k[0].shape[0] == 2 and st.sinks == 16 and st.room == 8 and ss.k[0].shape[0] == 2
    assert DenseKV.for_model(m, 1, 4, dtype=torch.float32).k[0].dtype == torch.float32
    assert StreamingCache.for_model(m, 1, window=4, dtype=torch.float16).v[0].dtype == torch.float16
    assert DenseKV(1, 1, H, D, 4, torch.float16, "cpu").v[0].dtype == torch.float16
    assert StaticKV(1, 1, H, D, 4, 1, torch.float16, "cpu").v[0].dtype == torch.float16
    assert DenseKV(1, 1, H, D, 4, torch.float16, "cpu").nbytes() == 2 * 1 * H * 4 * D * 2


def test_streaming_defaults_and_for_model_arguments():
    from tests.tiny import tiny_model

    c = StreamingCache(1, 1, H, D, window=8)
    assert (c.sinks, c.room, c.slack) == (16, 8, 2)
    m = tiny_model("llama", num_hidden_layers=1)
    f = StreamingCache.for_model(m, 1, window=8, sinks=2, room=3, slack=0)
    assert (f.sinks, f.room, f.slack, f.capacity()) == (2, 3, 0, 13)


def test_static_streaming_compaction_when_capacity_is_not_twice_the_window():
    c = StaticStreaming(1, 1, H, D, 1 + 2 + 2, 1, torch.float32, "cpu", sinks=1, window=2, room=2)
    for t in range(5):
        fwd(c, 1, t)
    c.reserve(1)
    assert held(c) == [0, 3, 4] and c.n_evicted == 2
