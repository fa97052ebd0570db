"""Delegation: the `auto` model alias picks a model tier (small or large) per request."""

from serving.delegation.cascade import passes_check
from serving.delegation.tiers import DelegationConfig, Features, Tier, TierChoice, choose_tier

__all__ = ["DelegationConfig", "Features", "Tier", "TierChoice", "choose_tier", "passes_check"]
