"""Every cache at its edges: rollback of exactly the safe count and of one more, capacity exactly full and one
over, and the quantization group / flush boundaries of the offloaded cache."""

import pytest
import torch

from mspeckv.cache import streaming_cache
from mspeckv.kv.base import CacheFullError
from mspeckv.kv.dense import DenseKV
from mspeckv.kv.offload import PlacedKV
from mspeckv.kv.placement import Placement
from mspeckv.kv.quant import QuantSpec, qt_slice, quantize_keys, quantize_values
from mspeckv.kv.static import StaticKV

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

class _Tiny:
    class cfg:
        n_layers, n_kv_heads, head_dim = 2, H, D
    dtype, device = torch.float32, torch.device("cpu")


@pytest.mark.parametrize("static", [False, True], ids=["eager", "static"])
def test_streaming_press_tail_and_rollback_edges(static):
    """sinks 2 + window 4, room 3 + slack 1: the tail holds 4 rows; a forward that would overflow it re-presses
    first (down to 2 sinks + the 4 newest), and a rollback reaches back exactly to the last press."""
    c = streaming_cache(_Tiny, sinks=2, window=4, room=3, slack=1, static=static)
    assert c.capacity() == 2 + 4 + 4
    fwd(c, 3, 0)
    fwd(c, 1, 3)  # 4 rows in the tail: exactly full, no press
    assert c.compressions == 0 and held(c) == [0, 1, 2, 3]
    c.rollback(4)  # exactly the appended rows
    with pytest.raises(ValueError, match="only rows appended since the last"):
        c.rollback(1)  # one more
    fwd(c, 3, 0)
    fwd(c, 1, 3)
    fwd(c, 1, 4)  # one over: press (4 rows kept: all fit in sinks + window), then append
    assert c.compressions == 1 and held(c) == [0, 1, 2, 3, 4] and c.n_tail == 1
    for t in range(5, 9):
        fwd(c, 1, t)
    assert held(c)[:2] == [0, 1] and held(c)[-1] == 8 and c.length() <= c.capacity()
    assert c.positions(0)[0, 0].tolist() == held(c)
    c.rollback(c.n_tail)
    with pytest.raises(ValueError, match="only rows appended since the last"):
        c.rollback(1)
    with pytest.raises(CacheFullError, match="tail of 4"):
        fwd(c, 5, c.next_position())  # more than the tail even after a press
    c.reserve(4)  # exactly the tail: press if needed, then 4 rows fit
    fwd(c, 4, c.next_position())


def test_streaming_skip_keeps_positions_true():
    c = streaming_cache(_Tiny, sinks=2, window=4, room=4, slack=0)
    fwd(c, 2, 0)
    c.skip(10)  # the StreamingLLM prefill drops the middle of the prompt
    fwd(c, 4, 12)
    assert c.positions(0)[0, 0].tolist() == [0, 1, 12, 13, 14, 15] == held(c) and c.next_position() == 16
    with pytest.raises(ValueError, match="skip"):
        c.skip(-1)

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
