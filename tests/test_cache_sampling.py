"""The KV-cache contract (append, view, length, rollback) and seeded sampling."""

import pytest
import torch

from mspeckv.config import GenerationConfig, SamplingConfig
from mspeckv.decoding.autoregressive import generate
from mspeckv.decoding.sampling import logits_to_probs, make_generator, next_token, sample
from mspeckv.kv.base import CacheFullError, KVCache
from mspeckv.kv.dense import DenseKV
from tests.tiny import tiny_model


def kv(t, val=None, B=1, H=2, D=4):
    x = torch.randn(B, H, t, D)
    return (x, x + 1) if val is None else (torch.full((B, H, t, D), val), torch.full((B, H, t, D), -val))


def fwd(cache, layer_kvs):
    """Drive the cache as the model does: begin, update each layer, end."""
    cache.begin(layer_kvs[0][0].shape[2])
    views = [cache.update(i, k, v) for i, (k, v) in enumerate(layer_kvs)]
    cache.end()
    return views


def test_dense_append_view_length():
    c = DenseKV(2, 1, 2, 4, max_len=10, dtype=torch.float32, device="cpu")
    assert isinstance(c, KVCache) and c.length() == 0 and c.capacity() == 10
    a = [kv(3), kv(3)]
    views = fwd(c, a)
    assert c.length() == 3
    torch.testing.assert_close(views[1][0], a[1][0])
    b = [kv(2), kv(2)]
    views = fwd(c, b)
    assert c.length() == 5
    k0, v0 = views[0]
    assert k0.shape == (1, 2, 5, 4)
    torch.testing.assert_close(k0, torch.cat([a[0][0], b[0][0]], 2))  # view = history + new, new rows last
    torch.testing.assert_close(v0, torch.cat([a[0][1], b[0][1]], 2))


def test_dense_rollback_is_byte_identical_to_never_seen():
    c1 = DenseKV(2, 1, 2, 4, max_len=10, dtype=torch.float32, device="cpu")
    c2 = DenseKV(2, 1, 2, 4, max_len=10, dtype=torch.float32, device="cpu")
    a, b = [kv(4), kv(4)], [kv(3), kv(3)]
    fwd(c1, a)
    fwd(c1, b)
    c1.rollback(3)
    fwd(c2, a)
    assert c1.length() == c2.length() == 4
    for x, y in zip(c1.k + c1.v, c2.k + c2.v, strict=True):
        assert torch.equal(x, y)
    with pytest.raises(ValueError, match="rollback"):
        c1.rollback(5)


def test_dense_overflow_and_double_begin():
    c = DenseKV(1, 1, 2, 4, max_len=4, dtype=torch.float32, device="cpu")
    with pytest.raises(CacheFullError, match="holds 4 tokens"):
        c.begin(5)
    c.begin(2)
    with pytest.raises(RuntimeError, match="begin"):
        c.begin(1)


def test_failed_forward_leaves_cache_unchanged():
    m = tiny_model("llama")
    c = DenseKV.for_model(m, 1, 8)
    with pytest.raises(IndexError):
        m(torch.tensor([[1, 2, 500]]), c)  # token id outside the vocabulary
    assert c.length() == 0
    m(torch.tensor([[1, 2, 3]]), c)
    assert c.length() == 3


def test_probs_topk_topp():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    p = logits_to_probs(logits, SamplingConfig(temperature=1.0, top_k=2))
    assert (p[0, 2:] == 0).all() and torch.isclose(p.sum(), torch.tensor(1.0))
    full = logits.softmax(-1)[0]
    p = logits_to_probs(logits, SamplingConfig(temperature=1.0, top_p=0.8))
    keep = int((full.cumsum(0) - full < 0.8).sum())  # smallest prefix whose mass reaches 0.8
    assert (p[0, :keep] > 0).all() and (p[0, keep:] == 0).all()
    g = logits_to_probs(logits, SamplingConfig())
    assert g[0, 0] == 1 and g.sum() == 1


def test_sample_matches_distribution():
    probs = torch.tensor([0.5, 0.3, 0.2, 0.0]).expand(40000, 4).contiguous()
    draws = sample(probs, make_generator("cpu", 0))
    freq = torch.bincount(draws, minlength=4).float() / len(draws)
    assert freq[3] == 0
    torch.testing.assert_close(freq[:3], probs[0, :3], atol=0.01, rtol=0)


def test_seeded_sampling_reproducible():
    m = tiny_model("qwen2")
    ids = torch.randint(3, 97, (2, 9))
    cfg = GenerationConfig(max_new_tokens=12, sampling=SamplingConfig(temperature=0.9, top_p=0.95, seed=7),
                           stop_on_eos=False)
    a = generate(m, ids, cfg).tokens
    b = generate(m, ids, cfg).tokens
    c = generate(m, ids, GenerationConfig(12, SamplingConfig(temperature=0.9, top_p=0.95, seed=8), False)).tokens
    assert a == b and a != c


def test_greedy_generate_matches_manual_argmax_and_stops_on_eos():
    m = tiny_model("llama")
    ids = torch.randint(3, 97, (1, 6))
    res = generate(m, ids, GenerationConfig(max_new_tokens=8, stop_on_eos=False))
    seq = ids.clone()
    for _ in range(8):
        with torch.no_grad():
            nxt = m(seq, DenseKV.for_model(m, 1, 32))[:, -1].argmax(-1)
        seq = torch.cat([seq, nxt[:, None]], 1)
    assert res.tokens[0] == seq[0, 6:].tolist()
    stop = res.tokens[0][3]
    res2 = generate(m, ids, GenerationConfig(max_new_tokens=8), eos_ids=[stop])
    assert res2.tokens[0] == res.tokens[0][: res.tokens[0].index(stop) + 1]


@pytest.mark.parametrize("kw, msg", [(dict(temperature=-1), "temperature"), (dict(top_p=0), "top_p"),
                                     (dict(top_p=1.5), "top_p"), (dict(top_k=-2), "top_k")])
def test_invalid_sampling_values(kw, msg):
    with pytest.raises(ValueError, match=msg):
        SamplingConfig(**kw)


def test_next_token_greedy_is_argmax():
    logits = torch.randn(3, 11)
    assert torch.equal(next_token(logits, SamplingConfig()), logits.argmax(-1))
