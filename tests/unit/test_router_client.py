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
