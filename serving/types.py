"""Hot-path value types shared by every stage.

Everything here is a frozen, slotted dataclass: a routing decision reads one
immutable snapshot of the world, and background loops build new snapshots and
swap them in instead of mutating the old ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum


class Health(str, Enum):
    UP = "up"
    DRAINING = "draining"  # finishes what it has, takes nothing new
    DOWN = "down"


@dataclass(frozen=True, slots=True)
class RouteRequest:
    """A request as the router sees it: sizes and hashes, never the text.

    `block_hashes` are the chained prefix hashes of the prompt's full blocks
    (see serving.prefix.hashing); they are computed once, before routing.
    """

    request_id: str
    model: str
    prompt_tokens: int
    block_hashes: tuple[int, ...] = ()
    max_tokens: int = 16
    client_region: str = ""
    allowed_regions: frozenset[str] | None = None  # None = anywhere
    tenant: str = ""
    session_id: str | None = None
    slo_ttft_ms: float | None = None
    exclude: frozenset[str] = frozenset()  # replicas already tried (failover)


@dataclass(frozen=True, slots=True)
class ReplicaSnapshot:
    """One engine replica's load, as reported by the engine (vLLM's counters)."""

    replica_id: str
    region: str
    model: str
    num_running: int = 0
    num_waiting: int = 0
    waiting_prefill_tokens: int = 0  # prompt tokens queued and not yet computed
    running_tokens: int = 0  # context tokens of running sequences
    kv_capacity_tokens: int = 0
    kv_usage: float = 0.0  # fraction of KV blocks in use, 0..1
    prefix_cache_queries: int = 0  # tokens looked up (vLLM counts tokens)
    prefix_cache_hits: int = 0
    health: Health = Health.UP
    circuit_open: bool = False  # set by the router's failover view, not the engine
    profile: str = ""
    timestamp: float = 0.0  # monotonic seconds when the engine took it

    @property
    def routable(self) -> bool:
        return self.health is Health.UP and not self.circuit_open


@dataclass(frozen=True, slots=True)
class TTFTParts:
    """Predicted time to first token, in milliseconds, split by cause."""

    rtt_ms: float
    queue_ms: float
    prefill_ms: float

    @property
    def total_ms(self) -> float:
        return self.rtt_ms + self.queue_ms + self.prefill_ms


@dataclass(frozen=True, slots=True)
class Decision:
    """Where a request goes and why."""

    request_id: str
    replica_id: str
    region: str
    policy: str
    predicted: TTFTParts
    cached_tokens: int
    reason: str
    candidates: int = 0
    alternatives: tuple[str, ...] = field(default=())  # next-best replicas, for failover

    @property
    def predicted_ttft_ms(self) -> float:
        return self.predicted.total_ms
