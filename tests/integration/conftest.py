"""One Ray session and one deployed gateway for the whole integration tier.

Ray starts once (ray.init with 2 CPUs, no dashboard), Serve listens on
127.0.0.1:8011 (PROXIMA_TEST_PORT), and the app from deployments/app.py is deployed once with the
config below: three regions like deployments/local.yaml, fewer replicas so it
starts fast. Teardown shuts down Serve and this Ray session only.
"""

from __future__ import annotations

import os
import time

import httpx
import pytest

# Serve's proxy binds with SO_REUSEPORT: two test sessions on one port silently share
# its connections (each app then answers the other's requests). Pick another port
# when several sessions run on one machine.
PORT = int(os.environ.get("PROXIMA_TEST_PORT", "8011"))
URL = f"http://127.0.0.1:{PORT}"

CONFIG = {
    "home_region": "us-east",
    "rtt_ms": {"us-east": {"us-east": 1, "eu-west": 80, "ap-south": 190},
               "eu-west": {"eu-west": 1, "ap-south": 120}, "ap-south": {"ap-south": 1}},
    "router": {"policy": "latency", "snapshot_period_s": 0.1},
    "models": [{"name": "llama3-8b", "max_model_len": 8192, "default_max_tokens": 16}],
    "regions": {
        "us-east": {"replicas": 2, "profile": "llama3-8b-h100", "kv_capacity_tokens": 200000},
        "eu-west": {"replicas": 1, "profile": "llama3-8b-h100", "kv_capacity_tokens": 200000},
        "ap-south": {"replicas": 1, "profile": "llama3-8b-h100", "kv_capacity_tokens": 200000},
    },
    "serve": {"ingress_max_ongoing_requests": 256, "engine_max_ongoing_requests": 256},
    "budgets": {"ledger_path": None},  # in memory: tests leave no SQLite files behind
}
ENGINE_REPLICAS = 4


@pytest.fixture(scope="session")
def gateway_url():
    ray = pytest.importorskip("ray")
    from ray import serve

    from deployments.app import build_app

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, namespace="proxima-tests")
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": PORT})
        serve.run(build_app(CONFIG), name="proxima", route_prefix="/")
        deadline = time.monotonic() + 60
        while True:  # every engine has reported to the router
            try:
                h = httpx.get(URL + "/health", timeout=5).json()
                if h.get("replicas_up") == ENGINE_REPLICAS:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"gateway not healthy after 60 s: {h}")
            time.sleep(0.2)
        yield URL
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


@pytest.fixture
def client(gateway_url):
    with httpx.Client(base_url=gateway_url, timeout=30) as c:
        yield c
