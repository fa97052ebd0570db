"""Cache-aware scale-down and warm start, read off the router's prefix index.

- `coldest`: the replica to remove is the one whose cache served the least
  traffic lately (prompt tokens its prefix cache hit over the window), so
  removing it loses the least reuse; ties go to the one with the least work
  in flight (it drains soonest).
- `hottest_prefixes`: a new replica is pre-warmed with the blocks most
  replicas of its model hold (shared prefixes: system prompts, popular
  documents), most recently used first among equals, up to a block budget.
  A chain's parent blocks are held at least as widely and as recently as its
  children, so whole prefixes come first, parents before children.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Iterable, Sequence

from serving.prefix import PrefixIndex


@dataclass(frozen=True, slots=True)
class ReplicaHeat:
    replica_id: str
    hit_tokens: float  # prompt tokens served from its prefix cache over the window
    outstanding: int = 0  # requests in flight


def coldest(replicas: Sequence[ReplicaHeat]) -> str:
    if not replicas:
        raise ValueError("no replica to choose from")
    return min(replicas, key=lambda r: (r.hit_tokens, r.outstanding, r.replica_id)).replica_id


def hottest_prefixes(index: PrefixIndex, sources: Iterable[str], max_blocks: int,
                     min_holders: int = 1) -> list[int]:
    """Block hashes to pre-warm, in the order to compute them (parents first)."""
    holders: Counter = Counter()
    recency: dict[int, float] = {}
    for rid in sources:
        if rid not in index:
            continue
        blocks = index.blocks(rid)  # least recently used first
        n = len(blocks)
        for i, h in enumerate(blocks):
            holders[h] += 1
            r = (i + 1) / n
            if r > recency.get(h, 0.0):
                recency[h] = r
    ranked = sorted((h for h, c in holders.items() if c >= min_holders),
                    key=lambda h: (-holders[h], -recency[h]))
    return ranked[:max(0, max_blocks)]
