"""Proxima's policy: least predicted time to first token.

    ttft(r) = rtt(client, region(r)) + queue_ms(r) + prefill_ms(r, prompt - cached(r))

Every term is in milliseconds (see routing.latency_model), so cache affinity,
load and distance trade off without weights. Candidates within
`max(tie_margin_ms, tie_margin_frac * best)` of the best are near-ties; among
them the most cached wins (the prediction cannot tell them apart, and staying
where the prefix is keeps it warm for the next call), and remaining ties are
sampled uniformly so a burst of identical cold requests spreads instead of
piling onto one replica.

A request that belongs to a session (an agent loop, a chat) also weighs where
the session's next calls will go: they follow the prefix it leaves behind, so
placing this call far from its client makes them pay the distance again. For
such requests the policy minimises

    ttft(r) + session_horizon * (rtt(r) - least rtt among candidates)

where `session_horizon` is how many more calls are expected to follow (1 by
default). Without it, a session whose first call found the shared system
prompt cached one region away (2 ms faster than a cold local prefill) stayed
there for its whole life, paying 75 ms of RTT on every step while its prompt
grew too long to move home. Requests without a session are routed on their
own predicted TTFT alone.
"""

from __future__ import annotations

import numpy as np

from serving.routing.policies.base import Context, Policy


class Latency(Policy):
    name = "latency"

    def __init__(self, tie_margin_ms: float = 1.0, tie_margin_frac: float = 0.02,
                 session_horizon: float = 1.0) -> None:
        if tie_margin_ms < 0 or tie_margin_frac < 0 or session_horizon < 0:
            raise ValueError("tie margins and session_horizon must be >= 0")
        self.tie_margin_ms = tie_margin_ms
        self.tie_margin_frac = tie_margin_frac
        self.session_horizon = session_horizon

    def margin(self, best_ms: float) -> float:
        return max(self.tie_margin_ms, self.tie_margin_frac * best_ms)

    def choose(self, ctx: Context) -> tuple[int, str]:
        ttft = ctx.ttft_ms
        score, why = ttft, ""
        if self.session_horizon and ctx.req.session_id is not None and ctx.cands.size > 1:
            rtt = ctx.rtt_ms
            extra = rtt - rtt.min()
            if extra.any():  # candidates at different distances: the session's next calls care
                score = ttft + self.session_horizon * extra
                why = f"; session: +{self.session_horizon:g}x the extra RTT its next call pays"
        best = float(score.min())
        near = np.flatnonzero(score <= best + self.margin(best))
        if near.size > 1:  # among near-ties, the most cached first: it keeps the prefix warm
            cached = ctx.cached_blocks[near]
            near = near[cached == cached.max()]
        pos = int(near[0] if near.size == 1 else near[ctx.rng.integers(near.size)])
        cached = min(int(ctx.cached_blocks[pos]) * ctx.block_size, ctx.req.prompt_tokens)
        return pos, (f"{'least ' if not why else ''}predicted TTFT {ttft[pos]:.1f} ms (rtt {ctx.rtt_ms[pos]:.0f}, "
                     f"queue {ctx.queue_ms[pos]:.1f}, prefill {ctx.prefill_ms[pos]:.1f}; "
                     f"cached {cached}/{ctx.req.prompt_tokens}; {near.size} near-tie{why})")
