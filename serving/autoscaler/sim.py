"""Autoscalers in the simulator: control loops on the virtual clock, through `Hooks`.

- `StaticHooks`: the scenario's replicas, never changed (records the series).
- `ServeHooks`: Ray Serve's `target_ongoing_requests` policy, one per region
  deployment (serving.autoscaler.serve_baseline); a scale-down stops the
  newest replica (what Serve picks on one node) after draining it.
- `ProximaHooks`: serving.autoscaler.policy.decide on a DemandWindow; a
  scale-down drains the coldest replica (cache.coldest), a new replica is
  pre-warmed with the hottest shared prefixes (cache.hottest_prefixes, blocks
  at least two replicas hold) and takes traffic the moment it is warm (its
  own timer, not the next tick).

All three pay the same cold start (`replica_start_s`, checked each tick) and
the same global budget. A draining replica takes no new requests, finishes
what it has, and is stopped at the first tick after it is empty;
replica-hours count from the start request to the stop.
"""

from __future__ import annotations

from collections import deque

from serving.autoscaler.cache import ReplicaHeat, coldest, hottest_prefixes
from serving.autoscaler.policy import Limits, Observation, PolicyConfig, PoolLimits, decide
from serving.autoscaler.serve_baseline import ServeConfig, ServeDeploymentScaler
from serving.autoscaler.spec import AutoscalingSpec, Variant
from serving.autoscaler.window import DemandWindow
from serving.engines.profiles import get_profile
from serving.sim.loop import Hooks
from serving.types import Health


class ScalerHooks(Hooks):
    def __init__(self, sc, spec: AutoscalingSpec, tick_s: float):
        self.sc, self.spec, self.tick_s = sc, spec, tick_s
        self.pools = {(name, r.model): name for name, r in sc.regions.items()}
        self.starting: list[tuple[float, str]] = []  # (ready at, region)
        self.warming: dict[str, float] = {}  # replica -> routable from
        self.draining: set[str] = set()
        self.started = self.stopped = 0
        self.t: list[float] = []
        self.replicas: dict[str, list[int]] = {r: [] for r in sc.regions}

    # --- bookkeeping each tick ------------------------------------------------
    def tick(self, sim, now: float) -> None:
        for ready, region in [s for s in self.starting if s[0] <= now]:
            self.starting.remove((ready, region))
            self._bring_up(sim, region, now, ready - self.spec.replica_start_s)
        for rid in list(self.draining):
            rep = sim.replicas[rid]
            if rep.core.idle:  # drained: stop it
                self.draining.discard(rid)
                sim.router.remove(rid)
                rep.health, rep.died = Health.DOWN, now
                self.stopped += 1
        self.control(sim, now)
        self.t.append(round(now, 3))
        for region, series in self.replicas.items():
            series.append(self.holding(sim, region))

    def control(self, sim, now: float) -> None:
        """Decide and act (subclasses)."""

    def _bring_up(self, sim, region: str, now: float, requested: float) -> None:
        rep = sim.add_replica(region)
        rep.born = requested  # the GPU was held through the cold start
        self.started += 1

    # --- counts ----------------------------------------------------------------
    def live(self, sim, region: str) -> list:
        return [r for r in sim.replicas.values() if r.region == region and r.died is None
                and r.id not in self.draining and r.health is not Health.DOWN]

    def serving_count(self, sim, region: str) -> int:
        """Up or starting, not draining: what a target is compared with."""
        return len(self.live(sim, region)) + sum(1 for _, r in self.starting if r == region)

    def holding(self, sim, region: str) -> int:
        """Replicas holding a GPU: serving, warming, starting or draining."""
        return self.serving_count(sim, region) + sum(1 for d in self.draining if sim.replicas[d].region == region)

    def used(self, sim) -> int:
        return sum(self.holding(sim, r) for r in self.sc.regions)

    # --- acting ------------------------------------------------------------------
    def scale_to(self, sim, region: str, target: int, now: float, victim) -> None:
        n = self.serving_count(sim, region)
        while n < target:
            self.starting.append((now + self.spec.replica_start_s, region))
            n += 1
        while n > target:
            pending = [s for s in self.starting if s[1] == region]
            if pending:  # not started yet: cancel the latest request
                self.starting.remove(max(pending))
            else:
                live = self.live(sim, region)
                if not live:
                    break
                rid = victim(sim, live, now)
                rep = sim.replicas[rid]
                rep.health = Health.DRAINING
                self.warming.pop(rid, None)
                sim.router.update(rep.snapshot(now))  # no new requests from now on
                self.draining.add(rid)
            n -= 1

    def series(self) -> dict:
        return {"t_s": self.t, "replicas": self.replicas}

    def stats(self) -> dict:
        return {"replicas_started": self.started, "replicas_stopped": self.stopped}


class StaticHooks(ScalerHooks):
    pass


class ServeHooks(ScalerHooks):
    def __init__(self, sc, spec: AutoscalingSpec, v: Variant):
        o = v.options
        super().__init__(sc, spec, o["control_period_s"])
        self.scalers = {region: ServeDeploymentScaler(ServeConfig(
            o["target_ongoing_requests"], o["upscale_delay_s"], o["downscale_delay_s"], o["look_back_period_s"],
            o["upscaling_factor"], o["downscaling_factor"], spec.min_replicas[region], spec.max_replicas[region]))
            for region in sc.regions}
        self.target = {region: r.replicas for region, r in sc.regions.items()}

    def control(self, sim, now: float) -> None:
        budget = self.spec.budget
        for region, scaler in self.scalers.items():
            live = self.live(sim, region)
            scaler.record(now, sum(len(r.core.waiting) + len(r.core.running) for r in live))
            want = scaler.decide(now, len(live), self.target[region])
            if want > self.target[region] and budget is not None:  # out of GPUs: the rest stay pending
                want = min(want, self.target[region] + max(0, budget - self.used(sim)))
            if want != self.target[region]:
                self.target[region] = want
                self.scale_to(sim, region, want, now, _newest)


def _newest(sim, live: list, now: float) -> str:
    return max(live, key=lambda r: (r.born, r.id)).id


class ProximaHooks(ScalerHooks):
    def __init__(self, sc, spec: AutoscalingSpec, v: Variant):
        o = v.options
        super().__init__(sc, spec, spec.tick_s)
        self.window = DemandWindow(o["window_s"])
        self.prewarm_frac = o["prewarm_frac"]
        self.limits = Limits({p: PoolLimits(spec.min_replicas[r], spec.max_replicas[r]) for p, r in self.pools.items()},
                             spec.budget)
        self.cfg = PolicyConfig(
            {p: get_profile(sc.regions[r].profile) for p, r in self.pools.items()}, sc.rtt_ms,
            slo_ttft_ms=o["slo_ttft_ms"] if o["slo_ttft_ms"] is not None else sc.slo_ttft_ms,
            slo_weight=o["slo_weight"], max_utilization=o["max_utilization"],
            replica_cost_ms=o["replica_cost_ms"], hysteresis=o["hysteresis"],
            upscale_cooldown_s=o["upscale_cooldown_s"], downscale_delay_s=o["downscale_delay_s"],
            move_delay_s=o["move_delay_s"], lead_s=o["lead_s"], max_down_step=int(o["max_down_step"]),
            kv_capacity_tokens={p: sc.regions[r].kv_capacity_tokens for p, r in self.pools.items()})
        self.state: dict = {}
        self.hits: dict[str, deque] = {}  # replica -> (t, prefix cache hit tokens so far)
        self.prewarmed_blocks = 0

    def admit(self, sim, a):
        self.window.arrival(a.t, a.region, a.model, a.prompt_len, a.output_len)
        return None

    def control(self, sim, now: float) -> None:
        totals: dict[str, list[int]] = {}
        for rep in sim.replicas.values():
            t = totals.setdefault(rep.model, [0, 0])
            t[0] += rep.core.queries
            t[1] += rep.core.hits
            if rep.died is None:
                h = self.hits.setdefault(rep.id, deque())
                h.append((now, rep.core.hits))
                while len(h) > 2 and h[1][0] <= now - self.window.window_s:
                    h.popleft()
        for model, (q, hits) in totals.items():
            self.window.cache(now, model, q, hits)
        obs = Observation(now, self.window.demand(now),
                          {p: self.serving_count(sim, r) for p, r in self.pools.items()},
                          {p: sum(1 for d in self.draining if sim.replicas[d].region == r)
                           for p, r in self.pools.items()})
        decision, self.state = decide(obs, self.limits, self.cfg, self.state)
        for p, target in decision.targets.items():
            if target != obs.replicas[p]:
                self.scale_to(sim, self.pools[p], target, now, self._coldest)

    def _coldest(self, sim, live: list, now: float) -> str:
        heat = []
        for rep in live:
            h = self.hits.get(rep.id)
            recent = h[-1][1] - h[0][1] if h else 0
            heat.append(ReplicaHeat(rep.id, recent, len(rep.core.waiting) + len(rep.core.running)))
        return coldest(heat)

    def _bring_up(self, sim, region: str, now: float, requested: float) -> None:
        """Start, then pre-warm with the hottest shared prefixes before taking traffic."""
        rep = sim.add_replica(region)
        rep.born = requested
        self.started += 1
        pool = rep.core.pool
        sources = [r.id for r in sim.replicas.values() if r.model == rep.model and r.died is None and r is not rep]
        # Blocks at least two replicas hold: one replica's own history (a unique question)
        # is not worth the new one's time (25 % of an A100's KV took ~5 s to prefill).
        blocks = hottest_prefixes(sim.router.index, sources, int(pool.num_blocks * self.prewarm_frac),
                                  min_holders=2)
        if not blocks:
            return
        pool.allocate(len(blocks))  # as if their prompts were prefilled: cached, evictable, hottest last out
        pool.promote_many(blocks)
        pool.free(blocks, 0)
        sim.router.index.insert(rep.id, blocks)  # hottest first: the most recent
        p, tokens = rep.profile, len(blocks) * rep.profile.block_size
        warm_ms = -(-tokens // p.max_num_batched_tokens) * p.a_ms + p.b_ms_per_token * tokens
        sim.router.set_circuit(rep.id, True)  # not routable until warm, and from then on at once
        self.warming[rep.id] = now + warm_ms / 1000.0
        sim.at(self.warming[rep.id], lambda sim, t, rid=rep.id: self._warm(sim, rid))
        rep.busy_s += warm_ms / 1000.0
        self.prewarmed_blocks += len(blocks)

    def _warm(self, sim, rid: str) -> None:
        if self.warming.pop(rid, None) is not None:  # not drained meanwhile
            sim.router.set_circuit(rid, False)

    def stats(self) -> dict:
        return {**super().stats(), "prewarmed_blocks": self.prewarmed_blocks}


def make_hooks(sc, spec: AutoscalingSpec, v: Variant) -> ScalerHooks:
    if v.kind == "serve":
        return ServeHooks(sc, spec, v)
    if v.kind == "proxima":
        return ProximaHooks(sc, spec, v)
    return StaticHooks(sc, spec, spec.tick_s)
