"""A Ray Serve request router that sends each call to the replica the central router chose.

The ingress passes the decision with the call: `generate.remote(gen, target=replica_id)`,
where replica_id is "<region>-<Serve replica unique id>" (the name the engine
replica reports itself under). `choose_replicas` finds that replica among
Serve's candidates and ranks it alone, so Serve still owns replica lifecycle,
queue-length probing and back-pressure while Proxima owns the choice.

A call without a target (none today) or whose target is gone (the replica died
since the decision) ranks every candidate; the engine refuses a call meant for
another replica with a retriable EngineError, so dispatch re-routes it through
the central router instead of landing somewhere the router did not book.

When a deployment has no running replica at all (a region's engines all died),
Serve holds a call until one runs again, and `choose_replicas` is not even
asked. So each router records its deployment's running replicas in this
process (`running`), and the ingress fails a new call to an empty deployment at
once (serving.ray.ingress.RayEngines); calls already waiting when the last
replica goes are failed here, with the retriable EngineError. Failover moves
them on within milliseconds rather than after the first-token timeout (30 s).
Only calls meant for a replica Serve has had running (so it died) fail at once:
a new replica reports itself to the central router before Serve has it
running, so a region coming back gets calls for it first; those wait for it,
up to NEW_REPLICA_GRACE_S (one that never runs, say crash-looping at start, is
then given up on like a dead one).
"""

from __future__ import annotations

import asyncio
import time
from typing import List, Optional

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

from serving.errors import EngineError


def target_uid(target: str) -> str:
    return target.rsplit("-", 1)[-1]


# (application, deployment) -> its running replicas' unique ids, as Serve says
_RUNNING: dict[tuple[str, str], set[str]] = {}
_SEEN: dict[tuple[str, str], set[str]] = {}  # and every one it ever said was running
NEW_REPLICA_GRACE_S = 5.0


def running(app: str, deployment: str) -> set[str] | None:
    """The deployment's running replicas as this process's router knows them (None: not known
    yet, no call was made through it)."""
    return _RUNNING.get((app, deployment))


def gone(app: str, deployment: str, target: str) -> bool:
    """The deployment has no running replica, and `target` was one (it died): a call to it
    would wait in Serve for nothing."""
    return _RUNNING.get((app, deployment)) == set() and target_uid(target) in _SEEN.get((app, deployment), ())


class DecisionRouter(RequestRouter):
    def update_replicas(self, replicas: List[RunningReplica]) -> None:
        super().update_replicas(replicas)
        d = getattr(self, "_deployment_id", None)
        if d is not None:
            live = _RUNNING[(d.app_name, d.name)] = {r.replica_id.unique_id for r in replicas}
            _SEEN.setdefault((d.app_name, d.name), set()).update(live)
        if not replicas:
            self._while_empty()

    def on_replica_actor_died(self, replica_id) -> None:
        super().on_replica_actor_died(replica_id)
        d = replica_id.deployment_id
        live = _RUNNING.get((d.app_name, d.name))
        if live is not None:
            live.discard(replica_id.unique_id)
        if not getattr(self, "_replicas", True):
            self._while_empty()

    def _while_empty(self) -> None:
        """While the deployment has no running replica, fail the calls that wait for one, those
        queued later too (a call Serve retries after its replica died is queued again)."""
        watch = getattr(self, "_empty_watch", None)
        loop = getattr(self, "_event_loop", None)
        if loop is None or (watch is not None and not watch.done()):
            return

        async def watch_empty() -> None:
            while not getattr(self, "_replicas", True):
                self._fail_waiting()
                await asyncio.sleep(0.05)

        def start() -> None:
            if getattr(self, "_empty_watch", None) is None or self._empty_watch.done():
                self._empty_watch = loop.create_task(watch_empty())

        try:
            here = asyncio.get_running_loop()
        except RuntimeError:
            here = None
        if here is loop:
            start()
        else:
            loop.call_soon_threadsafe(start)

    def _fail_waiting(self) -> None:
        """The deployment has no running replica: the calls waiting for one fail now, retriably
        (Serve's own routing tasks skip a request whose future is done)."""
        waiting = getattr(self, "_pending_requests_to_fulfill", None)
        if not waiting:
            return
        d = getattr(self, "_deployment_id", None)
        deployment = getattr(d, "name", "?")
        seen = _SEEN.get((d.app_name, d.name), set()) if d is not None else set()
        forget = getattr(self, "_remove_pending_request_from_indices", None)  # Serve 2.60's index
        now = time.time()
        for pr in list(waiting):
            target = pr.kwargs.get("target")
            new = target and target_uid(target) not in seen  # not running yet: it may be starting
            if new and now - pr.created_at < NEW_REPLICA_GRACE_S:
                continue
            if not pr.future.done():
                pr.future.set_exception(EngineError(f"deployment {deployment} has no running replica"))
                if forget is not None:
                    forget(pr)

    async def choose_replicas(self, candidate_replicas: List[RunningReplica],
                              pending_request: Optional[PendingRequest] = None,
                              ) -> List[List[RunningReplica]]:
        target = pending_request.kwargs.get("target") if pending_request is not None else None
        if target:
            uid = target_uid(target)
            for r in candidate_replicas:
                if r.replica_id.unique_id == uid:
                    return [[r]]
        return [candidate_replicas]
