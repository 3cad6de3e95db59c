"""Peers side by side: NVIDIA kvpress presses and transformers' quantized caches on the same model, text and protocol
as ``mspeckv eval ppl,kl`` (``evals/lm.py``), so their rows sit beside ours.

Protocol at context ``C``, scored span ``S``, ``W`` windows, as in ``evals/lm.py``:

- the windows are ``evals/lm.windows`` itself with our tokenizer (the ids our eval scores with the same ``--seed``
  and ``--dataset``, its default stride);
- the prefix ``window[:C-S]`` goes into the peer's cache, then the scored segment ``window[C-S:C]`` is fed through
  that cache in chunks of ``score_chunk`` tokens, at its true positions (``position_ids`` ``C-S+s ...``, so an
  evicted cache is not shifted), and its logits are scored against ``window[C-S+1:C+1]``;
- the full cache (transformers' ``DynamicCache``, same model, same windows) is the baseline of PPL Δ and of the KL
  and top-1 agreement, summed with our own ``metrics.Accumulator``.

Peers (``parse_peer``):

- ``kvpress:<press>:keep=F[,k=v...]``: a kvpress press (``snapkv``, ``streaming``, ``observed``, ``pyramidkv``,
  ``adakv-snapkv``) with ``compression_ratio = 1 - F``; other ``k=v`` go to the press's constructor (e.g.
  ``window_size=32`` as our SnapKV's ``obs_window``). It is applied as kvpress applies it: its context manager around
  one forward of the whole prefix (kvpress compresses during that prefill only), the segment outside it;
- ``hf-quant:<quanto|hqq>:nbits=N[,group=G,residual=R,axis_key=A,axis_value=A]``: transformers' ``QuantizedCache``
  (its defaults where not given: group 64, residual 128, axes 0); the prefix goes in chunks of ``prefill_chunk`` as
  ours does.

Two processes, because kvpress pins another transformers than ours: :func:`run_peers` (our environment) builds the
windows and a job file, runs ``PYTHON -m mspeckv.evals.peers JOB OUT`` with the peers' interpreter (a virtual
environment with kvpress and the quantization backends), and writes ``peers.json`` (rows, config, both sides'
versions) atomically. The worker imports only torch, transformers, the peer libraries and ``evals.metrics``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from ..runs.template import check_fields, opt

KVPRESS = {"snapkv": "SnapKVPress", "streaming": "StreamingLLMPress", "observed": "ObservedAttentionPress",
           "pyramidkv": "PyramidKVPress", "adakv-snapkv": "SnapKVPress"}  # adakv-*: AdaKVPress around that press
QUANT_BACKENDS = {"quanto": (2, 4), "hqq": (1, 2, 3, 4, 8)}  # backend -> nbits it supports
LIBRARIES = ("kvpress", "hf-quant")
# hf-quant settings -> QuantizedCache's argument and its default there (group 64, residual 128, axes 0)
QUANT_SETTINGS = {"nbits": "nbits", "group": "q_group_size", "residual": "residual_length", "axis_key": "axis_key",
                  "axis_value": "axis_value"}


@dataclass(frozen=True)
class Peer:
    """One peer configuration: ``library`` (kvpress | hf-quant), ``name`` (a press or a backend), ``params``."""

    spec: str
    library: str
    name: str
    params: tuple[tuple[str, int | float], ...] = ()

    @property
    def kw(self) -> dict[str, int | float]:
        return dict(self.params)


def _number(text: str, where: str) -> int | float:
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"--peer {where}: {text!r} is not a number") from None


def parse_peer(spec: str) -> Peer:
    """``library:name:k=v,...`` -> Peer, or one ValueError that says what to write."""
    parts = spec.split(":")
    if len(parts) not in (2, 3) or parts[0] not in LIBRARIES:
        raise ValueError(f"--peer {spec!r}: write kvpress:<press>:keep=F or hf-quant:<backend>:nbits=N "
                         f"(e.g. kvpress:snapkv:keep=0.25, hf-quant:quanto:nbits=4)")
    lib, name, params = parts[0], parts[1], {}
    for item in (parts[2].split(",") if len(parts) == 3 and parts[2] else []):
        k, eq, x = item.partition("=")
        if not eq or not k:
            raise ValueError(f"--peer {spec!r}: {item!r} is not k=v")
        params[k.strip()] = _number(x.strip(), spec)
    if lib == "kvpress":
        if name not in KVPRESS:
            raise ValueError(f"--peer {spec!r}: kvpress press {name!r} is not one of {', '.join(KVPRESS)}")
        keep = params.get("keep")
        if keep is None or not 0 < keep <= 1:
            raise ValueError(f"--peer {spec!r}: give keep=F, the fraction of the prefix kept, 0 < F <= 1")
    else:
        if name not in QUANT_BACKENDS:
            raise ValueError(f"--peer {spec!r}: backend {name!r} is not one of {', '.join(QUANT_BACKENDS)}")
        if params.get("nbits") not in QUANT_BACKENDS[name]:
            raise ValueError(f"--peer {spec!r}: give nbits=N with N one of {QUANT_BACKENDS[name]} for {name}")
        extra = set(params) - set(QUANT_SETTINGS)
        if extra:
            raise ValueError(f"--peer {spec!r}: unknown setting(s) {', '.join(sorted(extra))}; "
                             f"hf-quant takes {', '.join(QUANT_SETTINGS)}")
    return Peer(spec, lib, name, tuple(sorted(params.items())))


@dataclass(frozen=True)
class PeersConfig:
    model: str = opt("qwen2.5-coder-0.5b", "embedded name or HF directory (the peers load it with transformers)")
    python: str = opt(sys.executable, "the interpreter of the environment with kvpress / optimum-quanto / hqq")
    peers: tuple[str, ...] = opt(("kvpress:snapkv:keep=0.25",), "peer specs (see mspeckv/evals/peers.py)",
                                 nargs=True, check=False)
    context: int = opt(2048, "tokens per window (prefix + scored span)", lo=2)
    windows: int = opt(2, "windows, as eval --windows (each inside one document)", lo=1)
    scored: int = opt(256, "scored span per window", lo=1)
    score_chunk: int = opt(32, "scored tokens per forward", lo=1)
    prefill_chunk: int = opt(1024, "prefix tokens per forward (the quantized caches; a press takes one forward)",
                             lo=1)
    seed: int = opt(0, "seed of the windows (as eval --seed)")
    dataset: str | None = opt(None, "corpus, as eval --dataset (none: the eval's default)")
    dtype: str = opt("float32", "the model's dtype in the worker", choices=("float32", "bfloat16"))
    out_dir: str = opt("results/quality/peers", "where peers.json is written")

    def __post_init__(self):
        check_fields(self)
        if not self.peers:
            raise ValueError("--peers is empty: give at least one peer spec")
        for p in self.peers:
            parse_peer(p)
        if self.scored >= self.context:
            raise ValueError(f"--scored {self.scored} must be less than --context {self.context} (a prefix is "
                             f"needed)")


def windows(tok, cfg: PeersConfig) -> list[list[int]]:
    """The token windows our eval scores: ``evals/lm.windows`` itself (inside one document each, every document of
    the corpus; the default stride), so the peers and our eval never disagree on the text."""
    from types import SimpleNamespace

    from .lm import windows as eval_windows

    ev = SimpleNamespace(dataset=cfg.dataset, windows=cfg.windows, seed=cfg.seed, split="all", stride=None)
    return [w.ids for w in eval_windows(tok, ev, cfg.context)]


def run_peers(cfg: PeersConfig) -> dict:
    """Build the windows here, score every peer in ``cfg.python``'s environment, write ``out_dir/peers.json``."""
    from ..model.api import load_tokenizer
    from ..model.loading import resolve
    from ..runs.checks import out_dir
    from ..runs.store import atomic_write_json, run_metadata

    out_dir("--out-dir", cfg.out_dir)
    if not Path(cfg.python).is_file():
        raise ValueError(f"--python {cfg.python} is not a file; give the interpreter of the peers' environment, "
                         f"e.g. /tmp/kvp/bin/python")
    model_dir = resolve(cfg.model)
    job = {"model_dir": str(model_dir), "windows": windows(load_tokenizer(model_dir), cfg),
           "scored": cfg.scored, "score_chunk": cfg.score_chunk, "prefill_chunk": cfg.prefill_chunk,
           "dtype": cfg.dtype, "peers": list(cfg.peers)}
    root = Path(__file__).resolve().parents[2]  # the checkout that holds this package, for the worker's imports
    with tempfile.TemporaryDirectory(prefix="mspeckv-peers-") as tmp:
        (Path(tmp) / "job.json").write_text(json.dumps(job))
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
        done = subprocess.run([cfg.python, "-m", "mspeckv.evals.peers", f"{tmp}/job.json", f"{tmp}/out.json"],
                              env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"the peers' worker ({cfg.python}) failed with exit code {done.returncode}:\n"
                               f"{done.stderr[-4000:]}")
        worker = json.loads((Path(tmp) / "out.json").read_text())
    out = {"config": asdict(cfg), "command": " ".join(sys.argv), "meta": run_metadata(),
           "worker": worker["meta"], "rows": [{"model": cfg.model, "dataset": cfg.dataset, "context": cfg.context,
                                               "seed": cfg.seed, **r} for r in worker["rows"]]}
    atomic_write_json(Path(cfg.out_dir) / "peers.json", out)
    return out


def our_rows(folder: str | Path) -> list[dict]:
    """Our eval's ``ppl`` and ``kl`` cells of one folder as rows like the peers' (PPL Δ against the folder's own full
    cache at the same context)."""
    from ..runs.template import CellStore
    from .variants import BASELINE

    cells = CellStore(Path(folder)).all()
    get = {(c["metric"], c["variant"], c["context"]): c for c in cells}
    rows = []
    for (metric, variant, ctx), c in sorted(get.items()):
        base = get.get(("ppl", BASELINE, ctx))
        if metric != "ppl" or base is None:
            continue
        kl = get.get(("kl", variant, ctx), {}).get("results", {})
        r, s = c["results"], c["settings"]
        rows.append({"peer": variant, "library": "mspeckv", "model": s.get("model"), "dataset": s.get("dataset"),
                     "context": ctx, "windows": r.get("windows"), "status": "ok", "ppl": r["ppl"],
                     "baseline_ppl": base["results"]["ppl"], "ppl_delta_pct": 100.0 * (r["ppl"] / base["results"]["ppl"]
                                                                                       - 1.0),
                     "kl_mean": kl.get("kl_mean"), "top1_agreement": kl.get("top1_agreement"),
                     "source": str(folder)})
    return rows


def table(rows: list[dict]) -> str:
    """One Markdown table of peers' and our rows (each row's Δ and KL against its own run's full cache)."""
    from ..runs.tables import md_table

    f = lambda x, spec: "" if x is None else format(x, spec)
    body = [[r["library"], r["peer"], r.get("context"), r.get("windows"),
             f(r.get("ppl"), ".3f"), f(r.get("baseline_ppl"), ".3f"), f(r.get("ppl_delta_pct"), "+.2f"),
             f(r.get("kl_mean"), ".4f"), f(r.get("top1_agreement"), ".3f")] if r["status"] == "ok"
            else [r["library"], r["peer"], r.get("context"), r.get("windows"), f"error: {r['error']}", "", "", "", ""]
            for r in rows]
    return md_table(["library", "configuration", "context", "windows", "PPL", "full-cache PPL", "PPL Δ %",
                     "KL (nats/token)", "top-1 agreement"], body, "llrrrrrrr")


# ------------------------------------------------------------------------------------------ the worker (peers' env)
def _press(peer: Peer):
    import kvpress

    kw = peer.kw
    ratio = 1.0 - kw.pop("keep")
    if peer.name.startswith("adakv-"):
        return kvpress.AdaKVPress(press=getattr(kvpress, KVPRESS[peer.name])(compression_ratio=ratio, **kw))
    return getattr(kvpress, KVPRESS[peer.name])(compression_ratio=ratio, **kw)


def _cache(peer: Peer | None, model):
    from transformers import DynamicCache

    if peer is None or peer.library == "kvpress":
        return DynamicCache()
    from transformers import QuantizedCache

    return QuantizedCache(backend=peer.name, config=model.config, **{QUANT_SETTINGS[k]: x for k, x in peer.params})


def score_window(model, peer: Peer | None, window, S: int, chunk: int, prefill_chunk: int):
    """-> (logits (S, V) fp32, targets (S,), the cache's rows after the prefix, mean over layers)."""
    import contextlib

    import torch

    P = window.shape[1] - 1 - S
    cache = _cache(peer, model)
    prefix = window[:, :P]
    if peer is not None and peer.library == "kvpress":
        with _press(peer)(model):
            model.model(input_ids=prefix, past_key_values=cache)
    else:
        for s in range(0, P, prefill_chunk):
            e = min(P, s + prefill_chunk)
            model.model(input_ids=prefix[:, s:e], past_key_values=cache, position_ids=torch.arange(s, e)[None])
    lengths = [cache.get_seq_length(i) for i in range(len(model.model.layers))]
    if len(set(lengths)) > 1:  # per-layer budgets (PyramidKV): transformers builds one mask for all layers, so a
        chunk = 1  # segment goes one token per forward, where no mask is needed (the same logits, more forwards)
    logits = []
    for s in range(0, S, chunk):
        e = min(S, s + chunk)
        pos = torch.arange(P + s, P + e)[None]
        out = model(input_ids=window[:, P + s:P + e], past_key_values=cache, position_ids=pos)
        logits.append(out.logits[0].float())
    for layer in model.model.layers:  # kvpress's AdaKV leaves head-wise masks on the modules: none may outlive it
        with contextlib.suppress(AttributeError):
            layer.self_attn.masked_key_indices = None
    return torch.cat(logits), window[0, P + 1:], sum(lengths) / len(lengths)


def worker(job_path: str, out_path: str) -> None:
    import importlib.metadata as md

    import torch
    from transformers import AutoModelForCausalLM

    from .metrics import Accumulator

    job = json.loads(Path(job_path).read_text())
    peers = [parse_peer(p) for p in job["peers"]]
    model = AutoModelForCausalLM.from_pretrained(job["model_dir"], dtype=getattr(torch, job["dtype"]),
                                                 attn_implementation="sdpa").eval()
    S, chunk, pchunk = job["scored"], job["score_chunk"], job["prefill_chunk"]
    acc = {spec: Accumulator() for spec in ("full", *(p.spec for p in peers))}
    held: dict[str, list[float]] = {k: [] for k in acc}
    errors: dict[str, str] = {}
    with torch.inference_mode():
        for ids in job["windows"]:
            window = torch.tensor([ids])
            ref, targets, h = score_window(model, None, window, S, chunk, pchunk)
            acc["full"].add_tokens(ref, targets, None)
            held["full"].append(h)
            for p in peers:
                if p.spec in errors:
                    continue
                eager = p.name == "observed"  # it reads the attention weights, which only eager attention returns
                try:
                    if eager:
                        model.set_attn_implementation("eager")
                    logits, _, h = score_window(model, p, window, S, chunk, pchunk)
                except Exception as e:  # a peer that cannot run here is a row with its error, not a crash
                    errors[p.spec] = f"{type(e).__name__}: {e}"
                    continue
                finally:
                    if eager:
                        model.set_attn_implementation("sdpa")
                acc[p.spec].add_tokens(logits, targets, ref)
                held[p.spec].append(h)
    base = acc["full"].results()
    rows = []
    for spec, a in acc.items():
        row = {"peer": spec, "library": spec.split(":")[0] if spec != "full" else "transformers",
               "windows": len(job["windows"]), "scored_span": S, "prefix_tokens": len(job["windows"][0]) - 1 - S}
        if spec in errors:
            rows.append({**row, "status": "error", "error": errors[spec]})
            continue
        r = a.results()
        rows.append({**row, "status": "ok", "ppl": r["ppl"], "baseline_ppl": base["ppl"],
                     "ppl_delta_pct": 100.0 * (r["ppl"] / base["ppl"] - 1.0), "kl_mean": r["kl_mean"],
                     "top1_agreement": r["top1_agreement"], "scored_tokens": r["scored_tokens"],
                     "rows_per_layer_after_prefix": sum(held[spec]) / len(held[spec])})

    def version(name: str) -> str | None:
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return None

    meta = {"python": sys.version.split()[0], **{k: version(k) for k in
                                                  ("torch", "transformers", "kvpress", "optimum-quanto", "hqq")},
            "attn_implementation": "sdpa (eager for kvpress:observed)", "dtype": job["dtype"]}
    Path(out_path).write_text(json.dumps({"meta": meta, "rows": rows}))


if __name__ == "__main__":
    worker(*sys.argv[1:3])
