"""Budgets and residency wired into the ingress pipeline's admission seam.

    BudgetAdmission(ledger, policies).admit(job)   reserve prompt + max_tokens (429 if over)
    BudgetAdmission(ledger, policies).settle(...)  reconcile to the real usage, exactly once
    budgets_body(ledger, principal, session)   GET /v1/budgets: the caller's own budgets
    narrow(principal, header)             x-proxima-regions may only narrow residency

`ledger` is a serving.admission.stage.AsyncLedger: LocalLedger in one process,
serving.ray.ledger.LedgerClient over the ledger actor.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any, Mapping

from serving.admission.budget import BudgetPolicy, Reservation
from serving.admission.ledger import utc_day
from serving.admission.residency import effective_regions
from serving.admission.stage import AsyncLedger, admit, settle


class BudgetAdmission:
    """`policies` (tenant -> BudgetPolicy, "*" for the rest, as the ledger has them) lets
    a tenant with no limit skip the reservation: there is nothing to refuse, so the
    ledger's round trip (an actor call, ~1-2 ms) stays off the path to the first
    token. Its usage is still charged exactly once when the request settles
    (reconcile needs no prior hold). Without `policies` every request reserves.
    """

    def __init__(self, ledger: AsyncLedger, policies: Mapping[str, BudgetPolicy] | None = None):
        self.ledger = ledger
        self.policies = policies

    def unlimited(self, tenant: str) -> bool:
        if self.policies is None:
            return False
        p = self.policies.get(tenant, self.policies.get("*"))
        return p is None or p.unlimited

    async def admit(self, job: Any) -> Reservation:
        tenant = job.principal.tenant
        if self.unlimited(tenant):
            return Reservation(job.request_id, tenant, job.prompt_tokens + job.max_tokens,
                               utc_day(time.time()), job.session_id)
        return await admit(self.ledger, job.request_id, tenant, job.prompt_tokens,
                           job.max_tokens, job.session_id)

    async def settle(self, job: Any, ticket: Reservation | None, used_tokens: int) -> None:
        if ticket is not None:
            await settle(self.ledger, ticket, used_tokens)


async def budgets_body(ledger: AsyncLedger, tenant: str, session: str | None) -> dict:
    return await ledger.remaining(tenant, session)


def narrow(principal: Any, header_value: str | None) -> Any:
    """The principal with residency narrowed by the request's header (403 if it widens)."""
    regions = effective_regions(principal.allowed_regions, header_value)
    if regions == principal.allowed_regions:
        return principal
    return replace(principal, allowed_regions=regions)
