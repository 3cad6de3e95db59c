"""Acceptance of each variant's press as the MSpecKV middle level (a lossless, speed-relevant quality metric).

At each context, ``--accept-prompts`` prompts of ``context - accept_gen`` tokens of real text (``long_prompt``, seeds
``seed*1000 + i``; the sequence ends at ``context`` tokens) are generated from greedily with
``speculative_generate(target, draft, ...)`` in MSpecKV mode, ``--accept-gen`` new tokens each.
The variant's press is the middle level (``SpecConfig.l1_press``) and its placement the full-KV level's; the baseline
row uses today's retrieval middle level (``--accept-budget`` tokens) with nothing offloaded. Reported: the middle
level's acceptance rate (``verify_l1``: accepted / proposed draft tokens, pooled over prompts) and the full-KV
level's accepted tokens per verification.
"""

from __future__ import annotations

import torch

from ..config import GenerationConfig, SamplingConfig
from ..data.corpora import long_prompt
from .variants import Variant, spec_config


def _pooled(runs: list, level: str, key: str) -> int:
    """``key`` of ``level`` summed over the prompts' results (0 where a run has no such level)."""
    return sum((r.levels.get(level) or {}).get(key, 0) for r in runs)


def run(ev, variants: list[Variant], context: int) -> dict[str, dict[str, dict]]:
    from ..decoding.speculative import speculative_generate

    cfg = ev.cfg
    gen = GenerationConfig(max_new_tokens=cfg.accept_gen, sampling=SamplingConfig(temperature=0.0),
                           stop_on_eos=False, prefill_chunk=cfg.prefill_chunk)
    prompts = [long_prompt(ev.tok, context - cfg.accept_gen, seed=cfg.task_seed(i), dataset=cfg.dataset,
                           split=cfg.split)
               for i in range(cfg.accept_prompts)]
    out = {}
    for v in variants:
        spec = spec_config(v, gamma=cfg.gamma, draft_gamma=cfg.draft_gamma, budget=cfg.accept_budget, chunk=8)
        runs = []
        for i, ids in enumerate(prompts):
            ev.progress(f"accept ctx={context} {v.name}: prompt {i + 1}/{len(prompts)}")  # a long run shows where
            runs.append(speculative_generate(ev.model, ev.draft, torch.tensor([ids]), gen, spec, placement=v.placement))
        l1, proposed = _pooled(runs, "verify_l1", "accepted"), _pooled(runs, "verify_l1", "proposed")
        l2, rounds = _pooled(runs, "verify_l2", "accepted"), _pooled(runs, "verify_l2", "rounds")
        out[v.name] = {"l1_acceptance_rate": l1 / proposed if proposed else None, "l1_proposed": proposed,
                       "l1_accepted": l1, "l2_accepted_per_round": l2 / rounds if rounds else None,
                       "tok_per_s_mean": sum(r.tok_per_s for r in runs) / len(runs), "prompts": len(prompts),
                       "gen": cfg.accept_gen}
        ev.progress(f"accept ctx={context} {v.name}: {out[v.name]['l1_acceptance_rate']}")
    return {"accept": out}
