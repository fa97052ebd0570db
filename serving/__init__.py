"""Proxima: a latency-aware inference router for vLLM clusters."""

__version__ = "0.1.0"
