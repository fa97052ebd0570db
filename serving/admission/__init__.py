"""Admission: token budgets (per tenant, per agent session), residency and tenant isolation."""

from serving.admission.budget import BudgetPolicy, Reservation, TokenBucket
from serving.admission.ledger import Ledger

__all__ = ["BudgetPolicy", "Ledger", "Reservation", "TokenBucket"]
