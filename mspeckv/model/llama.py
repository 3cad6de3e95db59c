"""Our decoder forward for the Llama family: Llama, Qwen2 (qkv bias) and Mistral.

Parameter names match Hugging Face's, so a safetensors state dict loads as is. The model knows storage only through
the ``KVCache`` interface (``mspeckv.kv.base``): each layer hands its new K/V to ``cache.update`` and attends over what
comes back.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..kv.base import KVCache
from . import fused
from .rope import Rope, RopeConfig

FAMILIES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}
ACTS = {"silu": F.silu, "swish": F.silu, "gelu": F.gelu, "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}


@dataclass(frozen=True)
class ModelConfig:
    family: str
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate: int
    norm_eps: float
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    tie_embeddings: bool
    max_position: int
    act: str
    rope: RopeConfig
    sliding_window: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    @classmethod
    def from_hf(cls, hf) -> ModelConfig:
        family = hf.model_type
        if family not in FAMILIES:
            raise ValueError(
                f"model_type '{family}' is not supported; MSpecKV runs {', '.join(FAMILIES.values())}"
            )
        if hf.hidden_act not in ACTS:
            raise ValueError(f"hidden_act '{hf.hidden_act}' is not supported; use one of {sorted(ACTS)}")
        n_heads = hf.num_attention_heads
        head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // n_heads
        eos = hf.eos_token_id
        eos = () if eos is None else tuple(eos) if isinstance(eos, list | tuple) else (eos,)
        windowed = family != "qwen2" or getattr(hf, "use_sliding_window", False)
        window = getattr(hf, "sliding_window", None) if windowed else None
        return cls(
            family=family, vocab_size=hf.vocab_size, dim=hf.hidden_size, n_layers=hf.num_hidden_layers,
            n_heads=n_heads, n_kv_heads=getattr(hf, "num_key_value_heads", None) or n_heads, head_dim=head_dim,
            intermediate=hf.intermediate_size, norm_eps=hf.rms_norm_eps,
            qkv_bias=family == "qwen2" or bool(getattr(hf, "attention_bias", False)),
            o_bias=family != "qwen2" and bool(getattr(hf, "attention_bias", False)),
            mlp_bias=bool(getattr(hf, "mlp_bias", False)),
            tie_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
            max_position=hf.max_position_embeddings, act=hf.hidden_act, rope=RopeConfig.from_hf(hf),
            sliding_window=window, eos_token_ids=eos,
        )

    def kv_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        return 2 * self.n_layers * self.n_kv_heads * self.head_dim * dtype_bytes


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        # x * rsqrt(mean(x^2) + eps) in fp32, cast back, then the weight (HF's order of roundings)
        return fused.rms_norm(x, self.weight, self.eps)[0]

    def add(self, x: Tensor, residual: Tensor | None) -> tuple[Tensor, Tensor]:
        """h = residual + x (x when residual is None), then (norm(h), h): one kernel on CUDA."""
        return fused.rms_norm(x, self.weight, self.eps, residual)


def causal_mask(t: int, s: int, device) -> Tensor:
    """Bool mask (t, s): query row i (the i-th of the t newest keys) sees keys j <= s - t + i."""
    i = torch.arange(t, device=device)[:, None]
    j = torch.arange(s, device=device)[None, :]
    return j <= s - t + i


FOLD_MAX = 64  # query rows (G * T) up to which decode/verify attention folds GQA groups into the query axis


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, lens: Tensor | None = None,
              window=None) -> Tensor:
    """q (B, Hq, T, D), k/v (B, Hkv, S, D), mask (T, S) bool, or (B, Hkv, T, S) when each KV head keeps different rows
    (per-head padded stores), or (B, 1, T, S) when each sequence has its own length, or None (= no masking)
    -> (B, Hq, T, D). ``lens`` (T,) or (B, T), when given, says the mask is each row's prefix [0, lens[t]): the
    Triton kernel then takes the bound alone and loads no mask (the torch paths use the mask); ``window``
    (``kv.base.Window``, with lens (B, T)) narrows each row to its sinks and newest keys, which the kernel alone reads.

    Few query rows (decode, verification): fold each KV head's G query heads into the query axis, so K/V are read
    once with no copy. On CUDA this is the split-K Triton kernel of ``model/decode_attention.py`` (GQA folded, the
    mask applied in the kernel and the key loop bounded by each row's last visible key, so a static cache's unused
    rows are not read); with ``MSPECKV_NO_TRITON=1`` (or no Triton) the scores come from one bmm with fp32 output.
    On the CPU: SDPA over the folded queries. Many query rows (prefill): repeat K/V per query head and use SDPA's
    fused kernels.
    """
    B, Hq, T, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    if G * T <= FOLD_MAX and q.is_cuda:
        from .decode_attention import decode_attention_triton, triton_supported, use_triton

        if lens is not None and use_triton(q) and triton_supported(q, k, v):
            return decode_attention_triton(q, k, v, lens=lens, window=window)
        if use_triton(q) and triton_supported(q, k, v, mask):
            return decode_attention_triton(q, k, v, mask)
    if G * T <= FOLD_MAX:
        qf = q.reshape(B, Hkv, G * T, D)  # query head h = kv * G + g
        # folded row g*T + t is query row t: (T, S) -> (G*T, S); per-KV-head (B, Hkv, T, S) -> (B, Hkv, G*T, S)
        fm = None if mask is None else mask.repeat(1, 1, G, 1) if mask.dim() == 4 else mask.repeat(G, 1)
        if q.is_cuda and B == 1:
            sc = torch.bmm(qf[0] * D ** -0.5, k[0].transpose(1, 2), out_dtype=torch.float32)  # (Hkv, G*T, S)
            if fm is not None:
                sc.masked_fill_(~(fm[0] if fm.dim() == 4 else fm), float("-inf"))
            y = torch.bmm(sc.softmax(-1).to(v.dtype), v[0])[None]  # (1, Hkv, G*T, D)
        else:
            y = F.scaled_dot_product_attention(qf, k, v, attn_mask=fm)
        return y.reshape(B, Hq, T, D)
    if G > 1:
        k, v = k.repeat_interleave(G, dim=1), v.repeat_interleave(G, dim=1)
        if mask is not None and mask.dim() == 4 and mask.shape[1] > 1:
            mask = mask.repeat_interleave(G, dim=1)  # (B, Hkv, T, S) -> (B, Hq, T, S); (B, 1, T, S) broadcasts
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class Fused:
    """Linear layers whose weights (and biases) are row-slice views of one tensor, so one matmul computes them all
    (on every device: the CPU runs the same code as CUDA).

    The layers keep their own parameters and names (checkpoints load into the views, i.e. into the fused tensor)
    and cost no extra memory. If a layer's parameter is ever replaced (``module.to(...)``, a new Parameter), the
    views no longer alias the fused tensor: ``get()`` notices and returns None, and the caller runs the layers one
    by one."""

    def __init__(self, layers: list[nn.Linear]):
        self.layers = layers
        w = torch.cat([lin.weight.detach() for lin in layers])  # (sum of out features, in)
        has_b = all(lin.bias is not None for lin in layers)
        b = torch.cat([lin.bias.detach() for lin in layers]) if has_b else None
        o = 0
        for lin in layers:
            n = lin.weight.shape[0]
            lin.weight = nn.Parameter(w[o:o + n], requires_grad=lin.weight.requires_grad)
            if has_b:
                lin.bias = nn.Parameter(b[o:o + n], requires_grad=lin.bias.requires_grad)
            o += n
        self.w, self.b = w, b
        self.ptrs = self._ptrs()

    def _ptrs(self) -> tuple:
        return tuple((lin.weight.data_ptr(), None if lin.bias is None else lin.bias.data_ptr()) for lin in self.layers)

    def get(self) -> tuple[Tensor, Tensor | None] | None:
        return (self.w, self.b) if self._ptrs() == self.ptrs else None


class Attention(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.c = c
        self.q_proj = nn.Linear(c.dim, c.n_heads * c.head_dim, bias=c.qkv_bias)
        self.k_proj = nn.Linear(c.dim, c.n_kv_heads * c.head_dim, bias=c.qkv_bias)
        self.v_proj = nn.Linear(c.dim, c.n_kv_heads * c.head_dim, bias=c.qkv_bias)
        self.o_proj = nn.Linear(c.n_heads * c.head_dim, c.dim, bias=c.o_bias)
        self.qkv: Fused | None = None  # set by CausalLM.fuse_projections()

    def project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x (B, T, dim) -> q (B, Hq, T, D), k, v (B, Hkv, T, D): one matmul over the fused weight."""
        c = self.c
        B, T, _ = x.shape
        wb = self.qkv.get() if self.qkv is not None else None
        if wb is not None:
            nq, nk = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
            qkv = F.linear(x, *wb)  # (B, T, nq + 2 nk)
            q, k, v = qkv[..., :nq], qkv[..., nq:nq + nk], qkv[..., nq + nk:]
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        return (q.view(B, T, c.n_heads, c.head_dim).transpose(1, 2),
                k.view(B, T, c.n_kv_heads, c.head_dim).transpose(1, 2),
                v.view(B, T, c.n_kv_heads, c.head_dim).transpose(1, 2))

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, cache: KVCache, layer: int, masks: dict) -> Tensor:
        c = self.c
        B, T, _ = x.shape
        q, k, v = self.project(x)  # (B, Hq, T, D), (B, Hkv, T, D) x 2
        q, k = fused.rope_qk(q, k, cos, sin)
        cache.on_query(layer, q)
        k_all, v_all = cache.update(layer, k, v)  # (B, Hkv, S, D), the last T rows are the new tokens
        S = k_all.shape[2]
        mask = cache.attn_mask  # static-shape caches mask their unused rows: (T, capacity)
        if mask is None and T > 1:
            mask = masks.get(S)
            if mask is None:
                mask = masks[S] = causal_mask(T, S, x.device)
        cache.on_update(layer, k, v, k_all, mask)
        y = attention(q, k_all, v_all, mask, cache.attn_lens, cache.attn_window)  # (B, Hq, T, D)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, c.n_heads * c.head_dim))


class MLP(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(c.dim, c.intermediate, bias=c.mlp_bias)
        self.up_proj = nn.Linear(c.dim, c.intermediate, bias=c.mlp_bias)
        self.down_proj = nn.Linear(c.intermediate, c.dim, bias=c.mlp_bias)
        self.act = ACTS[c.act]
        self.silu = c.act in ("silu", "swish")
        self.gate_up: Fused | None = None  # set by CausalLM.fuse_projections()

    def forward(self, x: Tensor) -> Tensor:
        wb = self.gate_up.get() if self.gate_up is not None and self.silu else None
        if wb is not None:  # [gate | up] in one matmul, silu(gate) * up in one kernel on CUDA
            return self.down_proj(fused.silu_mul(F.linear(x, *wb)))
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.self_attn = Attention(c)
        self.mlp = MLP(c)
        self.input_layernorm = RMSNorm(c.dim, c.norm_eps)
        self.post_attention_layernorm = RMSNorm(c.dim, c.norm_eps)

    def forward(self, x, cos, sin, cache, layer, masks, residual=None):
        """-> (mlp output, residual stream). The block's input is ``residual + x`` (x alone for the first block):
        each residual add is done by the norm that follows it, in one kernel on CUDA."""
        h, x = self.input_layernorm.add(x, residual)
        h, x = self.post_attention_layernorm.add(self.self_attn(h, cos, sin, cache, layer, masks), x)
        return self.mlp(h), x


class Decoder(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(c.vocab_size, c.dim)
        self.layers = nn.ModuleList(Block(c) for _ in range(c.n_layers))
        self.norm = RMSNorm(c.dim, c.norm_eps)


class CausalLM(nn.Module):
    """Decoder + LM head. ``forward(ids, cache)`` returns fp32 logits for the last ``num_logits`` positions."""

    def __init__(self, c: ModelConfig):
        super().__init__()
        self.cfg = c
        self.model = Decoder(c)
        self.lm_head = nn.Linear(c.dim, c.vocab_size, bias=False)
        if c.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.rope = Rope(c.rope)

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    def forward(self, input_ids: Tensor, cache: KVCache, pos0: int | None = None,
                num_logits: int | None = 1, positions: Tensor | None = None) -> Tensor:
        """input_ids (B, T) -> logits (B, num_logits or T, V) in fp32.

        ``pos0`` is the absolute position of ``input_ids[:, 0]``; it defaults to ``cache.next_position()``, which
        differs from ``cache.length()`` for caches that hold a subset of the history (presses, streaming).
        ``positions`` (T,) on the device overrides it for CUDA-graph replays (then ``pos0`` only serves the host-side
        checks).
        """
        B, T = input_ids.shape
        if cache.batch is not None and cache.batch != B:
            raise ValueError(f"the KV cache was built for batch {cache.batch} but input_ids has {B} row(s); build "
                             f"the cache with batch={B}")
        pos0 = cache.next_position() if pos0 is None else pos0
        w = self.cfg.sliding_window
        if w is not None and pos0 + T > w:
            raise ValueError(
                f"this checkpoint uses sliding-window attention (window {w}) and the sequence reaches {pos0 + T} "
                f"tokens; MSpecKV implements full attention only: use a checkpoint with sliding_window null"
            )
        if positions is None:
            positions = cache.token_positions(T)  # (B, T) when each sequence has its own length
        if positions is None:
            positions = torch.arange(pos0, pos0 + T, device=input_ids.device)
        cos, sin = self.rope.cos_sin(positions, pos0 + T, self.dtype)
        x = self.model.embed_tokens(input_ids)
        masks: dict[int, Tensor] = {}
        cache.begin(T)
        res = None  # the residual stream; x is the last block's output until the final norm adds them
        try:
            for i, layer in enumerate(self.model.layers):
                x, res = layer(x, cos, sin, cache, i, masks, res)
        except BaseException:
            cache.abort()
            raise
        cache.end()
        if num_logits is not None:
            x, res = x[:, -num_logits:], res[:, -num_logits:]
        return self.lm_head(self.model.norm.add(x, res)[0]).float()

    @torch.inference_mode()
    def prefill(self, input_ids: Tensor, cache: KVCache, chunk: int = 1024, progress=None) -> Tensor:
        """Feed a prompt in chunks of ``chunk`` tokens (bounded attention memory). Returns (B, V) last logits."""
        self.check_prompt(input_ids)
        T = input_ids.shape[1]
        logits = None
        for s in range(0, T, chunk):
            logits = self(input_ids[:, s:s + chunk], cache, num_logits=1)
            if progress is not None:
                progress(min(s + chunk, T), T)
        return logits[:, -1]

    def check_prompt(self, input_ids: Tensor) -> None:
        """A prompt is a (batch >= 1, tokens >= 1) integer tensor of ids inside the vocabulary (one host sync)."""
        if not isinstance(input_ids, Tensor) or input_ids.dim() != 2:
            raise ValueError(f"input_ids must be a 2-D (batch, tokens) tensor of token ids, got "
                             f"{getattr(input_ids, 'shape', type(input_ids).__name__)}")
        B, T = input_ids.shape
        if B < 1:
            raise ValueError("input_ids has no rows (batch 0); give at least one prompt")
        if T < 1:
            raise ValueError("the prompt is empty (0 tokens); give at least one token")
        if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
            raise ValueError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}")
        lo, hi = torch.aminmax(input_ids)
        lo, hi, V = int(lo), int(hi), self.cfg.vocab_size
        if lo < 0 or hi >= V:
            raise ValueError(f"token id {lo if lo < 0 else hi} is outside this model's vocabulary of {V} "
                             f"(valid ids 0..{V - 1}); the prompt was encoded with another tokenizer?")

    def check_context(self, n_tokens: int) -> None:
        if n_tokens > self.cfg.max_position:
            raise ValueError(
                f"{n_tokens} tokens exceed this model's maximum context of {self.cfg.max_position} "
                f"(max_position_embeddings); shorten the prompt or lower --max-new-tokens"
            )

    @classmethod
    def from_hf_config(cls, hf, device="cpu", dtype=torch.float32) -> CausalLM:
        with torch.device("meta"):
            m = cls(ModelConfig.from_hf(hf))
        m = m.to_empty(device=device).to(dtype)
        m.rope = Rope(m.cfg.rope, device=device)
        if m.cfg.tie_embeddings:
            m.lm_head.weight = m.model.embed_tokens.weight
        return m.fuse_projections()

    def fuse_projections(self) -> CausalLM:
        """Make q/k/v_proj (and gate/up_proj) views of one weight each, for one matmul per group (see
        ``Fused``). Call after the model's final ``to(device, dtype)``; loading writes through the views."""
        for blk in self.model.layers:
            blk.self_attn.qkv = Fused([blk.self_attn.q_proj, blk.self_attn.k_proj, blk.self_attn.v_proj])
            mlp = blk.mlp
            if isinstance(mlp.gate_proj, nn.Linear) and isinstance(mlp.up_proj, nn.Linear):
                mlp.gate_up = Fused([mlp.gate_proj, mlp.up_proj])
        return self

    def load_safetensors(self, directory: str | Path, take=None) -> CausalLM:
        """Copy every tensor of the safetensors checkpoint in ``directory`` into this model. ``take(name, handle)``
        (a ``safe_open`` handle) returns the tensor to copy for ``name``; the default reads it whole, tensor
        parallelism reads a rank's slice (``parallel.tp.load_tp``)."""
        from safetensors import safe_open

        d = Path(directory)
        index = d / "model.safetensors.index.json"
        files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else None
        files = [d / f for f in files] if files else sorted(d.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no *.safetensors in {d}")
        own = self.state_dict()
        seen = set()
        for f in files:
            with safe_open(str(f), framework="pt", device="cpu" if take else str(self.device)) as fh:
                for name in fh.keys():
                    if name not in own:
                        if name.endswith("rotary_emb.inv_freq"):
                            continue
                        raise ValueError(f"{f.name}: unexpected tensor '{name}' for a {self.cfg.family} model")
                    t = fh.get_tensor(name) if take is None else take(name, fh)
                    if own[name].shape != t.shape:
                        want = tuple(own[name].shape)
                        raise ValueError(f"{f.name}: '{name}' has shape {tuple(t.shape)}, expected {want}")
                    own[name].copy_(t)
                    seen.add(name)
        missing = set(own) - seen - ({"lm_head.weight"} if self.cfg.tie_embeddings else set())
        if missing:
            raise ValueError(f"checkpoint in {d} lacks {len(missing)} tensors, e.g. {sorted(missing)[:3]}")
        return self
