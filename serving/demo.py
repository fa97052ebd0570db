"""A one-minute look at the router, without Ray: `make demo`.

    python -m serving.demo [--config deployments/local.yaml] [--sessions 3] [--steps 4]

Builds the embedded default's world in one process (the same YAML `make run`
serves: three regions of simulated replicas, the RTT matrix injected on the
network path, the `latency` router) and drives it through the real gateway
(ASGI app, auth, routing, dispatch, SSE) with an agent session per client
region: each step resends the shared system prompt and the growing history.
It prints, per call, where it went, why, the predicted TTFT and the TTFT the
client saw, then where each region's clients were served.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections import Counter, defaultdict
from pathlib import Path

import httpx
import uvicorn
import yaml

from serving.config import load_config
from serving.engines.sim import SimEngine
from serving.ingress.app import build_app
from serving.ingress.local import LocalEngines, LocalRouter
from serving.ingress.metrics import GatewayMetrics
from serving.ingress.pipeline import Gateway
from serving.ingress.policies import gateway_policies
from serving.routing import Router

SYSTEM = ("You are a coding agent. You may call the tools read_file, run_tests and "
          "search. Think step by step and answer with the next tool call. ") * 40


def build_gateway(config_path: str):
    raw = yaml.safe_load(Path(config_path).read_text())
    args = raw["applications"][0]["args"] if "applications" in raw else raw
    cfg = load_config(args)
    model = cfg.models[0].name
    engines = {}
    for region, rc in cfg.regions.items():
        for i in range(rc.replicas):
            rid = f"{region}-{i}"
            engines[rid] = SimEngine(rid, region, model, profile=rc.profile,
                                     kv_capacity_tokens=rc.kv_capacity_tokens)
    local = LocalEngines(engines)
    router = Router(cfg.router.policy, rtt_ms=cfg.rtt(), seed=0,
                    default_profile=next(iter(cfg.regions.values())).profile)
    port = LocalRouter(router, local)
    metrics = GatewayMetrics()
    gw = Gateway(cfg, port, local, metrics=metrics, **gateway_policies(cfg, port, metrics=metrics))
    return gw, engines, model


async def one_call(client: httpx.AsyncClient, model: str, region: str, session: str,
                   history: list[dict]) -> dict:
    body = {"model": model, "stream": True, "max_tokens": 24,
            "stream_options": {"include_usage": True},
            "messages": [{"role": "system", "content": SYSTEM}, *history]}
    headers = {"x-client-region": region, "x-session-id": session,
               "x-agent-step": str(len(history) // 2 + 1)}
    t0 = time.perf_counter()
    ttft = None
    text, usage = [], {}
    async with client.stream("POST", "/v1/chat/completions", json=body, headers=headers) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{r.status_code}: {(await r.aread()).decode()}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            ev = json.loads(line[6:])
            if ev.get("usage"):
                usage = ev["usage"]
            for ch in ev.get("choices", []):
                if ch["delta"].get("content"):
                    ttft = ttft if ttft is not None else (time.perf_counter() - t0) * 1000
                    text.append(ch["delta"]["content"])
        h = r.headers
    return {"client": region, "session": session, "step": headers["x-agent-step"],
            "region": h["x-proxima-region"], "replica": h["x-proxima-replica"],
            "predicted_ttft_ms": float(h["x-proxima-predicted-ttft-ms"]),
            "ttft_ms": ttft, "cached": usage.get("prompt_tokens_details", {}).get("cached_tokens", 0),
            "prompt": usage.get("prompt_tokens", 0), "answer": "".join(text)}


async def demo(config: str, sessions: int, steps: int) -> list[dict]:
    gw, engines, model = build_gateway(config)
    regions = list(dict.fromkeys(e.region for e in engines.values()))
    rows: list[dict] = []
    # A real HTTP server (uvicorn) on a free local port, so streaming is real and
    # the TTFT printed is what a client sees (httpx's ASGI transport buffers bodies).
    server = uvicorn.Server(uvicorn.Config(build_app(gw), host="127.0.0.1", port=0,
                                           log_level="warning", lifespan="off"))
    serving = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=60) as c:
        async def session(region: str, k: int) -> None:
            history: list[dict] = []
            for _ in range(steps):
                history.append({"role": "user", "content": f"Tool result {len(history)} for {region}: ok. " * 8})
                row = await one_call(c, model, region, f"{region}-agent-{k}", history)
                rows.append(row)
                history.append({"role": "assistant", "content": row["answer"]})
        await asyncio.gather(*(session(r, k) for r in regions for k in range(sessions)))
    server.should_exit = True
    await serving
    for e in engines.values():
        await e.close()
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="deployments/local.yaml")
    ap.add_argument("--sessions", type=int, default=2, help="agent sessions per client region")
    ap.add_argument("--steps", type=int, default=4, help="calls per session")
    a = ap.parse_args(argv)
    rows = asyncio.run(demo(a.config, a.sessions, a.steps))
    print(f"{'client':9} {'session':18} {'step':>4}  {'-> replica':12} {'cached/prompt':>14} "
          f"{'predicted':>10} {'TTFT seen':>10}")
    for r in sorted(rows, key=lambda r: (r["session"], int(r["step"]))):
        print(f"{r['client']:9} {r['session']:18} {r['step']:>4}  {r['replica']:12} "
              f"{r['cached']:>6}/{r['prompt']:<7} {r['predicted_ttft_ms']:8.1f}ms {r['ttft_ms']:8.1f}ms")
    print("\nwhere each region's clients were served:")
    by = defaultdict(Counter)
    for r in rows:
        by[r["client"]][r["region"]] += 1
    for client, c in by.items():
        print(f"  {client:9} -> " + ", ".join(f"{reg} x{n}" for reg, n in c.most_common()))
    hit = sum(r["cached"] for r in rows) / max(1, sum(r["prompt"] for r in rows))
    print(f"\nprompt tokens served from prefix caches: {hit:.0%}")


if __name__ == "__main__":
    main()
