"""MSpecKVCache (mspeckv.hf): transformers' own generate over our storage, on tiny random models (CPU)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache, Gemma3TextConfig, GPTNeoXConfig, Phi3Config

from mspeckv.hf import HFSupportError, MSpecKVCache, cache_argument
from mspeckv.kv.placement import Placement
from mspeckv.kv.quant import error_bound
from tests.tiny import COMMON, tiny_config, tiny_pair

G = 8  # small quantization group / flush block, so that the tiny prompts really reach the CPU store
SMALL = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
             max_position_embeddings=512, eos_token_id=2, bos_token_id=1, pad_token_id=0)


def hf_model(family: str, seed: int = 0, **kw):
    if family in ("llama", "qwen2", "mistral"):
        return tiny_pair(family, seed, **kw)[0]
    cfg = {
        # layers 0-1 slide (window 6, shorter than the prompts), layer 2 is full attention
        "gemma3": lambda: Gemma3TextConfig(**SMALL, num_key_value_heads=2, head_dim=16, sliding_window=6,
                                           layer_types=["sliding_attention", "sliding_attention", "full_attention"]),
        "phi3": lambda: Phi3Config(**SMALL, num_key_value_heads=2),
        "gptneox": lambda: GPTNeoXConfig(**SMALL),
    }[family]()
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()


def generate(model, ids, cache, n=8, **kw):
    kw = {"do_sample": False, "max_new_tokens": n, "min_new_tokens": n, **kw}
    return model.generate(ids, **{cache_argument(model): cache}, **kw)


def prompt(n=16, seed=0):
    return torch.randint(3, 97, (1, n), generator=torch.Generator().manual_seed(seed))


def offloaded(on_chip, **kw):
    return Placement(on_chip=on_chip, kv_group_size=G, rollback_slack=4, **kw)


# the first layer that may be offloaded: Gemma3's sliding layers (0, 1) stay in dense storage
FIRST_OFF = {"gemma3": 2}
FAMILIES = ["llama", "qwen2", "mistral", "gemma3", "phi3", "gptneox"]


@pytest.mark.parametrize("family", FAMILIES)
def test_lossless_placements_equal_dynamic_cache(family):
    m, ids = hf_model(family), prompt()
    ref = generate(m, ids, DynamicCache())
    on = FIRST_OFF.get(family, 1)
    placements = [Placement(), offloaded(on), offloaded(on, resident_layers=3 - on, resident_policy="static")]
    for p in placements:
        cache = MSpecKVCache(m, placement=p, max_len=64)
        got = generate(m, ids, cache)
        assert torch.equal(got, ref), (family, p)
        assert cache.get_seq_length() == ids.shape[1] + 7  # the last token is never fed back
    if p.resident_layers:
        assert cache.memory_report()["resident_hits"] > 0
    # sampled: same seed, same draws
    torch.manual_seed(5)
    ref = generate(m, ids, DynamicCache(), do_sample=True, top_k=0, temperature=1.5)
    torch.manual_seed(5)
    got = generate(m, ids, MSpecKVCache(m, placement=offloaded(on), max_len=64), do_sample=True, top_k=0,
                   temperature=1.5)
    assert torch.equal(got, ref), family


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_quantized_placement_within_bounds(fmt):
    m, ids = hf_model("llama"), prompt(24)
    dyn = DynamicCache()
    ref = generate(m, ids, dyn, n=4)
    cache = MSpecKVCache(m, placement=offloaded(1, kv_quant=fmt), max_len=64)
    got = generate(m, ids, cache, n=4)
    if fmt == "int8":
        assert torch.equal(got, ref)  # the same text for a few tokens
    assert cache.memory_report()["d2h_bytes_total"] > 0  # rows really went through the quantized store
    # layer 1 is the first offloaded layer: its inputs are exact, so its prompt rows differ only by quantization
    k, v = cache.inner.read(1)
    rk, rv = dyn.layers[1].keys, dyn.layers[1].values
    n = ids.shape[1]
    for a, b in ((k, rk), (v, rv)):
        err = float((a[:, :, :n] - b[:, :, :n]).norm() / b[:, :, :n].norm())
        assert 0 < err < error_bound(fmt), (fmt, err)


def _feed(m, cache, ids):
    with torch.no_grad():
        return m(ids, **{cache_argument(m): cache}, use_cache=True).logits


@pytest.mark.parametrize("placement", [Placement(), offloaded(1), offloaded(1, kv_quant="int8"),
                                       offloaded(1, resident_layers=2, resident_policy="static")])
def test_crop_restores_a_cache_that_never_saw_the_tokens(placement):
    m = hf_model("llama")
    ids = prompt(24)
    a, b = MSpecKVCache(m, placement=placement, max_len=64), MSpecKVCache(m, placement=placement, max_len=64)
    _feed(m, a, ids[:, :17])
    _feed(m, a, ids[:, 17:18])
    _feed(m, a, ids[:, 18:21])  # a 3-token "verify" forward, then rejected
    a.crop(-3)
    _feed(m, b, ids[:, :17])
    _feed(m, b, ids[:, 17:18])
    assert a.get_seq_length() == b.get_seq_length() == 18
    for layer in range(3):
        for x, y in zip(a.inner.read(layer), b.inner.read(layer), strict=True):
            assert torch.equal(x, y), layer
    assert torch.equal(_feed(m, a, ids[:, 18:20]), _feed(m, b, ids[:, 18:20]))
    a.crop(19)  # the transformers 4.x form: keep the first 19 tokens
    b.crop(-1)
    assert a.get_seq_length() == b.get_seq_length() == 19
    assert torch.equal(_feed(m, a, ids[:, 19:20]), _feed(m, b, ids[:, 19:20]))


def test_prompt_lookup_and_assisted_generation(monkeypatch):
    crops, crop = [], MSpecKVCache.crop
    monkeypatch.setattr(MSpecKVCache, "crop", lambda self, n: (crops.append(n), crop(self, n))[1])
    m = hf_model("llama")
    ids = torch.cat([prompt(8), prompt(8)], 1)  # a repeated prompt gives prompt lookup something to propose
    ref = generate(m, ids, DynamicCache(), n=10)
    got = generate(m, ids, MSpecKVCache(m, placement=offloaded(1), max_len=64), n=10, prompt_lookup_num_tokens=3)
    assert torch.equal(got, ref) and min(crops) < 0  # rejected proposals were cropped
    crops.clear()
    draft = hf_model("llama", seed=1, num_hidden_layers=1)
    got = generate(m, ids, MSpecKVCache(m, placement=offloaded(1, kv_quant="none"), max_len=64), n=10,
                   assistant_model=draft)
    assert torch.equal(got, ref) and min(crops) < 0


def test_press_after_prefill_matches_our_runtime():
    from mspeckv.cache import make_cache

    hf, ours = tiny_pair("llama")
    ids, press = prompt(20), "streaming:budget=8,sinks=2"
    cache = MSpecKVCache(hf, press=press, max_len=64)
    got = generate(hf, ids, cache, n=6)[0, 20:].tolist()
    assert cache.compressed and cache.inner.length() == 8 + 5 and cache.get_seq_length() == 25
    ref_cache, toks = make_cache(ours, None, 1, 64, press=press), []
    with torch.no_grad():
        logits = ours(ids, ref_cache)[:, -1]
        ref_cache.compress()
        for _ in range(6):
            toks.append(int(logits.argmax(-1)))
            logits = ours(torch.tensor([[toks[-1]]]), ref_cache)[:, -1]
    assert got == toks


def test_clear_errors():
    m = hf_model("llama")
    with pytest.raises(ValueError, match="greater than the model's 3 layers"):
        MSpecKVCache(m, placement=Placement(on_chip=4))
    with pytest.raises(ValueError, match="resident_layers 3 is greater than the 2 offloaded"):
        MSpecKVCache(m, placement=Placement(on_chip=1, resident_layers=3))
    with pytest.raises(HFSupportError, match="raise on_chip to at least 2"):
        MSpecKVCache(hf_model("gemma3"), placement=Placement(on_chip=1))
    with pytest.raises(HFSupportError, match="watches the attention queries"):
        MSpecKVCache(m, press="snapkv")
    with pytest.raises(HFSupportError, match="placement must be a mspeckv Placement"):
        MSpecKVCache(m, placement="int8")
    from transformers import BertConfig, BertModel

    bert = BertModel(BertConfig(**{k: COMMON[k] for k in ("vocab_size", "hidden_size", "intermediate_size",
                                                           "num_hidden_layers", "num_attention_heads")}))
    with pytest.raises(HFSupportError, match="decoder-only causal LMs"):
        MSpecKVCache(bert)
    with pytest.raises(HFSupportError, match="does not support beam search"):
        MSpecKVCache(m).reorder_cache(torch.tensor([0]))
    cache = MSpecKVCache(m, placement=offloaded(1), max_len=64)
    _feed(m, cache, prompt(24))
    with pytest.raises(ValueError, match="rollback_slack"):
        cache.crop(-12)
    with pytest.raises(ValueError, match="allocate a larger cache"):
        _feed(m, MSpecKVCache(m, max_len=8), prompt(9))
    assert tiny_config("llama").num_hidden_layers == 3


def test_cli_backend_hf(tmp_path, capsys):
    from mspeckv.cli import main
    from tests.tiny import char_tokenizer

    hf = hf_model("llama")
    hf.save_pretrained(tmp_path / "m")
    char_tokenizer().save_pretrained(tmp_path / "m")
    args = ["generate", "--model", str(tmp_path / "m"), "--prompt", "hello there", "--max-new-tokens", "5",
            "--device", "cpu", "--backend", "hf"]
    assert main(args + ["--on-chip", "1", "--kv-group-size", "8"]) == 0
    out = capsys.readouterr()
    assert "[hf | LlamaForCausalLM on cpu]" in out.err and "1 on-chip, 2 offloaded" in out.err
    ids = torch.tensor([char_tokenizer()("hello there", add_special_tokens=False).input_ids])
    want = char_tokenizer().decode(generate(hf, ids, DynamicCache(), n=5)[0, ids.shape[1]:], skip_special_tokens=True)
    assert out.out.split("\n")[0] == want
    assert main(args + ["--mode", "mspeckv"]) == 2
    assert "--backend hf runs transformers' own generate" in capsys.readouterr().err


def test_bench_hf_cell_counts_bytes_and_refuses_bad_input():
    """``bench hf`` on a tiny model (CPU): every cache makes its tokens, our int8 offload streams bytes, resident
    layers stream fewer, and bad settings fail before anything loads."""
    from mspeckv.hf.bench import HFBenchConfig, _cell, run_hf_bench

    m = hf_model("llama")
    cfg = HFBenchConfig(contexts=(96,), gen_len=4, repeats=2, resident_layers=1, kv_group_size=8)
    ids = prompt(96)
    rows = {k: _cell(m, ids, k, cfg, torch.device("cpu"), 1e9)
            for k in ("dynamic", "int8_offload", "int8_offload_resident")}
    assert all(len(r["runs"]) == 2 and len(r["forward_ms_steps"]) == 3 for r in rows.values())  # no timed asserts
    assert rows["dynamic"]["h2d_bytes_per_step"] == 0
    assert 0 < rows["int8_offload_resident"]["h2d_bytes_per_step"] < rows["int8_offload"]["h2d_bytes_per_step"]
    with pytest.raises(ValueError, match="gen_len"):
        HFBenchConfig(gen_len=1)
    with pytest.raises(ValueError, match="caches"):
        HFBenchConfig(caches=("static",))
    with pytest.raises(ValueError, match="needs a GPU"):
        run_hf_bench(HFBenchConfig(device="cpu"))
