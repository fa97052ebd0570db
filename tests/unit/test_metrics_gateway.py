"""The gateway's /metrics through the in-process app: every family the issue names, with exact values."""

import pytest

from obs_helpers import ACME, CONFIG, FrozenRouter, build, chat, samples, value
from serving.ingress.local import LocalRouter
from serving.ingress.metrics import GatewayMetrics
from serving.observability.fleet import exposition, merge

CHAT = "/v1/chat/completions"


async def metrics(c) -> str:
    r = await c.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return r.text


async def test_requests_and_errors_by_route_status_tenant_model_region():
    c, _, _ = build()
    assert (await c.post(CHAT, json=chat(), headers={**ACME, "x-client-region": "eu"})).status_code == 200
    assert (await c.post(CHAT, json=chat())).status_code == 401  # no key: tenant unknown
    assert (await c.post(CHAT, content=b"{", headers=ACME)).status_code == 400
    assert (await c.post(CHAT, json=chat(model="made-up-model-x1"), headers=ACME)).status_code == 404
    t = await metrics(c)
    s = samples(t)
    req = "proxima_requests_total"
    assert s[(req, (("model", "m"), ("region", "eu"), ("route", CHAT), ("status", "200"),
                    ("tenant", "acme")))] == 1
    assert s[(req, (("model", ""), ("region", ""), ("route", CHAT), ("status", "401"), ("tenant", "")))] == 1
    assert value(t, req, status="400", tenant="acme", model="") == 1
    assert value(t, req, status="404", tenant="acme", model="") == 1  # never the client's raw model name
    assert "made-up-model-x1" not in t
    err = "proxima_errors_total"
    assert value(t, err, status="401", type="invalid_api_key", phase="response") == 1
    assert value(t, err, status="404", type="model_not_found", tenant="acme") == 1
    assert value(t, err, status="400", type="invalid_request_error", tenant="acme") == 1
    assert value(t, err) == 3


async def test_ttft_counts_from_the_requests_arrival_admission_included():
    """Found by a review: a stalled ledger made the client wait 2 s for its first token while the
    TTFT histogram and the step record said 12 ms (the clock started after admission)."""
    import asyncio
    c, _, gw = build()
    admit = gw.admission.admit

    async def slow_admit(job):
        await asyncio.sleep(0.3)
        return await admit(job)

    gw.admission.admit = slow_admit
    r = await c.post(CHAT, json=chat(max_tokens=2), headers={**ACME, "x-session-id": "slow"})
    assert r.status_code == 200
    t = await metrics(c)
    assert value(t, "proxima_ttft_seconds_sum", tenant="acme") >= 0.3
    assert value(t, "proxima_ttft_seconds_bucket", tenant="acme", le="0.25") == 0
    assert value(t, "proxima_e2e_seconds_sum", tenant="acme") >= 0.3
    assert value(t, "proxima_ttft_observed_seconds_sum") < 0.3  # from the routing decision: the router's own
    step = (await c.get("/v1/sessions/slow/steps", headers=ACME)).json()["data"][0]
    assert step["ttft_ms"] >= 300 and step["e2e_ms"] >= step["ttft_ms"]


async def test_ttft_tpot_e2e_and_predicted_versus_observed_ttft():
    c, _, _ = build()
    r = await c.post(CHAT, json=chat(max_tokens=4), headers=ACME)
    predicted_s = float(r.headers["x-proxima-predicted-ttft-ms"]) / 1000
    t = await metrics(c)
    lab = {"region": "us", "model": "m"}
    for name in ("proxima_ttft_seconds_count", "proxima_tpot_seconds_count", "proxima_e2e_seconds_count"):
        assert value(t, name, tenant="acme", **lab) == 1, name
    assert value(t, "proxima_ttft_predicted_seconds_sum", **lab) == pytest.approx(predicted_s, abs=1e-3)
    observed = value(t, "proxima_ttft_observed_seconds_sum", **lab)
    assert 0 < observed <= value(t, "proxima_ttft_seconds_sum", **lab)  # routing is inside the gateway TTFT
    assert value(t, "proxima_ttft_prediction_error_seconds_count", **lab) == 1
    # the error histogram has the observed-minus-predicted sample in the right bucket
    err = observed - predicted_s
    bucket = value(t, "proxima_ttft_prediction_error_seconds_bucket", le="0.0", **lab)
    assert bucket == (1 if err <= 0 else 0)
    assert value(t, "proxima_routing_decision_seconds_count") == 1
    assert value(t, "proxima_prompt_tokens_total", tenant="acme", **lab) == 4
    assert value(t, "proxima_completion_tokens_total", tenant="acme", **lab) == 4


async def test_cache_hits_as_predicted_and_as_the_engine_reports_them():
    c, _, gw = build()
    prompt = " ".join(f"w{i}" for i in range(400))
    r1 = await c.post(CHAT, json=chat(prompt, max_tokens=2), headers=ACME)
    r2 = await c.post(CHAT, json=chat(prompt, max_tokens=2), headers=ACME)
    assert r1.headers["x-proxima-replica"] == r2.headers["x-proxima-replica"]
    engine_cached = r2.json()["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert engine_cached > 0
    t = await metrics(c)
    assert value(t, "proxima_cached_tokens_total", source="engine") == engine_cached
    assert value(t, "proxima_cached_tokens_total", source="predicted") > 0
    replica = r2.headers["x-proxima-replica"]
    assert value(t, "proxima_engine_prefix_cache_hits_total", replica=replica) == engine_cached
    assert value(t, "proxima_engine_prefix_cache_queries_total", replica=replica) >= 2 * 400


async def test_retries_and_cross_region_failovers():
    c, engines, _ = build(router_cls=FrozenRouter)
    engines["us-0"].kill()
    engines["us-1"].kill()  # the frozen view still offers both
    r = await c.post(CHAT, json=chat(), headers=ACME)
    assert r.status_code == 200 and r.headers["x-proxima-region"] == "eu"
    t = await metrics(c)
    assert value(t, "proxima_retries_total", model="m", kind="retry") == 2
    assert value(t, "proxima_retries_total", kind="continuation") == 0
    assert value(t, "proxima_failovers_total", from_region="us", to_region="eu") == 1


async def test_an_error_after_the_first_token_is_counted_in_band():
    cfg = dict(CONFIG, serve={"inject_rtt": False, "retry_attempts": 1})
    c, engines, _ = build(cfg, router_cls=FrozenRouter)
    for e in engines.values():
        e.crash_after = 2
    r = await c.post(CHAT, json=chat(max_tokens=64, stream=True), headers=ACME)
    assert r.status_code == 200
    events = [line for line in r.text.splitlines() if line.startswith("data: ")]
    assert '"error"' in events[-2] and events[-1] == "data: [DONE]"
    t = await metrics(c)
    assert value(t, "proxima_errors_total", phase="stream", status="502", type="engine_error",
                 tenant="acme", model="m") == 1
    assert value(t, "proxima_requests_total", status="200", tenant="acme") == 1


async def test_budget_charged_and_the_ledgers_gauges():
    c, _, _ = build()
    r = await c.post(CHAT, json=chat(max_tokens=3), headers=ACME)
    u = r.json()["usage"]
    t = await metrics(c)
    charged = u["prompt_tokens"] + u["completion_tokens"]
    assert value(t, "proxima_budget_charged_tokens_total", tenant="acme") == charged
    assert value(t, "proxima_budget_used_tokens", tenant="acme", budget="tokens_per_day") == charged
    assert value(t, "proxima_budget_limit_tokens", tenant="acme") == 100000
    assert value(t, "proxima_budget_limit_tokens", tenant="globex") == 30
    assert value(t, "proxima_budget_reserved_tokens", tenant="acme") == 0


async def test_fleet_gauges_replicas_per_region_and_queue_depth_per_replica():
    c, _, gw = build()
    gw.router.set_circuit("us-1", True)
    t = await metrics(c)
    assert value(t, "proxima_replicas", region="us", state="routable") == 1
    assert value(t, "proxima_replicas", region="us", state="circuit_open") == 1
    assert value(t, "proxima_replicas", region="eu", state="routable") == 1
    s = samples(t)
    depth = {dict(lab)["replica"] for (n, lab) in s if n == "proxima_replica_queue_depth"}
    assert depth == {"us-0", "us-1", "eu-0"}
    assert value(t, "proxima_ingress_replicas") == 1 and value(t, "proxima_router_inflight") == 0


async def test_merge_sums_every_replicas_counters_and_histograms():
    (a, _, ga), (b, _, gb) = build(), build()
    for _ in range(2):
        await a.post(CHAT, json=chat(), headers=ACME)
    await b.post(CHAT, json=chat(), headers=ACME)
    await b.post(CHAT, content=b"{", headers=ACME)
    merged = exposition(merge([ga.metrics.snapshot(), gb.metrics.snapshot()])).decode()
    assert value(merged, "proxima_requests_total", status="200") == 3
    assert value(merged, "proxima_requests_total", status="400") == 1
    assert value(merged, "proxima_ttft_seconds_count") == 3
    assert value(merged, "proxima_ttft_seconds_bucket", le="+Inf") == 3
    one = exposition(merge([ga.metrics.snapshot()])).decode()
    assert value(one, "proxima_ttft_seconds_sum") == pytest.approx(
        value(ga.metrics.render().decode(), "proxima_ttft_seconds_sum"))
    assert "_created" not in merged


def test_a_fresh_registry_renders_every_family_with_help_and_type():
    text = exposition(merge([GatewayMetrics().snapshot()])).decode()
    for fam in ("proxima_requests_total", "proxima_errors_total", "proxima_ttft_seconds",
                "proxima_tpot_seconds", "proxima_e2e_seconds", "proxima_retries_total",
                "proxima_failovers_total", "proxima_budget_charged_tokens_total"):
        assert f"# TYPE {fam} " in text, fam


class StatsDown(LocalRouter):
    """Routes, but its stats call fails, as an actor restarting between the two would."""

    async def stats(self):
        raise ConnectionError("router restarting")


async def test_metrics_still_answer_when_the_router_is_unreachable():
    c, _, _ = build(router_cls=StatsDown)
    await c.post(CHAT, json=chat(), headers=ACME)
    t = await metrics(c)
    assert value(t, "proxima_requests_total", status="200") == 1
    assert "# TYPE proxima_replicas gauge" in t and value(t, "proxima_replicas") == 0


class StatsStalled(LocalRouter):
    """Routes, but its stats call never answers, as an actor that is stopped (SIGSTOP) or stuck."""

    async def stats(self):
        import asyncio
        await asyncio.Event().wait()


async def test_metrics_and_health_answer_in_time_when_the_router_or_ledger_stalls(monkeypatch):
    """Found by a review: a stalled router (or budget ledger) held /metrics and /health with no
    timeout, so the scrape timed out and the counters were lost too."""
    import asyncio
    import time

    import serving.ingress.app as app_mod
    from serving.observability import fleet

    monkeypatch.setattr(fleet, "PART_TIMEOUT_S", 0.2)
    monkeypatch.setattr(app_mod, "PART_TIMEOUT_S", 0.2)
    c, _, gw = build(router_cls=StatsStalled)
    assert (await c.post(CHAT, json=chat(), headers=ACME)).status_code == 200
    ledger = gw.admission.ledger

    async def stalled(tenant):
        await asyncio.Event().wait()

    monkeypatch.setattr(ledger, "remaining", stalled)
    t0 = time.perf_counter()
    t = await metrics(c)
    assert time.perf_counter() - t0 < 2
    assert value(t, "proxima_requests_total", status="200") == 1  # the counters still come
    assert "# TYPE proxima_replicas gauge" in t and "# TYPE proxima_budget_used_tokens gauge" in t
    r = await c.get("/health")
    assert r.status_code == 503 and r.json()["router"] == "unavailable"


async def test_labels_name_served_models_and_the_callers_tenant_on_every_route():
    """Found by a review: /tokenize and /detokenize labelled their series with the client's model
    string (a new series per call), and authenticated routes counted tenant=""."""
    c, _, _ = build()
    for i in range(3):
        await c.post("/tokenize", json={"model": f"rand-{i}", "prompt": "x"}, headers=ACME)
    await c.post("/detokenize", json={"model": "x" * 5000, "tokens": [1]}, headers=ACME)
    assert (await c.post("/tokenize", json={"model": "m", "prompt": "x"}, headers=ACME)).status_code == 200
    assert (await c.get("/v1/models/nope", headers=ACME)).status_code == 404
    assert (await c.get("/v1/models/m", headers=ACME)).status_code == 200
    assert (await c.get("/v1/models", headers=ACME)).status_code == 200
    assert (await c.get("/v1/sessions/s/steps", headers=ACME)).status_code == 404
    t = await metrics(c)
    assert "rand-" not in t and "xxxx" not in t
    req = "proxima_requests_total"
    assert value(t, req, route="/tokenize", tenant="acme", model="", status="404") == 3
    assert value(t, req, route="/tokenize", tenant="acme", model="m", status="200") == 1
    assert value(t, req, route="/detokenize", tenant="acme", model="") == 1
    assert value(t, req, tenant="") == 0  # every one of these was authenticated


async def test_a_region_the_router_has_no_replica_of_reads_zero_routable():
    """Found by a review: when a region's engines all died, its series vanished (no `down`, no 0),
    so an alert on routable == 0 could never fire and the region left the dashboards."""
    from serving.observability.fleet import fleet_families

    stats = {"replicas": {"us-0": {"region": "us", "model": "m", "routable": True},
                          "us-1": {"region": "us", "model": "m", "routable": False, "health": "down"}}}
    fam = fleet_families(stats, 1, [("us", "m"), ("eu", "m")])[0]
    got = {dict(lab)["region"] + "/" + dict(lab)["state"]: v for _, lab, v in fam[3]}
    assert got == {"eu/routable": 0.0, "us/routable": 1.0, "us/down": 1.0}
    c, _, _ = build()  # through /metrics: every configured region once, with what the router knows
    t = await metrics(c)
    routable = [s for s in samples(t) if s[0] == "proxima_replicas" and ("state", "routable") in s[1]]
    assert len(routable) == len({dict(s[1])["region"] for s in routable}) >= 2
