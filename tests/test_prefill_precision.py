"""A forward attends to its own rows in the precision they were produced in (issue 29, item 1).

A prefill chunk longer than the rollback slack flushes some of its own rows to the quantized store; later forwards
read them quantized, but the chunk itself must not. Three checks: the first forward of a prefill (nothing stored
yet) gives exactly the dense cache's logits; a chunked prefill + verify + decode equals a reference written here
that quantizes only rows of earlier forwards; and an observer on ``PlacedKV.update`` sees every forward's own rows
exactly as it passed them, on the eager and the static layout."""

import functools
import warnings

import pytest
import torch

from mspeckv.cache import make_cache
from mspeckv.kv.dense import DenseKV
from mspeckv.kv.offload import PlacedKV
from mspeckv.kv.placement import Placement
from mspeckv.kv.quant import QuantSpec, dequantize_keys, dequantize_values, quantize_keys, quantize_values
from tests.tiny import tiny_model

G, SLACK = 8, 4
FORMATS = ["int8", "int4", "int2"]
RESIDENT = [(0, "dequant"), (3, "dequant"), (3, "quant")]  # no slots, bf16 slots (read again later), code slots


@functools.cache
def model():
    return tiny_model("llama", num_hidden_layers=4)


def ids_for(m, n=40, B=1, seed=0):
    return torch.randint(3, m.cfg.vocab_size, (B, n), generator=torch.Generator().manual_seed(seed))


def placement(fmt, resident, on_chip=1):
    return Placement(on_chip=on_chip, kv_quant=fmt, kv_group_size=G, rollback_slack=SLACK,
                     resident_layers=resident[0], resident_format=resident[1], resident_policy="static")


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("chunk", [1, SLACK + 1, SLACK + G, 13, 40])
@pytest.mark.parametrize("resident", RESIDENT, ids=lambda r: f"r{r[0]}-{r[1]}")
@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "static"])
def test_first_prefill_forward_equals_dense(fmt, chunk, resident, graphs):
    """Nothing is stored before the first forward, so over every layer offloaded and quantized its logits (every
    position) are the dense cache's, bit for bit, although it flushes up to ``chunk - slack`` of its rows. The
    dense cache of the same layout: a static forward (one that flushes nothing) attends over a padded, masked view
    like ``StaticKV``'s, which sums in another order than ``DenseKV`` (1e-7 apart)."""
    m = model()
    ids = ids_for(m, n=chunk, B=2)
    with torch.no_grad():
        cache = make_cache(m, placement(fmt, resident, on_chip=0), 2, 64, graphs=graphs)
        got = m(ids, cache, num_logits=None)
        static = cache.stats.static_forwards == 1
        assert static == (graphs and chunk < SLACK + G and not resident[0])  # eager: a flush or a slot fill
        dense = lambda: make_cache(m, None, 2, 64, graphs=static)  # StaticKV or DenseKV
        assert torch.equal(got, m(ids, dense(), num_logits=None))
        assert cache.flushed == max(0, (chunk - SLACK) // G * G)  # it did flush its own rows
        # the prefill entry point, one chunk covering the prompt: the same last logits
        cache = make_cache(m, placement(fmt, resident, on_chip=0), 2, 64, graphs=graphs)
        assert torch.equal(m.prefill(ids, cache, chunk=chunk), m.prefill(ids, dense(), chunk))


class EarlierQuantKV(DenseKV):
    """Reference written from the rule, independent of PlacedKV: all rows full-precision, and each forward of n
    tokens at t0 sees, in layers >= ``n_on``, rows [0, min(F, t0)) in their stored form, where F = the flushed
    prefix after this forward: whole groups older than the slack, counting this forward's rows when n > slack.
    Stored form = quantize + dequantize of [0, F) (key groups run along tokens from 0, so one call over [0, F)
    equals the store's group-by-group flushes). Rows of the forward itself are never quantized."""

    def __init__(self, m, spec: QuantSpec, n_on: int, max_len: int = 64):
        c = m.cfg
        super().__init__(c.n_layers, 1, c.n_kv_heads, c.head_dim, max_len, torch.float32, "cpu")
        self.spec, self.n_on, self.flushed = spec, n_on, 0

    def begin(self, n_new: int) -> None:
        super().begin(n_new)
        upto = self._len + (n_new if n_new > SLACK else 0)
        self.target = max(self.flushed, (upto - SLACK) // G * G)

    def update(self, layer, k, v):
        k_all, v_all = (t.clone() for t in super().update(layer, k, v))
        old, F = min(self.target, self._len), self.target
        if layer >= self.n_on and old > 0:
            kq = dequantize_keys(quantize_keys(k_all[:, :, :F], self.spec), self.spec, torch.float32)
            vq = dequantize_values(quantize_values(v_all[:, :, :F], self.spec), self.spec, torch.float32)
            k_all[:, :, :old], v_all[:, :, :old] = kq[:, :, :old], vq[:, :, :old]
        return k_all, v_all

    def end(self) -> None:
        super().end()
        self.flushed = self.target


def run(m, cache, ids, prompt=29, chunk=13, steps=6):
    """Chunked prefill (all logits of every chunk), a 4-token verify forward, then token-by-token decode."""
    outs = []
    with torch.no_grad():
        for s in range(0, prompt, chunk):
            outs.append(m(ids[:, s:min(s + chunk, prompt)], cache, num_logits=None))
        outs.append(m(ids[:, prompt:prompt + 4], cache, num_logits=None))
        for t in range(prompt + 4, prompt + 4 + steps):
            outs.append(m(ids[:, t:t + 1], cache))
    return outs


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("chunk", [3, SLACK + 1, 13, 29])
@pytest.mark.parametrize("resident", RESIDENT, ids=lambda r: f"r{r[0]}-{r[1]}")
def test_chunked_prefill_quantizes_only_earlier_forwards(fmt, chunk, resident):
    m = model()
    ids = ids_for(m)
    p = placement(fmt, resident)
    ref = run(m, EarlierQuantKV(m, p.quant, p.on_chip), ids, chunk=chunk)
    cache = make_cache(m, p, 1, 64)
    got = run(m, cache, ids, chunk=chunk)
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # not vacuous: the reference differs from the dense cache once earlier rows are stored
    dense = run(m, DenseKV.for_model(m, 1, 64), ids, chunk=chunk)
    assert max(float((a - b).abs().max()) for a, b in zip(dense, ref, strict=True)) > 1e-4
    if resident[0]:
        assert cache.memory_report()["resident_hits"] > 0


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("resident", RESIDENT, ids=lambda r: f"r{r[0]}-{r[1]}")
@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "static"])
def test_no_query_sees_its_own_rows_quantized(fmt, resident, graphs, monkeypatch):
    """Observer on every offloaded layer's attention view: the rows of the forward in progress are exactly the
    K/V it passed in, whatever the forward flushes (prefill chunks of 13 and 9, a verify of 4, decode steps)."""
    seen = []
    orig = PlacedKV.update

    def update(self, layer, k, v):
        kk, vv = orig(self, layer, k, v)
        if layer >= self.n_on:
            t0, n = self._len, self._pending
            own = torch.equal(kk[:, :, t0:t0 + n], k) and torch.equal(vv[:, :, t0:t0 + n], v)
            seen.append((self.flush_to > t0, own))
        return kk, vv

    monkeypatch.setattr(PlacedKV, "update", update)
    m = model()
    ids = ids_for(m)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cache = make_cache(m, placement(fmt, resident), 1, 64, graphs=graphs)
    with torch.no_grad():
        m.prefill(ids[:, :22], cache, chunk=13)
        m(ids[:, 22:26], cache, num_logits=None)
        for t in range(26, 36):
            m(ids[:, t:t + 1], cache)
    assert all(ok for _, ok in seen), seen
    assert sum(own for own, _ in seen) >= 3  # the first chunk flushed its own rows in each of the 3 layers
    assert cache.flushed > 0
