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
caches holding codes or latents still decode eagerly. Each variant first runs one untimed short generation
(256-token prompt, 4 tokens) through its own cache type, so one-time costs (kernel compilation, first allocations) stay
out of its TTFT and TPOT.
"""

from __future__ import annotations

from ..data.corpora import long_prompt
from .generation import greedy
from .variants import Variant

_WARM: set[tuple[int, str, bool]] = set()


def run(ev, variants: list[Variant], context: int) -> dict[str, dict[str, dict]]:
    cfg, model = ev.cfg, ev.model
    ids = long_prompt(ev.tok, context - cfg.speed_gen, seed=cfg.seed + 1000, dataset=cfg.dataset)
    out = {}
    for v in variants:
        if (id(model), v.name, cfg.speed_graphs) not in _WARM:
            greedy(model, v, ids[:min(len(ids), 256)], 4, cfg.prefill_chunk, eos=False, graphs=cfg.speed_graphs)
            _WARM.add((id(model), v.name, cfg.speed_graphs))
        g = greedy(model, v, ids, cfg.speed_gen, cfg.prefill_chunk, eos=False, feed_last=True, graphs=cfg.speed_graphs)
        out[v.name] = {"kv_bytes": g.kv_bytes_end, "bytes_per_token": g.kv_bytes_end / context,
                       "kv_bytes_prompt": g.kv_bytes, "ttft_s": g.ttft_s, "tpot_s": g.tpot_s,
                       "tok_per_s": g.tok_per_s, "decode_tokens": len(g.tokens) - 1, "prompt_tokens": len(ids),
                       "sequence_tokens": context, "graphed": g.graphed, "eager_steps": g.eager_steps}
        ev.progress(f"speed ctx={context} {v.name}")
    return {"speed": out}
