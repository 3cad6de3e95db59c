"""Speculative decoding end to end on tiny random models: greedy equals AR token for token (fp32), sampled
output follows the target distribution (chi-square), caches roll back exactly, bad input gets clear errors."""

import pytest
import torch
from scipy.stats import chisquare

from mspeckv.cache import make_cache
from mspeckv.config import GenerationConfig, SamplingConfig
from mspeckv.decoding.autoregressive import generate
from mspeckv.decoding.speculative import SpecConfig, speculative_generate
from mspeckv.kv.placement import Placement
from tests.tiny import tiny_model

PLACEMENTS = [None, Placement(on_chip=1, kv_group_size=8, rollback_slack=16),
              Placement(on_chip=0, kv_group_size=8, rollback_slack=16, resident_layers=2),
              Placement(on_chip=2, kv_group_size=8, rollback_slack=16, resident_layers=1)]


def pair(layers=3):
    target = tiny_model("llama", seed=0, num_hidden_layers=layers)
    draft = tiny_model("llama", seed=1, num_hidden_layers=1)
    return target, draft


def greedy(n):
    return GenerationConfig(max_new_tokens=n, stop_on_eos=False, prefill_chunk=16)


def prompt(n=60, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randint(3, 97, (1, n // 3), generator=g)
    return torch.cat([base, base, base[:, : n - 2 * (n // 3)]], 1)  # repetitive: drafts get accepted sometimes


@pytest.mark.parametrize("placement", PLACEMENTS, ids=lambda p: p and f"on{p.on_chip}-r{p.resident_layers}" or "gpu")
@pytest.mark.parametrize("spec", [SpecConfig(mode="vanilla", gamma=4), SpecConfig(mode="vanilla", gamma=3, graphs=True),
                                  SpecConfig(mode="mspeckv", gamma=6, draft_gamma=3, budget=16, chunk=4,
                                             draft_sinks=4, draft_window=12),
                                  SpecConfig(mode="mspeckv", gamma=5, draft_gamma=2, budget=24, chunk=8,
                                             draft_sinks=2, draft_window=8, refresh_every=7, sync_retrieval=False),
                                  SpecConfig(mode="mspeckv", gamma=4, budget=16, chunk=4, drafter="ngram"),
                                  SpecConfig(mode="mspeckv", gamma=6, draft_gamma=3, budget=16, chunk=4,
                                             draft_sinks=4, draft_window=12, graphs=True),
                                  SpecConfig(mode="mspeckv", gamma=5, draft_gamma=2, budget=24, chunk=8,
                                             draft_sinks=2, draft_window=8, refresh_every=7, graphs=True)],
                         ids=["vanilla", "vanilla-static", "mspeckv", "mspeckv-refresh-nosync", "mspeckv-ngram",
                              "mspeckv-static", "mspeckv-static-refresh"])
def test_greedy_equals_autoregressive(spec, placement):
    target, draft = pair(layers=4)
    ids = prompt()
    n = 40
    ar = generate(target, ids, greedy(n), cache=make_cache(target, placement, 1, 60 + n))
    sp = speculative_generate(target, draft, ids, greedy(n), spec, placement=placement)
    assert sp.tokens == ar.tokens, (sp.tokens, ar.tokens)
    l2 = sp.levels["verify_l2"]
    assert l2["rounds"] >= 1 and 0 <= sp.stats["accepted"] <= spec.gamma
    if spec.mode == "mspeckv":
        assert "verify_l1" in sp.levels


@pytest.mark.filterwarnings("ignore:the draft")
def test_mspeckv_accepts_something_with_a_good_draft():
    """Draft = target: level-1 and level-2 acceptance must be (nearly) full, so the machinery really speculates."""
    target, _ = pair()
    ids = prompt()
    sp = speculative_generate(target, target, ids, greedy(30),
                              SpecConfig(mode="mspeckv", gamma=4, draft_gamma=2, budget=48, chunk=8,
                                         draft_window=100))
    assert sp.levels["verify_l1"]["acceptance_rate"] == 1.0
    assert sp.levels["verify_l2"]["acceptance_rate"] > 0.9


def _first_tokens(spec, n_runs, T=0.9):
    """The first three generated tokens over many seeds (token 0 comes from prefill; 1 and 2 are proposals of the
    first speculation round: with 5 new tokens that round proposes 3)."""
    target, draft = pair(layers=2)
    ids = prompt(20, seed=3)
    cfg = lambda seed: GenerationConfig(max_new_tokens=5, stop_on_eos=False, prefill_chunk=16,
                                        sampling=SamplingConfig(temperature=T, top_k=5, seed=seed))
    out = []
    for seed in range(n_runs):
        if spec is None:
            out.append(generate(target, ids, cfg(seed)).tokens[0][:3])
        else:
            out.append(speculative_generate(target, draft, ids, cfg(seed), spec).tokens[0][:3])
    return target, ids, out


def _chi2_pvalue(target, ids, prefix: list[int], observed: list[int]) -> float:
    """Chi-square of observed next tokens against the exact target conditional after ids + prefix."""
    from mspeckv.config import SamplingConfig as S
    from mspeckv.decoding.sampling import logits_to_probs
    from mspeckv.kv.dense import DenseKV

    with torch.no_grad():
        c = DenseKV.for_model(target, 1, 32)
        logits = target(torch.cat([ids, torch.tensor([prefix])], 1), c)[:, -1]
    p = logits_to_probs(logits, S(temperature=0.9, top_k=5))[0]
    support = torch.nonzero(p > 0).flatten().tolist()
    counts = [observed.count(t) for t in support]
    assert sum(counts) == len(observed)  # nothing outside the target's top-k support
    mass = sum(float(p[t]) for t in support)
    return chisquare(counts, [float(p[t]) / mass * len(observed) for t in support]).pvalue


@pytest.mark.parametrize("spec", [SpecConfig(mode="vanilla", gamma=3),
                                  SpecConfig(mode="mspeckv", gamma=3, draft_gamma=2, budget=8, chunk=4, draft_sinks=2,
                                             draft_window=6)], ids=["one-level", "two-level"])
def test_sampled_output_follows_target_distribution(spec):
    """Tokens 1 and 2 (both inside the first speculation round) follow the exact target conditionals."""
    target, ids, runs = _first_tokens(spec, 1200)
    t0 = max({r[0] for r in runs}, key=[r[0] for r in runs].count)
    assert _chi2_pvalue(target, ids, [t0], [r[1] for r in runs if r[0] == t0]) > 1e-3
    pairs = [tuple(r[:2]) for r in runs]
    t01 = max(set(pairs), key=pairs.count)
    third = [r[2] for r in runs if tuple(r[:2]) == t01]
    assert len(third) >= 50
    assert _chi2_pvalue(target, ids, list(t01), third) > 1e-3


def test_errors():
    target, draft = pair()
    with pytest.raises(ValueError, match="gamma"):
        SpecConfig(gamma=0)
    with pytest.raises(ValueError, match="not a multiple of chunk"):
        SpecConfig(budget=100, chunk=8)
    other = tiny_model("llama", seed=1, vocab_size=101)
    with pytest.raises(ValueError, match="vocabulary"):
        speculative_generate(target, other, prompt(), greedy(4), SpecConfig(mode="vanilla"))
    with pytest.warns(UserWarning, match="covers the whole"):
        speculative_generate(target, draft, prompt(20), greedy(4), SpecConfig(budget=64, chunk=8))
    with pytest.warns(UserWarning, match="not smaller"):
        speculative_generate(draft, target, prompt(20), greedy(4), SpecConfig(mode="vanilla"))


def test_gamma_above_the_offload_rollback_slack():
    """A verification of gamma+1 tokens must stay rollback-safe even if the placement's slack is smaller."""
    target, draft = pair(layers=4)
    ids = prompt(60)
    p = Placement(on_chip=1, kv_group_size=8, rollback_slack=4)
    ar = generate(target, ids, greedy(30), cache=make_cache(target, p, 1, 90))
    sp = speculative_generate(target, draft, ids, greedy(30), SpecConfig(mode="vanilla", gamma=10), placement=p)
    assert sp.tokens == ar.tokens


def test_spec_config_edges():
    """The smallest legal values are accepted; one below is refused with the flag's name."""
    SpecConfig(gamma=1, draft_gamma=1, draft_sinks=0, draft_window=1, refresh_every=1, drafter="ngram",
               budget=16, chunk=8)
    for kw, msg in ((dict(mode="tree"), "mode must be one of vanilla, mspeckv, got 'tree'"),
                    (dict(draft_gamma=0), "draft_gamma must be an integer >= 1, got 0"),
                    (dict(draft_sinks=-1), "draft_sinks must be an integer >= 0, got -1"),
                    (dict(draft_window=0), "draft_window must be an integer >= 1 \\(or None\\), got 0"),
                    (dict(refresh_every=0), "refresh_every must be an integer >= 1 \\(or None\\), got 0"),
                    (dict(drafter="tree"), "drafter must be one of model, ngram, got 'tree'")):
        with pytest.raises(ValueError, match=msg):
            SpecConfig(**kw)
    assert SpecConfig(gamma=4, draft_sinks=8).window == 256 - 8 - 4


def test_check_pair_tokenizers_and_sizes():
    from types import SimpleNamespace

    from mspeckv.decoding.speculative import check_pair

    target, draft = pair(layers=2)
    tok = lambda v: SimpleNamespace(get_vocab=lambda: v)
    check_pair(target, draft, tok({"a": 0}), tok({"a": 0}))
    check_pair(target, draft, tok({"a": 0}), None)  # one tokenizer unknown: nothing to compare
    with pytest.raises(ValueError, match="draft and target tokenizers differ \\(same size, different tokens\\)"):
        check_pair(target, draft, tok({"a": 0}), tok({"b": 0}))
    with pytest.warns(UserWarning, match=r"the draft \(0M parameters\) is not smaller than the target \(0M\)"):
        check_pair(target, target)  # equal size warns too


def test_graph_counts_no_capture_inside_the_decode_loop():
    """Every verification shape is captured before the timed loop, also the short last rounds (k < gamma), so a level's
    decode time holds no capture (three forwards each on CUDA). Eager forwards (here: int8 flushes, one per 16 tokens
    of a layer group) are counted. On the CPU the graphed runners do the same bookkeeping as on CUDA."""
    target = tiny_model("llama", max_position_embeddings=2048, num_hidden_layers=4)
    draft = tiny_model("llama", seed=1, num_hidden_layers=1, max_position_embeddings=2048)
    prompt = torch.randint(3, 90, (1, 600), generator=torch.Generator().manual_seed(0))
    gen = GenerationConfig(max_new_tokens=60, stop_on_eos=False, prefill_chunk=128)
    pl = Placement(on_chip=2, kv_quant="int8", kv_group_size=16, resident_layers=2)
    sp = speculative_generate(target, draft, prompt, gen, SpecConfig(gamma=8, draft_gamma=4, budget=64, chunk=8,
                                                                     graphs=True), placement=pl)
    l2, l1 = sp.levels["verify_l2"], sp.levels["verify_l1"]
    assert l2["graph_captures"] == 0 and l1["graph_captures"] == 0
    assert l2["proposed"] < 8 * l2["rounds"]  # some round proposed fewer than gamma: its shape was precaptured
    assert 1 <= l2["eager_forwards"] < l2["rounds"]  # the flushes, not every forward
    assert l2["capture_s"] == 0.0
    # the bytes streamed before the decode loop (prefill, warm-ups of the captures) are recorded apart
    before, total = sp.stats["h2d_bytes_before_decode"], sp.stats["memory"]["h2d_bytes_total"]
    assert before is not None and 0 <= before <= total
