"""The central routing decision: filters, scorers, pick (see router.Router)."""

from serving.routing.policies import POLICIES, make_policy
from serving.routing.router import Router

__all__ = ["POLICIES", "Router", "make_policy"]
