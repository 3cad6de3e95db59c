"""``mspeckv bench serve``: a load generator of our own, on the official ``openai`` client, against the real server
(the FastAPI app under uvicorn on 127.0.0.1, in this process), at request rates from light to saturating.

The model loads once; for each scheduler setting (prefill interleaved with decoding, and with ``--no-interleave-too``
also without) a server starts on a free port, and for each rate ``--requests`` streaming completions arrive as a
Poisson process (rate 0: all at once, the saturating case). Prompts are token ids of exactly ``--context`` tokens
(random ids, or real text with ``--dataset``), each asking for ``--gen-len`` tokens (``min`` = ``max``: EOS off).

Per request the client records the time to its first token (TTFT), the time per output token after the first
(TPOT), and its end-to-end latency; per rate: throughput (completion tokens over the span from the first request sent
to the last finished), p50/p99 of TTFT and latency, mean TPOT, and failures. The server's own counters (decode steps,
speculation acceptance) come from its scheduler.

Time is the client's wall clock (``time.perf_counter``), what a user of the server sees; nothing here is a device
timing.
"""

from __future__ import annotations

import asyncio
import statistics
import threading
import time
from dataclasses import asdict, dataclass

from .. import validate as v
from ..runs.template import check_fields, opt

MODES = ("ar", "self", "vanilla", "mspeckv")


@dataclass(frozen=True)
class LoadConfig:
    model: str = opt("qwen2.5-coder-1.5b", "embedded name, HF directory, .gguf file or random:<shape>")
    mode: str = opt("ar", "ar, or speculation at batch: self | vanilla | mspeckv", choices=MODES)
    draft: str | None = opt(None, "--mode vanilla, mspeckv: the draft model", check=False)
    draft_gamma: int = opt(4, "--mode mspeckv: the draft's tokens per windowed verification", lo=1)
    gamma: int = opt(4, "speculation: drafted tokens per round", lo=1)
    auto_gamma: bool = opt(False, "speculation: the cost model picks γ, or AR, per round")
    self_window: int = opt(256, "--mode self: the newest rows each draft step reads", lo=1)
    draft_window: int | None = opt(None, "--mode vanilla, mspeckv: the draft model's steps read 4 sinks + its newest "
                                         "N rows; default its full KV")
    max_batch: int = opt(32, "the server's KV slots (sequences decoded together)", lo=1)
    context: int = opt(8192, "prompt tokens per request", lo=1)
    gen_len: int = opt(128, "completion tokens per request (EOS off)", lo=1)
    rates: tuple[float, ...] = opt((0.5, 2.0, 0.0), "request rates per second, Poisson arrivals (0: every request "
                                   "at once, saturating)")
    requests: int = opt(64, "requests per rate", lo=1)
    prefill_chunk: int = opt(2048, "the server's prefill chunk", lo=1)
    no_interleave_too: bool = opt(False, "also run every rate with the prefill not interleaved (--no-interleave)")
    dataset: str | None = opt(None, "prompts from this corpus (a real model's tokenizer); default random token ids",
                              check=False)
    seed: int = opt(0, "arrivals and prompts", lo=0)
    timeout: float = opt(1800.0, "seconds one request may wait on the server (the client's timeout) before it "
                                 "counts as failed", check=False)
    device: str | None = opt(None, "cpu | cuda (default: cuda if available)")
    out: str = opt("results/bench/serve", "output folder")

    def __post_init__(self):
        check_fields(self)
        for r in self.rates:
            v.number("rates", r, lo=0)
        v.number("timeout", self.timeout, lo=0, lo_open=True)
        if (self.mode in ("vanilla", "mspeckv")) != (self.draft is not None):
            raise v.ConfigError("--mode vanilla and mspeckv need --draft MODEL, and --draft goes with them only")
        if self.draft_window is not None and self.draft is None:
            raise v.ConfigError("--draft-window is the draft model's window: it goes with --mode vanilla or mspeckv")

    def validate(self) -> None:
        from ..model.api import model_config
        from ..runs.checks import generation_fits, out_dir

        out_dir("--out", self.out)
        generation_fits(model_config(self.model), self.gen_len, self.context + self.gamma + 1, "--gen-len",
                        "--context")
        if self.dataset is not None:
            from ..data.corpora import load_documents

            if self.model.startswith("random:"):
                raise v.ConfigError(f"--dataset needs a real model's tokenizer; {self.model} has none")
            load_documents(self.dataset)


# ------------------------------------------------------------------------------------------------ the client
async def one_request(client, model: str, prompt: list[int], gen_len: int, delay: float, t0: float) -> dict:
    """Send one streaming completion at ``t0 + delay``; its timings (client wall clock, seconds)."""
    await asyncio.sleep(max(0.0, t0 + delay - time.perf_counter()))
    sent = time.perf_counter()
    arrivals, usage, err = [], None, None
    try:
        stream = await client.completions.create(model=model, prompt=prompt, max_tokens=gen_len, temperature=0,
                                                 stream=True, stream_options={"include_usage": True})
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].text:
                arrivals.append(time.perf_counter())
            if chunk.usage is not None:
                usage = chunk.usage
    except Exception as e:  # a failed request is counted, the run goes on
        err = f"{type(e).__name__}: {e}"
    done = time.perf_counter()
    n = usage.completion_tokens if usage is not None else 0
    return {"sent_s": sent - t0, "done_s": done - t0, "ttft_s": arrivals[0] - sent if arrivals else None,
            "latency_s": done - sent, "completion_tokens": n, "chunks": len(arrivals), "error": err,
            "tpot_s": (arrivals[-1] - arrivals[0]) / (n - 1) if arrivals and n > 1 else None}


async def drive(base_url: str, model: str, prompts: list[list[int]], gen_len: int, delays: list[float],
                timeout: float) -> list[dict]:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=timeout)
    t0 = time.perf_counter()
    try:
        return await asyncio.gather(*(one_request(client, model, p, gen_len, d, t0)  # each bounded by the client's
                                      for p, d in zip(prompts, delays, strict=True)))  # timeout, failing alone
    finally:
        await client.close()


def arrivals(rate: float, n: int, seed: int) -> list[float]:
    """Send times (s) of ``n`` requests: a Poisson process of ``rate`` per second (0: all at 0)."""
    import random

    if rate == 0:
        return [0.0] * n
    rng, t, out = random.Random(seed), 0.0, []
    for _ in range(n):
        out.append(t)
        t += rng.expovariate(rate)
    return out


def pct(xs: list[float], q: float) -> float | None:
    xs = sorted(x for x in xs if x is not None)
    if not xs:
        return None
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


def summarize(reqs: list[dict]) -> dict:
    ok = [r for r in reqs if r["error"] is None]
    span = max((r["done_s"] for r in ok), default=0.0) - min((r["sent_s"] for r in reqs), default=0.0)
    tokens = sum(r["completion_tokens"] for r in ok)
    tpots = [r["tpot_s"] for r in ok if r["tpot_s"] is not None]
    return {"requests": len(reqs), "ok": len(ok), "failed": len(reqs) - len(ok),
            "errors": sorted({r["error"] for r in reqs if r["error"]})[:3], "completion_tokens": tokens,
            "span_s": span, "throughput_tok_per_s": tokens / span if span > 0 else None,
            "ttft_p50_s": pct([r["ttft_s"] for r in ok], 0.5), "ttft_p99_s": pct([r["ttft_s"] for r in ok], 0.99),
            "latency_p50_s": pct([r["latency_s"] for r in ok], 0.5),
            "latency_p99_s": pct([r["latency_s"] for r in ok], 0.99),
            "tpot_mean_s": statistics.fmean(tpots) if tpots else None}


# ------------------------------------------------------------------------------------------------ the server
def start_server(served, ready_timeout: float = 60.0):
    """The app under uvicorn on a free port of 127.0.0.1, in a thread -> (base URL, stop())."""
    import socket

    from .app import serve_forever

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    box, up = {}, threading.Event()

    def ready(server):
        box["server"] = server
        up.set()

    th = threading.Thread(target=serve_forever, args=(served, "127.0.0.1", port, 5.0, "warning", ready), daemon=True)
    th.start()
    if not up.wait(ready_timeout):
        raise RuntimeError(f"the server did not listen on 127.0.0.1:{port} within {ready_timeout:.0f} s")

    def stop():
        box["server"].should_exit = True
        th.join(30)

    return f"http://127.0.0.1:{port}/v1", stop


def run(cfg: LoadConfig, command: str = "") -> dict:
    import torch

    from ..decoding.batch_spec import BatchSpecConfig
    from ..model.api import load_any
    from ..runs.harness import device_name
    from ..runs.store import write_bench
    from .app import Served
    from .scheduler import Scheduler, SchedulerConfig

    cfg.validate()
    t0 = time.perf_counter()
    model, tok, _ = load_any(cfg.model, cfg.device)
    draft = load_any(cfg.draft, cfg.device)[0] if cfg.draft is not None else None
    load_s = time.perf_counter() - t0
    spec = None if cfg.mode == "ar" else BatchSpecConfig(cfg.mode, cfg.gamma, window=cfg.self_window,
                                                         auto=cfg.auto_gamma, draft_gamma=cfg.draft_gamma,
                                                         draft_window=cfg.draft_window)
    if cfg.dataset is not None:
        from ..data.corpora import long_prompt

        prompts = [long_prompt(tok, cfg.context, 1000 * cfg.seed + i, cfg.dataset) for i in range(cfg.requests)]
    else:
        g = torch.Generator().manual_seed(cfg.seed)
        prompts = torch.randint(10, model.cfg.vocab_size - 10, (cfg.requests, cfg.context), generator=g).tolist()
    decode = (lambda ids: tok.decode(ids, skip_special_tokens=True)) if tok is not None else \
        (lambda ids: "".join(f"<{i}>" for i in ids))  # random weights: one visible piece per token
    rows = []
    for interleave in (True, False) if cfg.no_interleave_too else (True,):
        sc = SchedulerConfig(max_batch=cfg.max_batch, capacity=cfg.context + cfg.gen_len, queue=cfg.requests,
                             prefill_chunk=cfg.prefill_chunk, interleave=interleave)
        t1 = time.perf_counter()
        sch = Scheduler(model, decode, sc, spec=spec, draft=draft, eos_ids=[])  # EOS off: every request its gen_len
        served = Served(cfg.model, tok, sch)
        url, stop = start_server(served)
        setup_s = time.perf_counter() - t1
        try:
            for rate in cfg.rates:
                before = sch.snapshot()
                reqs = asyncio.run(drive(url, cfg.model, prompts, cfg.gen_len,
                                         arrivals(rate, cfg.requests, cfg.seed), cfg.timeout))
                after = sch.snapshot()
                drafted = after["spec_drafted"] - before["spec_drafted"]
                rows.append({"interleave": interleave, "rate": rate, "server_setup_s": setup_s, **summarize(reqs),
                             "decode_steps": after["decode_steps"] - before["decode_steps"],
                             "acceptance": (after["spec_accepted"] - before["spec_accepted"]) / drafted
                             if drafted else None, "per_request": reqs})
        finally:
            stop()
    res = {"bench": "serve", "config": asdict(cfg), "rows": rows, "model_load_s": load_s,
           "device_name": device_name(model.device), "client": "own load generator (openai AsyncOpenAI, streaming)",
           "prompts": "random token ids" if cfg.dataset is None else f"corpus {cfg.dataset}"}
    return write_bench(cfg.out, "serve", res, render, command)


def render(res: dict) -> str:
    from ..runs.harness import fmt

    c = res["config"]
    lines = [f"# bench serve: {c['model']} --mode {c['mode']} on {res['device_name']}, {c['requests']} requests of "
             f"{c['context']} + {c['gen_len']} tokens per rate, {c['max_batch']} slots ({res['client']}; "
             f"{res['prompts']})", "",
             "| interleave | rate (req/s; 0 = all at once) | ok | throughput tok/s | TTFT p50 s | TTFT p99 s | TPOT "
             "mean ms | latency p50 s | latency p99 s | acceptance |", "|---|" + "---:|" * 9]
    for r in res["rows"]:
        lines.append(f"| {'yes' if r['interleave'] else 'no'} | {r['rate']:g} | {r['ok']}/{r['requests']} | "
                     f"{fmt(r['throughput_tok_per_s'], '{:.0f}')} | {fmt(r['ttft_p50_s'], '{:.3f}')} | "
                     f"{fmt(r['ttft_p99_s'], '{:.3f}')} | "
                     f"{fmt(None if r['tpot_mean_s'] is None else r['tpot_mean_s'] * 1e3, '{:.2f}')} | "
                     f"{fmt(r['latency_p50_s'], '{:.2f}')} | {fmt(r['latency_p99_s'], '{:.2f}')} | "
                     f"{fmt(r['acceptance'], '{:.2f}')} |")
    return "\n".join(lines) + "\n"


def line(res: dict) -> dict:
    return {"bench": "serve", "device_name": res["device_name"], "rows": [
        {k: r[k] for k in ("interleave", "rate", "ok", "throughput_tok_per_s", "ttft_p99_s", "tpot_mean_s")}
        for r in res["rows"]]}
