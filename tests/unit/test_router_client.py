"""serving.ray.router_actor.RayRouter over a fake actor handle: how it rides out a router restart.

No Ray cluster: the handle is a stand-in whose methods answer `.remote()` with
an awaitable that raises or returns what the script says, as a real actor
handle's ObjectRef would.
"""

import asyncio

import pytest

pytest.importorskip("ray")
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError  # noqa: E402

from serving.errors import RouterUnavailable  # noqa: E402
from serving.ray.router_actor import RayRouter  # noqa: E402
from serving.types import RouteRequest  # noqa: E402

REQ = RouteRequest("r1", "m", 10, (), 16, "us")
DECISION = "the router's decision"  # passed through untouched


class Method:
    def __init__(self, script):
        self.script, self.calls = list(script), 0

    def remote(self, *args):
        self.calls += 1
        out = self.script.pop(0) if self.script else DECISION

        async def answer():
            if isinstance(out, RayActorError):  # Ray's failure; the router's own errors are values
                raise out
            return out
        return answer()


class Handle:
    def __init__(self, script):
        self.route = Method(script)


def run(coro):
    return asyncio.run(coro)


def test_restarting_router_is_waited_out():
    h = Handle([ActorUnavailableError("restarting", None), ActorUnavailableError("restarting", None),
                RouterUnavailable("rebuilding its view")])
    rr = RayRouter(h, reconnect=lambda: pytest.fail("a restarting router is the same actor"))
    assert run(rr.route(REQ)) == DECISION
    assert h.route.calls == 4 and rr.retries == 3


def test_dead_router_is_reconnected():
    dead, fresh = Handle([ActorDiedError()]), Handle([])
    rr = RayRouter(dead, reconnect=lambda: fresh)
    assert run(rr.route(REQ)) == DECISION
    assert rr.handle is fresh and dead.route.calls == 1 and fresh.route.calls == 1


def test_gives_up_with_503_after_retry_s():
    h = Handle([RouterUnavailable("rebuilding")] * 1000)
    rr = RayRouter(h, retry_s=0.2)
    with pytest.raises(RouterUnavailable) as e:
        run(rr.route(REQ))
    assert e.value.status == 503 and e.value.headers["Retry-After"] == "1"
    assert "rebuilding" in e.value.message and 3 <= h.route.calls < 20  # backoff, not a busy loop


class Stalled:
    """A stalled router (SIGSTOP, or a node gone silent): its calls never answer."""

    def __init__(self):
        self.calls = 0

    def remote(self, *args):
        self.calls += 1
        return asyncio.Event().wait()


def test_a_stalled_router_is_given_up_on_at_the_deadline():
    """Found by a failure drill: the Ray call had no bound, so a stalled router held requests
    with no limit (the 20 s to a 503 was only checked between retries)."""
    import time

    h = Handle([])
    h.route = Stalled()
    rr = RayRouter(h, retry_s=0.3, channel=False)
    t = time.perf_counter()
    with pytest.raises(RouterUnavailable, match="no answer"):
        run(rr.route(REQ))
    assert time.perf_counter() - t < 1.5


class Events:
    def __init__(self):
        self.batches = []

    def remote(self, batch):  # fire and forget, as a Ray ObjectRef nobody awaits
        self.batches.append(batch)


def test_an_ingress_renews_the_leases_of_its_live_requests_only():
    async def main():
        h = Handle([])
        h.events = Events()
        rr = RayRouter(h, channel=False, lease_every_s=0.03)
        await rr.route(REQ)
        await asyncio.sleep(0.1)
        alive = [e for b in h.events.batches for e in b if e[0] == "alive"]
        assert alive and all(e[2] == ["r1"] for e in alive)
        rr.finished("r1", True)
        await asyncio.sleep(0.1)
        later = [e for b in h.events.batches for e in b if e[0] == "alive"]
        assert len(later) <= len(alive) + 1 and rr._leaser.done()  # nothing live: it stops
    run(main())


def test_the_router_releases_a_booking_no_ingress_says_is_live(monkeypatch):
    """Found by a failure drill: an ingress that crashed left its requests booked on their
    replicas for good (least-request and power-of-two kept counting them)."""
    import time

    from serving.ray import router_actor
    from serving.types import ReplicaSnapshot

    now = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    cls = router_actor.RouterActor.__ray_metadata__.modified_class
    actor = cls({"home_region": "us", "models": [{"name": "m"}], "regions": {"us": {"replicas": 1}},
                 "router": {"policy": "least_request"}})
    actor.seen["us-0"] = now[0]
    actor.router.update(ReplicaSnapshot("us-0", "us", "m", timestamp=now[0]))
    for i in range(3):
        actor.route(RouteRequest(f"q{i}", "m", 10, (), 16, "us"))
    assert actor.router.inflight == 3
    actor.finished("q0", True)
    now[0] += router_actor.LEASE_S / 2
    actor.seen["us-0"] = now[0]
    actor.events([("alive", "", ["q1"])])  # the ingress still runs q1; q2's ingress is gone
    now[0] += router_actor.LEASE_S / 2 + 1
    actor.seen["us-0"] = now[0]
    actor.stats()  # sweeps
    assert actor.router.inflight == 1 and actor.leases_expired == 1 and set(actor.leased) == {"q1"}
