"""Budget value types: a tenant's limits, a reservation, and the token bucket.

A tenant has up to four limits, each optional (None = unlimited):

    tokens_per_minute          rate for the tenant (token bucket, refills continuously)
    tokens_per_day             cap for the tenant per UTC day
    session_tokens             cap for one agent session (x-session-id), for its lifetime
    session_tokens_per_minute  rate for one agent session

At admission a request reserves `prompt_tokens + max_tokens` against every
limit that applies; at the end it is reconciled to its real usage and the rest
is released (given back to the buckets, taken off the caps' held amounts).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

LIMITS = ("tokens_per_minute", "tokens_per_day", "session_tokens", "session_tokens_per_minute")


@dataclass(frozen=True, slots=True)
class BudgetPolicy:
    tokens_per_minute: int | None = None
    tokens_per_day: int | None = None
    session_tokens: int | None = None
    session_tokens_per_minute: int | None = None

    @property
    def unlimited(self) -> bool:
        """No rate and no cap: admission has nothing to hold or refuse."""
        return all(getattr(self, k) is None for k in LIMITS)

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None, where: str = "budget") -> "BudgetPolicy":
        d = dict(d or {})
        unknown = sorted(set(d) - set(LIMITS))
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {unknown}; expected some of {list(LIMITS)}")
        for k, v in d.items():
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v <= 0):
                raise ValueError(f"{where}.{k}: must be a positive integer or null, got {v!r}")
        return cls(**d)


@dataclass(frozen=True, slots=True)
class Reservation:
    """What admission held for one request; reconcile settles it exactly once."""

    request_id: str
    tenant: str
    tokens: int
    day: str  # UTC day the usage is charged to
    session: str | None = None


class TokenBucket:
    """Continuous-refill bucket: `capacity` tokens, refilled at capacity per minute."""

    __slots__ = ("capacity", "rate_per_s", "level", "stamp")

    def __init__(self, per_minute: int, now: float):
        self.capacity = float(per_minute)
        self.rate_per_s = per_minute / 60.0
        self.level = float(per_minute)  # starts full
        self.stamp = now

    def _refill(self, now: float) -> None:
        if now > self.stamp:
            self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate_per_s)
            self.stamp = now

    def wait_s(self, tokens: int, now: float) -> float:
        """Seconds until `tokens` fit (0 if they fit now; inf if they never can)."""
        self._refill(now)
        if tokens > self.capacity:
            return float("inf")
        return max(0.0, (tokens - self.level) / self.rate_per_s)

    def take(self, tokens: int, now: float) -> None:
        self._refill(now)
        self.level -= tokens

    def give_back(self, tokens: int, now: float) -> None:
        self._refill(now)
        self.level = min(self.capacity, self.level + tokens)

    def remaining(self, now: float) -> int:
        self._refill(now)
        return max(0, int(self.level))

    def full(self, now: float) -> bool:
        """Refilled to capacity: the same as a new bucket (which starts full)."""
        self._refill(now)
        return self.level >= self.capacity
