"""Routing micro-benchmark: one decision's own cost, hashing included.

    python -m serving.bench.routing [--replicas 64] [--blocks 100000] [--decisions 20000]

A router over `replicas` replicas in 3 regions (random load), its prefix index
warmed to at least `blocks` (block, replica) entries, times one decision:
block hashing of the prompt's token ids, filters, prefix match, the latency
model and the pick (`choose`), and apart from it the booking of the request's
blocks in the index that `route` adds (`on_routed`). The
request's end (`on_finished`, `--inflight` decisions later, so load feeds
back into routing) is not timed. Two workloads, side by side:

- agentic: sessions over 128 shared 1,024-token system prompts whose history
  grows by `--step-tokens` per call (prompts 1k to 8k tokens, as coding agents'
  tool loops); each call re-sends and re-hashes the whole prompt.
- unique_tail: every prompt is a shared 1,024-token system prompt plus 3,072
  fresh tokens (4k): each decision books 192 new blocks and evicts as many (a
  worst case for the index).

Each prompt is built (untimed) just before its decision: the gateway hashes a
prompt it has just parsed, whose token ids are still in cache. Prints one JSON
object: the headline `decision_p50_us`, `decision_p99_us` and
`decisions_per_s` are unique_tail's (a 4,096-token prompt), then the index's
measured bytes per entry and both workloads in full.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import time
import tracemalloc
from collections import deque

import numpy as np

from serving.prefix import PrefixIndex, block_hashes
from serving.routing import Router
from serving.types import ReplicaSnapshot, RouteRequest

REGIONS = ("us-east", "eu-west", "ap-south")
RTT = {"us-east": {"us-east": 2, "eu-west": 75, "ap-south": 190},
       "eu-west": {"us-east": 75, "eu-west": 2, "ap-south": 120},
       "ap-south": {"us-east": 190, "eu-west": 120, "ap-south": 2}}
SYSTEM_TOKENS = 1024
MAX_PROMPT = 8192


def bytes_per_entry(block_size: int = 16, replicas: int = 64, blocks: int = 200_000) -> float:
    """Measured heap bytes per indexed (block, replica) pair, at about 1.5 holders per block."""
    rng = random.Random(1)
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    index = PrefixIndex(block_size)
    for r in range(replicas):
        index.add_replica(f"r{r}", 10**9)
    hashes = [rng.getrandbits(60) for _ in range(int(blocks / 1.5))]
    for i, h in enumerate(hashes):
        index.insert(f"r{i % replicas}", [h])
        if i % 2 == 0:
            index.insert(f"r{(i + 1) % replicas}", [h])
    del hashes
    gc.collect()
    used = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    return used / len(index)


class Workload:
    def __init__(self, kind: str, replicas: int, step_tokens: int, seed: int):
        self.kind, self.replicas, self.step = kind, replicas, step_tokens
        self.rng = np.random.default_rng(seed)
        self.systems = [self.rng.integers(0, 32000, SYSTEM_TOKENS).tolist() for _ in range(128)]
        self.sessions: list[list[int]] = []
        self.n = 0

    def _fresh(self, i: int) -> list[int]:
        if self.kind == "unique_tail":
            return self.systems[i % 128] + self.rng.integers(0, 32000, 3 * SYSTEM_TOKENS).tolist()
        start = int(self.rng.integers(0, MAX_PROMPT - SYSTEM_TOKENS))
        return self.systems[i % 128] + self.rng.integers(0, 32000, start).tolist()

    def warm_prompt(self) -> tuple[str, list[int]]:
        """A prompt some replica already served (its blocks are in that replica's cache)."""
        i = self.n
        self.n += 1
        if self.kind == "agentic":
            if len(self.sessions) < 1024:
                self.sessions.append(self._fresh(i))
            p = self.sessions[i % len(self.sessions)]
            return f"r{(i % len(self.sessions)) % self.replicas}", p
        return f"r{i % self.replicas}", self._fresh(i)

    def next_prompt(self, i: int) -> list[int]:
        if self.kind == "unique_tail":
            return self._fresh(i)
        k = i % len(self.sessions)
        p = self.sessions[k]
        if len(p) + self.step > MAX_PROMPT:  # the session ends; a new one starts
            p = self.systems[int(self.rng.integers(128))][:]
        p = p + self.rng.integers(0, 32000, self.step).tolist()  # tool result + reply
        self.sessions[k] = p
        return p


def run(kind: str, replicas: int, blocks: int, decisions: int, policy: str, block_size: int,
        step_tokens: int, inflight: int, seed: int) -> dict:
    rng = random.Random(seed)
    router = Router(policy, block_size=block_size, rtt_ms=RTT, seed=seed)
    cap = max(1, 4 * blocks // replicas) * block_size  # the index, not the LRU, is the limit
    for r in range(replicas):
        router.update(ReplicaSnapshot(f"r{r}", REGIONS[r % 3], "m", num_running=rng.randrange(0, 40),
                                      waiting_prefill_tokens=rng.randrange(0, 8000),
                                      kv_capacity_tokens=cap, kv_usage=rng.random()))
    w = Workload(kind, replicas, step_tokens, seed)
    while len(router.index) < blocks:
        rid, p = w.warm_prompt()
        router.index.insert(rid, block_hashes(p, block_size, "m"))
    sizes = np.empty(decisions, np.int64)
    total, decided, hashing = np.empty(decisions), np.empty(decisions), np.empty(decisions)
    perf = time.perf_counter
    live: deque[str] = deque()
    gc.disable()
    try:
        for i in range(decisions):
            # The prompt is built (untimed) just before its decision, as the gateway
            # hashes a prompt it has just parsed.
            toks = w.next_prompt(i)
            sizes[i] = len(toks)
            t0 = perf()
            hashes = block_hashes(toks, block_size, "m")
            t1 = perf()
            req = RouteRequest(f"q{i}", "m", len(toks), hashes, client_region=REGIONS[i % 3])
            decision, ctx, pos = router.choose(req)
            t2 = perf()
            router.on_routed(req, decision, ctx, pos)  # booking: what `route` adds to `choose`
            t3 = perf()
            hashing[i], decided[i], total[i] = t1 - t0, t2 - t0, t3 - t0
            live.append(req.request_id)
            if len(live) > inflight:  # the oldest request ends: load feeds back into routing
                router.on_finished(live.popleft())
    finally:
        gc.enable()
    us = lambda a, q: round(float(np.percentile(a, q)) * 1e6, 1)  # noqa: E731
    return {
        "prompt_tokens_mean": round(float(sizes.mean())),
        "prompt_tokens_p50": int(np.median(sizes)),
        "indexed_entries": len(router.index),
        "decision_p50_us": us(decided, 50),  # hashing + filters, match, model, pick
        "decision_p99_us": us(decided, 99),
        "hashing_p50_us": us(hashing, 50),
        "booking_p50_us": us(total - decided, 50),  # index update for the routed request
        "with_booking_p50_us": us(total, 50),
        "with_booking_p99_us": us(total, 99),
        "decisions_per_s": round(decisions / float(total.sum())),
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--replicas", type=int, default=64)
    ap.add_argument("--blocks", type=int, default=100_000)
    ap.add_argument("--decisions", type=int, default=20_000)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--step-tokens", type=int, default=256)
    ap.add_argument("--inflight", type=int, default=256,
                    help="requests in flight: each decision ends the oldest beyond this")
    ap.add_argument("--policy", default="latency")
    ap.add_argument("--workload", action="append", choices=("agentic", "unique_tail"))
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    workloads = {k: run(k, a.replicas, a.blocks, a.decisions, a.policy, a.block_size,
                        a.step_tokens, a.inflight, a.seed)
                 for k in (a.workload or ["agentic", "unique_tail"])}
    out = {"policy": a.policy, "replicas": a.replicas, "block_size": a.block_size}
    if "unique_tail" in workloads:  # the headline: a 4,096-token prompt
        u = workloads["unique_tail"]
        out.update({k: u[k] for k in ("decision_p50_us", "decision_p99_us", "decisions_per_s")})
    out["bytes_per_index_entry"] = round(bytes_per_entry(a.block_size, a.replicas), 1)
    out["workloads"] = workloads
    print(json.dumps(out))


if __name__ == "__main__":
    main()
