"""Load a model reference (embedded name, HF directory, .gguf file, hub id) into our runtime."""

from __future__ import annotations

from pathlib import Path

import torch

from .llama import CausalLM


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device | str) -> torch.dtype:
    """bf16 on the GPU, fp32 on the CPU (bf16 matmuls on a 2-core CPU are slow and less exact)."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def parse_device(name: str | None) -> torch.device:
    if name in (None, "auto"):
        return default_device()
    if not isinstance(name, str):
        raise ValueError(f"device must be cpu, cuda or a torch.device, got {name!r}")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device '{name}' is not a device; use cpu or cuda") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"--device '{name}' is not supported; use cpu or cuda")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but torch sees no CUDA GPU; use --device cpu")
    return dev


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def parse_dtype(dtype) -> torch.dtype | None:
    """None | a torch floating dtype | one of DTYPES' names -> torch.dtype (None stays None: the device default)."""
    if dtype is None or isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype.removeprefix("torch.") in DTYPES:
        return DTYPES[dtype.removeprefix("torch.")]
    raise ValueError(f"dtype must be one of {', '.join(DTYPES)} (or the torch dtype), got {dtype!r}")


def load_model(ref: str | Path, device=None, dtype=None, progress: bool = True) -> tuple[CausalLM, Path]:
    from transformers import AutoConfig

    from .loading import resolve

    device = parse_device(device) if not isinstance(device, torch.device) else device
    dtype = parse_dtype(dtype) or default_dtype(device)
    d = resolve(str(ref), progress=progress)
    hf = AutoConfig.from_pretrained(d)
    model = CausalLM.from_hf_config(hf, device=device, dtype=dtype)
    try:
        model.load_safetensors(d)
    except Exception as e:  # a cut or corrupt file: name it and say how to rebuild it
        if type(e).__name__ != "SafetensorError":
            raise
        from .loading import DamagedCacheError, rebuild_hint

        raise DamagedCacheError(f"cannot read the weights in {d} ({e}); {rebuild_hint(d)}") from None
    return model.eval(), d


def load_tokenizer(model_dir: str | Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))


def load(ref: str | Path, device=None, dtype=None, progress: bool = True):
    """-> (model, tokenizer, directory)."""
    model, d = load_model(ref, device, dtype, progress)
    return model, load_tokenizer(d), d


# Shapes for random-weight systems benchmarks (transfer and kernel timing only: outputs are meaningless).
RANDOM_SHAPES = {
    "tiny": dict(model_type="llama", vocab_size=256, hidden_size=256, intermediate_size=256, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=4096),
    # Llama-2-7B with YaRN to 128K (the TriForce / original MSpecKV target): 32 layers, 32 heads, MHA, head dim 128
    "llama-2-7b-128k": dict(model_type="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                            num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                            max_position_embeddings=131072, rms_norm_eps=1e-5,
                            rope_scaling={"rope_type": "yarn", "factor": 32.0,
                                          "original_max_position_embeddings": 4096}),
    # TriForce's draft for that target (JackFram/llama-68m: 2 layers, width 768, Llama-2 vocabulary); positions raised
    # to the target's 128K, since the draft's StreamingLLM cache sees real positions of a long prompt
    "llama-68m": dict(model_type="llama", vocab_size=32000, hidden_size=768, intermediate_size=3072,
                      num_hidden_layers=2, num_attention_heads=12, num_key_value_heads=12,
                      max_position_embeddings=131072, rms_norm_eps=1e-6),
    "qwen2.5-1.5b": dict(model_type="qwen2", vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                         num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                         max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=1e6, tie_word_embeddings=True),
}


def random_model(shape: str, device=None, dtype=None, seed: int = 0) -> CausalLM:
    """A model of a named shape with random N(0, 0.02) weights, built directly on the device. Label results so."""
    from transformers import AutoConfig

    if shape not in RANDOM_SHAPES:
        raise ValueError(f"unknown random shape '{shape}'; choose one of {sorted(RANDOM_SHAPES)}")
    device = parse_device(device) if not isinstance(device, torch.device) else device
    kw = dict(RANDOM_SHAPES[shape])
    hf = AutoConfig.for_model(kw.pop("model_type"), **kw)
    m = CausalLM.from_hf_config(hf, device=device, dtype=parse_dtype(dtype) or default_dtype(device))
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=g)
    return m.eval()


def load_any(ref: str, device=None, dtype=None, progress: bool = True):
    """``random:<shape>`` -> (random model, None, None); anything else -> load(ref)."""
    if ref.startswith("random:"):
        return random_model(ref.split(":", 1)[1], device, dtype), None, None
    return load(ref, device, dtype, progress)


def model_config(ref: str):
    """A model's ``ModelConfig`` from its config alone (random shape or resolved directory; weights not loaded)."""
    from transformers import AutoConfig

    from .llama import ModelConfig

    if ref.startswith("random:"):
        shape = ref.split(":", 1)[1]
        if shape not in RANDOM_SHAPES:
            raise ValueError(f"unknown random shape '{shape}' in {ref}; choose one of {sorted(RANDOM_SHAPES)}")
        kw = dict(RANDOM_SHAPES[shape])
        return ModelConfig.from_hf(AutoConfig.for_model(kw.pop("model_type"), **kw))
    from .loading import resolve

    return ModelConfig.from_hf(AutoConfig.from_pretrained(resolve(ref)))
