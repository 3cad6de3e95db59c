"""The GGUF reader (dequantization against the gguf package's reference) and the checks around a prepared model:
``prepare --gguf`` on a prepared model, in-place changes caught at load, and a draft vocabulary refused before any
conversion."""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pytest
import torch

from mspeckv import cli
from mspeckv.model import loading
from mspeckv.model.gguf_read import GGML_TYPES, Parts, dequantize, read_header
from tests.test_loading import cache, fake, write_tiny_gguf  # noqa: F401  (fixtures)

# ---------------------------------------------------------------- the reader


def _random_blocks(qtype: int, n: int, rng) -> np.ndarray:
    """``n`` random blocks of ``qtype`` whose fp16 scales are finite (random bytes elsewhere are valid codes)."""
    name, _, size = GGML_TYPES[qtype]
    b = rng.integers(0, 256, (n, size), dtype=np.uint8)
    scale = lambda k: (rng.standard_normal((n, k)) * 0.01).astype(np.float16).view(np.uint8)
    fields = {"Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q8_0": [0], "Q4_K": [0, 2],
              "Q5_K": [0, 2], "Q6_K": [208], "Q2_K": [80, 82], "Q3_K": [108]}[name]
    for o in fields:
        b[:, o:o + 2] = scale(1)
    return b


@pytest.mark.parametrize("name", ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K", "Q3_K"])
def test_dequantize_matches_gguf_reference(name):
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize as reference

    qtype = next(k for k, v in GGML_TYPES.items() if v[0] == name)
    rng = np.random.default_rng(qtype)
    blocks = _random_blocks(qtype, 37, rng)
    want = reference(blocks, GGMLQuantizationType(qtype)).reshape(-1)
    got = dequantize(bytearray(blocks.tobytes()), qtype, (want.size,), chunk_blocks=16).numpy()
    assert np.array_equal(got.view(np.uint32), want.astype(np.float32).view(np.uint32))  # bit for bit


def test_reader_over_parts_matches_file(tmp_path):
    """The header and every tensor read across part boundaries equal the file read whole, and the writer's arrays."""
    src = tmp_path / "tiny.gguf"
    written = write_tiny_gguf(src)
    data = src.read_bytes()
    cuts = [0, 7, 1000, 1001, len(data) // 2, len(data)]
    files = []
    for i, (a, b) in enumerate(zip(cuts[:-1], cuts[1:], strict=True)):
        files.append(tmp_path / f"p{i}.bin")
        files[-1].write_bytes(data[a:b])
    parts = Parts(files)
    h = read_header(parts)
    assert h.arch == "llama" and h.vocab_size() == written["token_embd.weight"].shape[0]
    assert h.metadata["llama.block_count"] == 2 and len(h.tensors) == len(written)
    for name, arr in written.items():
        t = h.tensors[name]
        assert t.shape == arr.shape
        got = dequantize(parts.read(t.offset, t.nbytes), t.qtype, t.shape)
        assert torch.equal(got, torch.from_numpy(arr))


def test_reader_refuses_cut_file(tmp_path):
    from mspeckv.model.gguf_read import GGUFFormatError

    src = tmp_path / "tiny.gguf"
    write_tiny_gguf(src)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(src.read_bytes()[:-100])
    with pytest.raises(GGUFFormatError, match="past the end"):
        read_header(Parts([cut]))
    with pytest.raises(loading.ModelError, match="Cannot read"):
        loading.convert_gguf(cut, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- prepare --gguf on a prepared model


def _prepared(fake, tmp_path, name="tiny", seed=0):  # noqa: F811
    src = tmp_path / f"{name}.gguf"
    write_tiny_gguf(src, seed=seed)
    data = src.read_bytes()
    fake([data[:1000], data[1000:]], name=name, prefix=name.replace("-", "_"))
    return src, loading.prepare(name, progress=False)


def test_prepare_gguf_on_prepared_model_checks_the_file(fake, cache, tmp_path, capsys):  # noqa: F811
    src, d = _prepared(fake, tmp_path)
    w = d / "model.safetensors"
    mtime = w.stat().st_mtime_ns
    other = tmp_path / "other.gguf"
    write_tiny_gguf(other, seed=5)
    assert cli.main(["models", "prepare", "tiny", "--gguf", str(other)]) == 2
    err = capsys.readouterr().err
    assert "sha256 mismatch for tiny from the file" in err and str(other) in err
    assert cli.main(["models", "prepare", "tiny", "--gguf", str(tmp_path / "missing.gguf")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert cli.main(["models", "prepare", "tiny", "--gguf", str(src)]) == 0  # the right file: nothing to redo
    assert w.stat().st_mtime_ns == mtime and loading.cache_state("tiny") == "prepared"


# ---------------------------------------------------------------- in-place changes caught at load


def test_byte_flipped_in_place_is_caught_cheaply(fake, cache, tmp_path, capsys):  # noqa: F811
    _, d = _prepared(fake, tmp_path)
    w = d / "model.safetensors"
    good = w.read_bytes()
    st = w.stat()
    rec = json.loads((d / loading.MARKER).read_text())["files"]["model.safetensors"]
    assert rec["mtime_ns"] == st.st_mtime_ns and rec["samples"]
    assert rec["sha256"] == hashlib.sha256(good).hexdigest()  # hashed while writing, equal to the file's

    def flip(at: int, keep_mtime: bool):
        b = bytearray(good)
        b[at] ^= 0x40
        w.write_bytes(bytes(b))
        if keep_mtime:
            os.utime(w, ns=(st.st_atime_ns, st.st_mtime_ns))

    # a flip anywhere: the mtime tells it at load, `models list` says damaged, verify names the sha256
    flip(len(good) // 3, keep_mtime=False)
    with pytest.raises(loading.DamagedCacheError, match="model.safetensors was modified after conversion"):
        loading.resolve("tiny", progress=False)
    assert cli.main(["models", "list"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("tiny "))
    assert "damaged: model.safetensors" in line and " prepared " not in f" {line} "
    assert cli.main(["models", "verify", "tiny"]) == 2
    assert "does not match the sha256 recorded at conversion" in capsys.readouterr().out

    # a flip inside a sampled block with the mtime put back: the block's hash tells it
    at = int(next(iter(rec["samples"]))) + 5
    flip(at, keep_mtime=True)
    assert w.stat().st_mtime_ns == rec["mtime_ns"]
    with pytest.raises(loading.DamagedCacheError, match="a sampled block changed"):
        loading.prepare("tiny", progress=False)

    # the same bytes with a new mtime (copied, touched): load refuses, verify hashes in full and accepts
    w.write_bytes(good)
    with pytest.raises(loading.DamagedCacheError, match="modified after conversion"):
        loading.prepare("tiny", progress=False)
    assert cli.main(["models", "verify", "tiny"]) == 0
    assert "tiny: prepared" in capsys.readouterr().out
    assert loading.cache_state("tiny") == "prepared" and loading.prepare("tiny", progress=False) == d


def test_sample_offsets_cover_the_file(tmp_path):
    p = tmp_path / "f"
    p.write_bytes(bytes(range(256)) * 10_000)
    s = loading.sample_hashes(p, p.stat().st_size)
    offs = sorted(int(o) for o in s)
    assert len(offs) == loading.SAMPLES and offs[0] == 0 and offs[-1] == p.stat().st_size - loading.SAMPLE_BYTES


# ---------------------------------------------------------------- vocabulary checked before conversion


def test_draft_vocabulary_refused_before_any_conversion(fake, cache, tmp_path, capsys):  # noqa: F811
    a = tmp_path / "a.gguf"
    b = tmp_path / "b.gguf"
    write_tiny_gguf(a)
    write_tiny_gguf(b, extra_tokens=3)
    for name, src in (("tiny-a", a), ("tiny-b", b)):
        data = src.read_bytes()
        fake([data[:500], data[500:]], name=name, prefix=name.replace("-", "_"))
    assert loading.hf_config("tiny-b").vocab_size == loading.hf_config("tiny-a").vocab_size + 3
    argv = ["generate", "--model", "tiny-a", "--draft", "tiny-b", "--mode", "vanilla", "--prompt", "hi",
            "--max-new-tokens", "4", "--device", "cpu"]
    assert cli.main(argv) == 2
    assert "--draft tiny-b has a vocabulary of" in capsys.readouterr().err
    assert not loading.model_dir("tiny-a").exists() and not loading.model_dir("tiny-b").exists()  # nothing converted
