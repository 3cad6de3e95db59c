"""A Ray Serve deployment of the same app: one replica per GPU (or per CPU process), Ray routing requests between
them. This is how the server scales past one machine; each replica runs its own scheduler (continuous batching).

    import ray
    from ray import serve
    from mspeckv.serve.ray_serve import deployment
    from mspeckv.serve.scheduler import SchedulerConfig

    ray.init()
    serve.run(deployment("qwen2.5-coder-1.5b", SchedulerConfig(max_batch=16, capacity=8192), replicas=2, gpus=1),
              route_prefix="/")
    # the OpenAI API is now at http://127.0.0.1:8000/v1 (Ray's HTTP proxy)

Needs ``pip install "ray[serve]"`` (not a dependency of mspeckv). Tested by ``tests/test_serve_ray.py`` with two CPU
replicas of a tiny model when Ray is installed (skipped otherwise).
"""

from __future__ import annotations

from .app import build_served, create_app
from .scheduler import SchedulerConfig


def deployment(model_ref: str, cfg: SchedulerConfig, replicas: int = 1, gpus: float = 0, device=None,
               name: str | None = None, api_key: str | None = None, placement=None, press=None):
    """A bound Ray Serve application: ``replicas`` copies of the server, each with ``gpus`` GPUs (0: CPU), each
    loading ``model_ref`` when it starts."""
    from ray import serve

    if replicas < 1:
        raise ValueError(f"replicas must be >= 1, got {replicas}")

    @serve.ingress()
    class MSpecKVServer:
        def __init__(self):
            self.served = build_served(model_ref, cfg, device, name, api_key, placement, press)
            self.served.scheduler.start()

        def __serve_build_asgi_app__(self):
            return create_app(self.served)

        def __del__(self):
            self.served.scheduler.stop()

    opts = {"num_gpus": gpus} if gpus else {}
    return serve.deployment(MSpecKVServer, name="mspeckv", num_replicas=replicas, ray_actor_options=opts,
                            max_ongoing_requests=cfg.max_batch + cfg.queue).bind()
