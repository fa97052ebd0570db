"""The autoscaler on Ray Serve with simulated engines: replicas follow demand between regions.

A third application (`autoscale`, under /as) is deployed into the session's one
Ray cluster (tests/integration/conftest.py) with `external_scaler_enabled`, a
budget of 3 replicas and fast control constants. Load comes first from
us-east clients, then moves to eu-west clients; the autoscaler (a Serve
deployment running serving.autoscaler.policy) must move a replica from
us-east to eu-west within its reaction time, draining the one it removes, and
no request may fail meanwhile.
"""

from __future__ import annotations

import threading
import time

import httpx
import pytest

pytestmark = pytest.mark.integration

APP, PREFIX = "autoscale", "/as"
ENGINES = {"us-east": "engine-us-east-llama3-8b", "eu-west": "engine-eu-west-llama3-8b"}
# Downs only through a move (move_delay_s) within the test: a plain scale-down waits
# downscale_delay_s, longer than the test, so noise in a 4 s window cannot shrink a pool.
AUTOSCALER = {"interval_s": 1.0, "window_s": 4.0, "budget": 3, "min_replicas": 1, "max_replicas": 2,
              "upscale_cooldown_s": 1.0, "downscale_delay_s": 30.0, "move_delay_s": 2.0, "lead_s": 0.0,
              "replica_cost_ms": 0.5, "hysteresis": 0.1, "slo_ttft_ms": 500, "drain_timeout_s": 15.0}
# Reaction time: a full window of the new demand, the move delay, the drain and Serve
# starting a replica (a few seconds, more on a loaded 2-core runner).
REACTION_S = AUTOSCALER["window_s"] + AUTOSCALER["move_delay_s"] + 3 * AUTOSCALER["interval_s"] + 30.0
CONFIG = {
    "home_region": "us-east",
    "rtt_ms": {"us-east": {"us-east": 1, "eu-west": 80}, "eu-west": {"eu-west": 1}},
    "router": {"policy": "latency", "snapshot_period_s": 0.1},
    "models": [{"name": "llama3-8b", "max_model_len": 8192, "default_max_tokens": 8}],
    "regions": {"us-east": {"replicas": 2, "profile": "llama3-8b-a100"},
                "eu-west": {"replicas": 1, "profile": "llama3-8b-a100"}},
    "autoscaler": AUTOSCALER,
    "serve": {"ingress_max_ongoing_requests": 256, "engine_max_ongoing_requests": 256},
    "budgets": {"ledger_path": None},
}
PROMPT = " ".join(f"w{i}" for i in range(1500))  # unique enough: a prefill the engines pay for


@pytest.fixture(scope="module")
def app(gateway_url):
    from ray import serve

    from deployments.app import build_app

    serve.run(build_app(CONFIG), name=APP, route_prefix=PREFIX, external_scaler_enabled=True)
    url = gateway_url + PREFIX
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/health", timeout=5).json().get("replicas_up") == 3:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    else:
        raise RuntimeError("autoscale app not healthy after 90 s")
    yield url
    serve.delete(APP)


def running() -> dict[str, int]:
    from ray import serve
    deps = serve.status().applications[APP].deployments
    return {r: deps[name].replica_states.get("RUNNING", 0) for r, name in ENGINES.items()}


def autoscaler_status() -> dict:
    from ray import serve
    return serve.get_deployment_handle("autoscaler", APP).status.remote().result(timeout_s=10)


class Load:
    """Closed-loop clients from one region; every status code is kept."""

    def __init__(self, url: str, region: str, threads: int = 3):
        self.url, self.region = url, region
        self.codes: list[int] = []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def _run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=60) as c:
            n = 0
            while not self.stop.is_set():
                n += 1
                try:
                    r = c.post("/v1/completions", headers={"x-client-region": self.region},
                               json={"model": "llama3-8b", "prompt": f"{self.region} {n} {PROMPT}",
                                     "max_tokens": 8})
                    self.codes.append(r.status_code)
                except httpx.HTTPError:
                    self.codes.append(0)

    def __enter__(self) -> "Load":
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=60)


def wait_for(want: dict[str, int]) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < REACTION_S and running() != want:
        time.sleep(0.5)
    return time.monotonic() - t0


def test_replicas_follow_load_from_us_east_to_eu_west_and_nothing_fails(app):
    with Load(app, "us-east") as us:  # demand in us-east: us-east keeps (or gets back) its 2
        us_s = wait_for({"us-east": 2, "eu-west": 1})
        time.sleep(AUTOSCALER["window_s"])
    assert running() == {"us-east": 2, "eu-west": 1}, (us_s, autoscaler_status())
    with Load(app, "eu-west") as eu:  # the load moves: a replica moves with it
        eu_s = wait_for({"us-east": 1, "eu-west": 2})
        time.sleep(2)  # keep the load on across the change
    status = autoscaler_status()
    assert running() == {"us-east": 1, "eu-west": 2}, (eu_s, status)
    assert eu_s < REACTION_S
    print(f"autoscaler reaction: us-east load {us_s:.1f} s, eu-west load {eu_s:.1f} s "
          f"(bound {REACTION_S:.0f} s); requests {len(us.codes) + len(eu.codes)}")
    moves = [e for e in status["events"] if e["pool"] == "us-east/llama3-8b" and e["to"] < e["from"]]
    assert moves and moves[-1]["drained"], status["events"]  # drained before it was stopped
    codes = us.codes + eu.codes
    assert codes and all(c == 200 for c in codes), sorted(set(codes))
    assert len(eu.codes) > 10


def _kill_autoscaler_replica() -> None:
    import ray
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if a["namespace"] == "serve" and a["name"].startswith(f"SERVE_REPLICA::{APP}#autoscaler#")]
    assert len(names) == 1, names
    ray.kill(ray.get_actor(names[0], namespace="serve"), no_restart=True)


def test_a_restarted_autoscaler_resumes_from_serves_targets_and_frees_a_stale_drain(app):
    """Runs after the move above: Serve now holds us-east 1, eu-west 2, not the config's 2 and 1.
    A drain whose controller died is left in the router; the replacement controller must
    start from Serve's targets (not re-plan from the config's counts) and hand that
    replica back to routing."""
    import ray

    from serving.ray.router_actor import router_actor
    assert running() == {"us-east": 1, "eu-west": 2}, "needs the move of the test above"
    router = router_actor(CONFIG)
    eu = [r["replica_id"] for r in ray.get(router.autoscale_view.remote())["replicas"]
          if r["region"] == "eu-west"]
    ray.get(router.drain.remote(eu[:1]))  # as a controller killed mid-drain leaves it
    _kill_autoscaler_replica()
    deadline, status = time.monotonic() + 60, None
    while time.monotonic() < deadline:
        try:
            status = autoscaler_status()
            if not status["events"] and status["last"]:  # the new replica, after its first step
                break
        except Exception:  # the old replica is gone; Serve is starting the new one
            pass
        time.sleep(0.5)
    assert status is not None and not status["events"] and status["last"], status
    assert status["targets"] == {"us-east/llama3-8b": 1, "eu-west/llama3-8b": 2}, status
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        rows = {r["replica_id"]: r for r in ray.get(router.autoscale_view.remote())["replicas"]}
        if not rows[eu[0]]["draining"]:
            break
        time.sleep(0.5)
    assert not rows[eu[0]]["draining"], rows
    assert running() == {"us-east": 1, "eu-west": 2}
    r = httpx.post(app + "/v1/completions", headers={"x-client-region": "eu-west"},
                   json={"model": "llama3-8b", "prompt": "after the restart", "max_tokens": 4}, timeout=30)
    assert r.status_code == 200, r.text
