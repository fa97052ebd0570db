"""What a routing policy sees and returns.

A policy is a pure function of a `Context` (the request, its candidates and
their predicted TTFT parts): `choose` returns the position of the chosen
candidate and a reason. It never mutates shared state; if it keeps its own
(a round-robin counter), it changes it only in `on_routed`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from serving.routing.table import ReplicaTable
from serving.types import RouteRequest


@dataclass(frozen=True, slots=True)
class Context:
    req: RouteRequest
    table: ReplicaTable
    cands: np.ndarray  # indices into the table
    cached_blocks: np.ndarray  # per candidate, from the prefix index
    block_size: int
    rtt_ms: np.ndarray  # per candidate
    queue_ms: np.ndarray
    prefill_ms: np.ndarray
    rng: np.random.Generator
    ttft_ms: np.ndarray  # rtt + queue + prefill, per candidate
    now: float = 0.0  # the router's clock at the decision

    @property
    def total_blocks(self) -> int:
        return len(self.req.block_hashes)


class Policy:
    name: ClassVar[str] = ""

    def choose(self, ctx: Context) -> tuple[int, str]:
        raise NotImplementedError

    def on_routed(self, ctx: Context, pos: int) -> None:
        """Lifecycle hook: the request was sent to candidate `pos`."""

    def on_membership(self, ids: list[str]) -> None:
        """Lifecycle hook: the set of replicas changed."""


def pick_min(values: np.ndarray, rng: np.random.Generator) -> int:
    """Position of the minimum, ties broken at random so load spreads."""
    best = values.min()
    ties = np.flatnonzero(values == best)
    return int(ties[0] if ties.size == 1 else ties[rng.integers(ties.size)])


def pick_max(values: np.ndarray, rng: np.random.Generator) -> int:
    return pick_min(-values, rng)
