"""``mspeckv bench serve`` (mspeckv/serve/load.py): the load generator drives the real server (uvicorn on 127.0.0.1)
with the openai client; every request completes with its token count, the timings are consistent, and bad settings
are refused before anything loads. Bounded: a few requests of a tiny model."""

import json

import pytest

pytest.importorskip("openai")
pytest.importorskip("uvicorn")

from mspeckv.serve.load import LoadConfig, arrivals, pct, run, summarize  # noqa: E402


@pytest.mark.parametrize("mode", ["ar", "self"])
def test_load_generator_against_the_real_server(tmp_path, mode):
    cfg = LoadConfig(model="random:tiny", mode=mode, gamma=2, self_window=8, context=20, gen_len=4, requests=5,
                     rates=(40.0, 0.0), max_batch=2, prefill_chunk=8, no_interleave_too=mode == "ar", device="cpu",
                     timeout=120.0, out=str(tmp_path / "s"))
    res = run(cfg, "cmd")
    assert len(res["rows"]) == (4 if mode == "ar" else 2)
    for r in res["rows"]:
        assert r["ok"] == 5 and r["failed"] == 0 and r["completion_tokens"] == 5 * 4
        assert r["throughput_tok_per_s"] > 0 and r["ttft_p50_s"] <= r["ttft_p99_s"] <= r["latency_p99_s"]
        for q in r["per_request"]:
            assert q["ttft_s"] <= q["latency_s"] and q["completion_tokens"] == 4 and q["chunks"] >= 1
        assert (r["acceptance"] is None) == (mode == "ar")
    assert {r["interleave"] for r in res["rows"]} == ({True, False} if mode == "ar" else {True})
    saved = json.loads((tmp_path / "s" / "serve.json").read_text())
    assert saved["command"] == "cmd" and "meta" in saved and (tmp_path / "s" / "summary.md").exists()


def test_arrivals_and_summaries():
    assert arrivals(0, 3, 1) == [0.0, 0.0, 0.0]
    a = arrivals(10.0, 200, 1)
    assert a == sorted(a) and a[0] == 0 and 10 < a[-1] < 30 and a == arrivals(10.0, 200, 1)  # ~ 20 s, seeded
    assert pct([3, 1, 2, None], 0.5) == 2 and pct([None], 0.5) is None and pct([1, 9], 0.99) == 9
    reqs = [{"sent_s": 0.0, "done_s": 2.0, "ttft_s": 0.5, "latency_s": 2.0, "completion_tokens": 10, "tpot_s": 0.1,
             "error": None, "chunks": 3},
            {"sent_s": 1.0, "done_s": 9.0, "ttft_s": None, "latency_s": 8.0, "completion_tokens": 0, "tpot_s": None,
             "error": "APIError: x", "chunks": 0}]
    s = summarize(reqs)
    assert s["ok"] == 1 and s["failed"] == 1 and s["errors"] == ["APIError: x"]
    assert s["span_s"] == 2.0 and s["throughput_tok_per_s"] == 5.0 and s["tpot_mean_s"] == 0.1


@pytest.mark.parametrize("kw,match", [({"mode": "vanilla"}, "need --draft"), ({"draft": "x"}, "need --draft"),
                                      ({"rates": (-1.0,)}, "rates"), ({"requests": 0}, "requests"),
                                      ({"mode": "fast"}, "mode")])
def test_bad_settings(kw, match):
    with pytest.raises(ValueError, match=match):
        LoadConfig(**kw)


def test_a_request_past_its_timeout_fails_alone(tmp_path):
    """The client's timeout bounds each request: past it the request counts as failed and the run still writes its
    results (nothing hangs, nothing is lost)."""
    cfg = LoadConfig(model="random:tiny", context=20, gen_len=4, requests=3, rates=(0.0,), max_batch=2,
                     prefill_chunk=8, device="cpu", timeout=1e-4, out=str(tmp_path / "t"))
    r = run(cfg, "cmd")["rows"][0]
    assert r["requests"] == 3 and r["ok"] + r["failed"] == 3 and r["failed"] >= 1 and r["errors"]
    assert (tmp_path / "t" / "serve.json").exists()
