"""Needle-in-a-haystack (context x depth grid) and RULER-style tasks (multi-key needle, variable tracking), scored
from greedy outputs generated through each variant's cache (``evals.generation.greedy``: the press is applied to the
prompt minus its last token, so every generated token reads the compressed history).

- The prompts have ``context - 48`` tokens (``synth.GEN_MAX``), so prompt + generated tokens fit in ``context``.
- needle: for each depth in ``--needle-depths``, ``--needle-trials`` prompts (seeds ``EvalConfig.task_seed(trial)``:
  ``seed*1000 + trial``, 500 further on in the confirm split) with ``--needle-count`` distinct needles; correct = the
  first 7-digit number in the output is the asked needle's value (``synth.score_needle``). Output: accuracy per depth
  and overall, with its 95% Wilson interval (``ci95``; 50 needles per cell by default).
- The haystacks come from the documents of ``--split`` (``data.corpora.doc_split``).
- ruler: ``--ruler-samples`` prompts per task; multikey is scored like the needle; vartrack by the fraction of the
  chain's variable names present in the output (``synth.score_all``), and exact when all are.
"""

from __future__ import annotations

from .generation import greedy
from .intervals import wilson
from .synth import GEN_MAX, multikey_prompt, needle_prompt, score_all, score_needle, vartrack_prompt
from .variants import Variant

NEEDLE_NEW, VT_NEW = 16, GEN_MAX


def _answer(ev, v: Variant, ids: list[int], max_new: int) -> str:
    """The text greedily generated after ``ids`` through the variant's cache."""
    return ev.tok.decode(greedy(ev.model, v, ids, max_new, ev.cfg.prefill_chunk).tokens, skip_special_tokens=True)


def run_needle(ev, variants: list[Variant], context: int) -> dict[str, dict[str, dict]]:
    cfg = ev.cfg
    prompts = [needle_prompt(ev.tok, context - GEN_MAX, d, seed=cfg.task_seed(t), n_needles=cfg.needle_count,
                             dataset=cfg.dataset, split=cfg.split)
               for d in cfg.needle_depths for t in range(cfg.needle_trials)]
    out = {}
    for v in variants:
        per_depth: dict[str, list[int]] = {}
        samples = []
        for p in prompts:
            text = _answer(ev, v, p.ids, NEEDLE_NEW)
            ok = score_needle(text, p.answers[0])
            per_depth.setdefault(f"{p.depth:g}", []).append(int(ok))
            samples.append({"depth": p.depth, "key": p.info["key"], "value": p.answers[0], "output": text,
                            "correct": ok})
        n = sum(len(x) for x in per_depth.values())
        hits = sum(sum(x) for x in per_depth.values())
        out[v.name] = {"accuracy": hits / n, "n": n, "hits": hits, "ci95": wilson(hits, n), "split": cfg.split,
                       "seeds": sorted({cfg.task_seed(t) for t in range(cfg.needle_trials)}),
                       "accuracy_by_depth": {d: sum(x) / len(x) for d, x in per_depth.items()}, "samples": samples}
        ev.progress(f"needle ctx={context} {v.name}: {out[v.name]['accuracy']:.2f}")
    return {"needle": out}


def run_ruler(ev, variants: list[Variant], context: int) -> dict[str, dict[str, dict]]:
    cfg = ev.cfg
    n = context - GEN_MAX
    mk = [multikey_prompt(ev.tok, n, seed=cfg.task_seed(i), n_keys=cfg.ruler_keys, dataset=cfg.dataset,
                          split=cfg.split) for i in range(cfg.ruler_samples)]
    vt = [vartrack_prompt(ev.tok, n, seed=cfg.task_seed(i), hops=cfg.vt_hops, dataset=cfg.dataset, split=cfg.split)
          for i in range(cfg.ruler_samples)]
    out = {}
    for v in variants:
        mk_ok, vt_frac, samples = [], [], []
        for p in mk:
            text = _answer(ev, v, p.ids, NEEDLE_NEW)
            mk_ok.append(int(score_needle(text, p.answers[0])))
            samples.append({"task": "multikey", "answers": p.answers, "output": text, "score": mk_ok[-1]})
        for p in vt:
            text = _answer(ev, v, p.ids, VT_NEW)
            vt_frac.append(score_all(text, p.answers))
            samples.append({"task": "vartrack", "answers": p.answers, "output": text, "score": vt_frac[-1]})
        mk_acc = sum(mk_ok) / len(mk_ok)
        vt_acc = sum(vt_frac) / len(vt_frac)
        out[v.name] = {"accuracy": (mk_acc + vt_acc) / 2, "multikey_accuracy": mk_acc, "vartrack_score": vt_acc,
                       "vartrack_exact": sum(f == 1.0 for f in vt_frac) / len(vt_frac), "n_per_task": len(mk),
                       "samples": samples}
        ev.progress(f"ruler ctx={context} {v.name}: {out[v.name]['accuracy']:.2f}")
    return {"ruler": out}
