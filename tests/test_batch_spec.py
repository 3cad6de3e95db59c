"""Speculation at batch (decoding/batch_spec.py): lossless per sequence. Greedy output equals each prompt's AR alone
in fp32, for both drafters, ragged prompts, sequences leaving at EOS and others joining; sampled tokens follow the
target's distribution (χ² against probabilities computed by a plain forward, with its power stated)."""

import numpy as np
import pytest
import torch

from mspeckv.config import GenerationConfig, SamplingConfig
from mspeckv.decoding.autoregressive import generate
from mspeckv.decoding.batch_spec import BatchSpecConfig, BatchSpecEngine, generate_batch_spec
from mspeckv.kv.dense import DenseKV
from tests.test_distribution import ALPHA, conditional_chi2, power
from tests.tiny import tiny_model


def prompts(lens, seed=0, vocab=97):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lens]


SPECS = [("vanilla", BatchSpecConfig("vanilla", 3)), ("self-window", BatchSpecConfig("self", 4, sinks=2, window=12)),
         ("self-full", BatchSpecConfig("self", 2, sinks=0, window=10_000)),
         ("mspeckv", BatchSpecConfig("mspeckv", 5, sinks=2, window=12, draft_gamma=2)),
         ("vanilla-draft-window", BatchSpecConfig("vanilla", 3, draft_window=8, draft_sinks=2)),
         ("mspeckv-draft-window", BatchSpecConfig("mspeckv", 5, sinks=2, window=12, draft_gamma=2, draft_window=6,
                                                  draft_sinks=1))]


@pytest.mark.parametrize("name,spec", SPECS, ids=[n for n, _ in SPECS])
@pytest.mark.parametrize("max_batch", [1, 3, 5])
def test_greedy_at_batch_equals_each_prompt_alone(name, spec, max_batch):
    m = tiny_model("llama")
    draft = tiny_model("llama", seed=1, num_hidden_layers=1) if spec.mode != "self" else None
    ps = prompts((40, 17, 90, 64, 5))
    gen = GenerationConfig(max_new_tokens=15, stop_on_eos=False, prefill_chunk=32)
    r = generate_batch_spec(m, draft, ps, gen, spec, max_batch=max_batch)
    for p, s in zip(ps, r.seqs, strict=True):
        assert s.tokens == generate(m, torch.tensor([p]), gen).tokens[0], f"prompt of {len(p)} tokens"
    st = r.stats
    assert st["mode"] == spec.mode and st["rounds"] >= 1 and 1 <= st["tokens_per_round"] <= spec.gamma + 1
    if name == "self-full":  # a window over everything: the draft is the target, every draft is accepted
        assert st["acceptance"] == 1.0 and st["tokens_per_round"] == spec.gamma + 1
    if name.startswith("mspeckv"):  # the middle level ran at least γ+1 runs... of the draft's tokens, per round
        assert st["l1_runs"] >= st["rounds"] and 0 <= st["l1_acceptance"] <= 1


def test_leave_at_eos_and_join_during_speculation():
    m = tiny_model("qwen2", seed=2)
    ps = prompts((30, 8, 50, 21, 12, 3), seed=4)
    base = GenerationConfig(max_new_tokens=20, stop_on_eos=False)
    eos = generate(m, torch.tensor([ps[1]]), base).tokens[0][4]
    gen = GenerationConfig(max_new_tokens=20, stop_on_eos=True)
    r = generate_batch_spec(m, None, ps, gen, BatchSpecConfig("self", 3, sinks=1, window=8), max_batch=2,
                            eos_ids=[eos])
    finishes = []
    for p, s in zip(ps, r.seqs, strict=True):
        want = generate(m, torch.tensor([p]), gen, eos_ids=[eos]).tokens[0]
        assert s.tokens == want
        finishes.append(s.finish)
    assert set(finishes) == {"eos", "length"}


@pytest.mark.parametrize("mode", ["vanilla", "mspeckv"])
def test_sampled_tokens_follow_the_target_per_sequence(mode):
    """Two prompts of different lengths, 512 copies each in one batch, 3 runs: the first token (admission) and the
    second (drawn by a speculation round: an accepted draft, the correction at a rejection, or the bonus) follow the
    target's conditional distribution, per prompt (mspeckv: the middle level's probabilities are the full level's
    proposal distribution, so this checks the composition). Vocabulary 4, so that CI affords the samples: each χ²
    asserts a power >= 0.99 against an error of 0.1 in total variation (the project's other χ² tests use 0.05)."""
    V = 4
    m = tiny_model("llama", vocab_size=V, seed=3)
    draft = tiny_model("llama", vocab_size=V, seed=5, num_hidden_layers=1)
    ps = prompts((6, 11), seed=1, vocab=V)
    ps = [[t % V for t in p] for p in ps]
    with torch.no_grad():
        def probs(ids):  # the reference: a plain forward over the whole sequence, DenseKV, softmax
            return m(torch.tensor([ids]), DenseKV.for_model(m, 1, 64), num_logits=1)[0, -1].softmax(-1).double()
        first = {i: probs(p).numpy() for i, p in enumerate(ps)}
        second = {(i, t): probs(p + [t]).numpy() for i, p in enumerate(ps) for t in range(V)}
    samples = {0: [], 1: []}
    for run in range(3):
        gen = GenerationConfig(max_new_tokens=2, stop_on_eos=False,
                               sampling=SamplingConfig(temperature=1.0, seed=run))
        spec = BatchSpecConfig(mode, 2, sinks=1, window=3, draft_gamma=2)  # mspeckv: the window's output is q
        res = BatchSpecEngine(m, draft, 1024, 16, gen, spec).run(
            [ps[j % 2] for j in range(1024)])
        for j, s in enumerate(res.seqs):
            samples[j % 2].append(s.tokens)
    for i in (0, 1):
        toks = np.array(samples[i])  # (1536, 2)
        for ctx, tok, table in ((np.zeros(len(toks), int), toks[:, 0], first[i][None]),
                                (toks[:, 0], toks[:, 1], np.stack([second[(i, t)] for t in range(V)]))):
            pv, _ = conditional_chi2(ctx, tok, table)
            df = sum(int((table[c] > 0).sum()) - 1 for c in np.unique(ctx))
            assert power(len(tok), df, tv=0.1) >= 0.99
            assert pv > ALPHA, f"p = {pv:.2e}"


def test_bad_configs():
    m = tiny_model("llama")
    gen = GenerationConfig(max_new_tokens=4)
    with pytest.raises(ValueError, match="mode"):
        BatchSpecConfig("ngram")
    with pytest.raises(ValueError, match="gamma"):
        BatchSpecConfig("self", 0)
    with pytest.raises(ValueError, match="needs a draft model"):
        BatchSpecEngine(m, None, 2, 32, gen, BatchSpecConfig("vanilla"))
    with pytest.raises(ValueError, match="rows of drafts"):
        BatchSpecEngine(m, None, 1, 8, gen, BatchSpecConfig("self", 3)).run([[5] * 6])
    with pytest.raises(ValueError, match="no prompts"):
        generate_batch_spec(m, None, [], gen, BatchSpecConfig())
    with pytest.raises(ValueError, match=r"^draft_window is the draft model's window \(vanilla, mspeckv\); self "
                                         r"drafts over window$"):
        BatchSpecConfig("self", draft_window=8)
    for field, bad in (("draft_window", 0), ("draft_sinks", -1)):
        with pytest.raises(ValueError, match=rf"^{field} must be"):
            BatchSpecConfig("vanilla", **{field: bad})
    assert BatchSpecConfig("vanilla", draft_window=1, draft_sinks=0).draft_window == 1  # the smallest window


def test_the_draft_model_reads_its_window_only():
    """A draft identical to the target is always accepted over its full KV; over a window of 4 rows of long prompts
    it sees other context and is not (a window that were ignored would keep acceptance at 1)."""
    m = tiny_model("llama")
    ps = prompts((60, 75, 90))
    gen = GenerationConfig(max_new_tokens=12, stop_on_eos=False, prefill_chunk=32)
    full = generate_batch_spec(m, m, ps, gen, BatchSpecConfig("vanilla", 3))
    win = generate_batch_spec(m, m, ps, gen, BatchSpecConfig("vanilla", 3, draft_window=4, draft_sinks=0))
    assert full.stats["acceptance"] == 1.0 and win.stats["acceptance"] < 1.0
    assert [s.tokens for s in win.seqs] == [s.tokens for s in full.seqs]  # lossless either way
    eng = BatchSpecEngine(m, m, 2, 64, gen, BatchSpecConfig("vanilla", 3, draft_window=5, draft_sinks=2))
    view = eng.drunner.cache
    assert view.base is eng.dcache and (view.window, view.sinks) == (5, 2)


@pytest.mark.parametrize("mode", ["vanilla", "self", "mspeckv"])
def test_sampling_with_top_k_1_is_greedy_through_the_sampled_path(mode):
    """top_k = 1 makes every distribution one-hot: the sampled path (draft probs, draws, rejection sampling) must then
    give greedy AR's tokens exactly, and the counters count what ran."""
    m = tiny_model("llama")
    draft = tiny_model("llama", seed=1, num_hidden_layers=1) if mode != "self" else None
    ps = prompts((12, 30, 7), seed=6)
    samp = SamplingConfig(temperature=0.7, top_k=1, seed=0)
    gen = GenerationConfig(max_new_tokens=9, stop_on_eos=False, sampling=samp)
    eng = BatchSpecEngine(m, draft, 3, 40, gen, BatchSpecConfig(mode, 3, sinks=1, window=6))
    r = eng.run(ps)
    greedy = GenerationConfig(max_new_tokens=9, stop_on_eos=False)
    for p, s in zip(ps, r.seqs, strict=True):
        assert s.tokens == generate(m, torch.tensor([p]), greedy).tokens[0]
    assert r.decode_steps == eng.rounds == eng.steps >= 2 and eng.seq_rounds >= eng.rounds
    assert r.decode_s > 0 and r.prefill_s > 0 and eng.accepted <= eng.seq_rounds * 3


# ------------------------------------------------------------------------------------------------ window and cost
def test_window_kv_hands_the_kernel_the_mask_it_applies():
    """WindowKV's ``Window`` (what the GPU kernel reads) and its mask (what the torch paths apply) say the same thing:
    row (b, t) sees j < lens, and j < sinks or j >= starts."""
    from mspeckv.decoding.batch_spec import WindowKV
    from mspeckv.kv.batch import BatchKV

    base = BatchKV(1, 3, 1, 4, 64, torch.float32, "cpu")
    for s, n in ((0, 20), (1, 3), (2, 50)):
        base.join()
        base.host_lens[s] = n
        base.lens[s] = n
    w = WindowKV(base, sinks=2, window=5)
    w.begin(3)
    j = torch.arange(base.hi)
    want = (j < w.attn_lens[:, :, None]) & ((j < 2) | (j >= w.attn_window.starts[:, :, None]))  # (B, T, S)
    assert torch.equal(w.attn_mask[:, 0], want)
    assert w.attn_window.sinks == 2 and w.attn_window.span == 7
    assert w.attn_mask[2, 0, 0].nonzero().flatten().tolist() == [0, 1, 46, 47, 48, 49, 50]  # sinks, newest 5
    assert w.graph_key(1) == ("window", base.graph_key(1))
    w.abort()


def test_cost_model_arithmetic_and_choices():
    from mspeckv.decoding.cost import CostModel, expected_tokens

    assert expected_tokens(0.5, 0) == 1 and expected_tokens(1.0, 4) == 5
    assert expected_tokens(0.5, 3) == pytest.approx(1 + 0.5 + 0.25 + 0.125)
    cm = CostModel(t_ar=10e-3, t_draft=2e-3, t_verify={2: 11e-3, 4: 12e-3}, prior=0.9)
    assert cm.round_s(4) == pytest.approx(4 * 2e-3 + 12e-3) and cm.round_s(0) == 10e-3
    assert cm.rate(4) == pytest.approx(expected_tokens(0.9, 4) / 20e-3)
    assert cm.best() == 4  # Ω(0.9, 4) = 4.1 tokens per 20 ms beats 1 per 10 ms
    cm.observe(4, [0, 0, 0, 1])  # α drops to 1 / (1 + 4)
    assert cm.alpha == pytest.approx(0.2) and cm.best() == 0
    picks = [cm.pick() for _ in range(4)]
    assert picks == [0, 0, 0, 0] and cm.since_probe == 4
    cm.probe_every = 5
    assert cm.pick() == 2 and cm.since_probe == 0  # the probe: the best speculation round at this α
    assert cm.picks == {0: 4, 2: 1}
    vanilla = CostModel(10e-3, 2e-3, {4: 12e-3}, draft_extra=1)
    assert vanilla.round_s(4) == pytest.approx(5 * 2e-3 + 12e-3) and vanilla.round_s(0) == pytest.approx(12e-3)
    rec = cm.record()
    assert rec["alpha"] == pytest.approx(0.2) and rec["rounds_per_gamma"] == {0: 4, 2: 1}
    assert rec["expected_speedup_vs_ar"][0] == 1 and "AR" in rec["reason"]
    with pytest.raises(ValueError, match="outside"):
        cm.observe(2, [3])
    with pytest.raises(ValueError, match="t_draft"):
        CostModel(1e-3, 0.0, {2: 1e-3})
    with pytest.raises(ValueError, match="at least one"):
        CostModel(1e-3, 1e-3, {})


@pytest.mark.parametrize("mode", ["self", "vanilla"])
@pytest.mark.parametrize("force", [None, "ar", "spec"])
def test_auto_gamma_keeps_greedy_output_whatever_it_picks(mode, force):
    """With ``auto`` the cost model picks γ (or AR) per round; whatever it picks, greedy output per sequence equals
    AR alone. ``force`` plants costs that make AR (or, with free drafts, the longest γ) win, so both paths run."""
    from mspeckv.decoding.cost import CostModel

    m = tiny_model("llama")
    draft = tiny_model("llama", seed=1, num_hidden_layers=1) if mode == "vanilla" else None
    ps = prompts((40, 17, 9), seed=3)
    gen = GenerationConfig(max_new_tokens=14, stop_on_eos=False)
    spec = BatchSpecConfig(mode, 4, sinks=1, window=6, auto=True)
    assert spec.gammas() == [1, 2, 4] and BatchSpecConfig(mode, 3).gammas() == [3]
    eng = BatchSpecEngine(m, draft, 3, 54, gen, spec)
    if force is not None:
        t_ar = 1e-3 if force == "ar" else 1.0
        for b in (1, 2, 3):  # every bucket: a sequence that leaves early shrinks the batch's bucket
            eng.costs[b] = CostModel(t_ar, 1e-9 if force == "spec" else 1e-3, {g: 1e-3 for g in spec.gammas()},
                                     prior=0.5, probe_every=3, draft_extra=int(mode == "vanilla"))
    r = eng.run(ps)
    for p, s in zip(ps, r.seqs, strict=True):
        assert s.tokens == generate(m, torch.tensor([p]), gen).tokens[0]
    cm = eng.costs[3]
    if force == "ar":
        assert cm.picks[0] >= 2 and set(cm.picks) <= {0, 1, 2, 4}
    if force == "spec":  # AR never wins (the γ depends on the acceptance seen)
        assert all(0 not in c.picks for c in eng.costs.values())
        assert sum(sum(c.picks.values()) for c in eng.costs.values()) == eng.rounds
    if force is None:  # timed here: every cost measured, positive
        assert cm.t_ar > 0 and cm.t_draft > 0 and sorted(cm.t_verify) == [1, 2, 4] and eng.calib_s > 0


@pytest.mark.parametrize("mode", ["self", "vanilla"])
def test_each_rows_own_sampling_is_applied(mode):
    """Rows with their own sampling (the server's requests) beside the engine's: rows whose own top_k = 1 decode as
    greedy AR although the engine samples at temperature 1; a greedy row rides the sampled path as a one-hot."""
    from mspeckv.decoding.batch import Sequence

    m = tiny_model("llama")
    draft = tiny_model("llama", seed=1, num_hidden_layers=1) if mode == "vanilla" else None
    ps = prompts((12, 30, 7), seed=8)
    gen = GenerationConfig(max_new_tokens=8, stop_on_eos=False, sampling=SamplingConfig(temperature=1.0, seed=0))
    eng = BatchSpecEngine(m, draft, 3, 40, gen, BatchSpecConfig(mode, 3, sinks=1, window=6))
    own = [SamplingConfig(temperature=0.7, top_k=1), SamplingConfig(), None]  # one-hot, greedy, the engine's
    seqs = [Sequence(i, p, 8, sampling=s) for i, (p, s) in enumerate(zip(ps, own, strict=True))]
    with torch.inference_mode():
        for s in seqs:
            eng.admit(s, 0.0)
        while any(eng.slot_seq):
            eng.decode_segment(0.0)
    greedy = GenerationConfig(max_new_tokens=8, stop_on_eos=False)
    for s in seqs[:2]:
        assert s.tokens == generate(m, torch.tensor([s.prompt]), greedy).tokens[0]
    assert len(seqs[2].tokens) == 8 and eng.rounds >= 2


def test_a_new_buckets_cost_model_starts_from_the_acceptance_seen():
    """When the batch shrinks into a smaller bucket, its cost model is timed anew but keeps the acceptance measured
    so far (a fresh prior would pick AR for a batch whose drafts are mostly accepted)."""
    from mspeckv.decoding.cost import CostModel

    m = tiny_model("llama")
    eng = BatchSpecEngine(m, None, 4, 40, GenerationConfig(max_new_tokens=4), BatchSpecConfig("self", 2, auto=True))
    eng.costs[4] = CostModel(1e-3, 1e-3, {1: 1e-3, 2: 1e-3}, accepted=90, rejected=10)
    eng.cache.focus(0, 2)
    cm = eng.cost_model(2)
    assert cm.accepted == 90 and cm.rejected == 10 and cm.alpha == 0.9 and cm.t_ar > 0
