"""``mspeckv generate --prompts FILE.jsonl``: one JSON line per prompt in input order, equal to each prompt alone;
bad files and flags get one error before any weights load; ``--gpu-memory`` refuses what does not fit."""

import json
from pathlib import Path

import pytest
import torch

from mspeckv.cache import batch_memory, check_gpu_memory, weight_bytes
from mspeckv.cli import main
from mspeckv.config import GenerationConfig
from mspeckv.data.prompts import read_prompts
from mspeckv.decoding.autoregressive import generate
from mspeckv.model.api import load, model_config
from tests.tiny import save_tiny_pair


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    return save_tiny_pair(tmp_path_factory.mktemp("batch_cli"))[0]


def write(tmp_path, *lines, name="p.jsonl"):
    p = tmp_path / name
    p.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(p)


def test_prompts_file_gives_each_prompts_solo_output_in_input_order(target, tmp_path, capsys):
    texts = ["The vote was delayed until March.", "Budget", "A much longer prompt about the committee and its work."]
    f = write(tmp_path, *[json.dumps({"prompt": t, **({"id": f"r{i}"} if i != 1 else {})}) for i, t in
                          enumerate(texts)], json.dumps({"prompt": "Short", "max_new_tokens": 3}))
    out = tmp_path / "out.jsonl"
    rc = main(["generate", "--model", target, "--prompts", f, "--batch", "2", "--max-new-tokens", "7",
               "--device", "cpu", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 0 and "4 prompts, 2 in flight" in err
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["index"] for r in rows] == [0, 1, 2, 3] and rows[0]["id"] == "r0" and "id" not in rows[1]
    model, tok, _ = load(target, "cpu")
    for r, t, n in zip(rows, texts + ["Short"], (7, 7, 7, 3), strict=True):
        ids = tok(t, add_special_tokens=False).input_ids
        want = generate(model, torch.tensor([ids]), GenerationConfig(max_new_tokens=n)).tokens[0]
        assert r["tokens"] == want and r["prompt_tokens"] == len(ids)
        assert r["text"] == tok.decode(want, skip_special_tokens=True)
        assert r["finish_reason"] in ("eos", "length") and r["ttft_s"] <= r["latency_s"]


@pytest.mark.parametrize("lines,match", [
    (['{"prompt": "a"}', "not json"], "line 2 is not JSON"),
    (['["a"]'], "line 1 is a list"),
    (['{"prompt": ""}'], '"prompt" must be a non-empty string'),
    (['{"text": "a"}'], "unknown key"),
    (['{"prompt": "a", "max_new_tokens": 0}'], "integer >= 1"),
    (['{"prompt": "a", "max_new_tokens": true}'], "integer >= 1"),
    (['{"prompt": "a", "id": [1]}'], '"id" must be'),
    (["", "  "], "holds no prompt"),
])
def test_bad_prompt_files_are_refused_by_line(tmp_path, lines, match):
    with pytest.raises(ValueError, match=match):
        read_prompts(write(tmp_path, *lines))


def test_reader_skips_blank_lines_and_keeps_fields(tmp_path):
    got = read_prompts(write(tmp_path, '{"prompt": "x", "id": 4}', "", '{"prompt": "y", "max_new_tokens": 2}'))
    assert [(g.prompt, g.id, g.max_new_tokens) for g in got] == [("x", 4, None), ("y", None, 2)]
    with pytest.raises(ValueError, match="is not a file"):
        read_prompts(tmp_path)


@pytest.mark.parametrize("extra,match", [
    (["--mode", "mspeckv", "--budget", "64"], "--budget would be ignored"),
    (["--mode", "mspeckv", "--gpu-memory", "30"], "does not count a draft model"),
    (["--mode", "self", "--press", "streaming:budget=8"], "over the dense batched KV on the GPU"),
    (["--mode", "vanilla", "--gpu-memory", "30"], "does not count a draft model"),
    (["--mode", "self", "--gamma", "0"], "gamma"),
    (["--self-window", "9"], "--self-window would be ignored"),
    (["--drafter", "ngram"], "--drafter would be ignored"),
    (["--on-chip", "1", "--gpu-memory", "30"], "--gpu-memory budgets the dense batched KV"),
    (["--press", "nope"], "unknown press 'nope'"),
    (["--batch", "0"], "--batch must be >= 1"),
    (["--gpu-memory", "0"], "--gpu-memory must be > 0"),
    (["--gpu-memory", "0.000001"], "--gpu-memory 1e-06 GB is too small"),
    (["--on-chip", "1", "--kv-quant", "int2"], "--kv-quant int2 changes the model's output a lot: none is measured "
     "for random:qwen2.5-1.5b"),
])
def test_bad_flags_with_prompts_fail_before_loading(tmp_path, extra, match, monkeypatch, capsys):
    import mspeckv.model.api as api

    monkeypatch.setattr(api, "load", lambda *a, **k: pytest.fail("weights loaded before the check"))
    f = write(tmp_path, '{"prompt": "a"}')
    assert main(["generate", "--model", "random:qwen2.5-1.5b", "--prompts", f, "--device", "cpu", *extra]) != 0
    err = capsys.readouterr().err
    assert match in err and err.count("error") == 1


def test_batch_flags_without_prompts_are_refused(capsys):
    assert main(["generate", "--model", "random:tiny", "--prompt", "x", "--batch", "4"]) != 0
    assert "--batch would be ignored: they go with --prompts" in capsys.readouterr().err


def test_gpu_memory_budget_counts_weights_kv_and_workspace():
    cfg = model_config("random:qwen2.5-1.5b")
    assert weight_bytes(cfg, 2) == 3_087_428_608  # Qwen2.5-1.5B: 1.54 B parameters in bf16, the LM head tied
    m = batch_memory(cfg, 32, 32768 + 128, 2)
    assert m["kv"] == 32 * (32768 + 128) * 28 * 2 * 2 * 128 * 2  # slots x rows x layers x (K, V) x heads x dim x 2 B
    assert m["total"] == m["weights"] + m["kv"] + m["workspace"]
    with pytest.raises(ValueError, match=r"--gpu-memory 24 GB is too small: .* run at most 19 sequences"):
        check_gpu_memory(cfg, 32, 32768 + 128, 2, 24)
    assert check_gpu_memory(cfg, 19, 32768 + 128, 2, 24)["total"] <= 24e9  # the count it names fits, one more not
    with pytest.raises(ValueError, match="too small"):
        check_gpu_memory(cfg, 20, 32768 + 128, 2, 24)
    assert check_gpu_memory(cfg, 64, 32768, 2, None)["kv"] > 60e9  # no cap: reported, never refused


def test_bench_batch_cells_resume_and_refuse_what_does_not_fit(tmp_path, capsys):
    from mspeckv.bench.batch import BatchBenchConfig, run

    out = tmp_path / "bb"
    cfg = BatchBenchConfig(model="random:tiny", contexts=(32,), batches=(1, 3), gen_len=4, seeds=2, ragged="8-40",
                           ragged_batch=3, hf=("32x3",), device="cpu", out=str(out))
    res = run(cfg, "cmd")
    rows = {(r["method"], r["cell"]): r for r in res["rows"]}
    assert set(rows) == {("ar", "32x1"), ("ar", "32x3"), ("ragged", "8-40"), ("uniform", "8-40"), ("hf", "32x3")}
    assert all(r["runs"] == 2 for r in rows.values())
    ar = rows[("ar", "32x3")]
    assert ar["batch"] == 3 and ar["total_prompt_tokens"] == 96 and ar["decode_tok_per_s"] > 0
    assert rows[("ragged", "8-40")]["total_prompt_tokens"] // 3 == rows[("uniform", "8-40")]["total_prompt_tokens"] // 3
    assert "StaticCache" in rows[("hf", "32x3")]["engine"]
    assert (out / "summary.md").read_text().count("| ar |") == 2
    before = sorted(p.stat().st_mtime_ns for p in (out / "runs").iterdir())
    run(cfg, "cmd")  # resumed: every cell is done, nothing runs again
    assert sorted(p.stat().st_mtime_ns for p in (out / "runs").iterdir()) == before
    small = BatchBenchConfig(model="random:tiny", contexts=(32,), batches=(2,), gen_len=4, seeds=2, ragged="",
                             gpu_memory=0.5, device="cpu", out=str(tmp_path / "small"))
    row = run(small, "cmd")["rows"][0]
    assert row["runs"] == 0 and "--gpu-memory 0.5 GB is too small" in row["errors"][0]


@pytest.mark.parametrize("kw,match", [
    ({"ragged": "40-8"}, "lo <= hi"), ({"ragged": "x"}, "give a range"), ({"hf": ("32by3",)}, "CONTEXTxBATCH"),
    ({"seeds": 1}, "seeds"), ({"gpu_memory": 0}, "gpu_memory"), ({"batches": (0,)}, "batches must be"),
    ({"spec": ("fast:4@32x2",)}, "@CONTEXTxBATCH with MODE one of"), ({"spec": ("self:0@32x2",)}, "GAMMA >= 1"),
    ({"spec": ("self:2@32",)}, "CONTEXTxBATCH"),
])
def test_bench_batch_refuses_bad_settings(kw, match):
    from mspeckv.bench.batch import BatchBenchConfig

    with pytest.raises(ValueError, match=match):
        BatchBenchConfig(model="random:tiny", **kw)


def test_prompts_with_a_press_and_a_placement_match_each_prompt_alone(target, tmp_path, capsys):
    from mspeckv.cache import make_cache
    from mspeckv.kv.placement import Placement

    texts = ["The vote was delayed until March, said the chair.", "Budget talks"]
    f = write(tmp_path, *[json.dumps({"prompt": t}) for t in texts])
    model, tok, _ = load(target, "cpu")
    for flags, pl, press in ((["--on-chip", "1", "--kv-quant", "int8", "--kv-group-size", "16"],
                              Placement(on_chip=1, kv_quant="int8", kv_group_size=16), None),
                             (["--press", "streaming:budget=16,sinks=2"], None, "streaming:budget=16,sinks=2")):
        out = tmp_path / "o.jsonl"
        assert main(["generate", "--model", target, "--prompts", f, "--max-new-tokens", "6", "--device", "cpu",
                     "--out", str(out), *flags]) == 0, capsys.readouterr().err
        for r, t in zip([json.loads(x) for x in out.read_text().splitlines()], texts, strict=True):
            ids = tok(t, add_special_tokens=False).input_ids
            cache = make_cache(model, pl, 1, len(ids) + 6, press=press)
            assert r["tokens"] == generate(model, torch.tensor([ids]), GenerationConfig(max_new_tokens=6),
                                           cache=cache).tokens[0]


def test_plan_takes_the_whole_run_budget(capsys):
    assert main(["plan", "--model", "random:qwen2.5-1.5b", "--context", "32768", "--batch", "32",
                 "--gpu-memory", "24"]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    cfg = model_config("random:qwen2.5-1.5b")
    assert row["gpu_kv_budget_bytes"] == 24_000_000_000 - weight_bytes(cfg, 2) - (2 << 30)
    assert 0 < row["on_chip"] < 28 and row["predicted_gpu_kv_bytes"] <= row["gpu_kv_budget_bytes"]
    assert main(["plan", "--model", "random:qwen2.5-1.5b", "--context", "32768", "--gpu-memory", "4"]) != 0
    assert "leaves nothing for the KV" in capsys.readouterr().err
    assert main(["plan", "--model", "random:qwen2.5-1.5b", "--context", "32768", "--gpu-memory", "24",
                 "--gpu-kv-budget", "8"]) != 0
    assert "not both" in capsys.readouterr().err


def test_bench_batch_speculation_cells(tmp_path):
    from mspeckv.bench.batch import BatchBenchConfig, run

    cfg = BatchBenchConfig(model="random:tiny", draft="random:tiny", contexts=(24,), batches=(2,), gen_len=6,
                           seeds=2, ragged="", spec=("self:3@24x3", "vanilla:2@24x2", "self:auto4:w6@24x2"), window=8,
                           draft_window=5, device="cpu", out=str(tmp_path / "bs"))
    res = run(cfg, "cmd")
    rows = {r["cell"]: r for r in res["rows"] if r["method"] == "spec"}
    assert set(rows) == {"self:3@24x3", "vanilla:2@24x2", "self:auto4:w6@24x2"}
    assert all(r["runs"] == 2 for r in rows.values())
    assert 0 <= rows["self:3@24x3"]["acceptance"] <= 1 and rows["self:3@24x3"]["batch"] == 3
    assert 1 <= rows["vanilla:2@24x2"]["tokens_per_round"] <= 3
    assert "window 8" in rows["self:3@24x3"]["engine"] and "auto≤4" in rows["self:auto4:w6@24x2"]["engine"]
    assert "window 6" in rows["self:auto4:w6@24x2"]["engine"]
    assert "random:tiny over a window of 5 (sinks 4)" in rows["vanilla:2@24x2"]["engine"]
    ar = next(r for r in res["rows"] if r["method"] == "ar")
    assert rows["vanilla:2@24x2"]["vs_ar_decode"] == pytest.approx(
        rows["vanilla:2@24x2"]["decode_tok_per_s"] / ar["decode_tok_per_s"])
    assert "vs_ar_decode" not in rows["self:3@24x3"]  # no AR cell at 24x3 in this run: no ratio
    # fp32 greedy: every sequence equals AR's on the same prompts, per seed (no AR at 24x3: no agreement there)
    for c in ("vanilla:2@24x2", "self:auto4:w6@24x2"):
        assert (rows[c]["agree_seqs"], rows[c]["agree_share"], rows[c]["agree_n"]) == (1.0, 1.0, 4)
    assert "agree_seqs" not in rows["self:3@24x3"]
    recs = [json.loads(line) for f in (tmp_path / "bs").rglob("*.json") for line in [f.read_text()]
            if '"auto": true' in line]
    assert any(r.get("metrics", {}).get("cost_model") for r in recs)
    for bad in ("self:autoX@24x2", "vanilla:2:w8@24x2", "self:2:8@24x2", "self:2:w0@24x2"):
        with pytest.raises(ValueError, match="autoN"):
            BatchBenchConfig(spec=(bad,))


def test_agreement_counts_identical_sequences_and_the_share_before_divergence():
    from mspeckv.bench.batch import agree_with_ar, agreement

    assert agreement([[1, 2, 3, 4], [5, 6, 7, 8]], [[1, 2, 3, 4], [5, 9, 7, 8]]) == (1, (1 + 1 / 4) / 2)
    assert agreement([[1, 2]], [[1, 2, 3, 4]]) == (0, 2 / 4)  # stopped early: shorter is not identical
    with pytest.raises(ValueError):
        agreement([[1]], [[1], [2]])  # a sequence missing

    def rec(method, x, seed, outs, status="ok"):
        return {"method": method, "x": x, "seed": seed, "status": status, "metrics": {"outputs": outs}}

    recs = [rec("ar", "8x2", 0, [[1, 2], [3, 4]]), rec("ar", "8x2", 1, [[5, 6], [7, 8]]),
            rec("spec", "self:2@8x2", 0, [[1, 2], [3, 9]]), rec("spec", "self:2@8x2", 1, [[5, 6], [7, 8]]),
            rec("spec", "self:2@8x2", 2, [[0, 0], [0, 0]]),  # no AR run at seed 2: not paired
            rec("spec", "self:4@8x2", 0, [[1, 2], [3, 4]], status="failed"), rec("spec", "self:2@9x2", 0, [[1, 1]])]
    got = agree_with_ar(recs)
    assert set(got) == {"self:2@8x2"}
    assert got["self:2@8x2"][:2] == (3, 4)
    assert got["self:2@8x2"][2] == pytest.approx(((1 + 0.5) / 2 + 1) / 2)


def test_bench_batch_offload_and_press_cells(tmp_path):
    """Offloaded AR under --gpu-memory (the on-chip layers chosen to fit) and compress-to-fit press cells run and say
    what they ran; a budget that cannot hold the weights refuses the offload cell."""
    from mspeckv.bench.batch import BatchBenchConfig, offload_placement, run
    from mspeckv.model.api import model_config

    cfg = BatchBenchConfig(model="random:tiny", contexts=(24,), batches=(2,), gen_len=4, seeds=2, ragged="",
                           offload=("24x2",), presses=("kivi:group_size=16@24x2", "streaming:budget=8,sinks=2@24x2"),
                           offload_gen_len=3, gpu_memory=2.2, device="cpu", out=str(tmp_path / "bo"))
    rows = {(r["method"], r["cell"]): r for r in run(cfg, "cmd")["rows"]}
    off = rows[("offload", "24x2")]
    assert off["runs"] == 2 and "layers on chip, the rest bf16" in off["engine"] and off["decode_tok_per_s"] > 0
    assert rows[("press", "kivi:group_size=16@24x2")]["runs"] == 2
    assert "PressedKV (streaming:budget=8,sinks=2)" in rows[("press", "streaming:budget=8,sinks=2@24x2")]["engine"]
    with pytest.raises(ValueError, match="cannot hold the weights"):
        offload_placement(model_config("random:qwen2.5-1.5b"), 3_087_428_608, 32, 32896, 2, 4)
    with pytest.raises(ValueError, match="give --gpu-memory"):
        BatchBenchConfig(model="random:tiny", offload=("24x2",))


def test_bench_batch_prompts_from_a_corpus(target, tmp_path):
    """--dataset: each sequence's prompt is real text from the corpus (here the standard library's code), named in
    the record with what its text depends on; a random model has no tokenizer and is refused before loading."""
    from mspeckv.bench.batch import BatchBenchConfig, Bench, run
    from mspeckv.data.corpora import long_prompt

    cfg = BatchBenchConfig(model=target, contexts=(20,), batches=(2,), gen_len=3, seeds=2, ragged="",
                           dataset="pycode", spec=("self:2@20x2",), window=4, device="cpu", out=str(tmp_path / "b"))
    res = run(cfg, "cmd")
    assert {r["method"] for r in res["rows"]} == {"ar", "spec"} and all(r["runs"] == 2 for r in res["rows"])
    recs = [json.loads(f.read_text()) for f in (tmp_path / "b").rglob("*.json")]
    sources = {r["metrics"]["prompts"] for r in recs if r.get("metrics", {}).get("prompts")}
    assert sources and all(s.startswith("corpus pycode (python ") for s in sources)
    b = Bench(cfg)
    ps = b.prompts([20, 20], 1)
    assert ps[1] == long_prompt(b.tok, 20, 1001, "pycode") and ps[0] != ps[1]
    with pytest.raises(ValueError, match="needs a real model's tokenizer"):
        BatchBenchConfig(model="random:tiny", dataset="pycode").validate()


@pytest.mark.parametrize("mode", ["self", "vanilla", "mspeckv"])
def test_prompts_with_speculation_give_each_prompts_greedy_ar_output(target, tmp_path, capsys, mode):
    """generate --prompts --mode self|vanilla: speculation at batch, each line's tokens equal to --mode ar's (greedy,
    the tiny models in fp32), and the acceptance said on stderr; --mode self without --prompts is refused."""
    draft = str(Path(target).parent / "draft")
    f = write(tmp_path, *[json.dumps({"prompt": t}) for t in ("def add(a, b):", "x = [1, 2", "class A:\n  def")])
    common = ["generate", "--model", target, "--prompts", f, "--device", "cpu", "--max-new-tokens", "9", "--greedy",
              "--batch", "2"]
    assert main([*common, "--out", str(tmp_path / "ar.jsonl")]) == 0
    extra = {"self": ["--self-window", "4", "--self-sinks", "1", "--auto-gamma"],
             "vanilla": ["--draft", draft, "--auto-gamma"],
             "mspeckv": ["--draft", draft, "--draft-gamma", "2", "--self-window", "4"]}[mode]
    assert main([*common, "--mode", mode, "--gamma", "3", *extra, "--out", str(tmp_path / "spec.jsonl")]) == 0
    err = capsys.readouterr().err
    if mode == "mspeckv":
        assert "[speculation at batch | mspeckv, γ 3]" in err
    else:
        assert f"[speculation at batch | {mode}, γ ≤ 3]" in err and "cost model, batch 2" in err
    rows = lambda n: [json.loads(x)["tokens"] for x in (tmp_path / n).read_text().splitlines()]
    assert rows("spec.jsonl") == rows("ar.jsonl")
    assert main(["generate", "--model", target, "--prompt", "x", "--mode", "self", "--device", "cpu"]) != 0
    assert "give --prompts FILE.jsonl" in capsys.readouterr().err


def test_bench_batch_waves_keep_the_batch_in_flight_and_label_the_cells(tmp_path):
    """--waves 2: B x 2 prompts through B slots (the KV allocated for B, not 2B), labelled CxB/w2, their
    speculation compared with AR's of the same waves, per sequence."""
    from mspeckv.bench.batch import BatchBenchConfig, run

    kw = dict(model="random:tiny", contexts=(16,), batches=(2,), gen_len=4, seeds=2, ragged="",
              spec=("self:2:w8@16x2",), device="cpu")
    run(BatchBenchConfig(**kw, out=str(tmp_path / "w1")), "cmd")
    two = run(BatchBenchConfig(**kw, waves=2, out=str(tmp_path / "w2")), "cmd")
    assert {r["cell"] for r in two["rows"]} == {"16x2/w2", "self:2:w8@16x2/w2"}
    spec = next(r for r in two["rows"] if r["method"] == "spec")
    assert spec["agree_n"] == 2 * 4 and spec["vs_ar_decode"] is not None and spec["batch"] == 2

    def rec(folder, method):
        return json.loads(next((tmp_path / folder / "runs").glob(f"batch__{method}__*seed0.json")).read_text())

    ar1, ar2 = rec("w1", "ar")["metrics"], rec("w2", "ar")["metrics"]
    assert (ar2["batch"], ar2["sequences"], len(ar2["outputs"])) == (2, 4, 4)
    assert ar2["kv_bytes_allocated"] == ar1["kv_bytes_allocated"]  # 2 slots either way
    assert ar2["outputs"][:2] == ar1["outputs"]  # the first wave is the one-wave run's prompts
    sp = rec("w2", "spec")["metrics"]
    assert (sp["sequences"], sp["total_prompt_tokens"]) == (4, 64)
