"""The demo's library side: parameter count, the memory check before any weight loads, and the press row's bytes."""

from __future__ import annotations

import pytest
import torch

from mspeckv import cli, demo
from mspeckv.config import GenerationConfig
from tests.tiny import save_tiny_pair, tiny_model


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_param_count_matches_the_model(family):
    m = tiny_model(family)  # llama: untied head; qwen2: tied head and qkv bias
    want = sum(p.numel() for p in {id(p): p for p in m.parameters()}.values())
    assert demo.param_count(m.cfg) == want


def test_check_memory(monkeypatch):
    monkeypatch.setattr(demo, "available_bytes", lambda: 3 * demo.GB)
    need = demo.memory_need([tiny_model().cfg], 2, overhead=4 * demo.GB)
    assert need.short and need.total > 4 * demo.GB
    with pytest.raises(demo.NotEnoughMemoryError, match=r"the demo needs about 4.0 GiB of memory .* 3.0 GiB is"):
        demo.check_memory(need)
    monkeypatch.setattr(demo, "available_bytes", lambda: 5 * demo.GB)
    demo.check_memory(demo.memory_need([tiny_model().cfg], 2, overhead=4 * demo.GB))
    monkeypatch.setattr(demo, "available_bytes", lambda: None)  # unknown: nothing to refuse on
    assert not demo.memory_need([tiny_model().cfg], 2, overhead=100 * demo.GB).short


def test_demo_refuses_short_memory_before_loading(tmp_path, monkeypatch, capsys):
    from types import SimpleNamespace

    import mspeckv.data.corpora as corpora

    t, d = save_tiny_pair(tmp_path)
    monkeypatch.setattr(corpora, "load_documents", lambda name: [SimpleNamespace(text="A short article.")])
    monkeypatch.setattr(demo, "available_bytes", lambda: 1 << 20)
    monkeypatch.setattr(cli, "_load_pair", lambda a, *d: pytest.fail("weights loaded before the memory check"))
    assert cli.main(["demo", "--model", t, "--draft", d, "--device", "cpu", "--max-new-tokens", "4"]) == 2
    assert "mspeckv demo needs about" in capsys.readouterr().err


def test_press_row_measures_the_pressed_bytes():
    m = tiny_model("llama", head_dim=32, hidden_size=128, num_attention_heads=4, num_key_value_heads=2)
    ids = list(range(3, 3 + 90))
    gen = GenerationConfig(max_new_tokens=5)
    from mspeckv.decoding.autoregressive import generate

    ar = generate(m, torch.tensor([ids]), gen).tokens[0]
    row = demo.press_row(m, ids, gen, ar, press="kivi:k_bits=4,v_bits=4,group_size=32,residual=8")
    assert row.full_prompt_kv_bytes == len(ids) * m.cfg.kv_bytes_per_token(4)
    assert 2 < row.ratio < 8 and row.prompt_kv_bytes > 0  # fp32 rows -> int4 codes + scales, 8 rows kept whole
    toks = row.result.tokens[0]
    assert row.identical == (toks == ar)
    assert row.first_difference is None if row.identical else toks[row.first_difference] != ar[row.first_difference]
