"""Simulator speed: a million requests over 256 replicas, on one core.

    python -m serving.bench.sim [--requests 1000000] [--replicas 256] [--policy latency]

Four regions of llama3-8b-h100 replicas serve a mixed workload (chat and
voice conversations, agent sessions over shared system prompts, unique
prompts) at about 4 requests per second per replica, routed by the real
Router. Prints one JSON object: requests, replicas, wall_s, the simulated
span, events per second and the run's headline metrics. The oracle hit rate
is skipped (it needs every block ever seen in memory).
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import time

from serving.sim.loop import Simulator
from serving.sim.scenario import PolicySpec, parse
from serving.sim.workload import arrivals

REGIONS = ("us-east", "us-west", "eu-west", "ap-south")
RTT = {"us-east": {"us-east": 2, "us-west": 60, "eu-west": 75, "ap-south": 190},
       "us-west": {"us-east": 60, "us-west": 2, "eu-west": 140, "ap-south": 170},
       "eu-west": {"us-east": 75, "us-west": 140, "eu-west": 2, "ap-south": 120},
       "ap-south": {"us-east": 190, "us-west": 170, "eu-west": 120, "ap-south": 2}}

# Requests per second each source adds per replica (sessions are converted by their mean length).
MIX = {"chat": 1.2, "voice": 1.0, "agent_sessions": 1.0, "no_reuse": 0.8}
MEAN_STEPS = {"chat": 3.5, "voice": 1.0, "agent_sessions": 4.0, "no_reuse": 1.0}


def scenario(replicas: int, requests: int, seed: int) -> dict:
    per_region = [replicas // len(REGIONS) + (i < replicas % len(REGIONS)) for i in range(len(REGIONS))]
    rps = sum(MIX.values()) * replicas
    duration = requests / rps * 1.3  # a little long; the stream is cut at `requests`
    workload = []
    for kind, per_replica in MIX.items():
        rates = {r: per_replica * n / MEAN_STEPS[kind] for r, n in zip(REGIONS, per_region) if n}
        src = {"generator": kind, "rate_per_s": rates}
        if kind == "chat":
            src.update(turns=[2, 5], think_s=[2.0, 10.0], output_tokens=[50, 200])
        elif kind == "agent_sessions":
            src.update(system_prompt_tokens=1500, system_prompts=8, steps=[2, 6], tool_tokens=[50, 300],
                       output_tokens=[30, 150], user_tokens=200)
        elif kind == "no_reuse":
            src.update(prompt_tokens=[200, 1200], output_tokens=[50, 200])
        workload.append(src)
    return {"seed": seed, "duration_s": duration,
            "regions": {r: {"replicas": n, "profile": "llama3-8b-h100", "kv_capacity_tokens": 200_000}
                        for r, n in zip(REGIONS, per_region) if n},
            "rtt_ms": RTT, "workload": workload, "slo": {"ttft_ms": 1000, "tpot_ms": 50},
            "drain_s": 120, "snapshot_interval_ms": 250}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=1_000_000)
    ap.add_argument("--replicas", type=int, default=256)
    ap.add_argument("--policy", default="latency")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--gc", action="store_true", help="keep the cyclic garbage collector on")
    args = ap.parse_args()
    sc = parse(scenario(args.replicas, args.requests, args.seed))
    stream = itertools.islice(arrivals(sc), args.requests)
    gc.collect()
    gc.freeze()  # the long-lived structures need no cyclic GC passes
    if not args.gc:
        gc.disable()  # the event loop makes no reference cycles; full passes over a large heap cost minutes
    t0, c0 = time.perf_counter(), time.process_time()
    sim = Simulator(sc, PolicySpec(args.policy, args.policy), stream=stream)
    res = sim.run()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    print(json.dumps({
        "requests": res["requests"], "replicas": sc.total_replicas, "wall_s": round(wall, 2), "cpu_s": round(cpu, 2),
        "requests_per_wall_s": round(res["requests"] / wall), "policy": args.policy,
        "sim_time_s": res["sim_time_s"], "finished": res["finished"], "failed": res["failed"],
        "ttft_p50_ms": res["ttft_p50_ms"], "ttft_p99_ms": res["ttft_p99_ms"],
        "cache_hit_rate": res["cache_hit_rate"], "goodput": res["goodput"],
        "throughput_tok_s": res["throughput_tok_s"]}))


if __name__ == "__main__":
    main()
