"""KV memory and decode speed of each variant at one context (the overview's KV MB, bytes/token, TTFT, TPOT, tok/s).

A prompt of ``context - speed_gen`` tokens of real text is generated from greedily for ``--speed-gen`` tokens through
the variant's cache (``evals.generation.greedy``; EOS ignored), so the sequence ends at exactly ``context`` tokens.
``kv_bytes`` is what the cache holds then (``variants.kv_bytes``: a press's compressed prompt plus the generated rows
appended after it), ``kv_bytes_prompt`` what it held right after the prompt; the rendered ``compression`` is the
full cache's ``kv_bytes`` over the variant's. By default the steps are eager with a host sync per token (on a GPU a
small model's TPOT then says more about the host than the cache); ``--speed-graphs`` replays CUDA graphs where the
cache has a static layout (``graphed`` says whether it did; codes and latents stay eager). One untimed generation at
the exact shape comes first (kernel autotuning, first allocations), then ``--speed-runs`` timed ones: the cell has
their medians and every run (``ttft_runs``, ``tpot_runs``: the run-to-run noise). End to end (``runs.harness.e2e``):
``setup_s`` builds the cache and captures graphs, ``e2e_s`` = setup + TTFT + decode (medians; the step that feeds
the last token for the byte count is in none), ``e2e_tok_per_s`` the generated tokens over ``e2e_s``.
"""

from __future__ import annotations

from ..data.corpora import long_prompt
from ..runs.harness import median_e2e, median_of, repeat
from .generation import greedy
from .variants import Variant


def run(ev, variants: list[Variant], context: int) -> dict[str, dict[str, dict]]:
    cfg, model = ev.cfg, ev.model
    ids = long_prompt(ev.tok, context - cfg.speed_gen, seed=cfg.seed + 1000, dataset=cfg.dataset,
                      split=cfg.split)
    out = {}
    for v in variants:  # one untimed generation at the exact shape, then the timed ones
        runs = repeat(lambda v=v: greedy(model, v, ids, cfg.speed_gen, cfg.prefill_chunk, eos=False, feed_last=True,
                                         graphs=cfg.speed_graphs), cfg.speed_runs)
        g, m = runs[-1], median_of(runs, "ttft_s", "tpot_s")
        out[v.name] = {"kv_bytes": g.kv_bytes_end, "bytes_per_token": g.kv_bytes_end / context,
                       "kv_bytes_prompt": g.kv_bytes, **m, "tok_per_s": 1.0 / m["tpot_s"] if m["tpot_s"] else None,
                       **median_e2e(runs, len(g.tokens)),
                       "ttft_runs": [r.ttft_s for r in runs], "tpot_runs": [r.tpot_s for r in runs],
                       "decode_tokens": len(g.tokens) - 1, "prompt_tokens": len(ids),
                       "sequence_tokens": context, "graphed": g.graphed, "eager_steps": g.eager_steps}
        ev.progress(f"speed ctx={context} {v.name}")
    return {"speed": out}
