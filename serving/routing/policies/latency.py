"""Proxima's policy: least predicted time to first token.

    ttft(r) = rtt(client, region(r)) + queue_ms(r) + prefill_ms(r, prompt - cached(r))

Every term is in milliseconds (see routing.latency_model), so cache affinity,
load and distance trade off without weights. Candidates within
`max(tie_margin_ms, tie_margin_frac * best)` of the best are near-ties; among
them the most cached wins (the prediction cannot tell them apart, and staying
where the prefix is keeps it warm for the next call), and remaining ties are
sampled uniformly so a burst of identical cold requests spreads instead of
piling onto one replica.
"""

from __future__ import annotations

import numpy as np

from serving.routing.policies.base import Context, Policy


class Latency(Policy):
    name = "latency"

    def __init__(self, tie_margin_ms: float = 1.0, tie_margin_frac: float = 0.02) -> None:
        if tie_margin_ms < 0 or tie_margin_frac < 0:
            raise ValueError("tie margins must be >= 0")
        self.tie_margin_ms = tie_margin_ms
        self.tie_margin_frac = tie_margin_frac

    def margin(self, best_ms: float) -> float:
        return max(self.tie_margin_ms, self.tie_margin_frac * best_ms)

    def choose(self, ctx: Context) -> tuple[int, str]:
        ttft = ctx.ttft_ms
        best = float(ttft.min())
        near = np.flatnonzero(ttft <= best + self.margin(best))
        if near.size > 1:  # among near-ties, the most cached first: it keeps the prefix warm
            cached = ctx.cached_blocks[near]
            near = near[cached == cached.max()]
        pos = int(near[0] if near.size == 1 else near[ctx.rng.integers(near.size)])
        cached = min(int(ctx.cached_blocks[pos]) * ctx.block_size, ctx.req.prompt_tokens)
        return pos, (f"least predicted TTFT {ttft[pos]:.1f} ms (rtt {ctx.rtt_ms[pos]:.0f}, "
                     f"queue {ctx.queue_ms[pos]:.1f}, prefill {ctx.prefill_ms[pos]:.1f}; "
                     f"cached {cached}/{ctx.req.prompt_tokens}; {near.size} near-tie)")
