"""Why TP=2's int8 placement can differ from TP=1's: the quantizer's inputs, per call, on both.

    python tools/trace_tp_quant.py [--dtype float32|float64]

Runs the int8 placement scenario of ``tests/test_tp.py`` (model ``llama_bias``) at TP=1 in this process and at TP=2 on
two gloo ranks, records every ``_quantize_groups`` input, and prints per call: the largest difference between TP=2's
and TP=1's inputs, the smallest distance of a TP=1 value to an int8 rounding boundary (in the values' units), and how
many codes, scales and zeros differ. A difference larger than that distance can flip a code, and then depends on the
machine's BLAS. In fp32 the differences reach ~2e-6 against margins of ~4e-7; in fp64 they are ~1e-15.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mspeckv.kv.quant as Q  # noqa: E402
from mspeckv.parallel.launch import launch  # noqa: E402
from mspeckv.parallel.tp import shard_model  # noqa: E402
from tests import test_tp, tp_workers  # noqa: E402

_quantize = Q._quantize_groups


def record(m, ids) -> list:
    """Every (input, (codes, scale, zero)) the quantizer sees in one greedy int8 run."""
    calls = []

    def rec(x, spec):
        out = _quantize(x, spec)
        calls.append((x.detach().clone(), out))
        return out

    Q._quantize_groups = rec
    try:
        cache = tp_workers.make_cache(m, tp_workers.PLACEMENTS["int8"], 1, ids.shape[1] + 16)
        tp_workers.tp_generate(m, ids, tp_workers.GREEDY, cache=cache)
    finally:
        Q._quantize_groups = _quantize
    return calls


def rank_main(r, full, ids):
    got = [None] * r.world
    dist.all_gather_object(got, record(shard_model(full, r.rank, r.world), ids))
    return got


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    dtype = getattr(torch, ap.parse_args().dtype)
    models, ids = test_tp._models()
    full = models["llama_bias"][0].to(dtype)
    ref = record(full, ids)
    ranks = launch(rank_main, 2, (full, ids), timeout_s=120)
    cat = lambda i, j: torch.cat([ranks[0][i][1][j], ranks[1][i][1][j]], dim=1)  # ranks hold half the heads each
    print(f"{'call':>4} {'shape':>18} {'max |x2-x1|':>12} {'min margin':>11} {'codes':>6} {'zero':>5} {'scale':>6}")
    for i, (x, (codes, scale, zero)) in enumerate(ref):
        dx = (torch.cat([ranks[0][i][0], ranks[1][i][0]], dim=1) - x).abs().max().item()
        u = (x - zero.to(x.dtype).unsqueeze(-1)) / scale.to(x.dtype).unsqueeze(-1)  # position in code steps
        margin = (((u - u.floor()) - 0.5).abs() * scale.to(x.dtype).unsqueeze(-1)).min().item()
        flips = [(cat(i, j) != t).sum().item() for j, t in enumerate((codes, scale, zero))]
        print(f"{i:>4} {str(tuple(x.shape)):>18} {dx:>12.2e} {margin:>11.2e} {flips[0]:>6} {flips[2]:>5} {flips[1]:>6}")


if __name__ == "__main__":
    main()
