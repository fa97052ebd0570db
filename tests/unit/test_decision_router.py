"""serving.ray.request_router.DecisionRouter in process (Serve 2.60's own RequestRouter machinery,
no cluster; the pending-request plumbing is Serve's internals): a deployment left with no
running replica fails the calls meant for its dead replicas at once, not a new replica's."""

import asyncio

import pytest

pytest.importorskip("ray")
from ray.serve._private.common import DeploymentHandleSource, DeploymentID, ReplicaID, RequestMetadata  # noqa: E402
from ray.serve._private.request_router.common import PendingRequest  # noqa: E402

from serving.errors import EngineError  # noqa: E402
from serving.ray import request_router as rr  # noqa: E402


class Replica:
    """What Serve's router needs of a running replica here."""

    def __init__(self, dep, uid):
        self.replica_id = ReplicaID(unique_id=uid, deployment_id=dep)
        self.multiplexed_model_ids = set()
        self.node_id = self.availability_zone = None

    max_ongoing_requests = 8

    def push_proxy_handle(self, handle):
        pass

    async def get_queue_len(self, *, deadline_s: float) -> int:
        return 0


def pending(target, i=0):
    return PendingRequest(args=[], kwargs={"target": target},
                          metadata=RequestMetadata(request_id=f"r{i}", internal_request_id=f"i{i}"))


def test_calls_for_dead_replicas_fail_at_once_and_a_new_replicas_wait(monkeypatch):
    async def main():
        monkeypatch.setattr(rr, "NEW_REPLICA_GRACE_S", 0.3)
        dep = DeploymentID(name="engine-eu-west-m", app_name="t-app")
        router = rr.DecisionRouter(dep, DeploymentHandleSource.UNKNOWN)
        old = Replica(dep, "old1")
        router.update_replicas([old])
        assert rr.running("t-app", "engine-eu-west-m") == {"old1"}
        assert not rr.gone("t-app", "engine-eu-west-m", "eu-west-old1")
        router.on_replica_actor_died(old.replica_id)  # the region's last replica dies
        assert rr.gone("t-app", "engine-eu-west-m", "eu-west-old1")  # the ingress makes no call to it
        assert not rr.gone("t-app", "engine-eu-west-m", "eu-west-new1")  # a new one may be starting
        dead = asyncio.ensure_future(router._choose_replica_for_request(pending("eu-west-old1", 1)))
        new = asyncio.ensure_future(router._choose_replica_for_request(pending("eu-west-new1", 2)))
        await asyncio.sleep(0.15)
        assert dead.done() and isinstance(dead.exception(), EngineError)  # at once, retriably
        assert not new.done()  # waits for the replica that reported itself to the router
        fresh = Replica(dep, "new1")
        router.update_replicas([fresh])  # Serve has it running: the call goes to it
        got = await asyncio.wait_for(new, 2)
        assert got.replica_id.unique_id == "new1"
        router.on_replica_actor_died(fresh.replica_id)
        never = asyncio.ensure_future(router._choose_replica_for_request(pending("eu-west-crashing", 3)))
        await asyncio.sleep(0.6)  # one that never runs is given up on after the grace
        assert never.done() and isinstance(never.exception(), EngineError)
    asyncio.run(main())
