"""Real-engine benchmark: a trace replayed through Proxima's router and vllm-router.

    python -m serving.bench.real --trace PATH --policy latency --policy round_robin \
        [--vllm-router consistent_hash --vllm-router cache_aware] [--engines 4] \
        [--kv-tokens 32768] [--speed 1.0] [--engine-url URL ...] [--rounds 1] --out DIR

Starts `--engines` vLLM CPU servers serving the offline tiny model (or uses
`--engine-url` servers that already run with VLLM_SERVER_DEV_MODE=1), each
with exactly `--kv-tokens` of KV cache (128-token blocks). Then, once per
policy, with every engine idle and its prefix cache reset: replays the trace
open-loop at `--speed` (0.1 = a tenth of real time) through Proxima's Router
and `vllm_http` engines; then the same for each `--vllm-router` policy, with a
`vllm-router` process in front of the same engines (sessions carried in
`x-session-id`). `cache_hit_rate` is vLLM's own prefix_cache_hits_total /
prefix_cache_queries_total, as deltas over the run; latencies are measured
at the client. With `--rounds N` the policies are replayed N times, interleaved
(so a slow spell on a shared machine hits every policy alike), and each
policy's figures pool its rounds. Writes `--out/results.json` (and each run's
requests as JSON lines) and prints it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

from serving.bench import replay
from serving.bench.trace import PromptMaker, load
from serving.bench.vllm_servers import VLLMServers, healthy
from serving.engines.vllm_http import VLLMHttpEngine
from serving.routing import Router


async def _counters(engines: list[VLLMHttpEngine]) -> tuple[int, int]:
    for e in engines:
        if not await e.poll():
            raise RuntimeError(f"engine {e.url} does not answer /metrics")
    snaps = [e.snapshot() for e in engines]
    return sum(s.prefix_cache_hits for s in snaps), sum(s.prefix_cache_queries for s in snaps)


async def _quiesce(engines: list[VLLMHttpEngine], timeout_s: float = 120.0) -> None:
    """Wait until no engine runs or queues anything, then reset every prefix cache."""
    deadline = time.monotonic() + timeout_s
    while True:
        for e in engines:
            await e.poll()
        if all(e.snapshot().num_running == 0 and e.snapshot().num_waiting == 0 for e in engines):
            break
        if time.monotonic() > deadline:
            raise TimeoutError("engines still busy before the next policy")
        await asyncio.sleep(0.5)
    for e in engines:
        await e.reset_prefix_cache()


async def _warm_up(engines: list[VLLMHttpEngine], prompts: PromptMaker, records) -> None:
    """A few requests per engine so first-call costs do not land on the first policy."""
    from serving.engines.base import GenerateRequest
    for k, e in enumerate(engines):
        for j, rec in enumerate(records[:3]):
            ids = tuple(prompts.token_ids(rec))
            async for _ in e.generate(GenerateRequest(f"warm-{k}-{j}", ids, max_tokens=8,
                                                      temperature=0.0, ignore_eos=True)):
                pass


def _router_options(items: list[str], policy: str) -> dict[str, float]:
    """KEY=VALUE policy options; they apply to the policies that take them (latency's tie margins)."""
    from serving.routing.policies import make_policy

    opts = {}
    for item in items:
        key, _, value = item.partition("=")
        opts[key.strip()] = float(value)
    try:
        make_policy(policy, **opts)
        return opts
    except ValueError:  # this policy takes none of them
        return {}


def _vllm_router_bin(explicit: str | None) -> str:
    for cand in (explicit, str(Path(sys.executable).with_name("vllm-router")), shutil.which("vllm-router")):
        if cand and os.access(cand, os.X_OK):
            return cand
    raise SystemExit("vllm-router not found: pip install vllm-router==0.1.17 (or pass --vllm-router-bin)")


def _start_vllm_router(binary: str, urls: list[str], policy: str, port: int, log_dir: str) -> subprocess.Popen:
    Path(log_dir).mkdir(parents=True, exist_ok=True)
    log = open(Path(log_dir) / f"vllm-router-{policy}.log", "wb")
    proc = subprocess.Popen([binary, "--host", "127.0.0.1", "--port", str(port), "--worker-urls", *urls,
                             "--policy", policy, "--disable-retries", "--log-level", "warning"],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 60
    while not healthy(f"http://127.0.0.1:{port}"):
        if proc.poll() is not None or time.monotonic() > deadline:
            _stop(proc)
            raise RuntimeError(f"vllm-router ({policy}) did not start; see {log_dir}")
        time.sleep(0.5)
    return proc


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


async def run(a: argparse.Namespace, urls: list[str]) -> dict:
    records = load(a.trace, a.limit)
    words = json.loads((Path(a.model_dir) / "proxima_words.json").read_text())
    prompts = PromptMaker(words["ids"], words["words"])
    engines = [VLLMHttpEngine(f"e{i}", u, model=a.served_model, profile=a.profile) for i, u in enumerate(urls)]
    for e in engines:
        await e.start()
    results: dict = {"policies": {}, "config": {
        "trace": str(a.trace), "requests": len(records), "engines": len(urls), "kv_tokens": a.kv_tokens,
        "speed": a.speed, "profile": a.profile, "engine_urls": urls,
        "router_options": a.router_option, "rounds": a.rounds}}
    try:
        await _warm_up(engines, prompts, records)
        runs = [("proxima", p) for p in a.policy] + [("vllm-router", p) for p in a.vllm_router]
        pooled: dict[str, tuple[list, int, int]] = {}
        results["rounds"] = []
        for rnd in range(a.rounds):
            results["rounds"].append({})
            for kind, policy in runs:
                name, out, hits, queries = await _one_run(a, urls, engines, records, prompts, kind, policy)
                results["rounds"][rnd][name] = replay.summarize(out, hits, queries)
                print(json.dumps({f"round {rnd + 1}: {name}": results["rounds"][rnd][name]}),
                      file=sys.stderr, flush=True)
                prev = pooled.get(name, ([], 0, 0))
                pooled[name] = (prev[0] + out, prev[1] + hits, prev[2] + queries)
                with open(Path(a.out) / f"requests-{name.replace(':', '-')}-r{rnd + 1}.jsonl", "w") as f:
                    f.writelines(json.dumps(asdict(o)) + "\n" for o in out)
        for name, (out, hits, queries) in pooled.items():
            results["policies"][name] = pooled_summary(out, hits, queries,
                                                       [r[name] for r in results["rounds"]])
    finally:
        for e in engines:
            await e.close()
    return results


def pooled_summary(out: list, hits: int, queries: int, rounds: list[dict]) -> dict:
    """Percentiles over every round's requests; throughput is the rounds' mean (their
    wall clocks do not overlap, so one span over all of them would mean nothing)."""
    s = replay.summarize(out, hits, queries)
    s["throughput_tok_s"] = round(sum(r["throughput_tok_s"] for r in rounds) / len(rounds), 1)
    return s


async def _one_run(a, urls, engines, records, prompts, kind: str, policy: str):
    """One replay of the trace with one policy, from idle engines with empty caches."""
    await _quiesce(engines)
    h0, q0 = await _counters(engines)
    if kind == "proxima":
        name = policy
        router = Router(policy, block_size=128, default_profile=a.profile, seed=0,
                        **_router_options(a.router_option, policy))
        out = await replay.replay_router(records, prompts, engines, policy, speed=a.speed,
                                         model=a.served_model, profile=a.profile, router=router)
    else:
        name = f"vllm-router:{policy}"
        proc = _start_vllm_router(_vllm_router_bin(a.vllm_router_bin), urls, policy,
                                  a.router_port, a.log_dir)
        try:
            out = await replay.replay_http(records, prompts, f"http://127.0.0.1:{a.router_port}",
                                           speed=a.speed, model=a.served_model, name=policy)
        finally:
            _stop(proc)
    await _quiesce(engines)
    h1, q1 = await _counters(engines)
    return name, out, h1 - h0, q1 - q0


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trace", required=True)
    ap.add_argument("--policy", action="append", default=[], help="Proxima routing policy (repeatable)")
    ap.add_argument("--vllm-router", action="append", default=[], help="vllm-router policy (repeatable)")
    ap.add_argument("--engines", type=int, default=4)
    ap.add_argument("--kv-tokens", type=int, default=32768)
    ap.add_argument("--speed", type=float, default=1.0, help="replay rate: 0.1 = a tenth of real time")
    ap.add_argument("--engine-url", action="append", default=[], help="use running vLLM servers")
    ap.add_argument("--model-dir", default=None, help="tiny model dir (made with serving.models.tiny if absent)")
    ap.add_argument("--served-model", default="tiny")
    ap.add_argument("--profile", default="tiny-cpu")
    ap.add_argument("--router-option", action="append", default=[], metavar="KEY=VALUE",
                    help="a policy option for Proxima's Router, e.g. tie_margin_frac=0.15 (repeatable)")
    ap.add_argument("--limit", type=int, default=None, help="first N trace records only")
    ap.add_argument("--rounds", type=int, default=1,
                    help="replay every policy this many times, interleaved; results pool the rounds")
    ap.add_argument("--port-base", type=int, default=8100)
    ap.add_argument("--router-port", type=int, default=8190)
    ap.add_argument("--vllm-python", default=sys.executable, help="python that has vllm(-cpu)")
    ap.add_argument("--vllm-router-bin", default=None)
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    if not a.policy and not a.vllm_router:
        ap.error("give at least one --policy or --vllm-router")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    a.log_dir = str(out / "logs")
    if a.model_dir is None:
        a.model_dir = str(out / "tiny-model")
    if not (Path(a.model_dir) / "proxima_words.json").exists():
        subprocess.run([a.vllm_python, "-m", "serving.models.tiny", a.model_dir], check=True)
    servers = None
    urls = list(a.engine_url)
    if not urls:
        servers = VLLMServers(a.model_dir, [a.port_base + i for i in range(a.engines)], kv_tokens=a.kv_tokens,
                              served_model=a.served_model, python=a.vllm_python, log_dir=a.log_dir)
        t0 = time.monotonic()
        servers.start()
        print(f"{a.engines} vLLM servers healthy after {time.monotonic() - t0:.0f} s", file=sys.stderr)
        urls = servers.urls
    try:
        results = asyncio.run(run(a, urls))
    finally:
        if servers is not None:
            servers.stop()
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results))


if __name__ == "__main__":
    main()
