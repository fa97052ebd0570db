"""Routing policies, selectable by name."""

from __future__ import annotations

import inspect
from typing import Any

from serving.routing.policies.base import Context, Policy
from serving.routing.policies.cache_aware import CacheAware
from serving.routing.policies.consistent_hash import ConsistentHash
from serving.routing.policies.latency import Latency
from serving.routing.policies.simple import LeastRequest, PowerOfTwo, Random, RoundRobin
from serving.routing.policies.weighted import Weighted

POLICIES: dict[str, type[Policy]] = {p.name: p for p in (
    RoundRobin, Random, LeastRequest, PowerOfTwo, ConsistentHash, CacheAware, Weighted, Latency)}


def make_policy(name: str, **options: Any) -> Policy:
    try:
        cls = POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown routing policy {name!r}; known: {sorted(POLICIES)}") from None
    params = inspect.signature(cls.__init__).parameters
    for key, value in options.items():
        default = params[key].default if key in params else None
        numeric = isinstance(default, (int, float)) and not isinstance(default, bool)
        if numeric and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ValueError(f"bad options for routing policy {name!r}: {key} must be a number, got {value!r}")
    try:
        return cls(**options)
    except TypeError as e:
        raise ValueError(f"bad options for routing policy {name!r}: {e}") from None


__all__ = ["POLICIES", "Context", "Policy", "make_policy"]
