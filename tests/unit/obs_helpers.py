"""A whole in-process gateway (real Router, SimEngines, budgets) for the observability tests."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families

from serving.config import load_config
from serving.engines.base import GenerateRequest
from serving.engines.factory import EngineSpec, make_engine
from serving.ingress.app import build_app
from serving.ingress.auth import hash_key
from serving.ingress.local import LocalEngines, LocalRouter
from serving.ingress.pipeline import Gateway
from serving.ingress.policies import gateway_policies
from serving.routing.router import Router

SIM = {"kind": "sim", "options": {"time_scale": 0.01}}
CONFIG = {
    "home_region": "us",
    "rtt_ms": {"us": {"us": 0, "eu": 80}, "eu": {"eu": 0}},
    "models": [{"name": "m", "max_model_len": 4096, "default_max_tokens": 4}],
    "regions": {"us": {"replicas": 2, "engine": SIM}, "eu": {"replicas": 1, "engine": SIM}},
    "auth": {"tenants": {
        "acme": {"api_keys_sha256": [hash_key("key-acme")], "budget": {"tokens_per_day": 100000}},
        "globex": {"api_keys_sha256": [hash_key("key-globex")], "budget": {"tokens_per_day": 30}},
    }},
    "serve": {"inject_rtt": False},
    "budgets": {"ledger_path": None},
}
ACME = {"authorization": "Bearer key-acme"}
GLOBEX = {"authorization": "Bearer key-globex"}


class Recording:
    """An engine that records what it was asked, then lets a SimEngine answer."""

    def __init__(self, engine):
        self.engine, self.requests = engine, []
        self.crash_after: int | None = None  # chunks streamed before this replica crashes

    async def generate(self, request: GenerateRequest):
        self.requests.append(request)
        n = 0
        async for chunk in self.engine.generate(request):
            yield chunk
            n += 1
            if self.crash_after is not None and n >= self.crash_after:
                self.engine.kill()

    async def abort(self, request_id: str) -> None:
        await self.engine.abort(request_id)

    def snapshot(self):
        return self.engine.snapshot()

    def kill(self) -> None:
        self.engine.kill()


class FrozenRouter(LocalRouter):
    """A load view that is no longer refreshed: it can choose a replica that just died."""

    def refresh(self) -> None:
        pass


def build(config=CONFIG, router_cls=LocalRouter, **gw_kwargs):
    cfg = load_config(config)
    engines = {}
    for reg, r in cfg.regions.items():
        for i in range(r.replicas):
            rid = f"{reg}-{i}"
            engines[rid] = Recording(make_engine(EngineSpec(r.engine.kind, rid, reg, "m", r.profile,
                                                            r.kv_capacity_tokens, r.engine.options)))
    local = LocalEngines(engines)
    router = router_cls(Router("latency", rtt_ms=cfg.rtt(), seed=1), local)
    LocalRouter.refresh(router)
    gw = Gateway(cfg, router, local, **gateway_policies(cfg, router), **gw_kwargs)
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=build_app(gw)), base_url="http://gw")
    return client, engines, gw


def chat(content="hello world", **kw):
    return {"model": "m", "messages": [{"role": "user", "content": content}], **kw}


def samples(text: str) -> dict[tuple[str, tuple], float]:
    """Parsed exposition: {(sample name, sorted labels): value} (the parser also validates it)."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def value(text: str, name: str, **labels) -> float:
    """Sum of the samples named `name` whose labels include `labels`."""
    return sum(v for (n, lab), v in samples(text).items()
               if n == name and set(labels.items()) <= set(lab))
