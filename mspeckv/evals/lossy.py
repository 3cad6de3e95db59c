"""One line that says a KV format or press changes the model, taken from committed quality results (never guessed).

``quality_note(kv_quant, press)`` looks for the measured cells of that format (``kv=<fmt>/...``, every layer stored
that way) or press spec in ``results/quality/*/summary.json`` of this checkout, and returns a note when the measured
KL divergence from the full cache is at least ``KL_NOTE`` nats per token, or None when nothing was measured or the
cost is below it. Installed copies without the results folder print nothing.
"""

from __future__ import annotations

import json
from pathlib import Path

KL_NOTE = 0.001  # nats/token: int8 offload measured 0.0006-0.0007 on qwen2.5-coder-1.5b, below it
RESULTS = Path(__file__).resolve().parents[2] / "results" / "quality"


def _matches(variant: str, kv_quant: str | None, press: str | None) -> bool:
    if press is not None:
        return variant == press
    return kv_quant is not None and variant.startswith(f"kv={kv_quant}/")


def quality_note(kv_quant: str | None = None, press: str | None = None, root: Path = RESULTS) -> str | None:
    if (kv_quant in (None, "none")) and press is None:
        return None
    kv_quant = None if kv_quant == "none" else kv_quant
    worst = None
    for f in sorted(root.glob("*/summary.json")):
        try:
            rows = json.loads(f.read_text())["rows"]
        except (OSError, ValueError, KeyError):
            continue
        by = {(r["metric"], r["variant"], r["context"]): r for r in rows if isinstance(r, dict) and "variant" in r}
        for (metric, variant, ctx), r in by.items():
            if metric != "kl" or not _matches(variant, kv_quant, press) or r.get("value") is None:
                continue
            ppl = by.get(("ppl", variant, ctx), {}).get("delta_pct")
            if worst is None or r["value"] > worst[0]:
                worst = (r["value"], ppl, ctx, f.parent.name, variant)
    if worst is None or worst[0] < KL_NOTE:
        return None
    kl, ppl, ctx, model, variant = worst
    what = f"--press {press}" if press is not None else f"--kv-quant {kv_quant}"
    ppl_s = "" if ppl is None else f", PPL {ppl:+.1f}%"
    return (f"note: {what} changes the model's output: measured on {model} at {ctx} tokens ({variant}): KL "
            f"{kl:.3f} nats/token{ppl_s} against the full cache (results/quality/{model}/summary.md)")
