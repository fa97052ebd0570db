"""Helpers for the reliability drills: real faults injected into real Ray actors, and load.

    kill_replica(app, replica_id, region, model)   crash one engine replica's actor
    RegionOutage(app, region, model).run()         keep a region's replicas dead until .stop
    Load(url, ...)                                 streaming clients in threads, every outcome kept
    process_rss(pids)                              resident memory per process (psutil)
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import threading
import time
from dataclasses import dataclass, field

import httpx


def serve_actor_name(app: str, region: str, model: str, uid: str = "") -> str:
    from deployments.app import engine_name

    return f"SERVE_REPLICA::{app}#{engine_name(region, model)}#{uid}"


def kill_replica(app: str, replica_id: str, region: str, model: str) -> None:
    """Crash an engine replica's actor as a dead process would; Serve starts a replacement."""
    import ray

    uid = replica_id[len(region) + 1:]
    ray.kill(ray.get_actor(serve_actor_name(app, region, model, uid), namespace="serve"), no_restart=True)


class RegionOutage:
    """Every engine replica of one region kept dead: Serve restarts them, this kills them again."""

    def __init__(self, app: str, region: str, model: str):
        self.prefix = serve_actor_name(app, region, model)
        self.stop = False
        self.kills = 0

    def run(self) -> None:
        import ray

        while not self.stop:
            for a in ray.util.list_named_actors(all_namespaces=True):
                if a["name"].startswith(self.prefix):
                    try:
                        ray.kill(ray.get_actor(a["name"], namespace="serve"), no_restart=True)
                        self.kills += 1
                    except ValueError:  # already gone
                        pass
            time.sleep(0.05)


@dataclass
class Outcome:
    status: int
    ok: bool  # 200, every token asked for, usage, [DONE], no in-band error
    region: str | None = None
    detail: str = ""


@dataclass
class Load:
    """`clients` threads, each sending streamed chat requests back to back until stop()."""

    url: str
    clients: int = 16
    max_tokens: int = 40
    regions: tuple[str, ...] = ("us-east",)
    model: str = "llama3-8b"
    outcomes: list[Outcome] = field(default_factory=list)

    def __post_init__(self):
        self._stop = threading.Event()
        self._pool = cf.ThreadPoolExecutor(self.clients)
        self._futs: list[cf.Future] = []

    def start(self) -> "Load":
        self._futs = [self._pool.submit(self._client, i) for i in range(self.clients)]
        return self

    def stop(self) -> list[Outcome]:
        self._stop.set()
        for f in self._futs:
            f.result()
        self._pool.shutdown()
        return self.outcomes

    def failed(self) -> list[Outcome]:
        return [o for o in self.outcomes if not o.ok]

    def _client(self, i: int) -> None:
        region = self.regions[i % len(self.regions)]
        n = 0
        with httpx.Client(base_url=self.url, timeout=60) as c:
            while not self._stop.is_set():
                n += 1
                self.outcomes.append(one_stream(c, f"client {i} request {n} " * 4, self.max_tokens, region,
                                                self.model))


def one_stream(c: httpx.Client, text: str, max_tokens: int, region: str, model: str) -> Outcome:
    body = {"model": model, "max_tokens": max_tokens, "stream": True,
            "stream_options": {"include_usage": True}, "messages": [{"role": "user", "content": text}]}
    try:
        with c.stream("POST", "/v1/chat/completions", json=body, headers={"x-client-region": region}) as r:
            if r.status_code != 200:
                r.read()
                return Outcome(r.status_code, False, detail=r.text[:300])
            words, usage, done = 0, None, False
            for line in r.iter_lines():
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data: "):
                    ev = json.loads(line[6:])
                    if "error" in ev:
                        return Outcome(200, False, r.headers.get("x-proxima-region"), json.dumps(ev))
                    for ch in ev.get("choices") or ():
                        words += len((ch["delta"].get("content") or "").split())
                    usage = ev.get("usage") or usage
            ok = done and usage is not None and usage["completion_tokens"] == max_tokens == words
            return Outcome(200, ok, r.headers.get("x-proxima-region"), "" if ok else f"{words} words, {usage}")
    except httpx.HTTPError as e:
        return Outcome(0, False, detail=repr(e))


def process_rss(pids: dict[str, int]) -> dict[str, int]:
    import psutil

    return {name: psutil.Process(pid).memory_info().rss for name, pid in pids.items()}
