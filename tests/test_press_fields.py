"""Every field of every press's spec changes what the cache holds, in the part it is meant to (issue 29, item 2).

One parametrized test: a press from a base spec and the same press with ONE field changed compress the same prefill
(tiny model, 64 tokens in two chunks); the decoded K, decoded V and positions of every layer are compared. Each
case names which of them must change and which must not, so a field that is ignored fails (nothing changes) and a
field used in another's place fails too (e.g. ``k_bits`` must change K and never V).

``pyramidkv.layer_budgets`` is refused (the press computes its own from budget and spread). The one field that
must change nothing: ``h2o.q_block``, the query rows per slice of H2O's accumulation, a memory
bound only (the accumulated mass is the same sum in any slicing; the slicing itself is pinned in
``test_press_arith.py``)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from mspeckv.cache import make_cache
from mspeckv.presses import PRESSES, parse_press
from mspeckv.presses.lowrank import calibrate, load_projections
from tests.tiny import tiny_model

L_PROMPT = 64
KVP, K, V, NONE = {"k", "v", "pos"}, {"k"}, {"v"}, set()

BASE = {
    "streaming": "streaming:budget=0.4,sinks=4",
    "snapkv": "snapkv:budget=0.4,sinks=2,window=8,obs_window=8,kernel=5",
    "h2o": "h2o:budget=0.4,sinks=2,window=8,q_block=256",
    "pyramidkv": "pyramidkv:budget=0.4,sinks=2,window=8,obs_window=8,spread=0.5",
    "adakv": "adakv:budget=0.4,sinks=2,window=8,obs_window=8,floor=0.2",
    "retrieval": "retrieval:budget=32,chunk=8,n_queries=1",
    "kivi": "kivi:k_bits=4,v_bits=2,group_size=8,residual=16,guard=0.25,guard_bits=8,obs_window=8",
    "lowrank": "lowrank:calib={c},rank=0,ratio=0.5,latent_bits=8,latent_group=4",
    "hybrid": "hybrid:retain=0.5,k_bits=4,v_bits=2,guard=0.5,group_size=8,window=8,spread=0.5,obs_window=8,sinks=2,"
              "window_share=0.5",
}
SCORE = [("budget", 0.25, KVP), ("sinks", 6, KVP), ("window", 16, KVP), ("window_share", 0.25, KVP),
         ("obs_window", 2, KVP), ("kernel", 1, KVP), ("reduce", "max", KVP)]
# (press, field, changed value, what must change)
CASES = [
    ("streaming", "budget", 0.25, KVP), ("streaming", "sinks", 1, KVP),
    *[("snapkv", *c) for c in SCORE], ("snapkv", "layer_budgets", (0.25, 0.5, 0.4), KVP),
    ("h2o", "budget", 0.25, KVP), ("h2o", "sinks", 20, KVP), ("h2o", "window", 16, KVP),
    ("h2o", "window_share", 0.25, KVP), ("h2o", "layer_budgets", (0.25, 0.5, 0.4), KVP), ("h2o", "q_block", 5, NONE),
    *[("pyramidkv", *c) for c in SCORE], ("pyramidkv", "spread", 0.0, KVP),
    ("pyramidkv", "layer_budgets", (0.25, 0.5, 0.4), "refused"),  # it computes its own
    *[("adakv", *c) for c in SCORE], ("adakv", "layer_budgets", (0.25, 0.5, 0.4), KVP), ("adakv", "floor", 1.0, KVP),
    ("retrieval", "budget", 48, KVP), ("retrieval", "chunk", 16, KVP), ("retrieval", "n_queries", 8, KVP),
    ("kivi", "k_bits", 2, K), ("kivi", "v_bits", 8, V), ("kivi", "group_size", 16, KVP),
    ("kivi", "residual", 24, KVP), ("kivi", "guard", 0.5, KVP), ("kivi", "guard_bits", 16, KVP),
    ("kivi", "obs_window", 2, KVP),
    ("lowrank", "calib", "other", V), ("lowrank", "rank", 4, V), ("lowrank", "ratio", 0.25, V),
    ("lowrank", "v_only", False, K), ("lowrank", "latent_bits", 16, V), ("lowrank", "latent_group", 8, V),
    ("hybrid", "retain", 0.25, KVP), ("hybrid", "k_bits", 2, K), ("hybrid", "v_bits", 8, V),
    ("hybrid", "guard", 0.25, KVP), ("hybrid", "group_size", 16, KVP), ("hybrid", "window", 16, KVP),
    ("hybrid", "spread", 0.0, KVP), ("hybrid", "obs_window", 2, KVP), ("hybrid", "sinks", 6, KVP),
    ("hybrid", "window_share", 0.1, KVP),
]


def test_every_field_of_every_press_is_in_the_matrix():
    have = {(p, f) for p, f, _, _ in CASES}
    want = {(name, f.name) for name, cls in PRESSES.items() for f in dataclasses.fields(cls)}
    assert have == want, (want - have, have - want)


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", seed=0, num_hidden_layers=3)


@pytest.fixture(scope="module")
def calibs(model, tmp_path_factory):
    from safetensors.torch import save_file

    out = {}
    for name, seed in (("base", 7), ("other", 8)):
        g = torch.Generator().manual_seed(seed)
        path = tmp_path_factory.mktemp(name) / "projections.safetensors"
        save_file(calibrate(model, [torch.randint(3, 97, (1, 100), generator=g)]), str(path))
        out[name] = str(path)
    load_projections.cache_clear()
    return out


def held(model, press):
    """Prefill 64 tokens (two chunks), compress -> per layer (decoded K, decoded V, positions)."""
    ids = torch.randint(3, 97, (1, L_PROMPT), generator=torch.Generator().manual_seed(0))
    c = make_cache(model, None, 1, L_PROMPT + 8, press=press)
    with torch.no_grad():
        model.prefill(ids, c, chunk=32)
        c.compress()
    return [(*c.read(i), c.positions(i)) for i in range(model.cfg.n_layers)]


def differs(a, b) -> bool:
    return a.shape != b.shape or not torch.equal(a, b)


@pytest.mark.parametrize("name,field,value,changes", CASES, ids=[f"{p}.{f}" for p, f, _, _ in CASES])
def test_each_field_changes_what_it_should(model, calibs, name, field, value, changes):
    base = parse_press(BASE[name].format(c=calibs["base"]))
    if field == "calib":
        value = calibs[value]
    assert getattr(base, field) != value
    if changes == "refused":
        with pytest.raises(ValueError, match="computes its own layer_budgets"):
            dataclasses.replace(base, **{field: value})
        return
    other = dataclasses.replace(base, **{field: value})
    a, b = held(model, base), held(model, other)
    pairs = list(zip(a, b, strict=True))
    got = {part for i, part in enumerate(("k", "v", "pos")) if any(differs(x[i], y[i]) for x, y in pairs)}
    assert got == changes, f"{name}.{field} {getattr(base, field)!r} -> {value!r} changed {got or 'nothing'}"
