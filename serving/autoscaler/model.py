"""Predicted TTFT per client region for a replica allocation: the planner's latency model.

It is the router's model (serving.routing.latency_model.ReplicaPerf: queue
wait + uncached prefill from the engine's step-time profile) applied to an
average replica of a pool (region, model) under a steady load, plus the RTT
from the client's region, as `predicted_ttft = rtt + queue + prefill`.

For a pool of n replicas carrying U uncached prompt tokens/s and D decode
tokens/s, one replica carries u = U/n and d = D/n. With the profile's step
`a + b * prefill_tokens + c * decode_seqs`, token work keeps a replica busy a
fraction rho = (b * u + c * d) / 1000 of the time, so a step lasts
a / (1 - rho) and n_run = d * step / 1000 sequences decode at once. A new
request finds about rho^2 / (1 - rho) requests queued ahead of it (M/M/1), i.e.
that many mean uncached prompts of queued prefill: that is the queue the
router's `queue_ms` prices, and `prefill_ms` prices its own prompt.

Where demand goes is what the router would do: each client region's demand
is placed slice by slice where its predicted TTFT is least (RTT + queue +
prefill at that pool's load), so a busy local pool spills to a neighbour
exactly when the RTT costs less than the queue, and a region with no
replicas of its own is served from its nearest region at that RTT cost.
A pool takes no load past `max_utilization`, of its compute or of its KV
cache; demand that fits nowhere is `unserved`.

The KV a pool's running requests hold is Little's law: each replica has
(rps / n) x lifetime requests running, a lifetime being the mean output
times the step time, each holding its uncached prompt and, on average, half
its output. The router predicts a wait for KV where a replica's cache is
full; the planner keeps pools out of that state (long prompts or long
answers need replicas for their KV before they need them for compute).
"""

from __future__ import annotations

from dataclasses import dataclass

from serving.engines.profiles import EngineProfile
from serving.routing.latency_model import ReplicaPerf

CHUNKS = 8  # slices of each client region's demand placed one at a time


@dataclass(frozen=True, slots=True)
class Demand:
    """Requests from one client region for one model, averaged over the window."""

    rps: float
    prompt_tps: float  # prompt tokens per second
    decode_tps: float  # output tokens per second
    cached_frac: float = 0.0  # share of prompt tokens the prefix caches held
    growth: float = 0.0  # relative change of rps per second over the window (trend)

    @property
    def uncached_tps(self) -> float:
        return self.prompt_tps * (1.0 - self.cached_frac)


@dataclass(frozen=True, slots=True)
class Prediction:
    ttft_ms: dict[str, float]  # client region -> demand-weighted predicted TTFT
    unserved_rps: float
    utilization: dict[str, float]  # pool region -> rho per replica


def utilization(profile: EngineProfile, uncached_tps: float, decode_tps: float, n: int) -> float:
    if n <= 0:
        return float("inf") if uncached_tps + decode_tps > 0 else 0.0
    return (profile.b_ms_per_token * uncached_tps + profile.c_ms_per_seq * decode_tps) / (1000.0 * n)


def _step_ms(profile: EngineProfile, rho: float) -> float:
    """A step's mean length at utilization rho: the fixed cost stretched by the token work."""
    return profile.a_ms / max(1e-6, 1.0 - rho)


def kv_utilization(profile: EngineProfile, kv_capacity_tokens: int, uncached_tps: float, decode_tps: float,
                   rps: float, n: int) -> float:
    """Share of each replica's KV cache the pool's running requests hold (see the module doc)."""
    if rps <= 0 or kv_capacity_tokens <= 0:
        return 0.0
    if n <= 0:
        return float("inf")
    step_ms = _step_ms(profile, min(utilization(profile, uncached_tps, decode_tps, n), 0.99))
    out = decode_tps / rps
    running = rps / n * out * step_ms / 1000.0
    return running * (uncached_tps / rps + out / 2.0) / kv_capacity_tokens


def engine_ttft_ms(perf: ReplicaPerf, rho: float, mean_uncached: float, decode_tps_per_replica: float) -> float:
    """Queue wait + prefill of a mean request on one replica at utilization rho (< 1)."""
    step = _step_ms(perf.profile, rho)
    n_run = int(decode_tps_per_replica * step / 1000.0)
    queued = rho * rho / max(1e-6, 1.0 - rho) * mean_uncached
    return perf.queue_ms(int(queued), n_run) + perf.prefill_ms(max(1, int(mean_uncached)), n_run)


def predict(demand: dict[str, Demand], replicas: dict[str, int], profiles: dict[str, EngineProfile],
            rtt_ms: dict[str, dict[str, float]], max_utilization: float = 0.85,
            scale: dict[str, float] | None = None, kv_capacity: dict[str, int] | None = None) -> Prediction:
    """Predicted TTFT by client region when `replicas[region]` replicas serve `demand` (one model);
    `kv_capacity[region]` is a replica's KV cache in tokens (absent: not a limit)."""
    scale = scale or {}
    kv_capacity = kv_capacity or {}
    pools = [r for r, n in replicas.items() if n > 0]
    load = {r: [0.0, 0.0, 0.0] for r in pools}  # uncached tps, decode tps, rps
    share: dict[str, list[tuple[str, float]]] = {}
    # Each client's demand is placed in CHUNKS slices, clients interleaved, each slice where
    # its predicted TTFT (RTT + that pool's queue and prefill with the slice added) is least:
    # what routing every request to its least predicted TTFT settles to. A pool takes no
    # slice past max_utilization; what fits nowhere is unserved.
    left = {c: 1.0 for c, d in demand.items() if d.rps > 0}
    order = sorted(left, key=lambda c: -demand[c].rps)
    for _ in range(CHUNKS):
        for client in order:
            d = demand[client]
            best, best_t = None, float("inf")
            for r in pools:
                u = load[r][0] + d.uncached_tps / CHUNKS
                dec = load[r][1] + d.decode_tps / CHUNKS
                rho = utilization(profiles[r], u, dec, replicas[r])
                if rho > max_utilization:
                    continue
                rps = load[r][2] + d.rps / CHUNKS
                if kv_utilization(profiles[r], kv_capacity.get(r, 0), u, dec, rps, replicas[r]) > max_utilization:
                    continue
                t = _rtt(rtt_ms, client, r) + engine_ttft_ms(
                    ReplicaPerf(profiles[r], scale.get(r, 1.0)), rho, u / rps, dec / replicas[r])
                if t < best_t:
                    best, best_t = r, t
            if best is None:
                continue
            load[best][0] += d.uncached_tps / CHUNKS
            load[best][1] += d.decode_tps / CHUNKS
            load[best][2] += d.rps / CHUNKS
            share.setdefault(client, []).append((best, 1.0 / CHUNKS))
            left[client] -= 1.0 / CHUNKS
    unserved = sum(demand[c].rps * f for c, f in left.items() if f > 1e-9)
    engine: dict[str, float] = {}
    rho: dict[str, float] = {}
    for r in pools:
        u, dec, rps = load[r]
        rho[r] = utilization(profiles[r], u, dec, replicas[r])
        perf = ReplicaPerf(profiles[r], scale.get(r, 1.0))
        mean_uncached = u / rps if rps > 0 else 0.0
        engine[r] = engine_ttft_ms(perf, min(rho[r], 0.99), mean_uncached, dec / replicas[r])
    ttft = {}
    for client, parts in share.items():
        total = sum(f for _, f in parts)
        ttft[client] = sum(f * (_rtt(rtt_ms, client, r) + engine[r]) for r, f in parts) / total
    return Prediction(ttft, unserved, rho)


def _rtt(rtt_ms: dict[str, dict[str, float]], a: str, b: str) -> float:
    v = rtt_ms.get(a, {}).get(b)
    if v is None:
        v = rtt_ms.get(b, {}).get(a, 0.0)
    return float(v)
