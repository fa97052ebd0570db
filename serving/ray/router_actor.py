"""The central router as one Ray actor, and the async client the ingress uses.

One named actor owns serving.routing.Router (prefix index, load table,
latency models); it is their only writer because a synchronous actor runs one
call at a time. Engines push `update(snapshot, counters)` every
`router.snapshot_period_s`; the ingress calls `route` (awaited, never a
blocking ray.get) and tells it `first_token` and `finished` without waiting
for an answer. A replica that stops reporting for `router.stale_after_s` is
dropped, so a dead replica stops being chosen even if nobody said goodbye.

The actor is detached and named after a digest of the config, so every
replica of one deployment finds the same router, and a redeploy with a
different config gets a fresh one instead of stale state.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import deque
from typing import Any

import ray

from serving.config import load_config
from serving.errors import ProximaError
from serving.ingress.local import router_stats
from serving.routing.router import Router
from serving.types import Decision, ReplicaSnapshot, RouteRequest

NAMESPACE = "proxima"


@ray.remote(num_cpus=0, max_restarts=-1)
class RouterActor:
    def __init__(self, config: dict[str, Any]):
        cfg = load_config(config)
        self.router = Router(cfg.router.policy, block_size=cfg.block_size, rtt_ms=cfg.rtt(),
                             alternatives=cfg.router.alternatives, **cfg.router.options)
        self.stale_after_s = cfg.router.stale_after_s
        self.counters: dict[str, dict[str, int]] = {}
        self.seen: dict[str, float] = {}
        self.route_us: deque[float] = deque(maxlen=4096)  # the actor's own time per decision
        self._swept = time.monotonic()

    def route(self, req: RouteRequest) -> Decision | ProximaError:
        t = time.perf_counter()
        try:
            self._sweep()
            return self.router.route(req)
        except ProximaError as e:  # errors travel as values: the caller raises our type
            return e
        finally:
            self.route_us.append((time.perf_counter() - t) * 1e6)

    def update(self, snap: ReplicaSnapshot, counters: dict[str, int] | None = None) -> None:
        self.router.update(snap)
        self.seen[snap.replica_id] = time.monotonic()
        if counters is not None:
            self.counters[snap.replica_id] = counters

    def remove(self, replica_id: str) -> None:
        self.router.remove(replica_id)
        self.seen.pop(replica_id, None)
        self.counters.pop(replica_id, None)

    def first_token(self, request_id: str, engine_ttft_ms: float | None = None) -> None:
        self.router.on_first_token(request_id, engine_ttft_ms)

    def finished(self, request_id: str, ok: bool = True) -> None:
        self.router.on_finished(request_id, ok)

    def stats(self) -> dict[str, Any]:
        self._sweep()
        out = router_stats(self.router, {r: {"counters": c} for r, c in self.counters.items()})
        us = sorted(self.route_us)
        if us:
            out["route_us_p50"] = round(us[len(us) // 2], 1)
            out["route_us_p99"] = round(us[min(len(us) - 1, int(len(us) * 0.99))], 1)
        return out

    def _sweep(self) -> None:
        now = time.monotonic()
        if now - self._swept < 0.5:
            return
        self._swept = now
        for rid, t in list(self.seen.items()):
            if now - t > self.stale_after_s:
                self.remove(rid)


def config_digest(config: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:12]


def router_actor(config: dict[str, Any]):
    """The router actor for this config, created by whichever replica asks first."""
    return RouterActor.options(name=f"proxima-router-{config_digest(config)}", namespace=NAMESPACE,
                               get_if_exists=True, lifetime="detached").remote(config)


class RayRouter:
    """RouterPort over the actor: awaited calls for answers, fire-and-forget for hooks."""

    def __init__(self, handle):
        self.handle = handle

    async def route(self, req: RouteRequest) -> Decision:
        res = await self.handle.route.remote(req)
        if isinstance(res, ProximaError):
            raise res
        return res

    def first_token(self, request_id: str, engine_ttft_ms: float | None) -> None:
        self.handle.first_token.remote(request_id, engine_ttft_ms)

    def finished(self, request_id: str, ok: bool) -> None:
        self.handle.finished.remote(request_id, ok)

    async def stats(self) -> dict[str, Any]:
        return await self.handle.stats.remote()
