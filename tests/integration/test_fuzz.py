"""Fuzz every endpoint from the gateway's own OpenAPI document: never a 5xx, never a hang.

Schemathesis turns GET /openapi.json into requests for every operation, both
schema-valid (positive) and schema-breaking (negative: wrong types, missing
fields, bytes that are not JSON), with random headers; hypothesis drives it.
Half of the cases name a served model (so they reach admission, delegation,
routing and the engines rather than stopping at 404), and the key is drawn
from a tenant's (mostly), none, the admin's, garbage and a residency-bound tenant's.

Every answer must be below 500; an error must be an OpenAI-style JSON body;
a 200 stream must carry no error event and end with [DONE] (schemathesis
reads at most DEFAULT_MAX_STREAM_EVENTS events and then hangs up, which
exercises client disconnects too); and the call must finish within a bound
that grows only with the work asked (max_tokens). One 5xx is expected and
allowed: the tenant restricted to `eu` asking for `small`, which no `eu`
replica serves, gets 503 residency_unavailable (documented in docs/gateway.md).

Two targets:
- in-process: the ASGI app (serving.ingress.app) over the real Router and
  simulated engines at 1/100 speed, served by uvicorn on a local port in this
  process, with tenants, budgets and two model tiers configured: many cases.
- live: the session's Ray Serve app (tests/integration/conftest.py) through
  Serve's proxy, fewer cases, max_tokens kept small so the real-time engines
  answer quickly (the in-process run covers large values).
"""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest

pytestmark = pytest.mark.integration

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.core.transport import DEFAULT_MAX_STREAM_EVENTS  # noqa: E402

from serving.ingress.auth import hash_key  # noqa: E402

KEYS = {"tenant": "sk-fuzz-tenant", "admin": "sk-fuzz-admin"}
_SIM = {"kind": "sim", "options": {"time_scale": 0.01}}
INPROC_CONFIG = {
    "home_region": "us",
    "rtt_ms": {"us": {"us": 1, "eu": 80}, "eu": {"eu": 1}},
    "models": [{"name": "big", "max_model_len": 4096, "default_max_tokens": 16},
               {"name": "small", "max_model_len": 4096, "default_max_tokens": 16}],
    "regions": {"us": {"replicas": 2, "models": ["big", "small"], "engine": _SIM},
                "eu": {"replicas": 1, "models": ["big"], "engine": _SIM}},
    "auth": {"admin_key_sha256": hash_key(KEYS["admin"]),
             "tenants": {"t": {"api_keys_sha256": [hash_key(KEYS["tenant"])],
                               "budget": {"tokens_per_day": 10**9}},
                         "eu-only": {"api_keys_sha256": [hash_key("sk-fuzz-eu")], "allowed_regions": ["eu"]}}},
    "budgets": {"ledger_path": None},
    "delegation": {"tiers": {"small": {"model": "small"}, "large": {"model": "big"}}},
    "serve": {"inject_rtt": False},
}


def inproc_app():
    from serving.config import load_config
    from serving.engines.factory import EngineSpec, make_engine
    from serving.ingress.app import build_app
    from serving.ingress.local import LocalEngines, LocalRouter
    from serving.ingress.pipeline import Gateway
    from serving.ingress.policies import gateway_policies
    from serving.routing.router import Router

    cfg = load_config(INPROC_CONFIG)
    engines = {}
    for reg, r in cfg.regions.items():
        for i in range(r.replicas):
            for model in cfg.region_models(reg):
                rid = f"{reg}-{model}-{i}"
                engines[rid] = make_engine(EngineSpec(r.engine.kind, rid, reg, model, r.profile,
                                                      r.kv_capacity_tokens, r.engine.options))
    local = LocalEngines(engines)
    router = LocalRouter(Router("latency", rtt_ms=cfg.rtt(), seed=1), local)
    return build_app(Gateway(cfg, router, local, **gateway_policies(cfg, router)))


@pytest.fixture(scope="module")
def inproc_url():
    """The app served by uvicorn in a thread of this process, on a free local port."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(inproc_app(), log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    server.should_exit = True
    thread.join(10)


def cases(schema, models: list[str], keys: list[str | None], max_tokens_cap: int | None):
    """(operation, case) for every operation, positive and negative, steered as the docstring says."""
    ops = [r.ok() for r in schema.get_all_operations()]
    strategies = [op.as_strategy(generation_mode=mode) for op in ops
                  for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)]

    @st.composite
    def steered(draw):
        case = draw(st.one_of(strategies))
        key = draw(st.sampled_from(keys))
        case.headers = {k: v for k, v in (case.headers or {}).items() if k.lower() != "authorization"}
        if key is not None:
            case.headers["authorization"] = f"Bearer {key}"
        if isinstance(case.body, dict) and draw(st.booleans()):
            case.body["model"] = draw(st.sampled_from(models))
        if max_tokens_cap is not None and isinstance(case.body, dict):
            for k in ("max_tokens", "max_completion_tokens"):
                if isinstance(case.body.get(k), int) and case.body[k] > max_tokens_cap:
                    case.body[k] = max_tokens_cap
        return case
    return steered()


def bound_s(case) -> float:
    """Time a call may take: a base, plus the tokens it asked for at a slow engine's pace."""
    body = case.body if isinstance(case.body, dict) else {}
    n = max((v for k in ("max_tokens", "max_completion_tokens")
             if isinstance(v := body.get(k), int) and not isinstance(v, bool)), default=256)
    return 20.0 + 0.01 * min(max(n, 0), 10**6)


def check(case, base_url: str, stats: dict) -> None:
    limit = bound_s(case)
    t = time.monotonic()
    try:
        r = case.call(base_url=base_url, timeout=limit)
    except Exception as e:  # a hang ends here as a timeout
        raise AssertionError(f"{case.method} {case.path}: no answer within {limit:.0f} s ({e!r})\n"
                             f"{case.as_curl_command()}") from None
    took = time.monotonic() - t
    where = f"{case.method} {case.path} -> {r.status_code} in {took:.2f} s\n{case.as_curl_command()}"
    stats[r.status_code] = stats.get(r.status_code, 0) + 1
    if r.status_code == 503 and r.json()["error"]["code"] == "residency_unavailable":
        assert "sk-fuzz-eu" in str(case.headers.get("authorization")), where
        return
    assert r.status_code < 500, f"{where}\n{r.text[:500]}"
    assert took < limit, where
    if r.status_code >= 400:
        err = r.json()["error"]
        assert isinstance(err["message"], str) and err["type"], where
    elif "text/event-stream" in str(r.headers.get("content-type")):
        parts = [p for p in r.text.split("\n\n") if p]
        assert len(parts) >= DEFAULT_MAX_STREAM_EVENTS or parts[-1] == "data: [DONE]", where
        for part in parts:
            if part != "data: [DONE]":
                assert "error" not in json.loads(part.removeprefix("data: ")), f"{where}\n{part}"


def run_fuzz(url: str, models: list[str], keys: list[str | None], examples: int,
             max_tokens_cap: int | None = None) -> dict:
    schema = schemathesis.openapi.from_url(url + "/openapi.json")
    paths = {op.ok().path for op in schema.get_all_operations()}  # schemathesis leaves out the schema's own path
    assert paths == {"/v1/chat/completions", "/v1/completions", "/v1/models", "/v1/models/{model}",
                     "/health", "/metrics", "/tokenize", "/detokenize",
                     "/v1/budgets", "/admin/router", "/v1/sessions/{session_id}/steps"}
    stats: dict[int, int] = {}

    @given(case=cases(schema, models, keys, max_tokens_cap))
    @settings(max_examples=examples, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    def fuzz(case):
        check(case, url, stats)
    fuzz()
    return stats


def test_fuzz_in_process(inproc_url):
    stats = run_fuzz(inproc_url, ["big", "small", "auto"],
                     [KEYS["tenant"]] * 5 + [None, KEYS["admin"], "sk-garbage", "sk-fuzz-eu"], examples=300)
    assert stats.get(200, 0) > 20 and stats.get(400, 0) > 20, stats  # it reached both the engines and the validators


def test_fuzz_live_serve_app(gateway_url):
    stats = run_fuzz(gateway_url, ["llama3-8b"], [None, "sk-anything"], examples=40, max_tokens_cap=32)
    assert stats.get(200, 0) > 3, stats
