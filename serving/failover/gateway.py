"""Breakers wired into the ingress: every dispatch attempt's outcome feeds them.

`CircuitFeed.record(decision, ok)` is the failover loop's `done` callback
(after the router's own bookkeeping): a failed attempt counts against its
replica (and region), a good one resets it. Changed circuits go to the router
through `set_circuit(replica_id, open)`, so the next routing decision already
avoids them. `tick` (before each routing decision) closes circuits half-open for a trial
where no health probe runs; with probes (serving.failover.health) they rejoin on good probes.
One writer: the ingress's event loop.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Callable

from serving.failover.breaker import FailoverView
from serving.types import Decision

SetCircuit = Callable[[str, bool], Any]


class CircuitFeed:
    def __init__(self, view: FailoverView, set_circuit: SetCircuit,
                 clock: Callable[[], float] = time.monotonic):
        self.view, self.set_circuit, self.clock = view, set_circuit, clock
        self.failovers = 0

    def record(self, decision: Decision, ok: bool) -> None:
        v, now = self.view, self.clock()
        v.add(decision.replica_id, decision.region)
        if ok:
            v.success(decision.replica_id, now, probe=False)
        else:
            self.failovers += 1
            v.failure(decision.replica_id, now)
        self.push()

    def push(self) -> None:
        for rid, open_ in self.view.changes().items():
            res = self.set_circuit(rid, open_)
            if asyncio.iscoroutine(res):  # an actor call: let it go on its own
                asyncio.ensure_future(res)

    def tick(self) -> None:
        """Called before each routing decision: due half-open trials start then."""
        self.view.tick(self.clock())
        self.push()
