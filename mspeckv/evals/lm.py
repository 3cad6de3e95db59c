"""Perplexity, KL(full || compressed) with top-1 agreement, ECE and per-layer attention cosine similarity: one
teacher-forced pass per window gives all four.

Protocol at context ``C`` with scored span ``S`` (``--scored``), ``W`` windows (``--windows``) and stride ``R``
(``--stride``):

- Windows of ``C + 1`` token ids of real text (``--dataset``, ``--seed``, from the documents of ``--split``). On a
  corpus of long documents (pycode, pypackages, shakespeare, a path) every window lies inside ONE document
  (``data.corpora.doc_windows``: spread over as many documents as there are, windows of one document ``R`` apart,
  default ``C + 1``); each cell names them (``window_docs``: ``name@offset``). BBC and newsgroups are short,
  unrelated articles (``data.corpora.unrelated``): there a window is ``stream[w*R : w*R + C + 1]`` of
  ``long_prompt``'s concatenation (default ``R = C``), it spans several articles, and the report judges no goal on it.
- The context floor: unless ``--floor 0``, the pass also scores ``variants.floor_spec(F)``, StreamingLLM keeping
  only the last ``F`` prefix tokens (and the press's 4 sinks), at contexts whose prefix is longer than that. How much
  worse it is than the full cache says how much the scored text depends on the prefix beyond its last ``F`` tokens:
  the report's context-sensitivity row.
- The prefix ``window[0 : C-S]`` is prefilled into the variant's cache (chunks of ``--prefill-chunk``), then
  ``cache.compress()`` applies the press (placements need nothing: their quantization happens as rows are stored).
- The scored segment ``window[C-S : C]`` is fed through that cache in chunks of ``--score-chunk`` tokens with
  ``num_logits=None``; its logits are scored against ``window[C-S+1 : C+1]``: ``S`` targets per window, each
  predicted from the compressed prefix plus the segment rows before it (rows of the segment itself are appended
  through the cache as in decoding: uncompressed for a press applied once after prefill, stored in the placement's
  format for a placement). The last prediction attends over ``C`` tokens.
- The full-cache baseline runs the same windows through a dense cache in the same invocation; its logits of the
  scored span are kept (``S x V`` fp32 per window) and every variant's KL and top-1 agreement are taken against them.
- ``ppl = exp(mean NLL)`` over all ``W * S`` scored targets, and ``window_nll`` each window's mean NLL (the
  report's paired bootstrap interval on the PPL Δ resamples these); ``kl_mean`` is the mean over the same positions of
  ``KL(p_full || p_variant)`` in nats; ``top1_agreement`` the fraction where the two argmaxes agree; ``ece`` uses 10
  equal-width bins of the variant's top-1 probability against whether its argmax is the target.
- Attention: forward hooks on every layer's ``self_attn`` (its output after ``o_proj``) record, at ``--attn-queries``
  seeded sampled positions of each window's scored span, the full and the variant run's attention outputs; the
  cosine of the two is averaged per layer. Each run feeds its own hidden states, so a layer's cosine includes the
  drift from the layers below it (end-to-end, not layer-isolated).
"""

from __future__ import annotations

import random

import torch

from ..data.corpora import Window, corpus_label, corpus_version, doc_windows, long_prompt, unrelated
from .metrics import Accumulator, cosine
from .variants import Variant, build_cache, kv_bytes

METRICS = ("ppl", "kl", "ece", "attention")  # what run() returns (the registry is evals.runner.FAMILIES)


class _AttnTap:
    """Captures each layer's attention output rows at the sampled positions of the current chunk."""

    def __init__(self, model):
        self.rows: list[list[torch.Tensor]] = [[] for _ in model.model.layers]
        self.sel: torch.Tensor | None = None
        self.handles = [layer.self_attn.register_forward_hook(self._hook(i))
                        for i, layer in enumerate(model.model.layers)]

    def _hook(self, i: int):
        def fn(_module, _inp, out):
            if self.sel is not None and len(self.sel):
                self.rows[i].append(out[0, self.sel].float())
        return fn

    def take(self) -> list[torch.Tensor]:
        out = [torch.cat(r) if r else torch.empty(0) for r in self.rows]
        self.rows = [[] for _ in self.rows]
        return out

    def close(self) -> None:
        for h in self.handles:
            h.remove()


@torch.inference_mode()
def _score_window(model, variant: Variant, window: torch.Tensor, S: int, chunk: int, prefill_chunk: int,
                  sample: torch.Tensor, tap: _AttnTap):
    """-> (logits (S, V) fp32, targets (S,), attention rows per layer at ``sample``, kv bytes after compress)."""
    C = window.shape[1] - 1
    cache = build_cache(model, variant, 1, C, tail=S)
    model.prefill(window[:, :C - S], cache, chunk=prefill_chunk)
    cache.compress()
    held = kv_bytes(cache)
    logits = []
    for s in range(0, S, chunk):
        e = min(S, s + chunk)
        tap.sel = sample[(sample >= s) & (sample < e)] - s
        logits.append(model(window[:, C - S + s:C - S + e], cache, num_logits=None)[0])
    tap.sel = None
    return torch.cat(logits), window[0, C - S + 1:C + 1], tap.take(), held


def windows(tok, cfg, context: int) -> list[Window]:
    """The run's ``cfg.windows`` windows of ``context + 1`` ids (see the module docstring)."""
    if unrelated(cfg.dataset):
        R = cfg.stride or context
        stream = long_prompt(tok, context + 1 + (cfg.windows - 1) * R, seed=cfg.seed, dataset=cfg.dataset,
                             split=cfg.split)
        return [Window("(across documents)", w * R, stream[w * R:w * R + context + 1]) for w in range(cfg.windows)]
    return doc_windows(tok, context + 1, cfg.windows, cfg.seed, cfg.dataset, cfg.split, cfg.stride)


def run(ev, variants: list[Variant], context: int) -> dict[str, dict[str, dict]]:
    """-> {metric: {variant name: results}} for ppl, kl, ece and attention at one context. ``variants[0]`` must be
    the full-cache baseline."""
    cfg, model, tok = ev.cfg, ev.model, ev.tok
    if not variants[0].is_baseline:
        raise ValueError("the first variant of an lm pass must be the full-cache baseline")
    C, S = context, cfg.scored
    model.check_context(C)
    wins = windows(tok, cfg, C)
    acc = {v.name: Accumulator() for v in variants}
    held: dict[str, list[int]] = {v.name: [] for v in variants}
    per_window: dict[str, list[float]] = {v.name: [] for v in variants}
    tap = _AttnTap(model)
    try:
        for w, win in enumerate(wins):
            window = torch.tensor([win.ids], device=model.device)
            rng = random.Random(f"attn:{cfg.seed}:{C}:{w}")
            sample = torch.tensor(sorted(rng.sample(range(S), min(cfg.attn_queries, S))), dtype=torch.long,
                                  device=model.device)
            ref_logits = ref_rows = None
            for v in variants:
                logits, targets, rows, nb = _score_window(model, v, window, S, cfg.score_chunk, cfg.prefill_chunk,
                                                          sample, tap)
                held[v.name].append(nb)
                if v.is_baseline:
                    ref_logits, ref_rows = logits, rows
                nll = acc[v.name].add_tokens(logits, targets, None if v.is_baseline else ref_logits)
                per_window[v.name].append(nll / S)
                if len(sample):
                    acc[v.name].add_cosines([cosine(r, f) for r, f in zip(rows, ref_rows, strict=True)])
                del logits
            ev.progress(f"lm ctx={C} window {w + 1}/{len(wins)} ({win.doc})")
    finally:
        tap.close()
    across = unrelated(cfg.dataset)
    stride = cfg.stride or (C if across else C + 1)
    out: dict[str, dict[str, dict]] = {m: {} for m in METRICS}
    for v in variants:
        r = acc[v.name].results()
        common = {"scored_tokens": r["scored_tokens"], "kv_bytes_prefix": sum(held[v.name]) / len(held[v.name]),
                  "prefix_tokens": C - S, "windows": len(wins), "stride": stride, "scored_span": S,
                  "corpus": corpus_label(cfg.dataset), "corpus_version": corpus_version(cfg.dataset),
                  "across_documents": across, "window_docs": [f"{x.doc}@{x.start}" for x in wins]}
        out["ppl"][v.name] = {**common, "ppl": r["ppl"], "nll_mean": r["nll_mean"], "accuracy_top1": r["accuracy_top1"],
                              "window_nll": per_window[v.name]}
        out["kl"][v.name] = {**common, "kl_mean": r["kl_mean"], "top1_agreement": r["top1_agreement"]}
        out["ece"][v.name] = {**common, "ece": r["ece"], "ece_bins": r["ece_bins"]}
        out["attention"][v.name] = {**common, **{k: r[k] for k in r if k.startswith("attn_")}}
    return out
