"""The OpenAI-compatible FastAPI app over a ``Scheduler``: ``/v1/completions``, ``/v1/chat/completions``,
``/v1/models``, ``/health`` and ``/metrics`` (Prometheus text).

Requests take OpenAI's parameters ``model``, ``prompt`` or ``messages``, ``max_tokens``, ``temperature``, ``top_p``,
``seed``, ``stop``, ``stream``, ``stream_options.include_usage`` and ``n`` (1 only), and ``top_k`` as an extension. Any
other field, or a value out of range, gets HTTP 400 with an OpenAI-style error naming the field: nothing is ignored.
A request whose prompt plus ``max_tokens`` cannot fit the model's context or a KV slot gets 400 before it is queued;
a full queue gets 429 with ``Retry-After``; a server shutting down 503. With an API key, every route but ``/health``
needs ``Authorization: Bearer KEY``.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, SummaryMetricFamily

from ..config import SamplingConfig
from .scheduler import Closed, Event, QueueFull, Scheduler
from .scheduler import Request as Job

COMMON = {"model", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stream", "stream_options", "n"}
FIELDS = {"completions": COMMON | {"prompt"}, "chat": COMMON | {"messages"}}
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat defaults to the rest of the slot


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, type_: str = "invalid_request_error",
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code, self.headers = (status, message, param, type_,
                                                                                     code, headers)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(param: str, message: str) -> ApiError:
    return ApiError(400, message, param)


@dataclass
class Served:
    """What the app serves: the model's name, its tokenizer, the running scheduler, the optional API key."""

    name: str
    tokenizer: object
    scheduler: Scheduler
    api_key: str | None = None
    created: int = 0


# ---------------------------------------------------------------------------------------------------- parameters
def number(body: dict, name: str, default, lo=None, hi=None, integer=False):
    x = body.get(name, default)
    if x is None:
        return default
    ok = isinstance(x, int) if integer else isinstance(x, int | float)
    if isinstance(x, bool) or not ok:
        raise bad(name, f"{name} must be {'an integer' if integer else 'a number'}, got {json.dumps(x)}")
    if (lo is not None and x < lo) or (hi is not None and x > hi):
        rng = f">= {lo}" if hi is None else f"between {lo} and {hi}"
        raise bad(name, f"{name} must be {rng}, got {x}")
    return x


def parse_common(body: dict, kind: str, served: Served) -> dict:
    if not isinstance(body, dict):
        raise bad(None, "the request body must be a JSON object")
    extra = sorted(set(body) - FIELDS[kind])
    if extra:
        raise bad(extra[0], f"unsupported parameter: '{extra[0]}' (this server takes "
                            f"{', '.join(sorted(FIELDS[kind]))})")
    if "model" not in body:
        raise bad("model", "missing required parameter: 'model'")
    if body["model"] != served.name:
        raise ApiError(404, f"the model '{body['model']}' does not exist; this server serves '{served.name}'",
                       "model", code="model_not_found")
    n = number(body, "n", 1, integer=True)
    if n != 1:
        raise bad("n", f"n must be 1 (one completion per request), got {n}")
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise bad("stream", f"stream must be a boolean, got {json.dumps(stream)}")
    opts = body.get("stream_options")
    include_usage = False
    if opts is not None:
        if not stream:
            raise bad("stream_options", "stream_options is only allowed with stream: true")
        if not isinstance(opts, dict) or set(opts) - {"include_usage"}:
            raise bad("stream_options", "stream_options takes only {\"include_usage\": true|false}")
        include_usage = opts.get("include_usage", False)
        if not isinstance(include_usage, bool):
            raise bad("stream_options", "stream_options.include_usage must be a boolean")
    temperature = number(body, "temperature", 1.0, lo=0, hi=2)
    top_p = number(body, "top_p", 1.0, lo=0, hi=1)
    if top_p == 0:
        raise bad("top_p", "top_p must be > 0 (1 keeps every token)")
    top_k = number(body, "top_k", 0, lo=0, integer=True)
    seed = number(body, "seed", None, lo=0, integer=True)
    stop = body.get("stop")
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(x, str) and x for x in stop):
        raise bad("stop", "stop must be a non-empty string or a list of at most 4 non-empty strings")
    max_tokens = number(body, "max_tokens", None, lo=1, integer=True)
    if "max_tokens" in body and body["max_tokens"] is not None and max_tokens < 1:
        raise bad("max_tokens", "max_tokens must be >= 1")
    return {"stream": stream, "include_usage": include_usage, "stop": tuple(stop), "max_tokens": max_tokens,
            "sampling": SamplingConfig(temperature=float(temperature), top_k=top_k, top_p=float(top_p), seed=seed)}


def completion_prompt(body: dict, served: Served) -> list[int]:
    p = body.get("prompt")
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], str):
        p = p[0]
    if isinstance(p, str):
        if not p:
            raise bad("prompt", "prompt is empty; give some text")
        return served.tokenizer(p, add_special_tokens=False).input_ids
    if isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
        V = served.scheduler.model.cfg.vocab_size
        if not all(0 <= t < V for t in p):
            raise bad("prompt", f"a token id of the prompt is outside the vocabulary (0..{V - 1})")
        return list(p)
    raise bad("prompt", "prompt must be a string, a list of one string, or a list of token ids")


def chat_prompt(body: dict, served: Served) -> list[int]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise bad("messages", "messages must be a non-empty list of {role, content}")
    clean = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") or set(m) - {"role",
                                                                                                       "content"}:
            raise bad(f"messages[{i}]", "each message is {\"role\": system|user|assistant, \"content\": text}")
        c = m.get("content")
        if isinstance(c, list):  # content parts: text only
            if not all(isinstance(x, dict) and x.get("type") == "text" and isinstance(x.get("text"), str) for x in c):
                raise bad(f"messages[{i}].content", "content parts must be {\"type\": \"text\", \"text\": ...}")
            c = "".join(x["text"] for x in c)
        if not isinstance(c, str):
            raise bad(f"messages[{i}].content", "content must be a string")
        clean.append({"role": m["role"], "content": c})
    tok = served.tokenizer
    if not getattr(tok, "chat_template", None):
        raise bad("messages", f"the model '{served.name}' has no chat template; use /v1/completions")
    return list(tok.apply_chat_template(clean, add_generation_prompt=True, tokenize=True, return_dict=False))


# ---------------------------------------------------------------------------------------------------- responses
def chunk(kind: str, rid: str, served: Served, text: str | None, finish: str | None, first: bool = False) -> dict:
    if kind == "completions":
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        obj = "text_completion"
    else:
        delta = {} if text is None else {"content": text}
        if first:
            delta = {"role": "assistant", "content": text or ""}
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        obj = "chat.completion.chunk"
    return {"id": rid, "object": obj, "created": int(time.time()), "model": served.name, "choices": [choice]}


def final(kind: str, rid: str, served: Served, text: str, finish: str, usage: dict) -> dict:
    if kind == "completions":
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        obj = "text_completion"
    else:
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                  "finish_reason": finish}
        obj = "chat.completion"
    return {"id": rid, "object": obj, "created": int(time.time()), "model": served.name, "choices": [choice],
            "usage": usage}


def event_error(ev: Event) -> ApiError:
    status = {"timeout": 504, "shutdown": 503}.get(ev.code, 500)
    return ApiError(status, ev.error, type_="server_error" if status == 500 else ev.code, code=ev.code)


# ---------------------------------------------------------------------------------------------------- metrics
class Metrics:
    """A prometheus-client collector that reads the scheduler's counts at scrape time."""

    def __init__(self, scheduler: Scheduler):
        self.s = scheduler

    def collect(self):
        st = self.s.snapshot()
        gauges = {"running_sequences": ("requests in a KV slot (prefilling or decoding)", st["running"]),
                  "queued_requests": ("requests waiting for a slot", st["queued"]),
                  "tokens_per_second": ("generated tokens per second over the last 10 s", st["tokens_per_s"]),
                  "kv_bytes_held": ("KV bytes the running sequences hold", st["kv_bytes_held"]),
                  "kv_bytes_allocated": ("KV bytes allocated for every slot", st["kv_bytes_allocated"]),
                  "kv_slots": ("KV slots (--max-batch)", st["slots"]),
                  "kv_slot_capacity_tokens": ("KV rows per slot (--max-context)", st["capacity"])}
        for name, (doc, x) in gauges.items():
            yield GaugeMetricFamily(f"mspeckv_{name}", doc, value=x)
        for name, doc in (("generated_tokens", "tokens generated"), ("prompt_tokens", "prompt tokens prefilled"),
                          ("decode_steps", "batched decode forwards"), ("rounds", "scheduler rounds"),
                          ("spec_rounds", "speculation rounds (0 with --mode ar)"),
                          ("spec_drafted", "draft tokens proposed to running sequences"),
                          ("spec_accepted", "draft tokens the target accepted (over spec_drafted: the acceptance)")):
            yield CounterMetricFamily(f"mspeckv_{name}", doc, value=st[name])
        g = GaugeMetricFamily("mspeckv_kv_report_bytes", "the KV cache's own byte counts (memory_report), by key",
                              labels=["key"])
        for key, x in sorted(st["kv_report"].items()):
            g.add_metric([key], x)
        yield g
        yield SummaryMetricFamily("mspeckv_time_to_first_token_seconds", "arrival to first token (queue + prefill) "
                                  "of the completed requests", count_value=st["ttft_count"], sum_value=st["ttft_sum_s"])
        c = CounterMetricFamily("mspeckv_requests_finished", "requests finished, by how", labels=["how"])
        for how, x in st["finished"].items():
            c.add_metric([how], x)
        yield c


# ---------------------------------------------------------------------------------------------------- the app
def create_app(served: Served) -> FastAPI:
    app = FastAPI(title="mspeckv serve", docs_url=None, redoc_url=None, openapi_url=None)
    registry = CollectorRegistry()
    registry.register(Metrics(served.scheduler))
    served.created = served.created or int(time.time())

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    async def auth(request: Request):
        if served.api_key is None:
            return
        got = request.headers.get("authorization", "")
        if got != f"Bearer {served.api_key}":
            raise ApiError(401, "incorrect or missing API key: send Authorization: Bearer KEY", code="invalid_api_key")

    @app.get("/health")
    async def health():
        if served.scheduler.closing is not None or served.scheduler.stopped:
            return JSONResponse({"status": "shutting down"}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics", dependencies=[Depends(auth)])
    async def metrics():
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    def model_card() -> dict:
        return {"id": served.name, "object": "model", "created": served.created, "owned_by": "mspeckv"}

    @app.get("/v1/models", dependencies=[Depends(auth)])
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}", dependencies=[Depends(auth)])
    async def model(name: str):
        if name != served.name:
            raise ApiError(404, f"the model '{name}' does not exist; this server serves '{served.name}'", "model",
                           code="model_not_found")
        return model_card()

    @app.post("/v1/completions", dependencies=[Depends(auth)])
    async def completions(request: Request):
        return await generate(request, "completions")

    @app.post("/v1/chat/completions", dependencies=[Depends(auth)])
    async def chat(request: Request):
        return await generate(request, "chat")

    async def generate(request: Request, kind: str):
        raw = await request.body()
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise bad(None, f"the request body is not valid JSON ({e})") from None
        p = parse_common(body, kind, served)
        ids = completion_prompt(body, served) if kind == "completions" else chat_prompt(body, served)
        sch = served.scheduler
        max_tokens = p["max_tokens"]
        if max_tokens is None:
            max_tokens = (COMPLETIONS_DEFAULT_MAX_TOKENS if kind == "completions" else
                          max(1, min(sch.cfg.capacity, sch.model.cfg.max_position) - len(ids)))
        try:
            sch.check(len(ids), max_tokens)
        except ValueError as e:
            raise bad("max_tokens" if p["max_tokens"] is not None else ("prompt" if kind == "completions" else
                                                                        "messages"), str(e)) from None
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()

        def emit(ev: Event) -> None:  # from the scheduler's thread
            try:
                loop.call_soon_threadsafe(events.put_nowait, ev)
            except RuntimeError:  # the loop closed: nobody is listening
                pass

        job = Job(ids, max_tokens, p["sampling"], p["stop"], emit)
        try:
            sch.submit(job)
        except QueueFull as e:
            raise ApiError(429, str(e), type_="rate_limit_exceeded", code="queue_full",
                           headers={"Retry-After": "1"}) from None
        except Closed as e:
            raise ApiError(503, str(e), type_="server_error", code="shutdown", headers={"Retry-After": "5"}) from None
        rid = f"{'cmpl' if kind == 'completions' else 'chatcmpl'}-{uuid.uuid4().hex}"
        if p["stream"]:
            return StreamingResponse(stream(kind, rid, job, events, p["include_usage"]),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        try:
            parts = []
            while True:
                try:
                    ev = await asyncio.wait_for(events.get(), 1.0)
                except TimeoutError:
                    if await request.is_disconnected():
                        job.cancel()
                        return Response(status_code=499)
                    continue
                if ev.kind == "text":
                    parts.append(ev.text)
                elif ev.kind == "error":
                    raise event_error(ev)
                else:
                    return final(kind, rid, served, "".join(parts), ev.finish, ev.usage)
        finally:
            job.cancel()  # a no-op once it finished; frees its slot if the handler was cancelled

    async def stream(kind: str, rid: str, job: Job, events: asyncio.Queue, include_usage: bool):
        sse = lambda d: f"data: {json.dumps(d, ensure_ascii=False)}\n\n"  # noqa: E731
        first = kind == "chat"
        try:
            while True:
                ev = await events.get()
                if ev.kind == "text":
                    yield sse(chunk(kind, rid, served, ev.text, None, first))
                    first = False
                elif ev.kind == "error":
                    yield sse(event_error(ev).body())
                    return
                else:
                    if first:
                        yield sse(chunk(kind, rid, served, "", None, True))
                    yield sse(chunk(kind, rid, served, None if kind == "chat" else "", ev.finish))
                    if include_usage:
                        yield sse({**chunk(kind, rid, served, None, None), "choices": [], "usage": ev.usage})
                    yield "data: [DONE]\n\n"
                    return
        finally:
            job.cancel()  # the client went away (the response task was cancelled) or the stream ended

    return app


# ---------------------------------------------------------------------------------------------------- running it
def build_served(model_ref: str, cfg, device=None, name: str | None = None, api_key: str | None = None,
                 placement=None, press=None, spec=None, draft_ref: str | None = None) -> Served:
    """Load ``model_ref`` and its tokenizer, allocate the batched KV (``cfg.max_batch`` slots of ``cfg.capacity``
    rows; placed or pressed per sequence with ``placement``/``press``) and build the scheduler (not started). With
    ``spec`` (a ``BatchSpecConfig``) the scheduler runs speculation at batch, drafting with ``draft_ref``
    (vanilla) or the model itself over a window (self)."""
    from ..decoding.batch import batch_cache
    from ..model.api import load

    model, tok, _ = load(model_ref, device)
    draft = None
    if spec is not None and spec.mode != "self":
        from ..decoding.speculative import check_pair

        draft, dtok, _ = load(draft_ref, device)
        check_pair(model, draft, tok, dtok)
    cache = None if spec is not None else batch_cache(model, cfg.max_batch, cfg.capacity, placement, press)
    sch = Scheduler(model, lambda ids: tok.decode(ids, skip_special_tokens=True), cfg, cache=cache, spec=spec,
                    draft=draft)
    return Served(name or model_ref, tok, sch, api_key)


def serve_forever(served: Served, host: str = "127.0.0.1", port: int = 8000, grace_s: float = 30.0,
                  log_level: str = "info", ready=None) -> None:
    """Run the app under uvicorn until SIGTERM or SIGINT, then shut down gracefully: the scheduler takes no new
    request (503), the requests in flight finish within ``grace_s`` seconds (those still running then get an error
    event), the connections close, and the scheduler's thread ends. ``ready(server)`` is called once listening."""
    import signal
    import threading

    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            served.scheduler.close(grace_s)
            super().handle_exit(sig, frame)

        async def startup(self, sockets=None):
            await super().startup(sockets)
            if ready is not None:
                ready(self)

    config = uvicorn.Config(create_app(served), host=host, port=port, log_level=log_level, access_log=False,
                            timeout_graceful_shutdown=grace_s + 5, lifespan="off")
    server = Server(config)
    main = threading.current_thread() is threading.main_thread()
    if main:  # uvicorn re-raises the signal it caught once it has shut down: let that end the run quietly
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: None)
    served.scheduler.start()
    try:
        server.run()
    finally:
        served.scheduler.stop()
