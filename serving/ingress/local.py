"""In-process ports: the real Router and real engines in one event loop, no Ray.

    LocalRouter(Router)          RouterPort: route / first_token / finished / stats
    LocalEngines({id: engine})   EnginePort: open(decision, gen) streams from that engine

Used by the fast tests of the whole pipeline (HTTP in, SSE out) and by anyone
embedding the gateway without Ray. Engines' snapshots are pulled right before
each routing decision, so the router sees exactly the engines' state.
"""

from __future__ import annotations

import time
from typing import Any, AsyncIterator

from serving.engines.base import Chunk, Engine, GenerateRequest
from serving.routing.router import Router
from serving.types import Decision, RouteRequest


class LocalEngines:
    def __init__(self, engines: dict[str, Engine]):
        self.engines = engines

    async def open(self, decision: Decision, gen: GenerateRequest) -> AsyncIterator[Chunk]:
        async for c in self.engines[decision.replica_id].generate(gen):
            yield c


class LocalRouter:
    def __init__(self, router: Router, engines: LocalEngines):
        self.router, self.engines = router, engines
        self.route_ms: list[float] = []

    def refresh(self) -> None:
        for e in self.engines.engines.values():
            self.router.update(e.snapshot())

    async def route(self, req: RouteRequest) -> Decision:
        self.refresh()
        t = time.perf_counter()
        d = self.router.route(req)
        self.route_ms.append((time.perf_counter() - t) * 1000.0)
        return d

    async def predict(self, req: RouteRequest) -> float:
        """Dry run: the predicted TTFT of the best replica, nothing booked (delegation)."""
        self.refresh()
        return self.router.choose(req)[0].predicted_ttft_ms

    def set_circuit(self, replica_id: str, open_: bool) -> None:
        self.router.set_circuit(replica_id, open_)

    def first_token(self, request_id: str, engine_ttft_ms: float | None) -> None:
        self.router.on_first_token(request_id, engine_ttft_ms)

    def finished(self, request_id: str, ok: bool) -> None:
        self.router.on_finished(request_id, ok)

    async def stats(self) -> dict[str, Any]:
        self.refresh()
        return router_stats(self.router)


def router_stats(router: Router, extra: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """The router's view as JSON: per replica its last snapshot (and any extra counters)."""
    reps = {}
    for s in router.table.snaps:
        d = {"region": s.region, "model": s.model, "num_running": s.num_running,
             "num_waiting": s.num_waiting, "kv_usage": round(s.kv_usage, 4),
             "prefix_cache_hits": s.prefix_cache_hits, "prefix_cache_queries": s.prefix_cache_queries,
             "health": s.health.value, "circuit_open": s.circuit_open, "routable": s.routable}
        d.update((extra or {}).get(s.replica_id, {}))
        reps[s.replica_id] = d
    return {"policy": router.policy.name, "inflight": router.inflight, "replicas": reps}
