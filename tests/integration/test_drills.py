"""Reliability drills under load: soak, replica killed, region outage, router actor restarted.

A third application (`drills`, under /dr) is deployed into the session's one
Ray cluster (tests/integration/conftest.py): two regions of two simulated
engine replicas each. Every drill keeps 16 streaming clients busy while it
injects a real fault (ray.kill of real actors) and then checks every request:
200, every token asked for, usage, [DONE], no in-band error. None may be
lost or fail; the gateway retries before the first token and continues a
stream after it (serving.failover), and waits out a router restart
(serving.ray.router_actor).

The soak runs locust (loadtests/locustfile.py, all user classes) at steady
load for PROXIMA_SOAK_S seconds (60 here; `make soak` runs 600) and checks
no failed request and resident memory growth under 10% for the ingress,
router and engine replica processes between the end of warm-up and the end.
It runs first, on the healthy app; the router restart, the most disruptive,
runs last.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from chaos import Load, RegionOutage, kill_replica, one_stream, process_rss

pytestmark = pytest.mark.integration

APP, PREFIX = "drills", "/dr"
MODEL = "llama3-8b"
REGIONS = ("us-east", "eu-west")
ROOT = Path(__file__).resolve().parents[2]
CONFIG = {
    "home_region": "us-east",
    "rtt_ms": {"us-east": {"us-east": 1, "eu-west": 80}, "eu-west": {"eu-west": 1}},
    "router": {"policy": "latency", "snapshot_period_s": 0.1},
    "models": [{"name": MODEL, "max_model_len": 8192, "default_max_tokens": 16}],
    "regions": {r: {"replicas": 2, "profile": "llama3-8b-h100", "kv_capacity_tokens": 200000} for r in REGIONS},
    "serve": {"ingress_max_ongoing_requests": 256, "engine_max_ongoing_requests": 256, "retry_attempts": 4},
    "budgets": {"ledger_path": None},
}
REPLICAS = 4


def router_stats(url: str) -> dict:
    return httpx.get(url + "/admin/router", timeout=30).json()


def wait_healthy(url: str, timeout_s: float = 90) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            s = router_stats(url)
            if sum(1 for r in s["replicas"].values() if r["routable"]) == REPLICAS:
                return s
        except (httpx.HTTPError, KeyError, ValueError):
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{APP} app not back to {REPLICAS} replicas after {timeout_s} s")
        time.sleep(0.2)


@pytest.fixture(scope="module")
def dr(gateway_url):
    from ray import serve

    from deployments.app import build_app

    serve.run(build_app(CONFIG), name=APP, route_prefix=PREFIX)
    url = gateway_url + PREFIX
    wait_healthy(url)
    yield url
    serve.delete(APP)


def inflight(rep: dict) -> int:
    c = rep.get("counters") or {}
    return max(rep["num_running"], c.get("started", 0) - c.get("finished", 0) - c.get("aborted", 0)
               - c.get("failed", 0) - c.get("misrouted", 0))


def metric(url: str, name: str, **labels: str) -> float:
    """Sum of one counter's samples in the gateway's /metrics that match `labels`."""
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for fam in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=30).text):
        for smp in fam.samples:
            if smp.name == name and all(smp.labels.get(k) == v for k, v in labels.items()):
                total += smp.value
    return total


def router_actor():
    import ray

    from serving.ray.router_actor import NAMESPACE, config_digest

    return ray.get_actor(f"proxima-router-{config_digest(CONFIG)}", namespace=NAMESPACE)


def app_pids() -> dict[str, int]:
    """The drills app's processes: ingress and engine replicas (by Ray's process title), the router."""
    import psutil
    import ray

    pids = {}
    for p in psutil.process_iter(["pid", "cmdline"]):
        title = " ".join(p.info["cmdline"] or ())
        if f"ServeReplica:{APP}:" in title:
            pids[title.split(f"ServeReplica:{APP}:", 1)[1].split()[0] + f"@{p.info['pid']}"] = p.info["pid"]
    pids["router"] = ray.get(router_actor().pid.remote())
    return pids


def test_soak_steady_load_no_errors_no_memory_growth(dr, tmp_path):
    import ray

    duration = int(os.environ.get("PROXIMA_SOAK_S", "60"))
    # Warm-up fills what is bounded but starts empty (KV and prefix LRUs, pools): that is not growth.
    warmup = max(10, min(60, duration // 10))
    prefix = str(tmp_path / "soak")
    env = {**os.environ, "LOADTEST_REGIONS": ",".join(REGIONS), "LOADTEST_MODEL": MODEL}
    cmd = [sys.executable, "-m", "locust", "-f", str(ROOT / "loadtests" / "locustfile.py"), "--headless",
           "-u", "10", "-r", "10", "-t", f"{duration + warmup}s", "--host", dr, "--csv", prefix,
           "--only-summary", "--stop-timeout", "30"]
    pids = app_pids()
    assert sum(1 for k in pids if k.startswith("engine-")) == REPLICAS and any(k.startswith("ingress") for k in pids)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        time.sleep(warmup)
        before = process_rss(pids)
        router_before = ray.get(router_actor().memory.remote())
        series = []  # total RSS of the app's processes, about every 30 s: does it level off?
        while proc.poll() is None and len(series) < duration // 30:
            time.sleep(30)
            series.append(round(sum(process_rss(pids).values()) / 2**20))
        out, _ = proc.communicate(timeout=duration + 120)
    finally:
        proc.kill()
    after = process_rss(pids)
    deadline = time.monotonic() + 10  # the ingress batches its "done" events to the router
    while (router_after := ray.get(router_actor().memory.remote()))["inflight"] and time.monotonic() < deadline:
        time.sleep(0.2)
    rows = {(r["Type"], r["Name"]): r for r in csv.DictReader(open(prefix + "_stats.csv"))}
    total = rows[("", "Aggregated")]
    assert int(total["Request Count"]) > duration, out[-3000:]  # steady traffic, not a trickle
    assert int(total["Failure Count"]) == 0, out[-3000:]
    assert {n for t, n in rows if t == "TTFT"} >= {"agent", "chat", "voice"}
    growth = {k: round(after[k] / before[k] - 1, 4) for k in pids}
    print(f"soak {duration} s: {total['Request Count']} requests, 0 failed; RSS growth {growth}; "
          f"total RSS MiB every 30 s {series}; router before {router_before}, after {router_after}")
    assert router_after["inflight"] == 0 and router_after["index_bookings"] == 0, router_after  # nothing leaked
    assert all(g < 0.10 for g in growth.values()), growth


def test_engine_replica_killed_under_load(dr):
    retried = metric(dr, "proxima_retries_total")
    load = Load(dr, clients=16, max_tokens=120, regions=REGIONS).start()
    killed = []
    try:
        for region in REGIONS:
            time.sleep(1.0)
            deadline = time.monotonic() + 10
            while True:  # the busiest replica of the region, once it has streams in flight
                reps = router_stats(dr)["replicas"]
                busy = max((r for r in reps if reps[r]["region"] == region and reps[r]["routable"]),
                           key=lambda r: inflight(reps[r]))
                if inflight(reps[busy]) > 0 or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            killed.append((busy, inflight(reps[busy])))
            kill_replica(APP, busy, region, MODEL)
        time.sleep(2.0)
    finally:
        outcomes = load.stop()
    assert len(outcomes) >= 30, len(outcomes)
    assert not load.failed(), load.failed()[:5]
    # the kills cut streams that were in flight, and those went on elsewhere
    assert all(n > 0 for _, n in killed) and metric(dr, "proxima_retries_total") > retried, killed
    print(f"replicas killed {killed}: {len(outcomes)} streams, none failed; continuations "
          f"{metric(dr, 'proxima_retries_total', kind='continuation'):.0f}, "
          f"retries {metric(dr, 'proxima_retries_total', kind='retry'):.0f}")
    wait_healthy(dr)  # Serve replaced both; they report to the router again


def test_region_outage_under_load(dr):
    load = Load(dr, clients=16, max_tokens=40, regions=REGIONS).start()
    outage = RegionOutage(APP, "eu-west", MODEL)
    killer = threading.Thread(target=outage.run)
    try:
        time.sleep(1.0)
        killer.start()
        time.sleep(5.0)
        during = len(load.outcomes)
    finally:
        outage.stop = True
        if killer.is_alive():
            killer.join()
        outcomes = load.stop()
    assert outage.kills >= 2
    assert not load.failed(), load.failed()[:5]
    late = [o for o in outcomes[during - 20:during] if o.ok]
    assert late and all(o.region == "us-east" for o in late)  # eu clients moved to the next region
    wait_healthy(dr)  # the region comes back once the outage ends ...
    with httpx.Client(base_url=dr, timeout=60) as c:  # ... and serves its own clients again
        back = [one_stream(c, "after the outage", 8, "eu-west", MODEL) for _ in range(3)]
    assert all(o.ok for o in back) and back[-1].region == "eu-west", back


def test_router_actor_restarted_under_load(dr):
    """The router dies twice: Ray restarts it, then it is killed for good and re-created."""
    import ray

    for no_restart in (False, True):
        old = router_actor()
        old_pid = ray.get(old.pid.remote())
        load = Load(dr, clients=16, max_tokens=30, regions=REGIONS).start()
        try:
            time.sleep(1.5)
            retries0 = router_stats(dr)["router_retries"]
            ray.kill(old, no_restart=no_restart)
            t = time.monotonic()
            while True:  # the new router learns every replica from the engines' own reports
                try:
                    s = router_stats(dr)
                    if s["router_uptime_s"] < time.monotonic() - t + 1 and sum(
                            r["routable"] for r in s["replicas"].values()) == REPLICAS:
                        break
                except (httpx.HTTPError, KeyError, ValueError) as e:
                    s = repr(e)
                assert time.monotonic() - t < 30, f"router view not rebuilt (no_restart={no_restart}): {s}"
                time.sleep(0.1)
            rebuilt_s = time.monotonic() - t
            time.sleep(1.5)
        finally:
            outcomes = load.stop()
        assert ray.get(router_actor().pid.remote()) != old_pid
        assert not load.failed(), (no_restart, load.failed()[:5])
        assert len(outcomes) >= 30
        assert router_stats(dr)["router_retries"] > retries0  # requests met the dead router and were retried
        deadline = time.monotonic() + 10  # the ingress reopens its direct channel to the new router
        while not (chan := router_stats(dr)["router_channel"])["open"] and time.monotonic() < deadline:
            time.sleep(0.2)
        assert chan["open"], chan
        print(f"router killed (no_restart={no_restart}): view rebuilt in {rebuilt_s:.1f} s, "
              f"{len(outcomes)} requests, none failed")
