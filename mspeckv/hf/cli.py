"""``mspeckv generate --backend hf``: the model runs through transformers' ``generate`` with an ``MSpecKVCache``."""

from __future__ import annotations

import sys
import time


def generate_hf(a, text: str) -> int:
    """Load ``--model`` with ``AutoModelForCausalLM``, build the cache from the placement flags (and ``--press``),
    and generate with transformers. Speculative modes belong to our runtime (the default backend)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..cli import _encode, _placement, _sampling
    from ..model.api import default_dtype, parse_device
    from ..model.loading import resolve
    from .cache import MSpecKVCache, cache_argument

    if a.mode != "ar":
        raise ValueError("--backend hf runs transformers' own generate: use --mode ar (speculative modes run on "
                         "--backend ours)")
    if a.press_every is not None:
        raise ValueError("--press-every belongs to --backend ours; with --backend hf the press runs once, after the "
                         "prefill")
    placement, samp = _placement(a), _sampling(a)
    device = parse_device(a.device)
    d = resolve(str(a.model))
    model = AutoModelForCausalLM.from_pretrained(d, dtype=default_dtype(device)).to(device).eval()
    tok = AutoTokenizer.from_pretrained(str(d))
    ids = _encode(tok, text, a.chat)
    if not ids:
        raise ValueError("the prompt encodes to 0 tokens; give some text")
    cache = MSpecKVCache(model, placement=placement, press=a.press, max_len=len(ids) + a.max_new_tokens)
    kw = {"do_sample": False} if samp.temperature == 0 else {
        "do_sample": True, "temperature": samp.temperature, "top_k": samp.top_k or None, "top_p": samp.top_p}
    torch.manual_seed(samp.seed)
    x = torch.tensor([ids], device=device)
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=a.max_new_tokens,
                             **{cache_argument(model): cache}, **kw)
    dt = time.perf_counter() - t0
    new = out[0, len(ids):]
    print(tok.decode(new, skip_special_tokens=True))
    print(f"\n[hf | {type(model).__name__} on {device}] prompt {len(ids)} tok | {len(new)} tokens in {dt:.2f} s | "
          f"{len(new) / dt:.2f} tok/s | {placement.describe(cache.n_layers)}"
          + (f" | press {a.press}" if a.press else ""), file=sys.stderr)
    return 0
