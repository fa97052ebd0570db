"""The admission and accounting stages as the ingress calls them.

    admission:  reservation = await admit(ledger, ...)     # 429 BudgetExceeded here
    ...         (delegation, routing, dispatch)
    accounting: await settle(ledger, reservation, used)    # exactly once, retried

`ledger` is anything with async `reserve`, `reconcile`, `remaining`: the Ray
actor's client (serving.ray.ledger.LedgerClient) or `LocalLedger` (one process,
no Ray). `settle` retries a failed reconcile (the ledger actor restarting after
a crash) with backoff; reconcile is idempotent per request id, so a retry of a
call that did land counts nothing twice.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Protocol

from serving.admission.budget import Reservation
from serving.admission.ledger import Ledger

log = logging.getLogger(__name__)


class AsyncLedger(Protocol):
    async def reserve(self, request_id: str, tenant: str, tokens: int,
                      session: str | None = None) -> Reservation: ...

    async def reconcile(self, r: Reservation, used: int) -> bool: ...

    async def remaining(self, tenant: str, session: str | None = None) -> dict: ...

    async def touch(self, request_ids: list[str]) -> int: ...


class LocalLedger:
    """A Ledger in this process (its single writer is this event loop's thread)."""

    def __init__(self, ledger: Ledger):
        self.ledger = ledger

    async def reserve(self, request_id, tenant, tokens, session=None) -> Reservation:
        return self.ledger.reserve(request_id, tenant, tokens, session)

    async def reconcile(self, r: Reservation, used: int) -> bool:
        return self.ledger.reconcile(r, used)

    async def remaining(self, tenant, session=None) -> dict:
        return self.ledger.remaining(tenant, session)

    async def touch(self, request_ids: list[str]) -> int:
        return self.ledger.touch(request_ids)


async def admit(ledger: AsyncLedger, request_id: str, tenant: str, prompt_tokens: int,
                max_tokens: int, session: str | None = None) -> Reservation:
    """Reserve prompt + max_tokens (the caller has already applied the tier's default)."""
    return await ledger.reserve(request_id, tenant, prompt_tokens + max_tokens, session)


async def settle(ledger: AsyncLedger, r: Reservation, used: int, *, attempts: int = 8,
                 backoff_s: float = 0.05) -> bool:
    """Reconcile with retries; True once the ledger has the usage (now or before)."""
    delay = backoff_s
    for i in range(attempts):
        try:
            await ledger.reconcile(r, used)
            return True
        except asyncio.CancelledError:
            raise
        except Exception as e:  # the ledger is restarting: its file has what it committed
            log.warning("reconcile %s failed (%s), retry %d", r.request_id, type(e).__name__, i + 1)
            await asyncio.sleep(delay)
            delay = min(2.0, delay * 2)
    log.error("reconcile %s: gave up; its reservation expires after the TTL", r.request_id)
    return False
