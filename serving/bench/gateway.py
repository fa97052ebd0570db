"""Gateway overhead: time to first byte through the full gateway vs a minimal Serve app.

    python -m serving.bench.gateway [--requests 300] [--duration 10] [--port 8012] [--ray-calls]

One Ray session serves both apps side by side (serving.ray.baseline): the
full gateway with a zero-delay simulated engine, and a baseline Serve app that
streams the very bytes the gateway sent. TTFB is measured sequentially, the
two apps alternating request by request so both see the same machine; then
streams per second through the gateway with 32 concurrent clients. Prints one
JSON object:

    gateway_ttfb_p50_ms, baseline_ttfb_p50_ms, ratio_p50 (goal <= 1.5),
    gateway_ttfb_p99_ms, baseline_ttfb_p99_ms,
    gateway_streams_per_s (concurrency 32, goal >= 100), baseline_streams_per_s,
    router_route_us_p50 (the router actor's own time per decision),
    ingress_route_rtt_us_p50 (the routing call as the ingress waits for it),
    router_channel (calls over the direct channel; `--ray-calls` turns it off)

The client (aiohttp) runs in this process on the same 2 cores as Ray, the
proxy and the replicas; every figure includes that contention.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time

import aiohttp

BODY = {"model": "zero", "messages": [{"role": "user", "content": "measure the gateway"}],
        "max_tokens": 16, "stream": True}


async def _ttfb(session: aiohttp.ClientSession, url: str) -> tuple[float, bytes]:
    t = time.perf_counter()
    async with session.post(url, json=BODY) as r:
        if r.status != 200:
            raise RuntimeError(f"{url}: HTTP {r.status}: {await r.text()}")
        first = await r.content.readany()
        ttfb = time.perf_counter() - t
        rest = await r.read()
    return ttfb * 1000.0, first + rest


async def _wait_healthy(session: aiohttp.ClientSession, base: str) -> None:
    for _ in range(300):
        try:
            async with session.get(base + "/health") as r:
                if r.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.2)
    raise RuntimeError("gateway not healthy")


async def _throughput(url: str, concurrency: int, duration_s: float) -> float:
    done = 0
    stop = time.perf_counter() + duration_s
    conn = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=conn) as s:
        async def worker():
            nonlocal done
            while time.perf_counter() < stop:
                async with s.post(url, json=BODY) as r:
                    await r.read()
                    if r.status == 200:
                        done += 1
        t = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return done / (time.perf_counter() - t)


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


async def measure(base: str, requests: int, duration_s: float, deploy_baseline) -> dict:
    gw_url, bl_url = base + "/v1/chat/completions", base + "/baseline"
    async with aiohttp.ClientSession() as s:
        await _wait_healthy(s, base)
        for _ in range(20):  # warm the path (connections, router, engine loop)
            _, sample = await _ttfb(s, gw_url)
        events = [e + b"\n\n" for e in sample.split(b"\n\n") if e]
        await asyncio.get_running_loop().run_in_executor(None, deploy_baseline, events)
        for _ in range(20):
            _, same = await _ttfb(s, bl_url)
        assert len(same) == len(sample), "baseline must stream as many bytes as the gateway"
        gw, bl = [], []
        for _ in range(requests):
            gw.append((await _ttfb(s, gw_url))[0])
            bl.append((await _ttfb(s, bl_url))[0])
        async with s.get(base + "/admin/router") as r:
            rs = await r.json()
            route_us, channel = rs.get("route_us_p50"), rs.get("router_channel")
            route_rtt_us = rs.get("route_rtt_us_p50")
    gw_rps = await _throughput(gw_url, 32, duration_s)
    bl_rps = await _throughput(bl_url, 32, duration_s)
    g50, b50 = statistics.median(gw), statistics.median(bl)
    return {"gateway_ttfb_p50_ms": round(g50, 2), "baseline_ttfb_p50_ms": round(b50, 2),
            "ratio_p50": round(g50 / b50, 2),
            "gateway_ttfb_p99_ms": round(_pct(gw, 0.99), 2), "baseline_ttfb_p99_ms": round(_pct(bl, 0.99), 2),
            "gateway_streams_per_s": round(gw_rps, 1), "baseline_streams_per_s": round(bl_rps, 1),
            "concurrency": 32, "requests_per_side": requests, "stream_bytes": len(sample),
            "router_route_us_p50": route_us, "ingress_route_rtt_us_p50": route_rtt_us, "router_channel": channel}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--port", type=int, default=8012)
    ap.add_argument("--ray-calls", action="store_true",
                    help="route over Ray actor calls instead of the direct channel (router.direct_channel: false)")
    a = ap.parse_args()
    from serving.ray import baseline  # Ray only behind this import

    baseline.start(a.port, direct_channel=not a.ray_calls)
    try:
        out = asyncio.run(measure(f"http://127.0.0.1:{a.port}", a.requests, a.duration,
                                  baseline.deploy_baseline))
    finally:
        baseline.stop()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
