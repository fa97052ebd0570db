"""Routing micro-benchmark: one decision's own cost, hashing included.

    python -m serving.bench.routing [--replicas 64] [--blocks 100000] [--decisions 20000]

Fills the prefix index of `replicas` replicas (3 regions) with at least
`blocks` (block, replica) entries from prompts that share system prompts, then
times `route` for fresh 4,096-token prompts: block hashing of the prompt,
filters, prefix match, the latency model and the pick, plus the lifecycle
hooks that release each request. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import time
import tracemalloc

import numpy as np

from serving.prefix import PrefixIndex, block_hashes
from serving.routing import Router
from serving.types import ReplicaSnapshot, RouteRequest

REGIONS = ("us-east", "eu-west", "ap-south")
RTT = {"us-east": {"us-east": 2, "eu-west": 75, "ap-south": 190},
       "eu-west": {"us-east": 75, "eu-west": 2, "ap-south": 120},
       "ap-south": {"us-east": 190, "eu-west": 120, "ap-south": 2}}


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


def run(replicas: int, blocks: int, decisions: int, prompt_tokens: int, policy: str,
        block_size: int, seed: int) -> dict:
    rng = random.Random(seed)
    router = Router(policy, block_size=block_size, rtt_ms=RTT, seed=seed)
    cap = max(1, 4 * blocks // replicas) * block_size  # the index, not the LRU, is the limit
    for r in range(replicas):
        router.update(ReplicaSnapshot(f"r{r}", REGIONS[r % 3], "m", num_running=rng.randrange(0, 40),
                                      waiting_prefill_tokens=rng.randrange(0, 8000),
                                      kv_capacity_tokens=cap, kv_usage=rng.random()))
    # Warm the index: shared system prompts plus unique tails, routed for real.
    systems = [[rng.randrange(32000) for _ in range(1024)] for _ in range(128)]
    n = 0
    while len(router.index) < blocks and n < 50 * blocks:
        toks = systems[n % 128] + [rng.randrange(32000) for _ in range(prompt_tokens - 1024)]
        req = RouteRequest(f"w{n}", "m", len(toks), block_hashes(toks, block_size, "m"),
                           client_region=REGIONS[n % 3])
        router.route(req)
        router.on_finished(req.request_id)
        n += 1
    prompts = [systems[i % 128] + [rng.randrange(32000) for _ in range(prompt_tokens - 1024)]
               for i in range(256)]
    times = np.empty(decisions)
    perf = time.perf_counter
    gc.disable()
    try:
        for i in range(decisions):
            toks = prompts[i % 256]
            t0 = perf()
            req = RouteRequest(f"q{i}", "m", prompt_tokens, block_hashes(toks, block_size, "m"),
                               client_region=REGIONS[i % 3])
            router.route(req)
            times[i] = perf() - t0
            router.on_finished(req.request_id)
    finally:
        gc.enable()
    t0 = perf()
    for i in range(2000):
        req = RouteRequest(f"t{i}", "m", prompt_tokens, block_hashes(prompts[i % 256], block_size, "m"),
                           client_region=REGIONS[i % 3])
        router.route(req)
        router.on_finished(req.request_id)
    rate = 2000 / (perf() - t0)
    return {
        "policy": policy,
        "replicas": replicas,
        "indexed_entries": len(router.index),
        "prompt_tokens": prompt_tokens,
        "block_size": block_size,
        "decisions": decisions,
        "decision_p50_us": round(float(np.percentile(times, 50)) * 1e6, 1),
        "decision_p99_us": round(float(np.percentile(times, 99)) * 1e6, 1),
        "decisions_per_s": round(rate),
        "bytes_per_index_entry": round(bytes_per_entry(block_size, replicas), 1),
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--replicas", type=int, default=64)
    ap.add_argument("--blocks", type=int, default=100_000)
    ap.add_argument("--decisions", type=int, default=20_000)
    ap.add_argument("--prompt-tokens", type=int, default=4096)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--policy", default="latency")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    print(json.dumps(run(a.replicas, a.blocks, a.decisions, a.prompt_tokens, a.policy,
                         a.block_size, a.seed)))


if __name__ == "__main__":
    main()
