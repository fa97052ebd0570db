"""A small in-process cluster for failover tests: real Router, real SimEngines."""

from __future__ import annotations

from dataclasses import dataclass, field

from serving.engines.base import GenerateRequest
from serving.engines.profiles import get_profile
from serving.engines.sim import SimEngine
from serving.errors import EngineError
from serving.failover import FailoverView
from serving.routing import Router
from serving.types import RouteRequest


STEP_1MS = get_profile("zero").with_(a_ms=1.0)  # keeps the name: the router looks profiles up by it


@dataclass
class Cluster:
    router: Router
    engines: dict[str, SimEngine]
    kill_after: dict[str, int] = field(default_factory=dict)  # replica -> tokens before it dies
    schedule: list[int] = field(default_factory=list)  # the i-th stream opened dies after [i] tokens
    view: FailoverView = field(default_factory=FailoverView)
    routed: list[str] = field(default_factory=list)
    t: float = 0.0

    @classmethod
    def build(cls, regions: dict[str, str], policy: str = "latency", down=(), **kw) -> "Cluster":
        router = Router(policy, seed=0, default_profile="zero")
        engines = {}
        for rid, region in regions.items():
            # 1 ms steps: a kill lands between two tokens, as it would on a real replica
            e = engines[rid] = SimEngine(rid, region, model="m", profile=STEP_1MS)
            if rid in down:
                e.kill()
            router.update(e.snapshot())
        c = cls(router, engines, **kw)
        for rid, region in regions.items():
            c.view.add(rid, region)
        return c

    async def route(self, req: RouteRequest):
        d = self.router.route(req)
        self.routed.append(d.replica_id)
        return d

    async def open(self, d, g: GenerateRequest):
        e = self.engines[d.replica_id]
        limit = self.kill_after.get(d.replica_id)
        if self.schedule:
            limit = self.schedule.pop(0)
        if limit == 0:
            e.kill()
        n = 0
        async for chunk in e.generate(g):
            n += len(chunk.token_ids)
            yield chunk
            if limit is not None and n >= limit:
                # The crash lands right after token `limit`: anything the engine had
                # already queued is lost with it, as with a real replica's socket.
                e.kill()
                raise EngineError(f"replica {d.replica_id} failed")

    def done(self, d, ok, err) -> None:
        self.t += 0.1
        self.router.on_finished(d.request_id, ok)
        if ok:
            self.view.success(d.replica_id, self.t, probe=False)
        else:
            self.view.failure(d.replica_id, self.t)
        for rid, open_ in self.view.changes().items():
            self.router.set_circuit(rid, open_)

    async def close(self) -> None:
        for e in self.engines.values():
            await e.close()


def request(rid="req-1", prompt="tell me about the router please", max_tokens=24, regions=None):
    return (RouteRequest(rid, "m", len(prompt.split()), max_tokens=max_tokens, allowed_regions=regions),
            GenerateRequest(rid, prompt=prompt, max_tokens=max_tokens, model="m"))
