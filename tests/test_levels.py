"""Each speculation level checked on its own, not through the final output (greedy output equals AR whatever a
level does; acceptance rates are what the levels decide):

* the draft level (StreamingLLM cache) and the retrieval level, as the speculative runner drives them, give the
  logits of a dense cache holding the same rows at the same positions, and every row they hold is the K/V of the
  token at the position the cache claims (checked at layer 0, where K/V depend on token and position only);
* retrieval selection against a plain numpy reference, with a GQA case where max and mean over the query heads pick
  different chunks; a refresh rebuilds the index from the grown cache and its latest queries;
* acceptance rates on constructed models where the expected rate is known.

Both levels are presses over ``PressedKV``: the draft's is the streaming press, the middle level's the retrieval
press (the default ``--l1-press``).
"""

import math

import numpy as np
import pytest
import torch

from mspeckv.config import GenerationConfig, SamplingConfig
from mspeckv.decoding import speculative as spec_mod
from mspeckv.decoding.speculative import DraftLevel, Runner, Seq, SpecConfig, Timers, speculative_generate
from mspeckv.kv.base import CacheFullError, KVCache, LastQueries
from mspeckv.kv.dense import DenseKV
from mspeckv.kv.pressed import PressedKV
from mspeckv.kv.retrieval import BudgetCoversPrompt, check_budget, chunk_scores, select_chunks
from mspeckv.presses.retrieval import RetrievalPress
from mspeckv.presses.streaming import StreamingLLMPress
from tests.test_cache_boundaries import D, H, fwd, held, kv
from tests.test_distribution import Count, Recording, TableModel, tables
from tests.test_sampling_reference import ref_probs
from tests.tiny import tiny_model

# ------------------------------------------------------------------------------------- reference chunk selection

def ref_select(k: np.ndarray, q: np.ndarray, budget: int, chunk: int, reduce: str = "max") -> np.ndarray:
    """numpy reference of the retrieval selection for one batch row: k (Hkv, L, D), q (Hq, nq, D) ->
    (Hkv, n_retrieved) positions: chunk 0, the best (budget - chunk - tail) // chunk other full chunks by the
    per-query-row softmax mass of q . mean(K_chunk) / sqrt(D) reduced over the group's rows, and the ragged tail."""
    Hkv, L, D = k.shape
    G = q.shape[0] // Hkv
    n, tail = L // chunk, L % chunk
    n_top = (budget - chunk - tail) // chunk
    out = []
    for h in range(Hkv):
        means = k[h, :n * chunk].reshape(n, chunk, D).astype(np.float64).mean(1)  # (n, D)
        rows = q[h * G:(h + 1) * G].reshape(-1, D).astype(np.float64)  # query heads h*G .. h*G+G-1
        s = rows @ means.T / math.sqrt(D)
        mass = np.exp(s - s.max(1, keepdims=True))
        mass /= mass.sum(1, keepdims=True)
        score = mass.max(0) if reduce == "max" else mass.mean(0)
        best = sorted((np.argsort(-score[1:], kind="stable")[:n_top] + 1).tolist())
        out.append([c * chunk + i for c in [0, *best] for i in range(chunk)] + list(range(n * chunk, L)))
    return np.array(out)


def test_gqa_max_and_mean_pick_different_chunks():
    """One KV head, two query heads, one chunk to pick besides the sink: head 0 puts .86 of its mass on chunk 1,
    head 1 puts .83 on chunk 2 and .14 goes from head 0 to chunk 2: max picks chunk 1, mean picks chunk 2."""
    chunk, D = 2, 2
    means = np.array([[0, 0], [6, -6], [4.2, 4.8], [-6, 3.2], [-6, -6.0]])
    k = np.repeat(means, chunk, 0)[None]  # (1, 10, 2): each chunk's keys equal its mean
    k = k + np.array([[0.3, -0.1], [-0.3, 0.1]] * 5)[None]  # zero-mean wobble inside each chunk
    q = (np.eye(2) * math.sqrt(D))[:, None, :]  # (Hq=2, nq=1, D)
    by_max, by_mean = ref_select(k, q, 4, chunk, "max"), ref_select(k, q, 4, chunk, "mean")
    assert by_max.tolist() == [[0, 1, 2, 3]] and by_mean.tolist() == [[0, 1, 4, 5]]
    got = select_chunks(torch.tensor(k, dtype=torch.float32)[None], torch.tensor(q, dtype=torch.float32)[None], 4,
                        chunk)
    assert got[0].tolist() == by_max.tolist()
    # the scores themselves: max over the group of each head's softmax mass (chunk 1: .857, chunk 2: .826)
    sc = chunk_scores(torch.tensor(k, dtype=torch.float32)[None], torch.tensor(q, dtype=torch.float32)[None], chunk)
    assert np.allclose(sc[0, 0, 1:3].numpy(), [0.857, 0.826], atol=2e-3)


@pytest.mark.parametrize("L, G, nq", [(37, 2, 1), (40, 2, 3), (45, 1, 2), (33, 4, 1)])
def test_select_chunks_matches_reference(L, G, nq):
    g = torch.Generator().manual_seed(L * 10 + G)
    Hkv, D, chunk, budget = 2, 8, 4, 20
    k = torch.randn(1, Hkv, L, D, generator=g) * 2
    q = torch.randn(1, Hkv * G, nq, D, generator=g) * 2
    got = select_chunks(k, q, budget, chunk)
    assert got[0].tolist() == ref_select(k[0].numpy(), q[0].numpy(), budget, chunk).tolist()


# ---------------------------------------------------------------- the levels as the runner drives them: logits

def held_positions(cache) -> torch.Tensor:
    """(Hkv, S) absolute positions of the rows ``cache.read(0)`` returns, from the cache's own bookkeeping."""
    return cache.positions(0)[0]  # pressed rows at their kept positions, then the appended rows


def record_levels(monkeypatch) -> list[dict]:
    """Patch Runner.feed to snapshot, before each forward of the draft (streaming) and the retrieval level, the
    tokens, the first new position, the cache's rows and their claimed positions; and the logits after."""
    records: list[dict] = []
    orig = Runner.feed

    def feed(self, seq, upto, num_logits, **kw):
        c = self.cache
        press = c.press if isinstance(c, PressedKV) else None
        kind = "draft" if isinstance(press, StreamingLLMPress) else "mid" if isinstance(press, RetrievalPress) else None
        snap = None
        if kind is not None:
            snap = dict(kind=kind, model=self.model, start=self.n, upto=upto, num_logits=num_logits,
                        tokens=seq.tokens[0, :upto].clone(), positions=held_positions(c),
                        rows=[tuple(t.clone() for t in c.read(i)) for i in range(c.n_layers)])
        logits = orig(self, seq, upto, num_logits, **kw)
        if snap is not None:
            snap["logits"] = logits.clone()
            records.append(snap)
        return logits

    monkeypatch.setattr(Runner, "feed", feed)
    return records


def check_record(r: dict) -> None:
    m, start, upto, tokens = r["model"], r["start"], r["upto"], r["tokens"]
    S = r["rows"][0][0].shape[2]
    # 1. logits = a dense cache holding the same rows, new tokens at their true positions
    dense = DenseKV.for_model(m, 1, S + upto - start)
    for i, (k, v) in enumerate(r["rows"]):
        dense.k[i][:, :, :S], dense.v[i][:, :, :S] = k, v
    dense._len = S
    with torch.no_grad():
        ref = m(tokens[None, start:upto], dense, pos0=start, num_logits=r["num_logits"])
    torch.testing.assert_close(r["logits"], ref, atol=1e-5, rtol=1e-5)
    # 2. every held row is the K/V of the token at its claimed position (layer 0: no attention involved)
    pos = r["positions"]
    assert pos.shape[1] == S and (pos < start).all()
    if S == 0:
        return
    full = DenseKV.for_model(m, 1, start)
    with torch.no_grad():
        m(tokens[None, :start], full)
    k0, v0 = r["rows"][0]
    idx = pos[None, :, :, None].expand(1, -1, -1, k0.shape[-1])
    torch.testing.assert_close(k0, full.k[0].gather(2, idx), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(v0, full.v[0].gather(2, idx), atol=1e-5, rtol=1e-5)


def pair():
    return tiny_model("llama", seed=0, num_hidden_layers=2), tiny_model("llama", seed=1, num_hidden_layers=1)


def prompt(n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randint(3, 97, (1, n // 2), generator=g)
    return torch.cat([base, base], 1)


@pytest.mark.parametrize("refresh", [None, 5], ids=["once", "refresh5"])
def test_draft_and_retrieval_levels_equal_dense_over_their_rows(monkeypatch, refresh):
    records = record_levels(monkeypatch)
    target, draft = pair()
    gen = GenerationConfig(max_new_tokens=40, stop_on_eos=False, prefill_chunk=16,
                           sampling=SamplingConfig(temperature=1.0, seed=3))
    sp = SpecConfig(mode="mspeckv", gamma=4, draft_gamma=2, budget=16, chunk=4, draft_sinks=2, draft_window=6,
                    refresh_every=refresh, graphs=False)
    res = speculative_generate(target, draft, prompt(), gen, sp)
    kinds = [r["kind"] for r in records]
    assert kinds.count("draft") > 20 and kinds.count("mid") > 5
    for r in records:
        check_record(r)
    # the cases that matter were exercised: draft rows with an eviction gap, per-head different retrieved rows
    gaps = [r for r in records if r["kind"] == "draft" and r["positions"].shape[1] > 0 and
            r["positions"][0, -1] - r["positions"][0, 0] + 1 > r["positions"].shape[1]]
    assert gaps
    assert any(not torch.equal(r["positions"][0], r["positions"][1]) for r in records if r["kind"] == "mid")
    assert res.levels["verify_l1"]["rounds"] > 0


def test_refresh_rebuilds_the_index_from_the_grown_cache(monkeypatch):
    """Every (re)build selects, per layer, exactly what the numpy reference selects from the full cache's rows and
    latest queries at that moment, and a refresh moves the index (new tail positions past the prompt)."""
    builds = []
    orig = PressedKV.compress

    def compress(self, source=None):
        if source is None or not isinstance(self.press, RetrievalPress):
            return orig(self, source)
        queries = next(o for o in self.press_obs if isinstance(o, LastQueries)).queries
        exp = [ref_select(source.read(i)[0][0].numpy(), queries[i][0].numpy(), self.press.budget, self.press.chunk)
               for i in range(self.n_layers)]
        orig(self, source)
        builds.append((source.length(), exp, [self.positions(i)[0].clone() for i in range(self.n_layers)]))

    monkeypatch.setattr(PressedKV, "compress", compress)
    target, draft = pair()
    gen = GenerationConfig(max_new_tokens=24, stop_on_eos=False, prefill_chunk=16)
    sp = SpecConfig(mode="mspeckv", gamma=4, draft_gamma=2, budget=16, chunk=4, draft_sinks=2, draft_window=6,
                    refresh_every=6, graphs=False)
    speculative_generate(target, draft, prompt(), gen, sp)
    assert len(builds) >= 3
    lengths = [b[0] for b in builds]
    assert lengths[0] == 40 and all(b > a for a, b in zip(lengths, lengths[1:], strict=False))
    for L, exp, got in builds:
        for e, g_ in zip(exp, got, strict=True):
            assert g_.tolist() == e.tolist()
        assert got[0][0, -1] == L - 1 if L % 4 else True  # the ragged tail (the newest tokens) is always kept
    assert any(not torch.equal(builds[0][2][0], b[2][0]) for b in builds[1:])


# ------------------------------------------------------------------------------------ known acceptance rates

def run_tables(Pt, Pm, Pd, s, M=3000, gamma=3, draft_gamma=2, seed=0):
    """The runner's hierarchy on position-table fake models (see test_distribution); returns (top, mid) levels."""
    gen = torch.Generator().manual_seed(seed)
    T0 = 4
    seq = Seq(torch.zeros(1, T0, dtype=torch.long), T0 + M + 16, host=False)
    seq.len = T0 + 1
    timers = Timers(torch.device("cpu"))
    draft = DraftLevel(Runner(TableModel(Pd), Count(T0), T0), s, gen, timers)
    mid = Recording("verify_l1", Runner(TableModel(Pm), Count(T0), T0), draft, draft_gamma, s, gen, timers)
    top = Recording("verify_l2", Runner(TableModel(Pt), Count(T0), T0), mid, gamma, s, gen, timers)
    made = 1
    while made < M:
        L = seq.len
        k = min(gamma, M - made - 1)
        n, q = mid.propose(seq, k) if k > 0 else (0, None)
        assert n == k and (q is None or q.shape[1] == k)  # the mid level hands up exactly k proposals
        a, _ = top.verify(seq, L, n, q)
        made += a + 1
    return top, mid


@pytest.fixture
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: avoid OpenMP spin-waits on a busy machine
    yield
    torch.set_num_threads(n)


def test_identical_levels_accept_everything(one_thread):
    g = torch.Generator().manual_seed(7)
    P = tables(g, 2)
    top, mid = run_tables(P, P, P, SamplingConfig(temperature=0.7, top_k=4, seed=0), M=400)
    for lvl in (top, mid):
        assert lvl.stats.proposed > 50 and lvl.stats.accepted == lvl.stats.proposed


def test_acceptance_rate_at_a_known_distance(one_thread):
    """Same distribution at every position: each proposal of a level is accepted with probability
    alpha = sum_x min(p(x), q(x)) (p, q after temperature/top-k, from the independent reference), independently,
    so a round of n proposals accepts sum_{i<=n} alpha^i on average. Checked for the first proposal of each round
    (Bernoulli(alpha), 4 sigma) and for the level's accepted total."""
    g = torch.Generator().manual_seed(8)
    Pt = tables(g, 1)
    Pm = 0.5 * tables(g, 1) + 0.5 * Pt
    Pd = 0.5 * tables(g, 1) + 0.5 * Pm
    s = SamplingConfig(temperature=0.9, top_k=5)
    ref = lambda t: np.array(ref_probs(t[0].log().tolist(), 0.9, 5))
    top, mid = run_tables(Pt, Pm, Pd, s, M=3000)
    for lvl, p, q in ((top, ref(Pt), ref(Pm)), (mid, ref(Pm), ref(Pd))):
        alpha = float(np.minimum(p, q).sum())
        assert 0.3 < alpha < 0.9
        rounds = [(n, a) for _, n, a, _ in lvl.log if n > 0]
        first = np.array([a >= 1 for n, a in rounds], dtype=float)
        assert abs(first.mean() - alpha) < 4 * math.sqrt(alpha * (1 - alpha) / len(first)), (first.mean(), alpha)
        exp = sum(sum(alpha ** i for i in range(1, n + 1)) for n, _ in rounds)
        got = sum(a for _, a in rounds)
        assert abs(got - exp) < 0.05 * exp, (got, exp)


@pytest.mark.filterwarnings("ignore:the draft")
def test_draft_identical_to_target_accepts_everything_sampled():
    """Vanilla, sampled, the draft is the target (same weights, dense caches): q == p exactly, so every proposal is
    accepted (u * q < p for u < 1): acceptance exactly 1, and each verification yields gamma + 1 tokens."""
    target = tiny_model("llama", seed=0, num_hidden_layers=2)
    gen = GenerationConfig(max_new_tokens=21, stop_on_eos=False, sampling=SamplingConfig(temperature=1.0, seed=1))
    res = speculative_generate(target, target, prompt(), gen, SpecConfig(mode="vanilla", gamma=4, graphs=False))
    l2 = res.levels["verify_l2"]
    assert l2["acceptance_rate"] == 1.0 and l2["rounds"] == 4 and l2["accepted_per_round"] == 4.0  # 1 + 4 x 5 = 21


def test_levels_module_exports_runner_pieces():
    """The pieces this file drives exist where it expects them (fails loudly on a rename, not silently)."""
    for name in ("Runner", "DraftLevel", "VerifyLevel", "Seq", "Timers"):
        assert hasattr(spec_mod, name)


# ------------------------------------------------------------------------- retrieval cache edges (boundaries)

class Full(KVCache):
    def __init__(self, L, layers=2):
        self.kv = kv(L, layers)
        self.n_layers = layers

    def length(self):
        return self.kv[0][0].shape[2]

    def read(self, i):
        return self.kv[i]


def retrieval(full, q, budget, chunk, extra, static=False):
    obs = LastQueries(full.n_layers, n_last=1)
    obs.queries = list(q)
    return PressedKV.build(RetrievalPress(budget=budget, chunk=chunk), full, [obs], tail=extra, static=static,
                           fixed_cap=budget)


@pytest.mark.parametrize("static", [False, True], ids=["eager", "static"])
def test_retrieval_capacity_and_rollback_edges(static):
    full = Full(24)
    q = [torch.randn(1, H, 1, D)] * 2
    rc = retrieval(full, q, budget=8, chunk=4, extra=3, static=static)  # 8 rows (sink chunk + 1 chunk)
    assert rc.n_fixed == [8, 8] and rc.capacity() == 11
    with pytest.raises(CacheFullError):
        rc.begin(4)  # one over
    fwd(rc, 3, 24)  # exactly full
    assert rc.length() == 11 and held(rc)[-3:] == [24, 25, 26] and rc.next_position() == 27
    with pytest.raises(ValueError, match="only rows appended since the last"):
        rc.rollback(4)  # one more than appended
    rc.rollback(3)  # exactly the appended rows
    assert rc.length() == 8 and rc.next_position() == 24
    rc.append_external(kv(3, 2, 24))  # exactly full again
    with pytest.raises(CacheFullError):
        rc.append_external(kv(1, 2, 27))
    rc.append_external(kv(0, 2, 27))  # nothing: fine even when full
    assert rc.length() == 11
    assert retrieval(Full(8), q, budget=8, chunk=4, extra=1).n_fixed == [8, 8]  # budget == history: every row
    assert retrieval(Full(9), q, budget=8, chunk=4, extra=1).n_fixed == [4 + 1] * 2  # one over: sink + tail


def test_retrieval_refresh_keeps_static_buffers():
    q = [torch.randn(1, H, 1, D)] * 2
    sr = retrieval(Full(24), q, budget=8, chunk=4, extra=4, static=True)
    bufs = [b.data_ptr() for b in sr.buf]
    sr.append_external(kv(2, 2, 24))
    sr.compress(Full(30))  # a refresh re-presses into the same buffers: captured graphs stay valid
    assert [b.data_ptr() for b in sr.buf] == bufs
    assert sr.n_fixed == [6, 6]  # sink chunk + the 2-token tail (no other chunk fits in budget 8)
    assert sr.length() == 6 and held(sr)[-2:] == [28, 29]


def test_check_budget_edges():
    check_budget(2, 1)  # chunk 1, two chunks: the smallest legal budget
    with pytest.raises(BudgetCoversPrompt):
        select_chunks(torch.randn(1, H, 16, D), torch.randn(1, H, 1, D), 16, 4)  # budget == history
    with pytest.raises(ValueError, match="chunk must be >= 1, got 0"):
        check_budget(2, 0)


def test_last_queries_roll_over_forwards():
    obs = LastQueries(2, n_last=3)
    with pytest.raises(ValueError, match="n_last must be >= 1, got 0"):
        LastQueries(2, n_last=0)
    q = torch.arange(4 * 2 * D, dtype=torch.float32).view(1, 4, 2, D)  # first forward: 2 rows < n_last 3
    obs.on_query(0, q)
    assert obs.queries[0].shape == (1, 4, 2, D) and obs.queries[1] is None
    obs.on_query(0, q[:, :, :1] + 100)
    assert torch.equal(obs.queries[0], torch.cat([q, q[:, :, :1] + 100], 2))  # rolled over to 3 rows
    obs.on_query(0, torch.cat([q, q], 2))  # a long forward: its own last 3 rows
    assert torch.equal(obs.queries[0], torch.cat([q, q], 2)[:, :, -3:])


def test_select_chunks_batch_rows_are_independent():
    g = torch.Generator().manual_seed(5)
    k = torch.randn(2, 2, 37, 8, generator=g) * 2
    q = torch.randn(2, 4, 1, 8, generator=g) * 2
    got = select_chunks(k, q, 20, 4)
    for b in range(2):
        assert got[b].tolist() == ref_select(k[b].numpy(), q[b].numpy(), 20, 4).tolist()


def test_one_factory_decides_the_layout_and_one_runner_follows_it():
    """make_cache(graphs=...) is the only place a static layout is chosen; make_runner replays graphs exactly for
    graphable caches; use_graphs never graphs dynamic-NTK RoPE."""
    from dataclasses import replace

    from mspeckv.cache import make_cache, streaming_cache
    from mspeckv.decoding.runner import GraphRunner, make_runner, use_graphs
    from mspeckv.kv.offload import PlacedKV
    from mspeckv.kv.placement import Placement
    from mspeckv.kv.static import StaticKV

    m = tiny_model("llama", seed=0, num_hidden_layers=2)
    cases = [
        (dict(graphs=True), StaticKV, True),
        (dict(graphs=False), DenseKV, False),
        (dict(graphs=True, press="streaming:budget=0.5"), PressedKV, True),  # dense rows: a static layout
        (dict(graphs=True, press="kivi:k_bits=4,v_bits=4,group_size=8,residual=8"), PressedKV, False),  # codes
        (dict(graphs=True, placement=Placement(on_chip=1, kv_group_size=8)), PlacedKV, True),  # static layout
        (dict(graphs=False, placement=Placement(on_chip=1, kv_group_size=8)), PlacedKV, False),
        (dict(graphs=True, press="streaming:budget=0.5", placement=Placement(on_chip=1, kv_group_size=8)),
         PressedKV, False),  # pressed over an offloaded backend: eager, and so is its backend
    ]
    for kw, cls, graphed in cases:
        placement = kw.pop("placement", None)
        c = make_cache(m, placement, 1, 64, **kw)
        assert type(c) is cls and c.graphable is graphed
        assert isinstance(make_runner(m, c), GraphRunner) is graphed
        if isinstance(c, PressedKV) and c.inner is not None:
            assert not c.inner.graphable
    static_press = streaming_cache(m, sinks=4, window=16, room=8, static=True)
    assert static_press.graphable and isinstance(make_runner(m, static_press), GraphRunner)
    assert use_graphs(m) is False and use_graphs(m, True) is True  # CPU default off; asked for: on
    m.cfg = replace(m.cfg, rope=replace(m.cfg.rope, rope_type="dynamic"))
    assert use_graphs(m, True) is False


def test_observers_update_in_place_once_full():
    """Graph safety: once an observer's tensor has its final shape, later forwards update that same tensor (a CUDA
    graph captured over a forward keeps reading and writing one address; a new tensor would leave it reading a freed
    one). Values stay those of the eager definition."""
    from mspeckv.presses.h2o import AttentionMass

    obs = LastQueries(1, n_last=3)
    q = torch.randn(1, 4, 5, D)
    obs.on_query(0, q)
    buf = obs.queries[0]
    nxt = torch.randn(1, 4, 2, D)
    obs.on_query(0, nxt)
    assert obs.queries[0] is buf and torch.equal(buf, torch.cat([q[:, :, -1:], nxt], 2))
    obs.on_query(0, q)
    assert obs.queries[0] is buf and torch.equal(buf, q[:, :, -3:])

    mass = AttentionMass(1)
    k_all = torch.randn(1, 2, 6, D)
    mask = torch.ones(1, 6, dtype=torch.bool)
    for _ in range(2):
        mass.on_query(0, torch.randn(1, 4, 1, D))
        mass.on_update(0, None, None, k_all, mask)
    first = mass.mass[0]
    mass.on_query(0, torch.randn(1, 4, 1, D))
    mass.on_update(0, None, None, k_all, mask)
    assert mass.mass[0] is first and torch.allclose(first.sum(), torch.tensor(3.0 * 4))  # 3 forwards x 4 q-heads


def test_attn_lens_describes_attn_mask_exactly(monkeypatch):
    """A cache that sets ``attn_lens`` promises its mask is each row's prefix: on CUDA the attention kernel then
    takes the lengths alone and never loads the mask, so lens and mask must agree on every forward of every static
    layout (all-GPU, the on-chip layers of a static offloaded cache, a static streaming window, a static press)."""
    from mspeckv.cache import make_cache, streaming_cache
    from mspeckv.kv.placement import Placement
    from mspeckv.model import llama
    from mspeckv.presses import parse_press

    seen = {"lens": 0, "mask only": 0}
    inner = llama.attention

    def checked(q, k, v, mask, lens=None, window=None):
        assert window is None  # no StreamingLLM read of a batched cache here
        if lens is not None:
            assert mask is not None and mask.dim() == 2 and lens.dtype == torch.int32
            cols = torch.arange(mask.shape[1])
            assert torch.equal(cols[None, :] < lens[:, None].long(), mask)
            seen["lens"] += 1
        elif mask is not None:
            seen["mask only"] += 1
        return inner(q, k, v, mask, lens, window)

    monkeypatch.setattr(llama, "attention", checked)
    m = tiny_model("llama", seed=0, num_hidden_layers=2)
    x = torch.randint(3, 90, (1, 40))
    full = make_cache(m, None, 1, 64)
    p = parse_press("snapkv:budget=0.5,window=4,obs_window=4")
    obs = p.observers(2)
    full.observers += obs
    with torch.no_grad():
        m.prefill(x[:, :24], full, chunk=8)
        caches = [make_cache(m, None, 1, 64, graphs=True),
                  make_cache(m, Placement(on_chip=1, kv_group_size=8), 1, 64, graphs=True),
                  streaming_cache(m, sinks=2, window=8, room=10, static=True),
                  PressedKV.build(p, full, obs, tail=16, static=True, fixed_cap=24)]
        for c in caches:
            if not isinstance(c, PressedKV) or c is caches[2]:
                m.prefill(x[:, :24], c, chunk=8)
            before = seen["lens"]
            for t in range(24, 33, 3):  # decodes and verifications of 1-3 rows
                m(x[:, t:t + 1], c)
                m(x[:, t + 1:t + 3], c, num_logits=None)
            assert seen["lens"] > before, type(c).__name__
    assert seen["mask only"] > 0  # the offloaded layers' masks have a gap: no lens there


def test_graph_runner_counts_captures_and_eager_forwards():
    """GraphRunner's counters (what the spec loop reports per level): one capture per new (tokens, logits, layout),
    its host seconds, and the forwards the cache could not run statically; an eager=True call is asked for, not
    forced, and is not counted. On the CPU a capture is bookkeeping only (no forwards)."""
    from mspeckv.cache import make_cache
    from mspeckv.kv.placement import Placement
    from tests.tiny import tiny_model

    m = tiny_model("llama")
    cache = make_cache(m, Placement(on_chip=1, kv_group_size=16, rollback_slack=4), 1, 128, graphs=True)
    ids = torch.randint(3, 90, (1, 64), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        _graph_runner_counts(m, cache, ids)


def _graph_runner_counts(m, cache, ids):
    from mspeckv.cache import make_cache
    from mspeckv.decoding.runner import GraphRunner, make_runner

    m.prefill(ids, cache, chunk=64)
    r = make_runner(m, cache, n=64)
    assert isinstance(r, GraphRunner) and r.graph_counts() == (0, 0, 0.0)
    r.precapture([(1, 1), (3, 3), (1, 1)])  # the repeated shape is one graph
    e, c, s = r.graph_counts()
    assert (e, c) == (0, 2) and 0.0 < s < 10.0
    # a static all-GPU cache has a layout for any shape: precapture itself keeps within the capacity
    static = make_runner(m, sc := make_cache(m, None, 1, 80, graphs=True), n=0)
    m.prefill(ids, sc, chunk=64)
    static.precapture([(17, 1)])  # 64 + 17 > 80: not captured
    assert static.graph_counts()[1] == 0 and sc.graph_key(17) is not None
    static.precapture([(16, 1)])  # 64 + 16 == 80: captured
    assert static.graph_counts()[1] == 1
    r.step(ids[:, :2], 2)  # a shape not captured yet: captured on the way
    assert r.graph_counts()[:2] == (0, 3) and r.graph_counts()[2] >= s
    r.step(ids[:, :1], 1, eager=True)  # asked for: not counted
    assert r.graph_counts()[0] == 0
    for flushes in (1, 2):
        steps = 0
        while cache.graph_key(1) is not None:  # run until a group of 16 must be flushed to the CPU store
            r.step(ids[:, :1], 1)
            steps += 1
        r.step(ids[:, :1], 1)  # the flush runs eagerly, and is counted
        assert r.graph_counts()[0] == flushes and steps <= 16
