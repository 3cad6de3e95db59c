"""What the tensor-parallel tests run on each rank (and, with world 1, in the test process as the TP=1 reference).

Spawned ranks import this module: it must not import transformers (seconds per rank); the full models come in as
arguments, built by the test process.
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist

from mspeckv.cache import make_cache
from mspeckv.config import GenerationConfig, SamplingConfig
from mspeckv.decoding.batch_spec import BatchSpecConfig
from mspeckv.decoding.speculative import SpecConfig
from mspeckv.kv.dense import DenseKV
from mspeckv.kv.placement import Placement
from mspeckv.parallel import RanksDiverged
from mspeckv.parallel.tp import (
    check_ranks_agree,
    shard_model,
    tp_generate,
    tp_generate_batch,
    tp_generate_batch_spec,
    tp_speculative_generate,
)

# small groups and slack so that a 40-token prompt flushes (and quantizes) several groups to the CPU store
PLACEMENTS = {
    "offload": Placement(on_chip=1, kv_group_size=8, rollback_slack=9),
    "int8": Placement(on_chip=1, kv_quant="int8", kv_group_size=8, rollback_slack=9),
    "int4_resident": Placement(on_chip=1, kv_quant="int4", kv_group_size=8, rollback_slack=9, resident_layers=1,
                               resident_format="quant", resident_policy="static"),
}
GREEDY = GenerationConfig(max_new_tokens=16, stop_on_eos=False, sampling=SamplingConfig(temperature=0.0))
SAMPLED = GenerationConfig(max_new_tokens=16, stop_on_eos=False, sampling=SamplingConfig(temperature=0.9, seed=3))
SPECS = {"vanilla": SpecConfig(mode="vanilla", gamma=4),
         "mspeckv": SpecConfig(mode="mspeckv", gamma=4, draft_gamma=2, budget=16, chunk=4, draft_sinks=4,
                               draft_window=16)}


@torch.inference_mode()
def logits(m, ids: torch.Tensor) -> dict:
    """Prefill logits of every position, then a 1-token decode step and a 5-token verification-shaped step."""
    cache = DenseKV.for_model(m, 1, ids.shape[1] + 8)
    out = {"prefill": m(ids[:, :-6], cache, num_logits=None)}
    out["decode"] = m(ids[:, -6:-5], cache, num_logits=None)
    out["verify"] = m(ids[:, -5:], cache, num_logits=None)
    return out


# batched decoding: ragged prompts (cut from the test's ids), fewer slots than prompts (a sequence joins when one
# leaves), every mode; a press per sequence on each rank's KV heads
BATCH_SPECS = {"self": BatchSpecConfig("self", 3, sinks=2, window=12),
               "vanilla": BatchSpecConfig("vanilla", 3),
               "vanilla_window": BatchSpecConfig("vanilla", 3, draft_window=10, draft_sinks=2),
               "mspeckv": BatchSpecConfig("mspeckv", 4, sinks=2, window=12, draft_gamma=2)}


def batch_scenarios(m, draft, ids: torch.Tensor) -> dict:
    ps = [ids[0, :n].tolist() for n in (40, 23, 31)]
    out = {"batch_ar": [s.tokens for s in tp_generate_batch(m, ps, GREEDY, max_batch=2).seqs],
           "batch_ar_streaming": [s.tokens for s in tp_generate_batch(m, ps, GREEDY, max_batch=2,
                                                                      press="streaming:budget=16,sinks=2").seqs],
           # SnapKV scores each KV head over its own query-head group, which a rank holds whole: TP=1's rows
           "batch_ar_snapkv": [s.tokens for s in tp_generate_batch(m, ps, GREEDY, max_batch=2,
                                                                   press="snapkv:budget=16,obs_window=8").seqs]}
    for name, spec in BATCH_SPECS.items():
        res = tp_generate_batch_spec(m, draft if spec.mode != "self" else None, ps, GREEDY, spec, max_batch=2)
        out[f"batch_{name}"], out[f"batch_{name}_acceptance"] = [s.tokens for s in res.seqs], res.stats["acceptance"]
    return out


def scenarios(m, draft, ids: torch.Tensor) -> dict:
    """Everything compared between TP=1 and TP=2 for one (already sharded) model and its (replicated) draft."""
    warnings.filterwarnings("ignore", "the draft .* is not smaller")
    out = {"logits": logits(m, ids), "placements": {}}
    for name, p in PLACEMENTS.items():
        cache = make_cache(m, p, 1, ids.shape[1] + GREEDY.max_new_tokens)
        res = tp_generate(m, ids, GREEDY, cache=cache)
        with torch.inference_mode():
            step = m(torch.tensor([[res.tokens[0][-1]]]), cache)  # one more step over the placed cache
        rep = cache.memory_report()
        out["placements"][name] = {"tokens": res.tokens, "logits": step, "pinned": rep["pinned_cpu_kv_bytes"],
                                   "h2d": rep["h2d_bytes_total"], "resident": rep["resident_slot_bytes"]}
    out["ar_greedy"] = tp_generate(m, ids, GREEDY).tokens
    out["ar_sampled"] = tp_generate(m, ids, SAMPLED).tokens
    for name, spec in SPECS.items():
        res = tp_speculative_generate(m, draft, ids, GREEDY, spec)
        out[f"{name}_greedy"], out[f"{name}_greedy_accepted"] = res.tokens, res.stats["accepted"]
        res = tp_speculative_generate(m, draft, ids, SAMPLED, spec)
        out[f"{name}_sampled"], out[f"{name}_sampled_accepted"] = res.tokens, res.stats["accepted"]
        placed = tp_speculative_generate(m, draft, ids, GREEDY, spec, placement=PLACEMENTS["int8"])
        out[f"{name}_greedy_int8"] = placed.tokens
    out.update(batch_scenarios(m, draft, ids))
    return out


def rank_main(r, models: dict, ids: torch.Tensor) -> list[dict]:
    """On each rank: every scenario for every (target, draft) pair, the divergence check on purpose, then all ranks'
    results."""
    out = {name: scenarios(shard_model(full, r.rank, r.world), draft, ids) for name, (full, draft) in models.items()}
    m = shard_model(next(iter(models.values()))[0], r.rank, r.world)
    try:  # a rank with its own seed samples other tokens: the check must catch it on every rank
        gen = GenerationConfig(max_new_tokens=12, sampling=SamplingConfig(temperature=0.9, seed=100 + r.rank))
        tp_generate(m, ids, gen)
        out["diverged"] = None
    except RanksDiverged as e:
        out["diverged"] = str(e)
    try:
        check_ranks_agree([1, 2, r.rank], "test values")
        out["check_direct"] = None
    except RanksDiverged as e:
        out["check_direct"] = str(e)
    out["world"] = dist.get_world_size()
    gathered = [None] * r.world
    dist.all_gather_object(gathered, out)
    return gathered


def fail_main(r, model, ids: torch.Tensor) -> None:
    """A plain generation; ``MSPECKV_TP_FAIL`` (set by the test) breaks one rank in the middle of it."""
    tp_generate(shard_model(model, r.rank, r.world), ids, GenerationConfig(max_new_tokens=30))
