"""Tensor parallelism on the CPU: 2 gloo ranks in spawned processes against the same model at TP=1.

The models run in fp64. A sharded matmul sums in another order than the whole one, and TP=2's row-parallel halves
meet in an all-reduce, so the K/V that a rank quantizes differ from TP=1's by rounding: up to 2.6e-6 in fp32, measured
(`tools/trace_tp_quant.py`), while TP=1's values lie as close as 4e-7 to an int8 code boundary. Which side such a value
lands on then depends on the machine's BLAS, and one flipped code moves the logits by ~4e-4 (seen on another machine;
not here). In fp64 the same reordering moves values by ~1e-15, and the quantizer computes codes in fp64 for fp64
input, so every code, scale and zero agrees and the comparison can be tight on any machine.

One launch runs every scenario on both ranks (``tp_workers.rank_main``), so the module pays for one spawn; the
failure tests each launch their own ranks and must end with one error, never a hang (collective timeouts are short).
"""

from __future__ import annotations

import copy

import pytest
import torch

from mspeckv.model.api import random_model
from mspeckv.parallel import RankFailed
from mspeckv.parallel.launch import launch
from mspeckv.parallel.tp import TPInfo, check_tp, random_tp_model, replicated_bytes, shard_config, shard_model
from tests import tp_workers
from tests.tiny import tiny_model

WORLD = 2
MODELS = {  # o/MLP biases exercise the row-parallel bias (added once, after the all-reduce); qwen2: qkv bias, tied
    "llama_bias": dict(family="llama", attention_bias=True, mlp_bias=True),
    "qwen2": dict(family="qwen2"),
}


def _pair(seed: int, **kw):
    """A target whose greedy output depends on the context (tiny random models at their init scale repeat one
    token; matrices x8 make them chaotic), and a draft that agrees with it often but not always (the target with 5%
    noise on every weight), so speculation both accepts and rejects."""
    target = tiny_model(seed=seed, **kw).double()
    with torch.no_grad():
        for name, p in target.named_parameters():
            if p.dim() == 2 and "embed" not in name:
                p.mul_(8)
        draft = copy.deepcopy(target)
        g = torch.Generator().manual_seed(seed + 100)
        for p in draft.parameters():
            p.add_(torch.randn(p.shape, generator=g) * p.std() * 0.05)
    return target, draft


def _models():
    models = {name: _pair(i, **kw) for i, (name, kw) in enumerate(MODELS.items())}
    ids = torch.randint(3, 97, (1, 40), generator=torch.Generator().manual_seed(0))
    return models, ids


@pytest.fixture(scope="module")
def runs():
    models, ids = _models()
    ranks = launch(tp_workers.rank_main, WORLD, (models, ids), timeout_s=60)
    ref = {name: tp_workers.scenarios(m, draft, ids) for name, (m, draft) in models.items()}
    return ref, ranks


def test_ranks_ran_in_one_group(runs):
    _, ranks = runs
    assert [r["world"] for r in ranks] == [WORLD, WORLD]


@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("part", ["prefill", "decode", "verify"])
def test_logits_equal_tp1(runs, model, part):
    ref, ranks = runs
    want = ref[model]["logits"][part]
    for r in ranks:
        got = r[model]["logits"][part]
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    assert torch.equal(ranks[0][model]["logits"][part], ranks[1][model]["logits"][part])  # after the all-reduce


@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("placement", list(tp_workers.PLACEMENTS))
def test_placement_per_rank_equals_tp1(runs, model, placement):
    ref, ranks = runs
    want = ref[model]["placements"][placement]
    for r in ranks:
        got = r[model]["placements"][placement]
        assert got["tokens"] == want["tokens"]
        torch.testing.assert_close(got["logits"], want["logits"], rtol=1e-10, atol=1e-10)  # fp64: codes agree
        # each rank stores, streams and keeps resident exactly its half of the KV heads
        assert 2 * got["pinned"] == want["pinned"] > 0
        assert 2 * got["h2d"] == want["h2d"] > 0
        assert 2 * got["resident"] == want["resident"]


@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("what", ["ar_greedy", "vanilla_greedy", "mspeckv_greedy", "vanilla_greedy_int8",
                                  "mspeckv_greedy_int8"])
def test_greedy_equals_tp1_exactly(runs, model, what):
    ref, ranks = runs
    assert len(set(ref[model]["ar_greedy"][0])) > 4  # a varied output, not one repeated token
    assert ref[model][what] == ref[model]["ar_greedy"] or "int8" in what  # speculation is lossless (fp64 here)
    for r in ranks:
        assert r[model][what] == ref[model][what]


@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("what", ["batch_ar", "batch_ar_streaming", "batch_ar_snapkv",
                                  *[f"batch_{n}" for n in tp_workers.BATCH_SPECS]])
def test_batch_every_mode_equals_tp1_per_sequence(runs, model, what):
    """At batch (ragged prompts, 2 slots for 3 prompts): each rank's tokens equal TP=1's, sequence by sequence;
    speculation equals batched AR (lossless, fp64), and its acceptance agrees across ranks."""
    ref, ranks = runs
    if what not in ("batch_ar_streaming", "batch_ar_snapkv"):  # a press changes the model: against TP=1's only
        assert ref[model][what] == ref[model]["batch_ar"]
    for r in ranks:
        assert r[model][what] == ref[model][what]
        if f"{what}_acceptance" in ref[model]:
            assert r[model][f"{what}_acceptance"] == ref[model][f"{what}_acceptance"]


def test_batch_cost_model_is_refused_under_tp(monkeypatch):
    from mspeckv.decoding.batch_spec import BatchSpecConfig
    from mspeckv.parallel import tp

    monkeypatch.setattr(tp.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(tp.dist, "get_world_size", lambda: 2)
    with pytest.raises(ValueError, match="auto"):
        tp.tp_generate_batch_spec(None, None, [[1, 2]], None, BatchSpecConfig("self", 4, auto=True))


@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("what", ["vanilla_greedy", "mspeckv_greedy", "vanilla_sampled", "mspeckv_sampled"])
def test_speculation_accepts_and_rejects_the_same_on_every_rank(runs, model, what):
    ref, ranks = runs
    acc = ref[model][f"{what}_accepted"]
    gamma = tp_workers.SPECS[what.split("_")[0]].gamma
    assert 0 < acc < gamma if "greedy" in what else 0 < acc <= gamma  # greedy: accepts and rejects both happened
    assert [r[model][f"{what}_accepted"] for r in ranks] == [acc, acc]


@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("what", ["ar_sampled", "vanilla_sampled", "mspeckv_sampled"])
def test_sampled_same_tokens_on_every_rank(runs, model, what):
    ref, ranks = runs
    assert ranks[0][model][what] == ranks[1][model][what]  # same seed, same logits: same draws and acceptances
    assert ranks[0][model][what] == ref[model][what]  # and the TP=1 run's (fp64; no near-tie in these runs)


def test_divergence_is_caught_on_every_rank(runs):
    _, ranks = runs
    for r in ranks:
        assert r["diverged"] is not None and "ranks diverged" in r["diverged"] and "rank(s) 1" in r["diverged"]
        assert r["check_direct"] is not None and "test values" in r["check_direct"]


@pytest.mark.parametrize("mode, expect", [
    ("exit", "rank 1 of 2 exited with code 3"),
    ("raise", "rank 1 of 2 raised RuntimeError: injected failure"),
    ("hang", "rank 1 of 2 stopped responding"),
])
def test_failed_rank_ends_the_run_with_one_error(monkeypatch, mode, expect):
    """Rank 1 fails in the middle of a forward (its 9th all-reduce) while rank 0 waits in the same collective."""
    monkeypatch.setenv("MSPECKV_TP_FAIL", f"1:9:{mode}")
    model = tiny_model()
    timeout = 4 if mode == "hang" else 60  # only the hang waits on it; the others end as soon as rank 1 is gone
    with pytest.raises(RankFailed) as e:
        launch(tp_workers.fail_main, WORLD, (model, torch.tensor([[5, 6, 7, 8]])), timeout_s=timeout)
    assert expect in str(e.value)
    assert e.value.rank == 1
    assert "\n" not in str(e.value)


def test_shard_model_slices_and_replicates():
    full = tiny_model(attention_bias=True, mlp_bias=True)
    c = full.cfg
    parts = [shard_model(full, r, WORLD) for r in range(WORLD)]
    for r, m in enumerate(parts):
        assert m.tp == TPInfo(r, WORLD, c)
        assert (m.cfg.n_heads, m.cfg.n_kv_heads, m.cfg.intermediate) == (c.n_heads // 2, c.n_kv_heads // 2,
                                                                           c.intermediate // 2)
    a0, a1 = (p.model.layers[0].self_attn for p in parts)
    fa = full.model.layers[0].self_attn
    assert torch.equal(torch.cat([a0.k_proj.weight, a1.k_proj.weight]), fa.k_proj.weight)
    assert torch.equal(torch.cat([a0.o_proj.weight, a1.o_proj.weight], 1), fa.o_proj.weight)
    assert torch.equal(a0.o_proj.bias, fa.o_proj.bias)  # replicated, added once after the reduce
    m0, m1 = (p.model.layers[0].mlp for p in parts)
    want = full.model.layers[0].mlp.down_proj.weight
    assert torch.equal(torch.cat([m0.down_proj.weight, m1.down_proj.weight], 1), want)
    assert torch.equal(parts[1].lm_head.weight, full.lm_head.weight)
    assert replicated_bytes(parts[0]) >= 2 * c.vocab_size * c.dim * 4


def test_random_tp_model_is_a_shard_of_the_tp1_random_model():
    full = random_model("tiny", "cpu", torch.float32, seed=3)
    one = random_tp_model("tiny", 0, 1, "cpu", torch.float32, seed=3)
    assert one.state_dict().keys() == full.state_dict().keys()
    assert all(torch.equal(one.state_dict()[k], v) for k, v in full.state_dict().items())
    for r in range(WORLD):
        want = shard_model(full, r, WORLD).state_dict()
        got = random_tp_model("tiny", r, WORLD, "cpu", torch.float32, seed=3).state_dict()
        assert want.keys() == got.keys()
        for k in want:
            assert torch.equal(got[k], want[k]), k


def test_bad_tp_sizes_say_which_work():
    c = tiny_model("mistral").cfg  # 1 KV head
    with pytest.raises(ValueError, match="does not divide the model's 1 KV heads .* use --tp 1$"):
        check_tp(c, 2)
    c = tiny_model().cfg  # 2 KV heads, MLP 96
    with pytest.raises(ValueError, match="use --tp 1, 2$"):
        check_tp(c, 3)
    with pytest.raises(ValueError, match="integer >= 1"):
        check_tp(c, 0)
    assert shard_config(c, 2).n_kv_heads == 1
