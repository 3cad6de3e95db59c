"""``mspeckv serve``'s app (mspeckv/serve/app.py) live on 127.0.0.1, called by the official openai client and by raw
HTTP: every endpoint and its schema, 64 concurrent streams with cancellations, and each kind of bad request."""

from __future__ import annotations

import asyncio
import json
import random
import threading
import time

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

import torch  # noqa: E402

from mspeckv import cli  # noqa: E402
from mspeckv.config import GenerationConfig  # noqa: E402
from mspeckv.decoding.autoregressive import generate  # noqa: E402
from mspeckv.model.api import load  # noqa: E402
from mspeckv.serve.app import Served, serve_forever  # noqa: E402
from mspeckv.serve.scheduler import Scheduler, SchedulerConfig  # noqa: E402
from tests.tiny import save_tiny_pair  # noqa: E402

CHAT = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"
KEY = "sk-test"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    target, _ = save_tiny_pair(tmp_path_factory.mktemp("tiny"))
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(target)
    tok.chat_template = CHAT
    tok.save_pretrained(target)
    return target


class Live:
    """A server in a thread on a free port; ``stop()`` ends it (bounded)."""

    def __init__(self, model_dir, api_key=None, **cfg):
        self.model, self.tok, _ = load(model_dir, "cpu")
        self.sch = Scheduler(self.model, lambda ids: self.tok.decode(ids, skip_special_tokens=True),
                             SchedulerConfig(**cfg))
        self.served = Served("tiny", self.tok, self.sch, api_key)
        up = threading.Event()

        def ready(server):
            self.server = server
            self.port = server.servers[0].sockets[0].getsockname()[1]
            up.set()

        self.thread = threading.Thread(target=serve_forever, args=(self.served, "127.0.0.1", 0, 2.0, "warning",
                                                                   ready), daemon=True)
        self.thread.start()
        assert up.wait(30), "the server did not start"
        self.url = f"http://127.0.0.1:{self.port}"

    def solo(self, text, n):
        ids = self.tok(text, add_special_tokens=False).input_ids
        out = generate(self.model, torch.tensor([ids]), GenerationConfig(max_new_tokens=n)).tokens[0]
        return self.tok.decode(out, skip_special_tokens=True), len(out)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(30)
        assert not self.thread.is_alive()


@pytest.fixture(scope="module")
def live(model_dir):
    s = Live(model_dir, max_batch=8, capacity=256, queue=64, prefill_chunk=16)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def keyed(model_dir):
    s = Live(model_dir, api_key=KEY, max_batch=1, capacity=512, queue=1, prefill_chunk=64)
    yield s
    s.stop()


def client(url, key="none"):
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=60)


# ------------------------------------------------------------------------------------------------ the openai client
def test_openai_client_every_endpoint(live, model_dir, capsys):
    c = client(live.url)
    models = c.models.list()
    assert [m.id for m in models.data] == ["tiny"] and models.data[0].object == "model"
    assert c.models.retrieve("tiny").id == "tiny"

    prompt = "The quick brown fox"
    want, n = live.solo(prompt, 12)
    r = c.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0)
    assert r.object == "text_completion" and r.choices[0].text == want
    assert r.choices[0].finish_reason in ("stop", "length")
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (len(prompt), n, len(prompt) + n)
    # exactly what `mspeckv generate` prints for that prompt alone
    assert cli.main(["generate", "--model", model_dir, "--prompt", prompt, "--max-new-tokens", "12",
                     "--device", "cpu"]) == 0
    assert capsys.readouterr().out == want + "\n"

    chunks = list(c.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0, stream=True,
                                       stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == want
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == n
    assert chunks[-2].choices[0].finish_reason == r.choices[0].finish_reason

    msgs = [{"role": "user", "content": "Hi there"}]
    chat = c.chat.completions.create(model="tiny", messages=msgs, max_tokens=8, temperature=0, seed=3)
    assert chat.object == "chat.completion" and chat.choices[0].message.role == "assistant"
    ids = live.tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert chat.usage.prompt_tokens == len(ids)
    want_chat = live.tok.decode(generate(live.model, torch.tensor([ids]), GenerationConfig(max_new_tokens=8))
                                .tokens[0], skip_special_tokens=True)
    assert chat.choices[0].message.content == want_chat
    s = list(c.chat.completions.create(model="tiny", messages=msgs, max_tokens=8, temperature=0, stream=True))
    assert s[0].choices[0].delta.role == "assistant" and s[0].object == "chat.completion.chunk"
    assert "".join(x.choices[0].delta.content or "" for x in s) == want_chat
    assert s[-1].choices[0].finish_reason == chat.choices[0].finish_reason

    sampled = [c.completions.create(model="tiny", prompt=prompt, max_tokens=10, temperature=0.9, top_p=0.9, seed=5,
                                    extra_body={"top_k": 20}).choices[0].text for _ in range(2)]
    assert sampled[0] == sampled[1]  # seeded: reproducible

    stop = want[3:5]
    r = c.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0, stop=[stop])
    assert r.choices[0].text == want[:want.find(stop)] and r.choices[0].finish_reason == "stop"

    h = httpx.get(live.url + "/health")
    assert h.status_code == 200 and h.json() == {"status": "ok"}
    m = httpx.get(live.url + "/metrics")
    assert m.status_code == 200 and "text/plain" in m.headers["content-type"]
    for name in ("mspeckv_running_sequences", "mspeckv_queued_requests", "mspeckv_tokens_per_second",
                 "mspeckv_kv_bytes_held", "mspeckv_kv_bytes_allocated", "mspeckv_generated_tokens_total",
                 'mspeckv_kv_report_bytes{key="kv_bytes_allocated"}', 'mspeckv_requests_finished_total{how="stop"}'):
        assert name in m.text
    values = {line.split(" ")[0]: float(line.split(" ")[1]) for line in m.text.splitlines()
              if line and not line.startswith("#")}
    assert values["mspeckv_generated_tokens_total"] >= 6 * 8  # at least the tokens of the requests above
    assert values["mspeckv_prompt_tokens_total"] >= 6 * len(prompt)
    assert values["mspeckv_kv_bytes_allocated"] == live.sch.engine.cache.nbytes() > 0
    assert values["mspeckv_time_to_first_token_seconds_count"] >= 6
    assert values["mspeckv_time_to_first_token_seconds_sum"] > 0


def test_64_concurrent_streams_with_cancellations(live):
    rng = random.Random(0)
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa".split()
    prompts = [" ".join(rng.choice(words) for _ in range(rng.randint(1, 25))) for _ in range(64)]
    want = {p: live.solo(p, 10)[0] for p in set(prompts)}
    cancel = {i for i in range(64) if rng.random() < 0.25}
    c = openai.AsyncOpenAI(base_url=live.url + "/v1", api_key="none", max_retries=0, timeout=60)

    async def one(i, p):
        stream = await c.completions.create(model="tiny", prompt=p, max_tokens=10, temperature=0, stream=True)
        text, finish, n = "", None, 0
        async for ch in stream:
            n += 1
            text += ch.choices[0].text
            finish = ch.choices[0].finish_reason or finish
            if i in cancel and n >= 2:
                await stream.close()
                return i, None, None
        return i, text, finish

    async def main():
        return await asyncio.wait_for(asyncio.gather(*(one(i, p) for i, p in enumerate(prompts))), 80)

    t = time.time()
    out = asyncio.run(main())
    assert time.time() - t < 80
    assert sorted(i for i, _, _ in out) == list(range(64))  # none lost, none duplicated
    done = [(i, text, f) for i, text, f in out if text is not None]
    assert len(done) >= 64 - len(cancel)
    for i, text, finish in done:
        assert text == want[prompts[i]], f"request {i} got another's text or a mixed one"
        assert finish in ("stop", "length")
    t = time.time()
    while live.sch.active and time.time() - t < 10:  # cancelled streams leave their slots
        time.sleep(0.05)
    assert not live.sch.active and live.sch.engine.cache.live_slots() == []
    assert live.sch.stats["finished"]["cancelled"] >= 1  # the server saw clients go away


# ------------------------------------------------------------------------------------------------ bad requests
def post(s, path, body, key=KEY, raw=None):
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    return httpx.post(s.url + path, content=raw if raw is not None else json.dumps(body), headers=headers, timeout=30)


@pytest.mark.parametrize("body,raw,status,param", [
    (None, b"{not json", 400, None),
    ({"model": "gpt-4", "prompt": "hi"}, None, 404, "model"),
    ({"model": "tiny", "prompt": "hi", "max_tokens": 0}, None, 400, "max_tokens"),
    ({"model": "tiny", "prompt": "hi", "max_tokens": -3}, None, 400, "max_tokens"),
    ({"model": "tiny", "prompt": "hi", "max_tokens": 600}, None, 400, "max_tokens"),
    ({"model": "tiny", "prompt": "hi", "temperature": -0.5}, None, 400, "temperature"),
    ({"model": "tiny", "prompt": "hi", "n": 2}, None, 400, "n"),
    ({"model": "tiny", "prompt": "x" * 600}, None, 400, "prompt"),
    ({"model": "tiny", "prompt": "hi", "logprobs": 2}, None, 400, "logprobs"),
    ({"model": "tiny", "prompt": "hi", "stop": 3}, None, 400, "stop"),
    ({"model": "tiny", "prompt": "hi", "stream_options": {"include_usage": True}}, None, 400, "stream_options"),
    ({"model": "tiny", "messages": []}, None, 400, "messages"),
])
def test_bad_requests_get_openai_errors(keyed, body, raw, status, param):
    path = "/v1/chat/completions" if body and "messages" in body else "/v1/completions"
    r = post(keyed, path, body, raw=raw)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and err["type"] and err["param"] == param


def test_api_key_on_every_route_but_health(keyed):
    for path in ("/v1/models", "/metrics"):
        assert httpx.get(keyed.url + path).status_code == 401
        assert httpx.get(keyed.url + path, headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert httpx.get(keyed.url + path, headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    r = post(keyed, "/v1/completions", {"model": "tiny", "prompt": "hi"}, key="wrong")
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(keyed.url + "/health").status_code == 200
    with pytest.raises(openai.AuthenticationError):
        client(keyed.url, "wrong").models.list()


def test_full_queue_gets_429_with_retry_after(keyed):
    """One slot and a queue of one: of 6 requests sent at once, the ones past those two are refused."""
    body = {"model": "tiny", "prompt": "hello", "max_tokens": 200, "temperature": 0}

    async def main():
        async with httpx.AsyncClient(timeout=60, headers={"Authorization": f"Bearer {KEY}"}) as h:
            return await asyncio.gather(*(h.post(keyed.url + "/v1/completions", json=body) for _ in range(6)))

    rs = asyncio.run(asyncio.wait_for(main(), 60))
    codes = sorted(r.status_code for r in rs)
    assert codes.count(429) >= 1 and codes.count(200) >= 2, codes
    r429 = next(r for r in rs if r.status_code == 429)
    assert r429.headers["Retry-After"] and r429.json()["error"]["code"] == "queue_full"
