"""``mspeckv generate --prompts FILE.jsonl``: many prompts through the batched engine (``decoding/batch.py``; with
``--mode self|vanilla`` speculation at batch, ``decoding/batch_spec.py``), one JSON line out per prompt, in input
order. CLI only."""

from __future__ import annotations

import json
import sys

from . import cli_checks as checks
from .cli_common import encode, model_and_placement, sampling

# the generate flags that apply to --prompts; every other one, changed from its default, is refused
APPLIES = {"model", "prompts", "batch", "out", "gpu_memory", "chat", "max_new_tokens", "prefill_chunk", "device",
           "temperature", "top_p", "top_k", "seed", "greedy", "on_chip", "kv_quant", "kv_group_size", "resident_layers",
           "resident_format", "resident_policy", "press", "allow_lossy", "mode", "gamma", "draft", "self_window",
           "self_sinks", "auto_gamma", "draft_gamma", "tp"}


def check(a) -> list:
    """Everything that can be refused before the weights load; returns the prompt lines."""
    from .config import GenerationConfig
    from .data.prompts import read_prompts

    extra = [f for f in checks.changed(a, *getattr(a, "_defaults", {})) if f[2:].replace("-", "_") not in APPLIES]
    checks.refuse(extra, "--prompts runs batched decoding: --mode ar, or speculation at batch with --mode self, "
                         "vanilla or mspeckv (--gamma, --draft, --draft-gamma, --self-window, --self-sinks, "
                         "--auto-gamma)")
    if a.mode != "ar":
        spec_config(a)
        if a.press is not None or a.on_chip is not None:
            raise ValueError(f"--mode {a.mode} at batch runs over the dense batched KV on the GPU: drop --press and "
                             f"--on-chip, or use --mode ar")
        if a.mode in ("vanilla", "mspeckv") and a.gpu_memory is not None:
            raise ValueError(f"--gpu-memory does not count a draft model's weights and KV yet: drop it with --mode "
                             f"{a.mode}")
    if a.batch is not None and a.batch < 1:
        raise ValueError(f"--batch must be >= 1 (sequences in flight), got {a.batch}")
    if a.gpu_memory is not None and not a.gpu_memory > 0:
        raise ValueError(f"--gpu-memory must be > 0 GB, got {a.gpu_memory}")
    GenerationConfig(max_new_tokens=a.max_new_tokens, sampling=sampling(a), prefill_chunk=a.prefill_chunk)
    lines = read_prompts(a.prompts)
    cfg, p = model_and_placement(a)
    if a.gpu_memory is not None and (a.press is not None or p.n_on_chip(cfg.n_layers) < cfg.n_layers):
        raise ValueError("--gpu-memory budgets the dense batched KV; with --on-chip or --press each sequence's cache "
                         "is placed or pressed on its own: drop --gpu-memory (or the placement)")
    longest = max(x.max_new_tokens or a.max_new_tokens for x in lines)
    checks.generation_fits(cfg, longest)
    if a.mode in ("vanilla", "mspeckv"):
        dcfg = checks.model_config(a.draft)
        if dcfg.vocab_size != cfg.vocab_size:
            raise ValueError(f"--draft {a.draft} has a vocabulary of {dcfg.vocab_size}, the model {a.model} one of "
                             f"{cfg.vocab_size}; pick a draft from the same model family")
    if a.gpu_memory is not None:  # before the weights load, prompts count one token each (a lower bound); the exact
        from .cache import check_gpu_memory  # check follows the tokenizer, before the KV allocates

        check_gpu_memory(cfg, min(a.batch or len(lines), len(lines)), 1 + longest, 2, a.gpu_memory)
    if a.out:
        from .runs.checks import out_file

        out_file("--out", a.out)
    return lines, p


def spec_config(a):
    from .decoding.batch_spec import BatchSpecConfig

    return BatchSpecConfig(a.mode, a.gamma, sinks=a.self_sinks, window=a.self_window, auto=a.auto_gamma,
                           draft_gamma=a.draft_gamma)


def generate_many(a) -> int:
    from .model.api import load

    lines, p = check(a)
    model, tok, _ = load(a.model, a.device)
    draft = None
    if a.mode in ("vanilla", "mspeckv"):
        from .decoding.speculative import check_pair

        draft, dtok, _ = load(a.draft, a.device)
        check_pair(model, draft, tok, dtok)
    eng, res = run_many(a, lines, p, model, tok, draft)
    report_many(a, lines, eng, res, tok)
    return 0


def run_many(a, lines, p, model, tok, draft):
    """Encode the prompt lines, build the engine (AR or speculation at batch), decode them all -> (engine, result)."""
    from .config import GenerationConfig
    from .decoding.batch import BatchEngine, batch_cache

    ids = [encode(tok, x.prompt, a.chat) for x in lines]
    max_new = [x.max_new_tokens or a.max_new_tokens for x in lines]
    gen = GenerationConfig(max_new_tokens=max(max_new), sampling=sampling(a), prefill_chunk=a.prefill_chunk)
    batch = min(a.batch or len(ids), len(ids))
    cap = max(len(p) + m for p, m in zip(ids, max_new, strict=True))
    if a.gpu_memory is not None:
        from .cache import check_gpu_memory

        check_gpu_memory(model.cfg, batch, cap, model.dtype.itemsize, a.gpu_memory)
    if a.mode == "ar":
        eng = BatchEngine(model, batch, cap, gen, cache=batch_cache(model, batch, cap, p, a.press))
    else:
        from .decoding.batch_spec import BatchSpecEngine

        eng = BatchSpecEngine(model, draft, batch, cap, gen, spec_config(a))
    return eng, eng.run(ids, max_new)


def report_many(a, lines, eng, res, tok, where: str = "") -> None:
    """One JSON line per prompt (to --out or stdout), then the run's summary on stderr."""
    from .runs.store import atomic_write_text

    rows = []
    for x, s in zip(lines, res.seqs, strict=True):
        d = {"index": s.index, **({"id": x.id} if x.id is not None else {}), "prompt_tokens": len(s.prompt),
             "tokens": s.tokens, "text": tok.decode(s.tokens, skip_special_tokens=True),
             "finish_reason": s.finish, "ttft_s": s.ttft_s, "latency_s": s.done_s}
        rows.append(json.dumps(d, ensure_ascii=False))
    text = "\n".join(rows) + "\n"
    if a.out:
        atomic_write_text(a.out, text)
    else:
        sys.stdout.write(text)
    s = res.summary()
    if a.mode != "ar":
        acc = eng.accepted / eng.drafted if eng.drafted else float("nan")
        per_round = (eng.accepted + eng.seq_rounds) / max(1, eng.seq_rounds)
        why = "".join(f" | cost model, batch {b}: {cm.record()['reason']}" for b, cm in eng.costs.items())
        print(f"[speculation at batch | {a.mode}, γ {'≤ ' if a.auto_gamma else ''}{a.gamma}] {eng.rounds} rounds | "
              f"acceptance {acc:.2f} | tokens per sequence-round {per_round:.2f}{why}", file=sys.stderr)
    print(f"[batched {a.mode} | {eng.model.cfg.family} on {eng.model.device}{where}] {len(lines)} prompts, "
          f"{eng.max_batch} in flight | prefill {s['prefill_s']:.2f} s | decode {s['tok_per_s']:.1f} tok/s | end to "
          f"end {s['e2e_tok_per_s']:.1f} tok/s | setup {s['setup_s']:.2f} s", file=sys.stderr)
