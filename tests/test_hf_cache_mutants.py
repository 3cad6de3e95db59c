"""MSpecKVCache (mspeckv.hf.cache) without weights: what it reads from a model's config, the transformers cache
protocol driven by hand (``cache.update(k, v, layer)`` once per layer and forward, as a model's attention does), and
every refusal read in full. Written for the survivors of the ``hf_cache`` mutation run (issue 29); a stand-in model
(a config and ``can_generate``) keeps each test to milliseconds."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from mspeckv.hf import HFSupportError, MSpecKVCache, cache_argument
from mspeckv.kv.placement import Placement

DROP = object()  # a config field left out
H, D = 2, 8  # KV heads and head_dim of the keys fed by hand (hidden_size 32 / 4 heads = 8)


class FakeLM:
    """What MSpecKVCache reads from a model: ``config`` and ``can_generate`` (no weights, no forward)."""

    def __init__(self, **kw):
        cfg = {"num_hidden_layers": 2, "hidden_size": 32, "num_attention_heads": 4, "max_position_embeddings": 64,
               **kw}
        self.config = SimpleNamespace(**{k: v for k, v in cfg.items() if v is not DROP})

    def can_generate(self):
        return True


def kv(t0, n, b=1, heads=H, dtype=torch.float32, device="cpu"):
    """(b, heads, n, D) keys whose entries are their token numbers (values: the negatives)."""
    k = torch.arange(t0, t0 + n, dtype=torch.float32)[None, None, :, None].expand(b, heads, n, D)
    return k.to(dtype=dtype, device=device), (-k).to(dtype=dtype, device=device)


def feed(cache, t0, n, n_layers=2, **kw):
    """One forward of n tokens: every layer's update in order, as transformers calls it. Returns layer 0's view."""
    out = None
    for i in range(n_layers):
        r = cache.update(*kv(t0, n, **kw), i)
        out = r if out is None else out
    return out


def tokens(k):
    return k[0, 0, :, 0].long().tolist()


def test_cache_argument_follows_the_forward_signature():
    class New:
        def forward(self, input_ids, cache=None):
            pass

    class Old:
        def forward(self, input_ids, past_key_values=None):
            pass

    assert cache_argument(New()) == "cache" and cache_argument(Old()) == "past_key_values"


def test_model_refusals_read_in_full(monkeypatch):
    def refused(match, model, **kw):
        with pytest.raises(HFSupportError, match=match):
            MSpecKVCache(model, **kw)

    refused("^MSpecKVCache needs a transformers model \\(with .config\\), got object$", object())
    refused("^FakeLM is an encoder-decoder model; MSpecKVCache serves decoder-only causal LMs$",
            FakeLM(is_encoder_decoder=True))

    class NoGenerate:
        config = SimpleNamespace(num_hidden_layers=2)

    refused("^NoGenerate cannot generate \\(not a causal LM\\); MSpecKVCache serves decoder-only causal LMs such as "
            "AutoModelForCausalLM models$", NoGenerate())
    for n in (DROP, 0, "2"):
        refused("^FakeLM: its config has no num_hidden_layers; MSpecKVCache cannot size itself$",
                FakeLM(num_hidden_layers=n))
    refused("^FakeLM shares KV between layers \\(num_kv_shared_layers\\); MSpecKVCache needs one KV per layer: use "
            "transformers' DynamicCache for this model$", FakeLM(num_kv_shared_layers=1))
    refused("^FakeLM has layers of kind \\['linear_attention'\\]; MSpecKVCache serves softmax-attention layers only "
            "\\(full_attention, sliding_attention\\): use transformers' own cache for this model$",
            FakeLM(layer_types=["full_attention", "linear_attention"]))
    refused("^FakeLM: config.layer_types has 1 entries for 2 layers$", FakeLM(layer_types=["full_attention"]))
    refused("^FakeLM: no max_position_embeddings in its config; pass max_len$", FakeLM(max_position_embeddings=DROP))
    refused("^FakeLM layers \\[1\\] use sliding-window attention, and this placement offloads them \\(on_chip=1 of "
            "2\\); offloaded storage holds full-attention layers only: raise on_chip to at least 2, or use "
            "Placement\\(\\) \\(no offload\\)$", FakeLM(sliding_window=4), placement=Placement(on_chip=1))
    refused("^FakeLM has sliding-window layers \\[0, 1\\]; a press cannot be combined with them \\(the sliding mask "
            "needs contiguous positions\\): drop it$", FakeLM(sliding_window=4), press="streaming")
    refused("^press SnapKVPress watches the attention queries or weights", FakeLM(), press="snapkv")
    with pytest.raises(ValueError, match="^max_len must be an integer >= 1, got 0$"):
        MSpecKVCache(FakeLM(), max_len=0)
    # the head_dim a quantized offload checks: the config's own, else hidden_size // heads (an int)
    q8 = Placement(on_chip=1, kv_quant="int8", kv_group_size=8)
    with pytest.raises(ValueError, match="does not divide head_dim 12;"):
        MSpecKVCache(FakeLM(head_dim=12, hidden_size=64), placement=q8)
    with pytest.raises(ValueError, match="does not divide head_dim 12;"):
        MSpecKVCache(FakeLM(hidden_size=48), placement=q8)
    MSpecKVCache(FakeLM(head_dim=16, hidden_size=48), placement=q8)
    # transformers' major version decides, not its minor (the module as imported now: other tests reload it)
    import transformers

    monkeypatch.setattr(transformers, "__version__", "4.57.1")
    refused("^mspeckv.hf needs transformers >= 5.0 \\(its cache-layer API; tested with 5.24\\), found 4.57.1: ",
            FakeLM())
    monkeypatch.setattr(transformers, "__version__", "5.3.0")
    MSpecKVCache(FakeLM())


def test_what_is_accepted_at_the_bounds():
    one = MSpecKVCache(FakeLM(num_hidden_layers=1), max_len=1)
    assert len(one.layers) == 1 and one.get_max_length() == 1 and one.layers[0].get_max_length() == 1
    c = MSpecKVCache(FakeLM(max_position_embeddings=DROP), max_len=5)
    assert c.max_len == 5 and c.compressed is False and c.memory_report() == {} and c.get_seq_length() == 0


def test_text_config_and_sliding_layers():
    outer = SimpleNamespace(get_text_config=lambda: SimpleNamespace(num_hidden_layers=3, hidden_size=32,
                                                                    num_attention_heads=4,
                                                                    max_position_embeddings=16))

    class Multimodal(FakeLM):
        def __init__(self):
            self.config = outer

    c = MSpecKVCache(Multimodal())
    assert len(c.layers) == 3 and c.max_len == 16  # read from the text config
    cases = [({}, [False, False]), ({"sliding_window": None}, [False, False]), ({"sliding_window": 4}, [True, True]),
             ({"sliding_window": 4, "use_sliding_window": False}, [False, False]),
             ({"layer_types": ["sliding_attention", "full_attention"]}, [True, False])]
    for kw, want in cases:
        c = MSpecKVCache(FakeLM(**kw))
        assert c.sliding == want and [layer.is_sliding for layer in c.layers] == want, kw


def test_the_inner_cache_takes_the_first_keys_dtype_and_device():
    c = MSpecKVCache(FakeLM(), max_len=16)
    k, v = feed(c, 0, 3, dtype=torch.bfloat16)
    assert k.dtype == v.dtype == torch.bfloat16 and c.layers[1].keys.dtype == torch.bfloat16
    m = MSpecKVCache(FakeLM(), max_len=16)
    k, _ = feed(m, 0, 3, device="meta")
    assert k.device.type == "meta" and m.layers[0].device.type == "meta" and m.layers[0].values.device.type == "meta"


def test_update_protocol_refusals():
    c = MSpecKVCache(FakeLM(), max_len=16)
    with pytest.raises(HFSupportError, match="^MSpecKVCache expects keys/values \\(B, H_kv, T, D\\) of one shape, "
                                             "got \\(1, 2, 3, 8\\) and \\(1, 2, 4, 8\\)$"):
        c.update(kv(0, 3)[0], kv(0, 4)[1], 0)
    with pytest.raises(HFSupportError, match="of one shape, got \\(2, 3, 8\\) and \\(2, 3, 8\\)$"):
        c.update(kv(0, 3)[0][0], kv(0, 3)[1][0], 0)
    with pytest.raises(RuntimeError, match="^MSpecKVCache: layer 1 updated when layer 0 was expected; it needs every "
                                           "layer's update once per forward, in order"):
        c.update(*kv(0, 3), 1)
    c.update(*kv(0, 3), 0)
    with pytest.raises(HFSupportError, match="^layer 1: keys \\(1, 4, 3, 8\\) do not match this cache's \\(batch 1, "
                                             "2 KV heads, 3 new tokens, head_dim 8\\); a cache serves one batch size "
                                             "and one head geometry: build a new MSpecKVCache per batch$"):
        c.update(*kv(0, 3, heads=4), 1)
    k, _ = feed(c, 0, 2)  # the next forward aborts the broken one: only its own rows are held
    assert tokens(k) == [0, 1] and c.get_seq_length() == 2


def test_a_forward_of_another_length_is_refused_in_a_later_layer():
    c = MSpecKVCache(FakeLM(), max_len=16)
    c.update(*kv(0, 3), 0)
    with pytest.raises(HFSupportError, match="^layer 1: keys \\(1, 2, 2, 8\\) do not match this cache's \\(batch 1, "
                                             "2 KV heads, 3 new tokens, head_dim 8\\)"):
        c.update(*kv(0, 2), 1)


def test_press_compresses_once_after_the_first_forward_of_more_than_one_token():
    p = "streaming:budget=4,sinks=1"
    c = MSpecKVCache(FakeLM(), press=p, max_len=32)
    assert c.compressed is False
    feed(c, 0, 1)  # one token: not a prefill
    assert c.compressed is False and c.inner.length() == 1
    feed(c, 1, 5)  # the first forward of > 1 token: pressed after it, to sink 0 + the newest 3
    assert c.compressed and tokens(c.layers[0].keys) == [0, 3, 4, 5] and c.get_seq_length() == 6
    k, _ = feed(c, 6, 3)  # a 3-token verification afterwards: appended, never re-pressed
    assert c.inner.length() == 7 and tokens(k) == [0, 3, 4, 5, 6, 7, 8] and c.inner.compressions == 1
    assert c.get_mask_sizes(1) == (8, 2)
    two = MSpecKVCache(FakeLM(), press=p, max_len=32)
    feed(two, 0, 2)
    assert two.compressed and two.inner.compressions == 1
    plain = MSpecKVCache(FakeLM(), max_len=32)
    feed(plain, 0, 5)
    assert plain.compressed is False and plain.get_mask_sizes(2) == (7, 0)


def test_crop_both_conventions_and_their_edges():
    c = MSpecKVCache(FakeLM(), max_len=32)
    c.crop(0)  # nothing held, nothing forgotten
    c.crop(5)  # "keep the first 5" of nothing
    with pytest.raises(ValueError, match="^crop\\(-1\\) on an empty MSpecKVCache$"):
        c.crop(-1)
    feed(c, 0, 20)
    c.crop(20)  # keep all 20
    assert c.get_seq_length() == 20
    with pytest.raises(ValueError, match="^crop\\(-21\\): the cache holds only 20 tokens$"):
        c.crop(-21)
    c.crop(19)
    assert c.get_seq_length() == 19
    c.crop(1)  # keep only the first token
    assert c.get_seq_length() == 1 and tokens(c.layers[1].keys) == [0]
    c.crop(-1)  # forget everything
    assert c.get_seq_length() == 0
    k, _ = feed(c, 0, 2)
    assert tokens(k) == [0, 1]


def test_layer_view_batch_operations_and_reset():
    c = MSpecKVCache(FakeLM(), press="streaming:budget=4,sinks=1", max_len=32)
    feed(c, 0, 6)
    layer = c.layers[1]
    assert layer.get_mask_sizes(2) == c.get_mask_sizes(2) == (6, 2) and layer.get_seq_length() == 6
    assert c.memory_report()["compressed"] is True
    with pytest.raises(RuntimeError, match="^crop an MSpecKVCache as a whole \\(cache.crop\\), not one layer$"):
        layer.crop(-1)
    what = {"reorder_cache": ("beam search", torch.tensor([0])),
            "batch_repeat_interleave": ("num_return_sequences > 1 / beam search", 2),
            "batch_select_indices": ("contrastive search / batch selection", torch.tensor([0]))}
    for fn, (name, arg) in what.items():
        for obj in (c, layer):
            with pytest.raises(HFSupportError, match=f"^MSpecKVCache does not support {name} \\(it would reorder or "
                                                     f"repeat batch rows of offloaded storage\\); use greedy or "
                                                     f"sampled generation with one sequence per prompt row$"):
                getattr(obj, fn)(arg)
    layer.reset()  # a layer's reset resets the whole cache
    assert c.inner is None and c.get_seq_length() == 0 and c.compressed is False and layer.keys is None
    assert c.memory_report() == {} and c.get_mask_sizes(3) == (3, 0)
    k, _ = feed(c, 0, 6, b=2)  # a new prefill, another batch: built anew and pressed again
    assert c.compressed and c.inner.batch == 2 and tokens(c.layers[0].keys) == [0, 3, 4, 5] and k.shape[0] == 2
    c.reset()
    feed(c, 0, 1)
    assert c.compressed is False and c.get_seq_length() == 1
