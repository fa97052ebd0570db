"""One ingress replica's metrics (prometheus-client); docs/metrics.md lists them all.

    proxima_requests_total{route, status, tenant, model, region}
    proxima_errors_total{route, status, type, phase, tenant, model, region}
    proxima_ttft_seconds / proxima_tpot_seconds / proxima_e2e_seconds{region, model, tenant}
    proxima_routing_decision_seconds
    proxima_ttft_predicted_seconds / _observed_seconds / _prediction_error_seconds{region, model}
    proxima_prompt_tokens_total / proxima_completion_tokens_total{region, model, tenant}
    proxima_cached_tokens_total{region, model, source="predicted"|"engine"}
    proxima_budget_charged_tokens_total{tenant}
    proxima_delegation_total{tier, reason}
    proxima_retries_total{model, kind}   proxima_failovers_total{from_region, to_region}
    proxima_client_disconnects_total{region, model, tenant}

Each gateway owns its registry (not the process-global one) so several
gateways in one process, and Ray's own metrics, never collide. `snapshot()`
turns the registry into plain tuples that cross processes; /metrics serves the
merge of every ingress replica's snapshot plus the fleet gauges
(serving.observability.fleet), never this replica's slice alone. Label values
are bounded: tenants and models come from the config, never from raw input.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

CONTENT_TYPE = CONTENT_TYPE_LATEST

# (name, type, help, [(sample name, sorted label pairs, value)]): what crosses processes
Sample = tuple[str, tuple[tuple[str, str], ...], float]
Family = tuple[str, str, str, list[Sample]]

_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0, 30.0)
_TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.2, 0.5, 1.0)
_E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0)
_ROUTE_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5)
_ERR_BUCKETS = (-2.0, -1.0, -0.5, -0.25, -0.1, -0.05, -0.025, -0.01, 0.0,
                0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0)
_SLICE = ("region", "model", "tenant")


class GatewayMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("proxima_requests", "Requests by route, HTTP status, tenant, model and region",
                                ["route", "status", "tenant", "model", "region"], registry=r)
        self.errors = Counter("proxima_errors", "Error responses, and errors sent in-band in a stream",
                              ["route", "status", "type", "phase", "tenant", "model", "region"], registry=r)
        self.ttft = Histogram("proxima_ttft_seconds", "Time to first token at the gateway",
                              _SLICE, buckets=_TTFT_BUCKETS, registry=r)
        self.tpot = Histogram("proxima_tpot_seconds", "Time per output token after the first",
                              _SLICE, buckets=_TPOT_BUCKETS, registry=r)
        self.e2e = Histogram("proxima_e2e_seconds", "Request start to last token",
                             _SLICE, buckets=_E2E_BUCKETS, registry=r)
        self.routing = Histogram("proxima_routing_decision_seconds", "Routing stage latency",
                                 buckets=_ROUTE_BUCKETS, registry=r)
        self.predicted = Histogram("proxima_ttft_predicted_seconds",
                                   "The router's predicted TTFT for the replica that answered",
                                   ["region", "model"], buckets=_TTFT_BUCKETS, registry=r)
        self.observed = Histogram("proxima_ttft_observed_seconds",
                                  "Observed TTFT from the routing decision to the first token (what the "
                                  "prediction predicts)", ["region", "model"], buckets=_TTFT_BUCKETS, registry=r)
        self.prediction_error = Histogram(
            "proxima_ttft_prediction_error_seconds",
            "Observed minus predicted TTFT (routing decision to first token); > 0: slower than predicted",
            ["region", "model"], buckets=_ERR_BUCKETS, registry=r)
        self.prompt_tokens = Counter("proxima_prompt_tokens", "Prompt tokens served", _SLICE, registry=r)
        self.completion_tokens = Counter("proxima_completion_tokens", "Completion tokens served",
                                         _SLICE, registry=r)
        self.cached_tokens = Counter("proxima_cached_tokens",
                                     "Prompt tokens found in the prefix cache: as the router predicted "
                                     "(source=predicted) and as the engine reported (source=engine)",
                                     ["region", "model", "source"], registry=r)
        self.budget_charged = Counter("proxima_budget_charged_tokens",
                                      "Tokens charged to tenants' budgets at settlement", ["tenant"], registry=r)
        self.delegation = Counter("proxima_delegation", "Tier chosen for the `auto` alias, and why",
                                  ["tier", "reason"], registry=r)
        self.retries = Counter("proxima_retries", "Extra dispatch attempts after a replica failed: "
                               "kind=retry before the first token, kind=continuation after it",
                               ["model", "kind"], registry=r)
        self.failovers = Counter("proxima_failovers", "Attempts moved to a replica in another region",
                                 ["from_region", "to_region"], registry=r)
        self.disconnects = Counter("proxima_client_disconnects",
                                   "Requests whose client left before the answer was whole (their engine "
                                   "work was aborted); counted as served with their status, not as errors",
                                   _SLICE, registry=r)

    def render(self) -> bytes:
        """This replica's own registry only (the gateway's /metrics serves the fleet merge)."""
        return generate_latest(self.registry)

    def snapshot(self) -> list[Family]:
        """The registry as plain tuples; `_created` samples dropped (they cannot be summed)."""
        out: list[Family] = []
        for fam in self.registry.collect():
            samples = [(s.name, tuple(sorted(s.labels.items())), s.value)
                       for s in fam.samples if not s.name.endswith("_created")]
            out.append((fam.name, fam.type, fam.documentation, samples))
        return out
