"""Where a batched decode's time goes, per level: every forward of the run timed with CUDA events on the stream (a
graph replay's GPU time), summed per level, against the decode's wall time; what is left is the host's share and
the idle gaps between forwards (acceptance, rollback, the round's one sync, Python).

    python tools/profile_batch_spec.py --model qwen2.5-coder-1.5b --dataset pycode --context 32256 --batch 32 \
        --mode self --gamma 4 --window 2048 --gen-len 128 --out profile.json

Levels, each per bucket (``level @rows``: sequences that finish leave, and compaction shrinks the forwards):
``draft`` (the draft model's, or self's windowed, one-token steps), ``middle`` (mspeckv: the target over its window
verifying the draft), ``verify`` (the target over its full KV, γ+1 tokens), ``ar`` (one-token steps of the target:
AR, or a γ = 0 round). Prefill is not a level (it runs before the decode and is reported apart). Fixed γ only:
the cost model's calibration would time forwards of its own. Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from mspeckv.config import GenerationConfig
from mspeckv.decoding.batch import BatchEngine
from mspeckv.decoding.batch_spec import BatchSpecConfig, BatchSpecEngine
from mspeckv.model.api import load_any, parse_device
from mspeckv.runs.harness import device_name, sync
from mspeckv.runs.store import atomic_write_json, provenance


def timed_steps(runner, level, log: list, dev, on: list) -> None:
    """Wrap ``runner.step``: each call once the decode began (``on``), outside a graph capture, logs (level, start
    event, end event)."""
    inner = runner.step

    def step(ids, num_logits=1, eager=False):
        if not on or dev.type != "cuda" or torch.cuda.is_current_stream_capturing():
            return inner(ids, num_logits, eager)
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        out = inner(ids, num_logits, eager)
        b.record()
        log.append((f"{level(ids.shape[1])} @{ids.shape[0]}", a, b))  # per level and bucket (rows of the forward)
        return out

    runner.step = step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-coder-1.5b")
    ap.add_argument("--draft", default=None, help="vanilla / mspeckv: the draft model")
    ap.add_argument("--mode", default="self", choices=["ar", "self", "vanilla", "mspeckv"])
    ap.add_argument("--gamma", type=int, default=4)
    ap.add_argument("--draft-gamma", type=int, default=4)
    ap.add_argument("--window", type=int, default=2048)
    ap.add_argument("--draft-window", type=int, default=None, help="vanilla / mspeckv: the draft model's window")
    ap.add_argument("--draft-sinks", type=int, default=4)
    ap.add_argument("--context", type=int, default=32256)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--gen-len", type=int, default=128)
    ap.add_argument("--dataset", default=None, help="prompts of real text (acceptance needs it); default random ids")
    ap.add_argument("--device", default=None)
    ap.add_argument("--out", default=None, help="also write the result here (JSON)")
    a = ap.parse_args()
    if (a.mode in ("vanilla", "mspeckv")) != (a.draft is not None):
        raise SystemExit(f"--mode {a.mode}: {'give' if a.draft is None else 'drop'} --draft")
    dev = parse_device(a.device)
    if dev.type != "cuda":
        print("note: not a CUDA device: no events, every level's time is 0 and the whole decode counts as host")
    model, tok, _ = load_any(a.model, dev)
    draft = load_any(a.draft, dev)[0] if a.draft else None
    if a.dataset:
        from mspeckv.data.corpora import long_prompt

        prompts = [long_prompt(tok, a.context, 1000 * 7 + i, a.dataset) for i in range(a.batch)]
    else:
        g = torch.Generator().manual_seed(7)
        prompts = torch.randint(10, model.cfg.vocab_size - 10, (a.batch, a.context), generator=g).tolist()
    gen = GenerationConfig(max_new_tokens=a.gen_len, stop_on_eos=False, prefill_chunk=4096)
    cap = a.context + a.gen_len
    if a.mode == "ar":
        eng = BatchEngine(model, a.batch, cap, gen)
    else:
        eng = BatchSpecEngine(model, draft, a.batch, cap, gen,
                              BatchSpecConfig(a.mode, a.gamma, window=a.window, draft_gamma=a.draft_gamma,
                                              draft_window=a.draft_window, draft_sinks=a.draft_sinks))
    log: list = []
    on: list = []  # non-empty from the first decode segment on (captures and warm-ups before it are not the decode's)
    timed_steps(eng.runner, lambda t: "ar" if t == 1 else "verify", log, dev, on)
    if a.mode != "ar":
        timed_steps(eng.drunner, lambda t: "draft", log, dev, on)
    if getattr(eng, "wrunner", None) is not None:
        timed_steps(eng.wrunner, lambda t: "middle", log, dev, on)
    segment = eng.decode_segment

    def decode_segment(t_run):
        if not on:
            on.append(1)
        return segment(t_run)

    eng.decode_segment = decode_segment
    t0 = time.perf_counter()
    res = eng.run(prompts)
    sync(dev)
    wall = time.perf_counter() - t0
    levels: dict[str, list[float]] = {}
    for lv, s, e in log:
        levels.setdefault(lv, []).append(s.elapsed_time(e))
    decode_ms = res.decode_s * 1e3
    rows = [{"level": lv, "calls": len(ms), "ms_total": sum(ms), "ms_per_call": sum(ms) / len(ms),
             "share_of_decode": sum(ms) / decode_ms} for lv, ms in sorted(levels.items())]
    gpu = sum(r["ms_total"] for r in rows)
    rows.append({"level": "host + idle gaps", "calls": None, "ms_total": decode_ms - gpu, "ms_per_call": None,
                 "share_of_decode": (decode_ms - gpu) / decode_ms})
    out = {"tool": "profile_batch_spec", "args": vars(a), "device_name": device_name(dev), **provenance(),
           "decode_s": res.decode_s, "prefill_s": res.prefill_s, "setup_s": res.setup_s, "wall_s": wall,
           "rounds": eng.rounds if a.mode != "ar" else res.decode_steps, "decode_tok_per_s": res.tok_per_s,
           "acceptance": eng.accepted / eng.drafted if a.mode != "ar" and eng.drafted else None, "levels": rows}
    print(f"# {a.mode} at {a.context} x {a.batch}, {a.gen_len} new tokens, on {out['device_name']}: decode "
          f"{res.decode_s:.2f} s ({res.tok_per_s:.0f} tok/s), prefill {res.prefill_s:.2f} s, setup {res.setup_s:.2f} s")
    print("| level | calls | ms total | ms per call | share of decode |\n|---|---:|---:|---:|---:|")
    for r in rows:
        calls = "–" if r["calls"] is None else r["calls"]
        per = "–" if r["ms_per_call"] is None else f"{r['ms_per_call']:.3f}"
        print(f"| {r['level']} | {calls} | {r['ms_total']:.1f} | {per} | {r['share_of_decode']:.1%} |")
    print(json.dumps(out))
    if a.out:
        atomic_write_json(Path(a.out), out)


if __name__ == "__main__":
    main()
