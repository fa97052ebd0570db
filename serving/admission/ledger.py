"""The budget ledger: reserve at admission, reconcile at the end, persist both.

One writer: a `Ledger` is owned by one actor (serving.ray.ledger) or one task;
its methods are synchronous and never interleave. Admission check for a request
of `n` tokens (prompt + max_tokens), for each limit that applies:

    rate:  bucket.level >= n                       (else Retry-After = refill time)
    cap:   used + held + n <= cap                  (held = open reservations)

so, as long as no request uses more than it reserved, `used` never passes a cap.
`reconcile(reservation, used)` charges the real usage exactly once (keyed by the
request id, in the same SQLite transaction as the totals) and releases the rest.

After a crash the ledger reloads totals and open reservations. An open
reservation's request may still be running, so it stays held until its late
reconcile arrives (and is charged then) or `reservation_ttl_s` passes (released
uncharged: nothing reported its usage). Token buckets are in memory only and
start full on restart; a restart grants at most one extra minute of rate.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections import defaultdict
from datetime import datetime, timezone
from typing import Callable, Mapping

from serving.admission.budget import BudgetPolicy, Reservation, TokenBucket
from serving.admission.store import Store
from serving.errors import BudgetExceeded, LedgerUnavailable

log = logging.getLogger(__name__)

_UNLIMITED = BudgetPolicy()


def utc_day(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%d")


def _to_midnight(ts: float) -> float:
    return 86400.0 - (ts % 86400.0)


class Ledger:
    def __init__(self, policies: Mapping[str, BudgetPolicy], path: str | None = None, *,
                 clock: Callable[[], float] = time.time, reservation_ttl_s: float = 900.0,
                 settled_keep_s: float = 2 * 86400.0):
        self.policies = dict(policies)
        self.clock = clock
        self.ttl_s = reservation_ttl_s
        self.settled_keep_s = settled_keep_s
        self.store = Store(path) if path else None
        self.used: dict[tuple[str, str, str], int] = defaultdict(int)  # (tenant, scope, key)
        self.held: dict[tuple[str, str, str], int] = defaultdict(int)
        self.open: dict[str, tuple[Reservation, float]] = {}
        self.buckets: dict[tuple[str, str | None], TokenBucket] = {}
        self.settled_here: set[str] = set()  # fast path when there is no store
        self._swept = self._pruned = clock()
        if self.store is not None:
            self._load()

    def _load(self) -> None:
        assert self.store is not None
        for tenant, scope, key, tokens in self.store.usage():
            self.used[(tenant, scope, key)] = tokens
        for r, created in self.store.reservations():
            self._hold(r, created)
        self.expire()
        self.store.prune_settled(self.clock() - self.settled_keep_s)

    def policy(self, tenant: str) -> BudgetPolicy:
        return self.policies.get(tenant, self.policies.get("*", _UNLIMITED))

    # --- admission ----------------------------------------------------------
    def reserve(self, request_id: str, tenant: str, tokens: int,
                session: str | None = None) -> Reservation:
        """Hold `tokens` for a request or raise BudgetExceeded naming the budget; LedgerUnavailable
        (503) if the file cannot take the hold (locked by another process, a full disk): nothing
        is held then, the rate buckets included."""
        try:
            return self._reserve(request_id, tenant, tokens, session)
        except sqlite3.Error as e:
            log.error("ledger: reservation for %s not recorded: %s: %s", request_id, type(e).__name__, e)
            raise LedgerUnavailable("The budget ledger could not record the reservation; retry shortly.") from None

    def _reserve(self, request_id: str, tenant: str, tokens: int, session: str | None) -> Reservation:
        if request_id in self.open:
            return self.open[request_id][0]  # a retried admission holds once
        now = self.clock()
        self.expire(now)
        self._sweep(now)
        p, day = self.policy(tenant), utc_day(now)
        tokens = max(0, int(tokens))
        self._check_cap(tenant, "tokens_per_day", p.tokens_per_day, ("day", day), tokens,
                        _to_midnight(now))
        if session is not None:
            self._check_cap(tenant, "session_tokens", p.session_tokens, ("session", session),
                            tokens, None)
        buckets = self._buckets(tenant, session, p, now)
        for name, b in buckets:
            wait = b.wait_s(tokens, now)
            if wait > 0:
                raise _exceeded(tenant, name, int(b.capacity), int(b.capacity - b.level), tokens,
                                wait if wait != float("inf") else None,
                                "the request alone is larger than this rate allows; lower max_tokens"
                                if wait == float("inf") else "tokens refill continuously")
        r = Reservation(request_id, tenant, tokens, day, session)
        if self.store is not None:
            self.store.hold(r, now)  # first: if the file refuses it, nothing was taken
        for _, b in buckets:
            b.take(tokens, now)
        self._hold(r, now)
        return r

    def reconcile(self, r: Reservation, used: int) -> bool:
        """Charge real usage once and release the rest; False if already settled."""
        used = max(0, int(used))
        if used > r.tokens:
            log.warning("request %s used %d tokens, more than the %d it reserved",
                        r.request_id, used, r.tokens)
        now = self.clock()
        if self.store is not None:
            if not self.store.settle(r, used, now):
                return False
        elif r.request_id in self.settled_here:
            return False
        else:
            self.settled_here.add(r.request_id)
        held = self._unhold(r.request_id)
        self.used[(r.tenant, "day", r.day)] += used
        if r.session is not None:
            self.used[(r.tenant, "session", r.session)] += used
        if held is not None:  # unused tokens go back to the rate buckets
            p = self.policy(r.tenant)
            for _, b in self._buckets(r.tenant, r.session, p, now):
                b.give_back(max(0, held.tokens - used), now)
        return True

    def release(self, r: Reservation) -> None:
        """The request never ran (refused downstream): charge nothing."""
        self.reconcile(r, 0)

    def touch(self, request_ids: list[str]) -> int:
        """The ingress says these requests are still running: their holds' TTL starts again
        (a long generation keeps its hold). Returns how many were still held."""
        now = self.clock()
        alive = [rid for rid in request_ids if rid in self.open]
        for rid in alive:
            self.open[rid] = (self.open[rid][0], now)
        if alive and self.store is not None:
            self.store.touch(alive, now)
        return len(alive)

    def expire(self, now: float | None = None) -> list[str]:
        """Release reservations older than the TTL (their usage was never reported)."""
        now = self.clock() if now is None else now
        stale = [rid for rid, (_, t) in self.open.items() if now - t > self.ttl_s]
        for rid in stale:
            self._unhold(rid)
        if stale and self.store is not None:
            self.store.drop(stale)
            log.warning("released %d reservations never reconciled", len(stale))
        return stale

    # --- reading ------------------------------------------------------------
    def remaining(self, tenant: str, session: str | None = None) -> dict:
        """A tenant's own view of its budgets (GET /v1/budgets)."""
        now = self.clock()
        p, day = self.policy(tenant), utc_day(now)
        out: dict = {"object": "budget", "tenant": tenant, "day": day, "budgets": []}

        def cap(name: str, limit: int | None, key: tuple[str, str], resets: float | None) -> None:
            # .get: a read inserts nothing (a client may ask about any session id)
            used, held = self.used.get((tenant, *key), 0), self.held.get((tenant, *key), 0)
            out["budgets"].append({
                "name": name, "limit": limit, "used": used, "reserved": held,
                "remaining": None if limit is None else max(0, limit - used - held),
                "resets_in_s": resets})

        cap("tokens_per_day", p.tokens_per_day, ("day", day), round(_to_midnight(now), 1))
        if session is not None:
            cap("session_tokens", p.session_tokens, ("session", session), None)
        for name, b in self._buckets(tenant, session, p, now, create=False):
            out["budgets"].append({"name": name, "limit": int(b.capacity),
                                   "remaining": b.remaining(now), "resets_in_s": 60.0})
        return out

    def consumed(self, tenant: str, day: str | None = None) -> int:
        return self.used[(tenant, "day", day or utc_day(self.clock()))]

    # --- internals ----------------------------------------------------------
    def _check_cap(self, tenant: str, name: str, limit: int | None, key: tuple[str, str],
                   tokens: int, resets_in: float | None) -> None:
        if limit is None:
            return
        used, held = self.used.get((tenant, *key), 0), self.held.get((tenant, *key), 0)
        if used + held + tokens <= limit:
            return
        if tokens > limit:  # no wait helps: no Retry-After
            wait, why = None, "the request alone is larger than this budget; lower max_tokens (or n)"
        elif used + tokens <= limit:  # it fits once requests in flight settle
            wait, why = 1.0, "requests in flight hold the rest; retry when they finish"
        elif resets_in is not None:
            wait, why = resets_in, "the budget resets at 00:00 UTC"
        else:
            wait, why = 3600.0, "this session has used its budget; start a new session"
        raise _exceeded(tenant, name, limit, used + held, tokens, wait, why)

    def _buckets(self, tenant: str, session: str | None, p: BudgetPolicy,
                 now: float, create: bool = True) -> list[tuple[str, TokenBucket]]:
        """The rate buckets that apply; `create` False: a missing one is shown full, not kept."""
        out = []
        for name, key, rate in (("tokens_per_minute", (tenant, None), p.tokens_per_minute),
                                ("session_tokens_per_minute", (tenant, session),
                                 p.session_tokens_per_minute if session is not None else None)):
            if rate is None:
                continue
            b = self.buckets.get(key)
            if b is None or b.capacity != rate:
                b = TokenBucket(rate, now)
                if create:
                    self.buckets[key] = b
            out.append((name, b))
        return out

    def _hold(self, r: Reservation, at: float) -> None:
        self.open[r.request_id] = (r, at)
        self.held[(r.tenant, "day", r.day)] += r.tokens
        if r.session is not None:
            self.held[(r.tenant, "session", r.session)] += r.tokens

    def _unhold(self, request_id: str) -> Reservation | None:
        entry = self.open.pop(request_id, None)
        if entry is None:
            return None
        r = entry[0]
        for key in ((r.tenant, "day", r.day), (r.tenant, "session", r.session)):
            if key[2] is not None:
                self.held[key] -= r.tokens
                if not self.held[key]:
                    del self.held[key]  # nothing held: no entry (one per session ever seen otherwise)
        return r

    def _sweep(self, now: float) -> None:
        """Once a minute: drop sessions' rate buckets that have refilled (a new one starts full,
        so nothing changes); once an hour, settled request ids older than a reconcile can be.
        Clients name sessions: what each one leaves behind must not grow without bound."""
        if now - self._swept < 60.0:
            return
        self._swept = now
        for key in [k for k, b in self.buckets.items() if k[1] is not None and b.full(now)]:
            del self.buckets[key]
        if self.store is not None and now - self._pruned >= 3600.0:
            self._pruned = now
            self.store.prune_settled(now - self.settled_keep_s)


def _exceeded(tenant: str, name: str, limit: int, used: int, tokens: int, wait: float | None,
              why: str) -> BudgetExceeded:
    e = BudgetExceeded(
        f"Token budget `{name}` of tenant `{tenant}` exceeded: limit {limit}, in use {used}, "
        f"this request needs {tokens} (prompt + max_tokens); {why}.", retry_after_s=wait)
    e.headers["x-proxima-budget"] = name
    return e
