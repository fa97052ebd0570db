"""Gateway metrics in Prometheus text format (prometheus-client).

    proxima_requests_total{route, status}       requests by endpoint and HTTP status
    proxima_ttft_seconds{region, model}         time to first token, as the gateway saw it
    proxima_routing_decision_seconds            routing stage latency (ingress -> router -> decision)
    proxima_delegation_total{tier, reason}      `auto` requests by chosen tier and rule

Each gateway owns its registry (not the process-global one) so several
gateways in one process, and Ray's own metrics, never collide. The
observability issue extends this set.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

CONTENT_TYPE = CONTENT_TYPE_LATEST

_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0, 30.0)
_ROUTE_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5)


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("proxima_requests", "Requests by route and HTTP status",
                                ["route", "status"], registry=self.registry)
        self.ttft = Histogram("proxima_ttft_seconds", "Time to first token at the gateway",
                              ["region", "model"], buckets=_TTFT_BUCKETS, registry=self.registry)
        self.delegation = Counter("proxima_delegation", "Tier chosen for the `auto` alias, and why",
                                  ["tier", "reason"], registry=self.registry)
        self.routing = Histogram("proxima_routing_decision_seconds", "Routing stage latency",
                                 buckets=_ROUTE_BUCKETS, registry=self.registry)

    def render(self) -> bytes:
        return generate_latest(self.registry)
