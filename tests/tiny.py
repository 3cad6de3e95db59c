"""Tiny random Llama/Qwen2/Mistral configs and models for tests (no network, built in code)."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

from mspeckv.model.llama import CausalLM

COMMON = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6, eos_token_id=2,
              bos_token_id=1, pad_token_id=0)


def tiny_config(family: str = "llama", **kw):
    if family == "llama":
        return LlamaConfig(**{**COMMON, "tie_word_embeddings": False, **kw})
    if family == "qwen2":
        return Qwen2Config(**{**COMMON, "tie_word_embeddings": True, "rope_theta": 1e6, **kw})
    if family == "mistral":
        return MistralConfig(**{**COMMON, "head_dim": 24, "sliding_window": None, "num_key_value_heads": 1, **kw})
    raise ValueError(family)


def tiny_pair(family: str = "llama", seed: int = 0, dtype=torch.float32, **kw):
    """(hf_model, our_model) sharing the same random weights."""
    cfg = tiny_config(family, **kw)
    torch.manual_seed(seed)
    hf = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").to(dtype).eval()
    with torch.no_grad():  # HF inits small; widen the spread so that bugs show up in logits
        for p in hf.parameters():
            if p.dim() == 1:  # norms and biases: move off their trivial init
                p.add_(torch.randn_like(p) * 0.1)
    ours = CausalLM.from_hf_config(cfg, dtype=dtype)
    ours.load_state_dict(hf.state_dict(), strict=False)
    return hf, ours.eval()


def tiny_model(family: str = "llama", seed: int = 0, **kw) -> CausalLM:
    return tiny_pair(family, seed, **kw)[1]


def char_tokenizer():
    """A 97-token character-level tokenizer (ids 0-2 special), matching the tiny configs' vocabulary."""
    import string

    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = (string.ascii_letters + string.digits + " \n.,;:'\"!?()-")[:94]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate(chars)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tk.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def save_tiny_pair(root) -> tuple[str, str]:
    """A 3-layer target and a 1-layer draft saved as HF directories with the character tokenizer."""
    tok = char_tokenizer()
    dirs = []
    for name, seed, layers in (("target", 0, 3), ("draft", 1, 1)):
        hf, _ = tiny_pair("llama", seed, num_hidden_layers=layers)
        hf.save_pretrained(root / name)
        tok.save_pretrained(root / name)
        dirs.append(str(root / name))
    return dirs[0], dirs[1]
