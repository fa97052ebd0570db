"""Proxima's policy: least predicted time to first token, plus what a recomputed prefix costs the others.

    ttft(r)   = rtt(client, region(r)) + queue_ms(r) + prefill_ms(r, prompt - cached(r))
    extra(r)  = b(r) * (uncached(r) - min over candidates of uncached)
    score(r)  = ttft(r) + load_weight * kappa(r) * extra(r) / (1 - u(r))
    kappa(r)  = rate(r) * (queue_ms(r) + prefill_ms(r)) / 1000

`queue_ms(r)` is the compute queued ahead, or, where r's KV cache cannot hold
that queue plus this prompt, the wait for its running requests to free enough
KV if that is longer (see Router.context). Every term is in milliseconds (see
routing.latency_model), so cache affinity, load and distance trade off
without weights. `extra(r)` is the prefill r
would spend on tokens another candidate already holds: work the fleet need
not do. The requests routed to r after this one wait for it: `rate(r)` is
how many per second the router has been sending there, so `kappa(r)` is how
many arrive while this one queues and prefills; and `u(r)` is r's KV cache
in use (capped at 0.95), because work added to a busy server stretches its
busy period by 1 / (1 - utilisation), and a continuous-batching engine is as
busy as the KV its running requests hold. Work that some replica must do
anyway (a prompt nobody holds) carries no such cost, so without prefix reuse
the policy is plain least predicted TTFT.

Without the second term the policy minimised each request's own TTFT: once a
shared prefix's replica had a queue longer than a cold prefill elsewhere, it
recomputed the prefix on another replica, and at cluster KV pressure
(shared-prefix-pressure at 200 requests/s) every copy took KV another
group's prefix needed, each miss queued more, and the fleet went from a 95%
hit rate to 48% and unbounded queues within ten seconds. With it the same
fleet holds at 280 requests/s (p99 23 ms, where cache_aware's is 600 ms) and
carries 400/s at the p99 cache_aware has at 280 (docs/simulation.md).
A copy still costs nothing where no traffic waits (an idle replica), so a
hot prefix spreads when its replica is the bottleneck. `load_weight` 0 is
the old policy.

Candidates within `max(tie_margin_ms, tie_margin_frac * best)` of the best
score are near-ties; among them the most cached wins (the prediction cannot
tell them apart, and staying where the prefix is keeps it warm for the next
call), and remaining ties are sampled uniformly so a burst of identical cold
requests spreads instead of piling onto one replica.

A request that belongs to a session (an agent loop, a chat) also weighs where
the session's next calls will go: they follow the prefix it leaves behind, so
placing this call far from its client makes them pay the distance again. For
such requests the policy adds

    session_horizon * (rtt(r) - least rtt among candidates)

where `session_horizon` is how many more calls are expected to follow (1 by
default). Without it, a session whose first call found the shared system
prompt cached one region away (2 ms faster than a cold local prefill) stayed
there for its whole life, paying 75 ms of RTT on every step while its prompt
grew too long to move home. Requests without a session are routed on their
own predicted TTFT and its cost to others alone.
"""

from __future__ import annotations

import numpy as np

from serving.routing.policies.base import Context, Policy

MAX_UTILISATION = 0.95  # caps the busy-period factor 1 / (1 - u) at 20


class Latency(Policy):
    name = "latency"

    def __init__(self, tie_margin_ms: float = 1.0, tie_margin_frac: float = 0.02,
                 session_horizon: float = 1.0, load_weight: float = 1.0) -> None:
        if tie_margin_ms < 0 or tie_margin_frac < 0 or session_horizon < 0 or load_weight < 0:
            raise ValueError("tie margins, session_horizon and load_weight must be >= 0")
        self.tie_margin_ms = tie_margin_ms
        self.tie_margin_frac = tie_margin_frac
        self.session_horizon = session_horizon
        self.load_weight = load_weight

    def margin(self, best_ms: float) -> float:
        return max(self.tie_margin_ms, self.tie_margin_frac * best_ms)

    def choose(self, ctx: Context) -> tuple[int, str]:
        ttft = ctx.ttft_ms
        score, why, toll = ttft, "", None
        if self.session_horizon and ctx.req.session_id is not None and ctx.cands.size > 1:
            rtt = ctx.rtt_ms
            extra = rtt - rtt.min()
            if extra.any():  # candidates at different distances: the session's next calls care
                score = score + self.session_horizon * extra
                why = f"; session: +{self.session_horizon:g}x the extra RTT its next call pays"
        if self.load_weight:
            cached = ctx.cached_blocks
            most = cached.max()
            holders = cached == most
            if most and not holders.all():  # some candidates would recompute blocks others hold
                # The toll is >= 0 and 0 for the candidates holding the most, so only candidates
                # scoring under their best (and its margin) before the toll can win: price those.
                bound = float(score[holders].min())
                sub = np.flatnonzero(score < bound + self.margin(bound))
                sub = sub[~holders[sub]]
                if sub.size:
                    rows = ctx.cands[sub]
                    engine_s = (ctx.queue_ms[sub] + ctx.prefill_ms[sub]) / 1000.0
                    behind = ctx.table.route_rate(rows, ctx.now) * engine_s  # arrivals that wait for it
                    busy = np.minimum(ctx.table.kv_usage[rows], MAX_UTILISATION)
                    held = (most - cached[sub]) * ctx.block_size  # tokens another candidate holds
                    recompute_ms = ctx.table.b_ms[rows] * np.minimum(held, ctx.req.prompt_tokens)
                    toll = np.zeros(score.size)
                    toll[sub] = self.load_weight * behind * recompute_ms / (1.0 - busy)
                    score = score + toll
        best = float(score.min())
        near = np.flatnonzero(score <= best + self.margin(best))
        if near.size > 1:  # among near-ties, the most cached first: it keeps the prefix warm
            cached = ctx.cached_blocks[near]
            near = near[cached == cached.max()]
        pos = int(near[0] if near.size == 1 else near[ctx.rng.integers(near.size)])
        cached = min(int(ctx.cached_blocks[pos]) * ctx.block_size, ctx.req.prompt_tokens)
        least = "least " if ttft[pos] <= ttft.min() else ""
        if toll is not None and toll[pos] > 0:
            why = f"; recomputing held tokens delays the next ones {toll[pos]:.1f} ms" + why
        kv = " waiting for KV" if ctx.queue_ms[pos] > ctx.table.queue_ms[ctx.cands[pos]] else ""
        return pos, (f"{least}predicted TTFT {ttft[pos]:.1f} ms (rtt {ctx.rtt_ms[pos]:.0f}, "
                     f"queue{kv} {ctx.queue_ms[pos]:.1f}, prefill {ctx.prefill_ms[pos]:.1f}; "
                     f"cached {cached}/{ctx.req.prompt_tokens}; {near.size} near-tie{why})")
