"""The fleet's telemetry store as one Ray actor: metric snapshots and agent steps.

Each ingress replica has its own prometheus registry and sees only its own
requests. Serving /metrics or a session's steps from one replica must show the
whole gateway, so every ingress replica sends what it has to one named actor:

- metrics: its full cumulative snapshot every `observability.metrics_push_s`
  (one call per period, none per request) and with every scrape it answers;
  the actor keeps each replica's last snapshot and returns their sum;
- steps: buffered and sent together at most every `flush_s`, and flushed
  before the replica reads a session; a batch the actor did not take is kept
  for the next push.

So a scrape of any replica is at most one push period behind the others, and a
session's steps at most `flush_s`. If the actor restarts, the step history is
lost (it is recent history, bounded anyway) but the counters are not: each
replica's next push carries its whole cumulative state again. The actor
leaves with its app's idle router (serving.ray.router_actor); an ingress that
meets it gone for good creates it again (`reconnect`).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Callable

import ray
from ray.exceptions import RayError

from serving.errors import ProximaError
from serving.ingress.metrics import Family, GatewayMetrics
from serving.observability.fleet import merge
from serving.observability.steps import StepStore
from serving.ray.named import find_again

log = logging.getLogger("proxima.telemetry")
NAMESPACE = "proxima"
Steps = list[tuple[str, str, dict[str, Any]]]


@ray.remote(num_cpus=0, max_restarts=-1)
class TelemetryActor:
    def __init__(self, max_sessions: int = 10_000, max_steps: int = 256):
        self.store = StepStore(max_sessions, max_steps)
        self.snapshots: dict[str, list[Family]] = {}

    def push(self, replica: str, snapshot: list[Family] | None, steps: Steps) -> None:
        if snapshot is not None:
            self.snapshots[replica] = snapshot
        self.store.add_many(steps)

    def merged(self, replica: str, snapshot: list[Family], steps: Steps) -> tuple[list[Family], int]:
        self.push(replica, snapshot, steps)
        return merge(self.snapshots.values()), len(self.snapshots)

    def steps(self, tenant: str, session_id: str, pending: Steps) -> dict[str, Any] | None:
        self.store.add_many(pending)
        return self.store.get(tenant, session_id)


def telemetry_actor(name: str, max_sessions: int, max_steps: int):
    return TelemetryActor.options(name=name, namespace=NAMESPACE, get_if_exists=True,
                                  lifetime="detached").remote(max_sessions, max_steps)


class RayTelemetry:
    """serving.observability.observer.Telemetry over the actor, for one ingress replica."""

    def __init__(self, handle, replica: str, metrics: GatewayMetrics, push_s: float = 2.0,
                 flush_s: float = 0.1, max_buffered: int = 10_000,
                 reconnect: Callable[[], Any] | None = None):
        self.handle, self.replica, self.metrics = handle, replica, metrics
        self.reconnect = reconnect  # finds or creates the actor again once it is gone for good
        self.push_s, self.flush_s = push_s, flush_s
        self.max_buffered = max_buffered  # steps kept for the actor while it is away; the oldest go first
        self._steps: Steps = []
        self._flusher: asyncio.Task | None = None
        self._pusher: asyncio.Task | None = None

    def seen_request(self) -> None:
        """Called per request: starts the periodic push once (needs the running loop)."""
        if self._pusher is None:
            self._pusher = asyncio.get_running_loop().create_task(self._push_loop())

    def record_step(self, tenant: str, session_id: str, record: dict[str, Any]) -> None:
        self._steps.append((tenant, session_id, record))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.get_running_loop().create_task(self._flush_later())

    async def _flush_later(self) -> None:
        while True:
            await asyncio.sleep(self.flush_s)
            if not self._steps:
                return
            batch, self._steps = self._steps, []
            try:
                await self.handle.push.remote(self.replica, None, batch)
            except RayError as e:  # kept: the next push carries them (to the actor found again)
                self._requeue(batch)
                await self._find_again(e)
                return

    async def _push_loop(self) -> None:
        while True:
            await asyncio.sleep(self.push_s)
            batch, self._steps = self._steps, []
            try:
                await self.handle.push.remote(self.replica, self.metrics.snapshot(), batch)
            except RayError as e:  # restarting: the next push carries everything again
                self._requeue(batch)
                log.warning("metrics push failed: %s", type(e).__name__)
                await self._find_again(e)

    async def _find_again(self, e: RayError) -> None:
        try:
            handle = await find_again(e, self.reconnect)
        except Exception as e2:  # e.g. the name still held while Ray cleans up: next time
            log.warning("telemetry actor not found again: %s", type(e2).__name__)
            return
        if handle is not None:
            self.handle = handle

    def _requeue(self, batch: Steps) -> None:
        """Steps the actor did not take go back in front, within `max_buffered`: an actor
        gone for longer must not grow this replica's memory without bound."""
        steps = batch + self._steps
        if len(steps) > self.max_buffered:
            log.warning("telemetry actor unavailable: dropped the %d oldest agent steps",
                        len(steps) - self.max_buffered)
            steps = steps[-self.max_buffered:]
        self._steps = steps

    async def aclose(self, timeout_s: float) -> None:
        """The replica is stopping: stop pushing, and hand over the last snapshot and the
        steps still buffered (once, within `timeout_s`)."""
        for task in (self._pusher, self._flusher):
            if task is not None:
                task.cancel()
        batch, self._steps = self._steps, []
        try:
            await asyncio.wait_for(self.handle.push.remote(self.replica, self.metrics.snapshot(), batch),
                                   timeout_s)
        except (RayError, asyncio.TimeoutError) as e:
            log.warning("last telemetry push failed (%s): %d agent steps not recorded",
                        type(e).__name__, len(batch))

    async def merged(self, own: list[Family]) -> tuple[list[list[Family]], int]:
        batch, self._steps = self._steps, []
        try:
            fams, n = await self.handle.merged.remote(self.replica, own, batch)
            return [fams], n
        except RayError as e:  # serve this replica's slice rather than nothing
            self._requeue(batch)
            log.warning("fleet metrics unavailable, serving this replica's only: %s", type(e).__name__)
            await self._find_again(e)
            return [own], 1

    async def steps(self, tenant: str, session_id: str) -> dict[str, Any] | None:
        batch, self._steps = self._steps, []
        why = ""
        for attempt in range(3):  # the actor restarting: it is back within a second or two
            try:
                return await self.handle.steps.remote(tenant, session_id, batch)
            except RayError as e:
                why = type(e).__name__
                await self._find_again(e)
                await asyncio.sleep(0.2 * (attempt + 1))
        self._requeue(batch)
        err = ProximaError(f"The session step store is unavailable ({why}); please retry.")
        err.status = 503
        raise err
