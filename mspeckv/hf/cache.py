"""``MSpecKVCache``: a transformers ``Cache`` whose storage is one of our KV caches (``make_cache``).

transformers calls ``cache.update(k, v, layer_idx, cache_kwargs)`` once per attention layer and forward, in layer
order, with post-RoPE ``(B, H_kv, T, D)`` keys/values. That maps onto our protocol directly::

    layer 0:       inner.begin(T)      (the inner cache is built on the very first call: batch, heads, dtype, device)
    every layer:   inner.update(layer, k, v) -> what attention reads
    last layer:    inner.end()         then, with a press, inner.compress() after the first forward of > 1 token

so placements (offload, KIVI int8/int4/int2, resident slots) and presses run through the same code as our own
forward: there is no second offload path here. ``crop`` maps to ``rollback``.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import Tensor
from transformers.cache_utils import Cache, CacheLayerMixin

from ..cache import make_cache
from ..kv.placement import Placement

ATTENTION_KINDS = ("full_attention", "sliding_attention")


def cache_argument(model) -> str:
    """The name ``generate``/``forward`` take the cache under: ``cache`` in recent transformers 5.x (where
    ``past_key_values`` is deprecated), ``past_key_values`` before."""
    import inspect

    return "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"


class HFSupportError(ValueError):
    """A model or placement that MSpecKVCache cannot serve (one clear message each)."""


class _Geometry:
    """What ``make_cache`` reads from a model (``cfg``, ``dtype``, ``device``, ``parameters()``), built from the
    first keys transformers hands us."""

    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device):
        self.cfg = SimpleNamespace(n_layers=n_layers, n_kv_heads=n_kv_heads, head_dim=head_dim)
        self.dtype, self.device = dtype, device

    def parameters(self):
        yield torch.empty(0, dtype=self.dtype, device=self.device)


class MSpecKVLayer(CacheLayerMixin):
    """One layer's view of an ``MSpecKVCache``: every call goes to the owner, which holds the one inner cache."""

    is_compileable = False
    is_croppable = True
    supports_early_init = False

    def __init__(self, owner: MSpecKVCache, idx: int, sliding: bool):
        self.owner, self.idx, self.is_sliding = owner, idx, sliding

    @property
    def is_initialized(self) -> bool:
        return self.owner.inner is not None

    @property
    def keys(self) -> Tensor | None:  # read on demand (a blocking fetch for an offloaded layer)
        return None if self.owner.inner is None else self.owner.inner.read(self.idx)[0]

    @property
    def values(self) -> Tensor | None:
        return None if self.owner.inner is None else self.owner.inner.read(self.idx)[1]

    @property
    def device(self):
        return None if self.owner.inner is None else self.owner._geom.device

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        """Nothing per layer: the owner builds the inner cache at the first update of layer 0."""

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        return self.owner._update(self.idx, key_states, value_states)

    def get_mask_sizes(self, query_length) -> tuple[int, int]:
        return self.owner.get_mask_sizes(query_length)

    def get_seq_length(self) -> int:
        return self.owner.get_seq_length()

    def get_max_length(self) -> int:
        return self.owner.max_len

    def crop(self, tokens_to_remove: int) -> None:
        raise RuntimeError("crop an MSpecKVCache as a whole (cache.crop), not one layer")

    def reset(self) -> None:
        self.owner.reset()

    def offload(self):
        """Our placement decides what is offloaded; transformers' own offloading does not apply."""

    def prefetch(self):
        """Our placement prefetches on its own copy stream."""

    def reorder_cache(self, beam_idx) -> None:
        self.owner._no_batch_ops("beam search")

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.owner._no_batch_ops("num_return_sequences > 1 / beam search")

    def batch_select_indices(self, indices) -> None:
        self.owner._no_batch_ops("contrastive search / batch selection")


def _text_config(model):
    cfg = getattr(model, "config", None)
    if cfg is None:
        raise HFSupportError(f"MSpecKVCache needs a transformers model (with .config), got {type(model).__name__}")
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def _layer_kinds(model) -> list[bool]:
    """Per layer: True if it slides. Raises one clear error for models the cache cannot serve."""
    full = getattr(model, "config", None)
    cfg = _text_config(model)
    name = type(model).__name__
    if getattr(full, "is_encoder_decoder", False):
        raise HFSupportError(f"{name} is an encoder-decoder model; MSpecKVCache serves decoder-only causal LMs")
    can = getattr(model, "can_generate", None)
    if not callable(can) or not can():
        raise HFSupportError(f"{name} cannot generate (not a causal LM); MSpecKVCache serves decoder-only causal LMs "
                             f"such as AutoModelForCausalLM models")
    n = getattr(cfg, "num_hidden_layers", None)
    if not isinstance(n, int) or n < 1:
        raise HFSupportError(f"{name}: its config has no num_hidden_layers; MSpecKVCache cannot size itself")
    if getattr(cfg, "num_kv_shared_layers", 0):
        raise HFSupportError(f"{name} shares KV between layers (num_kv_shared_layers); MSpecKVCache needs one KV per "
                             f"layer: use transformers' DynamicCache for this model")
    kinds = getattr(cfg, "layer_types", None)
    if kinds is not None:
        bad = sorted({k for k in kinds if k not in ATTENTION_KINDS})
        if bad:
            raise HFSupportError(f"{name} has layers of kind {bad}; MSpecKVCache serves softmax-attention layers "
                                 f"only ({', '.join(ATTENTION_KINDS)}): use transformers' own cache for this model")
        if len(kinds) != n:
            raise HFSupportError(f"{name}: config.layer_types has {len(kinds)} entries for {n} layers")
        return [k == "sliding_attention" for k in kinds]
    slides = getattr(cfg, "sliding_window", None) is not None and getattr(cfg, "use_sliding_window", True)
    return [bool(slides)] * n


class MSpecKVCache(Cache):
    """A drop-in transformers cache over our storage: ``model.generate(ids, past_key_values=MSpecKVCache(model,
    placement=Placement(on_chip=8, kv_quant="int8", resident_layers=4)))``.

    - ``placement``: where each layer's KV lives (``Placement()``: every layer on the device, dense).
    - ``press``: a Press or a spec string (``"streaming:sinks=4,window=64"``); the cache calls its ``compress()``
      once, after the prefill (the first forward of more than one token). Presses that watch the attention
      queries (SnapKV, H2O, ...) are refused: transformers does not hand queries to a cache.
    - ``max_len``: most tokens the cache holds (prompt + generation; default the model's max_position_embeddings);
      storage is preallocated for it when the first forward arrives.

    ``get_seq_length()`` is the number of tokens seen (the position of the next token), which differs from the rows
    held once a press evicted some; the attention mask is sized to the rows held.
    ``crop(n)``: ``n <= 0`` forgets the newest ``-n`` tokens (transformers 5.x), ``n > 0`` keeps the first ``n``
    (transformers 4.x); both go to our ``rollback`` and are exact within the placement's ``rollback_slack``.
    """

    def __init__(self, model, placement: Placement | None = None, press=None, max_len: int | None = None):
        import transformers

        from .. import validate as v

        if int(transformers.__version__.split(".")[0]) < 5:
            raise HFSupportError(f"mspeckv.hf needs transformers >= 5.0 (its cache-layer API; tested with 5.24), "
                                 f"found {transformers.__version__}: pip install -U 'transformers>=5' (the rest of "
                                 f"mspeckv works with >= 4.56)")

        sliding = _layer_kinds(model)
        cfg = _text_config(model)
        self.n_layers = len(sliding)
        placement = placement if placement is not None else Placement()
        if not isinstance(placement, Placement):
            raise HFSupportError(f"placement must be a mspeckv Placement or None, got {placement!r}")
        if max_len is None:
            max_len = getattr(cfg, "max_position_embeddings", None)
            if max_len is None:
                raise HFSupportError(f"{type(model).__name__}: no max_position_embeddings in its config; pass max_len")
        v.integer("max_len", max_len, lo=1)
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        placement.validate(self.n_layers, head_dim)  # a placement that does not fit the layers: its own message
        on_chip = placement.n_on_chip(self.n_layers)
        slide_idx = [i for i, s in enumerate(sliding) if s]
        off_sliding = [i for i in slide_idx if i >= on_chip]
        if off_sliding:
            raise HFSupportError(
                f"{type(model).__name__} layers {off_sliding} use sliding-window attention, and this placement "
                f"offloads them (on_chip={on_chip} of {self.n_layers}); offloaded storage holds full-attention layers "
                f"only: raise on_chip to at least {max(slide_idx) + 1}, or use Placement() (no offload)")
        if press is not None:
            from ..presses import parse_press

            press = parse_press(press)
            if slide_idx:
                raise HFSupportError(f"{type(model).__name__} has sliding-window layers {slide_idx}; a press cannot "
                                     f"be combined with them (the sliding mask needs contiguous positions): drop it")
            if press is not None and press.observers(self.n_layers):
                raise HFSupportError(
                    f"press {type(press).__name__} watches the attention queries or weights, which transformers does "
                    f"not pass to a cache; use a press that needs no observation (e.g. streaming, kivi without guard, "
                    f"lowrank) or our own runtime (--backend ours)")
        self.placement, self.press, self.max_len, self.sliding = placement, press, max_len, sliding
        self.inner = None
        self._geom: _Geometry | None = None
        self._expect = 0  # next layer of the forward in progress (0: none in progress)
        self._n_new = 0
        self.compressed = False
        super().__init__(layers=[MSpecKVLayer(self, i, s) for i, s in enumerate(sliding)])

    # ------------------------------------------------------------------------------------------------ forward
    def _build(self, k: Tensor) -> None:
        B, H, _, D = k.shape
        self._geom = _Geometry(self.n_layers, H, D, k.dtype, k.device)
        self.inner = make_cache(self._geom, self.placement, B, self.max_len, press=self.press)

    def _update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        if k.dim() != 4 or k.shape != v.shape:
            raise HFSupportError(f"MSpecKVCache expects keys/values (B, H_kv, T, D) of one shape, got "
                                 f"{tuple(k.shape)} and {tuple(v.shape)}")
        if layer == 0:
            if self._expect != 0:  # the previous forward stopped half-way (an exception in the model)
                self.inner.abort()
            if self.inner is None:
                self._build(k)
            self.inner.begin(k.shape[2])
            self._n_new = k.shape[2]
        elif layer != self._expect:
            raise RuntimeError(f"MSpecKVCache: layer {layer} updated when layer {self._expect} was expected; it needs "
                               f"every layer's update once per forward, in order (no layer skipping or KV sharing)")
        g = self._geom
        if (k.shape[0], k.shape[1], k.shape[3]) != (self.inner.batch, g.cfg.n_kv_heads, g.cfg.head_dim) or \
                k.shape[2] != self._n_new:
            raise HFSupportError(
                f"layer {layer}: keys {tuple(k.shape)} do not match this cache's (batch {self.inner.batch}, "
                f"{g.cfg.n_kv_heads} KV heads, {self._n_new} new tokens, head_dim {g.cfg.head_dim}); a cache serves "
                f"one batch size and one head geometry: build a new MSpecKVCache per batch")
        self._expect = layer + 1
        k_all, v_all = self.inner.update(layer, k.to(g.dtype), v.to(g.dtype))
        if layer == self.n_layers - 1:
            self.inner.end()
            self._expect = 0
            if self.press is not None and not self.compressed and self._n_new > 1:
                self.inner.compress()
                self.compressed = True
        return k_all, v_all

    def _mask_sizes(self, query_length: int) -> tuple[int, int]:
        """(kv_length, kv_offset): attention reads the rows held plus the new ones; the offset makes the new rows'
        indices equal their absolute positions (after a press evicted rows, offset = tokens seen - rows held)."""
        if self.inner is None:
            return query_length, 0
        held = self.inner.length()
        return held + query_length, self.inner.next_position() - held

    # ------------------------------------------------------------------------------------------------ Cache API
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0 if self.inner is None else self.inner.next_position()

    def get_mask_sizes(self, query_length, layer_idx: int = 0) -> tuple[int, int]:
        if isinstance(query_length, Tensor):  # transformers 4.x passes cache_position
            query_length = query_length.shape[0]
        return self._mask_sizes(int(query_length))

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return self.max_len

    def crop(self, max_length: int) -> None:
        """``max_length <= 0``: forget the newest ``-max_length`` tokens; ``> 0``: keep the first ``max_length``."""
        if self.inner is None:
            if max_length < 0:
                raise ValueError(f"crop({max_length}) on an empty MSpecKVCache")
            return
        seen = self.inner.next_position()
        n = -max_length if max_length <= 0 else max(0, seen - max_length)
        if n > seen:
            raise ValueError(f"crop({max_length}): the cache holds only {seen} tokens")
        self.inner.rollback(n)

    def reset(self) -> None:
        self.inner, self._geom, self._expect, self.compressed = None, None, 0, False

    def reorder_cache(self, beam_idx) -> None:
        self._no_batch_ops("beam search")

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._no_batch_ops("num_return_sequences > 1 / beam search")

    def batch_select_indices(self, indices) -> None:
        self._no_batch_ops("contrastive search / batch selection")

    def _no_batch_ops(self, what: str):
        raise HFSupportError(f"MSpecKVCache does not support {what} (it would reorder or repeat batch rows of "
                             f"offloaded storage); use greedy or sampled generation with one sequence per prompt row")

    def memory_report(self) -> dict:
        return {} if self.inner is None else self.inner.memory_report()
