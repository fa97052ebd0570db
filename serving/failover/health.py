"""Health checks: probe every replica on a period and feed the breakers.

`probe(replica_id)` is an awaitable returning True when the replica answers and
is UP (for the sim engine, its snapshot; on Ray, a short actor call). A probe
that raises or outlives `timeout_s` counts as a failure, so a hung replica is
caught as well as a crashed one. With the defaults (0.5 s period, 2 failures)
a dead region is drained in about a second and rejoins ~2 s after it is back.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Awaitable, Callable

from serving.failover.breaker import FailoverView

log = logging.getLogger(__name__)

Probe = Callable[[str], Awaitable[bool]]
Apply = Callable[[dict[str, bool]], Awaitable[None] | None]


async def probe_once(view: FailoverView, probe: Probe, timeout_s: float = 1.0,
                     clock: Callable[[], float] = time.monotonic) -> dict[str, bool]:
    """Probe all replicas concurrently; return the circuits that changed."""
    ids = list(view.replicas)

    async def one(rid: str) -> bool:
        try:
            return bool(await asyncio.wait_for(probe(rid), timeout_s))
        except asyncio.CancelledError:
            raise
        except Exception:  # a crashed replica raises whatever its transport raises
            return False

    results = await asyncio.gather(*(one(r) for r in ids))
    now = clock()
    for rid, ok in zip(ids, results):
        if ok:
            view.success(rid, now)
        else:
            view.failure(rid, now)
    return view.changes()


async def run_health_checks(view: FailoverView, probe: Probe, apply: Apply,
                            interval_s: float = 0.5, timeout_s: float = 1.0) -> None:
    """Forever: probe, then push changed circuits to the router (`apply`)."""
    while True:
        changed = await probe_once(view, probe, timeout_s)
        if changed:
            log.info("circuits changed: %s", changed)
            res = apply(changed)
            if asyncio.iscoroutine(res):
                await res
        await asyncio.sleep(interval_s)
