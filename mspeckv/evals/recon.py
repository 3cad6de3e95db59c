"""Reconstruction error of the held KV: per layer, the relative MSE ``||K_held - K_full||^2 / ||K_full||^2`` (and the
same for V) between the rows a variant's cache holds after prefill + ``compress()`` and the full cache's rows at the
same absolute positions (``cache.positions(layer)``), both post-RoPE as ``cache.read(layer)`` returns them.

The prompt is ``context`` tokens of real text (``long_prompt``, ``--seed``, ``--dataset``). Rows a press evicted are
not in the error (they are not reconstructed at all); ``kept_fraction`` says how many rows were held.
"""

from __future__ import annotations

import torch

from ..data.corpora import long_prompt
from .metrics import relative_mse
from .variants import Variant, build_cache, held


@torch.inference_mode()
def run(ev, variants: list[Variant], context: int) -> dict[str, dict[str, dict]]:
    model = ev.model
    model.check_context(context)
    ids = torch.tensor([long_prompt(ev.tok, context, seed=ev.cfg.seed, dataset=ev.cfg.dataset, split=ev.cfg.split)],
                       device=model.device)
    full = build_cache(model, Variant(), 1, context)
    model.prefill(ids, full, chunk=ev.cfg.prefill_chunk)
    out = {}
    for v in variants:
        cache = full
        if not v.is_baseline:
            cache = build_cache(model, v, 1, context, tail=1)
            model.prefill(ids, cache, chunk=ev.cfg.prefill_chunk)
            cache.compress()
        k_mse, v_mse, kept = [], [], []
        for layer in range(model.cfg.n_layers):
            k, val, pos = held(cache, layer)
            kf, vf = full.read(layer)
            idx = pos.long()[..., None].expand(-1, -1, -1, kf.shape[-1])
            k_mse.append(relative_mse(k, kf.gather(2, idx)))
            v_mse.append(relative_mse(val, vf.gather(2, idx)))
            kept.append(pos.shape[-1] / context)
        n = len(k_mse)
        out[v.name] = {"k_rel_mse_per_layer": k_mse, "v_rel_mse_per_layer": v_mse, "k_rel_mse_mean": sum(k_mse) / n,
                       "v_rel_mse_mean": sum(v_mse) / n, "k_rel_mse_max": max(k_mse), "v_rel_mse_max": max(v_mse),
                       "kept_fraction": sum(kept) / n, "prompt_tokens": context}
        del cache
        ev.progress(f"recon ctx={context} {v.name}")
    return {"recon": out}
