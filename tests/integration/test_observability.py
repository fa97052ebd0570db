"""Observability through the real Serve app: fleet /metrics, session steps, the telemetry actor."""

from __future__ import annotations

import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.conftest import CONFIG, ENGINE_REPLICAS

pytestmark = pytest.mark.integration
TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
TP = f"00-{TRACE}-00f067aa0ba902b7-01"


def _samples(text: str) -> dict[str, list[tuple[dict, float]]]:
    out: dict[str, list] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def test_session_steps_and_fleet_metrics_through_serve(client):
    sid = f"agent-{time.monotonic_ns()}"
    replicas = []
    for step in ("1", "2"):
        r = client.post("/v1/chat/completions", headers={"x-session-id": sid, "x-agent-step": step,
                                                          "traceparent": TP, "x-client-region": "eu-west"},
                        json={"model": "llama3-8b", "max_tokens": 2,
                              "messages": [{"role": "user", "content": "observe me " * 50}]})
        assert r.status_code == 200
        replicas.append(r.headers["x-proxima-replica"])
    body = client.get(f"/v1/sessions/{sid}/steps").json()
    assert [s["step"] for s in body["data"]] == ["1", "2"]
    for s, replica in zip(body["data"], replicas):
        assert s["routing"]["replica"] == replica and s["trace_id"] == TRACE
        assert s["routing"]["reason"] and s["completion_tokens"] == 2 and s["status"] == "ok"
    assert client.get("/v1/sessions/nobody/steps").status_code == 404

    s = _samples(client.get("/metrics").text)
    ok = [v for lab, v in s["proxima_requests_total"]
          if lab["status"] == "200" and lab["tenant"] == "default" and lab["model"] == "llama3-8b"]
    assert sum(ok) >= 2
    # fleet gauges: every engine replica of every region, not this ingress replica's slice
    routable = {lab["region"]: v for lab, v in s["proxima_replicas"] if lab["state"] == "routable"}
    want = {name: r["replicas"] for name, r in CONFIG["regions"].items()}
    assert routable == want and sum(routable.values()) == ENGINE_REPLICAS
    assert len({lab["replica"] for lab, _ in s["proxima_replica_queue_depth"]}) == ENGINE_REPLICAS
    assert sum(v for _, v in s["proxima_ttft_observed_seconds_count"]) >= 2
    assert sum(v for _, v in s["proxima_ingress_replicas"]) >= 1


def test_telemetry_actor_sums_every_ingress_replicas_snapshot(gateway_url):
    import ray

    from serving.ingress.metrics import GatewayMetrics
    from serving.ray.telemetry import telemetry_actor

    a, b = GatewayMetrics(), GatewayMetrics()
    a.requests.labels("/v1/completions", "200", "t", "m", "r").inc(3)
    b.requests.labels("/v1/completions", "200", "t", "m", "r").inc(4)
    b.ttft.labels("r", "m", "t").observe(0.2)
    actor = telemetry_actor(f"proxima-telemetry-test-{time.monotonic_ns()}", 10, 4)
    try:
        ray.get(actor.push.remote("replica-b", b.snapshot(), [("t", "s", {"x": 1})]))
        fams, n = ray.get(actor.merged.remote("replica-a", a.snapshot(), []))
        a.requests.labels("/v1/completions", "200", "t", "m", "r").inc()  # a's next push replaces, not adds
        fams, n = ray.get(actor.merged.remote("replica-a", a.snapshot(), []))
        got = {(f[0], s[0]): s[2] for f in fams for s in f[3] if s[0].endswith(("_total", "_count"))}
        assert n == 2
        assert got[("proxima_requests", "proxima_requests_total")] == 8
        assert got[("proxima_ttft_seconds", "proxima_ttft_seconds_count")] == 1
        assert ray.get(actor.steps.remote("t", "s", []))["data"] == [{"x": 1, "n": 1}]
        assert ray.get(actor.steps.remote("other-tenant", "s", [])) is None
    finally:
        ray.kill(actor)


def test_a_stopping_replica_hands_over_its_steps_and_an_absent_actor_costs_bounded_memory(gateway_url):
    import asyncio

    import ray
    from ray.exceptions import RayError

    from serving.ingress.metrics import GatewayMetrics
    from serving.ray.telemetry import RayTelemetry, telemetry_actor

    async def run():
        m = GatewayMetrics()
        m.requests.labels("/v1/completions", "200", "t", "m", "r").inc(2)
        actor = telemetry_actor(f"proxima-telemetry-test-{time.monotonic_ns()}", 10, 8)
        tel = RayTelemetry(actor, "replica-a", m, push_s=60, flush_s=60, max_buffered=5)
        tel.seen_request()
        for i in range(3):
            tel.record_step("t", "s", {"i": i})
        await tel.aclose(5)  # the replica stops before its next flush: the steps go now
        steps = await actor.steps.remote("t", "s", [])
        fams, n = await actor.merged.remote("replica-b", GatewayMetrics().snapshot(), [])
        ray.kill(actor, no_restart=True)  # gone for good (ray.kill returns before it is)
        deadline = time.monotonic() + 10
        while True:
            try:
                await actor.steps.remote("t", "s", [])
            except RayError:
                break
            assert time.monotonic() < deadline, "the killed telemetry actor still answers"
            await asyncio.sleep(0.05)
        tel = RayTelemetry(actor, "replica-a", m, push_s=60, flush_s=60, max_buffered=5)
        for i in range(8):
            tel.record_step("t", "s", {"i": i})
        own = m.snapshot()
        got, parts = await tel.merged(own)  # this replica's slice; the steps are kept, within the bound
        kept = [rec["i"] for _, _, rec in tel._steps]
        return steps, fams, n, got, parts, kept, own

    steps, fams, n, got, parts, kept, own = asyncio.run(run())
    assert [x["i"] for x in steps["data"]] == [0, 1, 2]
    assert n == 2 and any(s[2] == 2 for f in fams for s in f[3] if s[0] == "proxima_requests_total")
    assert parts == 1 and got == [own]
    assert kept == [3, 4, 5, 6, 7]  # the oldest dropped first


def test_grafana_dashboard_queries_only_what_the_serve_app_exports(client):
    import json
    from pathlib import Path

    from serving.observability.dashboard import check

    dash = json.loads((Path(__file__).resolve().parents[2] / "infra/grafana/proxima-dashboard.json").read_text())
    r = client.post("/v1/chat/completions", json={"model": "llama3-8b", "max_tokens": 1,
                                                  "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 200
    res = check(dash, client.get("/metrics").text)
    assert res["missing"] == [] and res["without_query"] == [] and res["ok"]


def test_telemetry_actor_restart_loses_no_counter_and_keeps_recording(client):
    import ray

    from serving.ray.router_actor import config_digest
    from serving.ray.telemetry import NAMESPACE

    body = {"model": "llama3-8b", "max_tokens": 1, "messages": [{"role": "user", "content": "hi"}]}
    assert client.post("/v1/chat/completions", json=body).status_code == 200

    def ok_total() -> float:
        s = _samples(client.get("/metrics").text)
        return sum(v for lab, v in s["proxima_requests_total"] if lab["status"] == "200")

    before = ok_total()
    actor = ray.get_actor(f"proxima-telemetry-{config_digest(CONFIG)}", namespace=NAMESPACE)
    ray.kill(actor, no_restart=False)  # Ray restarts it empty
    deadline = time.monotonic() + 30
    while True:  # /metrics answers throughout; the scrape's own push makes the sum whole again
        r = client.get("/metrics")
        assert r.status_code == 200
        if ok_total() >= before:
            break
        assert time.monotonic() < deadline, "counters did not come back after the restart"
        time.sleep(0.5)
    sid = f"after-restart-{time.monotonic_ns()}"
    assert client.post("/v1/chat/completions", json=body, headers={"x-session-id": sid}).status_code == 200
    steps = client.get(f"/v1/sessions/{sid}/steps")
    assert steps.status_code == 200 and steps.json()["total_steps"] == 1
