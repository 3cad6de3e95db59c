"""``mspeckv presses list`` (every press, its fields and defaults, and the presets) and ``mspeckv presses calibrate``
(low-rank projections from real text)."""

from __future__ import annotations

import dataclasses
import json


def cmd_presses(a) -> int:
    from . import PRESSES, parse_press, presets

    if a.action == "list":
        for name, cls in PRESSES.items():
            doc = (cls.__module__ and __import__(cls.__module__, fromlist=["x"]).__doc__ or "").strip().split("\n")[0]
            fields = ", ".join(f"{f.name}={f.default}" for f in dataclasses.fields(cls))
            print(f"{name:10s} {fields}\n           {doc}")
        for name, path in presets().items():
            print(f"preset {name:12s} {parse_press(name).spec()}  ({path.name})")
        return 0
    return _calibrate(a)


def _calibrate(a) -> int:
    from pathlib import Path

    import torch
    from safetensors.torch import save_file

    from ..data.corpora import load_documents
    from ..model.api import load
    from ..runs.store import atomic_write_text
    from .lowrank import calibrate

    if a.tokens < 64 or a.max_rank is not None and a.max_rank < 1:
        raise ValueError("--tokens must be >= 64 and --max-rank >= 1")
    out = Path(a.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a folder")
    docs = load_documents(a.data)
    model, tok, _ = load(a.model, a.device)
    ids, n = [], 0
    for d in docs:  # whole documents until --tokens, each its own prefill
        x = tok(d.text, add_special_tokens=False).input_ids[: a.tokens - n]
        if len(x) >= 16:
            ids.append(torch.tensor([x]))
            n += len(x)
        if n >= a.tokens:
            break
    proj = calibrate(model, ids, max_rank=a.max_rank)
    out.mkdir(parents=True, exist_ok=True)
    save_file(proj, str(out / "projections.safetensors"))
    meta = {"model": a.model, "data": str(a.data), "tokens": n, "documents": len(ids), "max_rank": a.max_rank,
            "rope": "post-RoPE keys (see mspeckv/presses/lowrank.py)"}
    atomic_write_text(out / "calibration.json", json.dumps(meta, indent=1) + "\n")
    print(json.dumps({"out": str(out), **meta}))
    return 0


def add_presses_parser(sub) -> None:
    p = sub.add_parser("presses", help="list the KV presses, or calibrate low-rank projections")
    p.add_argument("action", choices=["list", "calibrate"])
    p.add_argument("--model", default="qwen2.5-coder-1.5b")
    p.add_argument("--data", default=None, help="calibrate: corpus name, .txt/.jsonl file or folder (default BBC)")
    p.add_argument("--out", default="calib", help="calibrate: output folder")
    p.add_argument("--tokens", type=int, default=16384, help="calibrate: tokens of text to fit on")
    p.add_argument("--max-rank", type=int, default=None, help="calibrate: columns kept per head (default head_dim)")
    p.add_argument("--device", default=None)
    p.set_defaults(fn=cmd_presses)
