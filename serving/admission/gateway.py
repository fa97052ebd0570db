"""Budgets and residency wired into the ingress pipeline's admission seam.

    BudgetAdmission(ledger, policies).admit(job)   reserve prompt + n x max_tokens (429 if over)
    BudgetAdmission(ledger, policies).settle(...)  reconcile to the real usage, exactly once

Neither waits on the ledger without bound: a reservation it does not answer
within `reserve_timeout_s` is a 503 (`ledger_unavailable`, Retry-After), and
the request's end waits at most `settle_wait_s` for its charge, which then goes
on in the background (retried; reconcile is idempotent per request id). A
stalled ledger actor (a restart, or Ray's ordered actor queue waiting for a
lost task, ray-project/ray#59667) must not hang responses, least of all for
tenants whose usage is only being recorded.
    budgets_body(ledger, principal, session)   GET /v1/budgets: the caller's own budgets
    narrow(principal, header)             x-proxima-regions may only narrow residency

`ledger` is a serving.admission.stage.AsyncLedger: LocalLedger in one process,
serving.ray.ledger.LedgerClient over the ledger actor.

With `hold_refresh_s`, the holds of requests still running are touched at the
ledger that often (one call for all of them), so a generation longer than the
ledger's `reservation_ttl_s` keeps its hold; a crashed ingress stops touching,
and its holds expire as before.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import replace
from typing import Any, Mapping

from serving.admission.budget import BudgetPolicy, Reservation
from serving.admission.ledger import utc_day
from serving.admission.residency import effective_regions
from serving.admission.stage import AsyncLedger, admit, settle
from serving.errors import LedgerUnavailable

log = logging.getLogger(__name__)


class BudgetAdmission:
    """`policies` (tenant -> BudgetPolicy, "*" for the rest, as the ledger has them) lets
    a tenant with no limit skip the reservation: there is nothing to refuse, so the
    ledger's round trip (an actor call, ~1-2 ms) stays off the path to the first
    token. Its usage is still charged exactly once when the request settles
    (reconcile needs no prior hold). Without `policies` every request reserves.
    """

    def __init__(self, ledger: AsyncLedger, policies: Mapping[str, BudgetPolicy] | None = None, *,
                 reserve_timeout_s: float = 5.0, settle_wait_s: float = 1.0, hold_refresh_s: float | None = None):
        self.ledger = ledger
        self.policies = policies
        self.reserve_timeout_s, self.settle_wait_s = reserve_timeout_s, settle_wait_s
        self.pending: set[asyncio.Task] = set()  # settlements still going on after their response
        self.hold_refresh_s = hold_refresh_s
        self.running: set[str] = set()  # request ids whose holds are open (admitted, not yet settled)
        self._refresher: asyncio.Task | None = None
        self._idle = asyncio.Event()

    def unlimited(self, tenant: str) -> bool:
        if self.policies is None:
            return False
        p = self.policies.get(tenant, self.policies.get("*"))
        return p is None or p.unlimited

    async def admit(self, job: Any) -> Reservation:
        tenant = job.principal.tenant
        tokens = job.prompt_tokens + job.completion_budget  # max_tokens for each of n choices
        if self.unlimited(tenant):
            return Reservation(job.request_id, tenant, tokens, utc_day(time.time()), job.session_id)
        try:
            r = await asyncio.wait_for(admit(self.ledger, job.request_id, tenant, job.prompt_tokens,
                                             job.completion_budget, job.session_id), self.reserve_timeout_s)
            self._running(r)
            return r
        except asyncio.TimeoutError:
            # It may still land: release it once it does (the actor runs one caller's calls in order).
            self._background(Reservation(job.request_id, tenant, tokens, utc_day(time.time()),
                                         job.session_id), 0)
            raise LedgerUnavailable(f"The budget ledger did not answer within {self.reserve_timeout_s:g} s; "
                                    "retry shortly.") from None

    async def settle(self, job: Any, ticket: Reservation | None, used_tokens: int) -> None:
        if ticket is None:
            return
        self.running.discard(ticket.request_id)
        if not self.running:
            self._idle.set()
        task = self._background(ticket, used_tokens)
        if self.settle_wait_s <= 0 or self.unlimited(ticket.tenant):
            # configured not to wait, or nothing to hold to (a tenant without a budget: its usage
            # is only recorded): the charge goes on in the background, the response does not wait
            return
        try:
            await asyncio.wait_for(asyncio.shield(task), self.settle_wait_s)
        except asyncio.TimeoutError:
            log.warning("request %s: the ledger has not recorded its %d tokens after %g s; "
                        "settling in the background", ticket.request_id, used_tokens, self.settle_wait_s)

    async def drain(self, timeout_s: float) -> int:
        """The ingress replica is stopping: wait up to `timeout_s` for the charges still
        settling in the background (a task left behind would die with the replica and its
        usage go unrecorded). Returns how many are still unsettled."""
        if self.pending:
            await asyncio.wait(set(self.pending), timeout=timeout_s)
        return sum(not t.done() for t in self.pending)

    def _running(self, r: Reservation) -> None:
        if self.hold_refresh_s is None:
            return
        self.running.add(r.request_id)
        self._idle.clear()
        if self._refresher is None or self._refresher.done():
            self._refresher = asyncio.ensure_future(self._refresh())

    async def _refresh(self) -> None:
        """While requests hold budget, touch their holds every `hold_refresh_s` (ends when none do)."""
        while self.running:
            try:
                await asyncio.wait_for(self._idle.wait(), self.hold_refresh_s)
                continue  # everything settled: the loop ends
            except asyncio.TimeoutError:
                pass
            ids = sorted(self.running)
            try:
                await asyncio.wait_for(self.ledger.touch(ids), self.reserve_timeout_s)
            except Exception as e:  # the next round tries again; the TTL is three rounds long
                log.warning("could not refresh %d budget holds at the ledger: %s", len(ids), type(e).__name__)

    def _background(self, ticket: Reservation, used: int) -> asyncio.Task:
        task = asyncio.ensure_future(settle(self.ledger, ticket, used))
        self.pending.add(task)
        task.add_done_callback(self.pending.discard)
        return task


async def budgets_body(ledger: AsyncLedger, tenant: str, session: str | None) -> dict:
    return await ledger.remaining(tenant, session)


def narrow(principal: Any, header_value: str | None) -> Any:
    """The principal with residency narrowed by the request's header (403 if it widens)."""
    regions = effective_regions(principal.allowed_regions, header_value)
    if regions == principal.allowed_regions:
        return principal
    return replace(principal, allowed_regions=regions)
