"""What the committed quality results say about a lossy KV format or press, for the model being run (never guessed,
never another model's number).

The measurements are the ``ppl`` and ``kl`` cells in every ``cells/`` folder under ``results/quality/`` of this
checkout (installed copies without it find none, and their notes say so). Each cell names its model and corpus; a
variant's PPL Δ is against the full-cache ``ppl`` cell of the same folder, model, corpus, seed, windows and context.

- :func:`measurements`: those of one model and one format (``kv=<fmt>/...`` variants) or press spec;
- :func:`quality_note`: the line ``generate`` prints: this model's worst measured cell (largest KL, with its corpus,
  context and PPL Δ) when that KL is at least ``KL_NOTE`` nats per token, or that none exists for this model;
- :func:`check_lossy`: refuses a format of ``REFUSED_FORMATS`` without ``--allow-lossy``, naming this model's
  measured cost or saying that none is measured.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .variants import BASELINE

KL_NOTE = 0.001  # nats/token: int8 offload measured 0.0006-0.0007 on qwen2.5-coder-1.5b, below it
RESULTS = Path(__file__).resolve().parents[2] / "results" / "quality"
DEFAULT_CORPUS = "bbc"  # cells record dataset None when the eval ran on its default corpus, BBC News
REFUSED_FORMATS = ("int2",)  # --kv-quant formats that need --allow-lossy (issue 28: +65% PPL on long technical text)
ALLOW_FLAG = "--allow-lossy"


@dataclass(frozen=True)
class Measurement:
    """One measured (model, corpus, context) cell pair of a variant."""

    model: str
    corpus: str
    context: int
    windows: int | None
    variant: str
    kl: float
    ppl_delta_pct: float | None  # None: no baseline ppl cell beside it
    folder: str  # results/quality/<folder>

    def describe(self) -> str:
        ppl = "" if self.ppl_delta_pct is None else f"PPL {self.ppl_delta_pct:+.1f}%, "
        win = "" if self.windows is None else f", {self.windows} window{'s' if self.windows != 1 else ''}"
        return (f"{ppl}KL {self.kl:.3f} nats/token on {self.model}, corpus {self.corpus}, {self.context} tokens"
                f"{win} ({self.variant}; results/quality/{self.folder})")


def _matches(variant: str, kv_quant: str | None, press: str | None) -> bool:
    if press is not None:
        return variant == press
    return kv_quant is not None and variant.startswith(f"kv={kv_quant}/")


def _cells(folder: Path, metric: str) -> list[dict]:
    out = []
    for f in sorted((folder / "cells").glob(f"{metric}__*.json")):
        try:
            c = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(c, dict) and c.get("metric") == metric and c.get("status", "ok") == "ok" \
                and isinstance(c.get("results"), dict) and isinstance(c.get("settings"), dict):
            out.append(c)
    return out


def _key(c: dict) -> tuple:
    """What must agree between a variant's cell and its baseline: model, corpus, seed, windows, context."""
    s = c["settings"]
    return s.get("model"), s.get("dataset"), s.get("seed"), s.get("windows"), c.get("context")


def measurements(model: str, kv_quant: str | None = None, press: str | None = None,
                 root: Path = RESULTS) -> list[Measurement]:
    """Every measured KL (and PPL Δ where its baseline is there) of ``kv_quant`` (a format) or ``press`` (a spec) on
    ``model`` (the reference exactly as the eval was given it, e.g. ``qwen2.5-coder-1.5b``)."""
    kv_quant = None if kv_quant == "none" else kv_quant
    out = []
    for folder in sorted(c.parent for c in Path(root).rglob("cells") if c.is_dir()):  # nested folders too
        ppl = {(_key(c), c["variant"]): c["results"].get("ppl") for c in _cells(folder, "ppl")}
        for c in _cells(folder, "kl"):
            s, kl = c["settings"], c["results"].get("kl_mean")
            if s.get("model") != model or not _matches(c.get("variant", ""), kv_quant, press) or kl is None:
                continue
            mine, base = ppl.get((_key(c), c["variant"])), ppl.get((_key(c), BASELINE))
            delta = None if not (mine and base) else 100.0 * (mine / base - 1.0)
            out.append(Measurement(model, s.get("dataset") or DEFAULT_CORPUS, c["context"], s.get("windows"),
                                   c["variant"], float(kl), delta, folder.relative_to(root).as_posix()))
    return out


def _measure_cmd(model: str, kv_quant: str | None, press: str | None) -> str:
    what = f"--press {press}" if press is not None else f"--kv-quant {kv_quant} --on-chip 0"
    return f"mspeckv eval ppl,kl --model {model} {what}"


def quality_note(kv_quant: str | None = None, press: str | None = None, *, model: str,
                 root: Path = RESULTS) -> str | None:
    """The note ``generate`` prints for a lossy format or press on ``model`` (see the module docstring)."""
    if (kv_quant in (None, "none")) and press is None:
        return None
    kv_quant = None if kv_quant == "none" else kv_quant
    what = f"--press {press}" if press is not None else f"--kv-quant {kv_quant}"
    found = measurements(model, kv_quant, press, root)
    if not found:
        return (f"note: {what} is lossy, and no quality measurement of it exists for {model} in "
                f"results/quality; measure it with: {_measure_cmd(model, kv_quant, press)}")
    worst = max(found, key=lambda m: m.kl)
    if worst.kl < KL_NOTE:
        return None
    more = f" (the worst of {len(found)} measured cells)" if len(found) > 1 else ""
    return f"note: {what} changes the model's output against the full cache: {worst.describe()}{more}"


def check_lossy(kv_quant: str | None, model: str, allow: bool, root: Path = RESULTS) -> None:
    """Refuse a format of ``REFUSED_FORMATS`` without ``--allow-lossy`` (one ValueError, before any weights load),
    naming ``model``'s measured PPL Δ and KL, or saying that none is measured for it. ``--allow-lossy`` given where
    no such format is asked for is refused too (it would do nothing)."""
    if kv_quant not in REFUSED_FORMATS:
        if allow:
            raise ValueError(f"{ALLOW_FLAG} only unlocks --kv-quant {'/'.join(REFUSED_FORMATS)}, and this run uses "
                             f"--kv-quant {kv_quant}: drop {ALLOW_FLAG}")
        return
    if allow:
        return
    found = measurements(model, kv_quant, None, root)
    if found:
        worst = max(found, key=lambda m: m.kl)
        cost = f"it measured {worst.describe()}"
        if len(found) > 1:
            cost += f", the worst of {len(found)} measured cells"
    else:
        cost = (f"none is measured for {model} (results/quality has no {kv_quant} cell of it; measure it with: "
                f"{_measure_cmd(model, kv_quant, None)})")
    raise ValueError(f"--kv-quant {kv_quant} changes the model's output a lot: {cost}. Pass {ALLOW_FLAG} to run it "
                     f"anyway, or use --kv-quant int4 or int8")
