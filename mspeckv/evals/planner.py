"""The quality-aware planner (issue 28, item 9): for a model, context, batch and GPU memory, the configurations that
fit, admitted by a quality rule and ranked by the decode tok/s measured in the committed result tables.

**Candidates** (``--gen-len`` new tokens per sequence, capacity = context + gen):

- ``ar``: every layer's KV on the GPU (``BatchKV``): weights + KV + workspace (``cache.batch_memory``). Lossless.
- ``spec``: speculation at batch, modes self / vanilla / mspeckv: the ``ar`` bytes at capacity + the round's slack
  (``BatchSpecConfig.slack``), plus the draft's weights and its own ``BatchKV`` (vanilla, mspeckv). Lossless (greedy:
  every sequence's output equals AR's). One candidate per configuration measured for this model, and the defaults.
- ``offload``: when ``ar`` does not fit, the layers that fit stay on the GPU and the rest stream in bf16 from pinned
  memory (``cache.offload_placement``, what ``bench batch --offload`` runs). Lossless.
- ``placed``: when ``ar`` does not fit, ``cache.plan_placement``'s placement (streamed layers stored int8, some
  resident): lossy, judged by the int8 placement's quality cells.
- ``press``: compress-to-fit AR (``bench batch --presses``). Lossy. The prefill fills a full-size cache before
  ``compress()`` (``kv/pressed.py``), so a press needs the ``ar`` bytes plus its pressed rows (the full KV over the
  compression its quality cell measured; the full KV again when none did): it never fits where ``ar`` does not.

**Quality rule**: ``lossless`` admits ``ar``, ``spec`` and ``offload`` only. ``max_ppl_delta`` X admits a lossy
candidate only when the upper end of its PPL Δ's 95% interval (``goals.paired_interval``, paired by window against its
folder's full cache) is at most X, on a corpus that is not short unrelated articles (``corpora.unrelated``); the cell
at the nearest context is used (ties: the larger upper end). A lossy candidate with no such cell for this model is
excluded, and the listing says why (no cell, only BBC, no interval).

**Speed**: the ``decode_tok_per_s`` of the nearest committed cell of the same kind and configuration, from
``bench batch`` (``batch.json`` rows) and ``eval speed`` cells (batch 1): same batch, context within ``CONTEXT_NEAR``
x; preferring the same model (else, except for speculation, whose acceptance depends on the weights, a model of the
same shape), the same card, the nearest context and generation length. Every prediction names its file, its cell and
how it differs from the request; with no such cell the prediction is None, shown as "no measurement". Nothing here is
a measurement of the planned run itself.
"""

from __future__ import annotations

import json
import math
import shlex
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from .. import validate as v
from ..cache import WORKSPACE, batch_memory, offload_placement, plan_placement, weight_bytes
from ..data.corpora import unrelated
from ..runs.tables import md_table
from .goals import paired_interval

CONTEXT_NEAR = 1.25  # a cell predicts a request at the same batch whose context is within this ratio
GEN_NEAR = 2.0  # ... and whose new tokens per sequence are within this ratio (speculation's tail depends on it)
DTYPE_BYTES = 2  # bf16 weights and KV, as the benches ran
LOSSLESS = ("ar", "spec", "offload")
DEFAULT_PRESSES = ("kivi:k_bits=4,v_bits=4", "kivi:k_bits=8,v_bits=8")
DEFAULT_SPEC = ("self:4:w2048", "vanilla:4", "mspeckv:4:w2048")
TOLERANCE = 0.15  # a check run confirms a prediction within this share of the measured tok/s
BENCH_WINDOW = 2048  # bench batch's --window (a self/mspeckv cell without :wN ran with the run's window)


@dataclass(frozen=True)
class PlanRequest:
    model: str
    context: int
    batch: int
    gpu_memory: float  # GB the whole run may allocate on the GPU
    gen_len: int = 128
    max_ppl_delta: float | None = None  # % PPL
    lossless: bool = False
    card: str = "H100"  # preferred card: a substring of the measured cells' device names
    draft: str = "qwen2.5-coder-0.5b"  # vanilla and mspeckv's draft model

    def __post_init__(self):
        v.text("model", self.model)
        v.integer("context", self.context, lo=1)
        v.integer("batch", self.batch, lo=1)
        v.integer("gen_len", self.gen_len, lo=1)
        v.number("gpu_memory", self.gpu_memory, lo=0, lo_open=True)
        v.boolean("lossless", self.lossless)
        v.text("card", self.card)
        if self.max_ppl_delta is not None:
            v.number("max_ppl_delta", self.max_ppl_delta, lo=0)
            if self.lossless:
                raise v.ConfigError(f"give {v.name('lossless')} (no quality loss) or {v.name('max_ppl_delta')} X (a "
                                    "bound on the measured PPL Δ), not both")


@dataclass(frozen=True)
class SpeedCell:
    model: str
    kind: str  # ar | spec | offload | press | placed
    key: str  # the configuration: press_key(spec), the speculation cell's head, a placement's text, "" for ar
    context: int
    batch: int
    gen_len: int
    tok_per_s: float
    card: str
    source: str  # file
    cell: str  # where in that file
    when: str = ""  # the run's timestamp (meta.timestamp): a newer run of the same cell supersedes an older one


@dataclass(frozen=True)
class QualityCell:
    model: str
    key: str
    variant: str
    context: int
    dataset: str | None
    delta_pct: float
    ci: tuple[float, float] | None
    compression: float | None  # full KV bytes over the variant's, after the ppl prefix
    source: str  # file

    def why_not(self) -> str:
        """Why this cell cannot admit a press under a PPL bound ("" when it can)."""
        if unrelated(self.dataset):
            return f"measured on {self.dataset or 'bbc'} only (short unrelated articles: no goal is judged there)"
        return "" if self.ci else "no interval (the cell has no per-window NLL)"


@dataclass(frozen=True)
class Prediction:
    tok_per_s: float | None  # None: no measurement
    cell: SpeedCell | None
    distance: str  # "exact", how the cell differs from the request, or why there is none


@dataclass(frozen=True)
class Candidate:
    kind: str
    key: str
    name: str
    lossless: bool
    gpu_bytes: int  # predicted by the library's byte accounting
    memory_note: str
    speed: Prediction
    quality: QualityCell | None
    why: str  # why excluded; "" when admitted


@dataclass(frozen=True)
class PlanResult:
    request: PlanRequest
    ranked: tuple[Candidate, ...]  # admitted: measured by predicted tok/s, then those with no measurement
    excluded: tuple[Candidate, ...]

    @property
    def top(self) -> Candidate | None:
        return self.ranked[0] if self.ranked and self.ranked[0].speed.tok_per_s is not None else None


def press_key(spec: str) -> str:
    """A press spec's canonical text (defaults dropped), or the text itself when it does not parse here."""
    from ..presses import parse_press

    try:
        return str(parse_press(spec))
    except (ValueError, OSError):
        return spec


def spec_key(head: str, window: int = BENCH_WINDOW) -> str:
    """MODE:GAMMA[:wW] with the window written out for self and mspeckv."""
    mode, _, rest = head.partition(":")
    return head if mode == "vanilla" or ":w" in rest else f"{head}:w{window}"


def _cell(text: str) -> tuple[int, int]:
    c, b = text.rpartition("@")[2].lower().split("x")
    return int(c), int(b)


def load_speed(root: str | Path) -> list[SpeedCell]:
    """Every measured decode speed under ``root``: ``bench batch`` rows and ``eval speed`` cells."""
    out = []
    for f in sorted(Path(root).rglob("batch.json")):
        res = json.loads(f.read_text(encoding="utf-8"))
        if res.get("bench") != "batch":
            continue
        cfg = res.get("config", {})
        for r in res.get("rows", []):
            m, text = r.get("method"), str(r.get("cell"))
            if m not in ("ar", "offload", "press", "spec") or not r.get("runs") or not r.get("decode_tok_per_s"):
                continue
            head = text.rpartition("@")[0]
            key = press_key(head) if m == "press" else spec_key(head, cfg.get("window", BENCH_WINDOW)) \
                if m == "spec" else ""
            gen = cfg.get("gen_len", 128) if m in ("ar", "spec") else cfg.get("offload_gen_len", 32)
            out.append(SpeedCell(cfg.get("model", "?"), m, key, *_cell(text), gen, float(r["decode_tok_per_s"]),
                                 str(r.get("device_name") or res.get("device_name")), str(f),
                                 f"rows[method={m}, cell={text}]", str(res.get("meta", {}).get("timestamp", ""))))
    for f in sorted(Path(root).rglob("cells/speed__*.json")):
        c = json.loads(f.read_text(encoding="utf-8"))
        res, vi, st = c.get("results", {}), c.get("variant_info", {}), c.get("settings", {})
        if c.get("status") != "ok" or not res.get("tok_per_s"):
            continue
        q = vi.get("kv_quant") or "none"
        kind, key = (("press", press_key(vi["press"])) if vi.get("press") else ("ar", "") if q == "none" and
                     vi.get("on_chip") is None else ("placed", placed_key(q, vi.get("on_chip"),
                                                                          vi.get("resident_layers") or 0)))
        out.append(SpeedCell(st.get("model", "?"), kind, key, int(res.get("prompt_tokens") or c["context"]), 1,
                             int(st.get("speed_gen") or 0), float(res["tok_per_s"]), str(c.get("meta", {}).get("gpu")),
                             str(f), f"speed {c['variant']} ctx={c['context']}",
                             str(c.get("meta", {}).get("timestamp", ""))))
    return out


@cache
def shape(model: str) -> tuple | None:
    """A model's shape (what a decode step's bytes and FLOPs depend on), from its config alone; None if unknown."""
    from ..model.api import model_config

    try:
        c = model_config(model)
    except (ValueError, OSError):
        return None
    return c.n_layers, c.n_heads, c.n_kv_heads, c.head_dim, c.dim, c.intermediate, c.vocab_size


def same_shape(a: str, b: str) -> bool:
    return shape(a) is not None and shape(a) == shape(b)


def placed_key(kv_quant: str, on_chip, resident: int) -> str:
    return f"kv={kv_quant} on_chip={on_chip} resident={resident}"


def load_quality(root: str | Path) -> list[QualityCell]:
    """Every ppl cell under ``root`` but the full cache's, with its Δ against its own folder's full cache."""
    out = []
    for d in sorted(Path(root).rglob("cells")):
        cells = [json.loads(f.read_text(encoding="utf-8")) | {"_file": str(f)} for f in sorted(d.glob("ppl__*.json"))]
        full = {c["context"]: c for c in cells if c["variant"] == "full" and c.get("status") == "ok"}
        for c in cells:
            base = full.get(c["context"])
            p, pb = c.get("results", {}).get("ppl"), (base or {}).get("results", {}).get("ppl")
            if c["variant"] == "full" or c.get("status") != "ok" or not p or not pb:
                continue
            vi, st = c.get("variant_info", {}), c.get("settings", {})
            key = press_key(vi["press"]) if vi.get("press") else f"kv={vi.get('kv_quant')}"
            b, bb = c["results"].get("kv_bytes_prefix"), base["results"].get("kv_bytes_prefix")
            out.append(QualityCell(st.get("model", "?"), key, c["variant"], c["context"], st.get("dataset"),
                                   100 * (p / pb - 1), paired_interval(c, base), bb / b if b and bb else None,
                                   c["_file"]))
    return out


def nearest_speed(req: PlanRequest, kind: str, key: str, speed: list[SpeedCell],
                  same_shape: Callable[[str, str], bool]) -> Prediction:
    """The nearest measured cell of this kind and configuration (see the module docstring), or why there is none."""
    ok = [c for c in speed if c.kind == kind and c.key == key and c.batch == req.batch
          and abs(math.log(c.context / req.context)) <= math.log(CONTEXT_NEAR)
          and c.gen_len > 0 and abs(math.log(c.gen_len / req.gen_len)) <= math.log(GEN_NEAR)
          and (c.model == req.model or (kind != "spec" and same_shape(c.model, req.model)))]
    if not ok:
        return Prediction(None, None, f"no measurement: no {kind} cell {key or ''} of this model at batch "
                                      f"{req.batch} within {CONTEXT_NEAR:g}x of context {req.context} and "
                                      f"{GEN_NEAR:g}x of {req.gen_len} new tokens")
    ok.sort(key=lambda c: c.when, reverse=True)  # among equals, min() keeps the first: the newest run
    c = min(ok, key=lambda c: (c.model != req.model, req.card.lower() not in c.card.lower(),
                               abs(math.log(c.context / req.context)), abs(math.log(c.gen_len / req.gen_len))))
    diff = ([f"model {c.model} (same shape)"] if c.model != req.model else []) + \
        ([f"card {c.card}"] if req.card.lower() not in c.card.lower() else []) + \
        ([f"context {c.context}"] if c.context != req.context else []) + \
        ([f"gen {c.gen_len}"] if c.gen_len != req.gen_len else [])
    return Prediction(c.tok_per_s, c, "exact" if not diff else "; ".join(diff))


def quality_for(req: PlanRequest, key: str, quality: list[QualityCell]) -> tuple[QualityCell | None, str]:
    """(the cell that judges this lossy configuration, "" or why none can)."""
    mine = [q for q in quality if q.model == req.model and q.key == key]
    usable = [q for q in mine if not q.why_not()]
    if usable:
        return min(usable, key=lambda q: (abs(math.log(q.context / req.context)), -q.ci[1], q.source)), ""
    if mine:
        q = min(mine, key=lambda q: abs(math.log(q.context / req.context)))
        return q, f"no usable quality cell: {q.why_not()} ({q.source})"
    return None, f"no quality measurement of {key} for {req.model}"


def plan(req: PlanRequest, model_cfg, speed: list[SpeedCell], quality: list[QualityCell],
         same_shape: Callable[[str, str], bool] = same_shape, draft_cfg=None) -> PlanResult:
    """Every candidate, admitted or excluded with why, the admitted ranked by predicted tok/s."""
    from ..decoding.batch_spec import BatchSpecConfig

    c, B, cap, gb = model_cfg, req.batch, req.context + req.gen_len, req.gpu_memory
    budget = round(gb * 1e9)  # whole bytes
    w = weight_bytes(c, DTYPE_BYTES)
    ar = batch_memory(c, B, cap, DTYPE_BYTES)
    rows: list[tuple] = []  # (kind, key, name, bytes, note, quality cell, why no quality cell, why it cannot run)
    rows.append(("ar", "", "AR (all KV on the GPU)", ar["total"], f"weights {w / 1e9:.2f} + KV {ar['kv'] / 1e9:.2f} "
                 f"+ workspace {WORKSPACE / 1e9:.2f} GB", None, "", ""))
    specs = dict.fromkeys([s.key for s in speed if s.kind == "spec" and s.model == req.model] + list(DEFAULT_SPEC))
    for key in specs:
        mode, gamma, *win = key.split(":")
        if mode != "self" and (draft_cfg is None or draft_cfg.vocab_size != c.vocab_size):
            continue  # no draft of this vocabulary
        sc = BatchSpecConfig(mode, int(gamma.removeprefix("auto")), window=int(win[0][1:]) if win else 256,
                             auto=gamma.startswith("auto"))
        m = batch_memory(c, B, cap + sc.slack, DTYPE_BYTES)["total"]
        extra = 0 if mode == "self" else batch_memory(draft_cfg, B, cap + sc.slack, DTYPE_BYTES)["total"] - WORKSPACE
        rows.append(("spec", key, key, m + extra, f"AR at capacity + {sc.slack} slack rows" +
                     (f" + draft {req.draft} weights and KV {extra / 1e9:.2f} GB" if extra else ""), None, "", ""))
    if ar["total"] > budget:
        try:
            p = offload_placement(c, w, B, cap, DTYPE_BYTES, gb)
            layer = ar["kv"] // c.n_layers
            n = p.n_on_chip(c.n_layers)
            rows.append(("offload", "", f"offload: {n} of {c.n_layers} layers on chip, the rest bf16 streamed",
                         w + WORKSPACE + (n + 2) * layer, f"{n} layers + 2 staging layers on the GPU; "
                         f"{(c.n_layers - n) * layer / 1e9:.2f} GB pinned host memory", None, "", ""))
        except ValueError as e:
            rows.append(("offload", "", "offload (bf16 streamed)", 0, "", None, "", str(e)))
        if budget - w - WORKSPACE > 0:
            try:
                pl = plan_placement(c, cap, budget - w - WORKSPACE, batch=B)
                p = pl.placement
                key = placed_key(p.kv_quant, p.n_on_chip(c.n_layers), p.resident_layers)
                q, why = quality_for(req, f"kv={p.kv_quant}", quality)
                rows.append(("placed", key, f"placed: {p.describe(c.n_layers)}", w + WORKSPACE + pl.gpu_kv_bytes,
                             pl.note + f"; {pl.pinned_bytes / 1e9:.2f} GB pinned", q, why, ""))
            except ValueError as e:
                rows.append(("placed", "", "placed (int8 streamed)", 0, "", None, "", str(e)))
    full_ctx = batch_memory(c, B, req.context, DTYPE_BYTES)["kv"]
    presses = {press_key(s): s for s in DEFAULT_PRESSES[::-1]} | {q.key: q.variant for q in quality[::-1]
                                                                 if q.key.partition("=")[0] != "kv"}
    for key, name in presses.items():
        q, why = quality_for(req, key, quality)
        held = full_ctx / q.compression if q and q.compression else full_ctx
        rows.append(("press", key, name, ar["total"] + int(held), "the full KV for the prefill + pressed rows "
                     + (f"({q.compression:.2f}x, measured)" if q and q.compression else "(no measured compression: "
                        "counted as the full KV)"), q, why, ""))
    ranked, excluded = [], []
    for kind, key, name, nbytes, note, q, qwhy, err in rows:
        lossy = kind not in LOSSLESS
        if err:
            why = err
        elif lossy and req.lossless:
            why = "lossy: a compressed or quantized cache is never lossless"
        elif lossy and req.max_ppl_delta is not None:
            why = qwhy or (f"PPL Δ upper end {q.ci[1]:+.2f}% > {req.max_ppl_delta:g}% ({q.source})"
                           if q.ci[1] > req.max_ppl_delta else "")
        else:
            why = ""  # lossless, or no quality rule: admitted, its quality shown
        if not why and nbytes > budget:
            why = f"needs {nbytes / 1e9:.2f} GB > {gb:g} GB ({note})"
        cand = Candidate(kind, key, name, not lossy, nbytes, note, nearest_speed(req, kind, key, speed, same_shape),
                         q, why)
        (excluded if why else ranked).append(cand)
    ranked.sort(key=lambda x: (x.speed.tok_per_s is None, -(x.speed.tok_per_s or 0)))
    return PlanResult(req, tuple(ranked), tuple(excluded))


def quality_text(x: Candidate) -> str:
    if x.lossless:
        return "lossless" + (" (greedy: equals AR's output)" if x.kind == "spec" else "")
    q = x.quality
    if q is None:
        return "no measurement"
    ci = f" [{q.ci[0]:+.2f}, {q.ci[1]:+.2f}]" if q.ci else " (no interval)"
    return f"PPL {q.delta_pct:+.2f}%{ci} on {q.dataset or 'bbc'} at {q.context} ({q.source}: ppl {q.variant})"


def speed_text(x: Candidate) -> str:
    s = x.speed
    if s.tok_per_s is None:
        return "no measurement"
    return f"{s.tok_per_s:,.0f} measured at {s.cell.source}: {s.cell.cell} ({s.distance})"


def check_commands(res: PlanResult, out: str = "results/bench/plan-check") -> list[str]:
    """The commands that would measure the top choice (a GPU run: nothing here runs them)."""
    x, r = res.top, res.request
    if x is None:
        return []
    cell = f"{r.context}x{r.batch}"
    real = not r.model.startswith("random:")
    base = ["mspeckv", "bench", "batch", "--model", r.model, "--contexts", str(r.context), "--batches",
            str(r.batch if x.kind in ("ar", "spec") else 1), "--gen-len", str(r.gen_len), "--seeds", "2", "--ragged",
            "", "--gpu-memory", f"{r.gpu_memory:g}", *(["--dataset", "pycode"] if real else []), "--out",
            f"{out}/{r.model.replace(':', '-')}-{cell}-{r.gpu_memory:g}gb"]
    extra = {"ar": [], "spec": ["--spec", f"{x.key}@{cell}"] + (["--draft", r.draft] if not x.key.startswith("self")
                                                                 else []),
             "offload": ["--offload", cell, "--offload-gen-len", str(r.gen_len)],
             "press": ["--presses", f"{x.name}@{cell}", "--offload-gen-len", str(r.gen_len)]}.get(x.kind)
    if extra is None:
        return []  # a quantized placement has no bench batch cell
    cmds = [shlex.join(base + extra)]
    if x.quality is not None:
        cmds.append(shlex.join(["mspeckv", "eval", "ppl", "--model", r.model, "--dataset",
                                x.quality.dataset or "pycode", "--context", str(x.quality.context), "--windows", "8",
                                "--press", x.name, "--output-dir", f"results/quality/plan-check-{x.quality.context}"]))
    return cmds


def render(res: PlanResult) -> str:
    """The ranked table, then each excluded configuration with why (Markdown)."""
    r = res.request
    rule = "lossless only" if r.lossless else f"PPL Δ upper end <= {r.max_ppl_delta:g}%" \
        if r.max_ppl_delta is not None else "no quality rule"
    body = [[str(i + 1), x.name, f"{x.gpu_bytes / 1e9:.2f}", speed_text(x), quality_text(x)]
            for i, x in enumerate(res.ranked)]
    top = res.top
    head = (f"{r.model} at {r.context} x {r.batch} (+{r.gen_len} new tokens), {r.gpu_memory:g} GB, {rule}, card "
            f"{r.card}: " + (f"top choice {top.name}, {top.speed.tok_per_s:,.0f} decode tok/s as measured in its "
                             "cell (a prediction for this request, not a run of it)" if top else
                             "no admitted configuration has a measurement"))
    lines = [head, "", md_table(["#", "configuration", "GPU GB (predicted)", "decode tok/s (source cell)",
                                 "quality (source cell)"], body, "llrll"), ""]
    lines += ["Excluded:"] + [f"- {x.name}: {x.why}" for x in res.excluded] if res.excluded else []
    return "\n".join(lines)


def verify(res: PlanResult, measured: str | Path) -> dict:
    """The top choice's prediction against the run of its check commands (their output under ``measured``): decode
    tok/s within ``TOLERANCE`` of the measured, and a lossy choice's new PPL Δ inside the interval it was chosen by."""
    x, r = res.top, res.request
    if x is None:
        raise ValueError("no top choice with a measurement: nothing to verify")
    runs = [c for c in load_speed(measured) if (c.model, c.kind, c.key, c.context, c.batch) ==
            (r.model, x.kind, x.key, r.context, r.batch)]
    out = {"choice": x.name, "predicted_tok_per_s": x.speed.tok_per_s, "predicted_from": x.speed.cell.source,
           "measured_tok_per_s": None, "measured_in": None, "ratio": None, "speed": f"no run of it under {measured}",
           "quality": "lossless: no PPL Δ to check" if x.lossless else "no new ppl cell"}
    if runs:
        run = max(runs, key=lambda c: c.when)
        ratio = x.speed.tok_per_s / run.tok_per_s
        out.update(measured_tok_per_s=run.tok_per_s, measured_in=f"{run.source}: {run.cell}", ratio=ratio,
                   speed="met" if abs(ratio - 1) <= TOLERANCE else "MISSED")
    q = x.quality
    new = [n for n in load_quality(measured) if n.model == r.model and n.key == x.key] if q and q.ci else []
    if new:
        n = min(new, key=lambda n: abs(n.context - q.context))
        out["quality"] = (f"{'met' if q.ci[0] <= n.delta_pct <= q.ci[1] else 'MISSED'}: PPL {n.delta_pct:+.2f}% "
                          f"({n.source}) vs [{q.ci[0]:+.2f}, {q.ci[1]:+.2f}] ({q.source})")
    return out


def to_json(res: PlanResult) -> dict:
    def one(x: Candidate) -> dict:
        s = x.speed
        return {"kind": x.kind, "name": x.name, "lossless": x.lossless, "gpu_bytes": x.gpu_bytes,
                "predicted_tok_per_s": s.tok_per_s, "speed_source": s.cell.source if s.cell else None,
                "speed_cell": s.cell.cell if s.cell else None, "speed_distance": s.distance,
                "quality": quality_text(x), "quality_source": x.quality.source if x.quality else None,
                "ppl_delta_ci": list(x.quality.ci) if x.quality and x.quality.ci else None, "why_excluded": x.why}

    r = res.request
    return {"model": r.model, "context": r.context, "batch": r.batch, "gen_len": r.gen_len,
            "gpu_memory_gb": r.gpu_memory, "lossless": r.lossless, "max_ppl_delta": r.max_ppl_delta, "card": r.card,
            "top": one(res.top) if res.top else None, "ranked": [one(x) for x in res.ranked],
            "excluded": [one(x) for x in res.excluded], "check": check_commands(res)}
