"""Side-by-side apps for the gateway overhead benchmark (serving.bench.gateway).

- `gateway`: the full Proxima app (deployments/app.py) with one zero-delay
  simulated engine (profile `zero`): proxy -> ingress -> router actor ->
  engine deployment -> back.
- `baseline`: the least a Serve app can do to stream the same bytes: proxy ->
  one deployment that writes the given SSE events.

Both run in one Ray session and one Serve proxy, so they share the machine.
"""

from __future__ import annotations

import os
import time
from typing import Any

import ray
from ray import serve
from starlette.requests import Request
from starlette.responses import StreamingResponse

from deployments.app import build_app
from serving.ray.runtime import apply_serve_env

GATEWAY_CONFIG: dict[str, Any] = {
    "home_region": "local",
    "router": {"policy": "latency"},
    "models": [{"name": "zero", "default_max_tokens": 16}],
    "regions": {"local": {"replicas": 1, "profile": "zero", "kv_capacity_tokens": 1_000_000}},
    "serve": {"ingress_max_ongoing_requests": 1024, "engine_max_ongoing_requests": 1024,
              "inject_rtt": False},
    "budgets": {"ledger_path": None},
}


@serve.deployment(max_ongoing_requests=1024, ray_actor_options={"num_cpus": 0})
class Baseline:
    def __init__(self, events: list[bytes]):
        self.events = events

    async def __call__(self, request: Request) -> StreamingResponse:
        await request.body()

        async def gen():
            for e in self.events:
                yield e
        return StreamingResponse(gen(), media_type="text/event-stream")


def start(port: int, direct_channel: bool = True) -> None:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    apply_serve_env()  # the Serve settings production uses, for both apps: Ray's processes inherit them
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, namespace="proxima-bench")
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    config = {**GATEWAY_CONFIG, "router": {**GATEWAY_CONFIG["router"], "direct_channel": direct_channel}}
    serve.run(build_app(config), name="gateway", route_prefix="/")


def deploy_baseline(events: list[bytes]) -> None:
    serve.run(Baseline.bind(events), name="baseline", route_prefix="/baseline")
    time.sleep(1.0)


def stop() -> None:
    try:
        serve.shutdown()
    finally:
        ray.shutdown()
