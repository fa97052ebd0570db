"""Ingress deployment: the ASGI app (serving.ingress.app) inside Ray Serve.

Serve's proxy passes its request id in `x-request-id` and echoes it in the
response, so the app's own copy of that header is dropped here. Ports over Ray: the router actor (RayRouter) and the engine deployments
(RayEngines: one streaming handle per region and model; each call carries the
decision's replica as `target`, which DecisionRouter honours). A call that
ends before its last chunk (client gone, dispatch moved on) is cancelled, so
the engine replica aborts the request. Metrics and agent steps go to the
telemetry actor (serving.ray.telemetry), so /metrics is the whole gateway's.
"""

from __future__ import annotations

import logging
from typing import Any, AsyncIterator

import grpc
from ray import serve
from ray.exceptions import RayError

from serving.config import load_config
from serving.engines.base import Chunk, GenerateRequest
from serving.errors import EngineError, ProximaError
from serving.ingress.app import build_app
from serving.ingress.pipeline import Gateway
from serving.ingress.metrics import GatewayMetrics
from serving.ingress.policies import budget_policies, gateway_policies
from serving.ray.ledger import LedgerClient, ledger_name, start_ledger
from serving.observability.logs import configure_logging
from serving.ray.request_router import gone
from serving.ray.router_actor import RayRouter, actor_name, router_actor
from serving.ray.telemetry import RayTelemetry, telemetry_actor
from serving.types import Decision

log = logging.getLogger("proxima.ingress")


def engine_key(region: str, model: str) -> str:
    return f"{region}/{model}"


class RayEngines:
    """EnginePort over Serve handles keyed by engine_key(region, model)."""

    def __init__(self, handles: dict[str, Any]):
        self.handles = {k: h.options(stream=True) for k, h in handles.items()}

    async def open(self, decision: Decision, gen: GenerateRequest) -> AsyncIterator[Chunk]:
        h = self.handles.get(engine_key(decision.region, gen.model))
        if h is None:
            raise EngineError(f"no engine deployment for {gen.model} in {decision.region}")
        if gone(h.app_name, h.deployment_name, decision.replica_id):  # Serve would hold it for nothing
            raise EngineError(f"replica {decision.replica_id} failed: deployment {h.deployment_name} has no "
                              "running replica")
        resp = h.generate.remote(gen, target=decision.replica_id)
        done = False
        try:
            async for item in resp:
                if isinstance(item, ProximaError):
                    done = True
                    raise item
                for chunk in item:
                    if chunk.finish_reason is not None:
                        done = True
                    yield chunk
            done = True
        except (RayError, grpc.aio.AioRpcError) as e:  # replica died or Serve gave up (gRPC: its own error)
            done = True
            raise EngineError(f"replica {decision.replica_id} failed: {type(e).__name__}") from None
        finally:
            if not done:
                resp.cancel()


@serve.deployment(max_ongoing_requests=512, ray_actor_options={"num_cpus": 0})
@serve.ingress()
class IngressDeployment:
    def __init__(self, config: dict[str, Any], engines: dict[str, Any], autoscaler: Any = None):
        cfg = load_config(config)
        self.autoscaler = autoscaler  # bound here so Serve deploys it with the app; it runs on its own
        router = RayRouter(router_actor(config), reconnect=lambda: router_actor(config),
                           channel=cfg.router.direct_channel)
        metrics = GatewayMetrics()
        obs = cfg.observability
        configure_logging(obs.log_format)
        def tel():
            return telemetry_actor(actor_name("telemetry", config), obs.max_sessions, obs.max_steps_per_session)

        def led():
            return start_ledger(budget_policies(cfg), cfg.budgets.ledger_path,
                                name=ledger_name(cfg.budgets.ledger_path, actor_name("ledger", config)),
                                reservation_ttl_s=cfg.budgets.reservation_ttl_s)

        # /metrics and session steps for the whole fleet, not this replica's
        telemetry = RayTelemetry(tel(), serve.get_replica_context().replica_id.unique_id, metrics,
                                 obs.metrics_push_s, reconnect=tel)
        ledger = LedgerClient(led(), reconnect=led)
        self.gateway = Gateway(cfg, router, RayEngines(engines), metrics=metrics, telemetry=telemetry,
                               **gateway_policies(cfg, router, ledger, metrics))

    async def __del__(self):
        """Serve stops this replica (scale-down, redeploy) after its requests finished, within
        the deployment's graceful_shutdown_timeout_s (20 s by default): charges still settling
        and telemetry still buffered would otherwise die with it."""
        await self.gateway.aclose(timeout_s=10.0)

    def __serve_build_asgi_app__(self):
        return _serve_request_id(build_app(self.gateway))


def _serve_request_id(app):
    """Serve's proxy already answers with x-request-id (the id it passed in); don't send it twice."""
    async def wrapped(scope, receive, send):
        if scope["type"] != "http":
            return await app(scope, receive, send)

        async def send_(msg):
            if msg["type"] == "http.response.start":
                msg = {**msg, "headers": [(k, v) for k, v in msg.get("headers", ()) if k != b"x-request-id"]}
            await send(msg)
        await app(scope, receive, send_)
    wrapped.routes = getattr(app, "routes", [])  # Serve reads route patterns for its metrics
    return wrapped
