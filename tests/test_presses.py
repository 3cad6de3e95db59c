"""Every press through one contract (tiny random models, CPU): full budget is exact, budgets are kept exactly, score
presses keep the top rows, bytes are what the stores hold, compression composes with decoding, rollback, offload and
speculation, and bad fields get one clear error."""

import math

import pytest
import torch

from mspeckv.cache import make_cache
from mspeckv.config import GenerationConfig
from mspeckv.decoding.autoregressive import generate
from mspeckv.decoding.speculative import SpecConfig, speculative_generate
from mspeckv.kv.base import LastQueries
from mspeckv.kv.placement import Placement
from mspeckv.kv.pressed import PressedKV
from mspeckv.kv.quant import error_bound
from mspeckv.presses import PRESSES, parse_press, presets
from mspeckv.presses.base import snap_scores
from mspeckv.presses.lowrank import calibrate, load_projections
from tests.tiny import tiny_model

L_PROMPT, MAX = 96, 140


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", seed=0, num_hidden_layers=3)


@pytest.fixture(scope="module")
def calib(model, tmp_path_factory):
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(7)
    path = tmp_path_factory.mktemp("calib") / "projections.safetensors"
    save_file(calibrate(model, [torch.randint(3, 97, (1, 160), generator=g)]), str(path))
    load_projections.cache_clear()
    return str(path)


def ids(n=L_PROMPT, seed=0):
    return torch.randint(3, 97, (1, n), generator=torch.Generator().manual_seed(seed))


# one compressing and one lossless ("full") setting per press; head_dim is 16 in the tiny model, so groups of 8
CASES = {
    "streaming": ("streaming:budget=0.25,sinks=4", "streaming:budget=1.0"),
    "snapkv": ("snapkv:budget=0.3,window=8,obs_window=8", "snapkv:budget=1.0"),
    "h2o": ("h2o:budget=24,window=8", f"h2o:budget={L_PROMPT}"),
    "pyramidkv": ("pyramidkv:budget=0.3,window=8,obs_window=8", "pyramidkv:budget=1.0,spread=0.0"),
    "adakv": ("adakv:budget=0.3,window=8,obs_window=8", "adakv:budget=1.0"),
    "retrieval": ("retrieval:budget=32,chunk=8", "retrieval:budget=96,chunk=8"),
    "kivi": ("kivi:k_bits=4,v_bits=2,group_size=8,residual=16,guard=0.25", f"kivi:residual={L_PROMPT},group_size=8"),
    "lowrank": ("lowrank:calib={c},rank=8", "lowrank:calib={c},rank=16"),
    "hybrid": ("hybrid:retain=0.5,k_bits=4,v_bits=2,guard=0.5,group_size=8,window=16,obs_window=8",
               f"hybrid:retain=1.0,spread=0.0,window={L_PROMPT},group_size=8"),
}
assert set(CASES) == set(PRESSES), "every press is in the matrix"


def spec(name, which, calib):
    return CASES[name][which].format(c=calib)


def run(model, press, placement=None, n_next=8, seed=0):
    """Prefill a prompt, compress, then score ``n_next`` more tokens through the cache -> (logits, cache)."""
    c = make_cache(model, placement, 1, MAX, press=press)
    with torch.no_grad():
        model.prefill(ids(seed=seed), c, chunk=40)
        c.compress()
        out = model(ids(n_next, seed=seed + 1), c, num_logits=None)
    return out, c


@pytest.fixture(scope="module")
def reference(model):
    return run(model, None)[0]


@pytest.mark.parametrize("name", sorted(CASES))
def test_full_budget_or_bits_is_exact(model, reference, calib, name):
    out, c = run(model, spec(name, 1, calib))
    assert c.compressed
    tol = 1e-5 if name == "lowrank" else 0  # full-rank latents round-trip through an orthonormal basis in fp32
    torch.testing.assert_close(out, reference, atol=tol, rtol=tol)


@pytest.mark.parametrize("name", sorted(CASES))
def test_compression_holds_fewer_bytes_and_changes_logits(model, reference, calib, name):
    out, c = run(model, spec(name, 0, calib))
    r = c.memory_report()
    # bytes are counted from the tensors the stores hold (indices and scales included)
    assert r["store_bytes"] == sum(t.numel() * t.element_size() for stores in c.stores for s in stores
                                   for t in _tensors(s))
    assert r["bytes_per_token"] == r["store_bytes"] / L_PROMPT
    assert r["bytes_per_token"] < 0.8 * r["full_bytes_per_token"]
    assert not torch.equal(out, reference)
    # decoding continues through the compressed rows at their original positions
    assert c.next_position() == L_PROMPT + 8 and c.n_tail == 8


def _tensors(s):
    from mspeckv.kv.quant import QTensor
    from mspeckv.kv.stores import LowRank, QuantRows, Rows

    if isinstance(s, Rows):
        return [t for t in (s.k, s.v, s.pos, s.valid) if t is not None]
    if isinstance(s, QuantRows):
        return [s.kq.codes, s.kq.scale, s.kq.zero, s.vq.codes, s.vq.scale, s.vq.zero, s.pos]
    assert isinstance(s, LowRank)
    lat = [s.v_lat.codes, s.v_lat.scale, s.v_lat.zero] if isinstance(s.v_lat, QTensor) else [s.v_lat]
    return lat + [t for t in (s.k_rows, s.k_lat, s.pos) if t is not None]


@pytest.mark.parametrize("press,kept", [("streaming:budget=0.25", 24), ("streaming:budget=30", 30),
                                        ("snapkv:budget=0.3,window=8", 29), ("h2o:budget=17", 17),
                                        ("retrieval:budget=32,chunk=8", 32)])
def test_kept_count_equals_budget(model, press, kept):
    _, c = run(model, press)
    assert c.n_fixed == [kept] * 3  # ceil(0.25 * 96) = 24, ceil(0.3 * 96) = 29
    assert all(s.pos.shape[-1] == kept for stores in c.stores for s in stores)


def test_pyramid_budgets_shrink_with_depth_and_average_the_budget(model):
    _, c = run(model, "pyramidkv:budget=30,spread=0.5,window=4")
    assert c.n_fixed == [45, 30, 15] and sum(c.n_fixed) == 3 * 30


def test_score_press_keeps_top_scores_plus_sinks_and_window(model):
    p = parse_press("snapkv:budget=20,sinks=2,window=6,obs_window=8,kernel=1")
    c = make_cache(model, None, 1, MAX, press=p)
    with torch.no_grad():
        model.prefill(ids(), c, chunk=40)
        k0, _ = c.inner.read(0)
        q = next(o for o in c.press_obs if isinstance(o, LastQueries)).queries[0]
        pos = torch.arange(L_PROMPT).expand(1, 2, -1)
        s = snap_scores(q, k0, pos, 1, "mean")  # (1, 2, 96), computed here from the definition's parts
        c.compress()
    for h in range(2):
        kept = set(c.stores[0][0].pos[0, h].tolist())
        forced = set(range(2)) | set(range(L_PROMPT - 6, L_PROMPT))
        rest = s[0, h].clone()
        rest[list(forced)] = -1
        top = set(rest.topk(20 - len(forced)).indices.tolist())
        assert kept == forced | top


def test_adakv_heads_keep_different_counts_with_the_same_total(model, reference):
    out, c = run(model, "adakv:budget=24,window=4,obs_window=8,floor=0.2")
    valid = c.stores[0][0].valid  # (1, 2, n_max): padding is marked invalid and masked out of attention
    assert valid is not None and int(valid.sum()) == 2 * 24
    assert c.stores[0][0].pos.dtype == torch.int32  # positions are stored as int32, as by every other press
    assert torch.isfinite(out).all()


def test_adakv_max_rows_bounds_one_head_taking_every_pooled_row():
    """The static buffer's size: when one head's scores dominate, it takes all the rows the others give up, so it holds
    more than the mean budget. max_rows must cover that, exactly at the worst case."""
    from mspeckv.presses.adakv import AdaKVPress

    class Skewed(AdaKVPress):
        def score(self, layer, k, pos, obs):  # head 0: flat (every row near its max); head 1: one spike, on a sink
            B, H, L, _ = k.shape
            s = torch.rand(B, H, L) * 0.01
            s[:, 0] += 0.9
            s[:, 1] *= 1e-3
            s[:, 1, 0] = 1.0
            return s  # forced_ranking scales each head to [0, 1]: head 0's free rows then outrank head 1's

    L, H = 200, 2
    p = Skewed(budget=40, sinks=2, window=4, floor=0.2)
    k = torch.randn(1, H, L, 8)
    idx, valid = p.select_adaptive(0, 1, k, torch.arange(L).expand(1, H, L), [])
    counts = valid.sum(-1)[0].tolist()
    assert sum(counts) == 40 * H and counts[0] > 40  # the mean budget (40) would be too small a buffer
    assert counts[0] == p.max_rows(L, 1, n_kv_heads=H) == 40 * H - 8 * (H - 1)  # n_own = max(0.2*40, 2+4) = 8
    assert p.max_rows(L, 1) == 40 and p.max_rows(30, 1, n_kv_heads=H) == 30  # one head; a budget over L keeps all
    # the forced rows can set each head's own share: sinks + window = 6 > floor x 40 = 4
    q = Skewed(budget=40, sinks=2, window=4, floor=0.1)
    _, valid = q.select_adaptive(0, 1, k, torch.arange(L).expand(1, H, L), [])
    assert valid.sum(-1)[0, 0] == q.max_rows(L, 1, n_kv_heads=H) == 40 * H - 6 * (H - 1)
    # per-layer budgets: each layer keeps its own total, and the buffer covers the largest layer's worst case
    r = Skewed(budget=40, sinks=2, window=4, floor=0.2, layer_budgets=(10, 40))
    kept = [r.select_adaptive(i, 2, k, torch.arange(L).expand(1, H, L), [])[1].sum().item() for i in (0, 1)]
    assert kept == [10 * H, 40 * H] and r.max_rows(L, 2, n_kv_heads=H) == 40 * H - 8 * (H - 1)


def test_kivi_error_within_quantizer_bounds(model):
    """Held rows reconstruct within kv/quant.py's documented bounds (relative Frobenius error per format)."""
    dense = make_cache(model, None, 1, MAX)
    with torch.no_grad():
        model.prefill(ids(), dense, chunk=40)
    for bits, fmt in ((8, "int8"), (4, "int4"), (2, "int2")):
        _, c = run(model, f"kivi:k_bits={bits},v_bits={bits},group_size=8,residual=0")
        for i in range(3):
            k, v = c.read(i)  # quantized rows in position order, then the 8 decoded rows
            assert torch.equal(c.positions(i)[..., :L_PROMPT], torch.arange(L_PROMPT).expand(1, 2, -1))
            fk, fv = dense.read(i)
            for x, ref in ((k[:, :, :L_PROMPT], fk), (v[:, :, :L_PROMPT], fv)):
                err = ((x - ref).norm() / ref.norm()).item()
                assert err < error_bound(fmt) and err > 0


def test_lowrank_error_falls_as_rank_rises(model, calib):
    dense = make_cache(model, None, 1, MAX)
    with torch.no_grad():
        model.prefill(ids(), dense, chunk=40)
    errs = []
    for r in (2, 4, 8, 12, 16):
        _, c = run(model, f"lowrank:calib={calib},rank={r}")
        _, v = c.read(1)
        _, fv = dense.read(1)
        errs.append(((v[:, :, :L_PROMPT] - fv).norm() / fv.norm()).item())
    assert all(a > b for a, b in zip(errs, errs[1:], strict=False)) and errs[-1] < 1e-5, errs


def test_bytes_per_token_by_hand(model, calib):
    """B=1, H=2, D=16, 3 layers, fp32 rows, int32 positions."""
    _, c = run(model, "streaming:budget=24")  # 24 rows of K and V + 24 positions per head and layer
    assert c.bytes_per_token() == 3 * 2 * 24 * (2 * 16 * 4 + 4) / L_PROMPT
    _, c = run(model, "kivi:k_bits=4,v_bits=4,group_size=8,residual=0")
    # keys: 96 rows in 12 groups: codes 16 ch x 4 B, fp16 scale+zero per ch; values: 8 B codes + 2 groups x 2 x 2 B
    per_layer_head = 12 * (16 * 4 + 16 * 2 * 2) + 96 * (8 + 2 * 2 * 2) + 96 * 4
    assert c.bytes_per_token() == 3 * 2 * per_layer_head / L_PROMPT
    _, c = run(model, f"lowrank:calib={calib},rank=8")  # V latents 8 fp32 + keys 16 fp32 + position
    assert c.bytes_per_token() == 3 * 2 * 96 * (8 * 4 + 16 * 4 + 4) / L_PROMPT
    assert c.memory_report()["shared_bytes"] == 3 * 2 * 16 * 8 * 4  # V projections (H, D, r) fp32, once per layer


def test_rollback_is_exact_and_bounded_by_the_tail(model):
    _, a = run(model, "snapkv:budget=0.3,window=8,obs_window=8", n_next=8)
    _, b = run(model, "snapkv:budget=0.3,window=8,obs_window=8", n_next=8)
    with torch.no_grad():
        model(ids(3, seed=9), b, num_logits=None)
    b.rollback(3)
    nxt = ids(2, seed=11)
    with torch.no_grad():
        torch.testing.assert_close(model(nxt, a, num_logits=None), model(nxt, b, num_logits=None), atol=0, rtol=0)
    b.rollback(b.n_tail)  # exactly the appended rows: fine
    with pytest.raises(ValueError, match="only rows appended since the last"):
        b.rollback(1)  # one more: into the pressed rows


def test_compress_every_keeps_memory_bounded(model):
    c = make_cache(model, None, 1, 200, press="streaming:budget=32,sinks=4", tail=16, compress_every=16)
    with torch.no_grad():
        model.prefill(ids(), c, chunk=40)
        c.compress()
        for t in range(40):
            model(ids(1, seed=100 + t), c)
    assert c.compressions >= 3 and c.next_position() == L_PROMPT + 40 and max(c.n_fixed) == 32
    pos = c.positions(0)[0, 0].tolist()
    assert pos[:4] == [0, 1, 2, 3] and pos[-1] == L_PROMPT + 39  # sinks + the newest rows


def test_offloaded_pressed_stores_stream_fewer_bytes(model):
    """Offloaded layers keep their pressed stores in (pinned) CPU memory; a decode step copies exactly their bytes,
    so a 4x press streams about 4x fewer bytes than the same layers uncompressed."""
    place = Placement(on_chip=1, kv_group_size=8)
    full = [run(model, "snapkv:budget=1.0", place, n_next=1), run(model, "snapkv:budget=0.25,window=8", place, 1)]
    (o_full, c_full), (o_small, c_small) = full
    assert c_full.offload == frozenset({1, 2})
    per_step = [c.memory_report()["h2d_bytes"] for c in (c_full, c_small)]
    assert per_step[0] == c_full.store_bytes(1) + c_full.store_bytes(2)
    assert per_step[1] == c_small.store_bytes(1) + c_small.store_bytes(2)
    assert per_step[1] < 0.3 * per_step[0]
    dense, _ = run(model, None, place, n_next=1)
    torch.testing.assert_close(o_full, dense, atol=0, rtol=0)


@pytest.mark.parametrize("name", sorted(CASES))
def test_greedy_mspeckv_with_any_middle_press_equals_ar(model, calib, name):
    draft = tiny_model("llama", seed=1, num_hidden_layers=1)
    gen = GenerationConfig(max_new_tokens=24, stop_on_eos=False, prefill_chunk=32)
    prompt = ids(80, seed=3)
    ar = generate(model, prompt, gen, cache=make_cache(model, None, 1, 80 + 24))
    sp = speculative_generate(model, draft, prompt, gen,
                              SpecConfig(gamma=4, draft_gamma=2, l1_press=spec(name, 0, calib), draft_sinks=4,
                                         draft_window=12, graphs=name in ("snapkv", "h2o", "adakv")))
    assert sp.tokens == ar.tokens
    assert sp.levels["verify_l1"]["rounds"] > 0


def test_presets_load_and_mirror_table_4():
    want = {"conservative": (0.32, 4, 2, 0.6, 32), "aggressive": (0.18, 2, 2, 0.5, 32),
            "extreme": (0.12, 2, 2, 0.4, 64)}
    assert set(presets()) == set(want)
    for name, (retain, kb, vb, guard, g) in want.items():
        p = parse_press(name)
        assert (p.retain, p.k_bits, p.v_bits, p.guard, p.group_size, p.window) == (retain, kb, vb, guard, g, 2048)


@pytest.mark.parametrize("bad,msg", [
    ("snapkv:budget=1.5", "budget as a ratio must be in"), ("snapkv:budget=0", "token count must be >= 1"),
    ("snapkv:budgett=3", "snapkv has no field 'budgett'"), ("kivi:k_bits=3", "kivi.k_bits must be one of 8, 4, 2"),
    ("kivi:group_size=5,k_bits=4", "multiple of 2"), ("h2o:window=-1", "H2OPress.window must be in"),
    ("retrieval:budget=30,chunk=8", "not a multiple of chunk"), ("lowrank:rank=4", "lowrank.calib is required"),
    ("nope:x=1", "unknown press 'nope'"), ("snapkv:budget", "'budget' is not key=value"),
    ("snapkv:reduce=median", "reduce must be mean or max"), ("pyramidkv:spread=1.5", "spread must be in"),
    ("adakv:floor=1.5", r"AdaKVPress.floor must be in \[0.0, 1.0\], got 1.5"),
    ("adakv:floor=-0.1", r"AdaKVPress.floor must be in \[0.0, 1.0\], got -0.1"),
])
def test_bad_fields_get_one_clear_error(bad, msg):
    with pytest.raises(ValueError, match=msg):
        parse_press(bad)


def test_yaml_press_file(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("press: snapkv\nbudget: 0.5\nlayer_budgets: [0.5, 0.25, 0.125]\n")
    p = parse_press(str(f))
    assert p.layer_budgets == (0.5, 0.25, 0.125)
    f.write_text("press: snapkv\nwindw: 3\n")
    with pytest.raises(ValueError, match="p.yaml: snapkv has no field 'windw'"):
        parse_press(str(f))


def test_spec_round_trips(calib):
    for name in CASES:
        p = parse_press(spec(name, 0, calib))
        assert parse_press(p.spec()) == p


def test_static_layout_replays_like_the_eager_one(model):
    """The CUDA-graph layout (fixed buffers, device-side positions, masked unused rows) equals the eager one."""
    full = make_cache(model, None, 1, MAX)
    p = parse_press("snapkv:budget=0.3,window=8,obs_window=8")
    obs = p.observers(3)
    full.observers += obs
    with torch.no_grad():
        model.prefill(ids(), full, chunk=40)
        a = PressedKV.build(p, full, obs, tail=16)
        b = PressedKV.build(p, full, obs, tail=16, static=True, fixed_cap=40)
        for t in range(5):
            x = ids(2, seed=50 + t)
            pa = model(x, a, num_logits=None)
            pb = model(x, b, num_logits=None)
            torch.testing.assert_close(pa, pb, atol=1e-5, rtol=1e-5)
        assert math.isclose(b.n_tail, 10)


@pytest.mark.parametrize("name", sorted(CASES))
def test_make_cache_graphs_gives_dense_presses_a_static_layout_with_the_eager_tokens(model, calib, name):
    """``make_cache(..., graphs=True)`` (``--speed-graphs``, ``--gsm8k-graphs``): a press that keeps dense rows gets a
    static PressedKV that a GraphRunner drives (its bookkeeping runs eagerly on the CPU), and greedy decoding through
    it gives the eager tokens and holds the same bytes; codes and latents stay eager."""
    from mspeckv.evals.generation import greedy
    from mspeckv.evals.variants import Variant

    press = parse_press(spec(name, 0, calib))
    prompt = ids()[0].tolist()
    cache = make_cache(model, None, 1, L_PROMPT + 24, press=press, tail=25, graphs=True)
    assert cache.graphable is press.dense and cache.static is press.dense
    v = Variant(press=spec(name, 0, calib))
    eager = greedy(model, v, prompt, 24, prefill_chunk=40, eos=False, feed_last=True)
    graphed = greedy(model, v, prompt, 24, prefill_chunk=40, eos=False, feed_last=True, graphs=True)
    assert graphed.graphed is False  # the CPU never replays; the runner type is what the cache decides
    assert graphed.tokens == eager.tokens and len(eager.tokens) == 24
    assert graphed.kv_bytes == eager.kv_bytes and graphed.kv_bytes_end == eager.kv_bytes_end
    # what the static layout allocates, counted from its buffers: held stores + tails + the unused fixed rows
    with torch.no_grad():
        model.prefill(torch.tensor([prompt]), cache, chunk=40)
        cache.compress()
    r = cache.memory_report()
    if cache.static:
        row = 2 * cache.H * cache.D * 4  # K and V of one token, fp32, batch 1
        allocated = sum(b.numel() * b.element_size() for b in cache.buf)
        assert allocated == sum(cache.n_fixed) * row + r["tail_bytes"] + r["static_slack_bytes"]
        assert r["static_slack_bytes"] == sum(cache.fixed_cap - n for n in cache.n_fixed) * row
    else:
        assert r["static_slack_bytes"] == 0


@pytest.mark.parametrize("press", ["snapkv:budget=20,sinks=4,window=60,obs_window=8",
                                   "pyramidkv:budget=20,sinks=4,window=60,obs_window=8,spread=0.0",
                                   "h2o:budget=20,sinks=4,window=60", "adakv:budget=20,sinks=4,window=60,obs_window=8"])
def test_budget_smaller_than_sinks_plus_window_keeps_sinks_then_newest(model, press):
    """When the forced rows do not fit the budget, the sinks and the newest rows are kept (not an arbitrary pick
    among equally forced rows; found by the eval: SnapKV kept rows 201-299 of 400 with window 200)."""
    _, c = run(model, press)
    for i in range(3):
        pos = c.positions(i)[0, :, :c.n_fixed[i]]
        valid = c.stores[i][0].valid
        for h in range(2):
            kept = pos[h][valid[0, h]] if valid is not None else pos[h]
            assert kept.tolist() == [0, 1, 2, 3, *range(L_PROMPT - 16, L_PROMPT)]


def test_forced_window_never_takes_more_than_its_share_of_the_budget():
    """A window wider than the budget used to turn a score press into StreamingLLM (the presets lost every needle
    below ~11K tokens): with window_share the top-scored old rows are still kept."""
    import dataclasses

    from mspeckv.presses.snapkv import SnapKVPress

    L, n = 64, 16
    scores = torch.zeros(1, 2, L)
    scores[:, :, 10] = 1.0  # one old row that matters (a needle)

    @dataclasses.dataclass(frozen=True)
    class Fixed(SnapKVPress):
        def score(self, layer, k, pos, obs):
            return scores

    k = torch.zeros(1, 2, L, 8)
    old = Fixed(budget=n, sinks=0, window=32).select(0, 1, k, None, [])
    capped = Fixed(budget=n, sinks=0, window=32, window_share=0.5).select(0, 1, k, None, [])
    assert 10 not in old[0, 0].tolist() and old[0, 0].tolist() == list(range(L - n, L))  # pure recency
    assert 10 in capped[0, 0].tolist() and set(range(L - 8, L)) <= set(capped[0, 0].tolist())
    assert parse_press("aggressive").selector.window_share == 0.5
    with pytest.raises(ValueError, match="window_share"):
        SnapKVPress(window_share=1.5)


@pytest.mark.parametrize("kernel,reduce", [(1, "mean"), (3, "mean"), (5, "max"), (2, "max")])
def test_snap_scores_match_a_loop_reference(kernel, reduce):
    """SnapKV's score, written out: per query head, softmax(q.k / sqrt(D)) over the keys at or before the query's own
    position, averaged over the observation window, averaged over ``kernel`` rows starting ``kernel // 2`` before
    (centred for odd kernels; edges average only the rows that exist), then mean or max over each KV head's query
    group. Batch 2, GQA 2, unsorted positions."""
    from mspeckv.presses.base import snap_scores

    g = torch.Generator().manual_seed(0)
    B, Hkv, G, w, L, D = 2, 2, 2, 3, 9, 4
    q = torch.randn(B, Hkv * G, w, D, generator=g)
    k = torch.randn(B, Hkv, L, D, generator=g)
    pos = torch.stack([torch.randperm(20, generator=g)[:L] for _ in range(B * Hkv)]).reshape(B, Hkv, L)
    want = torch.zeros(B, Hkv, L)
    for b in range(B):
        for h in range(Hkv):
            last = int(pos[b, h].max())
            per_g = []
            for gi in range(G):
                att = torch.zeros(L)
                for i in range(w):
                    qpos = last - (w - 1) + i
                    vis = pos[b, h] <= qpos
                    s = (k[b, h] @ q[b, h * G + gi, i]) / math.sqrt(D)
                    p = torch.softmax(s.masked_fill(~vis, float("-inf")), -1)
                    att += p / w
                lo = lambda j: j - kernel // 2  # noqa: E731 (window [lo, lo + kernel): centred for odd kernels)
                pooled = torch.stack([att[max(0, lo(j)): lo(j) + kernel].mean() for j in range(L)]) \
                    if kernel > 1 else att
                per_g.append(pooled)
            stacked = torch.stack(per_g)
            want[b, h] = stacked.amax(0) if reduce == "max" else stacked.mean(0)
    got = snap_scores(q, k, pos, kernel, reduce)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def test_errors_name_the_flag_the_spec_came_from():
    from mspeckv.decoding.speculative import SpecConfig

    with pytest.raises(ValueError, match=r"^--presses nope:x=1|^--presses: unknown press 'nope'"):
        parse_press("nope:x=1", "--presses")
    with pytest.raises(ValueError, match=r"^--l1-press snapkv:budget: 'budget' is not key=value"):
        _ = SpecConfig(mode="mspeckv", l1_press="snapkv:budget").middle_press


@pytest.mark.parametrize("press", ["snapkv:budget=0.3,window=8,obs_window=8", "streaming:budget=0.25,sinks=4",
                                   "adakv:budget=0.3,window=8,obs_window=8"])
def test_speculation_over_a_pressed_target_equals_ar_over_it_graphed_or_not(model, press):
    """``speculative_generate(press=...)`` presses the target's own KV: with graphs its full level is now a static
    PressedKV (rollbacks move the device-side position), and greedy output still equals AR over the same press."""
    draft = tiny_model("llama", seed=1, num_hidden_layers=1)
    gen = GenerationConfig(max_new_tokens=24, stop_on_eos=False, prefill_chunk=32)
    prompt = ids(80, seed=3)
    ar = generate(model, prompt, gen, cache=make_cache(model, None, 1, 80 + 24, press=press))
    for graphs in (False, True):
        sp = speculative_generate(model, draft, prompt, gen, SpecConfig(mode="vanilla", gamma=4, graphs=graphs),
                                  press=press)
        assert sp.tokens == ar.tokens, graphs
