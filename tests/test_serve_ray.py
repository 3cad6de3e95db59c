"""The Ray Serve deployment (mspeckv/serve/ray_serve.py): two CPU replicas of the tiny model on a local Ray instance,
called by the openai client; every answer equals the prompt's solo greedy output. Skipped where Ray is not installed
(it is not a dependency; CI does not install it)."""

from __future__ import annotations

import socket
import time

import pytest

serve = pytest.importorskip("ray.serve")
openai = pytest.importorskip("openai")

import ray  # noqa: E402
import torch  # noqa: E402

from mspeckv.config import GenerationConfig  # noqa: E402
from mspeckv.decoding.autoregressive import generate  # noqa: E402
from mspeckv.model.api import load  # noqa: E402
from mspeckv.serve.ray_serve import deployment  # noqa: E402
from mspeckv.serve.scheduler import SchedulerConfig  # noqa: E402
from tests.tiny import save_tiny_pair  # noqa: E402


def test_two_replicas(tmp_path):
    target, _ = save_tiny_pair(tmp_path)
    model, tok, _ = load(target, "cpu")
    prompts = [f"prompt number {i} " * (i % 3 + 1) for i in range(8)]
    want = [tok.decode(generate(model, torch.tensor([tok(p, add_special_tokens=False).input_ids]),
                                GenerationConfig(max_new_tokens=8)).tokens[0], skip_special_tokens=True)
            for p in prompts]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        app = deployment(target, SchedulerConfig(max_batch=4, capacity=128, queue=16), replicas=2, device="cpu",
                         name="tiny")
        serve.run(app, route_prefix="/", blocking=False)
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=60)
        t = time.time()
        got = [c.completions.create(model="tiny", prompt=p, max_tokens=8, temperature=0).choices[0].text
               for p in prompts]
        assert got == want
        assert time.time() - t < 120
        status = serve.status().applications["default"].deployments["mspeckv"]
        assert status.replica_states.get("RUNNING") == 2
    finally:
        serve.shutdown()
        ray.shutdown()
