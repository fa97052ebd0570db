"""Failover: circuit breakers per replica and region, health checks, retry and continuation."""

from serving.failover.breaker import BreakerConfig, FailoverView
from serving.failover.dispatch import RetryPolicy, continuation, stream_with_failover

__all__ = ["BreakerConfig", "FailoverView", "RetryPolicy", "continuation", "stream_with_failover"]
