"""/metrics for the whole gateway: every ingress replica's counters plus fleet gauges.

    merge([snapshot, ...]) -> families        sums of identical (sample, labels)
    fleet_families(router_stats, ingress_replicas) -> families
    budget_families({tenant: ledger.remaining(tenant)}) -> families
    exposition(families) -> Prometheus text

Why this split. Counters and histograms are cumulative per ingress replica, so
the fleet's value is the sum of the replicas' last snapshots (a replica that
went away keeps its last snapshot in the sum, so no counter ever goes
backwards). Gauges about the fleet (replicas per region, queue depth per
replica, KV use, the engines' own prefix-cache counters) have one owner that
already knows them, the router actor, and are read from its `stats()` once
per scrape; budget gauges are read from the ledger once per scrape. Nothing
here runs per request.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Iterable

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric

from serving.ingress.metrics import Family, Sample

log = logging.getLogger("proxima.metrics")


# How long /metrics waits for each actor it asks (the telemetry, the router, the ledger): one
# stalled must not hold the scrape past Prometheus's timeout (10 s by default) and so lose the
# counters too, in just the incident they are scraped to show.
PART_TIMEOUT_S = 2.0


async def render_gateway(gw: Any, timeout_s: float | None = None) -> bytes:
    """The gateway's /metrics: merged counters, fleet gauges, budgets (each part best effort,
    each waited for at most `timeout_s`, default PART_TIMEOUT_S)."""
    timeout_s = PART_TIMEOUT_S if timeout_s is None else timeout_s
    own = gw.metrics.snapshot()
    try:
        async with asyncio.timeout(timeout_s):
            snapshots, n = await gw.telemetry.merged(own)
    except Exception as e:  # the other ingress replicas' counters are late: this one's still count
        log.warning("merged counters unavailable: %s", type(e).__name__)
        snapshots, n = [own], 1
    fams = merge(snapshots)
    configured = [(region, model) for region, rc in gw.config.regions.items()
                  for model in (rc.models or [m.name for m in gw.config.models])]
    try:
        async with asyncio.timeout(timeout_s):
            fams += fleet_families(await gw.router.stats(), n, configured)
    except Exception as e:  # the router restarting or stalled: still serve the counters (gauges declared, empty)
        log.warning("fleet gauges unavailable: %s", type(e).__name__)
        fams += [(name, typ, doc, []) for name, typ, doc, _ in fleet_families({}, n)]  # unknown: no zeros
    ledger = getattr(gw.admission, "ledger", None)
    tenants = [name for name, t in gw.config.auth.tenants.items() if t.budget]
    views: dict[str, dict[str, Any]] = {}
    if ledger is not None and tenants:
        try:
            async with asyncio.timeout(timeout_s):
                views = dict(zip(tenants, await asyncio.gather(*(ledger.remaining(t) for t in tenants))))
        except Exception as e:
            log.warning("budget gauges unavailable: %s", type(e).__name__)
    return exposition(fams + budget_families(views))  # declared even when empty: dashboards stay valid


def merge(snapshots: Iterable[list[Family]]) -> list[Family]:
    fams: dict[str, tuple[str, str, dict[tuple[str, tuple], float]]] = {}
    for snap in snapshots:
        for name, typ, doc, samples in snap:
            f = fams.get(name)
            if f is None:
                f = fams[name] = (typ, doc, {})
            acc = f[2]
            for sname, labels, value in samples:
                acc[(sname, labels)] = acc.get((sname, labels), 0.0) + value
    return [(name, typ, doc, [(s, lab, v) for (s, lab), v in acc.items()])
            for name, (typ, doc, acc) in fams.items()]


def _family(name: str, typ: str, doc: str, rows: Iterable[tuple[dict[str, str], float]],
            suffix: str = "") -> Family:
    return (name, typ, doc, [(name + suffix, tuple(sorted(lab.items())), float(v)) for lab, v in rows])


def fleet_families(stats: dict[str, Any], ingress_replicas: int = 1,
                   configured: Iterable[tuple[str, str]] = ()) -> list[Family]:
    """Gauges from the router's view (serving.ingress.local.router_stats). Every `configured`
    (region, model) has a `routable` series, 0 when the router knows none of its replicas (a
    region whose engines all died): an alert on it can fire, and the region stays on dashboards."""
    reps: dict[str, dict[str, Any]] = stats.get("replicas", {})
    per_region: dict[tuple[str, str, str], int] = {(g, m, "routable"): 0 for g, m in configured}
    queue, kv, hits, queries = [], [], [], []
    for rid, r in sorted(reps.items()):
        state = "routable" if r.get("routable") else (
            "circuit_open" if r.get("circuit_open") else str(r.get("health", "down")))
        key = (r.get("region", ""), r.get("model", ""), state)
        per_region[key] = per_region.get(key, 0) + 1
        lab = {"replica": rid, "region": r.get("region", ""), "model": r.get("model", "")}
        queue.append(({**lab, "state": "running"}, r.get("num_running", 0)))
        queue.append(({**lab, "state": "waiting"}, r.get("num_waiting", 0)))
        kv.append((lab, r.get("kv_usage", 0.0)))
        hits.append((lab, r.get("prefix_cache_hits", 0)))
        queries.append((lab, r.get("prefix_cache_queries", 0)))
    return [
        _family("proxima_replicas", "gauge", "Engine replicas the router knows, by region, model and state",
                [({"region": g, "model": m, "state": s}, n) for (g, m, s), n in sorted(per_region.items())]),
        _family("proxima_replica_queue_depth", "gauge",
                "Requests on each engine replica as it last reported (running or waiting)", queue),
        _family("proxima_replica_kv_usage_ratio", "gauge", "Fraction of each replica's KV blocks in use", kv),
        _family("proxima_engine_prefix_cache_hits", "counter",
                "Prompt tokens the engine found in its prefix cache, as the engine reports them",
                hits, "_total"),
        _family("proxima_engine_prefix_cache_queries", "counter",
                "Prompt tokens the engine looked up in its prefix cache", queries, "_total"),
        _family("proxima_router_inflight", "gauge", "Requests routed and not yet finished",
                [({}, stats.get("inflight", 0))]),
        _family("proxima_ingress_replicas", "gauge", "Ingress replicas whose counters are merged here",
                [({}, ingress_replicas)]),
    ]


def budget_families(views: dict[str, dict[str, Any]]) -> list[Family]:
    """Daily token budgets per tenant, from the ledger's `remaining(tenant)` answers."""
    used, held, limit = [], [], []
    for tenant, view in sorted(views.items()):
        for b in view.get("budgets", ()):
            if b.get("name") != "tokens_per_day" or b.get("limit") is None:
                continue
            lab = {"tenant": tenant, "budget": b["name"]}
            used.append((lab, b.get("used", 0)))
            held.append((lab, b.get("reserved", 0)))
            limit.append((lab, b["limit"]))
    return [
        _family("proxima_budget_used_tokens", "gauge", "Tokens used in the current budget window", used),
        _family("proxima_budget_reserved_tokens", "gauge", "Tokens reserved by requests in flight", held),
        _family("proxima_budget_limit_tokens", "gauge", "The budget's limit", limit),
    ]


class _Families:
    def __init__(self, families: list[Family]):
        self.families = families

    def collect(self):
        for name, typ, doc, samples in self.families:
            m = Metric(name, doc, typ)
            for sname, labels, value in samples:
                m.add_sample(sname, dict(labels), value)
            yield m


def exposition(families: list[Family]) -> bytes:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(_Families(sorted(families, key=lambda f: f[0])))
    return generate_latest(reg)


__all__ = ["Family", "Sample", "merge", "fleet_families", "budget_families", "exposition",
           "render_gateway"]
