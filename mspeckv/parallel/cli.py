"""``mspeckv generate --tp N``: the same generation on N tensor-parallel ranks (spawned here, or under torchrun).

The target is sharded (``parallel/tp.py``); the draft model, when there is one, is replicated: every rank runs the whole
draft on its own GPU with no communication, so all ranks propose the same tokens and the sharded target verifies
them in lockstep (see the README's "Tensor parallelism" section for why). Rank 0 prints; the others are silent.
"""

from __future__ import annotations

import os
import sys

from .. import cli_checks as checks
from ..cli_common import check_flags, encode, preflight, run_generation


def device_type(a) -> str:
    from ..model.api import parse_device

    dev = parse_device(a.device)
    if dev.index is not None:
        raise ValueError(f"--device {a.device} names one GPU, but with --tp each rank i uses cuda:i; pass --device "
                         f"cuda (or set CUDA_VISIBLE_DEVICES to pick the GPUs)")
    return dev.type


def check_generate_tp(a) -> str:
    """The --tp checks of ``generate`` that need no weights; returns the device type the ranks use."""
    from .launch import check_world
    from .tp import check_tp

    if isinstance(a.tp, bool) or not isinstance(a.tp, int) or a.tp < 1:
        raise ValueError(f"--tp must be an integer >= 1, got {a.tp}")
    if a.backend != "ours":
        raise ValueError("--tp runs our own runtime only; drop --backend hf (transformers' generate is not sharded)")
    check_flags(a)  # --press, --press-every and --l1-press declare they act with --tp 1 only (cli_common)
    kind = device_type(a)
    check_world(a.tp, kind)
    check_tp(checks.model_config(a.model), a.tp)
    return kind


def generate_tp(a, text: str) -> int:
    from ..evals.lossy import quality_note
    from .launch import launch

    kind = check_generate_tp(a)
    preflight(a)
    note = quality_note(kv_quant=a.kv_quant, model=a.model)
    if note and os.environ.get("RANK", "0") == "0":  # torchrun: rank 0 only
        print(note, file=sys.stderr)
    launch(_generate_rank, a.tp, (a, text), device_type=kind)
    return 0


def _resolve(ref: str, r) -> str:
    """Resolve (and on first use convert) a model once: rank 0 first, the others after it (no conversion race)."""
    import torch.distributed as dist

    from ..model.loading import resolve

    if ref.startswith("random:"):
        return ref
    if not r.main:
        dist.barrier()
    d = str(resolve(ref, progress=r.main))
    if r.main:
        dist.barrier()
    return d


def _load_rank(r, a, with_draft: bool):
    """This rank's shard of the target, its tokenizer, and (``with_draft``) the whole draft model, replicated."""
    from ..decoding.speculative import check_pair
    from ..model.api import load, load_tokenizer
    from .tp import load_tp

    target_dir = _resolve(a.model, r)
    draft_dir = _resolve(a.draft, r) if with_draft else None
    if target_dir.startswith("random:"):
        raise ValueError("generate needs a tokenizer; random:<shape> models have none (use bench tp to time them)")
    model = load_tp(target_dir, r.rank, r.world, r.device)
    tok = load_tokenizer(target_dir)
    draft = None
    if draft_dir is not None:
        draft, dtok, _ = load(draft_dir, r.device, progress=False)  # replicated: the whole draft on every rank
        check_pair(model, draft, tok, dtok)
    return model, tok, draft


def _generate_rank(r, a, text: str) -> dict:
    from .tp import check_ranks_agree

    model, tok, draft = _load_rank(r, a, a.mode != "ar" and a.drafter == "model")
    ids = encode(tok, text, a.chat)
    res = run_generation(a, model, tok, draft, ids, a.mode)
    acc = {k: v["accepted"] for k, v in getattr(res, "levels", {}).items()}
    check_ranks_agree({"tokens": res.tokens, "accepted": acc}, "generated tokens and accept counts")
    s = res.summary()
    if r.main:
        print(tok.decode(res.tokens[0], skip_special_tokens=True))
        extra = f" | accepted {s['accepted']:.2f}" if s.get("accepted") is not None else ""
        print(f"\n[{a.mode} | {model.cfg.family} | tp {r.world} on {r.device.type}] prompt {len(ids)} tok | TTFT "
              f"{s['ttft_s']:.3f} s | {s['ms_per_token']:.1f} ms/token | {s['tok_per_s']:.2f} tok/s | "
              f"{s['n_generated']} tokens{extra}", file=sys.stderr)
    return {"tokens": res.tokens}


def generate_many_tp(a) -> int:
    """``generate --prompts --tp N``: the batched engine on N ranks, each over its shard of the target (a draft model
    replicated); rank 0 writes the lines. The cost model is refused (ranks would time their own forwards), and so is
    --gpu-memory (it budgets one GPU's whole KV)."""
    from ..cli_batch import check
    from .launch import launch

    lines, placement = check(a)
    kind = check_generate_tp(a)
    if a.auto_gamma:
        raise ValueError("--auto-gamma is not supported with --tp yet: each rank would pick γ from its own timings; "
                         "give a fixed --gamma")
    if a.gpu_memory is not None:
        raise ValueError("--gpu-memory budgets one GPU's whole KV; with --tp each rank holds a share: drop it")
    launch(_generate_many_rank, a.tp, (a, lines, placement), device_type=kind)
    return 0


def _generate_many_rank(r, a, lines, placement) -> None:
    from ..cli_batch import report_many, run_many
    from .tp import check_ranks_agree

    model, tok, draft = _load_rank(r, a, a.mode in ("vanilla", "mspeckv"))
    eng, res = run_many(a, lines, placement, model, tok, draft)
    check_ranks_agree([s.tokens for s in res.seqs], "generated tokens")
    if r.main:
        report_many(a, lines, eng, res, tok, where=f" | tp {r.world}")
