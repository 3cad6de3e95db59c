"""``mspeckv presses list`` (every press, its fields and defaults, and the presets) and ``mspeckv presses calibrate``
(low-rank projections from real text).

The listing reads ``configs/press_catalog.json``, not the press classes (their modules import torch, and a listing
should start in well under a second). :func:`catalog` builds that file from the classes; a test keeps the two
equal, and ``python -m mspeckv.cli_presses`` rewrites it after a press changes.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

from . import cli_checks as checks
from .cli_common import add, check_action_flags

CONFIGS = Path(__file__).resolve().parent / "configs"
CATALOG = CONFIGS / "press_catalog.json"


def catalog() -> dict:
    """name -> {"fields": {field: default}, "doc": the first paragraph of the press module's docstring}, from the
    press classes themselves (imports torch)."""
    import dataclasses
    import sys

    from .presses import PRESSES

    out = {}
    for name, cls in PRESSES.items():
        doc = (sys.modules[cls.__module__].__doc__ or "").strip().split("\n\n")[0]
        out[name] = {"fields": {f.name: f.default for f in dataclasses.fields(cls)}, "doc": " ".join(doc.split())}
    return out


def _value(x) -> str:
    return "none" if x is None else "/".join(map(str, x)) if isinstance(x, list | tuple) else str(x)


def list_presses() -> str:
    """The listing: each press with its fields' defaults and its whole description, then each preset with every
    field it sets (its own values over the press's defaults)."""
    import yaml

    presses = json.loads(CATALOG.read_text(encoding="utf-8"))
    lines = []
    for name, p in presses.items():
        lines.append(f"{name:10s} " + ", ".join(f"{k}={_value(x)}" for k, x in p["fields"].items()))
        lines += textwrap.wrap(p["doc"], 118, initial_indent=" " * 11, subsequent_indent=" " * 11,
                               break_on_hyphens=False)
    for path in sorted((CONFIGS / "presses").glob("*.yaml")):
        d = dict(yaml.safe_load(path.read_text(encoding="utf-8")))
        name = d.pop("press")
        fields = {**presses[name]["fields"], **d}
        own = ", ".join(sorted(d)) or "none: all defaults"
        lines.append(f"preset {path.stem:12s} {name}:" + ",".join(f"{k}={_value(x)}" for k, x in fields.items())
                     + f"  ({path.name}; set there: {own})")
    return "\n".join(lines)


def cmd_presses(a) -> int:
    check_action_flags(a, "presses")
    if a.action == "list":
        print(list_presses())
        return 0
    return _calibrate(a)


def _calibrate(a) -> int:
    if a.tokens < 64 or a.max_rank is not None and a.max_rank < 1:
        raise ValueError("--tokens must be >= 64 and --max-rank >= 1")
    out = Path(a.out)
    checks.out_dir("--out", a.out)  # a file there, or a place that cannot be written: refused before any work
    import os

    import torch
    from safetensors.torch import save_file

    from .data.corpora import load_documents
    from .model.api import load
    from .presses.lowrank import calibrate
    from .runs.store import atomic_write_text

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
    tmp = out / "projections.safetensors.tmp"
    save_file(proj, str(tmp))
    os.replace(tmp, out / "projections.safetensors")  # no partial file under the final name
    meta = {"model": a.model, "data": str(a.data), "tokens": n, "documents": len(ids), "max_rank": a.max_rank,
            "rope": "post-RoPE keys (see mspeckv/presses/lowrank.py)"}
    atomic_write_text(out / "calibration.json", json.dumps(meta, indent=1) + "\n")
    print(json.dumps({"out": str(out), **meta}))
    return 0


def add_presses_parser(sub) -> None:
    p = sub.add_parser("presses", help="list the KV presses, or calibrate low-rank projections")
    p.add_argument("action", choices=["list", "calibrate"])
    cal = {"action": ("calibrate",)}
    add(p, "--model", default="qwen2.5-coder-1.5b", help="calibrate: the model", applies=cal)
    add(p, "--data", default=None, help="calibrate: corpus name, .txt/.jsonl file or folder (default BBC)",
        applies=cal)
    add(p, "--out", default="calib", help="calibrate: output folder", applies=cal)
    add(p, "--tokens", type=int, default=16384, help="calibrate: tokens of text to fit on", applies=cal)
    add(p, "--max-rank", type=int, default=None, help="calibrate: columns kept per head (default head_dim)",
        applies=cal)
    add(p, "--device", default=None, help="calibrate: cpu | cuda", applies=cal)
    p.set_defaults(fn=cmd_presses)


if __name__ == "__main__":
    CATALOG.write_text(json.dumps(catalog(), indent=1) + "\n", encoding="utf-8")
    print(f"wrote {CATALOG}")
