"""``mspeckv generate --backend hf``: the model runs through transformers' ``generate`` with an ``MSpecKVCache``."""

from __future__ import annotations

import sys
import time

from ..cli_common import encode, placement, preflight, sampling


def generate_hf(a, text: str) -> int:
    """Load ``--model`` with ``AutoModelForCausalLM``, build the cache from the placement flags (and ``--press``),
    and generate with transformers. Speculative modes belong to our runtime (the default backend); every flag is
    checked (``cli_common.preflight``) before the weights load."""
    preflight(a)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..model.api import default_dtype, parse_device
    from ..model.loading import resolve
    from .cache import MSpecKVCache, cache_argument

    p, samp = placement(a), sampling(a)
    device = parse_device(a.device)
    d = resolve(str(a.model))
    model = AutoModelForCausalLM.from_pretrained(d, dtype=default_dtype(device)).to(device).eval()
    tok = AutoTokenizer.from_pretrained(str(d))
    ids = encode(tok, text, a.chat)
    cache = MSpecKVCache(model, placement=p, press=a.press, max_len=len(ids) + a.max_new_tokens)
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
    where = p.describe(cache.n_layers)
    if p.n_on_chip(cache.n_layers) >= cache.n_layers:  # nothing offloaded: the KV is wherever the model runs
        where = f"all {cache.n_layers} layers' KV on the {device.type.upper()}"
    print(tok.decode(new, skip_special_tokens=True))
    print(f"\n[hf | {type(model).__name__} on {device}] prompt {len(ids)} tok | {len(new)} tokens in {dt:.2f} s | "
          f"{len(new) / dt:.2f} tok/s | {where}" + (f" | press {a.press}" if a.press else ""), file=sys.stderr)
    return 0
