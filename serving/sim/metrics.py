"""Per-request outcomes -> the per-policy summary, and the oracle hit rate.

Client-observed times add the RTT between the client's region and the
serving replica's region: TTFT = engine TTFT + rtt, E2E likewise.
TPOT = (finish - first token) / (output tokens - 1). A request is *good* when it
finished, its TTFT is within its SLO (the source's, else the scenario's) and
its TPOT within the scenario's; `goodput` is the fraction of all requests
that were good (failed ones count against it), `goodput_rps` the same per
second of arrivals. `cache_hit_rate` is what the engines count: prompt tokens
found in the prefix cache over prompt tokens looked up, summed over replicas.
`oracle_hit_rate` is the same ratio for an infinite cache that every replica
shares: a prompt block hits if any earlier request had it.
"""

from __future__ import annotations

from array import array
from collections import Counter
from typing import Iterable

import numpy as np

from serving.sim.scenario import Scenario


def _pct(xs, q: float) -> float:
    return round(float(np.percentile(np.frombuffer(xs, dtype=np.float64), q)), 3) if len(xs) else 0.0


class Recorder:
    def __init__(self, sc: Scenario):
        self.sc = sc
        self.ttft, self.e2e, self.tpot = array("d"), array("d"), array("d")
        self.by_region: dict[str, tuple[array, array]] = {}
        self.good = 0
        self.out_tokens = 0
        self.failures: Counter = Counter()
        self.t_samples: list[float] = []
        self.queue: dict[str, list[int]] = {r: [] for r in sc.regions}
        self.first_arrival = float("inf")
        self.last_arrival = 0.0

    def done(self, r, t: float, rep) -> None:
        a = r.a
        ttft = (r.t_first - a.t + r.rtt_s) * 1000.0
        e2e = (t - a.t + r.rtt_s) * 1000.0
        self.ttft.append(ttft)
        self.e2e.append(e2e)
        ok = ttft <= (a.slo_ttft_ms if a.slo_ttft_ms is not None else self.sc.slo_ttft_ms)
        if a.output_len > 1:
            tpot = (t - r.t_first) * 1000.0 / (a.output_len - 1)
            self.tpot.append(tpot)
            ok = ok and tpot <= self.sc.slo_tpot_ms
        self.good += ok
        self.out_tokens += a.output_len
        reg = self.by_region.get(a.region)
        if reg is None:
            reg = self.by_region[a.region] = (array("d"), array("d"))
        reg[0].append(ttft)
        reg[1].append(e2e)
        self._seen(a.t)

    def failed(self, r, reason: str) -> None:
        self.failures[reason] += 1
        self._seen(r.a.t)

    def _seen(self, t: float) -> None:
        if t < self.first_arrival:
            self.first_arrival = t
        if t > self.last_arrival:
            self.last_arrival = t

    def sample(self, t: float, replicas: Iterable) -> None:
        self.t_samples.append(round(t, 3))
        depth = dict.fromkeys(self.queue, 0)
        for rep in replicas:
            depth[rep.region] += len(rep.core.waiting)
        for region, q in self.queue.items():
            q.append(depth[region])

    def series(self) -> dict:
        by_region = {reg: {"ttft_p50_ms": _pct(x[0], 50), "ttft_p99_ms": _pct(x[0], 99),
                           "e2e_p50_ms": _pct(x[1], 50)} for reg, x in sorted(self.by_region.items())}
        return {"t_s": self.t_samples, "queue_depth": self.queue, "ttft_ms": list(self.ttft),
                "by_client_region": by_region}

    def summary(self, now: float, replicas: list) -> dict:
        finished = len(self.ttft)
        failed = sum(self.failures.values())
        total = finished + failed
        queries = sum(r.core.queries for r in replicas)
        hits = sum(r.core.hits for r in replicas)
        span = max(1e-9, now)
        alive = [(r.died if r.died is not None else now) - r.born for r in replicas]
        hours = sum(alive) / 3600.0
        cost = sum(s / 3600.0 * self.sc.regions[r.region].usd_per_hour for s, r in zip(alive, replicas))
        arrivals_span = max(1e-9, min(self.sc.duration_s, self.last_arrival) or self.sc.duration_s)
        return {
            "requests": total, "finished": finished, "failed": failed,
            "failed_by_reason": dict(sorted(self.failures.items())),
            "ttft_p50_ms": _pct(self.ttft, 50), "ttft_p90_ms": _pct(self.ttft, 90),
            "ttft_p99_ms": _pct(self.ttft, 99), "tpot_p50_ms": _pct(self.tpot, 50),
            "tpot_p99_ms": _pct(self.tpot, 99), "e2e_p50_ms": _pct(self.e2e, 50),
            "e2e_p99_ms": _pct(self.e2e, 99),
            "cache_hit_rate": round(hits / queries, 4) if queries else 0.0,
            "goodput": round(self.good / total, 4) if total else 0.0,
            "goodput_rps": round(self.good / arrivals_span, 3),
            "throughput_tok_s": round(self.out_tokens / span, 1),
            "replica_hours": round(hours, 3), "cost_usd": round(cost, 2),
            "utilization": round(sum(r.busy_s for r in replicas) / max(1e-9, hours * 3600.0), 4),
            "preemptions": sum(r.core.preemptions for r in replicas),
            "sim_time_s": round(now, 3),
        }


def oracle_hit_rate(stream, hasher) -> float:
    """Hit rate of one infinite cache shared by all: leading blocks any earlier prompt had.

    Counted as the engines count (at most all but the last token's block)."""
    seen: set[int] = set()
    bs = hasher.bs
    queries = hits = 0
    for a in stream:
        hs = hasher.hashes(a.segments, a.prompt_len, a.model, a.tenant)
        n = 0
        for h in hs:
            if h not in seen:
                break
            n += 1
        if n * bs >= a.prompt_len:
            n = (a.prompt_len - 1) // bs
        queries += a.prompt_len
        hits += n * bs
        seen.update(hs)
    return round(hits / queries, 4) if queries else 0.0
