"""``mspeckv serve``: the OpenAI-compatible server (``mspeckv/serve/``) from the command line. CLI only: every flag is
checked before the weights load."""

from __future__ import annotations

import sys

from .cli_common import add_placement, model_and_placement


def add_serve_parser(sub) -> None:
    p = sub.add_parser("serve", help="an OpenAI-compatible server with continuous batching (AR or speculation)",
                       description="Serve a model over HTTP: /v1/completions, /v1/chat/completions, /v1/models, "
                                   "/health, /metrics. Requests join the running batch between rounds; their prefill "
                                   "is chunked and interleaved with decoding. Needs the serve extra "
                                   "(pip install -e '.[serve]').")
    p.add_argument("--model", default="qwen2.5-coder-1.5b", help="embedded name, HF directory, .gguf file or hub id")
    p.add_argument("--served-model-name", default=None, help="the name clients pass as 'model' (default: --model)")
    p.add_argument("--max-batch", type=int, default=8, help="sequences decoded together (KV slots)")
    p.add_argument("--max-context", type=int, default=None, help="KV rows per slot: a request's prompt + max_tokens "
                   "(default: the model's context, at most 4096)")
    p.add_argument("--prefill-chunk", type=int, default=512, help="prompt tokens per prefill forward, and per round "
                   "while others decode")
    p.add_argument("--no-interleave", action="store_true", help="prefill each joining prompt whole before the next "
                   "decode step (for comparison: running streams stall meanwhile)")
    p.add_argument("--queue", type=int, default=64, help="requests waiting for a slot; more get HTTP 429")
    p.add_argument("--timeout", type=float, default=None, help="seconds a request may take, from its arrival "
                   "(default: none)")
    p.add_argument("--shutdown-timeout", type=float, default=30.0, help="seconds in-flight requests get to finish "
                   "after SIGTERM")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on every route but /health")
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda if available)")
    p.add_argument("--mode", default="ar", choices=["ar", "self", "vanilla", "mspeckv"], help="ar, or speculation "
                   "at batch: self (the model over a StreamingLLM window drafts for itself), vanilla (a --draft "
                   "model), mspeckv (--draft -> the model over its window -> the model over its full KV)")
    p.add_argument("--draft", default=None, help="--mode vanilla, mspeckv: the draft model (same vocabulary)")
    p.add_argument("--draft-gamma", type=int, default=4, help="--mode mspeckv: the draft's tokens per windowed "
                   "verification")
    p.add_argument("--gamma", type=int, default=4, help="speculation: drafted tokens per round (the most with "
                   "--auto-gamma)")
    p.add_argument("--auto-gamma", action="store_true", help="speculation: the cost model picks γ, or AR, per round")
    p.add_argument("--self-window", type=int, default=256, help="--mode self: the newest rows each draft step reads")
    p.add_argument("--self-sinks", type=int, default=4, help="--mode self: the first rows each draft step reads")
    p.add_argument("--draft-window", type=int, default=None, help="--mode vanilla, mspeckv: the draft model's steps "
                   "read --self-sinks + its newest N rows (StreamingLLM over its own KV); default its full KV")
    add_placement(p)
    p.set_defaults(fn=cmd_serve, drafter="model", tp=1, backend="ours")


def check(a):
    """Everything that can be refused before the weights load -> (model config, placement, capacity)."""
    from . import validate as v

    try:
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise ValueError(f"mspeckv serve needs the serve extra ({e.name} is missing): "
                         f"pip install -e '.[serve]'") from None
    v.integer("max_batch", a.max_batch, lo=1)
    v.integer("prefill_chunk", a.prefill_chunk, lo=1)
    v.integer("queue", a.queue, lo=1)
    v.integer("port", a.port, lo=0, hi=65535)
    if a.timeout is not None:
        v.number("timeout", a.timeout, lo=0, lo_open=True)
    v.number("shutdown_timeout", a.shutdown_timeout, lo=0)
    if a.api_key is not None and not a.api_key.strip():
        raise ValueError("--api-key is empty: give a key, or drop the flag to serve without one")
    if not a.host:
        raise ValueError("--host is empty: give an address to bind (127.0.0.1 keeps the server local)")
    if a.press_every is not None:
        raise ValueError("--press-every is not supported by mspeckv serve (the batched engine presses once, after each "
                         "prefill): drop it")
    spec = speculation(a)
    cfg, p = model_and_placement(a)
    if spec is not None and (a.press is not None or a.on_chip is not None):
        raise ValueError(f"--mode {a.mode} runs over the dense batched KV on the GPU: drop --press and --on-chip, or "
                         f"serve with --mode ar")
    if a.mode in ("vanilla", "mspeckv"):
        from .cli_checks import model_config

        dcfg = model_config(a.draft)
        if dcfg.vocab_size != cfg.vocab_size:
            raise ValueError(f"--draft {a.draft} has a vocabulary of {dcfg.vocab_size}, the model {a.model} one of "
                             f"{cfg.vocab_size}; pick a draft from the same model family")
    cap = min(cfg.max_position, 4096) if a.max_context is None else a.max_context
    v.integer("max_context", cap, lo=2)
    if cap > cfg.max_position:
        raise ValueError(f"--max-context {cap} is beyond {a.model}'s context of {cfg.max_position} tokens; give "
                         f"at most {cfg.max_position}")
    return cfg, p, cap, spec


def speculation(a):
    """The BatchSpecConfig of --mode self|vanilla (None for ar); refuses a speculation flag under ar."""
    from .decoding.batch_spec import BatchSpecConfig

    if a.mode == "ar":
        given = [f for f, x, d in (("--draft", a.draft, None), ("--gamma", a.gamma, 4), ("--auto-gamma", a.auto_gamma,
                 False), ("--self-window", a.self_window, 256), ("--self-sinks", a.self_sinks, 4),
                 ("--draft-gamma", a.draft_gamma, 4), ("--draft-window", a.draft_window, None)) if x != d]
        if given:
            raise ValueError(f"{', '.join(given)} would be ignored: they go with --mode self, vanilla or mspeckv")
        return None
    if (a.mode == "self") != (a.draft is None):
        raise ValueError(f"--mode {a.mode} needs --draft MODEL" if a.draft is None else
                         "--draft goes with --mode vanilla or mspeckv only")
    if a.mode == "vanilla" and a.self_window != 256:
        raise ValueError("--self-window would be ignored: it goes with --mode self or mspeckv")
    if a.mode == "vanilla" and a.self_sinks != 4 and a.draft_window is None:
        raise ValueError("--self-sinks would be ignored: it goes with --mode self, mspeckv or --draft-window")
    if a.mode == "self" and a.draft_window is not None:
        raise ValueError("--draft-window would be ignored: --mode self drafts over --self-window")
    if a.mode != "mspeckv" and a.draft_gamma != 4:
        raise ValueError("--draft-gamma would be ignored: it goes with --mode mspeckv")
    return BatchSpecConfig(a.mode, a.gamma, sinks=a.self_sinks, window=a.self_window, auto=a.auto_gamma,
                           draft_gamma=a.draft_gamma, draft_window=a.draft_window, draft_sinks=a.self_sinks)


def cmd_serve(a) -> int:
    from .serve.app import build_served, serve_forever
    from .serve.scheduler import SchedulerConfig

    _, p, cap, spec = check(a)
    cfg = SchedulerConfig(max_batch=a.max_batch, capacity=cap, queue=a.queue, timeout_s=a.timeout,
                          prefill_chunk=a.prefill_chunk, interleave=not a.no_interleave)
    served = build_served(a.model, cfg, a.device, a.served_model_name, a.api_key, p, a.press, spec, a.draft)
    print(f"mspeckv serve: {served.name} on {served.scheduler.model.device}, {a.max_batch} slots of {cap} tokens, "
          f"http://{a.host}:{a.port}/v1", file=sys.stderr, flush=True)
    serve_forever(served, a.host, a.port, a.shutdown_timeout)
    return 0
