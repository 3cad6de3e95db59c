"""Load a model reference (embedded name, HF directory, .gguf file, hub id) into our runtime."""

from __future__ import annotations

from pathlib import Path

import torch

from .llama import CausalLM


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device | str) -> torch.dtype:
    """bf16 on the GPU, fp32 on the CPU (the exact reference: tests, evals, random-weight benches)."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def cpu_has_native_bf16() -> bool:
    """True when this CPU multiplies bf16 in hardware (x86 ``avx512_bf16`` or ``amx_bf16``, Arm ``bf16``), read
    from /proc/cpuinfo (False where it is missing, e.g. macOS)."""
    try:
        text = open("/proc/cpuinfo").read()  # noqa: SIM115
    except OSError:
        return False
    flags = {w for line in text.splitlines() if line.startswith(("flags", "Features")) for w in line.split()}
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def generation_dtype(device: torch.device | str) -> torch.dtype:
    """The dtype ``demo`` loads the embedded pair in: bf16 on the GPU, and on a CPU that multiplies bf16 natively
    (half the memory of fp32; measured faster there, results/demo/memory.md); fp32 on other CPUs, where bf16
    matmuls are emulated and slow."""
    dev = torch.device(device)
    return torch.bfloat16 if dev.type == "cuda" or cpu_has_native_bf16() else torch.float32


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
        if device.type == "cpu":
            read_safetensors_into(model, d)
        else:
            model.load_safetensors(d)
    except Exception as e:  # a cut or corrupt file: name it and say how to rebuild it
        if type(e).__name__ not in ("SafetensorError", "WeightsFileError"):
            raise
        from .loading import DamagedCacheError, rebuild_hint

        raise DamagedCacheError(f"cannot read the weights in {d} ({e}); {rebuild_hint(d)}") from None
    return model.eval(), d


class WeightsFileError(ValueError):
    """A safetensors file whose header or size is not valid."""


ST_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64}


def read_safetensors_into(model: CausalLM, directory: str | Path) -> CausalLM:
    """Load a CPU model's weights from the ``*.safetensors`` in ``directory`` with plain reads: a tensor stored in
    the parameter's dtype is read straight into the parameter, any other goes through one tensor-sized buffer. No
    file is memory-mapped, so the file's pages never count in the process's resident memory (a mapped 3 GB file
    would add up to 3 GB to the peak while the parameters fill). Same checks as ``CausalLM.load_safetensors``."""
    import json
    import os

    d = Path(directory)
    files = sorted(d.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {d}")
    own = model.state_dict()
    seen = set()
    for f in files:
        size = f.stat().st_size
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            if size < 8 or n > size - 8:
                raise WeightsFileError(f"{f.name} is not a safetensors file (header length {n}, file {size} bytes)")
            try:
                head = json.loads(fh.read(n))
            except ValueError as e:
                raise WeightsFileError(f"{f.name} has an unreadable header: {e}") from None
            base = 8 + n
            for name, info in head.items():
                if name == "__metadata__":
                    continue
                if name not in own:
                    if name.endswith("rotary_emb.inv_freq"):
                        continue
                    raise ValueError(f"{f.name}: unexpected tensor '{name}' for a {model.cfg.family} model")
                lo, hi = info["data_offsets"]
                dt, shape, p = ST_DTYPES.get(info["dtype"]), tuple(info["shape"]), own[name]
                if dt is None:
                    raise WeightsFileError(f"{f.name}: '{name}' has dtype {info['dtype']}, which is not read")
                if tuple(p.shape) != shape:
                    raise ValueError(f"{f.name}: '{name}' has shape {shape}, expected {tuple(p.shape)}")
                if base + hi > size or hi - lo != p.numel() * torch.tensor([], dtype=dt).element_size():
                    raise WeightsFileError(f"{f.name}: '{name}' lies outside the file or has the wrong size")
                dest = p if p.dtype == dt and p.is_contiguous() else torch.empty(shape, dtype=dt)
                view = memoryview(dest.view(-1).view(torch.uint8).numpy())
                got = 0
                while got < hi - lo:
                    k = os.preadv(fh.fileno(), [view[got:]], base + lo + got)
                    if k <= 0:
                        raise WeightsFileError(f"{f.name} ended early")
                    got += k
                if dest is not p:
                    p.copy_(dest)
                seen.add(name)
    missing = set(own) - seen - ({"lm_head.weight"} if model.cfg.tie_embeddings else set())
    if missing:
        raise ValueError(f"checkpoint in {d} lacks {len(missing)} tensors, e.g. {sorted(missing)[:3]}")
    return model


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
    # its draft's shape (Qwen2.5-0.5B: 24 layers, width 896, 14 heads over 2 KV heads of 64)
    "qwen2.5-0.5b": dict(model_type="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864,
                         num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
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
    """A model's ``ModelConfig`` from its config alone (random shape, prepared directory or GGUF header; no weight is
    loaded or converted)."""
    from transformers import AutoConfig

    from .llama import ModelConfig

    if ref.startswith("random:"):
        shape = ref.split(":", 1)[1]
        if shape not in RANDOM_SHAPES:
            raise ValueError(f"unknown random shape '{shape}' in {ref}; choose one of {sorted(RANDOM_SHAPES)}")
        kw = dict(RANDOM_SHAPES[shape])
        return ModelConfig.from_hf(AutoConfig.for_model(kw.pop("model_type"), **kw))
    from .loading import hf_config

    return ModelConfig.from_hf(hf_config(ref))  # from the GGUF header when not prepared: nothing is converted
