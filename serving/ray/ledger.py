"""The budget ledger as one Ray actor: the single writer of every tenant's usage.

Methods are synchronous, so the actor runs one call at a time (one writer) and
SQLite is touched only in its process, never in an async ingress. With
`max_restarts=-1` Ray restarts a crashed ledger, which reloads its SQLite file
(totals and open reservations); `max_task_retries=-1` re-sends calls that were
in flight, and `reserve` and `reconcile` are idempotent per request id, so a
crash neither loses nor double-counts usage.

Errors travel as values (a ProximaError pickles fine) so callers raise the
project's own error, not a RayTaskError wrapper.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict
from typing import Any, Callable

import ray
from ray.exceptions import RayActorError

from serving.admission.budget import BudgetPolicy, Reservation
from serving.admission.ledger import Ledger
from serving.errors import ProximaError
from serving.ray.named import find_again

LEDGER_NAME = "proxima-ledger"


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)
class LedgerActor:
    def __init__(self, policies: dict[str, dict[str, Any]], path: str | None,
                 reservation_ttl_s: float = 900.0):
        self.ledger = Ledger({t: BudgetPolicy.from_dict(p, f"tenants.{t}.budget")
                              for t, p in policies.items()}, path,
                             reservation_ttl_s=reservation_ttl_s)

    def reserve(self, request_id: str, tenant: str, tokens: int, session: str | None):
        try:
            return asdict(self.ledger.reserve(request_id, tenant, tokens, session))
        except ProximaError as e:
            return e

    def reconcile(self, reservation: dict, used: int) -> bool:
        return self.ledger.reconcile(Reservation(**reservation), used)

    def remaining(self, tenant: str, session: str | None = None) -> dict:
        return self.ledger.remaining(tenant, session)

    def touch(self, request_ids: list[str]) -> int:
        return self.ledger.touch(request_ids)

    def set_policies(self, policies: dict[str, dict[str, Any]], reservation_ttl_s: float) -> None:
        """A ledger file's actor outlives a redeploy: the budgets of the config now deployed."""
        self.ledger.policies = {t: BudgetPolicy.from_dict(p, f"tenants.{t}.budget") for t, p in policies.items()}
        self.ledger.ttl_s = reservation_ttl_s

    def pid(self) -> int:
        import os
        return os.getpid()


def start_ledger(policies: dict[str, dict[str, Any]], path: str | None,
                 name: str = LEDGER_NAME, namespace: str = "proxima", reservation_ttl_s: float = 900.0):
    """Get the named ledger actor, creating it if this is the first caller; it takes these
    budgets either way (an existing one may have been started by another config)."""
    handle = LedgerActor.options(name=name, namespace=namespace, get_if_exists=True,
                                 lifetime="detached").remote(policies, path, reservation_ttl_s)
    handle.set_policies.remote(policies, reservation_ttl_s)  # before this caller's own calls (in order)
    return handle


def ledger_name(path: str | None, fallback: str) -> str:
    """One actor per ledger file, whatever config uses it: two (say, an old and a new config's
    during a redeploy) would each count only their own usage, and a cap could be passed. A
    memory-only ledger is its config's (`fallback`)."""
    if not path:
        return fallback
    return f"{LEDGER_NAME}-file-{hashlib.sha256(path.encode()).hexdigest()[:12]}"


class LedgerClient:
    """Async calls to the ledger actor from an ingress replica (never a blocking ray.get).

    A ledger gone for good (it leaves with its app's idle router) is found again or
    created afresh through `reconnect` and the call repeated once: reserve and
    reconcile are idempotent per request id."""

    def __init__(self, handle, reconnect: Callable[[], Any] | None = None):
        self.handle, self.reconnect = handle, reconnect

    async def _call(self, method: str, *args):
        try:
            return await getattr(self.handle, method).remote(*args)
        except RayActorError as e:
            handle = await find_again(e, self.reconnect)
            if handle is None:
                raise
            self.handle = handle
            return await getattr(handle, method).remote(*args)

    async def reserve(self, request_id: str, tenant: str, tokens: int,
                      session: str | None = None) -> Reservation:
        res = await self._call("reserve", request_id, tenant, tokens, session)
        if isinstance(res, ProximaError):
            raise res
        return Reservation(**res)

    async def reconcile(self, r: Reservation, used: int) -> bool:
        return await self._call("reconcile", asdict(r), used)

    async def remaining(self, tenant: str, session: str | None = None) -> dict:
        return await self._call("remaining", tenant, session)

    async def touch(self, request_ids: list[str]) -> int:
        return await self._call("touch", request_ids)
