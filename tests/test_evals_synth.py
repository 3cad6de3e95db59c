"""Needle/RULER prompt generators and the needle/GSM8K scorers (canned outputs, a character tokenizer)."""

from __future__ import annotations

import pytest

from mspeckv.data.datasets import GSMItem
from mspeckv.evals import gsm8k, synth
from tests.test_sweeps import TEXT
from tests.tiny import char_tokenizer as _tokenizer


@pytest.fixture(scope="module")
def tok_corpus(tmp_path_factory):
    p = tmp_path_factory.mktemp("corpus") / "hay.txt"
    p.write_text(TEXT * 4)
    return _tokenizer(), str(p)


def _find(ids, piece):
    for i in range(len(ids) - len(piece) + 1):
        if ids[i:i + len(piece)] == piece:
            return i
    return -1


@pytest.mark.parametrize("depth", [0.0, 0.3, 0.75, 1.0])
def test_needle_prompt_exact_length_and_depth(tok_corpus, depth):
    tok, corpus = tok_corpus
    p = synth.needle_prompt(tok, 1200, depth, seed=3, n_needles=3, dataset=corpus)
    assert len(p.ids) == 1200 and p.answers[0].isdigit() and len(p.answers[0]) == 7
    text = tok.decode(p.ids)
    assert synth.NEEDLE.format(key=p.info["key"], value=p.answers[0]) in text
    assert text.count("special magic numbers for") == 3 and len(set(p.info["keys"])) == 3
    # the asked needle's span starts at `depth` of the haystack (header excluded, other needles before it removed)
    head = len(tok(synth.HEADER, add_special_tokens=False).input_ids)
    tail = len(tok(synth.NEEDLE_QUESTION.format(key=p.info["key"]), add_special_tokens=False).input_ids)
    start, _ = p.needle_spans[0]
    before = sum(e - s for s, e in p.needle_spans[1:] if s < start)
    hay = 1200 - head - tail - sum(e - s for s, e in p.needle_spans)
    assert (start - head - before) == round(depth * hay)


def test_generators_are_deterministic_from_the_seed(tok_corpus):
    tok, corpus = tok_corpus
    a = synth.needle_prompt(tok, 900, 0.5, seed=1, dataset=corpus)
    assert a.ids == synth.needle_prompt(tok, 900, 0.5, seed=1, dataset=corpus).ids
    assert a.ids != synth.needle_prompt(tok, 900, 0.5, seed=2, dataset=corpus).ids
    v1 = synth.vartrack_prompt(tok, 900, seed=5, hops=3, dataset=corpus)
    assert v1.ids == synth.vartrack_prompt(tok, 900, seed=5, hops=3, dataset=corpus).ids
    assert len(v1.ids) == 900 and len(v1.answers) == 4
    text = tok.decode(v1.ids)
    rt = lambda s: tok.decode(tok(s, add_special_tokens=False).input_ids)  # the test tokenizer has no '='
    value = v1.info["value"]
    assert rt(f"VAR {v1.answers[0]} = {value}") in text
    for prev, cur in zip(v1.answers, v1.answers[1:], strict=False):
        assert rt(f"VAR {cur} = VAR {prev}") in text
        assert text.index(rt(f"VAR {cur} =")) > text.index(rt(f"VAR {prev} ="))  # the chain reads in order
    mk = synth.multikey_prompt(tok, 900, seed=5, n_keys=5, dataset=corpus)
    assert mk.ids == synth.multikey_prompt(tok, 900, seed=5, n_keys=5, dataset=corpus).ids
    assert tok.decode(mk.ids).count("special magic numbers for") == 5
    with pytest.raises(ValueError, match="too short"):
        synth.needle_prompt(tok, 200, 0.5, dataset=corpus)


def test_needle_scorer_on_canned_outputs():
    assert synth.score_needle(" 4821937.", "4821937")
    assert synth.score_needle(" is: 4821937\nQuestion", "4821937")
    assert not synth.score_needle(" 48219370", "4821937")  # 8 digits is not the number
    assert not synth.score_needle(" 1234567 or 4821937", "4821937")  # the first number counts
    assert not synth.score_needle(" I don't know", "4821937")
    assert synth.score_all("ABCDE, FGHIJ and KLMNO", ["ABCDE", "KLMNO"]) == 1.0
    assert synth.score_all("ABCDE", ["ABCDE", "KLMNO"]) == 0.5


def test_gsm8k_format_and_scorer_on_canned_outputs():
    items = [GSMItem(i, f"q{i}?", f"work {i}\n#### {i * 1000}") for i in range(10)]
    evald, shots = gsm8k.split(items, 5)
    assert [s.index for s in shots] == [5, 6, 7, 8, 9] and [e.index for e in evald] == [0, 1, 2, 3, 4]
    p = gsm8k.prompt(evald[2], shots)
    assert p.startswith("Question: q5?\nAnswer: work 5\n#### 5000\n\nQuestion: q6?")
    assert p.endswith("\n\nQuestion: q2?\nAnswer:")
    item = GSMItem(0, "q", "a\n#### 1,234")
    assert gsm8k.gold(item) == "1234"
    ok = gsm8k.score(" 1000 + 234 = 1234\n#### 1,234.\n\nQuestion: next one #### 5", item)
    assert ok["strict"] == "1234" and ok["strict_ok"] and ok["flexible_ok"]
    assert "next one" not in ok["output"]  # cut at the next 'Question:'
    no_hash = gsm8k.score(" the answer is $1,234", item)
    assert no_hash["strict"] is None and not no_hash["strict_ok"] and no_hash["flexible_ok"]
    wrong = gsm8k.score(" #### -12.5", item)
    assert wrong["strict"] == "-12.5" and not wrong["strict_ok"]
    with pytest.raises(ValueError, match="gsm8k-items"):
        gsm8k.split(items, 6)


class _GsmTok:
    """Canned tokenizer for the GSM8K runs below: a prompt -> [the evaluated item's index]; output ids -> that
    number as an answer in the harness format (so every item is answered right)."""

    def __call__(self, text, add_special_tokens=False):
        from types import SimpleNamespace

        return SimpleNamespace(input_ids=[int(text.split("Question: q")[-1].split("?")[0])])

    def decode(self, ids, skip_special_tokens=True):
        return f" #### {ids[0]}"


def test_gsm8k_resumes_an_interrupted_variant_item_by_item(tmp_path, monkeypatch):
    """Each scored item is checkpointed (with its commit); a rerun after an interruption scores only the rest, the
    cell records how many it resumed, and writing the cell removes the checkpoint. Other settings are refused."""
    from types import SimpleNamespace

    from mspeckv.data.datasets import GSMItem
    from mspeckv.evals.runner import FAMILIES, EvalConfig, EvalContext
    from mspeckv.evals.variants import Variant
    from mspeckv.runs.template import CellStore

    items = [GSMItem(i, f"q{i}?", f"work\n#### {i}") for i in range(8)]  # 3 evaluated + 5 shots
    monkeypatch.setattr(gsm8k, "load_gsm8k", lambda: items)
    calls = []

    def fake_greedy(model, v, ids, max_new, chunk, stop=None, graphs=False):
        calls.append(ids[0])
        if len(calls) == 3 and fail[0]:
            raise RuntimeError("interrupted")
        return SimpleNamespace(tokens=[ids[0]])  # the "model" answers the item's own index

    fail = [True]
    monkeypatch.setattr(gsm8k, "greedy", fake_greedy)
    cfg = EvalConfig(model="qwen2.5-coder-0.5b", metrics=("gsm8k",), gsm8k_items=3, output_dir=str(tmp_path))
    store = CellStore(tmp_path)
    ev = EvalContext(cfg, None, _GsmTok(), quiet=True, store=store)
    ev.settings = cfg.settings(next(f for f in FAMILIES if f.name == "gsm8k"))
    with pytest.raises(RuntimeError, match="interrupted"):
        gsm8k.run(ev, [Variant()], 0)
    part = store.partial_path("gsm8k", "full", 0)
    assert part.exists() and len(part.read_text().splitlines()) == 1 + 2  # header + the 2 items scored
    fail[0] = False
    calls.clear()
    res = gsm8k.run(ev, [Variant()], 0)["gsm8k"]["full"]
    assert calls == [2] and res["resumed_items"] == 2 and res["n"] == 3 and res["accuracy"] == 1.0
    assert all("commit" in r for r in res["samples"])
    store.save("gsm8k", "full", 0, res, ev.settings)
    assert not part.exists()
    # a checkpoint made with other settings is refused, with the file named
    store.partial("gsm8k", "x", 0, ev.settings).add({"index": 0})
    with pytest.raises(ValueError, match="other settings"):
        store.partial("gsm8k", "x", 0, {**ev.settings, "gsm8k_max_new": 7})


def test_gsm8k_shards_share_one_checkpoint_and_the_last_writes_the_cell(tmp_path, monkeypatch):
    """--gsm8k-shard K,N: each job scores its share into the shared checkpoint; the job that finds every item there
    returns the variant (the runner writes the cell), the other returns nothing for it. A stray second header line
    (two jobs creating the file at once) is skipped."""
    from dataclasses import replace
    from types import SimpleNamespace

    from mspeckv.data.datasets import GSMItem
    from mspeckv.evals.runner import FAMILIES, EvalConfig, EvalContext
    from mspeckv.evals.variants import Variant
    from mspeckv.runs.template import CellStore

    items = [GSMItem(i, f"q{i}?", f"work\n#### {i}") for i in range(9)]  # 4 evaluated + 5 shots
    monkeypatch.setattr(gsm8k, "load_gsm8k", lambda: items)
    seen = []
    monkeypatch.setattr(gsm8k, "greedy", lambda m, v, ids, *a, **k: seen.append(ids[0]) or
                        SimpleNamespace(tokens=[ids[0]]))

    base = EvalConfig(model="qwen2.5-coder-0.5b", metrics=("gsm8k",), gsm8k_items=4, output_dir=str(tmp_path))
    store = CellStore(tmp_path)
    settings = base.settings(next(f for f in FAMILIES if f.name == "gsm8k"))

    def job(k):
        ev = EvalContext(replace(base, gsm8k_shard=(k, 2)), None, _GsmTok(), quiet=True, store=store)
        ev.settings = settings
        return gsm8k.run(ev, [Variant()], 0)["gsm8k"]

    assert job(0) == {} and seen == [0, 2]  # its share; the cell is not complete yet
    part = store.partial_path("gsm8k", "full", 0)
    part.write_text(part.read_text() + part.read_text().splitlines()[0] + "\n")  # a racing second header
    res = job(1)["full"]
    assert seen == [0, 2, 1, 3] and res["n"] == 4 and res["accuracy"] == 1.0
    assert [r["index"] for r in res["samples"]] == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="--gsm8k-shard"):
        replace(base, gsm8k_shard=(2, 2))


def test_gsm8k_prints_a_line_per_scored_item_with_its_time(tmp_path, monkeypatch, capsys):
    """A long GSM8K job shows every scored item (index, result, tokens, seconds, what is left of its share), and each
    checkpointed row keeps its generated tokens and seconds (to estimate a run's time)."""
    from types import SimpleNamespace

    from mspeckv.evals.runner import FAMILIES, EvalConfig, EvalContext
    from mspeckv.evals.variants import Variant
    from mspeckv.runs.template import CellStore

    items = [GSMItem(i, f"q{i}?", f"work\n#### {i}") for i in range(8)]  # 3 evaluated + 5 shots
    monkeypatch.setattr(gsm8k, "load_gsm8k", lambda: items)
    monkeypatch.setattr(gsm8k, "greedy", lambda m, v, ids, *a, **k: SimpleNamespace(tokens=[ids[0]]))
    cfg = EvalConfig(model="qwen2.5-coder-0.5b", metrics=("gsm8k",), gsm8k_items=3, gsm8k_shard=(0, 2),
                     output_dir=str(tmp_path))
    store = CellStore(tmp_path)
    ev = EvalContext(cfg, None, _GsmTok(), store=store)
    ev.settings = cfg.settings(next(f for f in FAMILIES if f.name == "gsm8k"))
    gsm8k.run(ev, [Variant()], 0)
    err = capsys.readouterr().err
    assert "share 0,2: 2 of its 2 items to score (0/3 in the checkpoint)" in err
    assert "item 0 right (1+1 tokens" in err and "1 left in share 0,2" in err
    assert "item 2 right" in err and "0 left in share 0,2" in err and "item 1 " not in err
    rows = store.partial("gsm8k", "full", 0, ev.settings).rows
    assert [(r["index"], r["new_tokens"]) for r in rows] == [(0, 1), (2, 1)] and all(r["seconds"] >= 0 for r in rows)


def test_checkpoint_survives_a_line_cut_short(tmp_path):
    """A checkpoint line cut short (a job killed mid-write, or read while another job appends) is dropped (its item
    is scored again) instead of failing the variant on every rerun, and the next item starts on a line of its own."""
    from mspeckv.runs.template import Partial

    path = tmp_path / "partial" / "c.jsonl"
    ck = Partial(path, {"a": 1})
    ck.add({"index": 0})
    ck.add({"index": 1})
    path.write_text(path.read_text() + '{"index": 2, "out')  # cut mid-line
    again = Partial(path, {"a": 1})
    assert sorted(r["index"] for r in again.rows) == [0, 1]
    again.add({"index": 2})
    assert sorted(r["index"] for r in Partial(path, {"a": 1}).rows) == [0, 1, 2]
