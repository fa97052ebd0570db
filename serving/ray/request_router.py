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
"""

from __future__ import annotations

from typing import List, Optional

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica


def target_uid(target: str) -> str:
    return target.rsplit("-", 1)[-1]


class DecisionRouter(RequestRouter):
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
