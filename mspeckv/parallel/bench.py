"""``mspeckv bench tp``: does tensor parallelism split the offload bill? TP=1 against TP=N on random weights.

Per TP size (one launch of that many ranks), on random weights at a real shape (default Llama-2-7B-128K, bf16,
built on each rank's GPU one parameter at a time):
- **links**: pinned host-to-device bandwidth of each rank's GPU measured alone (the other ranks wait), then all
  ranks together (started by one barrier), and the sum of the together figures against the sum of the alone ones
  (do the PCIe links add up?); the cost of one step's all-reduces alone: 2 x n_layers all-reduces of (1, T, dim),
  eager and replayed from a CUDA graph, T = 1 (decode) and T = 9 (a verification).
- **cells**, per context and KV setup, each one JSON file (written by rank 0 when the cell is done):
  ``gpu`` every layer's KV on the GPU, eager; ``none|int8|int4`` the KV of ``n_layers - on_chip`` layers offloaded
  in that format (each rank streams its own KV heads on its own copy stream and link); ``gpu_graphed`` the all-on-GPU
  step replayed from a CUDA graph with the NCCL all-reduces inside it (the offloaded cache drives its copies from
  the host, so it runs eagerly, as on one GPU).
  Each cell times a decode step (median over ``repeats`` of the mean of ``steps`` forwards after two warm-up ones,
  fixed context: every forward is rolled back), one verification of ``verify_tokens`` tokens, and at TP > 1 the same
  step with the all-reduces replaced by no-ops (``comm share`` = 1 - that / the step). The bytes floor of an
  offloaded cell is the rank's streamed bytes per step / its H2D bandwidth measured together with the other ranks.
Resumable: cells whose JSON exists are skipped. A rank that fails or dies in a cell ends that launch with one error;
the cell is recorded as failed (its JSON holds the error) and the remaining cells run in a new launch. A cell whose
pinned stores cannot fit in the host's MemAvailable is refused up front, also as a failed cell.
``--device cpu`` runs the same code on gloo ranks (a functional smoke run; never a published number).
"""

from __future__ import annotations

import json
import re
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist

from .. import validate as v
from ..bench.steps import decode_ms, fill_cache, graphed_ms
from ..cache import make_cache
from ..kv.dense import DenseKV
from ..kv.placement import FORMATS, Placement
from ..model.api import RANDOM_SHAPES, model_config
from ..runs import checks
from ..runs.harness import fmt, free_memory, host_refusal, pinned_store_bytes, time_ms
from ..runs.store import atomic_write_json, atomic_write_text, run_metadata
from ..runs.tables import md_table
from ..runs.template import check_fields, opt
from . import RankFailed
from .launch import check_world, launch
from .tp import check_tp, no_collectives, random_tp_model, replicated_bytes, shard_config

REFERENCE_KINDS = ("gpu", "gpu_graphed")
QUICK = dict(shape="tiny", contexts=(256,), on_chip=2, steps=2, repeats=2, h2d_bytes=1 << 24)


@dataclass(frozen=True)
class TPBenchConfig:
    shape: str = opt("llama-2-7b-128k", "random-weight shape")
    contexts: tuple[int, ...] = opt((32768, 65536), "contexts (tokens in the cache)", lo=1)
    formats: tuple[str, ...] = opt(("none", "int8", "int4"), "offloaded KV formats", choices=FORMATS)
    tps: tuple[int, ...] = opt((1, 2), "tensor-parallel sizes to compare (the first is the baseline)", lo=1)
    on_chip: int = opt(16, "layers whose KV stays on the GPU in the offloaded cells", lo=0)
    steps: int = opt(8, "timed decode steps per repeat", lo=1)
    repeats: int = opt(3, "repeats (the median is reported)", lo=2)
    verify_tokens: int = opt(9, "tokens of the timed verification", cli=False, lo=1)
    # the gpu_graphed cells (NCCL all-reduces captured in the graph)
    graphs: bool = opt(True, "skip the graphed all-on-GPU cells", flag="--no-graphs", negate=True)
    device: str = opt("cuda", "cuda, or cpu: the same code on gloo ranks (a functional run; its numbers mean "
                              "nothing)", choices=("cuda", "cpu"))
    out_dir: str | None = opt(None, "output folder (default results/tp/<machine>)", aliases=("--output-dir",))
    # per copy of the bandwidth test (20 copies per measurement)
    h2d_bytes: int = opt(1 << 30, "bytes per copy of the bandwidth test", cli=False, lo=1)
    fill_chunk: int = opt(8192, "tokens per KV fill", cli=False, lo=1)
    host_reserve_bytes: int = opt(8 << 30, "host memory left free", cli=False)
    quick: bool = opt(False, "the tiny random shape at 256 tokens, 2 steps x 2 repeats (a functional run, e.g. with "
                             "--device cpu); flags given too win", preset=QUICK)

    def __post_init__(self):
        v.choice("shape", self.shape, sorted(RANDOM_SHAPES))  # not a flag's choices: its own message
        check_fields(self)

    @property
    def kinds(self) -> tuple[str, ...]:
        return ("gpu", *self.formats, *(("gpu_graphed",) if self.graphs else ()))

    def model_config(self):
        return model_config(f"random:{self.shape}")

    def validate(self) -> None:
        """Everything that can be refused before a rank starts (and before the output folder is made)."""
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("bench tp times GPUs and torch sees none; pass --device cpu for a functional run on gloo "
                             "ranks (numbers from it mean nothing)")
        c = self.model_config()
        for tp in self.tps:
            check_world(tp, self.device, "--tps")
            check_tp(c, tp, "--tps")
        if self.formats and not self.on_chip < c.n_layers:
            raise ValueError(f"--on-chip {self.on_chip} leaves nothing offloaded in the {c.n_layers}-layer "
                             f"{self.shape}; use at most {c.n_layers - 1}")
        Placement(on_chip=self.on_chip).validate(c.n_layers, c.head_dim)
        if too := [x for x in self.contexts if x + self.capacity_extra > c.max_position]:
            raise ValueError(f"--contexts {','.join(map(str, too))} exceed {self.shape}'s maximum context of "
                             f"{c.max_position} (with {self.capacity_extra} tokens of room for the steps)")
        if self.out_dir is not None:
            checks.out_dir("--out-dir", self.out_dir)

    @property
    def capacity_extra(self) -> int:
        return self.verify_tokens + 16


def cell_name(tp: int, ctx: int, kind: str) -> str:
    return f"tp{tp}-ctx{ctx}-{kind}"


def machine_name(device: str) -> str:
    """A folder name for this machine's results, e.g. ``nvidia-h200-x2`` (``cpu`` for smoke runs)."""
    if device != "cuda":
        return "cpu"
    name = re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(0).lower()).strip("-")
    return f"{name}-x{torch.cuda.device_count()}"


def _say(text: str) -> None:
    print(f"[bench tp] {text}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------------- parent
def run(cfg: TPBenchConfig, command: str = "") -> dict:
    """The bench registry's entry: every input checked (no rank started, no folder made), then the default
    ``--out-dir`` (``results/tp/<machine>``) filled in and every TP size run."""
    cfg.validate()
    if cfg.out_dir is None:
        cfg = replace(cfg, out_dir=f"results/tp/{machine_name(cfg.device)}")
        checks.out_dir("--out-dir", cfg.out_dir)
    return run_tp_bench(cfg, command)


def run_tp_bench(cfg: TPBenchConfig, command: str) -> dict:
    """Every TP size's launch (resuming), then the summary (``tp.json``, ``summary.md``) of what exists."""
    t0 = time.time()
    cells = Path(cfg.out_dir) / "cells"
    cells.mkdir(parents=True, exist_ok=True)
    c = cfg.model_config()
    for tp in cfg.tps:
        local = shard_config(c, tp)
        for _ in range(len(cfg.contexts) * len(cfg.kinds) + 2):  # at most one relaunch per failed cell
            todo = [(ctx, k) for ctx in cfg.contexts for k in cfg.kinds
                    if not (cells / f"{cell_name(tp, ctx, k)}.json").exists()]
            todo.sort(key=lambda x: (x[1] == "gpu_graphed", x[0]))  # graphs last: the riskiest capture
            for ctx, k in list(todo):
                if k in REFERENCE_KINDS or cfg.device != "cuda":
                    continue
                # pinned blocks are rounded up to powers of two by the host allocator: count twice the store
                need = 2 * tp * pinned_store_bytes(local, Placement(on_chip=cfg.on_chip, kv_quant=k),
                                                   ctx + cfg.capacity_extra)
                if err := host_refusal(need, f"the {tp} rank(s)' pinned {k} stores", cfg.host_reserve_bytes):
                    _write_cell(cells, tp, ctx, k, error=err, meta=run_metadata())
                    todo.remove((ctx, k))
            links = cells / f"tp{tp}-links.json"
            if not todo and links.exists():
                break
            _say(f"tp {tp}: launching {tp} rank(s) for {len(todo)} cell(s)" +
                 ("" if links.exists() else " and the link measurements"))
            marker = cells / f".running-tp{tp}"
            marker.unlink(missing_ok=True)
            try:
                launch(_rank_main, tp, (cfg, c, todo, not links.exists(), command), device_type=cfg.device)
                break
            except RankFailed as e:
                what = marker.read_text().strip() if marker.exists() else None
                _say(f"tp {tp}: {e}")
                stamp = {"tp": tp, "meta": run_metadata(), "command": command}
                if what is None:  # the ranks could not even build the model: nothing else will run
                    atomic_write_json(cells / f"tp{tp}-setup.json", {**stamp, "error": str(e)})
                    break
                if what == "links":  # keep what was measured before the failure (saved as it went)
                    kept = json.loads(links.read_text()) if links.exists() else stamp
                    atomic_write_json(links, {**kept, "error": str(e)})
                    continue
                ctx, k = what.split(" ")
                _write_cell(cells, tp, int(ctx), k, error=str(e), meta=run_metadata())
            finally:
                marker.unlink(missing_ok=True)
        write_summary(collect(cfg, command, time.time() - t0), cfg.out_dir)  # a cut run still leaves a summary
    return write_summary(collect(cfg, command, time.time() - t0), cfg.out_dir)


def _write_cell(cells: Path, tp: int, ctx: int, kind: str, error: str | None = None, **extra) -> None:
    atomic_write_json(cells / f"{cell_name(tp, ctx, kind)}.json",
                      {"tp": tp, "ctx": ctx, "kind": kind, "error": error, **extra})


# -------------------------------------------------------------------------------------------------------- ranks
def _rank_main(r, cfg: TPBenchConfig, model_cfg, todo: list, need_links: bool, command: str) -> None:
    cells = Path(cfg.out_dir) / "cells"
    marker = cells / f".running-tp{r.world}"
    torch.manual_seed(0)
    dtype = torch.bfloat16 if cfg.device == "cuda" else torch.float32
    t = time.time()
    model = random_tp_model(model_cfg, r.rank, r.world, r.device, dtype)
    if r.main:
        _say(f"tp {r.world}: rank model built in {time.time() - t:.1f} s")
    meta = run_metadata() if r.main else None
    links_path = cells / f"tp{r.world}-links.json"
    save = lambda d: atomic_write_json(links_path, {**d, "meta": meta, "command": command}) if r.main else None  # noqa: E731
    if need_links:
        if r.main:
            marker.write_text("links")
        links = _links(r, cfg, model, save)
        links["replicated_bytes_per_rank"] = replicated_bytes(model)
        save(links)
        if r.main:
            _say(f"tp {r.world}: H2D GB/s alone {_fmt_list(links['h2d_alone_GBps'])}, together "
                 f"{_fmt_list(links['h2d_together_GBps'])}")
    else:
        links = json.loads(links_path.read_text())
    bws = links.get("h2d_together_GBps") or links.get("h2d_alone_GBps")
    bw = bws[r.rank] * 1e9 if bws else None
    for i, (ctx, kind) in enumerate(todo):
        if r.main:
            marker.write_text(f"{ctx} {kind}")
        dist.barrier()
        t = time.time()
        if r.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        row = _cell(r, cfg, model, ctx, kind, bw)
        rows = _gather(row)
        if r.main:
            _write_cell(cells, r.world, ctx, kind, ranks=rows, wall_s=time.time() - t, shape=cfg.shape,
                        on_chip=cfg.on_chip if kind in FORMATS else None, weights="random",
                        config=asdict(cfg), meta=meta, command=command)
            _say(f"tp {r.world}: {i + 1}/{len(todo)} ctx {ctx} {kind}: {row['ms']:.2f} ms/step, verify "
                 f"{row['verify_ms']:.2f} ms ({time.time() - t:.0f} s)")
        free_memory()
        dist.barrier()
    if r.main:
        marker.unlink(missing_ok=True)


def _fmt_list(xs) -> str:
    return ", ".join(f"{x:.1f}" for x in xs)


def _sync(r) -> None:
    dist.barrier()
    if r.device.type == "cuda":
        torch.cuda.synchronize()


def _h2d(r, nbytes: int, iters: int, start) -> float:
    """Pinned host -> this rank's GPU, bytes/s over ``iters`` back-to-back copies (CPU ranks: a host copy), timed
    after ``start()`` (a barrier, so that ranks measuring together start together)."""
    cuda = r.device.type == "cuda"
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=cuda)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=r.device)
    ms = time_ms(lambda: dst.copy_(src, non_blocking=cuda), 1, iters, cuda=cuda, before=start)
    return nbytes / (ms / 1e3)


def _gather(value) -> list:
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def _links(r, cfg: TPBenchConfig, model, save) -> dict:
    iters = 20
    alone = None
    for j in range(r.world):  # one rank at a time
        _sync(r)
        if r.rank == j:
            alone = _h2d(r, cfg.h2d_bytes, iters, lambda: None)
        _sync(r)
    together = _h2d(r, cfg.h2d_bytes, iters, lambda: _sync(r))
    out = {"tp": r.world, "h2d_bytes_per_copy": cfg.h2d_bytes, "copies": iters,
           "h2d_alone_GBps": [x / 1e9 for x in _gather(alone)],
           "h2d_together_GBps": [x / 1e9 for x in _gather(together)], "allreduce_ms_per_step": {}}
    out["h2d_sum_alone_GBps"] = sum(out["h2d_alone_GBps"])
    out["h2d_sum_together_GBps"] = sum(out["h2d_together_GBps"])
    save(out)
    if r.world == 1:
        return out
    xs = {T: torch.zeros(1, T, model.cfg.dim, dtype=model.dtype, device=r.device) for T in (1, cfg.verify_tokens)}
    reduce = lambda x: [dist.all_reduce(x) for _ in range(2 * model.cfg.n_layers)]  # noqa: E731 (one per block half)
    ms = out["allreduce_ms_per_step"]
    for T, x in xs.items():
        ms[f"eager_T{T}"] = _time(r, lambda x=x: reduce(x), iters=10)
        save(out)
    if r.device.type == "cuda" and cfg.graphs:  # last: a failed capture loses nothing measured above
        for T, x in xs.items():
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                dist.all_reduce(x)
            torch.cuda.current_stream().wait_stream(s)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                reduce(x)
            ms[f"graphed_T{T}"] = _time(r, g.replay, iters=10)
            save(out)
    return out


def _time(r, fn, iters: int) -> float:
    """Mean ms of ``fn`` over ``iters`` calls after two warm-up calls, started together on every rank."""
    return time_ms(fn, 2, iters, cuda=r.device.type == "cuda", before=lambda: _sync(r))


def _cell(r, cfg: TPBenchConfig, model, ctx: int, kind: str, bw: float | None) -> dict:
    """A decode step, a verification and (TP > 1) the step without its all-reduces, on one cache: graphed all on the
    GPU, or eager (``gpu``: dense; a format: that much offloaded)."""
    steps, reps, vt = cfg.steps, cfg.repeats, cfg.verify_tokens
    out: dict = {"rank": r.rank}
    if kind == "gpu_graphed":
        timed = lambda n, tokens=1: graphed_ms(model, ctx, n, reps, tokens)[0]  # noqa: E731
    else:
        cap = ctx + cfg.capacity_extra
        offload = kind != "gpu"
        cache = (make_cache(model, Placement(on_chip=cfg.on_chip, kv_quant=kind), 1, cap) if offload
                 else DenseKV.for_model(model, 1, cap))
        with torch.inference_mode():
            fill_cache(model, cache, ctx, chunk=cfg.fill_chunk)
        _sync(r)
        before = cache.stats.h2d_bytes if offload else 0
        timed = lambda n, tokens=1: decode_ms(model, cache, n, reps, tokens)  # noqa: E731
    runs = timed(steps)
    if kind not in REFERENCE_KINDS:
        per_step = (cache.stats.h2d_bytes - before) // (2 + steps * reps)
        out |= {"h2d_bytes_per_step": per_step, "floor_ms": per_step / bw * 1e3 if bw else None,
                "memory": cache.memory_report()}
    out["verify_runs_ms"] = timed(2, vt)
    if r.world > 1:
        _sync(r)
        with no_collectives():  # the graphed step captured without the all-reduces
            out["nocomm_runs_ms"] = timed(steps)
        out["nocomm_ms"] = statistics.median(out["nocomm_runs_ms"])
        _sync(r)
    out |= {"runs_ms": runs, "ms": statistics.median(runs), "verify_ms": statistics.median(out["verify_runs_ms"])}
    if r.device.type == "cuda":
        out["gpu_peak_bytes"] = torch.cuda.max_memory_allocated()
    return out


# ------------------------------------------------------------------------------------------------------ summary
def collect(cfg: TPBenchConfig, command: str, wall_s: float) -> dict:
    """Rows per (context, kind) with every TP size's numbers, from the cell files that exist."""
    cells = Path(cfg.out_dir) / "cells"
    read = lambda p: json.loads(p.read_text()) if p.exists() else None
    links = {tp: read(cells / f"tp{tp}-links.json") or read(cells / f"tp{tp}-setup.json") for tp in cfg.tps}
    rows, missing, failed = [], [], []
    for ctx in cfg.contexts:
        for kind in cfg.kinds:
            row = {"ctx": ctx, "kind": kind}
            for tp in cfg.tps:
                cell = read(cells / f"{cell_name(tp, ctx, kind)}.json")
                if cell is None:
                    missing.append(cell_name(tp, ctx, kind))
                    continue
                if cell.get("error"):
                    failed.append({"cell": cell_name(tp, ctx, kind), "error": cell["error"]})
                    continue
                ranks = cell["ranks"]
                r0 = ranks[0]
                d = {"ms": r0["ms"], "verify_ms": r0["verify_ms"]}
                if "nocomm_ms" in r0:
                    d["nocomm_ms"] = r0["nocomm_ms"]
                    d["comm_share"] = max(0.0, 1 - max(x["nocomm_ms"] for x in ranks) / r0["ms"])
                if "h2d_bytes_per_step" in r0:
                    d["h2d_MB_per_step_per_rank"] = [x["h2d_bytes_per_step"] / 1e6 for x in ranks]
                    floors = [x.get("floor_ms") for x in ranks]
                    d["floor_ms"] = max(floors) if all(f is not None for f in floors) else None
                    d["ratio_to_floor"] = r0["ms"] / d["floor_ms"] if d["floor_ms"] else None
                row[f"tp{tp}"] = d
            base = row.get(f"tp{cfg.tps[0]}")
            for tp in cfg.tps[1:]:
                if base and row.get(f"tp{tp}"):
                    row[f"tp{tp}"][f"vs_tp{cfg.tps[0]}"] = row[f"tp{tp}"]["ms"] / base["ms"]
                    row[f"tp{tp}"][f"verify_vs_tp{cfg.tps[0]}"] = row[f"tp{tp}"]["verify_ms"] / base["verify_ms"]
            rows.append(row)
    meta = next((x.get("meta") for x in links.values() if x and x.get("meta")), None)
    gpu = (meta or {}).get("gpu") or ("cpu (gloo smoke run)" if cfg.device == "cpu" else "unknown GPU")
    return {"bench": "tp", "weights": "random", "shape": cfg.shape, "machine": f"{max(cfg.tps)}x {gpu}",
            "config": asdict(cfg), "links": links, "rows": rows, "missing": missing, "failed": failed,
            "complete": not missing and not failed, "command": command, "wall_s": wall_s, "meta": meta}


def render(res: dict) -> str:
    c = res["config"]
    tps = c["tps"]
    base = tps[0]
    lines = [f"# Tensor parallelism: {res['shape']} (**random weights**) on {res['machine']}"
             + ("" if res["complete"] else " — PARTIAL"), "",
             f"{c['on_chip']} of the layers keep their KV on the GPU in the offloaded rows (none/int8/int4: the "
             f"format of the rest); `gpu` keeps every layer on the GPU (eager), `gpu_graphed` replays it from a CUDA "
             f"graph. ms = median over {c['repeats']} repeats of {c['steps']} decode steps at a fixed context; "
             f"verify = one forward of {c['verify_tokens']} tokens. comm = share of the step that the all-reduces "
             f"cost (1 - the step with no-op all-reduces / the step). floor = a rank's streamed bytes per step / its "
             f"H2D bandwidth measured with every rank copying at once.", "", "## Links", ""]
    vt, links = c["verify_tokens"], []
    for tp, lk in res["links"].items():
        if not lk or (lk.get("error") and "h2d_alone_GBps" not in lk):
            links.append(f"| {tp} | {'FAILED: ' + lk['error'][:120] if lk else 'missing'} | | | | | |")
            continue
        ar = lk.get("allreduce_ms_per_step", {})
        arr = " / ".join(fmt(ar.get(k), "{:.3f}") for k in ("eager_T1", "graphed_T1", f"eager_T{vt}",
                                                              f"graphed_T{vt}")) if ar else "–"
        rep = lk.get("replicated_bytes_per_rank")
        links.append([tp, _fmt_list(lk["h2d_alone_GBps"]), _fmt_list(lk["h2d_together_GBps"]),
                      f"{lk['h2d_sum_alone_GBps']:.1f}", f"{lk['h2d_sum_together_GBps']:.1f}", arr,
                      fmt(rep / 2**20 if rep else None, "{:.0f}")])
    lines.append(md_table(["TP", "H2D alone GB/s (per rank)", "H2D together GB/s", "sum alone", "sum together",
                           "all-reduces per step, ms (T=1 eager / graphed; T=9 eager / graphed)",
                           "replicated MiB per rank"], links, "lllrrlr"))
    head = ["context", "KV", *(f"TP{t} ms" for t in tps), *(f"TP{t}/TP{base}" for t in tps[1:]),
            *(f"TP{t} verify ms" for t in tps), *(f"TP{t} comm" for t in tps[1:]), *(f"TP{t} floor ms" for t in tps),
            *(f"TP{t} MB/step/rank" for t in tps)]
    lines += ["", "## Decode step and verification", "",
              md_table(head, [_row_cols(row, tps) for row in res["rows"]], "r" * len(head))]
    if res["failed"]:
        lines += ["", f"## Failed or refused cells ({len(res['failed'])})", ""]
        lines += [f"- {f['cell']}: {f['error']}" for f in res["failed"]]
    if res["missing"]:
        lines += ["", f"Missing cells ({len(res['missing'])}): {', '.join(res['missing'])}"]
    lines += ["", f"Command: `{res['command']}`"]
    return "\n".join(lines) + "\n"


def _row_cols(row: dict, tps) -> list[str]:
    base = tps[0]
    at = lambda t: row.get(f"tp{t}") or {}
    share = lambda t: fmt(100 * at(t)["comm_share"], "{:.0f}%") if at(t).get("comm_share") is not None else "–"
    return [str(row["ctx"]), row["kind"], *(fmt(at(t).get("ms")) for t in tps),
            *(fmt(at(t).get(f"vs_tp{base}"), "{:.2f}x") for t in tps[1:]), *(fmt(at(t).get("verify_ms")) for t in tps),
            *(share(t) for t in tps[1:]), *(fmt(at(t).get("floor_ms")) for t in tps),
            *(_fmt_list(at(t).get("h2d_MB_per_step_per_rank") or []) or "–" for t in tps)]


def write_summary(res: dict, out_dir: str) -> dict:
    atomic_write_json(Path(out_dir) / "tp.json", res)
    atomic_write_text(Path(out_dir) / "summary.md", render(res))
    return res


def line(res: dict) -> dict:
    tps, vs = res["config"]["tps"], f"vs_tp{res['config']['tps'][0]}"
    keep = lambda t: ("ms", "verify_ms", "comm_share", "floor_ms") + ((vs,) if t != tps[0] else ())  # noqa: E731
    rows = [{"ctx": r["ctx"], "kind": r["kind"], **{f"tp{t}": {k: (r.get(f"tp{t}") or {}).get(k) for k in keep(t)}
                                                     for t in tps}} for r in res["rows"]]
    links = {t: {k: (lk or {}).get(k) for k in ("h2d_alone_GBps", "h2d_together_GBps", "allreduce_ms_per_step")}
             for t, lk in res["links"].items()}
    return {"bench": "tp", "machine": res["machine"], "complete": res["complete"], "rows": rows, "links": links}


def complete(res: dict) -> bool:
    """The exit status of ``bench tp``: every cell measured."""
    return res["complete"]
