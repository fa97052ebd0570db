"""The autoscaling policy: target replicas per pool (region, model tier), pure.

    plan(demand, limits, config) -> {pool: replicas}
    decide(obs, limits, config, state) -> (Decision, state)

`plan` is greedy on one objective, the request-weighted mean predicted cost
per request in milliseconds (serving.autoscaler.model, the router's latency
model plus RTT):

    cost(client) = ttft + slo_weight * max(0, ttft - slo_ttft_ms)
    J = sum(rps * cost) / sum(rps) + unserved_rps * UNSERVED_MS / sum(rps)

Starting from every pool's minimum, it adds one replica at a time to the pool
where it lowers J most per GPU, while that gain is at least
`replica_cost_ms` per GPU and the global GPU budget and the pool's maximum
allow. Because a region without replicas is served from its nearest region
at that RTT, a replica lands in a new region exactly when serving that
region's clients locally saves more than it costs; under a binding budget
the same greedy order decides which region gets the scarce replicas, so
replicas move toward demand.

`decide` turns plans into actions with hysteresis, so a noisy or oscillating
input does not flap:

- up: to the plan for the observed demand, at most once per
  `upscale_cooldown_s` per pool;
- down: only to the plan for demand inflated by `hysteresis` (a dead band),
  and only after that lower plan has held for `downscale_delay_s`; the pool
  goes to the highest of the lower plans seen meanwhile;
- move: when the budget blocks an up, a pool the plan itself (no dead band:
  the plan is already the budget's best split) has wanted smaller for
  `move_delay_s` (shorter) gives its replicas up now, so the blocked region
  gets them once they drained;
- a pool gives up at most `max_down_step` replicas per decision, and demand
  is planned for where its trend says it will be in `lead_s` (the time a
  replica takes to arrive: under a binding budget `move_delay_s` + drain +
  start), rising or falling, so replicas leave a region past its peak for
  one on its way up before the ramp, not after it.

Replicas that are draining still hold their GPU, so they count against the
budget until they stop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from serving.autoscaler.model import Demand, kv_utilization, predict, utilization
from serving.engines.profiles import EngineProfile

Pool = tuple[str, str]  # (region, model)
UNSERVED_MS = 1e6  # cost of a request no pool has room for


@dataclass(frozen=True, slots=True)
class PoolLimits:
    min_replicas: int = 0
    max_replicas: int = 1 << 30
    gpus_per_replica: int = 1


@dataclass(frozen=True, slots=True)
class Limits:
    pools: dict[Pool, PoolLimits]
    max_gpus: int | None = None  # the global budget (replicas when every replica is one GPU)


@dataclass(frozen=True, slots=True)
class PolicyConfig:
    profiles: dict[Pool, EngineProfile]
    rtt_ms: dict[str, dict[str, float]]
    slo_ttft_ms: float = 1000.0
    slo_weight: float = 10.0
    max_utilization: float = 0.85
    replica_cost_ms: float = 1.0  # a replica must lower the mean cost per request this much
    hysteresis: float = 0.15
    upscale_cooldown_s: float = 30.0
    downscale_delay_s: float = 300.0
    move_delay_s: float = 60.0
    lead_s: float = 60.0  # plan for the demand the trend predicts this far ahead (the time a
    #                       replica takes to arrive), within [0.5, 2] x now's
    max_down_step: int = 2  # replicas one pool gives up per decision
    kv_capacity_tokens: dict[Pool, int] = field(default_factory=dict)  # a replica's KV cache per pool


@dataclass(frozen=True, slots=True)
class Observation:
    now: float
    demand: dict[str, dict[str, Demand]]  # model -> client region -> demand over the window
    replicas: dict[Pool, int]  # serving or starting (not draining)
    draining: dict[Pool, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class PoolState:
    last_up: float = -math.inf
    last_down: float = -math.inf
    below_since: float | None = None  # since when a lower plan held
    below_max: int = 0  # the highest lower plan seen since then
    over_since: float | None = None  # since when the plan itself (no dead band) wanted fewer
    over_max: int = 0  # the highest such plan since then


@dataclass(frozen=True, slots=True)
class Decision:
    targets: dict[Pool, int]
    plan: dict[Pool, int]  # what the demand alone asks for
    predicted_ttft_ms: dict[str, dict[str, float]]  # model -> client region -> TTFT at `targets`
    reasons: dict[Pool, str]


# --- planning -------------------------------------------------------------------
def objective(demand: dict[str, Demand], replicas: dict[str, int], profiles: dict[str, EngineProfile],
              cfg: PolicyConfig, total_rps: float, kv: dict[str, int] | None = None) -> float:
    pred = predict(demand, replicas, profiles, cfg.rtt_ms, cfg.max_utilization, kv_capacity=kv)
    j = pred.unserved_rps * UNSERVED_MS
    for client, t in pred.ttft_ms.items():
        j += demand[client].rps * (t + cfg.slo_weight * max(0.0, t - cfg.slo_ttft_ms))
    return j / total_rps if total_rps > 0 else 0.0


def plan(demand: dict[str, dict[str, Demand]], limits: Limits, cfg: PolicyConfig) -> dict[Pool, int]:
    pools = sorted(limits.pools)
    lims = limits.pools
    budget = math.inf if limits.max_gpus is None else limits.max_gpus
    total_rps = sum(d.rps for by_client in demand.values() for d in by_client.values())
    cost = _Costs(demand, cfg, total_rps)
    # Start from each region's own need (its clients at max_utilization), within limits.
    alloc = {p: min(lims[p].max_replicas, max(lims[p].min_replicas, _local_need(demand, p, cfg)))
             for p in pools}

    def gpus() -> int:
        return sum(n * lims[p].gpus_per_replica for p, n in alloc.items())

    def delta(p: Pool, k: int) -> float:  # change of J when pool p gets k more replicas
        before = cost(alloc, p[1])
        alloc[p] += k
        after = cost(alloc, p[1])
        alloc[p] -= k
        return after - before

    def cheapest_removal() -> tuple[Pool | None, float]:
        best, best_d = None, math.inf
        for p in pools:
            if alloc[p] > lims[p].min_replicas:
                d = delta(p, -1) / lims[p].gpus_per_replica
                if d < best_d - 1e-9:
                    best, best_d = p, d
        return best, best_d

    while gpus() > budget:  # over the budget: drop what hurts least
        p, _ = cheapest_removal()
        if p is None:
            break
        alloc[p] -= 1
    while True:  # add where it helps most, while it is worth a replica
        best, best_gain = None, 0.0
        for p in pools:
            if alloc[p] < lims[p].max_replicas and gpus() + lims[p].gpus_per_replica <= budget:
                gain = -delta(p, 1) / lims[p].gpus_per_replica
                if gain > best_gain + 1e-9:
                    best, best_gain = p, gain
        if best is None or best_gain < cfg.replica_cost_ms:
            break
        alloc[best] += 1
    while True:  # remove what is not worth its replica (the start may overshoot)
        p, d = cheapest_removal()
        if p is None or d >= cfg.replica_cost_ms:
            break
        alloc[p] -= 1
    for _ in range(4 * len(pools) * max(1, sum(alloc.values()))):  # moves, while they help
        best, best_gain = None, 1e-6
        for a in pools:
            if alloc[a] <= lims[a].min_replicas:
                continue
            for b in pools:
                if b == a or alloc[b] >= lims[b].max_replicas or \
                        gpus() - lims[a].gpus_per_replica + lims[b].gpus_per_replica > budget:
                    continue
                before = cost(alloc, a[1]) + (cost(alloc, b[1]) if b[1] != a[1] else 0.0)
                alloc[a] -= 1
                alloc[b] += 1
                after = cost(alloc, a[1]) + (cost(alloc, b[1]) if b[1] != a[1] else 0.0)
                alloc[a] += 1
                alloc[b] -= 1
                if before - after > best_gain:
                    best, best_gain = (a, b), before - after
        if best is None:
            break
        alloc[best[0]] -= 1
        alloc[best[1]] += 1
    return alloc


def _local_need(demand: dict[str, dict[str, Demand]], pool: Pool, cfg: PolicyConfig) -> int:
    region, model = pool
    d = demand.get(model, {}).get(region)
    if d is None or d.rps <= 0:
        return 0
    prof, cap = cfg.profiles[pool], cfg.kv_capacity_tokens.get(pool, 0)
    n = max(1, math.ceil(utilization(prof, d.uncached_tps, d.decode_tps, 1) / cfg.max_utilization))
    while n < 1024 and kv_utilization(prof, cap, d.uncached_tps, d.decode_tps, d.rps, n) > cfg.max_utilization:
        n += 1  # its clients' KV needs more replicas than their compute
    return n


def _kv(cfg: PolicyConfig, model: str) -> dict[str, int]:
    return {r: c for (r, m), c in cfg.kv_capacity_tokens.items() if m == model}


class _Costs:
    """J per model for an allocation, memoised (the search revisits allocations)."""

    def __init__(self, demand, cfg: PolicyConfig, total_rps: float):
        self.demand, self.cfg, self.total_rps = demand, cfg, total_rps
        self.memo: dict[tuple, float] = {}

    def __call__(self, alloc: dict[Pool, int], model: str) -> float:
        key = (model,) + tuple(n for (_, m), n in sorted(alloc.items()) if m == model)
        v = self.memo.get(key)
        if v is None:
            by_region = {r: n for (r, m), n in alloc.items() if m == model}
            profiles = {r: self.cfg.profiles[(r, m)] for (r, m) in alloc if m == model}
            v = self.memo[key] = objective(self.demand.get(model, {}), by_region, profiles, self.cfg,
                                           self.total_rps, _kv(self.cfg, model))
        return v


def forecast(demand: dict[str, dict[str, Demand]], lead_s: float) -> dict[str, dict[str, Demand]]:
    """Demand where its trend will be in lead_s (between half and twice now's).

    Falling demand too: a replica asked for now serves in lead_s, and under a binding
    budget it comes from a region past its peak; planning that region for its present
    demand kept its replicas until the next region's ramp had arrived (follow-the-sun
    with real time zones: us-east held at 1-3 replicas through its own ramp). The
    dead band and downscale_delay_s still guard plain scale-downs against a noisy trend.
    """
    out = {}
    for m, by_client in demand.items():
        out[m] = {}
        for c, d in by_client.items():
            k = min(2.0, max(0.5, 1.0 + d.growth * lead_s))
            out[m][c] = d if k == 1.0 else replace(d, rps=d.rps * k, prompt_tps=d.prompt_tps * k,
                                                   decode_tps=d.decode_tps * k)
    return out


def scaled(demand: dict[str, dict[str, Demand]], k: float) -> dict[str, dict[str, Demand]]:
    return {m: {c: replace(d, rps=d.rps * k, prompt_tps=d.prompt_tps * k, decode_tps=d.decode_tps * k)
                for c, d in by_client.items()} for m, by_client in demand.items()}


# --- deciding, with hysteresis ------------------------------------------------------
def decide(obs: Observation, limits: Limits, cfg: PolicyConfig,
           state: dict[Pool, PoolState] | None = None) -> tuple[Decision, dict[Pool, PoolState]]:
    now = obs.now
    state = dict(state or {})
    demand = forecast(obs.demand, cfg.lead_s)
    up_plan = plan(demand, limits, cfg)
    down_plan = plan(scaled(demand, 1.0 + cfg.hysteresis), limits, cfg)
    targets: dict[Pool, int] = {}
    reasons: dict[Pool, str] = {}
    ups: list[Pool] = []
    for p in sorted(limits.pools):
        lim, st = limits.pools[p], state.get(p, PoolState())
        cur = obs.replicas.get(p, 0)
        targets[p] = min(max(cur, lim.min_replicas), lim.max_replicas)
        if up_plan[p] > cur:
            st = replace(st, below_since=None, below_max=0)
            if now - st.last_up >= cfg.upscale_cooldown_s:
                ups.append(p)
            else:
                reasons[p] = f"up to {up_plan[p]} waits for the cooldown"
        elif down_plan[p] < cur:
            since, most = _held(st.below_since, st.below_max, down_plan[p], now)
            st = replace(st, below_since=since, below_max=most)
        else:
            st = replace(st, below_since=None, below_max=0)
        if up_plan[p] < cur:
            since, most = _held(st.over_since, st.over_max, up_plan[p], now)
            st = replace(st, over_since=since, over_max=most)
        else:
            st = replace(st, over_since=None, over_max=0)
        state[p] = st
    for p in sorted(limits.pools):  # downs whose lower plan held long enough
        st = state[p]
        if st.below_since is not None and now - st.below_since >= cfg.downscale_delay_s \
                and st.below_max < targets[p]:
            done = _down(p, st.below_max, targets, reasons, "the lower plan held", cfg.max_down_step)
            state[p] = replace(st, last_down=now, below_since=None if done else st.below_since,
                               below_max=0 if done else st.below_max)
    gpus_of = {p: limits.pools[p].gpus_per_replica for p in limits.pools}
    budget = math.inf if limits.max_gpus is None else limits.max_gpus

    def used() -> int:  # a replica taken down just now drains first: its GPU is not free yet
        return sum((max(targets[p], obs.replicas.get(p, 0)) + obs.draining.get(p, 0)) * gpus_of[p]
                   for p in targets)

    blocked = False
    # Grant ups one replica at a time, the pool furthest below its plan first.
    while ups:
        ups.sort(key=lambda p: (targets[p] - up_plan[p], p))
        p = ups[0]
        if targets[p] >= up_plan[p]:
            ups.pop(0)
            continue
        if used() + gpus_of[p] > budget:
            blocked = True
            break
        targets[p] += 1
        state[p] = replace(state[p], last_up=now)
        reasons[p] = f"up toward plan {up_plan[p]}"
    if blocked:  # a move: pools the budget's best split wants smaller give their replicas up sooner
        for p in sorted(limits.pools):
            st = state[p]
            if st.over_since is not None and now - st.over_since >= cfg.move_delay_s \
                    and st.over_max < targets[p]:
                done = _down(p, st.over_max, targets, reasons, "moved to a region that needs it",
                             cfg.max_down_step)
                state[p] = replace(st, last_down=now, below_since=None, below_max=0,
                                   over_since=None if done else st.over_since,
                                   over_max=0 if done else st.over_max)
    pred = {}
    for m in obs.demand:
        by_region = {r: n for (r, mm), n in targets.items() if mm == m}
        profiles = {r: cfg.profiles[(r, mm)] for (r, mm) in targets if mm == m}
        pred[m] = predict(obs.demand[m], by_region, profiles, cfg.rtt_ms, cfg.max_utilization,
                          kv_capacity=_kv(cfg, m)).ttft_ms
    return Decision(targets, up_plan, pred, reasons), state


def _held(since: float | None, most: int, plan: int, now: float) -> tuple[float, int]:
    """A lower plan holds on: (since when, the highest such plan seen since then)."""
    return (now, plan) if since is None else (since, max(most, plan))


def _down(p: Pool, plan_max: int, targets, reasons, why: str, step: int) -> bool:
    """Down toward plan_max, at most `step` replicas now; True once it is reached."""
    to = max(plan_max, targets[p] - step)
    reasons[p] = f"down to {to}: {why} (plan {plan_max})"
    targets[p] = to
    return to == plan_max
