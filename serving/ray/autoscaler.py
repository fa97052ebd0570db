"""The autoscaler controller on Ray Serve: one replica runs serving.autoscaler.policy.decide.

Every `autoscaler.interval_s` it reads the router actor's view (demand over
the window by client region and model, every replica's load), decides target
replicas per engine deployment (region, model), and applies them through
Serve's controller (`update_deployment_replicas`, Serve's external-scaler
API: the app is deployed with `external_scaler_enabled: true`). Nothing is
redeployed; Serve starts and stops the replicas.

Scale-down drains first: the replicas to stop are marked draining in the
router (it routes nothing new to them), the controller waits until their
in-flight requests finished (or `drain_timeout_s`), and only then lowers the
count; Serve's own graceful shutdown covers anything still running. On one
node Serve stops a deployment's newest replicas, so those are the ones
drained here (should Serve keep one of them, it is un-drained). (The simulator, which owns its replicas, drains the coldest
replica instead: serving.autoscaler.cache.)

A restarted controller (its replica crashed, or Serve moved it) resumes
from what Serve holds: it reads each engine deployment's current target
from the Serve controller instead of the config's starting counts, and a
replica the router still keeps out of routing although no drain is under way
and Serve is not stopping it (a drain whose controller died, or one that
timed out) is handed back to routing at the next step.

Demand comes from the router (requests by client region), not from the
replicas, so a pool scaled to 0 can grow again (not covered by a test); a
region configured with `replicas: 0` gets no engine deployment at all, so it
cannot be grown: configure at least 1.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from typing import Any

import ray
from ray import serve
from ray.exceptions import RayActorError, RayError

from serving.autoscaler.policy import Limits, Observation, PolicyConfig, PoolLimits, decide
from serving.config import load_config
from serving.engines.profiles import get_profile
from serving.observability.logs import configure_logging
from serving.ray.named import find_again
from serving.ray.router_actor import router_actor

log = logging.getLogger("proxima.autoscaler")


def stale_drains(rows: list[dict[str, Any]], targets: dict[tuple, int], busy: set[tuple]) -> list[str]:
    """Replicas marked draining in pools with no drain of ours under way (`busy`) and no
    more replicas than Serve's target (so Serve is not about to stop one of them)."""
    out: list[str] = []
    for p, n in targets.items():
        if p in busy:
            continue
        pool = [r for r in rows if (r["region"], r["model"]) == p]
        if len(pool) <= n:
            out += [r["replica_id"] for r in pool if r["draining"]]
    return out


def deployments_of(details: dict[str, Any], app: str) -> dict[str, dict[str, Any]]:
    """An application's deployments in get_serve_instance_details ({} where it has none)."""
    return ((details.get("applications") or {}).get(app) or {}).get("deployments") or {}


def serve_stop_order(details: dict[str, Any], app: str, deployment: str) -> list[str]:
    """The replicas (Serve's unique ids) of `deployment` in the order Serve (2.60) stops them on a
    downscale (DeploymentScheduler._get_replicas_to_stop): not yet running first; then by node,
    off the head node first (the controller's node), the node with the fewest running replicas
    of every deployment first; newest first within a node. From get_serve_instance_details."""
    replicas = (deployments_of(details, app).get(deployment) or {}).get("replicas") or []
    per_node: dict[Any, int] = {}
    for name in details.get("applications") or {}:
        for d in deployments_of(details, name).values():
            for r in d.get("replicas") or ():
                if r.get("state") == "RUNNING":
                    per_node[r.get("node_id")] = per_node.get(r.get("node_id"), 0) + 1
    head = (details.get("controller_info") or {}).get("node_id")
    live = [r for r in replicas if r.get("state") not in ("STOPPING",)]
    order = [r["replica_id"] for r in live if r.get("state") != "RUNNING"]
    running = [r for r in live if r.get("state") == "RUNNING"]
    for node in sorted({r.get("node_id") for r in running}, key=lambda n: (n == head, per_node.get(n, 0))):
        mine = sorted((r for r in running if r.get("node_id") == node), key=lambda r: -float(r.get("start_time_s") or 0))
        order += [r["replica_id"] for r in mine]
    return order


def reported_kv(rows: list[dict[str, Any]], known: dict[tuple, int]) -> dict[tuple, int]:
    """Each pool's KV cache per replica as its engines report it (a vLLM engine sizes its
    cache from the GPU's free memory at start), the smallest where replicas differ; pools
    with no replica reporting now keep what `known` has (the last report, or the config)."""
    out = dict(known)
    seen: dict[tuple, int] = {}
    for r in rows:
        cap, p = int(r.get("kv_capacity_tokens") or 0), (r["region"], r["model"])
        if cap > 0 and p in out:
            seen[p] = min(cap, seen.get(p, cap))
    out.update(seen)
    return out


def _controller():
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE
    return ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)


@serve.deployment(num_replicas=1, max_ongoing_requests=16, ray_actor_options={"num_cpus": 0})
class AutoscalerDeployment:
    async def __init__(self, config: dict[str, Any], deployments: dict[str, str]):
        """`deployments`: "<region>/<model>" -> the engine deployment's name."""
        cfg = load_config(config)
        a = cfg.autoscaler
        self.a = a
        self.app = serve.get_replica_context().app_name
        self.names = {tuple(k.split("/", 1)): v for k, v in deployments.items()}
        self.limits = Limits({p: PoolLimits(*a.bounds(p[0])) for p in self.names}, a.budget)
        self.cfg = PolicyConfig(
            {p: get_profile(cfg.regions[p[0]].profile) for p in self.names}, cfg.rtt(),
            slo_ttft_ms=a.slo_ttft_ms, slo_weight=a.slo_weight, max_utilization=a.max_utilization,
            replica_cost_ms=a.replica_cost_ms, hysteresis=a.hysteresis,
            upscale_cooldown_s=a.upscale_cooldown_s, downscale_delay_s=a.downscale_delay_s,
            move_delay_s=a.move_delay_s, lead_s=a.lead_s, max_down_step=a.max_down_step,
            kv_capacity_tokens={p: cfg.regions[p[0]].kv_capacity_tokens for p in self.names})
        configure_logging(cfg.observability.log_format)  # its INFO lines reach the logs as the others'
        self.state: dict = {}
        self.disabled: str | None = None  # why it stopped scaling (Serve refused a target)
        self.draining: dict[tuple, asyncio.Task] = {}
        self.events: list[dict[str, Any]] = []  # what it did, newest last (bounded)
        self.last: dict[str, Any] = {}
        self.config = config
        self.router = router_actor(config)
        self.controller = _controller()
        self.targets = await self._serve_targets({p: cfg.regions[p[0]].replicas for p in self.names})
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def _serve_targets(self, start: dict[tuple, int]) -> dict[tuple, int]:
        """Each pool's replica target as Serve holds it now: the config's count on a first
        deploy, whatever this controller set before if it restarted."""
        try:
            details = await self.controller.get_serve_instance_details.remote()
        except RayError as e:
            log.warning("autoscaler: Serve's targets unreadable (%s); starting from the config's counts",
                        type(e).__name__)
            return dict(start)
        deployments = deployments_of(details, self.app)
        out = dict(start)
        for p, name in self.names.items():
            n = (deployments.get(name) or {}).get("target_num_replicas")
            if isinstance(n, int):
                out[p] = n
        if out != start:
            log.info("autoscaler resumed from Serve's targets: %s",
                     {"/".join(p): n for p, n in out.items()})
        return out

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.a.interval_s)
            try:
                await self.step()
            except RayActorError as e:  # gone for good (killed, exited idle): find or create it
                self.router = await find_again(e, lambda: router_actor(self.config)) or self.router
                log.warning("autoscaler step failed: %s: %s", type(e).__name__, e)
            except Exception as e:  # the router restarting: decide again next time
                log.warning("autoscaler step failed: %s: %s", type(e).__name__, e)

    async def step(self) -> None:
        if self.disabled is not None:
            return
        view = await self.router.autoscale_view.remote()
        now = time.monotonic()
        busy = {p for p, t in self.draining.items() if not t.done()}
        stale = stale_drains(view["replicas"], self.targets, busy)
        if stale:
            log.info("autoscaler: %d replica(s) left draining by a drain no longer under way serve again",
                     len(stale))
            await self.router.undrain.remote(stale)
        draining = {p: sum(1 for r in view["replicas"] if (r["region"], r["model"]) == p and r["draining"]
                           and r["replica_id"] not in stale) for p in self.names}
        kv = reported_kv(view["replicas"], self.cfg.kv_capacity_tokens)
        if kv != self.cfg.kv_capacity_tokens:
            log.info("autoscaler: planning KV against the engines' reported caches: %s",
                     {"/".join(p): n for p, n in kv.items()})
            self.cfg = dataclasses.replace(self.cfg, kv_capacity_tokens=kv)
        obs = Observation(now, view["demand"], dict(self.targets), draining)
        decision, self.state = decide(obs, self.limits, self.cfg, self.state)
        self.last = {"targets": {"/".join(p): n for p, n in decision.targets.items()},
                     "plan": {"/".join(p): n for p, n in decision.plan.items()},
                     "predicted_ttft_ms": decision.predicted_ttft_ms,
                     "reasons": {"/".join(p): r for p, r in decision.reasons.items()}}
        for p, target in decision.targets.items():
            cur = self.targets[p]
            if target == cur or p in busy:
                continue
            if target > cur:
                try:
                    await self._set(p, target)
                except RayError as e:  # e.g. the app was deployed without external_scaler_enabled
                    self._refused(p, e)
                    return
            else:
                victims = await self._victims(p, cur - target, view["replicas"])
                log.info("autoscaler: %s %d -> %d (%s), draining %s", "/".join(p), cur, target,
                         decision.reasons.get(p, ""), victims)
                self.draining[p] = asyncio.get_running_loop().create_task(
                    self._drain_then_set(p, target, victims))

    async def _victims(self, p: tuple, k: int, rows: list[dict[str, Any]]) -> list[str]:
        """The `k` replicas Serve will stop when the target drops by `k`, as router ids: drained
        first, so no new request starts on them (the router's own age of a replica is not Serve's
        order: its clock starts at the first report, again after a router restart)."""
        pool = {r["replica_id"] for r in rows if (r["region"], r["model"]) == p and not r["draining"]}
        try:
            details = await self.controller.get_serve_instance_details.remote()
            order = [f"{p[0]}-{uid}" for uid in serve_stop_order(details, self.app, self.names[p])][:k]
            return [rid for rid in order if rid in pool]  # one not started yet needs no drain
        except (RayError, KeyError, TypeError, ValueError) as e:
            log.warning("autoscaler: Serve's replicas unreadable (%s: %s); draining the newest the router saw",
                        type(e).__name__, e)
            newest = sorted((r for r in rows if r["replica_id"] in pool), key=lambda r: r["age_s"])[:k]
            return [r["replica_id"] for r in newest]

    async def _stopping(self, p: tuple) -> list[str]:
        """Router ids of this pool's replicas Serve is stopping now."""
        try:
            details = await self.controller.get_serve_instance_details.remote()
        except RayError:
            return []
        reps = (deployments_of(details, self.app).get(self.names[p]) or {}).get("replicas") or []
        return [f"{p[0]}-{r['replica_id']}" for r in reps if r.get("state") == "STOPPING"]

    async def _drain_then_set(self, p: tuple, target: int, victims: list[str]) -> None:
        await self.router.drain.remote(victims)
        deadline = time.monotonic() + self.a.drain_timeout_s
        while time.monotonic() < deadline:
            view = await self.router.autoscale_view.remote()
            if not any(r["outstanding"] for r in view["replicas"] if r["replica_id"] in victims):
                break
            await asyncio.sleep(0.2)
        try:
            await self._set(p, target, drained=victims)
        except RayError as e:  # e.g. the app was deployed without external_scaler_enabled
            await self.router.undrain.remote(victims)
            self._refused(p, e)
            return
        # Serve picks which replica to stop: one it stops that was not drained is drained now (no
        # new request starts on it while it finishes); one drained that it kept serves again.
        deadline = time.monotonic() + self.a.drain_timeout_s + 30.0
        while time.monotonic() < deadline:
            await asyncio.sleep(0.5)
            stopping = [rid for rid in await self._stopping(p) if rid not in victims]
            if stopping:
                log.warning("autoscaler: Serve stops %s, not the drained %s: draining it now", stopping, victims)
                await self.router.drain.remote(stopping)
                victims = victims + stopping
            rows = [r["replica_id"] for r in (await self.router.autoscale_view.remote())["replicas"]
                    if (r["region"], r["model"]) == p]
            if len(rows) <= target:
                kept = [rid for rid in rows if rid in victims]
                if kept:
                    await self.router.undrain.remote(kept)
                return

    def _refused(self, p: tuple, e: BaseException) -> None:
        """Serve refused a replica target: stop scaling (every later step would be refused too),
        say why once, at ERROR; `status()` shows it."""
        self.disabled = f"{type(e).__name__}: {e}"
        log.error("autoscaler: Serve refused the replica target for %s, so it stops scaling (any replica "
                  "it drained serves again): %s", self.names[p], self.disabled)

    async def _set(self, p: tuple, n: int, drained: list[str] | None = None) -> None:
        from ray.serve._private.common import DeploymentID
        await self.controller.update_deployment_replicas.remote(DeploymentID(name=self.names[p], app_name=self.app), n)
        log.info("autoscaler: %s target %d -> %d%s", self.names[p], self.targets[p], n,
                 f", drained {drained}" if drained else "")
        self.events.append({"t": round(time.time(), 3), "pool": "/".join(p), "from": self.targets[p], "to": n,
                            "drained": drained or []})
        del self.events[:-200]
        self.targets[p] = n

    async def status(self) -> dict[str, Any]:
        return {"targets": {"/".join(p): n for p, n in self.targets.items()}, "last": self.last,
                "events": list(self.events), "disabled": self.disabled}
