"""Budgets and residency wired into the ingress pipeline's admission seam.

    BudgetAdmission(ledger).admit(job)    reserve prompt + max_tokens (429 if over)
    BudgetAdmission(ledger).settle(...)   reconcile to the real usage, exactly once
    budgets_body(ledger, principal, session)   GET /v1/budgets: the caller's own budgets
    narrow(principal, header)             x-proxima-regions may only narrow residency

`ledger` is a serving.admission.stage.AsyncLedger: LocalLedger in one process,
serving.ray.ledger.LedgerClient over the ledger actor.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from serving.admission.budget import Reservation
from serving.admission.residency import effective_regions
from serving.admission.stage import AsyncLedger, admit, settle


class BudgetAdmission:
    def __init__(self, ledger: AsyncLedger):
        self.ledger = ledger

    async def admit(self, job: Any) -> Reservation:
        return await admit(self.ledger, job.request_id, job.principal.tenant, job.prompt_tokens,
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
