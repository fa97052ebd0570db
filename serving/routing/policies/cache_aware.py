"""The SGLang router's cache-aware rule.

    load = in-flight requests per candidate
    if max(load) - min(load) > balance_abs and max(load) > balance_rel * min(load):
        least loaded                                   # imbalanced: balance first
    elif longest_prefix_match / prompt_tokens > cache_threshold:
        the candidate with the longest match           # cache hit
    else:
        least loaded

Defaults are SGLang's (cache_threshold 0.3, balance_abs 64, balance_rel 1.5).
"""

from __future__ import annotations

from serving.routing.policies.base import Context, Policy, pick_max, pick_min


class CacheAware(Policy):
    name = "cache_aware"

    def __init__(self, cache_threshold: float = 0.3, balance_abs_threshold: int = 64,
                 balance_rel_threshold: float = 1.5) -> None:
        self.cache_threshold = cache_threshold
        self.balance_abs = balance_abs_threshold
        self.balance_rel = balance_rel_threshold

    def choose(self, ctx: Context) -> tuple[int, str]:
        load = ctx.table.outstanding[ctx.cands]
        hi, lo = int(load.max()), int(load.min())
        if hi - lo > self.balance_abs and hi > self.balance_rel * lo:
            return pick_min(load, ctx.rng), f"imbalanced ({hi} vs {lo} in flight): least loaded"
        prompt = max(1, ctx.req.prompt_tokens)
        matched = ctx.cached_blocks * ctx.block_size
        best = int(matched.max()) if matched.size else 0
        rate = min(best, prompt) / prompt
        if rate > self.cache_threshold:
            return pick_max(matched, ctx.rng), f"prefix match {rate:.0%} > {self.cache_threshold:.0%}"
        return pick_min(load, ctx.rng), f"prefix match {rate:.0%}: least loaded"
