"""Classic load-only baselines: round_robin, random, least_request, power_of_two.

Load here is the router's own count of routed-but-unfinished requests, as
vllm-router and the SGLang router count it: it is exact and needs no report.
"""

from __future__ import annotations

from serving.routing.policies.base import Context, Policy, pick_min


class RoundRobin(Policy):
    name = "round_robin"

    def __init__(self) -> None:
        self._next = 0

    def choose(self, ctx: Context) -> tuple[int, str]:
        return self._next % ctx.cands.size, "round robin"

    def on_routed(self, ctx: Context, pos: int) -> None:
        self._next = pos + 1


class Random(Policy):
    name = "random"

    def choose(self, ctx: Context) -> tuple[int, str]:
        return int(ctx.rng.integers(ctx.cands.size)), "uniform random"


class LeastRequest(Policy):
    name = "least_request"

    def choose(self, ctx: Context) -> tuple[int, str]:
        load = ctx.table.outstanding[ctx.cands]
        pos = pick_min(load, ctx.rng)
        return pos, f"fewest in-flight requests ({int(load[pos])})"


class PowerOfTwo(Policy):
    name = "power_of_two"

    def choose(self, ctx: Context) -> tuple[int, str]:
        n = ctx.cands.size
        if n == 1:
            return 0, "only candidate"
        i, j = ctx.rng.choice(n, size=2, replace=False)
        load = ctx.table.outstanding[ctx.cands]
        pos = int(i if load[i] <= load[j] else j)
        return pos, f"lighter of two sampled ({int(load[i])} vs {int(load[j])} in flight)"
