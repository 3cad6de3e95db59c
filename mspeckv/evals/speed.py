"""KV memory and decode speed of each variant at one context (the overview table's KV MB, bytes/token, TTFT, TPOT
and tok/s columns).

A prompt of ``context - speed_gen`` tokens of real text is generated from greedily for ``--speed-gen`` tokens through
the variant's cache (``evals.generation.greedy``: prefill, ``compress()``, then every token through the compressed
cache; EOS ignored), so the sequence ends at exactly ``context`` tokens. ``kv_bytes`` is what the cache holds then,
with every one of the ``context`` tokens fed (``memory_report()['kv_bytes']`` or the held rows, see
``variants.kv_bytes``): a press's compressed prompt plus the generated rows appended after it; ``kv_bytes_prompt``
is what it held right after the prompt. ``compression`` (rendered) is the full cache's ``kv_bytes`` over the
variant's at the same context. By default the steps are eager forwards with a host sync per token: on a GPU a small
model's step is then bound by its launches, and TPOT says more about the host than the cache. ``--speed-graphs``
replays CUDA graphs where the variant's cache has a static layout (``graphed`` in each cell says whether it did);
caches holding codes or latents still decode eagerly. Each variant and context first runs one untimed generation
at the exact shape (same prompt, same length), so one-time costs (kernel compilation and autotuning for that shape,
first allocations) stay out of TTFT and TPOT; ``--speed-runs`` timed generations follow, and the cell reports their
medians with every run kept (``ttft_runs``, ``tpot_runs``: their spread is the run-to-run noise). End to end
(``bench.harness.e2e``): ``setup_s`` builds the cache and captures graphs, ``e2e_s`` = setup + TTFT + decode (the
median of each; the step that feeds the last token for the byte count is in none), ``e2e_tok_per_s`` the generated
tokens over ``e2e_s``.
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
