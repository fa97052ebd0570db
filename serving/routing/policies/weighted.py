"""llm-d's default scheduling profile: weighted scorers, highest total wins.

    prefix = matched blocks / prompt blocks                       (0..1)
    queue  = (max_q - q) / (max_q - min_q), 1 when all equal       (q: waiting)
    kv     = 1 - kv_usage
    score  = 2 * prefix + 1 * queue + 1 * kv
"""

from __future__ import annotations

import numpy as np

from serving.routing.policies.base import Context, Policy, pick_max


class Weighted(Policy):
    name = "weighted"

    def __init__(self, prefix_weight: float = 2.0, queue_weight: float = 1.0,
                 kv_weight: float = 1.0) -> None:
        self.w = (prefix_weight, queue_weight, kv_weight)

    def choose(self, ctx: Context) -> tuple[int, str]:
        total = max(1, ctx.total_blocks)
        prefix = ctx.cached_blocks / total
        q = ctx.table.num_waiting[ctx.cands] + ctx.table.outstanding[ctx.cands]
        span = q.max() - q.min()
        queue = np.ones(q.size) if span == 0 else (q.max() - q) / span
        kv = 1.0 - ctx.table.kv_usage[ctx.cands]
        score = self.w[0] * prefix + self.w[1] * queue + self.w[2] * kv
        pos = pick_max(score, ctx.rng)
        return pos, (f"score {score[pos]:.2f} (prefix {prefix[pos]:.2f}, queue {queue[pos]:.2f}, "
                     f"kv {kv[pos]:.2f})")
